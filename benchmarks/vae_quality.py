"""How good is a tiny VAE: issue 20's three VAE figures for the embedded model or a training checkpoint.

Prints (1) reconstruction PSNR (posterior mean) on 16 fresh clips, (2) colour drift: how many of them decode
the object within ``DRIFT_TARGET`` levels of its palette colour on every channel, and the worst, (3) the
judge on reconstructions of 24 true clips, one per colour × shape (every direction and background in turn):
shape under the strict judge and the moments-only one, and colour. (3) is the ceiling a DiT on this latent
space can reach: it cannot draw better than the decoder decodes true latents.

    PYTHONPATH=src python benchmarks/vae_quality.py                      # the embedded model's VAE
    PYTHONPATH=src python benchmarks/vae_quality.py RUN/vae.ckpt --preset mochi-tiny-wide-vae
    PYTHONPATH=src python benchmarks/vae_quality.py RUN/decoder.ckpt --source V2.safetensors  # decoder stage
    PYTHONPATH=src python benchmarks/vae_quality.py RUN/decoder.ckpt --source RUN/vae.ckpt    # (full recipe)
    PYTHONPATH=src python benchmarks/vae_quality.py MODEL.safetensors                         # any bundle
"""

from __future__ import annotations

import argparse
import itertools
import types

import numpy as np
import torch

from mochi.models.vae_tiling import decode, encode
from mochi.presets import model_preset
from mochi.train import judge, shapes
from mochi.train.checkpoint import load_checkpoint, load_parts
from mochi.train.evaluate import DRIFT_TARGET, PSNR_TARGET, color_drift, reconstruction_psnr
from mochi.train.train_decoder import source_vae
from mochi.train.train_vae import build_vae, from_pixels, to_pixels
from mochi.weights.bundle import is_bundle, load_bundle, load_embedded


def vae_components(checkpoint: str | None, preset: str, source: str | None = None):
    """The embedded model's components, a bundle's, or an encoder/decoder pair from a ``train_vae``
    checkpoint (or a ``train_decoder`` one, with the encoder of the bundle ``source``)."""
    if checkpoint is None:
        return load_embedded()
    if is_bundle(checkpoint):
        return load_bundle(checkpoint)
    encoder, decoder = build_vae(model_preset(preset), 0)
    state = load_checkpoint(checkpoint)  # None: no file there (what a trainer reads as "not started")
    if state is None:
        raise ValueError(
            f"no checkpoint at {checkpoint!r}: give a train_vae or train_decoder checkpoint "
            "(RUN/vae.ckpt, RUN/decoder.ckpt) or a mochi bundle"
        )
    if "decoder" not in state:
        raise ValueError(f"{checkpoint!r} holds no decoder: give a train_vae or train_decoder checkpoint")
    if source is None and "encoder" not in state:
        raise ValueError(
            f"{checkpoint!r} holds no encoder: give --source, the vae.ckpt or bundle it started from"
        )
    encoders = {"encoder": state["encoder"] if source is None else source_vae(source)[0]}
    load_parts(source or checkpoint, {"encoder": encoder}, encoders)
    load_parts(checkpoint, {"decoder": decoder}, state)
    defaults = {k: model_preset(preset).defaults[k] for k in ("frames", "height", "width")}
    return types.SimpleNamespace(encoder=encoder.eval(), decoder=decoder.eval(), defaults=defaults)


def judged_reconstructions(components, seed: int = 5) -> dict[str, int]:
    """Strict shape, moments-only shape and colour hits on the reconstructions of 24 true clips."""
    vocab = shapes.DEFAULT_VOCAB
    rng = np.random.default_rng(seed)
    pairs = itertools.product(vocab.colors, vocab.shapes)
    rows = zip(pairs, itertools.cycle(shapes.DIRECTIONS), itertools.cycle(shapes.BACKGROUNDS))
    hits = {"strict": 0, "moments": 0, "colour": 0, "clips": 0}
    for (color, shape), direction, background in rows:
        spec = shapes.sample_spec(
            rng, shapes.Vocab((color,), (shape,), (direction,), (background,)), allow_heldout=True
        )
        mean, _ = encode(components.encoder, to_pixels(shapes.render(spec)[None]))
        video = from_pixels(decode(components.decoder, mean))[0]
        strict, moments = judge.judge(video), judge.judge(video, strict=False)
        hits["strict"] += strict.shape == spec.shape
        hits["moments"] += moments.shape == spec.shape
        hits["colour"] += strict.color == spec.color
        hits["clips"] += 1
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "checkpoint",
        nargs="?",
        help="a train_vae or train_decoder checkpoint, or a mochi bundle (default: the embedded model)",
    )
    ap.add_argument(
        "--source", help="a train_decoder checkpoint's source, a vae.ckpt or a bundle (gives the encoder)"
    )
    ap.add_argument("--preset", default="mochi-tiny", help="the checkpoint's model preset")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        components = vae_components(args.checkpoint, args.preset, args.source)
    except ValueError as e:
        ap.error(str(e))
    with torch.no_grad():
        psnrs = reconstruction_psnr(components, 16)
        drifts = [float(np.abs(d).max()) for _, d in color_drift(components, 16)]
        hits = judged_reconstructions(components)
    within = sum(d <= DRIFT_TARGET for d in drifts)
    n = hits["clips"]
    print(f"VAE: {args.checkpoint or 'embedded model'}")
    mean, worst = np.mean(psnrs), np.min(psnrs)
    print(f"PSNR on 16 fresh clips: mean {mean:.2f} dB, worst {worst:.2f} (target {PSNR_TARGET})")
    print(f"colour drift: {within}/16 within {DRIFT_TARGET} levels, worst {max(drifts):.1f}")
    print(
        f"judge on {n} reconstructions: shape strict {hits['strict']}/{n}, "
        f"moments-only {hits['moments']}/{n}; colour {hits['colour']}/{n}"
    )


if __name__ == "__main__":
    main()
