"""The VAE half of `mochi convert`: a checkpoint's VAE decoder and encoder in Genmo's or diffusers' layout.

Genmo's layout is one file per part with bare keys (``decoder.safetensors``: ``blocks.0.0.weight`` ...);
diffusers' is ``vae/`` with ``config.json`` (``AutoencoderKLMochi``) and one safetensors file holding both
parts under ``decoder.`` / ``encoder.``. Genmo-named parts are copied unchanged (whatever their config);
diffusers-named ones, and Genmo ones written for diffusers, go through ``keymaps.vae_diffusers``, which
needs the part's config: the preset whose shapes the tensors match (`mochi.weights.vae.match_config`).
Tensors keep their stored dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mochi.models.latents import LATENT_MEAN, LATENT_STD
from mochi.models.vae import DecoderConfig, EncoderConfig
from mochi.weights.formats import Detected, iter_component
from mochi.weights.io import WeightsError
from mochi.weights.keymaps.vae_diffusers import decoder_pairs, encoder_pairs, from_diffusers, to_diffusers

PARTS = ("decoder", "encoder")
_PAIRS = {"decoder": decoder_pairs, "encoder": encoder_pairs}


@dataclass
class VaePart:
    """One part of a VAE in Genmo's names; ``config`` is known only when it was needed (diffusers)."""

    name: str
    genmo: dict[str, torch.Tensor]
    config: DecoderConfig | EncoderConfig | None


def vae_parts(det: Detected) -> list[str]:
    """The VAE parts ("decoder", "encoder") a checkpoint holds."""
    return [p for p in PARTS if f"vae_{p}" in det.files]


def read_vae_part(det: Detected, part: str, need_config: bool) -> VaePart:
    """The ``part`` tensors of ``det`` in Genmo's names, with the matching config when diffusers' names
    were read or ``need_config`` asks for it."""
    from mochi.weights.vae import match_config

    component = f"vae_{part}"
    sd = dict(iter_component(det, component))
    if det.layouts[component] == "diffusers":
        named = {f"{part}.{k}": v for k, v in sd.items()}  # the key map works on diffusers' full names
        config = match_config(named, part, True, fmt=det.describe())
        return VaePart(part, from_diffusers(named, _PAIRS[part](config)), config)
    config = match_config(sd, part, False, fmt=det.describe()) if need_config else None
    return VaePart(part, sd, config)


def diffusers_vae(parts: list[VaePart]) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (diffusers' names) and ``config.json`` of ``AutoencoderKLMochi`` for these parts."""
    tensors: dict[str, torch.Tensor] = {}
    for p in parts:
        tensors.update(to_diffusers(p.genmo, _PAIRS[p.name](p.config)))
    configs = {p.name: p.config for p in parts}
    dec, enc = configs.get("decoder"), configs.get("encoder")
    if dec is not None and enc is not None:
        same = (
            dec.num_res_blocks == enc.num_res_blocks
            and dec.temporal_expansions == enc.temporal_reductions
            and dec.spatial_expansions == enc.spatial_reductions
            and dec.latent_dim == enc.latent_dim
        )
        if not same:
            raise WeightsError(
                "this VAE's decoder and encoder differ in depth or scale factors, which diffusers' "
                "AutoencoderKLMochi config cannot express (it has one layers_per_block and one set of "
                "expansions); convert it --to genmo instead"
            )
    config: dict = {"_class_name": "AutoencoderKLMochi", "_diffusers_version": "0.32.0"}
    if enc is not None:
        config.update(
            in_channels=enc.in_channels,
            encoder_block_out_channels=enc.channels,
            layers_per_block=list(enc.num_res_blocks),
            latent_channels=enc.latent_dim,
            temporal_expansions=list(enc.temporal_reductions),
            spatial_expansions=list(enc.spatial_reductions),
            add_attention_block=list(enc.has_attentions),
        )
    if dec is not None:
        config.update(
            out_channels=dec.out_channels,
            decoder_block_out_channels=dec.channels,
            layers_per_block=list(dec.num_res_blocks),
            latent_channels=dec.latent_dim,
            temporal_expansions=list(dec.temporal_expansions),
            spatial_expansions=list(dec.spatial_expansions),
        )
    # The released VAE's latent statistics (what diffusers' pipeline normalises with), as Genmo's are.
    config.update(latents_mean=list(LATENT_MEAN), latents_std=list(LATENT_STD), scaling_factor=1.0)
    return tensors, config
