"""Where each of the DiT's tensors, under Genmo's names, lies in its safetensors files: row ranges.

A Genmo tensor is the concatenation along dim 0 of `Part`s of stored tensors: the tensor itself in Genmo's
naming; in diffusers' naming what the key map's rule says (``split``: q, k, v one after the other;
``swap``: the second half, then the first; `mochi.weights.keymaps.dit_diffusers`). With that, a reader builds
any Genmo tensor, or any range of its rows (a rank's FSDP shard), touching only the bytes it needs:

* `iter_genmo`: every tensor whole, one at a time (quantization at load: each layer quantized as it
  arrives, so the full-width model never exists);
* `read_rows`: rows [start, end) of one tensor (`mochi.parallel.sharded_load`).

Each read opens its file for that read only. safetensors hands tensors out as views of one memory map of
the file, and every page touched through it stays resident while the file is open: reading a whole model
through one open file holds the whole checkpoint in the resident set until the end, whatever the reader
keeps. Opened per tensor, a page is resident only while something holds the tensor it belongs to.
ggml-block (GGUF) files, torch pickles and fp8 files in diffusers' naming are not covered (`streamable`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mochi.weights.formats import Detected
from mochi.weights.io import WeightsError, open_safetensors


@dataclass(frozen=True)
class Part:
    """Rows [start, start + rows) of tensor ``key`` of ``file`` (rows None: the whole tensor, e.g. 0-d)."""

    file: Path
    key: str
    start: int = 0
    rows: int | None = None


def streamable(det: Detected) -> bool:
    """Whether the DiT of ``det`` can be read through `dit_sources`: safetensors files holding no ggml
    blocks, and no fp8 scales in diffusers' naming."""
    if "dit" not in det.files or not all(f.suffix == ".safetensors" for f in det.files["dit"]):
        return False
    quant = det.quant.get("dit", "")
    return not quant.startswith("gguf") and not (quant and det.layouts["dit"] == "diffusers")


def dit_sources(det: Detected) -> tuple[dict[str, tuple[Part, ...]], dict[str, tuple[int, ...]]]:
    """(Genmo key → its parts, Genmo key → shape), from the headers only. In Genmo's naming every stored
    key of the component appears (fp8 bookkeeping too, under its own name); in diffusers' naming the key
    map's outputs. Raises WeightsError when the diffusers key set does not match the map."""
    if not streamable(det):
        raise WeightsError(f"the DiT of {det.describe()} cannot be read tensor by tensor")
    prefix = det.prefixes["dit"]
    stored: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in det.files["dit"]:
        with open_safetensors(file) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if key.startswith(prefix):
                    stored[key[len(prefix) :]] = (file, tuple(f.get_slice(key).get_shape()))
    if det.layouts["dit"] != "diffusers":
        parts = {k: (Part(file, prefix + k),) for k, (file, _) in stored.items()}
        return parts, {k: shape for k, (_, shape) in stored.items()}
    from mochi.weights.keymaps.dit_diffusers import rules

    depth = 1 + max(
        (int(m[1]) for k in stored if (m := re.match(r"transformer_blocks\.(\d+)\.", k))), default=-1
    )
    table = rules(depth)
    wanted = {d for r in table for d in r.diffusers}
    missing, unexpected = sorted(wanted - stored.keys()), sorted(stored.keys() - wanted)
    if missing or unexpected:
        raise WeightsError(
            f"checkpoint (detected format: {det.describe()}): not a diffusers-format Mochi DiT: "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    parts, shapes = {}, {}
    for r in table:
        (file, shape), *_ = [stored[d] for d in r.diffusers]
        if r.op == "split":
            parts[r.genmo] = tuple(Part(stored[d][0], prefix + d, 0, shape[0]) for d in r.diffusers)
            shapes[r.genmo] = (3 * shape[0], *shape[1:])
        elif r.op == "swap":
            half = shape[0] // 2
            key = prefix + r.diffusers[0]
            parts[r.genmo] = (Part(file, key, half, shape[0] - half), Part(file, key, 0, half))
            shapes[r.genmo] = shape
        else:
            parts[r.genmo] = (Part(file, prefix + r.diffusers[0]),)
            shapes[r.genmo] = shape
    return parts, shapes


def read_rows(
    parts: tuple[Part, ...],
    start: int | None = None,
    end: int | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Rows [start, end) of the tensor made of ``parts`` (None, None: all of it), reading only those rows."""
    if len(parts) == 1 and parts[0].rows is None and start is None:
        with open_safetensors(parts[0].file, device) as f:
            return f.get_tensor(parts[0].key)
    pieces, offset = [], 0
    for p in parts:
        with open_safetensors(p.file, device) as f:
            sl = f.get_slice(p.key)
            rows = p.rows if p.rows is not None else sl.get_shape()[0]
            lo = 0 if start is None else max(start - offset, 0)
            hi = rows if end is None else min(end - offset, rows)
            if hi > lo or (not pieces and p is parts[-1]):
                pieces.append(sl[p.start + lo : p.start + max(hi, lo)])
        offset += rows
    if len(pieces) > 1:
        return torch.cat(pieces)
    # A slice may be a view of its whole tensor's mapped bytes, all of which reading touched: a copy of its
    # own lets those pages go (a rank keeps 1/world of the file resident, not all of it).
    t = pieces[0]
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def iter_genmo(det: Detected, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(Genmo key, tensor in its stored dtype) of every DiT tensor, one at a time (see the module doc)."""
    parts, _ = dit_sources(det)
    for key, p in parts.items():
        yield key, read_rows(p, device=device)
