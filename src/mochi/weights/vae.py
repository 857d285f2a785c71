"""Loading the VAE decoder and encoder from every published layout.

Where the tensors are is ``mochi.weights.formats.detect``'s answer (key names and headers, never file names;
only the chosen part's tensors are read), so every layout it knows is a VAE source:
* Genmo: ``decoder.safetensors`` / ``encoder.safetensors`` (bare keys ``blocks.0.0.weight``,
  ``layers.0.weight``), or a folder holding them;
* ComfyUI: the VAE file (``mochi_vae.safetensors``, Genmo keys under ``decoder.`` / ``encoder.``) and the
  ``vae.`` part of an all-in-one checkpoint;
* diffusers: the ``vae/`` folder (``AutoencoderKLMochi``: ``decoder.conv_in``, ...) or a pipeline folder
  holding it, renamed through ``keymaps.vae_diffusers``; sharded and ``bf16`` variants.

The model is built on the meta device, its config chosen as the preset whose key→shape set the file
matches exactly (or given), loaded strictly, then cast.
"""

from __future__ import annotations

import os

import torch

from mochi.models.vae import (
    DECODER_PRESETS,
    ENCODER_PRESETS,
    Decoder,
    DecoderConfig,
    Encoder,
    EncoderConfig,
)
from mochi.weights.formats import Detected, detect, read_component
from mochi.weights.io import WeightsError, check_state_dict, load_strict
from mochi.weights.keymaps.vae_diffusers import decoder_pairs, encoder_pairs, from_diffusers, to_diffusers

VAESource = str | os.PathLike | Detected


def _meta_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _part_state_dict(source: VAESource, part: str) -> tuple[dict[str, torch.Tensor], str, bool]:
    """The ``part`` tensors of a checkpoint, prefix stripped: (state dict, format, in diffusers names)."""
    det = source if isinstance(source, Detected) else detect(source)
    component = f"vae_{part}"
    if component not in det.files:
        other = "encoder" if part == "decoder" else "decoder"
        looks = (
            f"it looks like a VAE {other} only" if f"vae_{other}" in det.files else "it is not a Mochi VAE"
        )
        raise WeightsError(
            f"{str(det.path)!r} (detected format: {det.describe()}) holds no VAE {part}; {looks}"
        )
    sd = read_component(det, component)
    if det.layouts[component] == "diffusers":
        # diffusers' names keep the part: the key map works on "decoder.conv_in.weight" etc.
        return {f"{part}.{k}": v for k, v in sd.items()}, det.describe(), True
    return sd, det.describe(), False


_PARTS = {
    "decoder": (DECODER_PRESETS, Decoder, decoder_pairs),
    "encoder": (ENCODER_PRESETS, Encoder, encoder_pairs),
}


def match_config(
    sd: dict[str, torch.Tensor],
    part: str,
    diffusers: bool,
    config: DecoderConfig | EncoderConfig | None = None,
    fmt: str = "",
) -> DecoderConfig | EncoderConfig:
    """The config (``config``, else the preset) whose key→shape set ``sd`` matches exactly.

    sd: the ``part`` ("decoder" or "encoder") tensors, in Genmo's names or (``diffusers``) diffusers'
    names with the part's prefix. Raises WeightsError naming the mismatch otherwise.
    """
    presets, build, pairs_fn = _PARTS[part]

    def expected(cfg: DecoderConfig | EncoderConfig) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            shapes = _meta_shapes(build(cfg))
        if not diffusers:
            return shapes
        return {k: tuple(v.shape) for k, v in to_diffusers(_meta_tensors(shapes), pairs_fn(cfg)).items()}

    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    candidates = [config] if config is not None else list(presets.values())
    for cfg in candidates:
        if expected(cfg) == shapes:
            return cfg
    # Name the problem against the requested (or released) configuration.
    check_state_dict(expected(candidates[0]), sd, fmt)
    raise WeightsError(f"checkpoint (detected format: {fmt}) fits no VAE {part} configuration")


def _load(path, part: str, config, dtype, device):
    _, build, pairs_fn = _PARTS[part]
    sd, fmt, diffusers = _part_state_dict(path, part)
    chosen = match_config(sd, part, diffusers, config, fmt)
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
    path: VAESource,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: DecoderConfig | None = None,
) -> Decoder:
    """The VAE decoder from a Genmo, ComfyUI (VAE or all-in-one) or diffusers checkpoint (a path, or what
    ``formats.detect`` found in one), strictly."""
    return _load(path, "decoder", config, dtype, device)


def load_vae_encoder(
    path: VAESource,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: EncoderConfig | None = None,
) -> Encoder:
    """The VAE encoder from a Genmo, ComfyUI (VAE or all-in-one) or diffusers checkpoint (a path, or what
    ``formats.detect`` found in one), strictly."""
    return _load(path, "encoder", config, dtype, device)
