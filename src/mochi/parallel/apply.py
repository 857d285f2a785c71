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

from mochi.models.t5 import T5Config
from mochi.parallel.context import World
from mochi.parallel.fsdp import choose_weights, shard_dit, shard_t5
from mochi.parallel.guidance import GuidanceParallel, guidance_groups
from mochi.parallel.sequence import check_heads, enable_sequence_parallel
from mochi.parallel.vae import parallel_decode


def sequence_size(world_size: int, guidance: bool) -> int:
    """The ranks one sequence is split over: all of them, or half under guidance parallelism (cond on one
    half, uncond on the other)."""
    return world_size // 2 if guidance else world_size


@dataclass
class PipelineParallel:
    """The pipeline's hooks (``MochiPipeline.parallel``): how to denoise and decode over the ranks."""

    world: World
    weights: str  # "shard" or "replicate", as chosen
    guidance: bool
    groups: object = None  # GuidanceGroups under guidance parallelism

    @property
    def sequence(self) -> int:
        return sequence_size(self.world.size, self.guidance)

    def denoiser(self, dit):  # noqa: ANN001, ANN201 - the DiT → a denoiser callable
        return GuidanceParallel(dit, self.groups) if self.guidance else dit

    def decode(self, decoder, z: torch.Tensor, **options) -> torch.Tensor:  # noqa: ANN001
        # Every rank must follow the same tile plan: plan for the smallest memory budget of any rank.
        if options.get("max_memory") is not None:
            budget = torch.tensor([int(options["max_memory"])], dtype=torch.int64, device=self.world.device)
            dist.all_reduce(budget, op=dist.ReduceOp.MIN)
            options["max_memory"] = int(budget.item())
        return parallel_decode(decoder, z, **options)


def agreed_weights(weights: str, modules: list, world: World, need: int | None = None) -> str:
    """``choose_weights`` made the same on every rank (free memory differs a little between ranks): shard
    when any rank would."""
    mode = choose_weights(weights, modules, world.device, need)
    if world.size > 1 and dist.is_initialized():
        flag = torch.tensor([int(mode == "shard")], device=world.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        mode = "shard" if flag.item() else "replicate"
    return mode


def _check_split(heads: int, world: World, guidance: bool) -> None:
    if guidance and world.size % 2:
        raise ValueError(
            f"--guidance-parallel needs an even number of ranks, got world size {world.size}; "
            f"nearest valid: {world.size - 1 if world.size > 1 else 2}"
        )
    check_heads(heads, sequence_size(world.size, guidance))


def _read_dit_in_shards(  # noqa: ANN202
    model: str | None, t5: str | None, world: World, weights: str, dtype: torch.dtype, fp8: str = "keep"
):
    """The DiT read rank by rank (``mochi.parallel.sharded_load``) when its weights will be sharded and the
    checkpoint allows it, else None. "auto" decides from the DiT's size in ``dtype`` and T5's in fp32, read
    from the headers (T5-XXL's when its files cannot be read), as ``agreed_weights`` would after a whole
    read."""
    if model is None or world.size == 1 or weights == "replicate":
        return None
    from mochi.memory.estimate import dit_weights, t5_weights
    from mochi.parallel.sharded_load import can_read_sharded, gguf_dit_bytes, load_dit_sharded, t5_fp32_bytes
    from mochi.weights.bundle import is_bundle
    from mochi.weights.dit import genmo_shapes, infer_config
    from mochi.weights.formats import detect

    if is_bundle(model):
        return None
    det = detect(model)
    if not can_read_sharded(det):
        return None
    if weights == "auto":
        text = t5_fp32_bytes(t5, det) or t5_weights(T5Config()).total
        if det.quant.get("dit", "").startswith("gguf") and fp8 == "keep":  # the blocks stay blocks
            need = gguf_dit_bytes(det, dtype) + text
        else:
            need = dit_weights(infer_config(genmo_shapes(det)), dtype).total + text
        if agreed_weights("auto", [], world, need) != "shard":
            return None
    return load_dit_sharded(det, world, dtype, fp8)[0]


def _read_t5_in_shards(model: str, t5: str | None, world: World):  # noqa: ANN202
    """T5 read rank by rank when the DiT was (the weights are sharded) and its files allow it, else None."""
    from mochi.parallel.sharded_load import load_t5_sharded, t5_sources
    from mochi.weights.formats import detect

    det = detect(model) if t5 is None else None
    found = t5_sources(t5, det)
    if found is None:
        return None
    prefix = det.prefixes["t5"] if det is not None else ""
    return load_t5_sharded(*found, world, prefix)[0]


def load_pipeline(  # noqa: ANN201 - a MochiPipeline
    world: World,
    model: str | None = None,
    *,
    weights: str = "auto",
    guidance: bool = False,
    vae: str | None = None,
    t5: str | None = None,
    tokenizer: str | None = None,
    fp8: str = "keep",
    **options: object,
):
    """``MochiPipeline.from_pretrained`` for a torchrun job: load on the CPU, shard the DiT and T5 there
    when sharding (so each GPU only ever receives its slice), then build the pipeline on this rank's
    device and ``parallelize`` it. ``options`` go to the pipeline constructor (not ``device``)."""
    from mochi.devices import resolve_dit_dtype
    from mochi.pipeline import MochiPipeline
    from mochi.weights.components import load_components

    dit_dtype = resolve_dit_dtype(options.get("dit_dtype"), world.device)
    sharded = _read_dit_in_shards(model, t5, world, weights, dit_dtype, fp8)
    text_encoder = _read_t5_in_shards(model, t5, world) if sharded is not None else None
    c = load_components(
        model,
        vae=vae,
        t5=t5,
        tokenizer=tokenizer,
        fp8=fp8,
        dit=sharded,
        text_encoder=text_encoder,
        dit_dtype=dit_dtype,
    )
    _check_split(c.dit.config.num_heads, world, guidance)
    # Sizes as the pipeline will hold them: the DiT in its compute dtype, T5 in fp32.
    need = sum(p.numel() * (dit_dtype.itemsize if p.is_floating_point() else 1) for p in c.dit.parameters())
    need += sum(p.numel() for p in c.text_encoder.parameters()) * 4
    mode = "shard" if sharded is not None else agreed_weights(weights, [c.dit, c.text_encoder], world, need)
    if mode == "shard":
        if sharded is None:
            c.dit.to(dtype=dit_dtype)
        if text_encoder is None:
            c.text_encoder.to(dtype=torch.float32)
        shard_dit(c.dit, world)
        shard_t5(c.text_encoder, world)
    pipe = MochiPipeline(c, device=world.device, **options)
    parallelize(pipe, world, weights=mode, guidance=guidance)
    return pipe


def parallelize(pipe, world: World, weights: str = "auto", guidance: bool = False) -> PipelineParallel:  # noqa: ANN001
    """Spread ``pipe`` (a ``MochiPipeline`` with the same weights on every rank) over ``world``.

    weights: "shard" (FSDP2 over all ranks), "replicate", or "auto" (replicate when it fits in 60% of the
    free memory); prefer ``load_pipeline``, which shards before the weights reach the device. guidance:
    put cond and uncond on the two halves of the ranks (even world size). Raises ValueError before any
    work when the (per-half) sequence split cannot divide the DiT's heads.
    """
    c = pipe.components
    _check_split(c.dit.config.num_heads, world, guidance)
    sp_size = sequence_size(world.size, guidance)
    if pipe.offload:
        raise ValueError("offload cannot be combined with a torchrun launch; drop --offload")
    mode = agreed_weights(weights, [c.dit, c.text_encoder], world)
    groups = guidance_groups(world.size, world.rank) if guidance else None
    if sp_size > 1:
        enable_sequence_parallel(c.dit, groups.half if groups else None)
    if mode == "shard":
        shard_dit(c.dit, world)
        shard_t5(c.text_encoder, world)
    plan = PipelineParallel(world, mode, guidance, groups)
    pipe.parallel = plan
    return plan
