"""Generate and judge videos of the shapes world with a set of components (used by benchmarks/adherence.py).

``generate`` drives the components directly with the pipeline's math (encode_prompts → Euler sampler with
classifier-free guidance on Genmo's linear-quadratic schedule → latent de-normalisation → VAE decode), so
it works on branches that predate ``mochi.pipeline.MochiPipeline``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mochi.models.latents import LATENT_MEAN, LATENT_STD
from mochi.models.prompts import encode_prompts
from mochi.models.vae import SPATIAL_FACTOR, num_latents_for_frames
from mochi.models.vae_tiling import decode, encode
from mochi.sampling.sampler import initial_noise, sample
from mochi.sampling.schedules import linear_quadratic_schedule
from mochi.train import shapes
from mochi.train.judge import psnr
from mochi.train.train_vae import from_pixels, to_pixels


def latent_statistics(components) -> tuple[torch.Tensor, torch.Tensor]:
    """The components' latent mean and std (the released model's when they carry none), each (1, C, 1, 1, 1):
    a normalised latent is (posterior mean − mean) / std."""
    mean = components.latent_mean if components.latent_mean is not None else LATENT_MEAN
    std = components.latent_std if components.latent_std is not None else LATENT_STD
    return (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1, 1) for v in (mean, std))


@torch.no_grad()
def generate(
    components,
    prompts: Sequence[str],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    frames: int | None = None,
    batch: int = 8,
    eta: float | None = None,
    eta_above: float | None = None,
) -> np.ndarray:
    """uint8 videos (len(prompts), T, H, W, 3); prompt i uses noise seed ``seed + i``.

    steps, guidance, frames, eta, eta_above default to the components' defaults (eta: 0 when they name none);
    height and width always do. eta, eta_above:
    the ancestral sampler (``mochi.sampling.sampler``; 0 = Euler), its fresh noise seeded as the video's.
    """
    videos = []
    for lo in range(0, len(prompts), batch):
        chunk = list(prompts[lo : lo + batch])
        text = encode_prompts(chunk, components.tokenizer, components.text_encoder)
        seeds = [seed + lo + i for i in range(len(chunk))]
        videos.append(
            generate_from_text(
                components,
                text,
                seeds,
                steps=steps,
                guidance=guidance,
                frames=frames,
                eta=eta,
                eta_above=eta_above,
            )
        )
    return np.concatenate(videos)


@torch.no_grad()
def generate_from_text(
    components,
    text: tuple[torch.Tensor, torch.Tensor],
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    frames: int | None = None,
    eta: float | None = None,
    eta_above: float | None = None,
) -> np.ndarray:
    """``generate`` from encoded text (features (B, L, d), mask (B, L)): video b uses noise seed
    ``seeds[b]``. For probes that edit the features (benchmarks/binding_probe.py)."""
    from mochi.request import GenerationRequest

    # The pipeline's rule for what an unset value means (the components' defaults; eta 0 if they name none).
    req = GenerationRequest(
        "", steps=steps, guidance=guidance, frames=frames, eta=eta, eta_above=eta_above, seed=0
    ).resolved(components.defaults)
    steps, guidance, eta, eta_above = req.steps, req.guidance, req.eta, req.eta_above
    t = num_latents_for_frames(req.frames)
    h, w = req.height // SPATIAL_FACTOR, req.width // SPATIAL_FACTOR
    mean, std = latent_statistics(components)
    null = encode_prompts([""], components.tokenizer, components.text_encoder)
    z = torch.cat([initial_noise((1, 12, t, h, w), s) for s in seeds])
    z = sample(
        components.dit,
        z,
        linear_quadratic_schedule(steps),
        text,
        null,
        guidance=guidance,
        eta=eta,
        eta_above=eta_above,
        noise_seeds=seeds,
    )
    return from_pixels(decode(components.decoder, z * std + mean))


@torch.no_grad()
def reconstruction_psnr(components, n: int = 16, seed: int = 12345, frames: int = 25) -> list[float]:
    """PSNR in dB of encode → decode (posterior mean) on ``n`` fresh clips of dataset ``seed``."""
    d = components.defaults
    out = []
    for _, video in shapes.clips(seed, n, frames, d["height"], d["width"]):
        mean, _ = encode(components.encoder, to_pixels(video[None]))
        out.append(psnr(video, from_pixels(decode(components.decoder, mean))[0]))
    return out


# Issue 20's VAE targets: PSNR on fresh clips, and the decoded object's mean colour within this many levels of
# its palette colour on every channel.
PSNR_TARGET = 34.0
DRIFT_TARGET = 20.0


@torch.no_grad()
def color_drift(components, n: int = 16, seed: int = 12345, frames: int = 25) -> list[tuple[str, np.ndarray]]:
    """How far the VAE moves the object's colour: for ``n`` fresh clips of dataset ``seed`` (the clips of
    ``reconstruction_psnr``), the clip's colour name and the decoded object's mean colour minus the palette
    colour, float (3,) in levels (0-255) per channel.

    The object is where the true render shows the palette colour exactly (its fully covered pixels, not the
    anti-aliased rim), so the figure measures the decoder's colour, not the judge's segmentation.
    """
    d = components.defaults
    out = []
    for index in range(n):
        spec = shapes.spec_at(seed, index)
        video = shapes.render(spec, frames, d["height"], d["width"])
        mean, _ = encode(components.encoder, to_pixels(video[None]))
        decoded = from_pixels(decode(components.decoder, mean))[0]
        color = np.array(shapes.COLORS[spec.color], dtype=np.float64)
        inside = np.all(video == color.astype(np.uint8), axis=-1)
        out.append((spec.color, decoded[inside].astype(np.float64).mean(axis=0) - color))
    return out


@torch.no_grad()
def reconstructions(components, prompts: Sequence[str], seed: int = 0) -> np.ndarray:
    """uint8 VAE reconstructions (encode → posterior mean → decode) of one true clip per prompt
    (``shapes.spec_from_caption``, generator ``seed``): (len(prompts), T, H, W, 3). Judging these bounds
    what the judge can find in generated videos, whatever the DiT does."""
    d = components.defaults
    rng = np.random.default_rng(seed)
    out = []
    for prompt in prompts:
        video = shapes.render(shapes.spec_from_caption(prompt, rng), d["frames"], d["height"], d["width"])
        mean, _ = encode(components.encoder, to_pixels(video[None]))
        out.append(from_pixels(decode(components.decoder, mean))[0])
    return np.stack(out)


def frame_strip(videos: np.ndarray, frames: Sequence[int] | None = None, gap: int = 2) -> np.ndarray:
    """One row per video of the chosen frames (default first, middle, last): uint8 (rows·H, cols·W, 3)."""
    n, t, h, w, _ = videos.shape
    frames = list(frames) if frames is not None else [0, t // 2, t - 1]
    strip = np.full((n * (h + gap) - gap, len(frames) * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, video in enumerate(videos):
        for j, f in enumerate(frames):
            strip[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = video[f]
    return strip
