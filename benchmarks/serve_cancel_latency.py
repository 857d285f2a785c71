"""How long a cancel takes to stop a `mochi serve` job in each stage (issue 19, item 4).

Runs one generation per stage with ``mochi.interrupt.stop_checks`` (what the server's worker uses), raises
the stop flag ``--after`` seconds into that stage, and prints the seconds from the flag to the
``Interrupted`` exception, beside the time one denoising step takes at that size (the granularity cancels
had before: between steps).

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
    seconds = pipe.generate(request).seconds
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    size = f"{args.frames}x{args.size}x{args.size}, {args.steps} steps"
    print(f"{pipe.components.name} on {args.device}, {size}: whole job {time.perf_counter() - t0:.1f} s")
    print(f"stages: {stages}; one denoising step {seconds['denoise'] / args.steps:.1f} s")
    for stage in ("denoise", "decode"):
        latency = cancel_latency(pipe, request, stage, args.after)
        print(f"cancel {args.after:g} s into {stage}: stopped {latency:.3f} s after the flag")


if __name__ == "__main__":
    main()
