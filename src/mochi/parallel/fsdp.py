"""Weights over ranks: FSDP2 ``fully_shard`` of the DiT's and T5's blocks, or plain replication.

Sharded, each rank stores 1/G of every block's parameters and all-gathers one block at a time just before
using it (freed again after its forward), so per-rank parameter memory falls to about 1/G plus one block.
Replicated, every rank holds everything and no weight traffic happens at all; it is faster whenever it fits.
``choose_weights("auto", …)`` replicates when the weights take at most 60% of the free memory (the rest is
ample for the activations of a 1/G share of the tokens and for the VAE decode, which plans within what is
left).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from mochi.devices import available_memory
from mochi.parallel.context import World

WEIGHT_MODES = ("shard", "replicate", "auto")


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank stores (its local shard of any DTensor)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def choose_weights(
    mode: str, modules: Iterable[nn.Module], device: torch.device, need: int | None = None
) -> str:
    """The weight placement for ``mode``: "auto" replicates when the weights (``need`` bytes, default their
    size now) take ≤ 60% of the free memory."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"--parallel-weights {mode!r} is not one of {', '.join(WEIGHT_MODES)}")
    if mode != "auto":
        return mode
    need = sum(parameter_bytes(m) for m in modules) if need is None else need
    return "replicate" if need <= 0.6 * available_memory(device) else "shard"


def shard_blocks(module: nn.Module, blocks: Iterable[nn.Module], world: World) -> nn.Module:
    """``fully_shard`` each of ``blocks``, then ``module`` (its remaining parameters), over all ranks.

    Every rank must hold the same weights before the call (same checkpoint or same seed): each keeps its
    slice of each parameter. The module keeps its class and forward; FSDP adds the gathers around them.
    A module sharded already is returned as it is. Parameters on the CPU move to the mesh's device (each
    rank's slice only), so sharding before moving to the GPU never needs the whole model there.
    """
    if isinstance(module, FSDPModule):
        return module
    # The DiT's last block passes the text stream through untouched, which FSDP2 flags as "returned a view";
    # nothing modifies it in place, so the warning is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(world.device.type, (world.size,))
    # FSDP2 gathers a unit's parameters in one dtype: the fp32 islands of a bf16 DiT (RoPE frequencies,
    # q/k norm weights) failed its assertion at the first forward. They are a few KB: every rank keeps
    # them whole, outside FSDP, where the rest of the unit is sharded.
    islands = _islands(module)
    if islands and "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise ValueError(
            "--parallel-weights shard with a DiT in bf16 or fp16 needs torch 2.7 or later (fully_shard's "
            f"ignored_params, for its fp32 norms and RoPE), this is {torch.__version__}; use "
            "--parallel-weights replicate or --dtype fp32"
        )
    options = {"ignored_params": islands} if islands else {}
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, **options)
    fully_shard(module, mesh=mesh, reshard_after_forward=True, **options)  # the root too: freed between calls
    for p in islands:  # not moved by FSDP: where the sharded parameters went (a meta model: filled later)
        if not p.is_meta:
            p.data = p.data.to(world.device)
    return module


def _islands(module: nn.Module) -> set[nn.Parameter]:
    """The fp32 islands a model names (``is_fp32_param``: the DiT's RoPE frequencies and q/k norms) when its
    other weights are in bf16 or fp16; none otherwise (fp32, or fp8 and ggml blocks kept as stored at fp32
    compute, which FSDP took as they were)."""
    named = getattr(type(module), "is_fp32_param", None)
    if named is None or not any(p.dtype in (torch.bfloat16, torch.float16) for p in module.parameters()):
        return set()
    return {p for name, p in module.named_parameters() if named(name) and p.dtype == torch.float32}


def shard_dit(dit: nn.Module, world: World) -> nn.Module:
    """The DiT, one FSDP unit per joint block plus the root (embedders, RoPE frequencies, final layer)."""
    return shard_blocks(dit, dit.blocks, world)


def shard_t5(t5: nn.Module, world: World) -> nn.Module:
    """The T5 encoder, one FSDP unit per encoder block after the first, plus the root (embedding, final
    norm and block 0, whose relative-position table the root's forward reads before block 0 runs)."""
    return shard_blocks(t5, t5.encoder.block[1:], world)
