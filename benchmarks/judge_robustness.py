"""How often the shapes judge is right on rendered clips, clean and after lossy distortions.

Renders one random clip for every colour, shape (star and wedge included), direction and background (320
clips per repeat) at 64x64 and 25 frames, distorts it, judges it, and prints the accuracy per field and the
shape confusion. Distortions: Gaussian blur (sigma in pixels) plus Gaussian noise, and block-average
downsampling by a factor followed by bilinear upsampling (a crude stand-in for a weak VAE).

    PYTHONPATH=src python benchmarks/judge_robustness.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections import Counter

import numpy as np
from measure import at_least  # a sibling script module

from mochi.train import judge as J
from mochi.train import shapes as S


def blur_noise(video: np.ndarray, sigma: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    v = video.astype(np.float32)
    if sigma > 0:
        r = math.ceil(3 * sigma)
        kernel = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
        kernel /= kernel.sum()
        h, w = video.shape[1:3]
        v = np.pad(v, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
        v = sum(k * v[:, i : i + h] for i, k in enumerate(kernel))
        v = sum(k * v[:, :, i : i + w] for i, k in enumerate(kernel))
    v = v + rng.normal(0.0, noise, v.shape)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def down_up(video: np.ndarray, factor: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    t, h, w, _ = video.shape
    small = video.astype(np.float32).reshape(t, h // factor, factor, w // factor, factor, 3).mean(axis=(2, 4))

    def upsample(a: np.ndarray, axis: int, n: int) -> np.ndarray:
        pos = np.clip((np.arange(n) + 0.5) / factor - 0.5, 0, a.shape[axis] - 1)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, a.shape[axis] - 1)
        shape = [1] * a.ndim
        shape[axis] = n
        weight = (pos - i0).reshape(shape)
        return np.take(a, i0, axis) * (1 - weight) + np.take(a, i1, axis) * weight

    v = upsample(upsample(small, 1, h), 2, w) + rng.normal(0.0, noise, video.shape)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    at_least(parser, ("--repeats", args.repeats, 1))
    conditions = {
        "clean": lambda v, rng: v,
        "blur 1.0 + noise 6": lambda v, rng: blur_noise(v, 1.0, 6.0, rng),
        "blur 1.5 + noise 8": lambda v, rng: blur_noise(v, 1.5, 8.0, rng),
        "blur 2.0 + noise 8": lambda v, rng: blur_noise(v, 2.0, 8.0, rng),
        "down/up x2 + noise 4": lambda v, rng: down_up(v, 2, 4.0, rng),
        "down/up x4 + noise 4": lambda v, rng: down_up(v, 4, 4.0, rng),
    }
    fill: dict[str, list[float]] = {s: [] for s in S.SHAPES}
    for name, distort in conditions.items():
        rng = np.random.default_rng(0)
        hits, n, confusion = Counter(), 0, Counter()
        for combo in itertools.product(S.COLORS, S.SHAPES, S.DIRECTIONS, S.BACKGROUNDS, range(args.repeats)):
            spec = S.sample_spec(rng, S.Vocab(*((w,) for w in combo[:4])), allow_heldout=True)
            verdict = J.judge(distort(S.render(spec), rng))
            n += 1
            for key in ("color", "shape", "direction"):
                hits[key] += getattr(verdict, key) == getattr(spec, key)
            if verdict.shape != spec.shape:
                confusion[f"{spec.shape}->{verdict.shape}"] += 1
            if name == "clean":
                fill[spec.shape].append(verdict.fill)
        scores = "  ".join(f"{k} {hits[k] / n:6.1%}" for k in ("color", "shape", "direction"))
        print(f"{name:22s} n={n}  {scores}  {dict(confusion) or ''}")
    print("fill ratio of the bounding box on clean clips (mean, sd, min, max):")
    for shape, values in fill.items():
        v = np.array(values)
        print(f"  {shape:9s} {v.mean():.3f} {v.std():.3f} {v.min():.3f} {v.max():.3f}")


if __name__ == "__main__":
    main()
