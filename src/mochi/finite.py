"""Non-finite values (NaN, ±inf) are errors: in weights where they are loaded, in latents after sampling.

The check reads each tensor's exponent bits through an integer view (all ones means NaN or inf), which is
several times faster on CPU than ``torch.isfinite`` on bf16 and allocates no float copy; fp8 formats
have their own NaN codes and, for e4m3, no inf.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

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
    if t.dtype in _EXPONENT:
        view, mask = _EXPONENT[t.dtype]
        return bool((t.detach().view(view) & mask).amax() != mask)
    if t.dtype in _FNUZ:  # the single NaN code 0x80 (negative zero's bits); no inf
        return not bool((t.detach().view(torch.uint8) == 0x80).any())
    return bool(torch.isfinite(t.detach()).all())


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming the tensors of ``what`` (e.g. "LoRA 'x.safetensors'") that hold NaN/inf."""
    bad = [name for name, t in tensors.items() if not all_finite(t)]
    if bad:
        shown = ", ".join(bad[:5]) + (f", … ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise NonFiniteError(
            f"{what} holds NaN or infinite values in {len(bad)} of {len(tensors)} tensors ({shown}); "
            "it is damaged (e.g. written by a run that diverged) and cannot be used"
        )
