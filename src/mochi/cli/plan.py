"""`mochi plan`: the peak memory of each stage for every setting, and which fit a budget."""

from __future__ import annotations

import argparse

from mochi.cli.options import Subparsers


def _add_plan(sub: Subparsers) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate the memory of each stage and which settings fit a GPU",
        description=(
            "Estimate, without loading weights, the peak memory of the text, denoise and decode stages for "
            "every dtype, weight quantization and offload setting at the requested size, and which fit the "
            "budget (default: the free memory of the CUDA device). Sizes default to the released model's "
            "163 frames at 848x480; the architecture is the released model's unless --model names a "
            "checkpoint."
        ),
    )
    p.add_argument(
        "--gpu-memory", metavar="SIZE", help="budget, e.g. 24GB (default: free memory of --device)"
    )
    p.add_argument(
        "--device", default="auto", help="device whose free memory is the budget (default: the first GPU)"
    )
    p.add_argument("--frames", type=int, default=163, help="frame count, 6k+1 (163)")
    p.add_argument("--width", type=int, default=848, help="width in pixels (848)")
    p.add_argument("--height", type=int, default=480, help="height in pixels (480)")
    p.add_argument("--guidance", type=float, default=6.0, help="1.0: no guidance, batch 1 (6.0)")
    p.add_argument("--model", metavar="PATH", help="read the DiT's architecture from this checkpoint")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32", "all"),
        default="bf16",
        help="DiT dtype (bf16; all: bf16 and fp32)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "fp8", "int8", "q8_0", "q4_0", "all"),
        default="all",
        help="weight quantization of the DiT and T5 to plan, as generate --quantize (all: each of them)",
    )
    p.add_argument(
        "--fp8",
        choices=("keep", "dequantize"),
        default="keep",
        help="a --model stored fp8 or GGUF: plan its DiT kept as stored, as generate loads it (keep), or "
        "widened to --dtype at load, as generate --fp8 dequantize, then as --quantize (keep)",
    )
    p.add_argument(
        "--cache",
        default="none",
        help="the step cache generate will run (e.g. teacache:fast, fbcache,extrapolate): the tensors it "
        "keeps between steps count in the denoise stage (none)",
    )
    p.add_argument("--all-blocks", action="store_true", help="list block offload for every resident count")
    # Without --model, plan sizes the released model: the embedded one's name stands for its file here.
    p.set_defaults(run=_run_plan, embedded_as_file=True)


def _run_plan(args: argparse.Namespace) -> int:
    from mochi.memory.report import plan_command

    print(plan_command(args))
    return 0


COMMANDS = (_add_plan,)
