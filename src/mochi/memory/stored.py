"""The DiT as a checkpoint will load, from its headers alone: architecture, weight mode, layers kept stored.

Loading with ``--fp8 keep`` (the default) keeps a GGUF DiT's ggml blocks and the fp8 weights of its blocks'
Linears as stored (`mochi.weights.dit.load_dit_quantized`); ``--fp8 dequantize`` widens both. Each kept
layer takes its own stored bytes, so a GGUF that mixes Q4_0 and Q8_0 layers is planned layer by layer
(`mochi.memory.estimate.dit_weights`), not as either type throughout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from mochi.models.dit import DiTConfig
from mochi.weights.formats import Detected

Kept = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class StoredDiT:
    """config: the architecture; mode: the planner's weight mode as loaded ("none": full width, "fp8",
    "q8_0", "q4_0", or the GGUF types joined by "+" when mixed, as `memory.auto.quantization_of` names a
    loaded model); kept: (layer, stored bytes of its weight) of each layer kept as stored."""

    config: DiTConfig
    mode: str = "none"
    kept: Kept = ()


def stored_mode(quant: str | None) -> str:
    """The planner's weight mode of a DiT stored as `Detected.quant` names it, as ``--fp8 keep`` keeps it:
    fp8 layouts "fp8", GGUF blocks their types ("q8_0", "q4_0"; mixed "q4_0+q8_0"), else "none"."""
    if quant is None:
        return "none"
    if quant.startswith("gguf "):
        return quant.removeprefix("gguf ").lower()
    return "fp8"  # scaled_fp8, comfy_quant, fp8


def kept_layers(det: Detected) -> Kept:
    """(Genmo layer name, stored bytes of its weight) of each DiT layer ``--fp8 keep`` keeps as stored:
    ggml blocks (their uint8 bytes), and the fp8 weights inside the blocks (a byte each, plus the fp32
    scale the layer keeps: one value, or one per row); sorted by name."""
    from mochi.memory.estimate import quantized_linear_bytes
    from mochi.weights.dit import genmo_kinds, genmo_shapes
    from mochi.weights.formats import FP8_HEADER_DTYPES, component_keys
    from mochi.weights.fp8 import QUANT_SUFFIXES
    from mochi.weights.ggml import block_kinds

    header = component_keys(det, "dit")
    kinds = block_kinds(header)
    if kinds:
        shapes = genmo_shapes(det)
        if det.layouts["dit"] == "diffusers":
            kinds = genmo_kinds(kinds, shapes)
        return tuple(
            sorted(
                (layer, quantized_linear_bytes(kind.lower(), *shapes[layer + ".weight"], torch.uint8))
                for layer, kind in kinds.items()
            )
        )
    out = []
    for key, (dtype, shape) in header.items():
        if key.startswith("blocks.") and key.endswith(".weight") and dtype in FP8_HEADER_DTYPES:
            layer = key.removesuffix(".weight")
            scales = [header[layer + s][1] for s in QUANT_SUFFIXES[:2] if layer + s in header]
            out.append((layer, math.prod(shape) + 4 * math.prod(scales[0] if scales else ())))
    return tuple(sorted(out))


def stored_dit(model: str | os.PathLike | None, variant: str | None = None, fp8: str = "keep") -> StoredDiT:
    """The DiT of ``model`` (a checkpoint or bundle; None: the embedded model) as it will load with
    ``--fp8 fp8``, from headers and configs only. Raises what reading the headers raises."""
    from mochi.weights.bundle import PARTS, bundle_config, embedded_path, is_bundle
    from mochi.weights.bundle_config import part_config
    from mochi.weights.dit import genmo_shapes, infer_config
    from mochi.weights.formats import detect

    if model is None:
        model = embedded_path()
        if not model.is_file():  # the mochi-tiny preset with random weights is loaded instead
            from mochi.presets import model_preset

            return StoredDiT(model_preset("mochi-tiny").dit)
    if is_bundle(model):  # a bundle stores every part full width
        where = f"bundle {os.fspath(model)!r}"
        return StoredDiT(part_config(PARTS["dit"][1], bundle_config(model)["dit"], where, 10**9))
    det = detect(model, variant=variant)
    config = infer_config(genmo_shapes(det))
    quant = det.quant.get("dit")
    if fp8 == "dequantize" or quant is None:
        return StoredDiT(config)
    return StoredDiT(config, stored_mode(quant), kept_layers(det))
