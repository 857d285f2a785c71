"""Video-to-video on the embedded model: does the output take the prompt's change and keep the clip?

For ``--clips`` clips of the shapes world (``shapes.spec_at(--data-seed, i)``, never seen in training:
the training data seeds are 0 and 1) the prompt asks for the same clip in another colour ("a red circle
moving right" → "a blue circle moving right"), and ``MochiPipeline.generate`` runs from the clip at each
``--strength``, once with the Euler sampler (``eta`` 0) and once with the model's own sampler (the
embedded model's default: the ancestral sampler, η = 1 above σ = 0.3). Each video is judged
(``mochi.train.judge``, strict) against the prompt, and compared with the ideal answer: the source clip
rendered again in the new colour (same shape, position and motion), by PSNR.

Printed per strength and sampler: the share of videos in the new colour, with the source's shape and
direction (and all three), and the mean PSNR to the ideal answer and to the source clip. A low strength
keeps the clip (high PSNR to the source) and ignores the prompt; a high one takes the prompt and keeps
less of the clip.

    PYTHONPATH=src python benchmarks/video_to_video.py [--clips 32] [--strength 0.5 0.7 0.9] [--seed 0]
        [--model BUNDLE] [--threads 1]

Video i uses noise seed ``--seed + i`` at every strength and with both samplers.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.train import shapes
from mochi.train.judge import judge, psnr


def recolored(spec: shapes.ClipSpec, index: int) -> shapes.ClipSpec:
    """The clip in another colour of the default vocabulary (cycling through them by ``index``)."""
    others = [c for c in shapes.DEFAULT_VOCAB.colors if c != spec.color]
    return dataclasses.replace(spec, color=others[index % len(others)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a mochi bundle (default: the embedded model)")
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--strength", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--seed", type=int, default=0, help="noise seed of the first video")
    ap.add_argument("--data-seed", type=int, default=777, help="dataset seed of the source clips")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.clips < 1:  # measure.at_least's rule; this script is also loaded by tests without benchmarks/
        ap.error(f"--clips {args.clips}: must be at least 1")
    if not all(0 < s <= 1 for s in args.strength):
        ap.error(f"--strength {args.strength}: each must be in (0, 1]")
    torch.set_num_threads(args.threads)

    pipe = MochiPipeline.from_pretrained(args.model, device="cpu")
    d = pipe.components.defaults
    frames, height, width = d["frames"], d["height"], d["width"]
    model_eta = (d.get("eta", 0.0), d.get("eta_above", 0.0))
    print(f"model {args.model or 'mochi-tiny (embedded)'}: defaults {d}")
    samplers = {"euler": (0.0, 0.0), f"model's (eta {model_eta[0]:g} above {model_eta[1]:g})": model_eta}
    jobs = []
    for i in range(args.clips):
        spec = shapes.spec_at(args.data_seed, i)
        target = recolored(spec, i)
        jobs.append((spec, target, shapes.caption(target)))

    started = time.perf_counter()
    rows = []
    for strength in args.strength:
        for name, (eta, eta_above) in samplers.items():
            hits = {"color": 0, "shape": 0, "direction": 0, "all": 0}
            to_ideal, to_source = [], []
            for i, (spec, target, prompt) in enumerate(jobs):
                source = shapes.render(spec, frames, height, width)
                request = GenerationRequest(
                    prompt, seed=args.seed + i, strength=strength, eta=eta, eta_above=eta_above
                )
                video = pipe.generate(request, init_frames=torch.from_numpy(source)).frames[0].numpy()
                verdict = judge(video)
                right = {
                    "color": verdict.found and verdict.color == target.color,
                    "shape": verdict.found and verdict.shape == target.shape,
                    "direction": verdict.found and verdict.direction == target.direction,
                }
                right["all"] = all(right.values())
                for k, v in right.items():
                    hits[k] += int(v)
                to_ideal.append(psnr(video, shapes.render(target, frames, height, width)))
                to_source.append(psnr(video, source))
            n = len(jobs)
            rows.append((strength, name, {k: v / n for k, v in hits.items()}, to_ideal, to_source))

    elapsed = time.perf_counter() - started
    runs = len(args.strength) * len(samplers) * len(jobs)
    print(
        f"{runs} videos ({frames}x{height}x{width}) in {elapsed:.1f} s; clips: dataset seed {args.data_seed}"
    )
    head = (
        "strength",
        "sampler",
        "new colour",
        "shape kept",
        "direction kept",
        "all",
        "PSNR to ideal",
        "to source",
    )
    print("| " + " | ".join(head) + " |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for strength, name, share, to_ideal, to_source in rows:
        shares = " | ".join(f"{share[k]:.1%}" for k in ("color", "shape", "direction", "all"))
        print(
            f"| {strength:g} | {name} | {shares} | {np.mean(to_ideal):.2f} dB | {np.mean(to_source):.2f} dB |"
        )


if __name__ == "__main__":
    main()
