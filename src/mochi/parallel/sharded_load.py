"""Under torchrun, each rank reads only its FSDP2 shard of the DiT: host memory ≈ 1/world of the weights.

The DiT is built on the meta device and sharded there (``fully_shard`` splits every parameter along its
first axis into ``world`` row ranges); then each rank reads from the safetensors files only the rows of
each tensor it keeps (``safe_open(...).get_slice(key)[start:end]``, which touches just those bytes of the
memory-mapped file) and hands them to FSDP as its local shards. No rank ever holds a whole tensor, so the
per-rank peak is its shard plus one tensor's slice in flight. Before, every rank read the whole checkpoint
(8 ranks × 20 GB of bf16 DiT on one node) and then kept 1/8 of it.

Covered: the DiT in Genmo's naming without fp8 scales (Genmo folders, ComfyUI bf16 files, mochi
bundles' DiT); other layouts (diffusers' split q/k/v, fp8) are renamed or dequantized across tensors and
keep the whole read (``can_read_sharded`` says which). T5 is read whole as before.
"""

from __future__ import annotations

from unittest import mock

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from mochi.models.dit import AsymmDiT
from mochi.parallel.context import World
from mochi.parallel.fsdp import shard_dit
from mochi.weights.dit import genmo_shapes, infer_config, keeps_fp32
from mochi.weights.formats import Detected
from mochi.weights.io import WeightsError, check_state_dict


def can_read_sharded(det: Detected) -> bool:
    """Whether the DiT of ``det`` can be read rank by rank: Genmo naming, safetensors, not quantized."""
    return (
        "dit" in det.files
        and det.layouts.get("dit") == "genmo"
        and "dit" not in det.quant
        and all(f.suffix == ".safetensors" for f in det.files["dit"])
    )


def _rows(total: int, rank: int, world: int) -> tuple[int, int]:
    """FSDP2's row range of ``rank``: torch.chunk's split of ``total`` rows into ``world`` parts."""
    size = -(-total // world) if total else 0
    start = min(rank * size, total)
    return start, min(start + size, total)


def load_dit_sharded(det: Detected, world: World, dtype: torch.dtype) -> tuple[AsymmDiT, int]:
    """(the DiT FSDP2-sharded over ``world`` with only this rank's rows read, the bytes read).

    dtype: the weights' dtype (fp32 islands stay fp32). Raises WeightsError on missing, unexpected or
    mis-shaped keys, as the whole-model loader does.
    """
    if not can_read_sharded(det):
        raise WeightsError(f"the DiT of {det.describe()} cannot be read in shards; load it whole")
    shapes = genmo_shapes(det)
    with torch.device("meta"), mock.patch.object(AsymmDiT, "initialize_weights", lambda self: None):
        model = AsymmDiT(infer_config(shapes))
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, fake, det.describe())
    model.to(dtype=dtype)
    shard_dit(model, world)
    prefix = det.prefixes["dit"]
    handles = {f: safe_open(f, framework="pt", device="cpu") for f in det.files["dit"]}
    where = {k[len(prefix) :]: h for h in handles.values() for k in h.keys() if k.startswith(prefix)}  # noqa: SIM118
    local: dict[str, torch.Tensor] = {}
    read = 0
    try:
        for name, param in model.state_dict().items():
            start, end = _rows(param.shape[0], world.rank, world.size) if param.ndim else (0, 0)
            piece = where[name].get_slice(prefix + name)
            t = piece[start:end] if param.ndim else piece[:]
            read += t.numel() * t.element_size()
            t = t.to(device=world.device, dtype=torch.float32 if keeps_fp32(name) else dtype)
            if isinstance(param, DTensor):
                t = DTensor.from_local(
                    t,
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                )
            local[name] = t
    finally:
        handles.clear()
    model.load_state_dict(local, strict=True, assign=True)
    return model.eval().requires_grad_(False), read
