"""Reading and writing tensor files, and strict loading into modules built on the meta device.

Only safetensors is read directly; ``.pt``/``.bin``/``.pth`` go through ``torch.load(weights_only=True)``,
which never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import struct
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mochi.errors import MochiError, listing, one_line
from mochi.files import atomic_path, safetensors_in

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class WeightsError(MochiError, ValueError):
    """A checkpoint does not fit the model or cannot be read: names the file, keys, shapes or format."""


def check_regular(path: str | os.PathLike) -> None:
    """WeightsError for a path that exists but is neither a file nor a folder: a device, a socket, or a pipe
    (``<(curl …)`` is one). safetensors memory-maps its file and said only "No such device (os error 19)",
    opening a named pipe waited for a writer (deaf to Ctrl-C and SIGTERM), and /dev/zero was read without
    end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the reader says so, naming it
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise WeightsError(
            f"{os.fspath(path)!r} is not a regular file (a device, pipe or socket); weights are read from a "
            "file: save them to one first"
        )


def open_safetensors(file: str | os.PathLike, device: str | torch.device = "cpu"):  # noqa: ANN201 - safe_open
    """``safe_open`` with a damaged, truncated or foreign file reported as a WeightsError naming it."""
    check_regular(file)
    try:
        return safe_open(os.fspath(file), framework="pt", device=str(device))
    except SafetensorError as e:
        raise WeightsError(
            f"{os.fspath(file)!r} is not a readable safetensors file ({one_line(e)}): it is damaged, "
            "truncated or of another format; write or download it again"
        ) from None


def torch_load(path: str | os.PathLike, device: str | torch.device = "cpu", mmap: bool = True):  # noqa: ANN201
    """``torch.load(weights_only=True)`` of a zip-format PyTorch file; anything else is a WeightsError.

    Never unpickles arbitrary objects: a file that needs that is refused, with no advice to allow it.
    """
    name = os.fspath(path)
    check_regular(name)
    if not zipfile.is_zipfile(name):
        raise WeightsError(
            f"{name!r} is not a zip-format PyTorch file: it is truncated, in the legacy torch.save format "
            "(before PyTorch 1.6, not supported) or not a PyTorch file at all. Convert a legacy file you "
            "trust to safetensors with "
            '`python -c "import torch, safetensors.torch as st; '
            f"st.save_file(torch.load('{name}', weights_only=True), 'converted.safetensors')\"`"
        )
    try:
        return torch.load(name, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it names {found.group(1)}" if found else one_line(str(e).split("\n\n")[0])[:120]
        raise WeightsError(
            f"{name!r} holds Python objects other than tensors and plain values ({what}); mochi loads "
            "weights only, never arbitrary pickles. Save its tensors as safetensors (or a plain state dict) "
            "where the file's origin is trusted"
        ) from None
    except (RuntimeError, EOFError) as e:  # a truncated or damaged zip archive
        raise WeightsError(f"{name!r} is damaged or truncated ({one_line(e)[:200]})") from None


def _shard_files(path: Path) -> list[Path]:
    """The files a checkpoint path stands for: one file, an index's shards, or a folder's shards."""
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            return _shard_files(indexes[0])
        files = safetensors_in(path)
        if not files:
            raise WeightsError(f"no .safetensors files in folder {str(path)!r}")
        return files
    if path.name.endswith(".index.json"):
        return list(index_shards(path))
    return [path]


def index_shards(index: Path) -> tuple[Path, ...]:
    """The shard files a safetensors ``*.index.json`` names (its ``weight_map`` values), each once, sorted.

    WeightsError naming the index when it is not JSON or its ``weight_map`` is not an object mapping tensor
    names to shard file names.
    """
    what = f"{str(index)!r} is not a safetensors index with a weight_map"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WeightsError(f"{what} ({one_line(e)[:200]})") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise WeightsError(f"{what} (no weight_map in its top level)")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise WeightsError(
            f"{what}: weight_map must be an object mapping tensor names to shard file names, "
            f"got {type(weight_map).__name__}"
        )
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise WeightsError(
            f"{what}: weight_map[{bad[0]!r}] is {json.dumps(bad[1])[:60]}; every value must be the file name "
            "of a .safetensors shard beside the index"
        )
    return tuple(index.parent / n for n in sorted(set(weight_map.values())))


def read_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: safetensors file, sharded index, folder, or weights-only torch file.

    Tensors keep the dtype they were stored in (fp8 included).
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix in TORCH_SUFFIXES:
        sd = torch_load(path, device)
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = [
                k
                for k, v in (sd.items() if isinstance(sd, Mapping) else ())
                if isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values())
            ]
            hint = (
                f"; its tensors are under {inner[0]!r} (a training checkpoint): save that mapping alone: "
                f"torch.save(torch.load(path, weights_only=True)[{inner[0]!r}], 'weights.pt')"
                if inner
                else ""
            )
            raise WeightsError(f"{str(path)!r} does not hold a flat mapping of tensor names to tensors{hint}")
        if odd := [k for k in sd if not isinstance(k, str)]:
            raise WeightsError(
                f"{str(path)!r} does not hold a flat mapping of tensor names to tensors: key {odd[0]!r} is "
                f"{type(odd[0]).__name__}, not a string name"
            )
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, Path] = {}
    for file in _shard_files(path):
        with open_safetensors(file, device) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                check_once(key, file, seen)
                out[key] = f.get_tensor(key)
    return out


def check_once(key: str, file: Path, seen: dict[str, Path]) -> None:
    """WeightsError when ``key`` was already read from another shard (recorded in ``seen``): the last shard
    read won silently, whatever the index said."""
    if key in seen and seen[key] != file:
        raise WeightsError(
            f"tensor {key!r} is stored in two shards, {seen[key].name} and {file.name}; a checkpoint holds "
            "each tensor once: remove the stale shard or write the checkpoint again"
        )
    seen[key] = file


def iter_safetensors(
    files: Iterable[Path], prefix: str = "", device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of every key under ``prefix`` in safetensors ``files``, the file opened per tensor.

    safetensors hands tensors out as views of a memory map of the file, and the pages touched through one
    open file stay resident until it is closed: a reader that converts or quantizes each tensor as it
    arrives would still end up holding the whole file. Opened per tensor, only what the caller keeps stays.
    """
    seen: dict[str, Path] = {}
    for file in files:
        with open_safetensors(file) as f:
            keys = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118
        for key in keys:
            check_once(key, file, seen)
            with open_safetensors(file, device) as f:
                yield key, f.get_tensor(key)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (the first shard's, for a sharded checkpoint)."""
    path = Path(path)
    if path.suffix in TORCH_SUFFIXES:
        return {}
    with open_safetensors(_shard_files(path)[0]) as f:
        return dict(f.metadata() or {})


def read_keys(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key → (dtype name, shape) without reading tensor data (safetensors only)."""
    out = {}
    for file in _shard_files(Path(path)):
        with open_safetensors(file) as f:
            for key in f.keys():  # noqa: SIM118
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (temporary file, then rename). Tensors are made contiguous, and
    the header's metadata is written in sorted key order, so that equal inputs give equal bytes. Tensors
    that share memory (tied weights) are written once each, as copies: safetensors refuses shared ones."""
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        v = v.detach().contiguous()
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
        if metadata and len(metadata) > 1:
            _sort_metadata(Path(tmp))


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted. safetensors (0.8) passes the
    metadata through a hash map, so their order, and the file's bytes, changed from one process to the next.
    The header keeps its length (the same JSON, reordered), so only it is rewritten."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # another escaping than serde_json's: keep the file valid as written
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def json_object(text: str | bytes, where: str) -> dict:
    """``text`` parsed as a JSON object; a WeightsError naming ``where`` (the file and field) otherwise."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{where} is not valid JSON ({e}); it must be a JSON object {{...}}") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{where} holds {json.dumps(value)[:40]}, not a JSON object {{...}}")
    return value


def quantization_layers(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Layer → quantization format named by ComfyUI's ``_quantization_metadata`` header entry
    (``{"layers": {name: "float8_e4m3fn" | {"format": ...}}}``); {} without one. WeightsError if malformed."""
    if not metadata or "_quantization_metadata" not in metadata:
        return {}
    where = "metadata '_quantization_metadata'"
    layers = json_object(metadata["_quantization_metadata"], where).get("layers", {})
    if not isinstance(layers, dict):
        raise WeightsError(
            f"{where} field 'layers' is {json.dumps(layers)[:40]}, not a JSON object of layers"
        )
    formats = {}
    for name, conf in layers.items():
        fmt = conf.get("format") if isinstance(conf, dict) else conf
        if not isinstance(fmt, str):
            raise WeightsError(f"{where}: layer {name!r} has format {json.dumps(conf)[:40]}; expected a name")
        formats[name] = fmt
    return formats


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point  # complex weights are not weights (their imaginary part would be dropped)


def not_floating_point(found: list[str]) -> str:
    """The problem of tensors stored as integers where weights belong (``found``: "key is dtype" each)."""
    rule = "weights must be floating point: float32, bfloat16, float16 or fp8"
    return f"{len(found)} not floating point: {'; '.join(found[:8])} ({rule})"


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]],
    state_dict: Mapping[str, torch.Tensor],
    fmt: str,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> None:
    """Raise WeightsError unless ``state_dict`` has exactly the expected keys and shapes, and (given the
    model's ``dtypes``) a floating-point tensor wherever the model has one: fp8 counts, integers do not
    (a block-quantized layer's uint8 blocks are expected as uint8 by the model)."""
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(expected.keys() & state_dict.keys())
        if tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    not_float = [
        f"{k} is {str(state_dict[k].dtype).removeprefix('torch.')}"
        for k in sorted((dtypes or {}).keys() & state_dict.keys())
        if _is_float(dtypes[k]) and not _is_float(state_dict[k].dtype)
    ]
    # Quantized blocks are bytes: a wider integer tensor of the right shape would be misread at use.
    not_bytes = [
        f"{k} is {str(state_dict[k].dtype).removeprefix('torch.')}"
        for k in sorted((dtypes or {}).keys() & state_dict.keys())
        if dtypes[k] == torch.uint8 and state_dict[k].dtype not in (torch.uint8, torch.int8)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped: " + "; ".join(wrong[:8]))
    if not_float:
        problems.append(not_floating_point(not_float))
    if not_bytes:
        problems.append(
            f"{len(not_bytes)} not bytes: {'; '.join(not_bytes[:8])} (quantized blocks are uint8)"
        )
    if problems:
        raise WeightsError(
            f"checkpoint (detected format: {fmt}) does not fit the model: " + " | ".join(problems)
        )


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], fmt: str) -> torch.nn.Module:
    """Load ``state_dict`` into ``module`` (typically built on the meta device) without a second copy.

    Every key must be present with the right shape, and every value finite (NonFiniteError). Tensors are
    assigned, not copied, so they keep their stored dtype; callers cast afterwards where they need to.
    """
    from mochi.finite import check_finite

    model = module.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in model.items()}
    check_state_dict(expected, state_dict, fmt, {k: v.dtype for k, v in model.items()})
    check_finite(state_dict, f"checkpoint (detected format: {fmt})")
    module.load_state_dict(dict(state_dict), strict=True, assign=True)
    return module
