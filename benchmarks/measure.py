"""Time and peak memory of a call on the CPU, shared by the benchmark scripts.

PyTorch keeps no CPU allocator statistics, so peak memory is read from the kernel: the process re-runs
itself with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB (every tensor buffer is its own mmap, returned
to the OS when freed, so the resident set follows live tensors); before a call the high-water mark is
reset (`echo 5 > /proc/self/clear_refs`), after it peak = VmHWM − VmRSS before the call. Memory resident
before the call (weights) is excluded; everything the call allocates (activations, outputs) counts.

VmHWM also counts the pages of files the call maps and reads (a safetensors checkpoint being loaded): clean
page cache the kernel can drop, which a library that keeps its checkpoint mapped holds in its resident set.
``private_peak`` samples RssAnon (the process's own memory) while the call runs, to tell the two apart.
"""

from __future__ import annotations

import gc
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
MB = 1024**2


def reexec_with_mmap_malloc() -> None:
    """Restart this script once with the malloc setting that makes RSS track live tensors."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        text = f.read()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def measure(fn: Callable[[], T], repeats: int = 1) -> tuple[T, float, int]:
    """(result, median seconds, peak bytes above the resident set before the call)."""
    times, peak, out = [], 0, None
    for _ in range(repeats):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        peak = max(peak, _status("VmHWM") - base)
    return out, statistics.median(times), peak


def private_peak(fn: Callable[[], T], every: float = 0.002) -> tuple[T, int]:
    """(result, the most RssAnon above its value before the call), RssAnon sampled every ``every`` s."""
    gc.collect()
    base = _status("RssAnon")
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status("RssAnon"))
            time.sleep(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    return out, max(peak[0], _status("RssAnon")) - base


def at_least(parser, *checks: tuple[str, int, int]) -> None:  # noqa: ANN001 - argparse.ArgumentParser
    """``parser.error`` for the first (flag, value, least) whose value is below its least."""
    for flag, value, least in checks:
        if value < least:
            parser.error(f"{flag} {value}: must be at least {least}")


def ratio_line(name: str, ours: tuple[float, int], theirs: tuple[float, int]) -> str:
    (t_o, m_o), (t_t, m_t) = ours, theirs
    return (
        f"{name:<28} time {t_o:8.2f} s vs {t_t:8.2f} s  (ours/theirs {t_o / t_t:5.2f}, "
        f"speed-up {t_t / t_o:5.2f}x)"
        f"   peak {m_o / MB:8.1f} MB vs {m_t / MB:8.1f} MB  (ours/theirs {m_o / max(m_t, 1):5.2f})"
    )
