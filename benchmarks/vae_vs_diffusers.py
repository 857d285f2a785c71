"""Decode with the released VAE decoder on CPU: mochi vs diffusers' AutoencoderKLMochi, same weights.

    PYTHONPATH=src python benchmarks/vae_vs_diffusers.py [--latent 3 16 16] [--tile 12] [--overlap 4]

Both decoders hold the same tensors (random init, fp32) and decode the same latent, untiled and tiled
at equal tile sizes (diffusers: tile 8·tile px, stride 8·(tile−overlap) px; ours: tile ≤ `tile`
latents, overlap `overlap` latents (the same blend width) and `overlap`+2), plus an untiled decode in
temporal chunks of `chunk` latent frames (exact).

How peak memory is measured on CPU: PyTorch has no CPU allocator statistics, so the script re-runs
itself with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB, so that every tensor buffer is its own
mmap and is returned to the OS when freed; resident memory then follows live tensors. Before each run
the kernel's high-water mark is reset (`echo 5 > /proc/self/clear_refs`); after it, peak activation
memory = VmHWM − VmRSS before the run. Weights are resident before the run and so excluded; the output
video is included for both.

Also printed: the estimated peak memory of decoding a 163-frame 480×848 video with the chosen tiling,
and the estimate against the measured runs of this script.
"""

from __future__ import annotations

import argparse

from measure import MB, measure, reexec_with_mmap_malloc  # noqa: E402 - a sibling script module

reexec_with_mmap_malloc()

import torch  # noqa: E402
from diffusers import AutoencoderKLMochi  # noqa: E402

from mochi.models.vae import DECODER_PRESETS, Decoder  # noqa: E402
from mochi.models.vae_memory import estimate_decode_memory  # noqa: E402
from mochi.models.vae_tiling import decode, plan_decode, tile_layout  # noqa: E402
from mochi.weights.io import load_strict  # noqa: E402
from mochi.weights.keymaps.vae_diffusers import decoder_pairs, from_diffusers  # noqa: E402

GIB = 1024**3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent", type=int, nargs=3, default=(3, 16, 16), metavar=("T", "H", "W"))
    p.add_argument("--tile", type=int, default=12, help="tile in latent cells (diffusers: 8× in px)")
    p.add_argument("--overlap", type=int, default=4, help="tile overlap in latent cells")
    p.add_argument("--chunk", type=int, default=1, help="latent frames per step, untiled chunked run")
    p.add_argument("--tile-chunk", type=int, default=0, help="latent frames per step in tiled runs (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="mochi-1-preview", choices=sorted(DECODER_PRESETS))
    args = p.parse_args()
    if min(args.latent) < 1 or args.chunk < 1 or args.tile_chunk < 0:
        p.error("--latent sizes and --chunk must be at least 1, --tile-chunk at least 0")
    if not 0 <= args.overlap < args.tile - 2:
        ov, tile, near = args.overlap, args.tile, max(0, min(args.overlap, args.tile - 3))
        p.error(
            f"--overlap {ov} with --tile {tile}: the tiled runs use overlaps {ov} and {ov + 2}, both "
            f"below the tile; try --overlap {near}" + ("" if tile >= 3 else " with --tile 3 or more")
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = DECODER_PRESETS[args.preset]
    ch = cfg.channels
    ref = AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32),  # the encoder is not benchmarked; keep it small
        decoder_block_out_channels=tuple(ch),
        layers_per_block=cfg.num_res_blocks,
    ).eval()
    ref.encoder = None
    sd = {k: v for k, v in ref.state_dict().items() if k.startswith("decoder.")}
    with torch.device("meta"):
        ours = Decoder(cfg)
    load_strict(ours, from_diffusers(sd, decoder_pairs(cfg)), "diffusers")
    # As load_vae_decoder does: conv weights in channels-last (a copy of the same values).
    ours.to(memory_format=torch.channels_last_3d).eval()
    overlaps = (args.overlap, args.overlap + 2)
    t, h, w = args.latent
    z = torch.randn(1, 12, t, h, w)
    tile_px, stride_px = 8 * args.tile, 8 * (args.tile - args.overlap)
    n_params = sum(v.numel() for v in ours.state_dict().values())
    print(f"decoder: {args.preset}, {n_params:,} params, fp32, {args.threads} threads")
    print(f"latent (1, 12, {t}, {h}, {w}) → video (1, 3, {6 * t - 5}, {8 * h}, {8 * w})")
    print(
        f"tiles: diffusers {tile_px}px / stride {stride_px}px; ours ≤{args.tile} latents, overlap "
        f"{args.overlap} or {args.overlap + 2}; chunked run: {args.chunk} latent frame(s) per step\n"
    )

    runs = {}
    with torch.inference_mode():
        ref.disable_tiling()
        # Untimed warm-ups: the first decode in the process grows it once (code, allocator arenas), and
        # charged that to whichever side ran first (diffusers: 60 MB cold vs 48 MB warm at --preset tiny).
        ref.decode(z)
        decode(ours, z)
        runs["diffusers untiled"] = measure(lambda: ref.decode(z).sample)
        runs["mochi untiled"] = measure(lambda: decode(ours, z))
        runs["mochi chunked (exact)"] = measure(lambda: decode(ours, z, chunk=args.chunk))
        ref.enable_tiling(
            tile_sample_min_height=tile_px,
            tile_sample_min_width=tile_px,
            tile_sample_stride_height=stride_px,
            tile_sample_stride_width=stride_px,
        )
        runs["diffusers tiled"] = measure(lambda: ref.decode(z).sample)
        for ov in overlaps:
            runs[f"mochi tiled (overlap {ov})"] = measure(
                lambda ov=ov: decode(ours, z, tile=args.tile, overlap=ov, chunk=args.tile_chunk or None)
            )

    print(f"{'run':26s} {'time s':>8s} {'peak act MB':>12s} {'time ×':>7s} {'mem ×':>7s}")
    for name, (_, dt, peak) in runs.items():
        base = runs["diffusers tiled" if "tiled" in name and "untiled" not in name else "diffusers untiled"]
        print(f"{name:26s} {dt:8.2f} {peak / MB:12.0f} {dt / base[1]:7.2f} {peak / base[2]:7.2f}")

    ref_full, ours_full = runs["diffusers untiled"][0], runs["mochi untiled"][0]
    print(
        "\nquality (random weights; mean |untiled| "
        f"diffusers {ref_full.abs().mean():.3f}, mochi {ours_full.abs().mean():.3f}):"
    )
    for name in [n for n in runs if "untiled" not in n]:
        full = ref_full if name.startswith("diffusers") else ours_full
        d = (runs[name][0] - full).abs()
        print(f"  {name:26s} vs own untiled: max abs {d.max():.4f}, mean abs {d.mean():.5f}")
    agree = 8 * cfg.num_res_blocks[-3] - 1 + 4 * (cfg.num_res_blocks[-4] + cfg.num_res_blocks[0])
    if ours_full.shape[2] > agree:
        d = (ours_full - ref_full)[:, :, agree:].abs().max()
        print(f"  mochi untiled vs diffusers untiled, frames ≥ {agree}: max abs {d:.2e}")
    else:
        print(f"  (mochi and diffusers agree only from frame {agree} on: Genmo's in-block frame dropping)")

    print("\nestimate vs measured (mochi):")
    shape = (1, t, h, w)
    checks = {
        "mochi untiled": ((h, w), t),
        "mochi chunked (exact)": ((h, w), args.chunk),
    }
    for ov in overlaps:
        tile = (tile_layout(h, args.tile, ov)[1], tile_layout(w, args.tile, ov)[1])
        checks[f"mochi tiled (overlap {ov})"] = (tile, args.tile_chunk or t)
    for name, (tile, chunk) in checks.items():
        est = estimate_decode_memory(cfg, shape, tile, chunk)
        got = runs[name][2]
        print(f"  {name:26s} estimate {est / MB:8.0f} MB, measured {got / MB:8.0f} MB, ratio {est / got:.2f}")

    big = (1, 28, 60, 106)
    print("\n163 frames × 480×848 (latent 28×60×106), estimated peak (weights excluded, output included):")
    th, tw = tile_layout(60, args.tile, args.overlap)[1], tile_layout(106, args.tile, args.overlap)[1]
    whole = estimate_decode_memory(cfg, big, (60, 106), 28)
    print(f"  untiled, one pass (fp32):        {whole / GIB:7.2f} GiB")
    for chunk in (28, 2, 1):
        tiled = estimate_decode_memory(cfg, big, (th, tw), chunk)
        print(f"  tile {th}×{tw}, overlap {args.overlap}, chunk {chunk:2d}:  {tiled / GIB:7.2f} GiB")
    for budget_gib in (4, 8, 16):
        plan = plan_decode(ours, big, budget_gib * GIB)
        est = estimate_decode_memory(cfg, big, plan.tile, plan.chunk)
        print(f"  max_memory {budget_gib:2d} GiB → tile {plan.tile}, chunk {plan.chunk}: {est / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
