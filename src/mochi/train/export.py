"""Stage 3 of the tiny model: the trained checkpoints of a run folder → one mochi bundle file.

The VAE comes from ``vae.ckpt`` (the decoder from ``decoder.ckpt`` when the decoder stage ran); the T5
and the DiT from the EMA weights of ``dit.ckpt``, together with the latent statistics measured on the
latent cache; the request defaults from the preset. With ``source`` (a mochi bundle) only the decoder stage
ran in the run folder: the decoder comes from ``decoder.ckpt``, the defaults from the preset, everything else
from the bundle unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mochi.models.dit import AsymmDiT
from mochi.models.t5 import T5Encoder
from mochi.models.vae import Decoder, Encoder
from mochi.presets import ModelPreset
from mochi.train.checkpoint import check_preset, load_checkpoint, load_parts
from mochi.train.train_decoder import DECODER_CHECKPOINT
from mochi.train.train_dit import DIT_CHECKPOINT
from mochi.train.train_vae import VAE_CHECKPOINT
from mochi.weights.bundle import check_bundle_path, load_bundle, save_bundle


def trained_parts(out: str | os.PathLike, preset: ModelPreset, ema: bool = True) -> dict:
    """The modules and bundle fields of run folder ``out`` (T5 and DiT: EMA weights unless ``ema=False``)."""
    out = Path(out)
    vae, dit_state = load_checkpoint(out / VAE_CHECKPOINT), load_checkpoint(out / DIT_CHECKPOINT)
    for name, state in ((VAE_CHECKPOINT, vae), (DIT_CHECKPOINT, dit_state)):
        if state is None:
            raise ValueError(f"no {name} in {str(out)!r}: run the vae and dit stages first")
        check_preset(state, out / name, preset, export=True)  # a run of another preset: named, not torch's
    encoder, decoder = Encoder(preset.encoder), Decoder(preset.decoder)
    load_parts(out / VAE_CHECKPOINT, {"encoder": encoder}, vae, export=True)
    # The decoder stage's decoder when it ran, else the vae stage's.
    name, state = DECODER_CHECKPOINT, load_checkpoint(out / DECODER_CHECKPOINT)
    if state is None:
        name, state = VAE_CHECKPOINT, vae
    else:
        check_preset(state, out / name, preset, export=True)
    load_parts(out / name, {"decoder": decoder}, state, export=True)
    models = torch.nn.ModuleDict(
        {"text_encoder": T5Encoder(preset.text_encoder), "dit": AsymmDiT(preset.dit)}
    )
    weights = dict(dit_state["model"])
    if ema:
        weights.update(dit_state["ema"])
    load_parts(out / DIT_CHECKPOINT, {"DiT": models}, {"DiT": weights}, export=True)
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


def sharpened_parts(out: str | os.PathLike, preset: ModelPreset, source: str | os.PathLike):
    """The bundle ``source`` with its decoder replaced by run folder ``out``'s ``decoder.ckpt``."""
    state = load_checkpoint(Path(out) / DECODER_CHECKPOINT)
    if state is None:
        raise ValueError(f"no {DECODER_CHECKPOINT} in {str(out)!r}: run the decoder stage first")
    components = load_bundle(source)
    if components.encoder is None or components.encoder.cfg != preset.encoder:
        raise ValueError(f"bundle {str(source)!r} does not hold the encoder of the preset the run trained")
    decoder = Decoder(preset.decoder)
    decoder.load_state_dict(state["decoder"])
    components.decoder = decoder.eval()
    components.defaults = dict(preset.defaults)  # as trained_parts: the request defaults are the preset's
    return components


def export_bundle(
    out: str | os.PathLike,
    preset: ModelPreset,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write the bundle of run folder ``out`` to ``path`` stored in ``dtype``; returns the path. With
    ``source``, the run folder holds only a decoder stage: the rest comes from that bundle."""
    check_bundle_path(path)  # before the checkpoints are read
    parts = trained_parts(out, preset) if source is None else sharpened_parts(out, preset, source)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(parts, path, dtype=dtype)
    return path
