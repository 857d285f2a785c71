"""What a checkpoint holds: format, components, dtypes, parameters, the DiT's config (headers only)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from mochi.weights.formats import COMPONENTS, component_keys, detect, quant_label
from mochi.weights.fp8 import QUANT_SUFFIXES
from mochi.weights.ggml import BLOCK_BYTES, QWEIGHT, weight_shape

_ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I64": 8, "I32": 4}


def checkpoint_info(path: str | os.PathLike, *, variant: str | None = None) -> dict[str, Any]:
    """A JSON-ready summary of a checkpoint, read from headers only.

    Keys: path, format, description, components (name → prefix, layout, quant, files, tensors,
    parameters, bytes, dtypes {dtype: parameters}), and for a DiT: dit_config (the inferred `DiTConfig`
    as a dict), dit_preset (the name of the preset it equals, or None).
    """
    det = detect(path, variant=variant)
    out: dict[str, Any] = {"path": str(path), "format": det.format, "description": det.describe()}
    components = {}
    for comp in COMPONENTS:
        if comp not in det.files:
            continue
        keys = component_keys(det, comp)
        tensors = {k: v for k, v in keys.items() if k != "scaled_fp8" and not k.endswith(QUANT_SUFFIXES)}
        dtypes: dict[str, int] = {}
        for key, (dtype, shape) in tensors.items():
            if m := QWEIGHT.match(key):  # ggml blocks: count the weights they hold, under their block type
                dtype, shape = (
                    m["kind"],
                    weight_shape(shape, m["kind"]) if m["kind"] in BLOCK_BYTES else shape,
                )
            dtypes[dtype] = dtypes.get(dtype, 0) + torch.Size(shape).numel()
        components[comp] = {
            "prefix": det.prefixes[comp],
            "layout": det.layouts[comp],
            "quant": det.quant.get(comp),
            "files": [str(f) for f in det.files[comp]],
            "tensors": len(tensors),
            "parameters": sum(dtypes.values()),
            "bytes": sum(torch.Size(s).numel() * _ITEM_BYTES.get(d, 4) for d, s in keys.values()),
            "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])),
        }
    out["components"] = components
    if "dit" in det.files:
        from mochi.models.dit import DIT_PRESETS
        from mochi.weights.dit import genmo_shapes, infer_config

        config = infer_config(genmo_shapes(det))
        out["dit_config"] = dataclasses.asdict(config)
        out["dit_preset"] = next((name for name, c in DIT_PRESETS.items() if c == config), None)
    return out


def format_info(info: dict[str, Any]) -> str:
    """The summary as aligned, human-readable lines."""
    lines = [f"checkpoint  {info['path']}", f"format      {info['description']}"]
    for comp, c in info["components"].items():
        dtypes = ", ".join(f"{d} {n:,}" for d, n in c["dtypes"].items())
        prefix = f", prefix {c['prefix']!r}" if c["prefix"] else ""
        quant = f", {quant_label(c['quant'])}" if c["quant"] else ""
        lines.append(
            f"{comp:<11} {c['parameters']:,} parameters in {c['tensors']} tensors, "
            f"{_size(c['bytes'])} "
            f"({dtypes}); {c['layout']} names{prefix}{quant}; {len(c['files'])} file(s)"
        )
    if "dit_config" in info:
        preset = info["dit_preset"] or "no preset"
        fields = ", ".join(f"{k}={v}" for k, v in info["dit_config"].items())
        lines.append(f"dit config  ({preset}) {fields}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
