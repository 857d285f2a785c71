"""Non-finite values (NaN, ±inf) are errors: in weights where they are loaded, in latents after sampling.

The check sums each tensor (NaN and inf propagate; a sum is the fastest full pass torch has on CPU, about
1 ns per element, where ``torch.isfinite`` takes 30) and only when the sum is not finite reads the exponent
bits exactly, through an integer view (all ones means NaN or inf), so that finite values whose sum
overflows are not refused. fp8 formats have their own NaN codes and, for e4m3, no inf.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mochi.errors import listing

# dtype → (integer view, mask): a value is non-finite when (bits & mask) == mask.
_EXPONENT = {
    torch.float32: (torch.int32, 0x7F800000),
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float8_e4m3fn: (torch.uint8, 0x7F),  # only NaN (S.1111.111); no inf
    torch.float8_e5m2: (torch.uint8, 0x7C),
}
_FNUZ = tuple(getattr(torch, n) for n in ("float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n))


class NonFiniteError(ValueError):
    """A tensor holds NaN or infinite values where only finite ones make sense."""


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or ±inf (integer and bool tensors always; meta tensors are skipped)."""
    if t.numel() == 0 or t.device.type == "meta" or not (t.is_floating_point() or t.is_complex()):
        return True
    t = t.detach()
    # A sum runs at memory speed (about 1 ns per element on one CPU core) and is finite unless an element
    # is NaN/inf, or finite elements overflow the sum's dtype (fp16: 65504): then look exactly.
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) and torch.isfinite(t.sum()):
        return True
    if t.dtype in _EXPONENT:
        view, mask = _EXPONENT[t.dtype]
        return bool((t.view(view) & mask).amax() != mask)
    if t.dtype in _FNUZ:  # the single NaN code 0x80 (negative zero's bits); no inf
        return not bool((t.view(torch.uint8) == 0x80).any())
    return bool(torch.isfinite(t).all())


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming the tensors of ``what`` (e.g. "LoRA 'x.safetensors'") that hold NaN/inf."""
    bad = [name for name, t in tensors.items() if not all_finite(t)]
    if bad:
        raise NonFiniteError(
            f"{what} holds NaN or infinite values in {len(bad)} of {len(tensors)} tensors "
            f"({listing(bad, 5)}); it is damaged (e.g. written by a run that diverged) and cannot be used"
        )
