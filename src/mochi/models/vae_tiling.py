"""Decoding and encoding in bounded memory: temporal chunks that carry causal context, blended tiles.

Temporal chunking is exact: each chunk's causal convolutions (and the encoder's causal attention) see the
frames of earlier chunks through a `CausalContext`, so the result equals a one-pass decode (to float
rounding). Spatial tiling is approximate, as in every implementation: tiles overlap and are blended with
linear ramps that sum to one across each overlap, so no seam shows (Genmo's default of zero overlap
leaves visible seams, its issue #121).

Units: `tile` and `overlap` count latent cells (8 pixels each); `chunk` counts latent frames (a chunk of
c latents is 6c video frames, 6c−5 for the first). A latent range [a, b) always pairs with the frame
range [max(0, 6a−5), 6b−5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mochi.models.vae import (
    SPATIAL_FACTOR,
    Decoder,
    Encoder,
    check_frame_size,
    num_frames_for_latents,
    num_latents_for_frames,
)
from mochi.models.vae_blocks import CausalContext
from mochi.models.vae_memory import estimate_decode_memory, estimate_encode_memory

# Latent cells (48 px): wide enough that tile-edge errors fade out (Genmo's CLI and diffusers use 8).
DEFAULT_OVERLAP = 6


@dataclass(frozen=True)
class Plan:
    """How a decode or encode is split: tile (h, w) and overlap in latent cells, chunk in latent frames."""

    tile: tuple[int, int]
    overlap: int
    chunk: int


@dataclass(frozen=True)
class TileShare:
    """One process's share of a decode split over cooperating processes (set by ``mochi.parallel.vae``).

    owns(i): whether this process decodes tile i (row-major over the tile grid; every chunk of it);
    combine(out): sums the partial outputs of all processes into ``out`` in place, before normalisation.
    Tiles are independent, so the result equals one process's decode with the same plan.
    """

    owns: Callable[[int], bool]
    combine: Callable[[Tensor], None]


def on_cpu(module: Decoder | Encoder) -> bool:
    """Whether ``module`` runs on the CPU: its weights are there (meta plans for an accelerator)."""
    return module.output_proj.weight.device.type == "cpu"


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def tile_layout(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(start offsets, tile length) covering [0, size) with adjacent tiles overlapping ≥ `overlap`.

    `tile` is the largest tile allowed: the fewest tiles that fit are used, each shrunk evenly to the
    smallest length that still covers, so no work is spent on surplus overlap.
    """
    if tile >= size:
        return [0], size
    n = math.ceil((size - overlap) / (tile - overlap))
    length = math.ceil((size + (n - 1) * overlap) / n)
    return [round(i * (size - length) / (n - 1)) for i in range(n)], length


def _ramps(starts: list[int], tile: int, size: int, scale: int) -> list[Tensor]:
    """Per-tile 1-D blend weights (in output units): linear ramps across each overlap, 1 elsewhere."""
    out = []
    for i, s in enumerate(starts):
        e = min(s + tile, size)
        w = torch.ones((e - s) * scale)
        if i > 0:
            n = (starts[i - 1] + tile - s) * scale
            if n > 0:
                w[:n] = (torch.arange(n) + 0.5) / n
        if i + 1 < len(starts):
            n = (e - starts[i + 1]) * scale
            if n > 0:
                w[-n:] = torch.minimum(w[-n:], 1 - (torch.arange(n) + 0.5) / n)
        out.append(w)
    return out


def _check_plan(tile: tuple[int, int], overlap: int, chunk: int, h: int, w: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk {chunk} is invalid: it counts latent frames and must be ≥ 1; nearest: 1")
    if overlap < 0:
        raise ValueError(f"overlap {overlap} is invalid: it must be ≥ 0 latent cells; nearest: 0")
    for name, t, size in (("tile height", tile[0], h), ("tile width", tile[1], w)):
        if t < size and t <= overlap:
            raise ValueError(
                f"{name} {t} is invalid: tiles must be larger than the overlap ({overlap} latent cells); "
                f"nearest: {overlap + 1}"
            )


def plan_decode(
    decoder: Decoder,
    latent_shape: tuple[int, int, int, int],
    max_memory: int,
    *,
    overlap: int = DEFAULT_OVERLAP,
    dtype: torch.dtype | None = None,
    tile: int | tuple[int, int] | None = None,
    cpu: bool | None = None,
) -> Plan:
    """The cheapest split of a (B, t, h, w) latent whose estimated peak fits `max_memory` bytes.

    Chunking is exact and cheap, so the largest tile is chosen first, then the longest chunk. With
    `tile` given, only the chunk is chosen. ValueError names the bytes needed when nothing fits. cpu:
    whether it runs on the CPU (default: whether the decoder's weights are there).
    """
    dtype = dtype or decoder.output_proj.weight.dtype
    cpu = on_cpu(decoder) if cpu is None else cpu
    return _plan(
        lambda tile, chunk: estimate_decode_memory(decoder.cfg, latent_shape, tile, chunk, dtype, cpu),
        latent_shape,
        max_memory,
        overlap,
        tile,
    )


def plan_encode(
    encoder: Encoder,
    latent_shape: tuple[int, int, int, int],
    max_memory: int,
    *,
    overlap: int = DEFAULT_OVERLAP,
    dtype: torch.dtype | None = None,
    tile: int | tuple[int, int] | None = None,
    cpu: bool | None = None,
) -> Plan:
    """As `plan_decode`, for encoding a video whose latent is (B, t, h, w)."""
    dtype = dtype or encoder.output_proj.weight.dtype
    cpu = on_cpu(encoder) if cpu is None else cpu
    return _plan(
        lambda tile, chunk: estimate_encode_memory(encoder.cfg, latent_shape, tile, chunk, dtype, cpu),
        latent_shape,
        max_memory,
        overlap,
        tile,
    )


def _plan(estimate, latent_shape, max_memory: int, overlap: int, tile) -> Plan:
    _, t, h, w = latent_shape
    if tile is not None:
        th, tw = _pair(tile)
        _check_plan((th, tw), overlap, 1, h, w)
        fixed = tile_layout(h, th, overlap)[1], tile_layout(w, tw, overlap)[1]
        fits = [c for c in range(1, t + 1) if estimate(fixed, c) <= max_memory]
        if not fits:
            need, chunk = min((estimate(fixed, c), c) for c in range(1, t + 1))
            raise ValueError(
                f"max_memory {max_memory} bytes is too small for tile {fixed}: chunk {chunk} needs about "
                f"{need} bytes; nearest: {need}"
            )
        return Plan(fixed, overlap, max(fits))
    options = []
    for ny in range(1, h + 1):
        for nx in range(1, w + 1):
            th = h if ny == 1 else math.ceil((h + (ny - 1) * overlap) / ny)
            tw = w if nx == 1 else math.ceil((w + (nx - 1) * overlap) / nx)
            if (ny == 1 or th > overlap) and (nx == 1 or tw > overlap):
                options.append((ny * nx, abs(th - tw), (th, tw)))
    options.sort()
    seen = set()
    for _, _, tile in options:
        if tile in seen:
            continue
        seen.add(tile)
        # Not always monotonic in the chunk: on the CPU short fp32 chunks may take a costlier conv kernel.
        fits = [c for c in range(1, t + 1) if estimate(tile, c) <= max_memory]
        if fits:
            return Plan(tile, overlap, max(fits))
    smallest, chunk = min((estimate(options[-1][2], c), c) for c in range(1, t + 1))
    raise ValueError(
        f"max_memory {max_memory} bytes is too small: the smallest split (tile {options[-1][2]}, chunk "
        f"{chunk}) needs about {smallest} bytes; nearest: {smallest}"
    )


def _resolve(tile, overlap, chunk, t: int, h: int, w: int, planned: Plan | None) -> Plan:
    if planned is not None:
        tile = tile if tile is not None else planned.tile
        chunk = chunk if chunk is not None else planned.chunk
        overlap = overlap if overlap is not None else planned.overlap
    tile_hw = _pair(tile) if tile is not None else (h, w)
    tile_hw = (min(tile_hw[0], h), min(tile_hw[1], w))
    plan = Plan(
        tile_hw, DEFAULT_OVERLAP if overlap is None else overlap, t if chunk is None else min(chunk, t)
    )
    _check_plan(plan.tile, plan.overlap, plan.chunk, h, w)
    return plan


@torch.inference_mode()
def decode(
    decoder: Decoder,
    z: Tensor,
    *,
    tile: int | tuple[int, int] | None = None,
    overlap: int | None = None,
    chunk: int | None = None,
    max_memory: int | None = None,
    share: TileShare | None = None,
) -> Tensor:
    """VAE-space latents (B, 12, t, h, w) → frames (B, 3, 6t−5, 8h, 8w), float32, about [−1, 1].

    Not clamped (Genmo clamps only when converting to pixels). `tile`/`overlap` in latent cells, `chunk`
    in latent frames; those not given are chosen from `max_memory` (bytes of peak activations and output,
    excluding weights) when it is given, else the whole latent is one tile and one chunk. ``share``: decode
    only this process's tiles and combine with the others' (see ``TileShare``).
    """
    if z.ndim != 5 or z.shape[1] != decoder.cfg.latent_dim:
        raise ValueError(
            f"latent shape {tuple(z.shape)} is invalid: expected (B, {decoder.cfg.latent_dim}, t, h, w)"
        )
    b, _, t, h, w = z.shape
    num_frames_for_latents(t)
    planned = None
    if max_memory is not None and (tile is None or chunk is None):
        ov = DEFAULT_OVERLAP if overlap is None else overlap
        planned = plan_decode(decoder, (b, t, h, w), max_memory, overlap=ov, tile=tile)
    plan = _resolve(tile, overlap, chunk, t, h, w, planned)
    s = SPATIAL_FACTOR
    out = torch.zeros(b, decoder.cfg.out_channels, num_frames_for_latents(t), h * s, w * s, device=z.device)
    _run_tiled(lambda x, ctx: (decoder(x, ctx),), z, (out,), plan, s, frame_out=True, share=share)
    return out


@torch.inference_mode()
def encode(
    encoder: Encoder,
    frames: Tensor,
    *,
    tile: int | tuple[int, int] | None = None,
    overlap: int | None = None,
    chunk: int | None = None,
    max_memory: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Frames (B, 3, 6k+1, H, W) in [−1, 1] → (mean, logvar), each (B, 12, k+1, H/8, W/8), float32.

    The same splitting options as `decode`; `tile` and `overlap` count latent cells (8 pixels).
    """
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise ValueError(f"video shape {tuple(frames.shape)} is invalid: expected (B, 3, T, H, W)")
    b, _, f, hp, wp = frames.shape
    t = num_latents_for_frames(f)
    check_frame_size(hp, wp)
    h, w = hp // SPATIAL_FACTOR, wp // SPATIAL_FACTOR
    planned = None
    if max_memory is not None and (tile is None or chunk is None):
        ov = DEFAULT_OVERLAP if overlap is None else overlap
        planned = plan_encode(encoder, (b, t, h, w), max_memory, overlap=ov, tile=tile)
    plan = _resolve(tile, overlap, chunk, t, h, w, planned)
    c = encoder.cfg.latent_dim
    mean = torch.zeros(b, c, t, h, w, device=frames.device)
    logvar = torch.zeros(b, c, t, h, w, device=frames.device)
    _run_tiled(lambda x, ctx: encoder(x, ctx), frames, (mean, logvar), plan, SPATIAL_FACTOR, frame_out=False)
    return mean, logvar


def _run_tiled(  # noqa: PLR0913
    fn,
    x: Tensor,
    outs: tuple[Tensor, ...],
    plan: Plan,
    s: int,
    frame_out: bool,
    share: TileShare | None = None,
) -> None:
    """Run `fn` tile by tile (each over all its chunks with one context) and blend into `outs`.

    For decoding x is the latent and outputs are s× larger; for encoding x is the video (s× larger than
    the latent grid that tiles and chunks are counted in) and outputs are latent-sized.
    """
    in_s, out_s = (1, s) if frame_out else (s, 1)
    t = x.shape[2] if frame_out else outs[0].shape[2]
    h, w = outs[0].shape[3] // out_s, outs[0].shape[4] // out_s
    ys, th = tile_layout(h, plan.tile[0], plan.overlap)
    xs, tw = tile_layout(w, plan.tile[1], plan.overlap)
    wy, wx = _ramps(ys, th, h, out_s), _ramps(xs, tw, w, out_s)
    single = len(ys) == 1 and len(xs) == 1
    wsum = torch.zeros(h * out_s, w * out_s, device=x.device)
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            y1, x1 = min(y0 + th, h), min(x0 + tw, w)
            weight = (wy[iy][:, None] * wx[ix][None, :]).to(x.device)
            oy, ox = slice(y0 * out_s, y1 * out_s), slice(x0 * out_s, x1 * out_s)
            wsum[oy, ox] += weight
            if share is not None and not share.owns(iy * len(xs) + ix):
                continue
            ctx = CausalContext(carry=plan.chunk < t)
            for a in range(0, t, plan.chunk):
                e = min(a + plan.chunk, t)
                fa, fe = max(0, 6 * a - 5), 6 * e - 5
                ta, tb = (a, e) if frame_out else (fa, fe)
                oa, ob = (fa, fe) if frame_out else (a, e)
                if e == t:
                    ctx.carry = False
                piece = x[:, :, ta:tb, y0 * in_s : y1 * in_s, x0 * in_s : x1 * in_s]
                for out, res in zip(outs, fn(piece, ctx)):
                    if single:
                        out[:, :, oa:ob] = res
                    else:
                        out[:, :, oa:ob, oy, ox].addcmul_(res, weight)
                del piece
    if share is not None:
        for out in outs:
            share.combine(out)
    if not single:
        for out in outs:
            out /= wsum
