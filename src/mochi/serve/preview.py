"""Cheap previews while sampling: a linear 12 → 3 map from DiT-space latents to RGB, written as PNG.

At each step the sampler's current estimate of the clean latent, x0 = z + σ·v (``sample``'s ``denoised``
hook), is mapped pixel by pixel with ``rgb = x0ᵀ·W + b`` (W 12×3, b 3, output in [-1, 1]); each latent pixel
stands for an 8×8 patch of 6 frames, so a 480×848 video previews at 60×106. This costs one tiny matmul,
against the seconds a VAE decode would take.

The factors come from a small JSON file in ``mochi/assets`` chosen by the model:
  - the released VAE (``latent_mean`` None): ``mochi-1-preview.preview.json``, the "latent_rgb_factors" and
    bias that ComfyUI publishes for Mochi latents (``comfy/latent_formats.py``, class ``Mochi``, commit
    040a3243468ecefd1f2802592d90458f1ce4d65f), which apply to the same normalised space as ours
    ((z − mean)/std with Genmo's per-channel statistics);
  - the embedded model: ``mochi-tiny.preview.json``, fitted here by least squares from generated latents
    to their decoded frames averaged over each latent pixel's patch (``fit_factors``; remake with
    ``python -m mochi.serve.preview fit``).
A model with neither falls back to the released factors, and ``/api/info`` says which are in use.

PNG is written with zlib here (some 15 lines) rather than adding Pillow to the serve extra for one call.
"""

from __future__ import annotations

import argparse
import json
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from fastapi.responses import Response

from mochi.request import TEMPORAL_COMPRESSION
from mochi.serve.errors import documented, quote

RELEASED = "mochi-1-preview"
# The most latent frames a preview shows side by side (evenly spaced through the clip).
PREVIEW_FRAMES = 4
# About this many previews per job (and always one at the last step).
PREVIEWS_PER_JOB = 12


def every(total: int) -> int:
    """The step interval between previews of a ``total``-step run."""
    return max(1, round(total / PREVIEWS_PER_JOB))


@dataclass(frozen=True)
class RgbMap:
    """rgb = latentᵀ·weight + bias per latent pixel; weight (12, 3), bias (3,), output in [-1, 1]."""

    weight: tuple[tuple[float, ...], ...]
    bias: tuple[float, ...]
    source: str

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (12, t, h, w) → RGB (t, h, w, 3) uint8."""
        w = torch.tensor(self.weight, dtype=torch.float32, device=latents.device)
        b = torch.tensor(self.bias, dtype=torch.float32, device=latents.device)
        rgb = torch.einsum("cthw,cr->thwr", latents.float(), w) + b
        return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def load_map(name: str) -> RgbMap:
    """The factors stored in ``mochi/assets/<name>.preview.json``."""
    text = resources.files("mochi").joinpath(f"assets/{name}.preview.json").read_text(encoding="utf-8")
    data = json.loads(text)
    weight = tuple(tuple(float(x) for x in row) for row in data["weight"])
    if len(weight) != 12 or any(len(row) != 3 for row in weight) or len(data["bias"]) != 3:
        raise ValueError(f"{name}.preview.json must hold weight 12×3 and bias 3")
    return RgbMap(weight, tuple(float(x) for x in data["bias"]), data["source"])


def map_for(components: object) -> RgbMap:
    """The factors for a model: its own file when ``assets`` has one, else the released model's."""
    name = getattr(components, "name", "")
    if getattr(components, "latent_mean", None) is not None:
        try:
            return load_map(name)
        except (FileNotFoundError, OSError):
            pass
    return load_map(RELEASED)


def preview_image(x0: torch.Tensor, rgb_map: RgbMap, frames: int = PREVIEW_FRAMES) -> np.ndarray:
    """The first video of x0 (B, 12, t, h, w) as up to ``frames`` latent frames side by side, each of
    its first, middle and last: (h, n·w + (n−1), 3) uint8 with 1-pixel dark gaps."""
    t = x0.shape[2]
    picks = sorted({round(i * (t - 1) / max(1, frames - 1)) for i in range(frames)}) if t > 1 else [0]
    images = rgb_map.apply(x0[0, :, picks]).numpy()  # n h w 3
    n, h, w, _ = images.shape
    strip = np.full((h, n * w + n - 1, 3), 24, dtype=np.uint8)
    for i, image in enumerate(images):
        strip[:, i * (w + 1) : i * (w + 1) + w] = image
    return strip


def encode_png(image: np.ndarray) -> bytes:
    """RGB (H, W, 3) uint8 → PNG bytes (8-bit truecolour, no filtering)."""
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, image.shape
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def patch_targets(frames: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
    """Decoded frames (T, H, W, 3) uint8, T = 6t − 5 → the mean colour of each latent pixel's patch,
    (t, h, w, 3) in [-1, 1]. Latent frame 0 stands for frame 0 alone, frame k ≥ 1 for frames 6k−5 … 6k
    (the VAE's causal time compression)."""
    x = frames.float() / 127.5 - 1.0
    groups = [x[:1]] + [x[6 * k - 5 : 6 * k + 1] for k in range(1, t)]
    assert x.shape[0] == TEMPORAL_COMPRESSION * (t - 1) + 1, (x.shape, t)
    means = torch.stack([g.mean(0) for g in groups])  # t H W 3
    pooled = torch.nn.functional.avg_pool2d(
        means.permute(0, 3, 1, 2), kernel_size=(x.shape[1] // h, x.shape[2] // w)
    )
    return pooled.permute(0, 2, 3, 1)


def fit_factors(
    latents: list[torch.Tensor], frames: list[torch.Tensor]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares W (12, 3), b (3,) with patch colour ≈ latentᵀ·W + b over every latent pixel given.

    latents: each (12, t, h, w) DiT-space; frames: each (6t−5, 8h, 8w, 3) uint8, its decode. Returns W, b
    and the root-mean-square error of the fit in [-1, 1] units.
    """
    xs, ys = [], []
    for z, f in zip(latents, frames, strict=True):
        _, t, h, w = z.shape
        xs.append(z.float().permute(1, 2, 3, 0).reshape(-1, 12))
        ys.append(patch_targets(f, t, h, w).reshape(-1, 3))
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # 13 × 3
    rmse = float((design @ solution - y).pow(2).mean().sqrt())
    return solution[:12].numpy(), solution[12].numpy(), rmse


def add_routes(app: Any, jobs: Any, auth: list) -> None:
    """``GET /api/jobs/{id}/preview``: the latest preview PNG of a job (404 before its first)."""

    @app.get(
        "/api/jobs/{job_id}/preview",
        dependencies=auth,
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **documented(400, 401, 404, 422)},
        tags=["jobs"],
    )
    def job_preview(job_id: str) -> Response:
        """The latest preview of a job while it denoises (and after): up to 4 latent frames side by side,
        each latent pixel one pixel (an 8×8 patch of the video). The job's ``preview_step`` says which
        step it shows; 404 until the first preview exists."""
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {quote(job_id)} on this server")
        png = job.preview
        if png is None and job.finished is not None:  # "yet" invited retries
            raise HTTPException(
                404,
                f"job {quote(job_id)} has no preview (status {job.status}): previews are kept in memory, so "
                "a job that ended before its first, or one read back after a restart, has none",
            )
        if png is None:
            raise HTTPException(404, f"job {quote(job_id)} has no preview yet (status {job.status})")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


def _fit_embedded(out: str, seeds: int) -> None:
    from mochi.pipeline import MochiPipeline
    from mochi.request import GenerationRequest
    from mochi.train.shapes import COLORS, DIRECTIONS, SHAPES

    torch.set_num_threads(1)
    pipe = MochiPipeline.from_pretrained(None, device="cpu")
    colors, shapes, directions = list(COLORS), list(SHAPES), list(DIRECTIONS)
    latents, frames = [], []
    for i in range(seeds):
        prompt = f"a {colors[i % len(colors)]} {shapes[i % len(shapes)]} moving {directions[i % 4]}"
        prompt += " on a gray background" if i % 3 == 2 else ""
        result = pipe.generate(GenerationRequest(prompt, seed=1000 + i))
        latents.append(result.latents[0])
        frames.append(result.frames[0])
    cut = len(latents) * 3 // 4  # a quarter held out to report the error on unseen videos
    weight, bias, rmse = fit_factors(latents[:cut], frames[:cut])
    held = _rmse(weight, bias, latents[cut:], frames[cut:])
    # Baselines on the held-out videos: every pixel the fitted videos' mean colour; the released factors.
    mean = torch.cat(
        [patch_targets(f, *z.shape[1:]).reshape(-1, 3) for z, f in zip(latents[:cut], frames[:cut])]
    )
    flat = _rmse(np.zeros((12, 3)), mean.mean(0).double().numpy(), latents[cut:], frames[cut:])
    released = load_map(RELEASED)
    comfy = _rmse(np.array(released.weight), np.array(released.bias), latents[cut:], frames[cut:])
    data = {
        "source": (
            f"least squares over {cut} videos of the embedded model (seeds 1000-{999 + cut}, "
            f"`python -m mochi.serve.preview fit`); RMS error {rmse:.3f} fitted, {held:.3f} on "
            f"{len(latents) - cut} held-out videos (the mean colour: {flat:.3f}; the released model's "
            f"factors: {comfy:.3f}), in [-1, 1] units"
        ),
        "weight": [[round(float(v), 5) for v in row] for row in weight],
        "bias": [round(float(v), 5) for v in bias],
    }
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")
    print(data["source"])


def _rmse(weight: np.ndarray, bias: np.ndarray, latents: list, frames: list) -> float:
    errors = []
    for z, f in zip(latents, frames, strict=True):
        _, t, h, w = z.shape
        x = z.float().permute(1, 2, 3, 0).reshape(-1, 12).double()
        y = patch_targets(f, t, h, w).reshape(-1, 3).double()
        errors.append((x @ torch.from_numpy(weight) + torch.from_numpy(bias) - y).pow(2))
    return float(torch.cat(errors).mean().sqrt())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fit the embedded model's latent → RGB preview factors")
    parser.add_argument("command", choices=["fit"])
    parser.add_argument(
        "--out", default=str(resources.files("mochi").joinpath("assets/mochi-tiny.preview.json"))
    )
    parser.add_argument("--videos", type=int, default=32)
    args = parser.parse_args()
    _fit_embedded(args.out, args.videos)
