"""Make a ``MochiPipeline`` cooperate over the ranks of a torchrun job (``parallelize``).

What it sets up, all from outside the models: weights sharded (FSDP2) or replicated, the DiT's sequence
split (Ulysses) over all ranks or over each half under guidance parallelism, and the tile-parallel VAE
decode. The pipeline then runs exactly as in one process on every rank and returns the same frames on
every rank; callers write outputs on rank 0 only (``World.is_main``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mochi.parallel.context import World
from mochi.parallel.fsdp import choose_weights, shard_dit, shard_t5
from mochi.parallel.guidance import GuidanceParallel, guidance_groups
from mochi.parallel.sequence import check_heads, enable_sequence_parallel
from mochi.parallel.vae import parallel_decode


@dataclass
class PipelineParallel:
    """The pipeline's hooks (``MochiPipeline.parallel``): how to denoise and decode over the ranks."""

    world: World
    weights: str  # "shard" or "replicate", as chosen
    guidance: bool
    groups: object = None  # GuidanceGroups under guidance parallelism

    def denoiser(self, dit):  # noqa: ANN001, ANN201 - the DiT → a denoiser callable
        return GuidanceParallel(dit, self.groups) if self.guidance else dit

    def decode(self, decoder, z: torch.Tensor, **options) -> torch.Tensor:  # noqa: ANN001
        # Every rank must follow the same tile plan: plan for the smallest memory budget of any rank.
        if options.get("max_memory") is not None:
            budget = torch.tensor([int(options["max_memory"])], dtype=torch.int64, device=self.world.device)
            dist.all_reduce(budget, op=dist.ReduceOp.MIN)
            options["max_memory"] = int(budget.item())
        return parallel_decode(decoder, z, **options)


def parallelize(pipe, world: World, weights: str = "auto", guidance: bool = False) -> PipelineParallel:  # noqa: ANN001
    """Spread ``pipe`` (a ``MochiPipeline`` with the same weights on every rank) over ``world``.

    weights: "shard" (FSDP2 over all ranks), "replicate", or "auto" (replicate when it fits in half the
    free memory). guidance: put cond and uncond on the two halves of the ranks (even world size). Raises
    ValueError before any work when the (per-half) sequence split cannot divide the DiT's heads.
    """
    c = pipe.components
    heads = c.dit.config.num_heads
    sp_size = world.size // 2 if guidance else world.size
    if guidance and world.size % 2:
        raise ValueError(
            f"--guidance-parallel needs an even number of ranks, got world size {world.size}; "
            f"nearest valid: {world.size - 1 if world.size > 1 else 2}"
        )
    check_heads(heads, sp_size)
    if pipe.offload:
        raise ValueError("offload cannot be combined with a torchrun launch; drop --offload")
    mode = choose_weights(weights, [c.dit, c.text_encoder], world.device)
    groups = guidance_groups(world.size, world.rank) if guidance else None
    if sp_size > 1:
        enable_sequence_parallel(c.dit, groups.half if groups else None)
    if mode == "shard":
        shard_dit(c.dit, world)
        shard_t5(c.text_encoder, world)
    plan = PipelineParallel(world, mode, guidance, groups)
    pipe.parallel = plan
    return plan
