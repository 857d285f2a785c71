"""Guidance parallelism: the conditional and unconditional halves of a guided batch on two rank groups.

The ranks split into two halves of G/2 (ranks [0, G/2) and [G/2, G)); each half runs the DiT on its half of
the batch (the sampler orders a guided batch [cond, uncond]), sequence-parallel within the half, and one
all-gather between partner ranks (r, r + G/2) rebuilds the whole output on every rank. A batch that does not
split in two (a step without guidance) runs whole on both halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mochi.parallel.comm import all_gather_raw


@dataclass(frozen=True)
class GuidanceGroups:
    """The process groups of a guidance split: ``half`` (this rank's half, for the sequence split),
    ``pair`` (this rank and its partner in the other half) and which half this rank is in (0 or 1)."""

    half: object
    pair: object
    index: int


def guidance_groups(world_size: int, rank: int) -> GuidanceGroups:
    """Make the groups (every rank must call this, in the same order). ValueError for an odd world."""
    if world_size < 2 or world_size % 2:
        raise ValueError(
            f"guidance parallelism needs an even number of ranks, got world size {world_size}; "
            f"nearest valid: {max(2, world_size - world_size % 2)}"
        )
    g = world_size // 2
    halves = [dist.new_group(list(range(i * g, (i + 1) * g))) for i in range(2)]
    pairs = [dist.new_group([i, i + g]) for i in range(g)]
    return GuidanceGroups(halves[rank // g], pairs[rank % g], rank // g)


class GuidanceParallel:
    """A denoiser ``(x, sigma, text, mask) → v`` that runs half of an even batch on each rank half."""

    def __init__(self, model, groups: GuidanceGroups) -> None:  # noqa: ANN001 - the DiT or any denoiser
        self.model, self.groups = model, groups

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, mask: torch.Tensor):  # noqa: ANN204
        batch = x.shape[0]
        if batch % 2:
            return self.model(x, sigma, text, mask)
        half = batch // 2
        mine = slice(self.groups.index * half, (self.groups.index + 1) * half)
        out = self.model(x[mine], sigma[mine], text[mine], mask[mine])
        return all_gather_raw(out, self.groups.pair).flatten(0, 1)  # (2, B/2, …) in half order
