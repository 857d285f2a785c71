"""Load the DiT from any released weight format into `AsymmDiT`, strictly, with one copy of the weights.

The model is built on the meta device; the checkpoint is read one tensor at a time (each cast as it
arrives), renamed to Genmo's keys when it is in diffusers' naming, checked key by key and shape by shape,
and assigned into the model. fp8 Linear weights either stay fp8 (`Fp8Linear`) or are dequantized here;
so do ggml-block weights (GGUF Q8_0/Q4_0: `GgufLinear`, `mochi.weights.ggml`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping

import torch

from mochi.weights.dit_sources import iter_genmo, streamable
from mochi.weights.formats import Detected, component_keys, detect, iter_component
from mochi.weights.fp8 import FP8_DTYPES, QUANT_SUFFIXES, dequantize, split_scales, swap_in_fp8
from mochi.weights.ggml import QWEIGHT, block_kinds, block_scales, logical_shapes, swap_in_gguf
from mochi.weights.ggml import dequantize as dequantize_blocks
from mochi.weights.io import WeightsError, check_state_dict

FP8_MODES = ("keep", "dequantize")
_HEADER_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def keeps_fp32(key: str) -> bool:
    """Tensors that stay fp32 whatever the model dtype (genmo-mochi.md §1.4): RoPE frequencies, norm weights.

    Holds for Genmo's names (``AsymmDiT.is_fp32_param``) and diffusers' (``…attn1.norm_q.weight``).
    """
    parts = key.split(".")
    return key == "pos_frequencies" or (len(parts) >= 2 and "norm" in parts[-2])


def _check_has_dit(det: Detected) -> None:
    if "dit" not in det.files:
        raise WeightsError(
            f"{str(det.path)!r} (detected format: {det.describe()}) holds no DiT; "
            f"it holds: {', '.join(det.files) or 'nothing'}"
        )


def genmo_shapes(det: Detected) -> dict[str, tuple[int, ...]]:
    """The DiT's tensor shapes under Genmo's names, from headers only (fp8 bookkeeping left out)."""
    _check_has_dit(det)
    shapes = {k: v[1] for k, v in component_keys(det, "dit").items()}
    shapes = {k: s for k, s in shapes.items() if k != "scaled_fp8" and not k.endswith(QUANT_SUFFIXES)}
    shapes = logical_shapes(shapes)
    if det.layouts["dit"] == "diffusers":
        from mochi.weights.keymaps.dit_diffusers import diffusers_to_genmo

        fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        shapes = {k: tuple(v.shape) for k, v in diffusers_to_genmo(fake).items()}
    return shapes


def shape_facts(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int | bool]:
    """The architecture a Genmo-named DiT state dict was made for, read from its shapes.

    Keys: depth, patch_size, in_channels, out_channels, hidden_size_x, hidden_size_y, num_heads, head_dim,
    t5_feat_dim, timestep_embed_dim, mlp_hidden_x, mlp_hidden_y (0 for a one-block model), qkv_bias,
    out_bias.
    """

    def shape(key: str, ndim: int = 2) -> tuple[int, ...]:
        if key not in shapes:
            raise WeightsError(f"cannot read the DiT's architecture: the checkpoint has no {key!r}")
        found = tuple(shapes[key])
        if len(found) != ndim or 0 in found:
            raise WeightsError(
                f"cannot read the DiT's architecture: {key!r} has shape {found}, where a DiT has "
                f"{ndim} dimensions, none of them 0; the checkpoint is damaged or not a Mochi DiT"
            )
        return found

    blocks = {int(m[1]) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise WeightsError("cannot read the DiT's architecture: the checkpoint has no blocks.N.* keys")
    if len(blocks) != max(blocks) + 1:  # a stray index would build a model that deep (blocks.10000.x)
        missing = sorted(set(range(max(blocks) + 1)) - blocks)
        raise WeightsError(
            f"cannot read the DiT's architecture: its blocks run up to blocks.{max(blocks)} but "
            f"{len(missing)} indices are missing (blocks.{missing[0]} first); they run from 0 without gaps"
        )
    width_x, in_channels, patch, _ = shape("x_embedder.proj.weight", 4)
    width_y, text_dim = shape("t5_yproj.weight")
    _, heads, half_head = shape("pos_frequencies", 3)
    # The heads are read from the RoPE table alone: the attention's widths must agree with them, or the
    # model built from these facts fails deep inside a forward (einops: "can't divide axis of length 96").
    qkv_rows = shape("blocks.0.attn.qkv_x.weight")[0]
    if heads * 2 * half_head != width_x or qkv_rows != 3 * width_x:
        raise WeightsError(
            f"cannot read the DiT's architecture: 'pos_frequencies' {tuple(shapes['pos_frequencies'])} "
            f"gives {heads} heads of {2 * half_head} ({heads * 2 * half_head} wide), "
            f"'x_embedder.proj.weight' a visual width of {width_x} and 'blocks.0.attn.qkv_x.weight' "
            f"{qkv_rows} rows (3 x the width); "
            "they disagree, so the checkpoint is damaged or not a Mochi DiT"
        )
    final_rows = shape("final_layer.linear.weight")[0]
    if final_rows % (patch * patch):
        raise WeightsError(
            f"cannot read the DiT's architecture: 'final_layer.linear.weight' has {final_rows} rows, not a "
            f"multiple of the patch area {patch}x{patch}; the checkpoint is damaged or not a Mochi DiT"
        )
    return {
        "depth": max(blocks) + 1,
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": final_rows // (patch * patch),
        "hidden_size_x": width_x,
        "hidden_size_y": width_y,
        "num_heads": heads,
        "head_dim": 2 * half_head,
        "t5_feat_dim": text_dim,
        "timestep_embed_dim": shape("t_embedder.mlp.0.weight")[1],
        "mlp_hidden_x": shape("blocks.0.mlp_x.w2.weight")[1],
        "mlp_hidden_y": shape("blocks.0.mlp_y.w2.weight")[1] if "blocks.0.mlp_y.w2.weight" in shapes else 0,
        "qkv_bias": "blocks.0.attn.qkv_x.bias" in shapes,
        "out_bias": "blocks.0.attn.proj_x.bias" in shapes,
    }


def infer_config(shapes: Mapping[str, tuple[int, ...]]):  # noqa: ANN201 - DiTConfig is imported lazily
    """The `DiTConfig` a checkpoint was made for, from its Genmo-named shapes (depth, widths, heads).

    The SwiGLU widths are matched by Genmo's rule (ratio 4, rounded up to 256) when it fits, else by
    diffusers' rule (no rounding), else by a fitted ratio. ``pool_heads`` cannot be read from shapes and
    keeps its default (8, the released value).
    """
    from mochi.models.dit import DiTConfig

    f = shape_facts(shapes)
    base = DiTConfig(
        depth=f["depth"],
        patch_size=f["patch_size"],
        num_heads=f["num_heads"],
        hidden_size_x=f["hidden_size_x"],
        hidden_size_y=f["hidden_size_y"],
        in_channels=f["in_channels"],
        t5_feat_dim=f["t5_feat_dim"],
        timestep_embed_dim=f["timestep_embed_dim"],
    )
    wanted = [(f["hidden_size_x"], f["mlp_hidden_x"]), (f["hidden_size_y"], f["mlp_hidden_y"])]
    if f["depth"] == 1:
        wanted = wanted[:1]  # the only block is the last one, which has no text MLP
    for multiple in (256, 1):
        cfg = dataclasses.replace(base, mlp_multiple_of=multiple)
        if all(cfg.mlp_hidden(w, 4.0) == h for w, h in wanted):
            return cfg

    def ratio(width: int, hidden: int) -> float:
        # int(2·int(width·r)/3) == hidden for int(width·r) = ceil(3·hidden/2); +0.5 survives float rounding.
        return (math.ceil(3 * hidden / 2) + 0.5) / width

    (wx, hx), (wy, hy) = wanted[0], wanted[-1]
    return dataclasses.replace(base, mlp_multiple_of=1, mlp_ratio_x=ratio(wx, hx), mlp_ratio_y=ratio(wy, hy))


def check_dit_tensors(sd: Mapping[str, torch.Tensor], fmt: str) -> None:
    """Raise WeightsError unless ``sd`` (Genmo names, as `read_dit` returns them) holds exactly what the DiT
    its shapes describe holds: every key, each shape, floating point where the model has floats. What
    `load_dit` checks, for code that passes the tensors on without building a model (``mochi convert``)."""
    from mochi.models.dit import AsymmDiT

    with torch.device("meta"):
        model = AsymmDiT(_inferred(logical_shapes({k: tuple(v.shape) for k, v in sd.items()}), fmt))
    _check_fits(model, sd, fmt)


def _inferred(shapes: Mapping[str, tuple[int, ...]], fmt: str):  # noqa: ANN202 - DiTConfig
    """``infer_config(shapes)``, its error naming the detected format ``fmt``."""
    try:
        return infer_config(shapes)
    except WeightsError as e:
        raise WeightsError(f"checkpoint (detected format: {fmt}): {e}") from None


def _check_fits(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], fmt: str) -> None:
    """Swap ``model``'s layers that ``tensors`` hold as ggml blocks for `GgufLinear` (they stay quantized:
    dequantized per layer at use), then raise WeightsError unless ``tensors`` are exactly its keys, shapes
    and floating point where it has floats (integers where weights belong are refused)."""
    swap_in_gguf(model, block_kinds(tensors))
    expected = model.state_dict()
    dtypes = {k: v.dtype for k, v in expected.items()}
    check_state_dict({k: tuple(v.shape) for k, v in expected.items()}, tensors, fmt, dtypes)


def target_dtype(det: Detected, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype non-fp8 tensors are cast to: ``dtype``; for fp8 files by default the dtype of the rest."""
    if dtype is not None or "dit" not in det.quant:
        return dtype
    counts: dict[torch.dtype, int] = {}
    for key, (name, shp) in component_keys(det, "dit").items():
        if name in _HEADER_DTYPES and not key.endswith(QUANT_SUFFIXES):
            d = _HEADER_DTYPES[name]
            counts[d] = counts.get(d, 0) + torch.Size(shp).numel()
    return max(counts, key=counts.__getitem__) if counts else torch.bfloat16


def read_dit(
    det: Detected,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    fp8: str = "dequantize",
    take: Callable[[str, torch.Tensor], bool] | None = None,
    fp32_islands: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The DiT's tensors under Genmo's names, each cast as it is read.

    Returns (state dict, fp8 scales). With ``fp8="dequantize"`` the scales are empty and every weight is
    in ``dtype`` (default: the stored dtype; for fp8 files, the dtype of their other tensors). With
    ``fp8="keep"`` fp8 weights stay fp8 and the scales map each such layer ("blocks.0.attn.qkv_x") to its
    fp32 scale. fp32 islands (`keeps_fp32`) are fp32, as the model keeps them; with ``fp32_islands=False``
    they stay as stored (a conversion that keeps every dtype).
    take(key, tensor): offered each tensor (Genmo name, after its cast) as soon as it is read, when the
    files can be read tensor by tensor (`mochi.weights.dit_sources.streamable`); a tensor it returns True
    for is the caller's and is left out of the state dict (quantization at load). Otherwise never called.
    """
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8={fp8!r} is not a valid mode; choose one of {', '.join(FP8_MODES)}")
    _check_has_dit(det)
    target = target_dtype(det, dtype)
    sd: dict[str, torch.Tensor] = {}
    stream = take is not None and streamable(det)
    for key, t in iter_genmo(det, device) if stream else iter_component(det, "dit", device):
        if key == "scaled_fp8" or key.endswith(QUANT_SUFFIXES) or QWEIGHT.match(key):
            pass  # fp8 bookkeeping, handled by split_scales; ggml blocks, handled below
        elif keeps_fp32(key) and t.is_floating_point():  # integers stay integers: check_state_dict names them
            t = t.to(torch.float32) if fp32_islands else t
        elif target is not None and t.is_floating_point() and t.dtype not in FP8_DTYPES:
            t = t.to(target)
        if not (stream and take(key, t)):
            sd[key] = t
    scales: dict[str, torch.Tensor] = {}
    if "dit" in det.quant:
        sd, scales = split_scales(sd, det.metadata, det.prefixes["dit"])
        for layer in list(scales):
            w = sd[layer + ".weight"]
            if fp8 == "dequantize" or w.dtype not in FP8_DTYPES:
                sd[layer + ".weight"] = dequantize(w, scales.pop(layer), target or torch.bfloat16)
    kinds = block_kinds(sd)
    if det.layouts["dit"] == "diffusers" and not stream:
        from mochi.weights.keymaps.dit_diffusers import diffusers_to_genmo

        if scales:
            raise WeightsError(f"fp8 weights in diffusers' naming are not supported ({det.describe()})")
        # ggml rows pass through the key map's row operations (fuse q/k/v, swap halves) as bytes.
        sd = {(f"{m['layer']}.weight" if (m := QWEIGHT.match(k)) else k): v for k, v in sd.items()}
        try:
            sd = diffusers_to_genmo(Consumed(sd))
        except WeightsError as e:
            raise WeightsError(f"checkpoint (detected format: {det.describe()}): {e}") from None
        kinds = genmo_kinds(kinds, sd)
        for layer, kind in kinds.items():
            sd[f"{layer}.{kind}_qweight"] = sd.pop(f"{layer}.weight")
    if fp8 == "dequantize":
        for layer, kind in kinds.items():
            q = sd.pop(f"{layer}.{kind}_qweight")
            sd[f"{layer}.weight"] = dequantize_blocks(q, kind, target or torch.bfloat16)
    return sd, scales


def genmo_kinds(kinds: Mapping[str, str], sd: Mapping[str, object]) -> dict[str, str]:
    """Block types of diffusers-named layers → the Genmo layers they become (fused q/k/v must agree).

    sd: the converted model's Genmo-named keys (tensors, or shapes from headers: only the keys are read).
    """
    from mochi.weights.keymaps.dit_diffusers import rules

    depth = 1 + max((int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out = {}
    for rule in rules(depth):
        found = {kinds.get(d.removesuffix(".weight")) for d in rule.diffusers if d.endswith(".weight")}
        if found - {None}:
            if len(found) > 1:
                raise WeightsError(f"{rule.genmo} fuses tensors stored in different block types {found}")
            out[rule.genmo.removesuffix(".weight")] = found.pop()
    return out


class Consumed(Mapping[str, torch.Tensor]):
    """A read-once view of a state dict: reading a key removes it from the dict underneath.

    Handed to a key map, it lets each source tensor be freed as soon as its converted form exists, so
    converting a whole model (fused qkv, swapped halves) holds one layer twice at most, not the model.
    """

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self._sd = sd

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._sd.pop(key)

    def __iter__(self):  # noqa: ANN204 - Iterator[str]
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)

    def __contains__(self, key: object) -> bool:
        return key in self._sd


def load_dit(
    path: str | os.PathLike | Detected,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    fp8: str = "keep",
    config=None,  # noqa: ANN001 - DiTConfig | None; the model module is imported lazily
    variant: str | None = None,
):  # noqa: ANN201 - returns AsymmDiT
    """Load the DiT from a checkpoint of any supported format (see `mochi.weights.formats`).

    dtype:   dtype of the weights (fp32 islands excepted); None keeps the stored dtype (for fp8 files,
             the dtype of their unquantized tensors).
    device:  where the weights are read to; the model is built on the meta device, so the weights exist
             once, on this device.
    fp8:     "keep": fp8 Linear weights stay fp8 (`Fp8Linear`, scaled and cast per call) and GGUF blocks
             stay blocks (`GgufLinear`); "dequantize": both become ``dtype`` weights at load.
    config:  a `DiTConfig`; by default inferred from the checkpoint's shapes.
    variant: the diffusers weight variant to read ("bf16") when a folder holds several.
    Returns the model in eval mode without gradients. Raises WeightsError naming every missing,
    unexpected or mis-shaped key and the detected format.
    """
    return load_dit_quantized(
        path, None, dtype=dtype, device=device, fp8=fp8, config=config, variant=variant
    )[0]


def load_dit_quantized(
    path: str | os.PathLike | Detected,
    quantize: str | None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    fp8: str = "keep",
    config=None,  # noqa: ANN001 - DiTConfig | None
    variant: str | None = None,
):  # noqa: ANN201 - (AsymmDiT, mochi.weights.quantize.Quantized | None)
    """`load_dit` with the blocks' Linear weights quantized to ``quantize`` (None: not quantized) while
    the checkpoint is read: each weight is quantized as it arrives (in ``dtype``) and its full-width
    tensor dropped, so the load holds the quantized model plus one layer (`mochi.weights.quantize.AtLoad`).
    Files that cannot be read tensor by tensor (GGUF, torch pickles) are read whole, then quantized.
    Returns (model, what was quantized: a `Quantized`, or None when ``quantize`` is None).
    """
    from mochi.finite import check_finite
    from mochi.models.dit import AsymmDiT
    from mochi.weights.quantize import AtLoad, Quantized, quantize_model

    det = path if isinstance(path, Detected) else detect(path, variant=variant)
    fmt = det.describe()
    model = quantizer = None
    if quantize is not None and streamable(det):
        if config is None:
            config = _inferred(genmo_shapes(det), fmt)
        with torch.device("meta"):
            model = AsymmDiT(config)
        what = f"DiT checkpoint (detected format: {fmt})"
        quantizer = AtLoad(model, quantize, lambda key, t: check_finite({key: t}, what))
    # fp8 layers to widen and quantize: read kept, then each widened and quantized in turn, so the load
    # never holds the whole widened model (twice the fp8 file in bf16) before quantizing it.
    widen = quantizer is not None and fp8 == "dequantize"
    sd, scales = read_dit(det, dtype=dtype, device=device, fp8="keep" if widen else fp8, take=quantizer)
    if widen:
        wide = target_dtype(det, dtype) or torch.bfloat16  # as read_dit widens them
        for layer in list(scales):
            key = f"{layer}.weight"
            w = dequantize(sd.pop(key), scales.pop(layer), wide)
            if not quantizer(key, w):
                sd[key] = w
    if config is None:
        config = _inferred(logical_shapes({k: tuple(v.shape) for k, v in sd.items()}), fmt)
    if model is None:
        with torch.device("meta"):
            model = AsymmDiT(config)
    taken = {k: torch.empty(s, device="meta") for k, s in quantizer.shapes().items()} if quantizer else {}
    _check_fits(model, {**sd, **taken}, fmt)
    check_finite(sd, f"DiT checkpoint (detected format: {fmt})")
    # What stays quantized is scaled at use: a NaN or infinite scale is as damaged as such a weight.
    stored_scales = {f"{layer}.weight_scale": s for layer, s in scales.items()}
    blocks = {k: m["kind"] for k in sd if (m := QWEIGHT.match(k))}
    stored_scales.update({k: block_scales(sd[k], kind) for k, kind in blocks.items()})
    check_finite(stored_scales, f"DiT checkpoint (detected format: {fmt})")
    done = quantizer.install(model, sd) if quantizer else None
    # Only the blocks' Linears stay fp8 (97% of the weights at full size): code outside the blocks may read
    # a weight's dtype as the compute dtype (the timestep embedder does), so those few layers are dequantized.
    in_blocks = [layer for layer in scales if layer.startswith("blocks.")]
    swapped = swap_in_fp8(model, in_blocks, {layer: sd[layer + ".weight"].dtype for layer in in_blocks})
    for layer in set(scales) - set(swapped):
        w = sd[layer + ".weight"]
        sd[layer + ".weight"] = dequantize(w, scales.pop(layer), target_dtype(det, dtype) or torch.bfloat16)
    for layer, scale in scales.items():
        sd[layer + ".weight_scale"] = scale.to(sd[layer + ".weight"].device)
    result = model.load_state_dict(sd, strict=not taken, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"tensors left on the meta device after loading: {left[:5]}"
    model = model.eval().requires_grad_(False)
    if quantize is not None:
        # What was not quantized while read: every layer of files read whole, fp8 layers widened at load.
        later = quantize_model(model, quantize)
        if done is not None:
            ours = {*done.layers, *later.layers}
            order = [n for n, _ in model.named_modules() if n in ours]
            done = Quantized(quantize, order, [n for n in later.kept if n not in ours], later.skipped)
        else:
            done = later
    return model, done
