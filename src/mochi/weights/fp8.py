"""fp8 weights: read both ComfyUI layouts, keep them fp8 in memory, or dequantize them at load.

ComfyUI's "scaled fp8" files (ecosystem.md §1.3) store a Linear's weight as fp8 (e4m3fn) with a per-tensor
fp32 scale; the real weight is ``weight.to(float) * scale``. Two layouts exist:
  legacy  a marker tensor ``scaled_fp8`` (its dtype names the fp8 type), ``<layer>.scale_weight`` and an
          optional ``<layer>.scale_input``;
  newer   ``<layer>.weight_scale``, optional ``<layer>.input_scale``, and the layer's format as a
          ``<layer>.comfy_quant`` uint8 JSON tensor and/or the ``_quantization_metadata`` header entry.
Only Linear weights are quantized; biases, norms, embeddings and ``pos_frequencies`` stay 16/32-bit. The
input scales only serve fp8 matmul kernels (static activation quantization); the dequantized computation
ComfyUI uses by default ignores them, and so does this module.

`Fp8Linear` keeps the fp8 weight and its scale and computes ``x @ (w·s)ᵀ + b`` in the activation dtype,
casting one layer's weight at a time, so a model's Linear weights take half the memory of bf16.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mochi.weights.io import WeightsError, json_object, quantization_layers

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
QUANT_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
QUANT_SUFFIXES = (*_SCALE_SUFFIXES, *_INPUT_SCALE_SUFFIXES, ".comfy_quant")


def split_scales(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate quantization bookkeeping from a component's tensors (keys without prefix).

    Returns (module tensors, scales): module tensors are the keys a plain model has (fp8 weights kept as
    stored); scales map a layer name ("blocks.0.attn.qkv_x") to its fp32 scale, shape () or (out, 1).
    Every fp8 weight gets a scale (1.0 where the file has none). ``prefix`` is the component's prefix in
    the file, stripped from layer names found in the ``_quantization_metadata`` header entry.
    Raises WeightsError for a quantization format other than float8_e4m3fn / float8_e5m2.
    """
    formats = {name.removeprefix(prefix): fmt for name, fmt in quantization_layers(metadata).items()}
    out: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if key == "scaled_fp8":
            continue  # the legacy marker: its dtype is the fp8 type, which the weights carry anyway
        if key.endswith(".comfy_quant"):
            conf = json_object(bytes(t.to(torch.uint8).tolist()), f"tensor {prefix + key!r}")
            formats[key.removesuffix(".comfy_quant")] = str(conf.get("format"))
        elif key.endswith(_SCALE_SUFFIXES):
            scales[key.rsplit(".", 1)[0]] = t.to(torch.float32)
        elif not key.endswith(_INPUT_SCALE_SUFFIXES):
            out[key] = t
    # The header entry may list other components' layers too: only this component's weights count.
    bad = {
        layer: fmt for layer, fmt in formats.items() if fmt not in QUANT_FORMATS and layer + ".weight" in out
    }
    if bad:
        layer, fmt = next(iter(sorted(bad.items())))
        raise WeightsError(
            f"quantization format {fmt!r} of layer {layer!r} (and {len(bad) - 1} more) is not supported; "
            f"supported: {', '.join(QUANT_FORMATS)}"
        )
    for layer, scale in list(scales.items()):
        if layer + ".weight" not in out:
            raise WeightsError(f"scale for layer {layer!r} has no weight {layer + '.weight'!r}")
        if scale.numel() not in (1, out[layer + ".weight"].shape[0]):
            raise WeightsError(
                f"scale of {layer!r} has shape {tuple(scale.shape)}; expected one value or one per output row"
            )
        scales[layer] = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)
    # A scaled file scales every fp8 weight; one without its scale would be read 1/scale times too large
    # (about 2000x for a typical layer), so it is refused. Plain fp8 files (no scale at all) are read at 1.
    scaled = "scaled_fp8" in state_dict or bool(scales)
    for key, t in out.items():
        if t.dtype in FP8_DTYPES and key.endswith(".weight"):
            layer = key.removesuffix(".weight")
            if scaled and layer not in scales:
                raise WeightsError(
                    f"fp8 weight {prefix + key!r} has no scale ({prefix + layer}.scale_weight or "
                    ".weight_scale) in a scaled fp8 file, whose other fp8 weights have one: a damaged file"
                )
            scales.setdefault(layer, torch.ones((), dtype=torch.float32))
    return out, scales


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight · scale`` in ``dtype``: the product is formed in fp32 and rounded once."""
    return (weight.to(torch.float32) * scale.to(weight.device)).to(dtype)


def quantize(
    weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor fp8 quantization as ComfyUI's scaled files do it: scale = amax / fp8 max.

    Returns (fp8 weight of the same shape, fp32 scale of shape ()).
    """
    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax() / torch.finfo(dtype).max).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype), scale


class Fp8Linear(nn.Linear):
    """A Linear whose weight stays fp8 and is scaled and cast to the input's dtype at each call.

    weight: (out, in) fp8; weight_scale: fp32 () or (out, 1) buffer (saved as ``<layer>.weight_scale``,
    the newer ComfyUI name); bias: (out,) in a 16/32-bit dtype or None.
    forward: x (..., in) → (..., out) in x's dtype. Casting the module to another dtype (``.to(bf16)``)
    leaves the fp8 weight as it is.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float8_e4m3fn,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        w = torch.empty(out_features, in_features, device=device, dtype=dtype)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=bias_dtype)) if bias else None
        self.register_buffer("weight_scale", torch.ones((), device=device, dtype=torch.float32))

    @classmethod
    def like(cls, linear: nn.Linear, dtype: torch.dtype = torch.float8_e4m3fn) -> Fp8Linear:
        """An empty Fp8Linear with ``linear``'s shape, device and bias dtype (meta stays meta)."""
        bias = linear.bias is not None
        return cls(
            linear.in_features,
            linear.out_features,
            bias,
            device=linear.weight.device,
            dtype=dtype,
            bias_dtype=linear.bias.dtype if bias else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale.ndim == 0:
            # bf16/fp16 × fp32 0-d tensor: PyTorch forms the product in fp32 and rounds once, which is
            # exactly `dequantize`, without an fp32 copy of the weight.
            w = self.weight.to(x.dtype) * self.weight_scale
        else:
            w = dequantize(self.weight, self.weight_scale, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:  # noqa: ANN001 - torch's signature
        # The scale is one value or one per output row (`split_scales`): the buffer takes the stored shape.
        scale = state_dict.get(prefix + "weight_scale")
        if (
            scale is not None
            and scale.shape != self.weight_scale.shape
            and scale.numel() in (1, self.out_features)
        ):
            shape = () if scale.numel() == 1 else (self.out_features, 1)
            self.weight_scale = torch.empty(shape, device=self.weight_scale.device, dtype=torch.float32)
            state_dict[prefix + "weight_scale"] = scale.reshape(shape)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        fp8, scale = self.weight.dtype, self.weight_scale
        super()._apply(fn, recurse)
        # A module-wide dtype cast (`.to(bf16)`, `.half()`) must not upcast the stored weight or round the
        # scale: put them back (the weight's values are fp8 values, so casting back is exact).
        if self.weight.dtype != fp8:
            self.weight = nn.Parameter(self.weight.to(fp8), requires_grad=False)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={str(self.weight.dtype).removeprefix('torch.')}"


def swap_in_fp8(model: nn.Module, layers: Iterable[str], dtypes: Mapping[str, torch.dtype]) -> list[str]:
    """Replace the named ``nn.Linear`` submodules of ``model`` by empty `Fp8Linear`s, in place.

    ``dtypes`` gives each layer's fp8 storage dtype. Returns the layers swapped; names that are not plain
    Linear layers (a Conv2d, say) are left alone and should be dequantized by the caller.
    """
    swapped = []
    for name in layers:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or isinstance(module, Fp8Linear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.like(module, dtypes[name]))
        swapped.append(name)
    return swapped


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (meta tensors count at their nominal size)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
