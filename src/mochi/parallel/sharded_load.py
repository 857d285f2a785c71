"""Under torchrun, each rank reads only its FSDP2 shard of the DiT: host memory ≈ 1/world of the weights.

The DiT is built on the meta device and sharded there (``fully_shard`` splits every parameter along its
first axis into ``world`` row ranges); then each rank reads from the safetensors files only the rows of
each tensor it keeps (``safe_open(...).get_slice(key)[start:end]``, which touches just those bytes of the
memory-mapped file) and hands them to FSDP as its local shards. No rank ever holds a whole tensor, so the
per-rank peak is its shard plus one tensor's slice in flight. Before, every rank read the whole checkpoint
(8 ranks × 20 GB of bf16 DiT on one node) and then kept 1/8 of it.

Covered: the DiT from safetensors files in Genmo's naming (Genmo folders, ComfyUI bf16 files, mochi
bundles' DiT), in diffusers' naming (a rank's rows of a fused q/k/v weight come from the rows of to_q,
to_k, to_v it needs; of a swapped SwiGLU weight from the half it needs: `mochi.weights.dit_sources`), and
ComfyUI's scaled fp8 files: the blocks' fp8 Linear weights stay fp8 (`Fp8Linear`, as ``--fp8 keep`` loads
them whole), each rank reading its fp8 rows, the per-tensor scales read by every rank (4 bytes each); the
few fp8 layers outside the blocks are dequantized row by row, as the whole loader dequantizes them. Kijai's
GGUF-in-safetensors files and ``.gguf`` files in either naming: a ``<layer>.<TYPE>_qweight`` row is one
output channel's whole ggml blocks, so a rank reads its rows of the blocks and keeps them as blocks
(`GgufLinear`, whose blocks FSDP2 shards like any weight), or, with ``fp8="dequantize"``, widens just those
rows. Only torch pickles and fp8 files in diffusers' naming are read whole (``can_read_sharded``).
T5 the same way (``load_t5_sharded``), from safetensors files (HF folders, ComfyUI fp16 files, ComfyUI
scaled-fp8 files, whose rows are dequantized to fp32 with the per-tensor scale every rank reads, as
`mochi.weights.t5.load_t5` dequantizes the whole file).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from mochi.models.dit import AsymmDiT
from mochi.models.t5 import T5Config, T5Encoder
from mochi.parallel.context import World
from mochi.parallel.fsdp import shard_dit
from mochi.weights.dit import genmo_shapes, infer_config, keeps_fp32
from mochi.weights.dit_sources import Part, dit_sources, read_rows, rows_readable
from mochi.weights.formats import Detected
from mochi.weights.fp8 import FP8_DTYPES, QUANT_SUFFIXES, dequantize, split_scales, swap_in_fp8
from mochi.weights.ggml import QWEIGHT, block_kinds, swap_in_gguf
from mochi.weights.ggml import dequantize as dequantize_blocks
from mochi.weights.io import WeightsError, check_state_dict, not_floating_point


def can_read_sharded(det: Detected) -> bool:
    """Whether the DiT of ``det`` can be read rank by rank (`rows_readable`): not torch pickles, not fp8
    in diffusers' naming."""
    return rows_readable(det)


def _rows(total: int, rank: int, world: int) -> tuple[int, int]:
    """FSDP2's row range of ``rank``: torch.chunk's split of ``total`` rows into ``world`` parts."""
    size = -(-total // world) if total else 0
    start = min(rank * size, total)
    return start, min(start + size, total)


def load_dit_sharded(
    det: Detected, world: World, dtype: torch.dtype, fp8: str = "keep"
) -> tuple[AsymmDiT, int]:
    """(the DiT FSDP2-sharded over ``world`` with only this rank's rows read, the bytes read).

    dtype: the weights' dtype (fp32 islands stay fp32). fp8: "keep" leaves the blocks' fp8 weights fp8
    and ggml blocks blocks, "dequantize" widens both to ``dtype`` row by row (as
    `mochi.weights.dit.load_dit`'s ``fp8``). Raises WeightsError on missing, unexpected or mis-shaped
    keys, or an unsupported ggml block type, as the whole-model loader does.
    """
    if not can_read_sharded(det):
        raise WeightsError(f"the DiT of {det.describe()} cannot be read in shards; load it whole")
    _check_float_weights(det)
    shapes = genmo_shapes(det)
    parts, _ = dit_sources(det)
    with torch.device("meta"):
        model = AsymmDiT(infer_config(shapes))
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, fake, det.describe())
    kinds = block_kinds(parts)  # layer → ggml block type
    if fp8 == "keep":
        swap_in_gguf(model, kinds)  # rows of blocks stay blocks
    widen = {} if fp8 == "keep" else {f"{layer}.weight": kind for layer, kind in kinds.items()}
    for name, kind in widen.items():
        parts[name] = parts.pop(f"{name.removesuffix('.weight')}.{kind}_qweight")
    scales, fp8_dtypes = _fp8_scales(det, parts)
    in_blocks = [layer for layer in scales if layer.startswith("blocks.")] if fp8 == "keep" else []
    kept = swap_in_fp8(model, in_blocks, fp8_dtypes)
    model.to(dtype=dtype)
    shard_dit(model, world)
    read = 0

    def rows(name: str, start: int | None, end: int | None) -> torch.Tensor:
        nonlocal read
        layer = name.rpartition(".")[0]
        if name.endswith(".weight_scale"):
            return scales[layer]  # read with the bookkeeping, by every rank
        t = read_rows(parts[name], start, end)
        read += t.numel() * t.element_size()
        if QWEIGHT.match(name):
            return t  # whole ggml blocks of whole output rows
        if name in widen:  # exact per row, as the whole loader's dequantization
            return dequantize_blocks(t, widen[name], dtype)
        if name.endswith(".weight") and layer in scales and layer not in kept:  # fp8 outside the blocks
            scale = scales[layer] if scales[layer].ndim == 0 else scales[layer][start:end]
            return dequantize(t, scale, dtype)
        return t.to(
            torch.float32
            if keeps_fp32(name)
            else t.dtype
            if layer in kept and t.dtype in FP8_DTYPES
            else dtype
        )

    _fill(model, rows, world)
    return model.eval().requires_grad_(False), read + sum(
        t.numel() * t.element_size() for t in scales.values()
    )


def gguf_dit_bytes(det: Detected, dtype: torch.dtype) -> int:
    """Bytes of a ggml-block DiT as the loader keeps it, from its headers: the blocks as stored (uint8),
    the rest in ``dtype`` (fp32 islands in fp32)."""
    _, shapes = dit_sources(det)
    return sum(
        math.prod(s) * (1 if QWEIGHT.match(k) else 4 if keeps_fp32(k) else dtype.itemsize)
        for k, s in shapes.items()
    )


# Stored dtypes (safetensors' names) that no weight may have; ggml blocks (``…_qweight``) are bytes by design.
_INTEGER_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}


def _check_float_weights(det: Detected) -> None:
    """The whole loader's rule, from headers: a weight stored as integers is the file's fault (WeightsError).
    Quantization bookkeeping (fp8 scales, ComfyUI's ``comfy_quant`` bytes, ggml blocks) is not a weight."""
    from mochi.weights.formats import component_keys

    bad = [
        f"{k} is {name}"
        for k, (name, _) in sorted(component_keys(det, "dit").items())
        if name in _INTEGER_DTYPES
        and not (QWEIGHT.match(k) or k.endswith(QUANT_SUFFIXES) or k == "scaled_fp8")
    ]
    if bad:
        what = f"checkpoint (detected format: {det.describe()})"
        raise WeightsError(f"{what} does not fit the model: {not_floating_point(bad)}")


def _fp8_scales(det: Detected, parts: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.dtype]]:
    """(layer → fp32 scale, layer → fp8 dtype) of a scaled-fp8 DiT, reading only its bookkeeping tensors."""
    if det.quant.get("dit", "gguf").startswith("gguf"):
        return {}, {}
    from mochi.weights.formats import component_keys

    dtypes = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    header = component_keys(det, "dit")
    small = {k: read_rows(p) for k, p in parts.items() if k == "scaled_fp8" or k.endswith(QUANT_SUFFIXES)}
    weights = {
        k: torch.empty(shape, dtype=dtypes.get(name, torch.bfloat16), device="meta")
        for k, (name, shape) in header.items()
        if k not in small
    }
    _, scales = split_scales({**weights, **small}, det.metadata, det.prefixes["dit"])
    from mochi.finite import check_finite

    check_finite(
        {f"{layer}.weight_scale": s for layer, s in scales.items()}, f"DiT checkpoint {det.describe()}"
    )
    return scales, {layer: weights[layer + ".weight"].dtype for layer in scales}


def _fill(model: torch.nn.Module, rows, world: World) -> None:  # noqa: ANN001
    """Load the FSDP2-sharded meta ``model`` with this rank's rows of each parameter (whole buffers).

    rows(name, start, end): rows [start, end) of the tensor ``name`` in the dtype to keep (None, None:
    all of it).
    """
    local: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict().items():
        if isinstance(param, DTensor):
            start, end = _rows(param.shape[0], world.rank, world.size) if param.ndim else (None, None)
            t = rows(name, start, end).to(world.device)
            t = DTensor.from_local(
                t,
                param.device_mesh,
                param.placements,
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            )
        else:
            t = rows(name, None, None).to(world.device)
        local[name] = t
    model.load_state_dict(local, strict=True, assign=True)


def t5_sources(t5: str | None, det: Detected | None) -> tuple[list, dict | None] | None:
    """(the T5's safetensors files, its HF config or None) when it can be read in shards, else None
    (torch pickles). Raises WeightsError for a quantization format `mochi.weights.t5` cannot read."""
    from mochi.weights.io import read_metadata
    from mochi.weights.t5 import _check_quantization, _detected_files, _locate

    if t5 is not None:
        files, config = _locate(Path(t5))
    elif det is not None and "t5" in det.files:
        files, config = _detected_files(det)
    else:
        return None
    if not all(f.suffix == ".safetensors" for f in files):
        return None
    for f in files:
        _check_quantization(read_metadata(f))
    return files, config


def load_t5_sharded(
    files: list, config: dict | None, world: World, prefix: str = ""
) -> tuple[T5Encoder, int]:
    """(T5 in fp32, FSDP2-sharded over ``world`` as ``shard_t5`` shards it, with only this rank's rows
    read; the bytes read). ``files``/``config`` from ``t5_sources``; ``prefix``: the component's prefix in
    an all-in-one file. Scaled-fp8 rows are widened to fp32 with their layer's scale (read by every
    rank), ``weight · scale`` formed in fp32 as `mochi.weights.t5.convert_t5_state_dict` forms it."""
    from mochi.parallel.fsdp import shard_t5
    from mochi.weights.t5 import _SCALE_SUFFIXES, _find_prefix, infer_t5_config

    # Headers only through these handles; the rows are read by ``read_rows``, a file open per read.
    handles = {f: safe_open(f, framework="pt", device="cpu") for f in files}
    keys = {k: h for h in handles.values() for k in h.keys() if k.startswith(prefix)}  # noqa: SIM118
    inner = prefix + _find_prefix([k[len(prefix) :] for k in keys])
    where = {k[len(inner) :]: (h, k) for k, h in keys.items() if k.startswith(inner)}
    file_of = {id(h): f for f, h in handles.items()}
    if "shared.weight" not in where and "encoder.embed_tokens.weight" in where:
        where["shared.weight"] = where["encoder.embed_tokens.weight"]
    if config is not None:
        cfg = T5Config.from_hf(config)
    else:
        shapes = {n: torch.empty(h.get_slice(k).get_shape(), device="meta") for n, (h, k) in where.items()}
        cfg = infer_t5_config(shapes)
    with torch.device("meta"):
        model = T5Encoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {
        n: torch.empty(h.get_slice(k).get_shape(), device="meta")
        for n, (h, k) in where.items()
        if n in expected
    }
    check_state_dict(expected, found, "T5 read in shards")
    shard_t5(model, world)
    scales = {}
    for n, (h, k) in where.items():
        if n.endswith(_SCALE_SUFFIXES):
            scale = read_rows((Part(file_of[id(h)], k),)).to(torch.float32)
            scales[n.rpartition(".")[0]] = scale if scale.numel() == 1 else scale.reshape(-1, 1)
    read = sum(t.numel() * 4 for t in scales.values())

    def rows(name: str, start: int | None, end: int | None) -> torch.Tensor:
        nonlocal read
        handle, key = where[name]
        t = read_rows((Part(file_of[id(handle)], key),), start, end)
        read += t.numel() * t.element_size()
        scale = scales.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if scale is None:
            return t.to(torch.float32)
        return t.float() * (scale if scale.ndim == 0 else scale[start:end])

    _fill(model, rows, world)
    return model.eval().requires_grad_(False), read


def t5_fp32_bytes(t5: str | None, det: Detected | None) -> int | None:
    """Bytes of the T5 encoder in fp32 from its files' headers (decoder halves and fp8 bookkeeping left
    out), or None when its files cannot be read in shards (see ``t5_sources``)."""
    from mochi.weights.t5 import _IGNORED, _SCALE_SUFFIXES

    found = t5_sources(t5, det)
    if found is None:
        return None
    # In an all-in-one file only the T5's own keys count (the DiT and VAE share the file).
    prefix = det.prefixes.get("t5", "") if t5 is None and det is not None else ""
    total = 0
    for f in found[0]:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if not k.startswith(prefix):
                    continue
                name = k.rpartition("transformer.")[2]  # ComfyUI's prefix off, for the patterns below
                if not _IGNORED.match(name) and not k.endswith(_SCALE_SUFFIXES) and "decoder." not in k:
                    total += 4 * math.prod(h.get_slice(k).get_shape())
    return total
