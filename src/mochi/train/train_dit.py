"""Stage 2 of the tiny model: the T5 text encoder and the AsymmDiT, trained jointly from scratch.

First the trained VAE encoder turns ``cache_clips`` clips of dataset ``seed`` into a latent cache (mean and
log-variance, in chunks so that an interruption loses at most one chunk); the per-channel statistics of
the latents it learns (posterior means by default, see ``DiTRecipe.sample_posterior``) become the model's
``latent_mean``/``latent_std``, and the DiT works in the normalised space ``(z − mean)/std``, as the
released model does.

Rectified flow, Genmo's sign: x0 a normalised posterior mean (or sample), ε ~ N(0, I), z_σ = (1 − σ)·x0 + σ·ε,
and the DiT regresses v = x0 − ε (MSE). σ is drawn from a mixture: with probability ``uniform_share`` uniform
on [0, 1], else logit-normal sigmoid(N(``logit_mean``, 1)) with a positive mean, which weights the high noise
levels where Genmo's schedule spends half of its steps and where layout and motion are decided. A
``caption_dropout`` share of captions become the empty prompt (zero text tokens, all-zero features, as
``encode_prompts`` gives for ""), so classifier-free guidance works. An EMA of both models is kept and
exported.

Step ``s`` draws its clips, posterior noise, σ, ε and dropout from a generator seeded with (seed, s), so
resuming at step s replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mochi.models.dit import AsymmDiT
from mochi.models.t5 import T5Encoder
from mochi.models.tokenizer import ByteTokenizer, tokenize_prompts
from mochi.presets import ModelPreset
from mochi.train import shapes
from mochi.train.checkpoint import ema_update, load_checkpoint, save_checkpoint
from mochi.train.train_vae import VAE_CHECKPOINT, lr_at, to_pixels
from mochi.weights.io import read_metadata, read_state_dict, save_state_dict

DIT_CHECKPOINT = "dit.ckpt"
CACHE_DIR = "latents"


@dataclass(frozen=True)
class DiTRecipe:
    steps: int = 24000
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    uniform_share: float = 0.2
    logit_mean: float = 0.5
    ema_decay: float = 0.999
    # Train on the posterior means (False) or on posterior samples (True, as Genmo's trainer does). The
    # tiny VAE's posterior noise is as large as the distance between some colours' latents (yellow and
    # orange), so a DiT trained on samples learns latents the decoder can only decode as a blend of the
    # two; on means it learns the encoder's deterministic codes, which the tuned decoder decodes exactly.
    sample_posterior: bool = False
    text_length: int = 64  # byte tokens per caption: the longest caption is 52 with its end token
    cache_clips: int = 4000
    cache_chunk: int = 500
    frames: int = 25
    height: int = 64
    width: int = 64
    seed: int = 2
    log_every: int = 50
    checkpoint_every: int = 200


def _chunk_path(out: Path, k: int) -> Path:
    return out / CACHE_DIR / f"chunk-{k:04d}.safetensors"


@torch.no_grad()
def build_latent_cache(out: Path, preset: ModelPreset, recipe: DiTRecipe, log=print) -> None:
    """Encode clips ``0 … cache_clips − 1`` of dataset ``recipe.seed`` with the trained VAE encoder."""
    from mochi.models.vae import Encoder

    state = load_checkpoint(out / VAE_CHECKPOINT)
    if state is None:
        raise ValueError(f"no VAE checkpoint in {str(out)!r}: run `python -m mochi.train.tiny vae` first")
    if state["step"] < state["encoder_steps"]:
        raise ValueError(
            f"the VAE checkpoint in {str(out)!r} is at step {state['step']}, but its encoder trains until "
            f"step {state['encoder_steps']}: let `python -m mochi.train.tiny vae` get there first"
        )
    encoder = Encoder(preset.encoder)
    encoder.load_state_dict(state["encoder"])
    encoder.eval()
    (out / CACHE_DIR).mkdir(exist_ok=True)
    n_chunks = math.ceil(recipe.cache_clips / recipe.cache_chunk)
    for k in range(n_chunks):
        path = _chunk_path(out, k)
        if path.exists():
            continue
        t0 = time.time()
        lo, hi = k * recipe.cache_chunk, min((k + 1) * recipe.cache_chunk, recipe.cache_clips)
        captions, means, logvars = [], [], []
        for start in range(lo, hi, 16):
            clips = list(shapes.clips(recipe.seed, min(16, hi - start), recipe.frames, recipe.height,
                                      recipe.width, start=start))  # fmt: skip
            captions += [c for c, _ in clips]
            mean, logvar = encoder(to_pixels(np.stack([v for _, v in clips])))
            means.append(mean)
            logvars.append(logvar.clamp(-30.0, 20.0))
        tensors = {"mean": torch.cat(means), "logvar": torch.cat(logvars)}
        save_state_dict(tensors, path, {"captions": json.dumps(captions), "vae_step": str(state["step"])})
        log(f"latent cache: chunk {k + 1}/{n_chunks} ({hi - lo} clips) in {time.time() - t0:.0f} s")


def load_latent_cache(out: Path, recipe: DiTRecipe) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(mean, logvar) each (N, 12, t, h, w) and the N captions."""
    means, logvars, captions = [], [], []
    for k in range(math.ceil(recipe.cache_clips / recipe.cache_chunk)):
        sd = read_state_dict(_chunk_path(out, k))
        means.append(sd["mean"])
        logvars.append(sd["logvar"])
        captions += json.loads(read_metadata(_chunk_path(out, k))["captions"])
    return torch.cat(means), torch.cat(logvars), captions


def latent_stats(
    mean: torch.Tensor, logvar: torch.Tensor, seed: int, sample: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (12,), in float64, of the latents the DiT learns: one posterior sample of
    every cached clip (``sample``) or the posterior means."""
    if sample:
        gen = torch.Generator().manual_seed(seed)
        mean = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)
    z = mean.double()
    z = z.transpose(0, 1).flatten(1)
    return z.mean(1), z.std(1)


def build_text_and_dit(preset: ModelPreset, seed: int) -> tuple[T5Encoder, AsymmDiT]:
    torch.manual_seed(seed)
    text_encoder = T5Encoder(preset.text_encoder)
    text_encoder.initialize_weights(torch.Generator().manual_seed(seed))
    dit = AsymmDiT(preset.dit)
    # The output projection starts at zero: the first prediction is v = 0 and the loss starts at E|x0 − ε|².
    torch.nn.init.zeros_(dit.final_layer.linear.weight)
    torch.nn.init.zeros_(dit.final_layer.linear.bias)
    return text_encoder, dit


def text_features(
    text_encoder: T5Encoder, captions: list[str], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, length, d_model) with gradients and mask (B, length); "" gives zero tokens and zeros."""
    ids, mask = tokenize_prompts(captions, ByteTokenizer(), length)
    features = text_encoder(ids, mask) * mask[..., None]
    return features, mask


def sample_sigmas(n: int, recipe: DiTRecipe, gen: torch.Generator) -> torch.Tensor:
    """(n,) noise levels in (0, 1): the uniform / shifted logit-normal mixture described above."""
    logit = torch.sigmoid(recipe.logit_mean + torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < recipe.uniform_share
    return torch.where(pick, uniform, logit).clamp(1e-4, 1 - 1e-4)


def train_dit(out: str | Path, preset: ModelPreset, recipe: DiTRecipe = DiTRecipe(), log=print) -> dict:
    """Build the latent cache if needed, then train (or resume) to ``recipe.steps`` into ``out/dit.ckpt``."""
    out = Path(out)
    build_latent_cache(out, preset, recipe, log)
    cache_mean, cache_logvar, captions = load_latent_cache(out, recipe)
    stats = latent_stats(cache_mean, cache_logvar, recipe.seed, recipe.sample_posterior)
    mu, sd = (s.float().view(1, -1, 1, 1, 1) for s in stats)

    text_encoder, dit = build_text_and_dit(preset, recipe.seed)
    models = torch.nn.ModuleDict({"text_encoder": text_encoder, "dit": dit})
    params = list(models.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = {n: p.detach().clone() for n, p in models.named_parameters()}
    step, last = 0, float("nan")
    state = load_checkpoint(out / DIT_CHECKPOINT)
    if state is not None:
        models.load_state_dict(state["model"])
        ema = state["ema"]
        opt.load_state_dict(state["optimizer"])
        step, last = int(state["step"]), float(state["loss"])
        log(f"dit: resumed at step {step} from {out / DIT_CHECKPOINT}")

    def snapshot() -> dict:
        return {
            "model": models.state_dict(),
            "ema": ema,
            "optimizer": opt.state_dict(),
            "step": step,
            "loss": last,
            "latent_mean": stats[0].tolist(),
            "latent_std": stats[1].tolist(),
        }

    total, t0 = 0.0, time.time()
    n_cache = cache_mean.shape[0]
    while step < recipe.steps:
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        index = torch.randint(n_cache, (recipe.batch,), generator=gen)
        mean, logvar = cache_mean[index], cache_logvar[index]
        noise = torch.randn(mean.shape, generator=gen)  # drawn either way: the same stream for both
        z = mean + (0.5 * logvar).exp() * noise if recipe.sample_posterior else mean
        x0 = (z - mu) / sd
        eps = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(recipe.batch, recipe, gen)
        drop = torch.rand(recipe.batch, generator=gen) < recipe.caption_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(index.tolist(), drop.tolist())]
        s = sigma.view(-1, 1, 1, 1, 1)
        z_sigma = (1 - s) * x0 + s * eps
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.steps, recipe.lr, recipe.warmup)
        features, mask = text_features(text_encoder, batch_captions, recipe.text_length)
        v = dit(z_sigma, sigma, features, mask)
        loss = (v - (x0 - eps)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, models, min(recipe.ema_decay, (1 + step) / (10 + step)))
        step += 1
        last = float(loss.detach())
        total += last
        if step % recipe.log_every == 0 or step == recipe.steps:
            n = (step - 1) % recipe.log_every + 1
            log(
                f"dit step {step}/{recipe.steps} loss {total / n:.5f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.time() - t0) / n:.2f} s/step"
            )
            total, t0 = 0.0, time.time()
        if step % recipe.checkpoint_every == 0 or step == recipe.steps:
            save_checkpoint(snapshot(), out / DIT_CHECKPOINT)
    return snapshot()
