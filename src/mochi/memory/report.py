"""The text `mochi plan` prints: one row per setting, the fastest that fits, or the closest miss."""

from __future__ import annotations

import argparse

import torch

from mochi.devices import DTYPES, available_memory, parse_device, parse_size
from mochi.memory.auto import held
from mochi.memory.estimate import QUANT_MODES
from mochi.memory.planner import CUDA_RESERVE, GB, Job, Models, Option, choose, plan
from mochi.request import GenerationRequest


def format_table(options: list[Option], budget: int) -> str:
    """A fixed-width table: setting, the peak of each stage (decode with its tile), the peak, fits."""
    width = max([28, *(len(o.describe()) for o in options)])
    head = f"{'setting':<{width}} {'text':>7} {'denoise':>8} {'decode':>8} {'(tile)':>9} {'peak':>7}"
    head += f"  fits {budget / GB:.1f} GB"
    rows = [head, "-" * len(head)]
    for o in options:
        tile = f"{o.decode_tile[0]}x{o.decode_tile[1]}" if o.decode_tile else "none fits"  # no split fits
        p = {k: f"{v / GB:.1f}" for k, v in o.peaks.items()}
        rows.append(
            f"{o.describe():<{width}} {p['text']:>7} {p['denoise']:>8} {p['decode']:>8} {tile:>9} "
            f"{o.peak / GB:>7.1f}  {'yes' if o.fits else 'no'}"
        )
    return "\n".join(rows)


def _models(path: str | None, fp8: str = "keep") -> tuple[Models, tuple[str, str]]:
    """(the architectures in ``path``, (the DiT's, T5's) weight modes as loaded with ``--fp8 fp8``;
    "none": full width)."""
    if path is None:
        return Models(), ("none", "none")
    from mochi.memory.stored import stored_dit
    from mochi.weights.bundle import is_bundle, load_bundle

    if is_bundle(path):  # a mochi bundle is small and names every model's architecture
        from mochi.memory.auto import models_of, quantization_of

        c = load_bundle(path)
        return models_of(c), (quantization_of(c.dit), quantization_of(c.text_encoder))
    dit = stored_dit(path, fp8=fp8)
    # T5-XXL and the released VAE otherwise; a stored T5 is widened as it is read (mochi.weights.t5).
    return Models(dit=dit.config, dit_kept=dit.kept), (dit.mode, "none")


def plan_command(args: argparse.Namespace) -> str:
    """Validate the request options, plan, and render the table with the verdict (GB = 10⁹ bytes)."""
    GenerationRequest(
        "plan", frames=args.frames, height=args.height, width=args.width, guidance=args.guidance,
        cache=args.cache,
    ).validate()  # fmt: skip
    if args.gpu_memory is not None:
        if args.device != "auto":  # it was never read (even a bogus name passed)
            raise ValueError(
                f"--device {args.device} is whose free memory is the budget, and --gpu-memory "
                f"{args.gpu_memory} gives it; give one of them"
            )
        budget, where = parse_size(args.gpu_memory, "--gpu-memory", budget=True), "the given budget"
        if budget <= 0:
            raise ValueError(f"--gpu-memory {args.gpu_memory!r} must be a positive size such as 24GB")
    else:
        if str(args.device).startswith("cuda") and not torch.cuda.is_available():
            # parse_device's remedy, "use --device cpu", plans nothing here
            raise ValueError(
                f"--device {args.device}: this machine has no CUDA device to read the free memory of; give "
                "the budget instead, e.g. --gpu-memory 24GB"
            )
        device = parse_device(args.device)
        if device.type != "cuda":
            raise ValueError(
                "no CUDA device to read the free memory of; give the budget, e.g. --gpu-memory 24GB"
            )
        budget, where = available_memory(device), f"free on {device}"
    dtypes = tuple(DTYPES[d] for d in (("bf16", "fp32") if args.dtype == "all" else (args.dtype,)))
    quants = QUANT_MODES if args.quantize == "all" else (args.quantize,)
    job = Job.from_request(args.frames, args.height, args.width, args.guidance != 1.0, args.cache)
    models, stored = _models(args.model, args.fp8)
    options = []
    for dtype in dtypes:
        for quant in quants:  # each model as generate --quantize would hold it (memory.auto.held)
            dit_quant, t5_quant = held(stored, None if quant == "none" else quant)
            options += plan(
                models, job, budget, dtypes=(dtype,), quants=(dit_quant,), t5_quant=t5_quant,
                reserve=CUDA_RESERVE, all_blocks=args.all_blocks, dit_rest=quant,
            )  # fmt: skip
    lines = [
        f"{args.frames} frames at {args.width}x{args.height}, DiT batch {job.batch}"
        f"{f', step cache {args.cache}' if job.cache_tensors else ''}; "
        f"budget {budget / GB:.1f} GB "
        f"({where}); each stage includes {CUDA_RESERVE / GB:.1f} GB for the CUDA context and allocator",
        "",
        format_table(options, budget),
        "",
    ]
    try:
        best = choose(options, budget)
        lines.append(f"fastest that fits: {best.describe()} (peak {best.peak / GB:.1f} GB)")
    except ValueError as e:
        lines.append(str(e))
    return "\n".join(lines)
