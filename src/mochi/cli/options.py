"""Options several commands share: where the model comes from and where it runs, LoRAs, torchrun."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

Subparsers = argparse._SubParsersAction


def add_model_options(p: argparse.ArgumentParser, runtime: bool = False) -> None:
    """Where the model comes from and where it runs; ``runtime`` adds the inference-only choices."""
    p.add_argument(
        "--model",
        metavar="PATH",
        help="Genmo folder, diffusers folder, ComfyUI file or mochi bundle (default: the embedded model, "
        "which records name embedded:mochi-tiny)",
    )
    p.add_argument("--vae", metavar="PATH", help="VAE weights, when --model has none")
    p.add_argument(
        "--t5", metavar="PATH", help="T5 encoder weights (google/t5-v1_1-xxl folder or ComfyUI file)"
    )
    p.add_argument("--tokenizer", metavar="PATH", help="folder with spiece.model or tokenizer.json")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: CUDA if present)")
    if not runtime:
        return
    p.add_argument("--dtype", choices=DTYPES, help="DiT dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--vae-dtype", choices=DTYPES, default="fp32", help="VAE dtype (fp32)")
    add_dit_options(p)
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory budget for VAE decoding, e.g. 8GB; with --devices, each device's budget (20GB,24GB)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the DiT's block and final layer (regional)"
    )


DTYPES = ("fp32", "bf16", "fp16")


def add_dit_options(p: argparse.ArgumentParser) -> None:
    """How the DiT's weights are held and run: fp8 files, --quantize, --attention, --offload."""
    p.add_argument(
        "--fp8", choices=("keep", "dequantize"), default="keep", help="fp8 checkpoints: keep or widen"
    )
    p.add_argument(
        "--quantize",
        choices=("int8", "fp8", "q8_0", "q4_0"),
        help="weight-only quantization of the DiT's and T5's block Linear layers at load "
        "(docs/quantization.md)",
    )
    p.add_argument("--attention", choices=("sdpa", "flash", "sage"), help="attention backend (default: sdpa)")
    p.add_argument(
        "--offload",
        nargs="?",
        const="model",
        default=False,
        metavar="MODE",
        help="model (the default when given alone: each model on the GPU only for its stage), blocks or "
        "blocks:N (stream DiT blocks and T5 layers from pinned host memory, N DiT blocks resident), none",
    )


def dashed_values(argv: Sequence[str], options: dict[str, argparse.Action]) -> list[str]:
    """``argv`` with a value that starts with '-' and a digit joined to its option (``--gpu-memory -5GB``
    becomes ``--gpu-memory=-5GB``).

    argparse takes only a plain negative number for a value: ``-5GB`` or ``-1e-3x`` looked like an unknown
    option and the error was "expected one argument", instead of the option's own message on the value.
    """
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return out + list(argv[i:])
        action = options.get(word)
        value = argv[i + 1] if i + 1 < len(argv) else None
        if action is not None and action.nargs is None and value is not None and _DASHED.match(value):
            out.append(f"{word}={value}")
            i += 2
        else:
            out.append(word)
            i += 1
    return out


_DASHED = re.compile(r"-\.?[0-9]")


def bare_offload(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` with a bare ``--offload`` made explicit when the word after it is not an offload mode, and
    the words so left for the positional arguments (if one is left over, it was meant as a mode).

    ``--offload`` takes an optional value, so argparse would read ``mochi generate --offload "a red
    circle"`` as the mode "a red circle" and then miss the prompt. A following word that is neither a valid
    mode nor close to one (``blokcs``, ``blocks:x`` still fail with the mode's own error) is left for the
    positional arguments, and the flag means model offload.
    """
    out, freed = list(argv), []
    if "--offload" not in out[:-1]:  # mochi.offload imports torch: `mochi --help` stays instant
        return out, freed
    import difflib

    from mochi.offload import OFFLOAD_KINDS, parse_offload

    for i, word in enumerate(out[:-1]):
        if word != "--offload" or out[i + 1].startswith("-"):
            continue
        value = out[i + 1]
        try:
            parse_offload(value)
            continue
        except ValueError:
            pass
        head = value.strip().lower().partition(":")[0]
        if not difflib.get_close_matches(head, OFFLOAD_KINDS, n=1, cutoff=0.75):
            out[i] = "--offload=model"
            freed.append(value)
    return out, freed


def pipeline_options(args: argparse.Namespace) -> dict:
    """``MochiPipeline.from_pretrained`` keyword arguments (all but model and device) from the options."""
    from mochi.cli.checks import parse_max_memory

    return {
        "vae": args.vae,
        "t5": args.t5,
        "tokenizer": args.tokenizer,
        "fp8": args.fp8,
        "dit_dtype": args.dtype,
        "vae_dtype": args.vae_dtype,
        "offload": args.offload,
        "attention": args.attention,
        # With --devices, --max-memory is a per-device list that the block placement reads.
        "max_memory": None if getattr(args, "devices", None) else parse_max_memory(args.max_memory),
        "quantize": args.quantize,
        "compile": args.compile,
    }


def pipeline_from_args(args: argparse.Namespace):  # noqa: ANN202 - MochiPipeline
    from mochi.pipeline import MochiPipeline

    # Offload (a no-op on CPU): T5 and the VAE visit the GPU only when used; training keeps the DiT there.
    return MochiPipeline.from_pretrained(
        args.model, vae=args.vae, t5=args.t5, tokenizer=args.tokenizer, device=args.device, offload=True
    )


# -- LoRAs applied by generate --------------------------------------------------------------------------


def add_lora_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE",
        help="apply a LoRA (Genmo or diffusers/PEFT format); repeat for several",
    )
    p.add_argument(
        "--lora-scale",
        action="append",
        type=float,
        default=[],
        metavar="S",
        help="strength of each --lora in order (default 1.0 each)",
    )
    p.add_argument(
        "--lora-merge", action="store_true", help="merge LoRAs into the weights instead of hooking them in"
    )


def lora_pairs(files: list[str], scales: list[float]) -> list[tuple[str, float]]:
    if len(scales) > len(files):
        raise ValueError(
            f"{len(scales)} --lora-scale values for {len(files)} --lora files; "
            "give at most one scale per LoRA"
        )
    return [(f, scales[i] if i < len(scales) else 1.0) for i, f in enumerate(files)]


# -- torchrun: several processes cooperate on one video or one batch (docs/parallel.md) --------------------


def add_parallel_options(p: argparse.ArgumentParser, guidance: bool = True) -> None:
    p.add_argument(
        "--parallel-weights",
        choices=("auto", "shard", "replicate"),
        default="auto",
        help="under torchrun: FSDP2-shard the DiT and T5 over the ranks, or replicate them "
        "(auto: replicate when they fit in 60%% of the free memory)",
    )
    if not guidance:
        return
    p.add_argument(
        "--guidance-parallel",
        action="store_true",
        help="under torchrun: cond and uncond on the two halves of the ranks (even world size)",
    )


def start_parallel(args: argparse.Namespace):  # noqa: ANN202 - mochi.parallel.context.World | None
    """Join torchrun's process group when launched by it (WORLD_SIZE/RANK/LOCAL_RANK set), else None."""
    from mochi.parallel.context import launched_by_torchrun

    if not launched_by_torchrun():
        asked = []
        if getattr(args, "parallel_weights", "auto") != "auto":
            asked.append(f"--parallel-weights {args.parallel_weights}")
        if getattr(args, "guidance_parallel", False):
            asked.append("--guidance-parallel")
        if asked:
            verb = "apply" if len(asked) > 1 else "applies"
            raise ValueError(
                f"{' and '.join(asked)} {verb} only to several processes: launch with torchrun "
                "--nproc-per-node N -m mochi ... (docs/parallel.md), or leave them out"
            )
        return None
    # Under torchrun each process runs on its own device (LOCAL_RANK's) and holds the DiT the context
    # parallel way: one process's placement over several devices, or its free-memory plan, does not apply.
    single = []
    if getattr(args, "devices", None) is not None:
        single.append(f"--devices {args.devices}")
    if getattr(args, "memory", None) == "auto":
        single.append("--memory auto")
    if single:
        raise ValueError(
            f"{' and '.join(single)} apply only to one process; under torchrun each process uses its own "
            "device (LOCAL_RANK): leave them out, and use --parallel-weights shard if the DiT does not fit "
            "(docs/parallel.md)"
        )
    from mochi.offload import parse_offload

    if parse_offload(getattr(args, "offload", None)).active:  # found here, not after the weights are read
        raise ValueError(
            f"--offload {args.offload} cannot be combined with a torchrun launch: each process keeps its "
            "part of the work on its device; leave it out, and use --parallel-weights shard if the DiT does "
            "not fit (docs/parallel.md)"
        )
    import atexit

    from mochi.parallel.context import close_world, init_world

    world = init_world(args.device)
    atexit.register(close_world)
    return world
