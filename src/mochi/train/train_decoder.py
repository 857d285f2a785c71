"""Stage 1c of the tiny model: sharpen the VAE decoder on the frozen encoder's posterior means.

The VAE stage ends with a decoder whose reconstructions of true clips pass the strict judge for shape only
about 80% of the time (small triangles come back with rounded points, issue 20): a ceiling for any DiT on
that latent space. This stage trains the decoder alone for ``steps`` more, the encoder (and so the latent
space and the DiT stage) untouched, so it may run beside the DiT stage. It starts from the VAE stage's
decoder (``vae.ckpt``, or the decoder of a mochi bundle), and where the preset's decoder has full-resolution
ResBlocks the source lacks, it grows them as identities (last convolution zero), so step 0 decodes exactly
as the source does.

Batch ``b`` of step ``s`` holds clips ``s·b … s·b + b − 1`` of dataset ``seed`` (``shapes.spec_at``, held-out
compositions included: ``DecoderRecipe.heldout_pixels``), each rendered at 25 frames and cut to a
``frames`` window whose start comes from a generator seeded with (seed, s): resuming at step s replays the
same data.

With ``DecoderRecipe.refine_share`` > 0, that share of the steps trains the decoder on latents as the DiT
leaves them rather than on the encoder's exact codes: each clip of such a step (whole, all five latent
frames) is encoded, noised to a σ drawn uniformly in (0, ``refine_sigma``] and denoised by the frozen DiT
along the tail of the sampler's schedule (with its caption and classifier-free guidance, as at inference),
and the decoder learns to draw the true clip from the result. The DiT's last denoising steps leave small
errors in the latent that a decoder trained on exact codes only draws as rounded corners
(docs/embedded-model.md, v5).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mochi.models.prompts import encode_prompts
from mochi.models.tokenizer import ByteTokenizer
from mochi.models.vae import Decoder, DecoderConfig, Encoder
from mochi.models.vae_blocks import ResBlock
from mochi.presets import ModelPreset
from mochi.sampling.sampler import noise_to, sample
from mochi.sampling.schedules import linear_quadratic_schedule, truncate_schedule
from mochi.train import shapes
from mochi.train.checkpoint import (
    check_preset,
    check_resumable,
    load_checkpoint,
    load_parts,
    preset_configs,
    save_checkpoint,
)
from mochi.train.train_dit import _check_heldout_rule, allowed_caption
from mochi.train.train_vae import (
    VAE_CHECKPOINT,
    batch_specs,
    contrast_weight,
    foreground_weights,
    lr_at,
    to_pixels,
)
from mochi.weights.bundle import is_bundle, load_bundle

DECODER_CHECKPOINT = "decoder.ckpt"


@dataclass(frozen=True)
class DecoderRecipe:
    steps: int = 1500
    batch: int = 4
    frames: int = 13  # frames per training window: 6k+1 (three latent frames: the causal one and two more)
    clip_frames: int = 25
    height: int = 64
    width: int = 64
    lr: float = 2e-4
    warmup: int = 50
    # The object's pixels (and anti-aliased rim) weigh 1 + this in L1 and MSE, as in the VAE's tuning phase.
    foreground_weight: float = 3.0
    # Each clip's loss is multiplied by contrast^-p (normalised to mean 1 over every palette colour on every
    # background; 0 = off), contrast being the RGB distance between the object's colour and the background:
    # an edge misplaced by a pixel costs contrast² in MSE, so a green object on gray (the lowest contrast
    # of the world, 108 levels against 390 for white on black) teaches the decoder 13 times less than a
    # white one on black, and the VAE stage's decoder draws it as a disc (docs/embedded-model.md).
    contrast_power: float = 0.0
    # Clips of held-out compositions too. The held-out rule is about captions (no training caption holds all
    # the words of a held-out line) and the VAE reads none; but the VAE stage, drawing its clips as the
    # captioned stages do, never saw a green or red triangle or a white square, and those are most of what
    # its decoder gets wrong (docs/embedded-model.md). False draws as the VAE stage does.
    heldout_pixels: bool = True
    # Share of the steps whose latents the frozen DiT refines (see the module docstring; 0 = off), the largest
    # σ it starts from, and the sampler it uses: the tail of linear_quadratic_schedule(refine_steps) below σ,
    # guidance refine_guidance. Captions obey the held-out rule as the DiT's training captions do
    # (``allowed_caption``): the DiT reads no held-out line here either.
    refine_share: float = 0.0
    # A share of the clips drawn again as one composition ("green:triangle"): its colour and shape, each clip
    # keeping its own place, size, motion and background (a draw of its own per clip, so resuming replays
    # it). For a decoder that draws one composition worse than the rest (H15's green triangles,
    # docs/embedded-model.md). None: off.
    focus: str | None = None
    focus_share: float = 0.0
    refine_sigma: float = 0.4
    refine_steps: int = 24
    refine_guidance: float = 2.0
    seed: int = 11  # dataset seed: the VAE stage used 1, the DiT's caches 2 and 3
    log_every: int = 25
    checkpoint_every: int = 100


def grow_decoder(cfg: DecoderConfig, state: dict[str, torch.Tensor]) -> Decoder:
    """A ``Decoder(cfg)`` holding ``state``; full-resolution ResBlocks that ``state`` lacks start as
    identities (their last convolution zero), so the grown decoder decodes exactly as ``state`` does.
    Any other difference between ``state`` and ``cfg`` is a ValueError naming the keys."""
    decoder = Decoder(cfg)
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    last = len(decoder.blocks) - 1
    grown = {k for k in missing if k.startswith(f"blocks.{last}.")}
    if unexpected or set(missing) != grown:
        raise ValueError(
            f"the source decoder does not fit decoder config {cfg}: missing {sorted(set(missing) - grown)}, "
            f"unexpected {sorted(unexpected)}; only full-resolution ResBlocks (blocks.{last}.*) can be grown"
        )
    for i, block in enumerate(decoder.blocks[last]):
        if any(k.startswith(f"blocks.{last}.{i}.") for k in grown):
            assert isinstance(block, ResBlock)
            conv = [m for m in block.modules() if isinstance(m, torch.nn.Conv3d)][-1]
            torch.nn.init.zeros_(conv.weight)
            if conv.bias is not None:
                torch.nn.init.zeros_(conv.bias)
    return decoder


def check_vae_source(source: str | os.PathLike) -> None:
    """ValueError when there is no VAE source at ``source`` (the tiny trainer asks before making --out)."""
    if not Path(source).exists():
        raise ValueError(f"no VAE source at {str(source)!r}: run the vae stage first, or pass a bundle")
    if Path(source).is_dir():  # torch.load failed on it
        raise ValueError(
            f"VAE source {str(source)!r} is a folder: give its vae stage's checkpoint "
            f"({str(Path(source) / VAE_CHECKPOINT)!r}) or a bundle file"
        )


def source_vae(source: str | os.PathLike) -> tuple[dict, dict]:
    """(encoder state, decoder state) of a ``vae.ckpt`` or of a mochi bundle."""
    source = Path(source)
    check_vae_source(source)
    if is_bundle(source):
        components = load_bundle(source)  # float32
        return components.encoder.state_dict(), components.decoder.state_dict()
    state = load_checkpoint(source)
    return state["encoder"], state["decoder"]


def refines(recipe: DecoderRecipe, step: int) -> bool:
    """Whether step ``step`` trains on DiT-refined latents (a draw of its own, so resuming replays it)."""
    return bool(recipe.refine_share) and float(np.random.default_rng([recipe.seed, step, 8]).random()) < (
        recipe.refine_share
    )


def focused_specs(recipe: DecoderRecipe, step: int) -> list[shapes.ClipSpec]:
    """``batch_specs``, with clip ``i`` drawn as ``recipe.focus`` when the draw (seed, step, i, 9) falls
    below ``focus_share``."""
    specs = batch_specs(recipe, step)
    if not recipe.focus or not recipe.focus_share:
        return specs
    color, shape = recipe.focus.split(":")
    return [
        replace(spec, color=color, shape=shape)
        if float(np.random.default_rng([recipe.seed, step, i, 9]).random()) < recipe.focus_share
        else spec
        for i, spec in enumerate(specs)
    ]


def decoder_batch(recipe: DecoderRecipe, step: int, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels of step ``step``, (batch, 3, frames, H, W) in [−1, 1] (``clip_frames`` when ``whole``),
    and each clip's loss weight (``contrast_weight``), (batch,)."""
    gen = np.random.default_rng([recipe.seed, step, 7])
    videos, weights = [], []
    for spec in focused_specs(recipe, step):
        video = shapes.render(spec, recipe.clip_frames, recipe.height, recipe.width)
        start = int(gen.integers(0, recipe.clip_frames - recipe.frames + 1))
        videos.append(video if whole else video[start : start + recipe.frames])
        weights.append(contrast_weight(spec.color, spec.background, recipe.contrast_power))
    return to_pixels(np.stack(videos)), torch.tensor(weights)


class Refiner:
    """The frozen T5 and DiT of a run (EMA weights) or of a bundle, and the latent statistics they work in:
    ``refine`` noises a batch of encoder means and denoises them as the sampler does."""

    def __init__(
        self, out: Path, preset: ModelPreset, source: str | os.PathLike | None, recipe: DecoderRecipe
    ):
        if source is not None and is_bundle(source):
            c = load_bundle(source)
            self.dit, self.text_encoder = c.dit, c.text_encoder
            self.mean, self.std = c.latent_mean, c.latent_std
        else:
            from mochi.train.export import trained_parts  # export imports this module

            try:
                parts = trained_parts(out, preset)
            except ValueError as e:
                raise ValueError(
                    f"refine_share {recipe.refine_share} needs a trained DiT: {e} (or a bundle as source)"
                ) from None
            self.dit, self.text_encoder = parts["dit"], parts["text_encoder"]
            self.mean, self.std = parts["latent_mean"], parts["latent_std"]
        if self.mean is None or self.std is None:
            raise ValueError(
                "refine_share needs the latent statistics the DiT was trained in; the source has none"
            )
        self.mean, self.std = (
            torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1, 1) for v in (self.mean, self.std)
        )
        for module in (self.dit, self.text_encoder):
            module.eval().requires_grad_(False)
        self.recipe, self.tokenizer = recipe, ByteTokenizer()
        self.null = encode_prompts([""], self.tokenizer, self.text_encoder)
        self.schedule = linear_quadratic_schedule(recipe.refine_steps)

    @torch.no_grad()
    def refine(self, latents: torch.Tensor, specs: list[shapes.ClipSpec], step: int) -> torch.Tensor:
        """``latents`` (B, C, t, h, w), the encoder's means of the clips ``specs``, as the DiT leaves them."""
        gen = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + step)
        sigmas = (1.0 - torch.rand(len(specs), generator=gen)) * self.recipe.refine_sigma  # (0, refine_sigma]
        noise = torch.randn(latents.shape, generator=gen)
        picks = torch.rand(len(specs), generator=gen).tolist()
        captions = [
            allowed_caption(shapes.caption(s), (False, False, False), p) for s, p in zip(specs, picks)
        ]
        _check_heldout_rule(captions)
        z0 = (latents - self.mean) / self.std
        out = []
        for i, caption in enumerate(captions):
            sigma = float(sigmas[i])
            text = encode_prompts([caption], self.tokenizer, self.text_encoder)
            z = noise_to(z0[i : i + 1], sigma, noise[i : i + 1])
            out.append(
                sample(
                    self.dit,
                    z,
                    truncate_schedule(self.schedule, sigma),
                    text,
                    self.null,
                    guidance=self.recipe.refine_guidance,
                )
            )
        return torch.cat(out) * self.std + self.mean


def train_decoder(
    out: str | os.PathLike,
    preset: ModelPreset,
    recipe: DecoderRecipe = DecoderRecipe(),
    source: str | os.PathLike | None = None,
    log=print,
) -> dict:
    """Train (or resume) the decoder to ``recipe.steps`` into ``out/decoder.ckpt``; returns the final state.

    ``source`` (default ``out/vae.ckpt``) gives the frozen encoder and the starting decoder."""
    out = Path(out)
    default = out / VAE_CHECKPOINT
    state = load_checkpoint(out / DECODER_CHECKPOINT)
    if state is None:  # a new run: no empty run folder for a missing source (a resume's checks come first)
        check_vae_source(source if source is not None else default)
    out.mkdir(parents=True, exist_ok=True)
    # The source as recorded: its resolved path, or OUT/vae.ckpt (the run folder's own, wherever it moves).
    own = source is None or Path(source).resolve() == default.resolve()
    source_name = "OUT/vae.ckpt" if own else str(Path(source).resolve())
    if state is not None:
        # Checkpoints written before these were recorded have none: they resume as they always did.
        stored_own = state.get("source") == "OUT/vae.ckpt"
        settings = {
            "focus": (recipe.focus, "--focus {}"),
            "focus_share": (recipe.focus_share, "--focus-share {}"),
            "seed": (recipe.seed, "seed {} (DecoderRecipe.seed)"),
            "batch": (recipe.batch, "--batch {}"),
            "source": (source_name, "no --source" if stored_own else "--source {}"),
        }
        check_resumable(state, out / DECODER_CHECKPOINT, settings)
        check_preset(state, out / DECODER_CHECKPOINT, preset)
    encoder_state, decoder_state = source_vae(source if source is not None else default)
    encoder = Encoder(preset.encoder)
    load_parts(source if source is not None else default, {"encoder": encoder}, {"encoder": encoder_state})
    encoder.eval().requires_grad_(False)
    torch.manual_seed(recipe.seed)
    decoder = grow_decoder(preset.decoder, decoder_state)
    opt = torch.optim.AdamW(decoder.parameters(), lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.0)
    refiner = Refiner(out, preset, source, recipe) if recipe.refine_share else None
    step, last = 0, float("nan")
    if state is not None:
        load_parts(out / DECODER_CHECKPOINT, {"decoder": decoder}, state)
        opt.load_state_dict(state["optimizer"])
        step, last = int(state["step"]), float(state["loss"])
        log(f"decoder: resumed at step {step} from {out / DECODER_CHECKPOINT}")

    def snapshot() -> dict:
        return {
            "decoder": decoder.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "loss": last,
            "seed": recipe.seed,
            "batch": recipe.batch,
            **({"focus": recipe.focus, "focus_share": recipe.focus_share} if recipe.focus else {}),
            "source": source_name,
            "configs": preset_configs(preset, ("decoder",)),
        }

    totals, t0 = np.zeros(3), time.time()
    while step < recipe.steps:
        refined = refiner is not None and refines(recipe, step)
        x, clip_weights = decoder_batch(recipe, step, whole=refined)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.steps, recipe.lr, recipe.warmup)
        with torch.no_grad():
            mean, _ = encoder(x)
        if refined:
            mean = refiner.refine(mean, batch_specs(recipe, step), step)
        y = decoder(mean)
        # Weighted means; weights of one give the plain means bit for bit.
        # (the foreground weights are normalised per batch, the clips' weights are not: their mean is 1).
        fg = foreground_weights(x, recipe.foreground_weight)
        w = fg * clip_weights.view(-1, 1, 1, 1, 1) if recipe.contrast_power else fg
        l1, mse = ((y - x).abs() * w).mean() / fg.mean(), ((y - x).square() * w).mean() / fg.mean()
        loss = l1 + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        step += 1
        last = float(loss.detach())
        totals += (last, float(l1.detach()), float(mse.detach()))
        if step % recipe.log_every == 0 or step == recipe.steps:
            n = (step - 1) % recipe.log_every + 1
            avg = totals / n
            log(
                f"decoder step {step}/{recipe.steps} loss {avg[0]:.5f} l1 {avg[1]:.5f} mse {avg[2]:.6f} "
                f"(~{10 * math.log10(4.0 / max(avg[2], 1e-12)):.1f} dB, weighted) "
                f"lr {opt.param_groups[0]['lr']:.2e} {(time.time() - t0) / n:.2f} s/step"
            )
            totals, t0 = np.zeros(3), time.time()
        if step % recipe.checkpoint_every == 0 or step == recipe.steps:
            save_checkpoint(snapshot(), out / DECODER_CHECKPOINT)
    return snapshot()
