"""Device and dtype choices, and the memory available for a stage."""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None:
        return name
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():  # as the names are: float64, int8 ... are not compute dtypes
            raise ValueError(f"dtype {name} is not supported; choose one of {', '.join(DTYPES)}")
        return name
    if not isinstance(name, str):
        raise ValueError(f"dtype {name!r} is not a dtype; choose one of {', '.join(DTYPES)}")
    key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def parse_size(text: str, name: str = "size", budget: bool = False) -> int:
    """ "10GB", "500MB", "20KB" or a plain byte count → bytes (powers of 1000, as diffusers counts); the
    error calls the value ``name`` (an option's name). ``budget``: a memory budget or a shard size, where a
    plain count under a megabyte ("24", meaning 24GB) is refused rather than read as bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1, "": 1}
    # ASCII digits only: str.isdigit() also takes "²" and other digits that int() and float() refuse.
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?B)?\s*", text.upper())
    if match and (match.group(2) or "." not in match.group(1)):
        value = Decimal(match.group(1)) * units[match.group(2) or ""]  # exact: 1e300 digits stay an int
        if value >= 10**18:  # an exabyte: no budget is that large (float() gave inf, then a traceback)
            shown = text if len(text) <= 40 else f"{text[:40]}…"
            raise ValueError(f"{name} {shown!r} is larger than any device; write it like 24GB")
        if budget and not match.group(2) and 0 < value < 10**6:
            raise ValueError(
                f"{name} {text!r} would be {int(value)} bytes (a size without a unit counts bytes); did you "
                f"mean {text.strip()}GB?"
            )
        return int(value)
    binary = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT])IB\s*", text.upper())
    if binary:  # 24GiB: 2**30-byte units, which mochi does not read; say the decimal size
        with contextlib.suppress(InvalidOperation):
            size = Decimal(binary.group(1)) * 1024 ** ("KMGT".index(binary.group(2)) + 1)
            unit = binary.group(2) + "B"
            near = f"{size / units[unit]:.1f}{unit}"
            raise ValueError(
                f"{name} {text!r} is in binary units, which are not read; sizes count powers of 1000: "
                f"nearest valid: {near}"
            )
    short = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT])\s*", text.upper())
    if short:  # 24G: the B is part of the unit (and G alone could mean 2**30, which mochi does not read)
        raise ValueError(
            f"{name} {text!r} is not understood: units end in B (powers of 1000); nearest valid: "
            f"{short.group(1)}{short.group(2)}B"
        )
    unsigned = text.strip()[1:]
    if text.strip().startswith("-") and unsigned:
        try:
            parse_size(unsigned, name, budget)
        except ValueError:
            pass
        else:
            raise ValueError(f"{name} {text!r} is negative: a size counts up from 0 ({unsigned}?)")
    raise ValueError(f"{name} {text!r} is not understood; write it like 10GB, 500MB or 20000")


def size_text(n: int) -> str:
    """Bytes → the smallest readable size at least ``n`` that `parse_size` reads back: 8986624 → "9MB",
    1234567890 → "1.3GB" (one decimal, rounded up; powers of 1000)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            tenths = math.ceil(n * 10 / scale)
            return f"{tenths // 10}{unit}" if tenths % 10 == 0 else f"{tenths / 10:.1f}{unit}"
    return f"{n}B"


# Device types mochi runs on. Others that torch names (meta, mps, xla, ...) are refused up front: mps
# lacks ops and dtypes the models use, and meta holds no values at all.
DEVICE_TYPES = ("cpu", "cuda")


def parse_device(name: str | torch.device | None) -> torch.device:
    """``None`` or "auto" → the first CUDA device if there is one, else the CPU."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:  # TypeError: a float, a bool, a list (torch's many-line message)
        raise ValueError(f"device {name!r} is not a device name; use cpu, cuda or cuda:N") from e
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device {name!r} is not supported: mochi runs on cpu or cuda (cuda:N)")
    if device.type == "cpu" and device.index not in (None, 0):  # torch takes any index and runs on the CPU
        raise ValueError(f"device {name!r}: there is one CPU device; use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s); "
            f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def default_dit_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators (what the reference computes in); fp32 on the CPU, where bf16 buys little."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dit_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The DiT's compute dtype: ``name`` (``--dtype``, the pipeline's ``dit_dtype``) when given, else the
    device's default. Loading, planning and the pipeline all ask here, so that they agree."""
    return parse_dtype(name) or default_dit_dtype(device)


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device`` right now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def placed(module: torch.nn.Module, device: torch.device, offload: bool) -> Iterator[torch.nn.Module]:
    """Run a stage with ``module`` on ``device``; with ``offload``, send it back to the CPU afterwards."""
    if not offload:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
