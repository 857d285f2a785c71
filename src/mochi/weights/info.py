"""What a checkpoint holds: format, components, dtypes, parameters, the DiT's config (headers only)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from mochi.weights.formats import COMPONENTS, component_keys, detect, quant_label
from mochi.weights.fp8 import QUANT_SUFFIXES
from mochi.weights.ggml import BLOCK_BYTES, QWEIGHT, weight_shape

# Bytes per element of each safetensors dtype name (torch pickles give torch's names: `_item_bytes`).
_ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


def _item_bytes(name: str) -> int:
    if name in _ITEM_BYTES:
        return _ITEM_BYTES[name]
    dtype = getattr(torch, name, None)
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    raise ValueError(f"dtype {name!r} has no known size: mochi info cannot count its bytes")


def checkpoint_info(path: str | os.PathLike, *, variant: str | None = None) -> dict[str, Any]:
    """A JSON-ready summary of a checkpoint, read from headers only.

    Keys: path, format, description, components (name → prefix, layout, quant, files, tensors,
    parameters, bytes, dtypes {dtype: parameters}), and for a DiT: dit_config (the `DiTConfig` as a dict:
    a bundle's own, otherwise inferred from shapes), dit_preset (the name of the preset it equals, or
    None), dit_problem (why the tensors do not fit that config, e.g. a missing key, or None). A mochi
    bundle has format "mochi-bundle" and a ``bundle`` entry: name, tokenizer, defaults and
    the config of every part, as the bundle's metadata states them.
    """
    from mochi.weights.bundle import is_bundle

    det = detect(path, variant=variant)
    out: dict[str, Any] = {"path": str(path), "format": det.format, "description": det.describe()}
    bundle = _bundle_info(path) if is_bundle(path) else None
    if bundle is not None:
        parts = ", ".join(c for c in COMPONENTS if c in det.files)
        out.update(format="mochi-bundle", description=f"mochi-bundle {bundle['name']!r} ({parts})")
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
            "bytes": sum(torch.Size(s).numel() * _item_bytes(d) for d, s in keys.values()),
            "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])),
        }
    out["components"] = components
    if "dit" in det.files:
        from mochi.models.dit import DIT_PRESETS, DiTConfig
        from mochi.weights.dit import genmo_shapes, infer_config

        # Shapes cannot tell pool_heads (nor mlp_multiple_of from an equivalent ratio): a bundle says them.
        shapes = genmo_shapes(det)
        config = DiTConfig(**bundle["parts"]["dit"]) if bundle else infer_config(shapes)
        out["dit_config"] = dataclasses.asdict(config)
        # Shapes that name a config may still not fit it (a missing or mis-shaped key): no preset then.
        out["dit_problem"] = _fit_problem(shapes, det.describe())
        fits = out["dit_problem"] is None
        out["dit_preset"] = next((name for name, c in DIT_PRESETS.items() if c == config and fits), None)
    if bundle is not None:
        out["bundle"] = bundle
    return out


def _fit_problem(shapes: dict[str, tuple[int, ...]], fmt: str) -> str | None:
    """Why a DiT's (logical, Genmo-named) shapes do not fit the model they describe, or None."""
    from mochi.weights.dit import check_dit_tensors
    from mochi.weights.io import WeightsError

    try:
        check_dit_tensors({k: torch.empty(s, device="meta") for k, s in shapes.items()}, fmt)
    except WeightsError as e:
        return str(e)
    return None


def _bundle_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a bundle's metadata states: name, tokenizer, request defaults and every part's config."""
    from mochi.weights.bundle import bundle_config, part_configs
    from mochi.weights.io import read_keys

    config = bundle_config(path)
    parts = part_configs(path, config, read_keys(path))
    return {
        "name": config.get("name", "custom"),
        "tokenizer": config.get("tokenizer"),
        "defaults": config["defaults"],
        "parts": {name: dataclasses.asdict(c) for name, c in parts.items()},
    }


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
        source = "" if "bundle" in info else ", inferred from shapes"
        lines.append(f"dit config  ({preset}{source}) {fields}")
        if info.get("dit_problem"):
            lines.append(f"dit problem {info['dit_problem']}; it would not load")
    if "bundle" in info:
        b = info["bundle"]
        for part, config in b["parts"].items():
            if part != "dit":
                lines.append(f"{part:<11} config " + ", ".join(f"{k}={_plain(v)}" for k, v in config.items()))
        defaults = ", ".join(f"{k}={v}" for k, v in b["defaults"].items())
        lines.append(f"bundle      tokenizer {b['tokenizer']}; defaults {defaults}")
    return "\n".join(lines)


def _plain(value: object) -> str:
    return "/".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
