""".gguf files (llama.cpp's container, used by ComfyUI-GGUF) read with the ``gguf`` package.

A DiT in a ``.gguf`` file is recognised when its tensor names are Genmo's (``blocks.0.attn.qkv_x.weight``)
or diffusers' (``transformer_blocks.0.attn1.to_q.weight``), with or without a prefix. Tensors are presented
exactly as Kijai's GGUF-in-safetensors files present them, so one code path loads both: a Q8_0/Q4_0
matrix ``<layer>.weight`` becomes ``<layer>.Q8_0_qweight``, its row-major ggml blocks as a uint8
(out, in/32·bytes-per-block) tensor (gguf lists shapes fastest axis first; rows here are the weight's
output rows); F32/F16/BF16 tensors keep their dtype. A block type mochi cannot run (Q5_K, IQ4_XS …)
appears as ``<layer>.<TYPE>_qweight`` and is refused, naming the type, when the model is loaded.

`read_gguf_rows` reads rows [start, end) of one tensor with plain file reads at offsets taken from the
header (parsed once per file): a rank under torchrun reads its FSDP2 rows and nothing else, and no memory
map keeps the pages it touched resident. `iter_gguf` reads each tensor the same way. Only the parsed header
is cached, never the ``gguf`` reader: its memory map of the whole file (and an open descriptor) would stay
as long as the cache holds it, after the model is gone (a 602 MB file kept 602 MB resident).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mochi.weights import ggml
from mochi.weights.io import WeightsError

_PLAIN = {"F32": ("F32", torch.float32), "F16": ("F16", torch.float16), "BF16": ("BF16", torch.bfloat16)}


class _Tensor(NamedTuple):
    """One tensor of a .gguf header, as the ``gguf`` reader parsed it, without its view into the file."""

    name: str
    kind: str  # the ggml type's name: F32, F16, BF16, Q8_0, ...
    shape: tuple[int, ...]  # as gguf lists it, fastest axis first
    offset: int  # bytes from the start of the file
    nbytes: int
    dtype: np.dtype  # how the reader presents the data (uint8 for block types), byte order included
    data_shape: tuple[int, ...]


class _Header(NamedTuple):
    tensors: tuple[_Tensor, ...]
    little_endian: bool


def _reader(path: Path) -> _Header:
    """The file's parsed header: parsed once per file version, however many of `gguf_header`, `iter_gguf`,
    `little_endian` and `read_gguf_rows` a load calls."""
    stat = Path(path).stat()
    return _parsed(Path(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parsed(path: Path, _mtime_ns: int, _size: int) -> _Header:
    try:
        from gguf import GGUFEndian, GGUFReader
    except ImportError:
        raise WeightsError(
            f"reading {str(path)!r} needs the gguf package: pip install 'mochi-video[gguf]'"
        ) from None
    problem = _layout_problem(path)
    if problem is not None:
        raise WeightsError(f"{str(path)!r} is not a readable .gguf file ({problem})")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors of its own for a damaged file
        raise WeightsError(f"{str(path)!r} is not a readable .gguf file ({e})") from None
    tensors = tuple(
        _Tensor(
            t.name,
            t.tensor_type.name,
            tuple(int(n) for n in t.shape),
            int(t.data_offset),
            int(t.n_bytes),
            t.data.dtype,
            tuple(t.data.shape),
        )
        for t in reader.tensors
    )
    return _Header(tensors, reader.endianess == GGUFEndian.LITTLE)


# Bytes of each GGUF metadata value type (gguf's GGUFValueType): 8 string, 9 array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_DIMS = 8


def _layout_problem(path: Path) -> str | None:
    """Why the header of a .gguf file cannot be what it claims, or None. Every count and length is checked
    against the bytes left before it is used: the ``gguf`` reader loops over a claimed count even past the
    end of the file (113 bytes claiming an array of 2**62 elements grew without bound)."""
    import mmap
    import struct

    with open(path, "rb") as f:
        size = path.stat().st_size
        if size < 24:
            return f"{size} bytes, fewer than a GGUF header's 24"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                return "it does not start with the GGUF magic"
            tensors, kvs = struct.unpack_from("<QQ", data, 8)
            pos = 24
            infos: list[tuple[tuple[int, ...], int, int]] = []  # each tensor's shape, type, data offset

            def take(n: int, what: str) -> int:
                nonlocal pos
                if n < 0 or n > size - pos:
                    raise ValueError(f"{what} needs {n} bytes at offset {pos}, past the file's {size}")
                pos += n
                return pos - n

            def value(kind: int, depth: int = 0) -> None:
                if kind in _SCALAR_BYTES:
                    take(_SCALAR_BYTES[kind], "a value")
                elif kind == 8:
                    take(struct.unpack_from("<Q", data, take(8, "a string's length"))[0], "a string")
                elif kind == 9 and depth < 4:
                    inner = struct.unpack_from("<I", data, take(4, "an array's type"))[0]
                    count = struct.unpack_from("<Q", data, take(8, "an array's length"))[0]
                    if inner in _SCALAR_BYTES:
                        take(count * _SCALAR_BYTES[inner], f"an array of {count} values")
                        return
                    if count > (size - pos) // 8:  # every string or array takes at least 8 bytes
                        raise ValueError(f"an array claims {count} entries, more than the file can hold")
                    for _ in range(count):
                        value(inner, depth + 1)
                else:
                    raise ValueError(f"metadata value type {kind} is not one GGUF defines")

            try:
                if tensors > size // 24 or kvs > size // 12:  # the least bytes of a tensor / a value entry
                    claims = f"it claims {tensors} tensors and {kvs} metadata entries"
                    return f"{claims}: more than {size} bytes hold"
                alignment = 32  # GGUF's default, unless general.alignment (a uint32) says otherwise
                for _ in range(kvs):
                    length = struct.unpack_from("<Q", data, take(8, "a key's length"))[0]
                    key = data[take(length, "a key") : pos]
                    kind = struct.unpack_from("<I", data, take(4, "a value's type"))[0]
                    if key == b"general.alignment" and kind == 4:
                        alignment = struct.unpack_from("<I", data, pos)[0] or 32
                    value(kind)
                for _ in range(tensors):
                    take(
                        struct.unpack_from("<Q", data, take(8, "a tensor name's length"))[0], "a tensor name"
                    )
                    dims = struct.unpack_from("<I", data, take(4, "a tensor's rank"))[0]
                    if dims > _MAX_DIMS:
                        return f"a tensor claims {dims} dimensions (GGUF allows {_MAX_DIMS})"
                    at = take(8 * dims + 12, "a tensor's shape, type and offset")
                    shape = struct.unpack_from(f"<{dims}Q", data, at)
                    kind, offset = struct.unpack_from("<IQ", data, at + 8 * dims)
                    infos.append((shape, kind, offset))
            except (ValueError, struct.error) as e:
                return str(e)
            return _data_problem(pos, size, infos, alignment)
    return None


def _data_problem(end_of_infos: int, size: int, infos: list, alignment: int) -> str | None:
    """Why the tensors' data cannot lie in a file of ``size`` bytes, or None: a file cut short in its data
    failed in the reader with numpy's "cannot reshape array of size 1328 into shape (32,85)"."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    start = -(-end_of_infos // alignment) * alignment
    for shape, kind, offset in infos:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (KeyError, ValueError):
            continue  # a type this gguf does not know: its reader names it
        count = 1
        for n in shape:
            count *= n
        end = start + offset + count // block * block_bytes
        if end > size:
            return (
                f"a tensor's data ends at byte {end}, past the file's {size}: the file is cut short (a "
                "download or copy that did not finish)"
            )
    return None


def _entries(path: Path) -> Iterator[tuple[str, str, tuple[int, ...], object]]:
    """(key as presented, dtype name, shape as presented, its header entry) for every tensor."""
    for t in _reader(path).tensors:
        kind = t.kind
        logical = tuple(reversed(t.shape))
        if kind in _PLAIN:
            yield t.name, _PLAIN[kind][0], logical, t
        elif len(logical) == 2 and t.name.endswith(".weight"):
            yield f"{t.name.removesuffix('.weight')}.{kind}_qweight", "U8", t.data_shape, t
        elif kind in ggml.BLOCK_BYTES:
            yield t.name, "F32", logical, t  # a quantized non-matrix: widened to fp32 when read
        else:
            yield f"{t.name}.{kind}_qweight", "U8", t.data_shape, t


def gguf_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key → (safetensors-style dtype name, shape) of every tensor, as `iter_gguf` yields them."""
    return {key: (dtype, shape) for key, dtype, shape, _ in _entries(path)}


def iter_gguf(path: Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time, each read from the file by its offset (see the module doc)."""
    for key, dtype, shape, t in _entries(path):
        data = _read_bytes(path, t.offset, t.nbytes, t.name).numpy().view(t.dtype).reshape(t.data_shape)
        if dtype in ("F32", "F16", "BF16") and t.kind in _PLAIN:
            target = _PLAIN[t.kind][1]
            raw = torch.from_numpy(data)
            # gguf hands BF16 data over as raw 16-bit words: reinterpret them.
            tensor = raw if raw.dtype == target else raw.view(torch.int16).view(target)
            tensor = tensor.reshape(shape)
        elif dtype == "F32":
            q = torch.from_numpy(data).reshape(1, -1)
            tensor = ggml.dequantize(q, t.kind).reshape(shape)
        else:
            tensor = torch.from_numpy(data).reshape(shape)
        yield key, tensor.to(device)


@dataclass(frozen=True)
class _Stored:
    """Where a presented tensor's bytes lie: ``nbytes`` of row-major data from ``offset``, rows along dim 0
    of the presented ``shape``, read as ``dtype``; ``widen``: a quantized non-matrix, whose rows are not
    whole blocks (read whole and dequantized)."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    widen: bool


@functools.lru_cache(maxsize=4)
def _index(path: Path, _mtime_ns: int) -> dict[str, _Stored]:
    index = {}
    for key, dtype, shape, t in _entries(path):
        target = _PLAIN[t.kind][1] if t.kind in _PLAIN else torch.uint8
        index[key] = _Stored(
            t.offset, t.nbytes, shape, target, t.kind, dtype == "F32" and target == torch.uint8
        )
    return index


def little_endian(path: Path) -> bool:
    """Whether ``path``'s data is little-endian (the usual case), as `read_gguf_rows` needs."""
    return _reader(path).little_endian


def read_gguf_rows(path: Path, key: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
    """Rows [start, end) (None, None: all) of the tensor ``key`` as `iter_gguf` presents it, reading only
    their bytes (a little-endian file: `little_endian`)."""
    e = _index(path, path.stat().st_mtime_ns)[key]
    if e.widen:  # a small quantized vector: its rows are not whole blocks
        whole = _read_bytes(path, e.offset, e.nbytes, key)
        t = ggml.dequantize(whole.reshape(1, -1), e.kind).reshape(e.shape)
        return t if start is None else t[start:end].clone()
    rows = e.shape[0] if e.shape else 1
    row_bytes = e.nbytes // rows
    lo, hi = (0, rows) if start is None else (start, end)
    out = _read_bytes(path, e.offset + lo * row_bytes, (hi - lo) * row_bytes, key)
    shape = (hi - lo, *e.shape[1:]) if e.shape else ()
    assert math.prod(shape) * e.dtype.itemsize == out.numel(), (key, shape)
    return out.view(e.dtype).reshape(shape)


def _read_bytes(path: Path, offset: int, n: int, key: str) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(out.numpy()) != n:
            raise WeightsError(f"{str(path)!r} is truncated: tensor {key!r} runs past its end")
    return out
