"""Peak memory of encoding with the released VAE encoder on CPU, against `estimate_encode_memory`.

    PYTHONPATH=src python benchmarks/vae_encode_memory.py [--frames 13] [--size 96]

Peak memory is measured as in vae_vs_diffusers.py (glibc mmap threshold fixed, kernel high-water mark
reset before each run; weights and the input video are resident before the run and so excluded).
"""

from __future__ import annotations

import argparse

from measure import MB, measure, reexec_with_mmap_malloc  # noqa: E402 - a sibling script module

reexec_with_mmap_malloc()

import torch  # noqa: E402

from mochi.models.vae import ENCODER_PRESETS, Encoder, num_latents_for_frames  # noqa: E402
from mochi.models.vae_memory import estimate_encode_memory  # noqa: E402
from mochi.models.vae_tiling import encode, tile_layout  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=13)
    p.add_argument("--size", type=int, default=96, help="height = width in pixels (multiple of 8)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.frames < 1 or args.size < 8 or args.size % 8:
        p.error(f"--frames {args.frames} --size {args.size}: frames at least 1, size a multiple of 8 (≥ 8)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    enc = Encoder(ENCODER_PRESETS["mochi-1-preview"]).to(memory_format=torch.channels_last_3d).eval()
    x = torch.rand(1, 3, args.frames, args.size, args.size) * 2 - 1
    t, h = num_latents_for_frames(args.frames), args.size // 8
    print(
        f"encoder: mochi-1-preview, fp32, video (1, 3, {args.frames}, {args.size}, {args.size}), latent t={t}"
    )
    print(f"{'split':32s} {'time s':>7s} {'measured MB':>12s} {'estimate MB':>12s} {'ratio':>6s}")
    encode(enc, x, chunk=1)  # untimed warm-up: the process's one-time growth stays out of the first row
    for tile, overlap, chunk in [(None, 6, None), (None, 6, 1), (h * 2 // 3, 4, None)]:
        _, dt, peak = measure(
            lambda tile=tile, overlap=overlap, chunk=chunk: encode(
                enc, x, tile=tile, overlap=overlap, chunk=chunk
            )
        )
        size = tile_layout(h, tile, overlap)[1] if tile else h
        est = estimate_encode_memory(enc.cfg, (1, t, h, h), (size, size), chunk or t)
        name = f"tile {size if tile else 'none'}, overlap {overlap}, chunk {chunk or t}"
        print(f"{name:32s} {dt:7.1f} {peak / MB:12.0f} {est / MB:12.0f} {est / peak:6.2f}")


if __name__ == "__main__":
    main()
