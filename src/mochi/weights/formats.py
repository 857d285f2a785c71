"""Which released checkpoint format a path holds, and where each component's tensors are in it.

Detection reads only safetensors headers (key names, dtypes, shapes, metadata), never tensor data. The
result, `Detected`, tells every loader (DiT, VAE, T5) which files hold its component, under which key
prefix, in which key naming ("layout") and with which quantization, so that an all-in-one ComfyUI file is
read once per component without touching the other components' tensors.

Formats recognised (genmo-mochi.md §9, diffusers-mochi.md §2, ecosystem.md §1.2-1.3):
  genmo      a folder with any of ``dit.safetensors``, ``decoder.safetensors``, ``encoder.safetensors``, or
             a bare file with Genmo's unprefixed keys (ComfyUI's VAE file: Genmo's under decoder./encoder.);
  diffusers  a pipeline folder (``transformer/`` and/or ``vae/``, ``text_encoder/``), one model folder
             of it, or a file / index with diffusers' names; sharded (``*.index.json``) and ``bf16``
             variants;
  comfyui    a single file whose DiT keys carry a prefix (``model.diffusion_model.``), optionally all-in-one
             (``vae.``, ``text_encoders.`` tensors) and optionally fp8 (``scaled_fp8`` marker with
             ``scale_weight``, or the newer ``weight_scale`` + ``comfy_quant`` layout);
  gguf       Kijai's GGUF-in-safetensors DiT files (``<layer>.Q8_0_qweight`` / ``.Q4_0_qweight`` uint8 ggml
             blocks, the rest under Genmo's names; `mochi.weights.ggml`), and ``.gguf`` files whose tensors
             carry Genmo's or diffusers' names (read with the ``gguf`` package; `mochi.weights.gguf_file`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mochi.errors import listing
from mochi.files import safetensors_in
from mochi.weights.ggml import QWEIGHT
from mochi.weights.io import (
    TORCH_SUFFIXES,
    WeightsError,
    check_once,
    check_regular,
    index_shards,
    open_safetensors,
    quantization_layers,
    read_state_dict,
)

COMPONENTS = ("dit", "vae_decoder", "vae_encoder", "t5")
FP8_HEADER_DTYPES = ("F8_E4M3", "F8_E5M2")

LOOKED_FOR = (
    "looked for: a Genmo folder (dit.safetensors, decoder.safetensors, encoder.safetensors: any of them); a "
    "diffusers folder (transformer/ and/or vae/ with diffusion_pytorch_model*.safetensors [+ *.index.json, "
    "bf16 variant]); a "
    ".safetensors file or *.index.json with Genmo, diffusers or ComfyUI keys (model.diffusion_model. prefix, "
    "all-in-one with vae./text_encoders., fp8_scaled, GGUF Q8_0/Q4_0 blocks); a .gguf file; or a "
    "weights-only .pt/.bin file"
)

# A key that only this component has, in each naming; the text before it is the component's prefix.
_DIT_GENMO = "t5_yproj.weight"
_DIT_DIFFUSERS = "time_embed.caption_proj.weight"
_T5 = "encoder.block.0.layer.0.SelfAttention.q.weight"
VAE_GROUPS = ("vae.", "first_stage_model.")
# Genmo's own file names, one component each.
GENMO_FILES = {
    "dit": "dit.safetensors",
    "vae_decoder": "decoder.safetensors",
    "vae_encoder": "encoder.safetensors",
}
_SHARD = re.compile(r"^(?P<stem>.+?)(?:\.(?P<variant>[A-Za-z0-9_]+))?-\d{5}-of-\d{5}\.safetensors$")


@dataclass(frozen=True)
class Detected:
    """What a checkpoint path holds.

    format:   "genmo" | "diffusers" | "comfyui" | "gguf" (how the checkpoint is packaged and named).
    path:     the path that was given.
    files:    component → the files holding its tensors (shards in order). Components: "dit",
              "vae_decoder", "vae_encoder", "t5"; only those present appear.
    prefixes: component → the key prefix its tensors carry in those files ("" for none).
    layouts:  component → key naming: "genmo" or "diffusers" (DiT, VAE), "transformers" (T5).
    quant:    component → "scaled_fp8" (legacy ComfyUI), "comfy_quant" (newer ComfyUI), "fp8" (fp8
              tensors without scales) or "gguf Q8_0" (ggml blocks; types joined by "+" when mixed);
              absent when the component is not quantized.
    variant:  the diffusers weight variant that was picked ("bf16"), or None.
    metadata: the safetensors header metadata of the first file holding the DiT (or of the file).
    extras:   other useful folders of a diffusers pipeline ("tokenizer", "scheduler", and "text_encoder"
              when the T5 comes from one: its config.json).
    """

    format: str
    path: Path
    files: dict[str, tuple[Path, ...]]
    prefixes: dict[str, str]
    layouts: dict[str, str]
    quant: dict[str, str] = field(default_factory=dict)
    variant: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Path] = field(default_factory=dict)

    def describe(self) -> str:
        """One line, e.g. ``comfyui (dit [genmo] fp8 scaled_fp8, vae_decoder [genmo], t5 [transformers])``."""
        parts = []
        for c in COMPONENTS:
            if c in self.files:
                q = f" {quant_label(self.quant[c])}" if c in self.quant else ""
                parts.append(f"{c} [{self.layouts[c]}]{q}")
        variant = f", variant {self.variant}" if self.variant else ""
        return f"{self.format} ({', '.join(parts)}{variant})"


def quant_label(quant: str) -> str:
    """How `Detected.quant` reads in a sentence: "fp8 scaled_fp8", "gguf Q8_0"."""
    return quant if quant.startswith("gguf") else f"fp8 {quant}"


def detect(path: str | os.PathLike, *, variant: str | None = None) -> Detected:
    """Detect the format of ``path`` (a folder, a file or an index) from names and headers only.

    ``variant`` picks a diffusers weight variant ("bf16"); by default the full-precision weights are
    preferred and a variant is used when it is the only one present. Raises WeightsError (a ValueError)
    naming the path and the formats looked for when nothing fits.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist; {LOOKED_FOR}")
    det = _detect_folder(path, variant) if path.is_dir() else _detect_file(path)
    if variant is not None and det.variant != variant:  # a variant of another layout would be ignored
        raise WeightsError(
            f"variant {variant!r} applies to diffusers model folders, and {str(path)!r} is "
            f"{det.describe()}; leave the variant out"
        )
    return det


def component_keys(det: Detected, component: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key (prefix removed) → (safetensors dtype name, shape) of one component, from headers only."""
    prefix = det.prefixes[component]
    out = {}
    for file in det.files[component]:
        for key, info in _header(file).items():
            if key.startswith(prefix):
                out[key[len(prefix) :]] = info
    return out


def iter_component(
    det: Detected, component: str, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key without prefix, tensor) of one component, one tensor at a time, in stored dtype.

    Other components' tensors in the same file are never read, and a caller that converts each tensor
    as it arrives never holds more than one unconverted tensor.
    """
    prefix = det.prefixes[component]
    for file in det.files[component]:
        if file.suffix == ".gguf":
            from mochi.weights.gguf_file import iter_gguf

            for key, t in iter_gguf(file, device):
                if key.startswith(prefix):
                    yield key[len(prefix) :], t
            continue
        if file.suffix in TORCH_SUFFIXES:
            for key, t in read_state_dict(file, device).items():
                if key.startswith(prefix):
                    yield key[len(prefix) :], t
            continue
        with open_safetensors(file, device) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if key.startswith(prefix):
                    yield key[len(prefix) :], f.get_tensor(key)


def read_component(
    det: Detected, component: str, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of one component, keys without prefix, in stored dtype."""
    if component not in det.files:
        raise WeightsError(
            f"{str(det.path)!r} (detected format: {det.describe()}) holds no {component}; "
            f"it holds: {', '.join(det.files) or 'nothing recognisable'}"
        )
    return dict(iter_component(det, component, device))


def _header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    check_regular(file)  # a pipe's open waited for a writer; a device was read without end
    if file.suffix == ".gguf":
        from mochi.weights.gguf_file import gguf_header

        return gguf_header(file)
    if file.suffix in TORCH_SUFFIXES:
        # No header to read: torch files are loaded weights-only (memory-mapped) to see their keys.
        return {k: (_dtype_name(v.dtype), tuple(v.shape)) for k, v in read_state_dict(file).items()}
    out = {}
    try:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    except Exception as e:  # safetensors raises its own error types for a damaged or foreign file
        raise WeightsError(f"{str(file)!r} is not a readable safetensors file ({e}); {LOOKED_FOR}") from None
    return out


def _headers(files: tuple[Path, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    seen: dict[str, Path] = {}
    for f in files:
        header = _header(f)
        for key in header:
            check_once(key, f, seen)
        out.update(header)
    return out


def _metadata(file: Path) -> dict[str, str]:
    if file.suffix in (*TORCH_SUFFIXES, ".gguf"):
        return {}
    with open_safetensors(file) as f:
        return dict(f.metadata() or {})


_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint8: "U8",
    torch.int64: "I64",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _prefix_of(keys: Mapping[str, object], marker: str, within: str = "") -> str | None:
    """The prefix before ``marker`` among keys starting with ``within``; the shortest if several."""
    found = [k[: -len(marker)] for k in keys if k.endswith(marker) and k.startswith(within)]
    found = [p for p in found if p == "" or p.endswith(".")]
    return min(found, key=len) if found else None


def _has_prefix(keys: Mapping[str, object], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _quant(
    header: Mapping[str, tuple[str, tuple[int, ...]]], prefix: str, meta: Mapping[str, str]
) -> str | None:
    """How a component's weights are quantized, from its keys, dtypes and the file's metadata."""
    if prefix + "scaled_fp8" in header:
        return "scaled_fp8"
    mine = [k for k in header if k.startswith(prefix)]
    kinds = sorted({m["kind"] for k in mine if (m := QWEIGHT.match(k))})
    if kinds:
        return "gguf " + "+".join(kinds)
    if any(k.endswith((".comfy_quant", ".weight_scale")) for k in mine):
        return "comfy_quant"
    # The header entry lists layers of every component in the file, with or without their prefix.
    layers = quantization_layers(meta)
    if any(
        n.startswith(prefix) and n + ".weight" in header or prefix + n + ".weight" in header for n in layers
    ):
        return "comfy_quant"
    if any(header[k][0] in FP8_HEADER_DTYPES for k in mine):
        return "fp8"
    return None


def _components_in(
    header: Mapping[str, tuple[str, tuple[int, ...]]],
) -> tuple[dict[str, str], dict[str, str]]:
    """Component → prefix and component → layout, found in one file's keys."""
    prefixes: dict[str, str] = {}
    layouts: dict[str, str] = {}
    # A block-quantized layer's weight is "<layer>.<TYPE>_qweight": it marks the layer as ".weight" would.
    header = {**header, **{m["layer"] + ".weight": v for k, v in header.items() if (m := QWEIGHT.match(k))}}
    p = _prefix_of(header, _DIT_GENMO)
    if p is not None:
        prefixes["dit"], layouts["dit"] = p, "genmo"
    else:
        p = _prefix_of(header, _DIT_DIFFUSERS)
        if p is not None:
            prefixes["dit"], layouts["dit"] = p, "diffusers"
    dit_prefix = prefixes.get("dit")
    # VAE: ComfyUI all-in-one files put it under "vae." (older single files "first_stage_model."), VAE
    # files have it bare or under decoder./encoder.
    for group in (*VAE_GROUPS, ""):
        if group and not _has_prefix(header, group):
            continue
        for comp, sub, genmo_mark, diffusers_mark in (
            ("vae_decoder", "decoder.", "blocks.0.0.weight", "conv_in.weight"),
            ("vae_encoder", "encoder.", "layers.0.weight", "proj_in.weight"),
        ):
            if comp in prefixes:
                continue
            for p in (group + sub, group):
                if p == dit_prefix or (p == "" and dit_prefix is not None):
                    continue
                if p + genmo_mark in header:
                    prefixes[comp], layouts[comp] = p, "genmo"
                    break
                if p + diffusers_mark in header and p:
                    prefixes[comp], layouts[comp] = p, "diffusers"
                    break
    p = _prefix_of(header, _T5)
    if p is not None and p != dit_prefix:
        prefixes["t5"], layouts["t5"] = p, "transformers"
    return prefixes, layouts


def _detect_file(path: Path) -> Detected:
    """A single file or an index: classify by its keys."""
    if path.name.endswith(".json"):
        files = _index_files(path)
    elif path.suffix in (*TORCH_SUFFIXES, ".safetensors", ".gguf"):
        files = (path,)
    else:
        raise WeightsError(
            f"{str(path)!r} is not a .safetensors, .gguf, index .json or .pt/.bin file; {LOOKED_FOR}"
        )
    return _classify(path, files, _headers(files))


def _classify(
    path: Path, files: tuple[Path, ...], header: dict[str, tuple[str, tuple[int, ...]]]
) -> Detected:
    prefixes, layouts = _components_in(header)
    if not prefixes:
        sample = ", ".join(sorted(header)[:5]) or "no tensors"
        raise WeightsError(f"no Mochi component recognised in {str(path)!r} (keys: {sample}); {LOOKED_FOR}")
    meta = _metadata(files[0])
    quant = {c: q for c in prefixes if (q := _quant(header, prefixes[c], meta))}
    # Unprefixed keys are Genmo's or diffusers' own files; a prefix is ComfyUI's repackaging.
    main = "dit" if "dit" in prefixes else next(iter(prefixes))
    prefix = prefixes[main]
    fmt = (
        "gguf"
        if files[0].suffix == ".gguf"
        else "comfyui"
        if (prefix and main == "dit") or prefix.startswith((*VAE_GROUPS, "text_encoders."))
        else layouts[main]
    )
    return Detected(
        format=fmt,
        path=path,
        files=dict.fromkeys(prefixes, files),
        prefixes=prefixes,
        layouts=layouts,
        quant=quant,
        metadata=meta,
    )


def _index_files(index: Path) -> tuple[Path, ...]:
    try:
        files = index_shards(index)
    except OSError as e:
        raise WeightsError(f"{str(index)!r} is not a safetensors index with a weight_map ({e})") from None
    missing = [str(f.name) for f in files if not f.exists()]
    if missing:
        raise WeightsError(f"index {str(index)!r} names shards that are missing: {', '.join(missing[:5])}")
    return files


def _weight_sets(folder: Path) -> dict[str | None, Path | tuple[Path, ...]]:
    """The checkpoints in a diffusers model folder, by variant: an index file, or the file(s) themselves."""
    sets: dict[str | None, Path | tuple[Path, ...]] = {}
    for index in sorted(folder.glob("*.json")):
        name = index.name
        # diffusers writes X.safetensors.index.<variant>.json; others X.<variant>.safetensors.index.json
        m = re.fullmatch(
            r".+?(?:\.(?P<v1>[A-Za-z0-9_]+))?\.safetensors\.index(?:\.(?P<v2>[A-Za-z0-9_]+))?\.json", name
        )
        if m:
            sets.setdefault(m["v1"] or m["v2"], index)
    shards: dict[str | None, list[Path]] = {}
    for file in safetensors_in(folder):
        m = _SHARD.match(file.name)
        if m:
            shards.setdefault(m["variant"], []).append(file)
            continue
        parts = file.name.split(".")
        v = parts[-2] if len(parts) == 3 else None
        sets.setdefault(v, (file,))
    for v, files in shards.items():
        sets.setdefault(v, tuple(files))
    return sets


def _pick(folder: Path, variant: str | None) -> tuple[tuple[Path, ...], str | None]:
    sets = _weight_sets(folder)
    if variant is not None:
        if variant not in sets:
            named = sorted(v for v in sets if v is not None)
            if not named:  # "(variants present: None)" read as if nothing were there
                raise WeightsError(
                    f"no {variant!r} weight variant in {str(folder)!r}: it holds only the plain weights; "
                    "leave --variant out"
                )
            have = ", ".join((["the plain weights"] if None in sets else []) + named)
            raise WeightsError(f"no {variant!r} weight variant in {str(folder)!r} (it holds: {have})")
        choice = variant
    elif None in sets:
        choice = None
    elif len(sets) == 1:
        choice = next(iter(sets))
    else:
        raise WeightsError(
            f"{str(folder)!r} holds several weight variants ({', '.join(sorted(map(str, sets)))}); pick one"
        )
    found = sets[choice]
    return (_index_files(found) if isinstance(found, Path) else found), choice


def _detect_folder(path: Path, variant: str | None) -> Detected:
    if any((path / name).is_file() for name in GENMO_FILES.values()):
        return _genmo_folder(path)
    if (path / "transformer").is_dir() or (path / "vae").is_dir():
        return _diffusers_pipeline(path, variant)
    if _weight_sets(path) and (path / "config.json").is_file():
        # One model folder of a diffusers pipeline (transformer/, vae/ or text_encoder/).
        files, chosen = _pick(path, variant)
        det = _classify(path, files, _headers(files))
        return dataclasses.replace(det, format="diffusers", variant=chosen)
    sets = safetensors_in(path)
    if len(sets) == 1:
        return _detect_file(sets[0])
    held = listing((p.name for p in path.iterdir()), 8) or "nothing"
    raise WeightsError(
        f"folder {str(path)!r} holds no recognised checkpoint (it holds: {held}); {LOOKED_FOR}"
    )


def _genmo_folder(path: Path) -> Detected:
    files: dict[str, tuple[Path, ...]] = {}
    prefixes: dict[str, str] = {}
    layouts: dict[str, str] = {}
    quant: dict[str, str] = {}
    for comp, name in GENMO_FILES.items():
        file = path / name
        if not file.is_file():
            continue
        header = _header(file)
        found_prefixes, found_layouts = _components_in(header)
        if comp not in found_prefixes:
            raise WeightsError(
                f"{str(file)!r} does not hold Genmo {comp} keys (keys: {', '.join(sorted(header)[:5])})"
            )
        files[comp] = (file,)
        prefixes[comp], layouts[comp] = found_prefixes[comp], found_layouts[comp]
        q = _quant(header, prefixes[comp], _metadata(file))
        if q:
            quant[comp] = q
    # The Hugging Face repo holds Genmo's files beside a diffusers layout: its text encoder is the T5.
    extras = {name: path / name for name in ("tokenizer",) if (path / name).is_dir()}
    _add_text_encoder(path, None, files, prefixes, layouts, extras)
    meta = _metadata(files["dit"][0]) if "dit" in files else {}
    return Detected("genmo", path, files, prefixes, layouts, quant, metadata=meta, extras=extras)


def _add_text_encoder(
    path: Path,
    variant: str | None,
    files: dict,
    prefixes: dict[str, str],
    layouts: dict[str, str],
    extras: dict[str, Path],
) -> None:
    """The T5 of a text_encoder/ folder, if any: every shard, and the folder (its config.json) in extras."""
    folder = path / "text_encoder"
    if folder.is_dir() and (sets := _weight_sets(folder)):
        files["t5"], _ = _pick(folder, variant if variant in sets else None)
        prefixes["t5"], layouts["t5"] = "", "transformers"
        extras["text_encoder"] = folder


def _diffusers_pipeline(path: Path, variant: str | None) -> Detected:
    """A pipeline folder: transformer/ (the DiT) and/or vae/, with text_encoder/ when present."""
    files: dict[str, tuple[Path, ...]] = {}
    prefixes: dict[str, str] = {}
    layouts: dict[str, str] = {}
    chosen = variant
    if (path / "transformer").is_dir():
        files["dit"], chosen = _pick(path / "transformer", variant)
        prefixes["dit"], layouts["dit"] = "", "diffusers"
    if (path / "vae").is_dir() and (sets := _weight_sets(path / "vae")):
        vae_files, _ = _pick(path / "vae", chosen if chosen in sets else None)
        for comp, sub in (("vae_decoder", "decoder."), ("vae_encoder", "encoder.")):
            files[comp], prefixes[comp], layouts[comp] = vae_files, sub, "diffusers"
    extras = {name: path / name for name in ("tokenizer", "scheduler") if (path / name).is_dir()}
    _add_text_encoder(path, chosen, files, prefixes, layouts, extras)
    if not files:
        raise WeightsError(
            f"pipeline folder {str(path)!r} holds no weights in transformer/ or vae/; {LOOKED_FOR}"
        )
    meta = _metadata(files["dit"][0]) if "dit" in files else {}
    return Detected("diffusers", path, files, prefixes, layouts, {}, chosen, meta, extras)
