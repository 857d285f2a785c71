"""Repeated H.264 encodes of the same frames: distinct files, size and PSNR, with and without mb-tree.

Issue 18 found libx264's mb-tree rate control giving different files for identical frames (10 of 12 on a
many-core machine); ``mochi.video`` now encodes with ``no-mbtree=1``. This prints, for each setting and
size, how many distinct files N encodes gave, the mean file size and the PSNR of the decoded frames
against the source, so the cost of the change is visible. Content: the embedded model's video at 64x64
and, at 848x480, that video upscaled (bilinear) with light grain, as generated video looks.

    PYTHONPATH=src python benchmarks/x264_determinism.py [--encodes 12] [--frames 25]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.video import encode_video, read_video

SETTINGS = {"mb-tree (before)": "", "no-mbtree=1 (now)": "no-mbtree=1"}


def _encode(pixels: np.ndarray, path: Path, params: str) -> bytes:
    import mochi.video

    saved, mochi.video.X264_PARAMS = mochi.video.X264_PARAMS, params
    try:
        encode_video(pixels, path, Fraction(30))
    finally:
        mochi.video.X264_PARAMS = saved
    return path.read_bytes()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encodes", type=int, default=12)
    parser.add_argument("--frames", type=int, default=25)
    args = parser.parse_args()
    pipe = MochiPipeline.from_pretrained(device="cpu")
    small = pipe.generate(GenerationRequest("a red circle moving right", seed=1, frames=args.frames))
    small = small.frames[0].numpy()
    big = torch.nn.functional.interpolate(
        torch.from_numpy(small).permute(0, 3, 1, 2).float(), size=(480, 848), mode="bilinear"
    )
    grain = torch.randn(big.shape, generator=torch.Generator().manual_seed(0)) * 3
    big = (big + grain).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        for name, pixels in (("64x64", small), ("848x480", big)):
            for setting, params in SETTINGS.items():
                path = Path(tmp) / "v.mp4"
                files = [_encode(pixels, path, params) for _ in range(args.encodes)]
                distinct = len({hashlib.sha256(f).hexdigest() for f in files})
                decoded, _ = read_video(path)
                size = np.mean([len(f) for f in files]) / 1e3
                print(
                    f"{name:8s} {setting:18s} distinct files {distinct:2d}/{args.encodes}  "
                    f"size {size:8.1f} kB  PSNR {_psnr(decoded, pixels):.2f} dB"
                )


if __name__ == "__main__":
    main()
