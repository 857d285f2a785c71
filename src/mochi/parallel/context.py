"""The process world of a torchrun launch: setup from the environment, rank-0 outputs, bounded failures.

torchrun (``torchrun --nproc-per-node N -m mochi …``, or multi-node with ``--nnodes``/``--rdzv-endpoint``)
sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process; ``init_world`` reads them.
Without them (a plain ``python -m mochi …``) it returns None and nothing changes.

Failure handling: every collective has a timeout (``MOCHI_DIST_TIMEOUT`` seconds, default 60) set on the
process group, so a rank that dies or hangs turns into an exception on the others instead of a hang; gloo
usually notices a dead peer at once (its socket closes). torchrun then tears the job down.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mochi.errors import one_line

DEFAULT_TIMEOUT_S = 60.0
# The timeouts torch can take. Below about a second the rendezvous itself times out (at 1 ms the store's
# client gives up before it connects; ranks start up to seconds apart). torch turns the timeout into int64
# nanosecond deadlines, which overflow near 9.2e9 s (1e10 s: the store "times out" at once; 1e300 s
# overflows timedelta itself); the cap is far below that, at the largest whole seconds whose milliseconds
# fit a 32-bit int, the width of many socket waits (24.8 days: longer than any collective should take).
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = float((2**31 - 1) // 1000)
# How a collective fails when a peer is gone (gloo: the socket closed or reset) or stuck past the timeout.
_PEER_GONE = re.compile(r"closed by peer|reset by peer|Broken pipe|timed out|timeout", re.IGNORECASE)


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``group`` None means the default (WORLD) group."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Whether this rank writes outputs (videos, sidecars, checkpoints, logs)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun's variables are set (even for a world of one)."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def init_world(device: str | torch.device | None = None, timeout_s: float | None = None) -> World | None:
    """Join the process group torchrun describes; None when not launched by torchrun.

    device: "cpu" forces gloo; "cuda" (ValueError without CUDA) or None/"auto" take CUDA (NCCL, the device
    LOCAL_RANK) when present, None/"auto" else the CPU (gloo).
    timeout_s: bound on any collective, ``MIN_TIMEOUT_S`` to ``MAX_TIMEOUT_S`` seconds (default
    ``MOCHI_DIST_TIMEOUT`` or 60 s).
    """
    if not launched_by_torchrun():
        return None
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    timeout = check_timeout(timeout_s, "timeout_s") if timeout_s is not None else _env_timeout()
    from mochi.devices import parse_device

    # Checked as in one process: an unknown name raised from torch, and cuda without CUDA ran on the CPU.
    wanted = None if device in (None, "auto") else parse_device(device)
    if (wanted is None or wanted.type == "cuda") and torch.cuda.is_available():
        dev = torch.device("cuda", local if wanted is None or wanted.index is None else wanted.index)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout), **kwargs)
    return World(rank, size, local, dev, backend)


def close_world() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _env_timeout() -> float:
    """``MOCHI_DIST_TIMEOUT`` as seconds (default 60), or a ValueError naming it (``check_timeout``)."""
    text = os.environ.get("MOCHI_DIST_TIMEOUT")
    if text is None:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    return check_timeout(value, f"MOCHI_DIST_TIMEOUT={text!r}")


def check_timeout(value: float, name: str) -> float:
    """``value`` seconds as a float when torch can take it as a process-group timeout (``MIN_TIMEOUT_S`` to
    ``MAX_TIMEOUT_S``), else a ValueError naming ``name``, the range and the nearest valid value."""
    value = float(value)
    if not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:
        nearest = (
            f"{MIN_TIMEOUT_S:g}"
            if value < MIN_TIMEOUT_S
            else f"{MAX_TIMEOUT_S:.0f}"
            if value > MAX_TIMEOUT_S
            else f"{DEFAULT_TIMEOUT_S:g} (the default)"
        )
        raise ValueError(
            f"{name} must be a number of seconds from {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:.0f} (24.8 days; "
            f"default {DEFAULT_TIMEOUT_S:g}); nearest valid: {nearest}"
        )
    return value


def broadcast_int(value: int | None, world: World | None) -> int:
    """Rank 0's ``value`` on every rank (e.g. a seed drawn on rank 0). ``value`` may be None off rank 0."""
    if world is None or world.size == 1:
        return int(value)  # type: ignore[arg-type]
    t = torch.tensor([0 if value is None else int(value)], dtype=torch.int64, device=world.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def broadcast_text(value: str | None, world: World | None) -> str | None:
    """Rank 0's ``value`` (a string or None) on every rank, sent as UTF-8 bytes in tensors (nothing is
    unpickled). Other ranks' ``value`` is ignored."""
    if world is None or world.size == 1:
        return value
    data = b"" if value is None else value.encode()
    size = (
        broadcast_int(-1 if value is None else len(data), world)
        if world.is_main
        else broadcast_int(None, world)
    )
    if size < 0:
        return None
    t = torch.zeros(size, dtype=torch.uint8, device=world.device)
    if world.is_main:
        t.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(t, src=0)
    return bytes(t.cpu().tolist()).decode()


def barrier(world: World | None) -> None:
    if world is not None and world.size > 1:
        dist.barrier()


def peer_failure(exc: BaseException) -> str | None:
    """The one-line report of a collective that failed because another rank stopped (on an error that rank
    reports itself) or hangs past the timeout, or None for any other error. gloo raises these as plain
    RuntimeErrors naming its source file ("[…/gloo/transport/tcp/pair.cc:553] Connection closed by peer
    …"), NCCL as ``DistBackendError``."""
    if not (dist.is_available() and dist.is_initialized()) or not isinstance(exc, RuntimeError):
        return None
    text = one_line(str(exc))
    if not (isinstance(exc, dist.DistError) or "/gloo/" in text) or not _PEER_GONE.search(text):
        return None
    reason = text.split("] ", 1)[-1].split(". ", 1)[0]  # the first sentence, after gloo's source location
    return (
        f"another rank of this job stopped or hangs, so rank {dist.get_rank()} stops too ({reason}); "
        "that rank's own message says why"
    )
