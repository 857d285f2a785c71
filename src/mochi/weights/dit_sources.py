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
`streamable` files (safetensors, no ggml blocks, no fp8 in diffusers' naming) are read this way whole
(`iter_genmo`); rows are read from those and from ggml-block files too (`rows_readable`): Kijai's GGUF-in-
safetensors files and little-endian ``.gguf`` files, whose ``<layer>.<TYPE>_qweight`` rows are whole output
channels of whole blocks (read from a ``.gguf`` file by offset: `mochi.weights.gguf_file.read_gguf_rows`).
Torch pickles and fp8 files in diffusers' naming are not covered.
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


def rows_readable(det: Detected) -> bool:
    """Whether rows of the DiT's tensors of ``det`` can be read (`read_rows`): `streamable` files, and
    ggml-block files (GGUF-in-safetensors, little-endian ``.gguf``) in Genmo's or diffusers' naming."""
    if streamable(det):
        return True
    files = det.files.get("dit", ())
    if not det.quant.get("dit", "").startswith("gguf") or not files:
        return False
    from mochi.weights.gguf_file import little_endian

    return all(f.suffix == ".safetensors" or (f.suffix == ".gguf" and little_endian(f)) for f in files)


def _stored_shapes(file: Path, prefix: str) -> dict[str, tuple[int, ...]]:
    """Stored key (prefix removed) → shape of the tensors of ``file`` under ``prefix``, from its header."""
    if file.suffix == ".gguf":
        from mochi.weights.gguf_file import gguf_header

        header = {k: shape for k, (_, shape) in gguf_header(file).items()}
    else:
        with open_safetensors(file) as f:
            header = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    return {k[len(prefix) :]: shape for k, shape in header.items() if k.startswith(prefix)}


def dit_sources(det: Detected) -> tuple[dict[str, tuple[Part, ...]], dict[str, tuple[int, ...]]]:
    """(Genmo key → its parts, Genmo key → shape), from the headers only. In Genmo's naming every stored
    key of the component appears (fp8 bookkeeping too, under its own name); in diffusers' naming the key
    map's outputs. A weight stored in ggml blocks keeps its ``<layer>.<TYPE>_qweight`` name and byte shape
    (out, in/32·bytes-per-block); a fused one's parts must share the block type. Raises WeightsError when
    the diffusers key set does not match the map."""
    if not rows_readable(det):
        raise WeightsError(f"the DiT of {det.describe()} cannot be read tensor by tensor")
    prefix = det.prefixes["dit"]
    stored: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in det.files["dit"]:
        stored.update({k: (file, shape) for k, shape in _stored_shapes(file, prefix).items()})
    if det.layouts["dit"] != "diffusers":
        parts = {k: (Part(file, prefix + k),) for k, (file, _) in stored.items()}
        return parts, {k: shape for k, (_, shape) in stored.items()}
    from mochi.weights.ggml import QWEIGHT
    from mochi.weights.keymaps.dit_diffusers import rules

    # The key map names weights "<layer>.weight": ggml blocks are matched under that name, read under theirs.
    kinds, real = {}, {}
    for key in list(stored):
        if m := QWEIGHT.match(key):
            name = m["layer"] + ".weight"
            kinds[name], real[name], stored[name] = m["kind"], key, stored.pop(key)

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
        genmo, found = r.genmo, {kinds.get(d) for d in r.diffusers}
        if len(found) > 1:
            raise WeightsError(f"{genmo} fuses tensors stored in different block types {found}")
        if (kind := found.pop()) is not None:
            genmo = f"{genmo.removesuffix('.weight')}.{kind}_qweight"
        key = [prefix + real.get(d, d) for d in r.diffusers]
        if r.op == "split":
            parts[genmo] = tuple(Part(stored[d][0], k, 0, shape[0]) for d, k in zip(r.diffusers, key))
            shapes[genmo] = (3 * shape[0], *shape[1:])
        elif r.op == "swap":
            half = shape[0] // 2
            parts[genmo] = (Part(file, key[0], half, shape[0] - half), Part(file, key[0], 0, half))
            shapes[genmo] = shape
        else:
            parts[genmo] = (Part(file, key[0]),)
            shapes[genmo] = shape
    return parts, shapes


def read_rows(
    parts: tuple[Part, ...],
    start: int | None = None,
    end: int | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Rows [start, end) of the tensor made of ``parts`` (None, None: all of it), reading only those rows."""
    if parts[0].file.suffix == ".gguf":
        return _gguf_rows(parts, start, end).to(device)
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


def _gguf_rows(parts: tuple[Part, ...], start: int | None, end: int | None) -> torch.Tensor:
    """`read_rows` of a ``.gguf`` file's parts (one file holds a whole DiT)."""
    from mochi.weights.gguf_file import read_gguf_rows

    if len(parts) == 1 and parts[0].rows is None:
        return read_gguf_rows(parts[0].file, parts[0].key, start, end)
    pieces, offset = [], 0
    for p in parts:
        rows = p.rows
        assert rows is not None, "parts of a fused tensor carry their row counts (dit_sources)"
        lo = 0 if start is None else max(start - offset, 0)
        hi = rows if end is None else min(end - offset, rows)
        if hi > lo or (not pieces and p is parts[-1]):
            pieces.append(read_gguf_rows(p.file, p.key, p.start + lo, p.start + max(hi, lo)))
        offset += rows
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def iter_genmo(det: Detected, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(Genmo key, tensor in its stored dtype) of every DiT tensor, one at a time (see the module doc)."""
    parts, _ = dit_sources(det)
    for key, p in parts.items():
        yield key, read_rows(p, device=device)
