"""Stage 3 of the tiny model: the trained checkpoints of a run folder → one mochi bundle file.

The VAE comes from ``vae.ckpt``; the T5 and the DiT from the EMA weights of ``dit.ckpt``, together with the
latent statistics measured on the latent cache; the request defaults from the preset.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mochi.models.dit import AsymmDiT
from mochi.models.t5 import T5Encoder
from mochi.models.vae import Decoder, Encoder
from mochi.presets import ModelPreset
from mochi.train.checkpoint import load_checkpoint
from mochi.train.train_dit import DIT_CHECKPOINT
from mochi.train.train_vae import VAE_CHECKPOINT
from mochi.weights.bundle import save_bundle


def trained_parts(out: str | os.PathLike, preset: ModelPreset, ema: bool = True) -> dict:
    """The modules and bundle fields of run folder ``out`` (T5 and DiT: EMA weights unless ``ema=False``)."""
    out = Path(out)
    vae, dit_state = load_checkpoint(out / VAE_CHECKPOINT), load_checkpoint(out / DIT_CHECKPOINT)
    for name, state in ((VAE_CHECKPOINT, vae), (DIT_CHECKPOINT, dit_state)):
        if state is None:
            raise ValueError(f"no {name} in {str(out)!r}: run the vae and dit stages first")
    encoder, decoder = Encoder(preset.encoder), Decoder(preset.decoder)
    encoder.load_state_dict(vae["encoder"])
    decoder.load_state_dict(vae["decoder"])
    models = torch.nn.ModuleDict(
        {"text_encoder": T5Encoder(preset.text_encoder), "dit": AsymmDiT(preset.dit)}
    )
    weights = dict(dit_state["model"])
    if ema:
        weights.update(dit_state["ema"])
    models.load_state_dict(weights)
    return {
        "dit": models["dit"].eval(),
        "text_encoder": models["text_encoder"].eval(),
        "decoder": decoder.eval(),
        "encoder": encoder.eval(),
        "defaults": dict(preset.defaults),
        "latent_mean": dit_state["latent_mean"],
        "latent_std": dit_state["latent_std"],
        "name": "mochi-tiny",
    }


def export_bundle(
    out: str | os.PathLike, preset: ModelPreset, path: str | os.PathLike, dtype: torch.dtype = torch.float16
) -> Path:
    """Write the bundle of run folder ``out`` to ``path`` stored in ``dtype``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(trained_parts(out, preset), path, dtype=dtype)
    return path
