"""LoRA training over the ranks of a torchrun job: one batch, its tokens split over all ranks.

Every rank draws the same batch, noise and σ (the loop's generators are seeded from the run's seed, which
the CLI broadcasts), the DiT runs sequence-parallel (``mochi.parallel.sequence``) and returns the full
prediction on every rank, so every rank computes the same loss; after backward the LoRA gradients are
averaged in one all-reduce, giving each rank the one-process gradient. The frozen base weights are
replicated or FSDP2-sharded (``load_pipeline``); the LoRA weights, added after sharding, are plain
replicated tensors either way. Only rank 0 writes checkpoints and samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from mochi.parallel.apply import PipelineParallel
from mochi.parallel.comm import average_grads
from mochi.parallel.context import World
from mochi.parallel.sequence import check_heads, enable_sequence_parallel


@dataclass
class TrainParallel:
    """What ``train_lora`` needs to know: whether this rank writes, and how to combine gradients."""

    world: World

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def sync_grads(self, params: list) -> None:
        average_grads(params)

    def main_verdict(self, problem: str | None) -> str | None:
        """Rank 0's ``problem`` (why it refuses the run, or None) on every rank: the run folder is rank 0's,
        so only it can see that another run holds it, and every rank must stop on that before the first
        collective."""
        from mochi.parallel.context import broadcast_text

        return broadcast_text(problem, self.world)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (a stop request reaches the ranks at different
        steps; all must stop after the same one, or the later ones wait in a collective for a rank gone)."""
        if self.world.size == 1:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.world.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def parallelize_training(pipe, world: World) -> TrainParallel:  # noqa: ANN001 - a MochiPipeline
    """Split ``pipe``'s DiT over ``world`` for training (and its samples), unless ``load_pipeline`` did
    already (it also shards weights: ``--parallel-weights``). ValueError before any work when the world size
    does not divide the DiT's heads."""
    check_heads(pipe.components.dit.config.num_heads, world.size)
    if pipe.parallel is None:
        if world.size > 1:
            enable_sequence_parallel(pipe.components.dit)
        pipe.parallel = PipelineParallel(world, "replicate", guidance=False)
    elif pipe.parallel.guidance:
        raise ValueError("guidance parallelism is for sampling; train without --guidance-parallel")
    return TrainParallel(world)
