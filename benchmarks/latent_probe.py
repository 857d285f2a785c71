"""Where a tiny model's latent space loses shape: issue 20's four diagnostics (docs/embedded-model.md, v5-v7).

- ``separation``: the smallest distance between two shapes of one colour and background. Measured at the
  first latent frame (posterior mean) of clips that differ only in shape, for each colour and background,
  with the median over all such pairs. Shapes a few hundredths of the median apart are the ones any DiT's
  small errors at low σ turn into one another.
- ``gain``: how far a square of each colour moves the first latent frame from the empty background, per 100
  RGB levels of contrast. A colour the encoder barely sees (v3: green on gray) has a low gain, and every
  shape of it is a faint smudge in the latent.
- ``ceiling``: the strict judge on reconstructions (posterior mean) of true clips of the evaluation prompts,
  by background and, on gray, by colour. No DiT on this VAE draws better shapes.
- ``probe`` (a bundle only): true codes noised to σ and denoised by the DiT (guidance 2), judged. It shows
  where along the schedule generation loses shape (σ = 0 is the reconstruction itself).

``separation`` and ``gain`` read the encoder alone, so they rate a ``vae`` stage checkpoint from step 1000
(``encoder_steps``) on, before any DiT exists: ``vae --seed N`` draws encoders to pick among on them. None of
the four reads an adherence seed. The clips of ``ceiling`` and ``probe`` come from generator seeds 1000 and
up.

    PYTHONPATH=src python benchmarks/latent_probe.py                           # the embedded model, all four
    PYTHONPATH=src python benchmarks/latent_probe.py runs/S2/vae.ckpt --only separation gain
    PYTHONPATH=src python benchmarks/latent_probe.py MODEL.safetensors --json probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vae_quality import vae_components  # noqa: E402

from mochi.files import atomic_path  # noqa: E402
from mochi.train import shapes  # noqa: E402
from mochi.train.latent_probe import DIAGNOSTICS, PROBE_SIGMAS, ceiling, gain, probe, separation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "checkpoint",
        nargs="?",
        help="a vae.ckpt, a decoder.ckpt (with --source) or a bundle (default: the embedded model)",
    )
    ap.add_argument("--source", help="a decoder.ckpt's source: a vae.ckpt or a bundle (gives the encoder)")
    ap.add_argument("--preset", default="mochi-tiny", help="the checkpoint's model preset")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=DIAGNOSTICS,
        help="run these diagnostics (default: all that the checkpoint allows; probe needs a bundle)",
    )
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(PROBE_SIGMAS), help="probe: start sigmas")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    bad = [s for s in args.sigmas if not 0.0 <= s < 1.0]
    if bad:
        ap.error(f"--sigmas must lie in [0, 1), got {bad[0]}")
    torch.set_num_threads(args.threads)
    components = vae_components(args.checkpoint, args.preset, args.source)
    has_dit = getattr(components, "dit", None) is not None
    chosen = args.only or [d for d in DIAGNOSTICS if d != "probe" or has_dit]
    if "probe" in chosen and not has_dit:
        ap.error(
            f"probe needs a DiT: {args.checkpoint!r} is not a bundle; give a .safetensors bundle or drop it"
        )
    figures = {"checkpoint": args.checkpoint or "embedded model"}
    print(f"latent probe: {figures['checkpoint']}")
    if "separation" in chosen:
        sep = figures["separation"] = separation(components)
        w = sep["worst"]
        print(
            f"separation: smallest {sep['min']:.2f} ({w['color']} {w['pair'][0]}/{w['pair'][1]} on "
            f"{w['background']}), median {sep['median']:.2f}, ratio {sep['min_over_median']:.3f}"
        )
        for bg in shapes.BACKGROUNDS:
            row = "  ".join(f"{r['color']} {r['distance']:.2f}" for r in sep["rows"] if r["background"] == bg)
            print(f"  {bg:5s}: {row}")
    if "gain" in chosen:
        g = figures["gain"] = gain(components)
        w = g["worst"]
        print(f"gain per 100 levels: lowest {g['min']:.1f} ({w['color']} on {w['background']})")
        for bg in shapes.BACKGROUNDS:
            row = "  ".join(
                f"{r['color']} {r['per_100_levels']:.1f}" for r in g["rows"] if r["background"] == bg
            )
            print(f"  {bg:5s}: {row}")
    for name in ("ceiling", "probe"):
        if name not in chosen:
            continue
        result = ceiling(components) if name == "ceiling" else probe(components, args.sigmas)
        figures[name] = result
        for label, rates in (
            [("reconstructions", result)]
            if name == "ceiling"
            else [(f"from sigma {k}", v) for k, v in result.items()]
        ):
            by_color = " ".join(f"{c} {r['shape']:.0f}" for c, r in rates["gray_by_color"].items())
            print(
                f"{name} {label}: shape {rates['all']['shape']:.1f}% of {rates['all']['clips']} (black "
                f"{rates['black']['shape']:.1f} / gray {rates['gray']['shape']:.1f}); gray by colour: "
                f"{by_color}"
            )
    if args.json:
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
