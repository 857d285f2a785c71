"""The DiT's normalisations, each an fp32 island: computed in fp32 whatever the stream's dtype, then cast
back.

Epsilons follow the reference (genmo-mochi.md §1.3.9, §10): 1e-6 for the modulated and gated RMSNorms and the
final LayerNorm, 1e-5 for the learned q/k RMSNorm.
"""

from __future__ import annotations

import torch
from torch import nn

# Without autograd, products are taken in place on fresh temporaries (never on the arguments): each norm then
# allocates one full-size tensor instead of three or four. On CPU a fresh large allocation (page faults) costs
# about as much as the arithmetic, and these buffers add to the peak memory.


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x²) + eps) over the last axis of fp32 x, shape (..., 1), without materialising x²."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.rsqrt(norm * norm / x.shape[-1] + eps)


def _normed(x: torch.Tensor, eps: float, factor: torch.Tensor) -> torch.Tensor:
    """fp32 x / rms(x) · factor (factor broadcastable to x); a new tensor."""
    xf = x.float()
    inv = _inv_rms(xf, eps)
    if torch.is_grad_enabled():
        return xf * inv * factor
    out = xf.mul_(inv) if xf is not x else xf * inv  # x.float() of a low-precision x is already a copy
    return out.mul_(factor)


def modulated_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without weight, times (1 + scale): the pre-norm of every branch.

    x: (..., D); scale: broadcastable to x, e.g. (B, 1, D) for (B, N, D) tokens. Returns x's dtype.
    """
    return _normed(x, eps, 1 + scale.float()).to(x.dtype)


def tanh_gated_residual(
    x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """x + RMSNorm(branch) · tanh(gate), the "sandwich" residual of every branch.

    tanh runs in the gate's own dtype and the product in fp32, as under the reference's autocast; the sum is
    taken in x's dtype. x, branch: (..., D); gate broadcastable to them. Returns a new tensor of x's dtype.
    """
    update = _normed(branch, eps, torch.tanh(gate).float()).to(x.dtype)
    return x + update if torch.is_grad_enabled() else update.add_(x)


def final_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine (eps 1e-6), then · (1 + scale) + shift, all in fp32; returns fp32.

    x: (B, N, D); shift, scale: (B, 1, D).
    """
    x = nn.functional.layer_norm(x.float(), x.shape[-1:], eps=1e-6)
    return x * (1 + scale.float()) + shift.float()


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight (the per-head q/k norms). The weight is an fp32 island."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) → same shape and dtype."""
        return _normed(x, self.eps, self.weight.float()).to(x.dtype)
