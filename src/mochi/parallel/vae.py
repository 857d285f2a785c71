"""Parallel VAE decode: the tiles of the (single-process) decode plan dealt round-robin over the ranks.

Each rank decodes its tiles, every temporal chunk with the causal context carried as in one process, into a
zeroed output; one all-reduce (sum) then assembles the blended frames on every rank. Tiles are independent,
so the result equals the one-process decode with the same plan (to float summation order, ≤ 1e-6). A plan
of one tile (the default when memory allows) leaves nothing to split: rank 0 decodes and the others receive
it; give a smaller tile (``max_memory`` or ``tile``) to spread the work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mochi.models.vae_tiling import TileShare, decode
from mochi.parallel.comm import traffic


def tile_share(group=None) -> TileShare:  # noqa: ANN001 - ProcessGroup or None
    """Tile i belongs to rank i mod G; the combination is a summing all-reduce."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)

    def combine(out: Tensor) -> None:
        dist.all_reduce(out, group=group)
        traffic["all_reduce"] += 2 * out.numel() * out.element_size() * (size - 1) // size

    return TileShare(owns=lambda i: i % size == rank, combine=combine)


@torch.inference_mode()
def parallel_decode(decoder, z: Tensor, group=None, **options) -> Tensor:  # noqa: ANN001
    """``mochi.models.vae_tiling.decode`` with the work split over ``group``; every rank gets the frames."""
    return decode(decoder, z, share=tile_share(group), **options)
