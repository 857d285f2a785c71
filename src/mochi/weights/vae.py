"""Loading the VAE decoder and encoder from every published layout.

Formats (detected from key names, never from file names):
* `genmo`: `decoder.safetensors` / `encoder.safetensors`, bare Genmo keys (`blocks.0.0.weight`,
  `layers.0.weight`); a folder holding both files is accepted too.
* `comfy`: ComfyUI's VAE file (`mochi_vae.safetensors`), Genmo keys under `decoder.` / `encoder.`.
* `comfy-all-in-one`: the `vae.` part of a ComfyUI all-in-one checkpoint (only those tensors are read).
* `diffusers`: the `vae/` folder of the diffusers layout (`AutoencoderKLMochi`: `decoder.conv_in`, ...),
  renamed through `keymaps.vae_diffusers`; the `.bf16` variant is used when no fp32 file is present.

The model is built on the meta device, its config chosen as the preset whose key→shape set the file
matches exactly (or given), loaded strictly, then cast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from mochi.models.vae import (
    DECODER_PRESETS,
    ENCODER_PRESETS,
    Decoder,
    DecoderConfig,
    Encoder,
    EncoderConfig,
)
from mochi.weights.io import TORCH_SUFFIXES, WeightsError, check_state_dict, load_strict, read_state_dict
from mochi.weights.keymaps.vae_diffusers import decoder_pairs, encoder_pairs, from_diffusers, to_diffusers

# Anchor keys that identify each layout (after any `vae.` / `first_stage_model.` prefix).
_ANCHORS = {
    "diffusers": ("decoder.conv_in.weight", "encoder.proj_in.weight"),
    "comfy": ("decoder.blocks.0.0.weight", "encoder.layers.0.weight"),
    "genmo": ("blocks.0.0.weight", "layers.0.weight"),
}
_OUTER_PREFIXES = ("vae.", "first_stage_model.")


def _files(path: Path, part: str) -> list[Path]:
    """The tensor files a path stands for, for `part` 'decoder' or 'encoder'."""
    if not path.exists():
        raise WeightsError(f"VAE checkpoint {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    if (path / "vae").is_dir():
        path = path / "vae"
    for name in (f"{part}.safetensors", "diffusion_pytorch_model.safetensors.index.json"):
        if (path / name).exists():
            return [path / name]
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bf16.safetensors"):
        if (path / name).exists():
            return [path / name]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no .safetensors files for the VAE {part} in folder {str(path)!r}")
    return files


def _read(files: list[Path], keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of the files, only those whose name passes `keep` (read lazily from safetensors)."""
    if len(files) == 1 and (files[0].suffix in TORCH_SUFFIXES or files[0].name.endswith(".index.json")):
        sd = read_state_dict(files[0])
        return {k: v for k, v in sd.items() if keep is None or keep(k)}
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if keep is None or keep(key):
                    out[key] = f.get_tensor(key)
    return out


def _key_names(files: list[Path]) -> list[str]:
    if len(files) == 1 and (files[0].suffix in TORCH_SUFFIXES or files[0].name.endswith(".index.json")):
        return list(read_state_dict(files[0]).keys())
    names = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            names += list(f.keys())  # noqa: SIM118
    return names


def detect_vae_format(keys: list[str] | set[str]) -> tuple[str, str]:
    """(format name, key prefix) of a VAE state dict's key names; WeightsError when none fits."""
    keys = set(keys)
    for outer in ("", *_OUTER_PREFIXES):
        for fmt, anchors in _ANCHORS.items():
            if any(outer + a in keys for a in anchors):
                return ("comfy-all-in-one" if outer and fmt != "diffusers" else fmt), outer
    shown = ", ".join(sorted(keys)[:6])
    raise WeightsError(
        "checkpoint is not a Mochi VAE in any known layout (Genmo, ComfyUI, diffusers); "
        f"no anchor key such as 'blocks.0.0.weight' or 'decoder.conv_in.weight' among: {shown}"
    )


def _meta_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _part_state_dict(path: str | os.PathLike, part: str) -> tuple[dict[str, torch.Tensor], str, bool]:
    """The `part` tensors of a checkpoint, prefix stripped: (state dict, format, in diffusers names)."""
    files = _files(Path(path), part)
    fmt, outer = detect_vae_format(_key_names(files))
    diffusers = fmt == "diffusers"
    if diffusers:
        prefix = f"{outer}{part}."
        sd = _read(files, lambda k: k.startswith(prefix))
        return {k[len(outer) :]: v for k, v in sd.items()}, fmt, True
    names = _key_names(files)
    prefixed = f"{outer}{part}."
    if any(k.startswith(prefixed) for k in names):
        sd = _read(files, lambda k: k.startswith(prefixed))
        return {k[len(prefixed) :]: v for k, v in sd.items()}, fmt, False
    anchor = outer + _ANCHORS["genmo"][0 if part == "decoder" else 1]
    if anchor not in names:
        other = "encoder" if part == "decoder" else "decoder"
        raise WeightsError(
            f"{str(path)!r} (detected format: {fmt}) holds no VAE {part}; it looks like a {other} only"
        )
    known = ("decoder.", "encoder.", "model.", "text_encoders.", "cond_stage_model.", "conditioner.")
    sd = _read(files, lambda k: k.startswith(outer) and not k[len(outer) :].startswith(known))
    return {k[len(outer) :]: v for k, v in sd.items()}, fmt, False


def _load(path, part: str, presets: dict, build, pairs_fn, config, dtype, device):
    sd, fmt, diffusers = _part_state_dict(path, part)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    candidates = [config] if config is not None else list(presets.values())
    chosen = None
    for cfg in candidates:
        with torch.device("meta"):
            expected = _meta_shapes(build(cfg))
        if diffusers:
            expected = {
                k: tuple(v.shape) for k, v in to_diffusers(_meta_tensors(expected), pairs_fn(cfg)).items()
            }
        if expected == shapes:
            chosen = cfg
            break
    if chosen is None:
        # Name the problem against the requested (or released) configuration.
        cfg = candidates[0]
        with torch.device("meta"):
            expected = _meta_shapes(build(cfg))
        if diffusers:
            expected = {
                k: tuple(v.shape) for k, v in to_diffusers(_meta_tensors(expected), pairs_fn(cfg)).items()
            }
        check_state_dict(expected, sd, fmt)
        raise WeightsError(f"checkpoint (detected format: {fmt}) fits no VAE {part} configuration")
    if diffusers:
        sd = from_diffusers(sd, pairs_fn(chosen))
    with torch.device("meta"):
        model = build(chosen)
    load_strict(model, sd, fmt)
    model = model.to(device=device, dtype=dtype)
    # Conv weights in channels-last match the activations' layout: oneDNN then skips a per-call weight
    # reorder, which dominates short temporal chunks at the 768-channel stages.
    return model.to(memory_format=torch.channels_last_3d).eval().requires_grad_(False)


def _meta_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def load_vae_decoder(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: DecoderConfig | None = None,
) -> Decoder:
    """The VAE decoder from a Genmo, ComfyUI (VAE or all-in-one) or diffusers checkpoint, strictly."""
    return _load(path, "decoder", DECODER_PRESETS, Decoder, decoder_pairs, config, dtype, device)


def load_vae_encoder(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: EncoderConfig | None = None,
) -> Encoder:
    """The VAE encoder from a Genmo, ComfyUI (VAE or all-in-one) or diffusers checkpoint, strictly."""
    return _load(path, "encoder", ENCODER_PRESETS, Encoder, encoder_pairs, config, dtype, device)
