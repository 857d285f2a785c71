"""Stage 1 of the tiny model: train the AsymmVAE encoder and decoder on clips of the shapes world.

A KL-VAE as Genmo's: the encoder gives a mean and log-variance per latent element, the decoder sees a
sample ``mean + exp(logvar/2)·ε``. Loss = L1 + MSE on pixels in [−1, 1] + ``kl_weight``·mean KL to N(0, 1).
Both models are causal and convolutional, so short clips (``frames`` = 7: one causal latent frame and one
of six frames) train them for any length; they decode 25 frames at inference.

Batch ``b`` of step ``s`` holds clips ``s·b … s·b + b − 1`` of dataset ``seed`` (``shapes.spec_at``),
each rendered at 25 frames and cut to a window whose start comes from a generator seeded with (seed, s):
resuming at step s replays the same data and noise. After ``encoder_steps`` the encoder is frozen and
only the decoder trains on; the DiT stage needs only the (final) encoder, so it can run meanwhile.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mochi.models.vae import Decoder, Encoder
from mochi.presets import ModelPreset
from mochi.train import shapes
from mochi.train.checkpoint import (
    check_preset,
    check_resumable,
    load_checkpoint,
    load_parts,
    preset_configs,
    save_checkpoint,
)
from mochi.train.lr import warmup_cosine

VAE_CHECKPOINT = "vae.ckpt"


@dataclass(frozen=True)
class VAERecipe:
    steps: int = 2400
    batch: int = 4
    frames: int = 7  # frames per training window: 6k+1
    clip_frames: int = 25  # frames each clip is rendered with (sets the motion per frame)
    height: int = 64
    width: int = 64
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-3
    # From this step on the encoder is frozen and only the decoder trains: the latent space is then final,
    # so the DiT stage may start (its latent cache needs only the encoder) while the decoder keeps improving.
    encoder_steps: int = 1000
    # Then ``decoder_steps`` more steps of the decoder alone on longer windows, with a fresh cosine schedule
    # from ``decoder_lr``: the latent space does not change, and reconstruction gains about a decibel.
    decoder_steps: int = 1200
    decoder_frames: int = 13
    decoder_lr: float = 3e-4
    # Last, ``tune_steps`` of the decoder alone on whole clips (``clip_frames``: every latent frame the
    # model decodes at inference), decoding posterior means (what the DiT learns, see
    # ``DiTRecipe.sample_posterior``) with the object's pixels weighted 1 + ``foreground_weight`` times: the
    # object covers 3-16% of a frame, so an unweighted loss tolerates a 40/255 colour shift of it (yellow
    # decoded as orange); a weight of 10 did worse than 3 on both colour and PSNR (docs/embedded-model.md).
    # None of this touches the latent space.
    tune_steps: int = 600
    tune_lr: float = 2e-4
    foreground_weight: float = 3.0
    # The same object weighting in the joint and decoder-only phases too (0 = off, the shipped recipe): the
    # encoder then shapes its latent space around the object, not the background (issue 20: the shipped VAE
    # rounds small objects and drifts green, cyan and orange by more than 20 levels; docs/embedded-model.md).
    early_foreground_weight: float = 0.0
    # Draw clips from every composition, the held-out ones included (the VAE reads no caption, so the
    # held-out rule does not apply to it). Off in the v2 recipe: its encoder never saw a green triangle and
    # barely separates one from a green circle on gray (docs/embedded-model.md, v3), which no later decoder
    # training can undo.
    heldout_pixels: bool = False
    # Weigh each clip's loss by contrast^-p in every phase (``contrast_weight``, mean 1 over the
    # palette; 0 = off). A misplaced edge costs contrast² in MSE, so the plain loss teaches the encoder 13
    # times less about a green object on gray than about a white one on black, and v3's VAE draws shapes
    # right on black in 100% of reconstructions but on gray in 85% (docs/embedded-model.md, v5).
    contrast_power: float = 0.0
    # Apply that weighting only before this step (None = every step). At ``encoder_steps`` it shapes the
    # latent space alone: the encoder learns to separate faint shapes, and the decoder then trains on the
    # plain loss (V5, weighted to the end, lost 3 dB and drifted the bright colours; docs/embedded-model.md).
    contrast_steps: int | None = None
    # A margin on shape separation in the encoder phase (0 = off). Each clip is rendered again with another
    # shape (``twin_specs``: same colour, place, motion and background), and the loss adds
    # ``separation_weight`` · mean(relu(margin − ‖μ(clip) − μ(twin)‖ / ‖μ(clip) − μ(empty)‖)): the distance
    # between the two posterior means relative to the clip's distance from its empty background (held
    # constant), which a larger latent scale cannot game. How far apart an encoder puts two faint shapes
    # has so far been a matter of its draw (docs/embedded-model.md, v7 and v8); this asks for it.
    separation_weight: float = 0.0
    separation_margin: float = 0.5
    seed: int = 1
    log_every: int = 25
    checkpoint_every: int = 100


def to_pixels(video: np.ndarray) -> torch.Tensor:
    """uint8 (..., T, H, W, 3) → float32 (..., 3, T, H, W) in [−1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(video)).float() / 127.5 - 1.0
    return x.movedim(-1, -4)


def from_pixels(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, T, H, W) in about [−1, 1] → uint8 (B, T, H, W, 3)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(1, -1).numpy()


def _windows(recipe: VAERecipe, step: int) -> tuple[int, list[int]]:
    """The window length of step ``step`` and each clip's first frame in it."""
    if step < recipe.steps:
        frames = recipe.frames
    elif step < recipe.steps + recipe.decoder_steps:
        frames = recipe.decoder_frames
    else:
        frames = recipe.clip_frames
    gen = np.random.default_rng([recipe.seed, step, 7])
    return frames, [int(gen.integers(0, recipe.clip_frames - frames + 1)) for _ in range(recipe.batch)]


def _render_windows(recipe: VAERecipe, specs, frames: int, starts) -> torch.Tensor:
    videos = []
    for spec, start in zip(specs, starts, strict=True):
        video = shapes.render(spec, recipe.clip_frames, recipe.height, recipe.width)
        videos.append(video[start : start + frames])
    return to_pixels(np.stack(videos))


def vae_batch(recipe: VAERecipe, step: int) -> torch.Tensor:
    """The pixels of training step ``step``: (batch, 3, frames, H, W) in [−1, 1]."""
    frames, starts = _windows(recipe, step)
    return _render_windows(recipe, batch_specs(recipe, step), frames, starts)


def twin_specs(recipe: VAERecipe, step: int) -> list[shapes.ClipSpec | None]:
    """Each clip of step ``step`` with another shape of the world (drawn from a generator seeded with the
    step), or None where every other shape would make a held-out composition the recipe may not show."""
    gen = np.random.default_rng([recipe.seed, step, 11])
    twins = []
    for spec in batch_specs(recipe, step):
        others = [replace(spec, shape=s) for s in shapes.DEFAULT_VOCAB.shapes if s != spec.shape]
        if not recipe.heldout_pixels:
            others = [t for t in others if not shapes.is_heldout(shapes.caption(t))]
        twins.append(others[int(gen.integers(len(others)))] if others else None)
    return twins


def vae_twins(recipe: VAERecipe, step: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The pixels of ``twin_specs`` in the windows of ``vae_batch``, the empty background of each, and
    the indices of the batch's clips they belong to (those with a twin)."""
    frames, starts = _windows(recipe, step)
    twins = twin_specs(recipe, step)
    keep = [i for i, t in enumerate(twins) if t is not None]
    if not keep:
        return torch.empty(0), torch.empty(0), keep
    pixels = _render_windows(recipe, [twins[i] for i in keep], frames, [starts[i] for i in keep])
    empty = np.stack(
        [
            np.broadcast_to(
                np.asarray(shapes.BACKGROUNDS[twins[i].background], np.uint8), pixels.shape[2:] + (3,)
            )
            for i in keep
        ]
    )
    return pixels, to_pixels(empty), keep


def separation_loss(
    mean: torch.Tensor, twin: torch.Tensor, empty: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean(relu(margin − ratio)) and the ratios ‖mean − twin‖ / ‖mean − empty‖ per clip (the denominator
    held constant), over the posterior means (B, C, t, h, w) of the clips, their twins and their empty
    backgrounds."""
    apart = (mean - twin).flatten(1).norm(dim=1)
    scale = (mean - empty).detach().flatten(1).norm(dim=1).clamp_min(1e-6)
    ratio = apart / scale
    return torch.relu(margin - ratio).mean(), ratio.detach()


def vae_clip_weights(recipe: VAERecipe, step: int) -> torch.Tensor:
    """Each clip's loss weight at step ``step`` (``contrast_power``, ``contrast_steps``), (batch,); ones
    when it is off."""
    if recipe.contrast_steps is not None and step >= recipe.contrast_steps:
        return torch.ones(recipe.batch)
    specs = batch_specs(recipe, step)
    return torch.tensor([contrast_weight(s.color, s.background, recipe.contrast_power) for s in specs])


def contrast(color: str, background: str) -> float:
    """RGB distance (0-255 levels) between a palette colour and a background colour."""
    rgb, bg = np.asarray(shapes.COLORS[color], float), np.asarray(shapes.BACKGROUNDS[background], float)
    return float(np.linalg.norm(rgb - bg))


def contrast_weight(color: str, background: str, power: float) -> float:
    """contrast^-power over its mean over every palette colour on every background (1 when power is 0)."""
    pairs = [contrast(c, b) ** -power for c in shapes.COLORS for b in shapes.BACKGROUNDS]
    return contrast(color, background) ** -power / float(np.mean(pairs))


def batch_specs(recipe, step: int) -> list[shapes.ClipSpec]:
    """The clips of step ``step`` of a ``VAERecipe`` or ``DecoderRecipe`` (its seed, batch and
    heldout_pixels)."""
    return [
        shapes.spec_at(recipe.seed, step * recipe.batch + i, allow_heldout=recipe.heldout_pixels)
        for i in range(recipe.batch)
    ]


def foreground_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, T, H, W): 1 + ``weight`` where a pixel of ``x`` (in [−1, 1]) is not
    within 4/255 of a background colour, i.e. on the object or its anti-aliased rim."""
    backgrounds = torch.tensor(list(shapes.BACKGROUNDS.values()), dtype=x.dtype) / 127.5 - 1.0
    distance = torch.stack(
        [(x - bg.view(1, 3, 1, 1, 1)).abs().amax(dim=1, keepdim=True) for bg in backgrounds]
    ).amin(dim=0)
    return 1.0 + weight * (distance > 4 / 127.5).to(x.dtype)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of ``lr`` at ``steps``."""
    return lr * warmup_cosine(step, warmup, steps, floor=0.1)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) ‖ N(0, 1))."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()


def build_vae(preset: ModelPreset, seed: int) -> tuple[Encoder, Decoder]:
    torch.manual_seed(seed)
    return Encoder(preset.encoder), Decoder(preset.decoder)


def train_vae(out: str | Path, preset: ModelPreset, recipe: VAERecipe = VAERecipe(), log=print) -> dict:
    """Train (or resume) to ``steps + decoder_steps + tune_steps`` into ``out/vae.ckpt``; returns the final
    state."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder, decoder = build_vae(preset, recipe.seed)
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    state = load_checkpoint(out / VAE_CHECKPOINT)
    if state is not None and "from_bundle" in state:
        raise ValueError(
            f"{out / VAE_CHECKPOINT} holds the VAE of bundle {state['from_bundle']!r} (written by "
            "`dit --init`), not a vae stage's training state: run the vae stage in another --out"
        )
    if state is not None:
        # Checkpoints written before these were recorded have none: they resume as they always did.
        settings = {"seed": (recipe.seed, "--seed {}"), "batch": (recipe.batch, "--batch {}")}
        check_resumable(state, out / VAE_CHECKPOINT, settings)
        check_preset(state, out / VAE_CHECKPOINT, preset)
        load_parts(out / VAE_CHECKPOINT, {"encoder": encoder, "decoder": decoder}, state)
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log(f"vae: resumed at step {step} from {out / VAE_CHECKPOINT}")

    def snapshot() -> dict:
        return {
            "encoder": encoder.state_dict(),
            "decoder": decoder.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "loss": last,
            "encoder_steps": recipe.encoder_steps,
            "seed": recipe.seed,
            "batch": recipe.batch,
            "configs": preset_configs(preset, ("encoder", "decoder")),
        }

    last = float(state["loss"]) if state is not None else float("nan")
    totals, seps, t0 = np.zeros(4), np.zeros(3), time.time()
    total = recipe.steps + recipe.decoder_steps + recipe.tune_steps
    tune_from = recipe.steps + recipe.decoder_steps
    while step < total:
        x = vae_batch(recipe, step)
        noise_gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        for group in opt.param_groups:
            group["lr"] = (
                lr_at(step, recipe.steps, recipe.lr, recipe.warmup)
                if step < recipe.steps
                else lr_at(step - recipe.steps, recipe.decoder_steps, recipe.decoder_lr, 0)
                if step < tune_from
                else lr_at(step - tune_from, recipe.tune_steps, recipe.tune_lr, 0)
            )
        frozen = step >= recipe.encoder_steps
        with torch.set_grad_enabled(not frozen):
            mean, logvar = encoder(x)
        logvar = logvar.clamp(-30.0, 20.0)
        noise = torch.randn(mean.shape, generator=noise_gen)
        z = mean if step >= tune_from else mean + (0.5 * logvar).exp() * noise
        y = decoder(z)
        # Weighted means; a weight of one gives the plain means bit for bit.
        weight = recipe.foreground_weight if step >= tune_from else recipe.early_foreground_weight
        w = foreground_weights(x, weight) if weight else torch.ones(())
        # The clips' contrast weights are not normalised per batch: their mean over the palette is 1.
        c = vae_clip_weights(recipe, step).view(-1, 1, 1, 1, 1) if recipe.contrast_power else 1.0
        l1, mse = ((y - x).abs() * w * c).mean() / w.mean(), ((y - x).square() * w * c).mean() / w.mean()
        kl = kl_divergence(mean, logvar)
        loss = l1 + mse + recipe.kl_weight * kl
        if recipe.separation_weight and not frozen:
            twins, empty, keep = vae_twins(recipe, step)
            if keep:
                twin_mean, _ = encoder(twins)
                with torch.no_grad():  # each background once (two at most), not once per clip
                    unique, which = torch.unique(empty.flatten(1), dim=0, return_inverse=True)
                    empty_mean = encoder(unique.view(-1, *empty.shape[1:]))[0][which]
                sep, ratio = separation_loss(mean[keep], twin_mean, empty_mean, recipe.separation_margin)
                loss = loss + recipe.separation_weight * sep
                seps += (float(sep.detach()), float(ratio.min()), 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        last = float(loss.detach())
        totals += (last, float(l1.detach()), float(mse.detach()), float(kl.detach()))
        if step % recipe.log_every == 0 or step == total:
            n = (step - 1) % recipe.log_every + 1
            avg = totals / n
            psnr = 10 * math.log10(4.0 / max(avg[2], 1e-12))  # MSE on a [−1, 1] range
            # The separation term's mean and the mean of each step's smallest ratio, where it ran.
            sep = f" sep {seps[0] / seps[2]:.4f} (ratio ≥ {seps[1] / seps[2]:.3f})" if seps[2] else ""
            log(
                f"vae step {step}/{total} loss {avg[0]:.5f} l1 {avg[1]:.5f} mse {avg[2]:.6f} "
                f"(~{psnr:.1f} dB) kl {avg[3]:.3f}{sep} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.time() - t0) / n:.2f} s/step"
            )
            totals, seps, t0 = np.zeros(4), np.zeros(3), time.time()
        if step % recipe.checkpoint_every == 0 or step == total:
            save_checkpoint(snapshot(), out / VAE_CHECKPOINT)
    return snapshot()
