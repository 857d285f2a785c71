"""How long a cancel takes to stop a `mochi serve` job in each stage (issue 19, item 4).

First runs one whole generation under ``mochi.interrupt.stop_checks`` (what the server's worker uses) with
a check that never stops but records when it is called, and prints per stage the longest gap between two
checks: the worst case of how long a cancel can take, beside one denoising step (the granularity cancels had
before: between steps). Then, per stage, raises the stop flag ``--after`` seconds into it and prints the
seconds from the flag to the ``Interrupted`` exception.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/serve_cancel_latency.py [--model BUNDLE]
        [--frames 97] [--size 512] [--device cpu] [--after 1.0]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from mochi.interrupt import Interrupted, stop_checks
from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest


def cancel_latency(pipe: MochiPipeline, request: GenerationRequest, stage: str, after: float) -> float:
    """Seconds from the stop flag (raised ``after`` s into ``stage``) to the ``Interrupted`` exception."""
    stop = threading.Event()
    raised: list[float] = []
    timer: list[threading.Timer] = []

    def raise_flag() -> None:
        raised.append(time.perf_counter())
        stop.set()

    def progress(name: str, done: int, total: int) -> None:
        # "denoise" is first reported after step 1; the others when they start.
        if name == stage and not timer:
            timer.append(threading.Timer(after, raise_flag))
            timer[0].start()

    try:
        with stop_checks(pipe.components.modules(), stop.is_set):
            pipe.generate(request, progress=progress)
    except Interrupted:
        return time.perf_counter() - raised[0]
    raise RuntimeError(f"the {stage} stage ended before the flag was raised; lower --after")


def longest_gaps(pipe: MochiPipeline, request: GenerationRequest) -> tuple[dict[str, float], dict]:
    """Per stage, the longest time between two stop checks over one whole generation; and its seconds."""
    stage, last, gaps = ["text"], [time.perf_counter()], {}

    def check() -> bool:
        now = time.perf_counter()
        gaps[stage[0]] = max(gaps.get(stage[0], 0.0), now - last[0])
        last[0] = now
        return False

    def progress(name: str, done: int, total: int) -> None:
        stage[0], last[0] = name, time.perf_counter()

    with stop_checks(pipe.components.modules(), check):
        seconds = pipe.generate(request, progress=progress).seconds
    return gaps, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--frames", type=int, default=97)
    p.add_argument("--size", type=int, default=512, help="height and width, pixels")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--after", type=float, default=1.0, help="seconds into the stage the cancel comes")
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = MochiPipeline.from_pretrained(args.model, device=args.device)
    request = GenerationRequest(
        "a red circle moving right",
        frames=args.frames,
        height=args.size,
        width=args.size,
        steps=args.steps,
        seed=0,
    )
    t0 = time.perf_counter()
    gaps, seconds = longest_gaps(pipe, request)
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    size = f"{args.frames}x{args.size}x{args.size}, {args.steps} steps"
    print(f"{pipe.components.name} on {args.device}, {size}: whole job {time.perf_counter() - t0:.1f} s")
    print(f"stages: {stages}; one denoising step {seconds['denoise'] / args.steps:.1f} s")
    print("longest time between two stop checks: " + ", ".join(f"{k} {v:.3f} s" for k, v in gaps.items()))
    for stage in ("denoise", "decode"):
        latency = cancel_latency(pipe, request, stage, args.after)
        print(f"cancel {args.after:g} s into {stage}: stopped {latency:.3f} s after the flag")


if __name__ == "__main__":
    main()
