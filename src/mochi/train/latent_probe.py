"""Where a tiny model's latent space loses shape: issue 20's diagnostics (docs/embedded-model.md, v5-v7).

``separation`` and ``gain`` read the encoder alone; ``ceiling`` the encoder and decoder; ``probe`` the DiT
too. ``benchmarks/latent_probe.py`` prints them for a checkpoint or bundle. ``components`` is anything with
``encoder``, ``decoder`` and ``defaults`` (frames, height, width; ``steps`` for ``probe``), and for
``probe`` the bundle's ``dit``, ``tokenizer``, ``text_encoder`` and latent statistics.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from mochi.models.prompts import encode_prompts
from mochi.models.vae_tiling import decode, encode
from mochi.sampling.sampler import initial_noise, noise_to, sample
from mochi.sampling.schedules import linear_quadratic_schedule, truncate_schedule
from mochi.train import shapes
from mochi.train.evaluate import latent_statistics, reconstructions
from mochi.train.judge import judge
from mochi.train.train_vae import contrast, from_pixels, to_pixels

DIAGNOSTICS = ("separation", "gain", "ceiling", "probe")
PROBE_SIGMAS = (0.0, 0.1, 0.3)


def probe_clip(color: str, shape: str, background: str, defaults: dict) -> np.ndarray:
    """The fixed clip the encoder-only measures use: size 0.26, starting left of centre, moving right."""
    spec = shapes.ClipSpec(color, shape, "right", background, True, (0.3, 0.5), 0.26, 0.4)
    return shapes.render(spec, defaults["frames"], defaults["height"], defaults["width"])


@torch.no_grad()
def first_latent(encoder, video: np.ndarray) -> torch.Tensor:
    """The posterior mean's first latent frame of one uint8 clip (T, H, W, 3): (C, h, w)."""
    mean, _ = encode(encoder, to_pixels(video[None]))
    return mean[0, :, 0]


def separation(components, vocab: shapes.Vocab = shapes.DEFAULT_VOCAB) -> dict:
    """Per colour and background, the closest pair of shapes and its distance; the median over every pair."""
    rows, distances = [], []
    for background, color in itertools.product(vocab.backgrounds, vocab.colors):
        codes = {
            s: first_latent(components.encoder, probe_clip(color, s, background, components.defaults))
            for s in vocab.shapes
        }
        pairs = [
            (float((codes[a] - codes[b]).norm()), a, b) for a, b in itertools.combinations(vocab.shapes, 2)
        ]
        distances += [d for d, _, _ in pairs]
        d, a, b = min(pairs)
        rows.append({"color": color, "background": background, "pair": [a, b], "distance": d})
    median = float(np.median(distances))
    worst = min(rows, key=lambda r: r["distance"])
    return {
        "rows": rows,
        "median": median,
        "min": worst["distance"],
        "min_over_median": worst["distance"] / median,
        "worst": worst,
    }


def gain(components, vocab: shapes.Vocab = shapes.DEFAULT_VOCAB) -> dict:
    """Per colour and background: latent distance of a square from the empty background, per 100 levels."""
    rows = []
    for background in vocab.backgrounds:
        clip = probe_clip(vocab.colors[0], "square", background, components.defaults)
        rgb = np.array(shapes.BACKGROUNDS[background], np.uint8)
        empty = first_latent(components.encoder, np.broadcast_to(rgb, clip.shape))
        for color in vocab.colors:
            square = probe_clip(color, "square", background, components.defaults)
            moved = float((first_latent(components.encoder, square) - empty).norm())
            per_100 = 100 * moved / contrast(color, background)
            rows.append(
                {"color": color, "background": background, "distance": moved, "per_100_levels": per_100}
            )
    worst = min(rows, key=lambda r: r["per_100_levels"])
    return {"rows": rows, "min": worst["per_100_levels"], "worst": worst}


def probe_prompts() -> list[str]:
    """The prompts of ``ceiling`` and ``probe``: the evaluation prompts, training and held-out (52)."""
    return shapes.eval_prompts() + shapes.heldout_prompts()


def true_specs(seeds: Sequence[int], prompts: Sequence[str]) -> list[shapes.ClipSpec]:
    """One true clip per prompt for each generator seed (``shapes.spec_from_caption``)."""
    specs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        specs += [shapes.spec_from_caption(p, rng) for p in prompts]
    return specs


def _rates(specs, hits) -> dict:
    """Shape hit rate (%) over all clips, by background, and on gray by colour; a group without clips is left
    out."""

    def rate(keep):
        chosen = [h for s, h in zip(specs, hits) if keep(s)]
        return {"clips": len(chosen), "shape": 100 * sum(chosen) / len(chosen)} if chosen else None

    out = {"all": rate(lambda s: True)}
    out |= {bg: rate(lambda s, bg=bg: s.background == bg) for bg in shapes.BACKGROUNDS}
    out = {k: v for k, v in out.items() if v}
    out["gray_by_color"] = {
        c: rate(lambda s, c=c: s.background == "gray" and s.color == c) for c in shapes.COLORS
    }
    out["gray_by_color"] = {c: r for c, r in out["gray_by_color"].items() if r}
    return out


@torch.no_grad()
def ceiling(
    components, seeds: Sequence[int] = range(1000, 1004), prompts: Sequence[str] | None = None
) -> dict:
    """Shape hit rates of the strict judge on the VAE's reconstructions (posterior mean) of
    ``true_specs(seeds, prompts)`` (default: ``probe_prompts()``)."""
    prompts = list(prompts or probe_prompts())
    specs, hits = [], []
    for seed in seeds:
        # ``reconstructions`` draws its clips as ``true_specs`` does: one generator per seed, in prompt order.
        seed_specs = true_specs([seed], prompts)
        videos = reconstructions(components, prompts, seed)
        hits += [judge(v).shape == s.shape for v, s in zip(videos, seed_specs)]
        specs += seed_specs
    return _rates(specs, hits)


@torch.no_grad()
def probe(
    components,
    sigmas: Sequence[float] = PROBE_SIGMAS,
    seeds: Sequence[int] = range(1000, 1002),
    prompts: Sequence[str] | None = None,
    guidance: float = 2.0,
    batch: int = 8,
) -> dict:
    """Shape hit rates per start σ (keys ``f"{σ:g}"``): the true clips of ``true_specs(seeds, prompts)``
    encoded, normalised, noised to σ and denoised by the DiT along the tail of the default schedule under
    their prompts, then decoded and judged. σ = 0 decodes the normalised code as it is. Clip ``i`` of the
    batch starting at prompt ``lo`` under generator seed ``s`` takes noise seed ``s·100 + lo + i``."""
    d = components.defaults
    mu, sd = latent_statistics(components)
    null = encode_prompts([""], components.tokenizer, components.text_encoder)
    schedule = linear_quadratic_schedule(d["steps"])
    prompts = list(prompts or probe_prompts())
    specs, hits = [], {sigma: [] for sigma in sigmas}
    for seed in seeds:
        seed_specs = true_specs([seed], prompts)
        for lo in range(0, len(prompts), batch):
            chunk = seed_specs[lo : lo + batch]
            pixels = to_pixels(
                np.stack([shapes.render(s, d["frames"], d["height"], d["width"]) for s in chunk])
            )
            z0 = (encode(components.encoder, pixels)[0] - mu) / sd
            noise = torch.cat(
                [initial_noise((1, *z0.shape[1:]), seed * 100 + lo + i) for i in range(len(chunk))]
            )
            text = encode_prompts(prompts[lo : lo + batch], components.tokenizer, components.text_encoder)
            for sigma in sigmas:
                z = z0
                if sigma > 0:
                    z = sample(
                        components.dit,
                        noise_to(z0, sigma, noise),
                        truncate_schedule(schedule, sigma),
                        text,
                        null,
                        guidance=guidance,
                    )
                videos = from_pixels(decode(components.decoder, z * sd + mu))
                hits[sigma] += [judge(v).shape == s.shape for v, s in zip(videos, chunk)]
            specs += chunk
    return {f"{sigma:g}": _rates(specs, hits[sigma]) for sigma in sigmas}
