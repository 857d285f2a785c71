"""`mochi generate`: one prompt to one video file and its JSON sidecar."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mochi.cli.accel import add_cache_options, apply_cache_options
from mochi.cli.checks import check_generate, check_output, read_init_video
from mochi.cli.options import (
    Subparsers,
    add_lora_options,
    add_model_options,
    add_parallel_options,
    lora_pairs,
    pipeline_options,
    start_parallel,
)


def _add_generate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a video from a text prompt",
        description=(
            "Generate a video from PROMPT and write it as an H.264 mp4, with a JSON sidecar holding every "
            "parameter (including the seed used). Without --model the embedded tiny model runs, on any CPU. "
            "Unset sizes, steps and guidance take the model's defaults (the released model: 163 frames, "
            "848x480, 64 steps, guidance 6.0)."
        ),
    )
    p.add_argument("prompt", metavar="PROMPT", help="what the video shows")
    p.add_argument("--negative-prompt", default="", help='what to steer away from (default "": no text)')
    p.add_argument("--frames", type=int, help="frame count, 6k+1 (e.g. 25, 31, 163)")
    p.add_argument("--width", type=int, help="width in pixels, a multiple of 16")
    p.add_argument("--height", type=int, help="height in pixels, a multiple of 16")
    p.add_argument("--steps", type=int, help="sampling steps of the linear-quadratic schedule")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; 1.0 turns it off")
    p.add_argument("--seed", type=int, help="random seed (default: a fresh one, recorded in the sidecar)")
    p.add_argument("--threshold-noise", type=float, default=0.025, help="schedule's linear-part end (0.025)")
    p.add_argument("--linear-steps", type=int, help="steps in the schedule's linear part (default: half)")
    p.add_argument(
        "--eta",
        type=float,
        help="ancestral sampling: share of each step's noise drawn afresh, 0-1 (0: Genmo's Euler sampler; "
        "default: the model's, 1 for the embedded model, 0 for Mochi 1; 0 with --cache, which skips no "
        "step of an ancestral run)",
    )
    p.add_argument(
        "--eta-above",
        type=float,
        help="ancestral sampling only at steps from σ above this, in [0, 1) (default: the model's, 0.3 for "
        "the embedded model; 0 with --cache unless --eta is given)",
    )
    add_model_options(p, runtime=True)
    p.add_argument(
        "--devices",
        metavar="LIST",
        help="spread the DiT's blocks over these devices, e.g. cuda:0,cuda:1 (T5 and VAE use the first)",
    )
    p.add_argument(
        "--memory",
        choices=("auto",),
        help="auto: on CUDA, pick the fastest offload that fits the free memory (mochi plan) and say which",
    )
    p.add_argument("--init-video", metavar="FILE", help="video-to-video: start from this clip")
    p.add_argument("--strength", type=float, help="video-to-video: how much to change, (0-1] (0.7)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of the written video, 0.1-1000 (30)")
    p.add_argument(
        "--out",
        metavar="FILE.mp4",
        help="output video, or a folder (an existing one, or a path ending in /) to write PROMPT-SEED.mp4 "
        "in (default: PROMPT-SEED.mp4 here)",
    )
    add_lora_options(p)
    add_cache_options(p)
    add_parallel_options(p)
    p.set_defaults(run=_run_generate)


def output_path(given: str | None, prompt: str, seed: int) -> Path:
    """``--out``: a file, else a folder (an existing one, or a path ending in a separator) to write the
    default name in, PROMPT-SEED.mp4 (the prompt's words, lowercased, joined by '-')."""
    name = f"{_slug(prompt)}-{seed}.mp4"
    if not given:
        return Path(name)
    if Path(given).is_dir() or given.endswith(("/", os.sep)):
        return Path(given) / name
    return Path(given)


def _slug(text: str, limit: int = 48) -> str:
    words = "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
    return "-".join(words)[:limit].rstrip("-") or "video"


def _run_generate(args: argparse.Namespace) -> int:
    import secrets
    import time

    from mochi.request import GenerationRequest, check_prompt, check_seed

    check_prompt(args.prompt, "PROMPT")
    if args.seed is not None:  # before any rank broadcasts it (an int64 holds no larger seed)
        check_seed(args.seed)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    world = start_parallel(args)  # None unless launched by torchrun
    if world is not None:
        from mochi.parallel.context import broadcast_int

        seed = broadcast_int(seed, world)  # rank 0's seed, so every rank denoises the same noise
    main = world is None or world.is_main
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        seed=seed,
        threshold_noise=args.threshold_noise,
        linear_steps=args.linear_steps,
        eta=args.eta,
        eta_above=args.eta_above,
        init_video=args.init_video,
        strength=0.7 if args.strength is None else args.strength,
        loras=lora_pairs(args.lora, args.lora_scale),
        cache=args.cache,
        cache_threshold=args.cache_threshold,
    )
    request.validate()
    out = output_path(args.out, args.prompt, seed)
    problem = None
    if main:  # the output is rank 0's to write; on several nodes its folder may exist on rank 0's alone
        try:
            check_output(out, args.init_video)
        except ValueError as e:
            problem = str(e)
    if world is not None:  # every rank stops on rank 0's verdict before the first collective of the run
        from mochi.parallel.context import broadcast_text

        problem = broadcast_text(problem, world)
    if problem is not None:
        raise ValueError(problem)
    init = check_generate(args, request)["init"]  # every option and file, before the model loads

    from mochi.outputs import write_video_and_sidecar
    from mochi.pipeline import MochiPipeline

    started = time.perf_counter()
    options = pipeline_options(args)
    if world is None and args.devices:
        from mochi.memory.placement import spread_pipeline

        pipe, note = spread_pipeline(args.model, args.devices, args.max_memory, request, options)
        print(note)
    elif world is None and args.memory == "auto":
        from mochi.memory.auto import auto_pipeline

        pipe, note = auto_pipeline(args.model, args.device, request, options)
        print(note)
    elif world is None:
        pipe = MochiPipeline.from_pretrained(args.model, device=args.device, **options)
    else:
        from mochi.parallel.apply import load_pipeline

        weights, guidance = args.parallel_weights, args.guidance_parallel
        pipe = load_pipeline(world, args.model, weights=weights, guidance=guidance, **options)
    pipe.lora_merge = args.lora_merge
    pipe.lora_keep_originals = False  # one request, then the process ends: no LoRA is ever taken off
    if pipe.quantization and main:
        print(f"mochi: note: {pipe.quantization}")
    apply_cache_options(pipe, args)
    loaded = time.perf_counter() - started
    resolved = request.resolved(pipe.components.defaults)
    if resolved.cache != "none" and resolved.eta and main:
        # Named by the request (a cached request otherwise runs Euler): the cache will seldom skip a step.
        print(
            f"mochi: note: --eta {resolved.eta:g} re-noises every step above sigma {resolved.eta_above:g}, "
            "so --cache skips few or none of those steps; --eta 0 (or leaving --eta out) lets it skip",
            file=sys.stderr,
        )
    if init is not None and init < resolved.frames:  # the model's defaults asked for more than foreseen
        read_init_video(args.init_video, resolved.frames, (8, 8))  # names the frame count that would fit
    from mochi.accel.calibrate import UncalibratedWarning
    from mochi.models.tokenizer import truncations

    # said: shown after the bar as "mochi: warning: ..." (not Python's warning lines), kept in the sidecar
    with truncations(UncalibratedWarning) as said, _ProgressBar() as bar:
        # The pipeline reads --init-video, fitting each frame as it is decoded.
        result = pipe.generate(resolved, progress=bar if main else None)
    if not main:
        return 0
    for message in said:
        print(f"mochi: warning: {message}", file=sys.stderr)
    sidecar = {
        **vars(result.request),
        "strength": result.request.strength if result.request.init_video else None,
        "model": args.model or f"embedded:{pipe.components.name}",
        "quantize": args.quantize,
        **pipe.run_record(result),
        "seconds": {"load": round(loaded, 3), **{k: round(v, 3) for k, v in result.seconds.items()}},
        "warnings": said,
    }
    write_video_and_sidecar(result.frames[0], out, args.fps, sidecar)  # sets "fps" to the rate written
    total = time.perf_counter() - started
    print(f"wrote {out} ({result.frames.shape[1]} frames, {total:.1f} s; seed {result.request.seed})")
    return 0


class _ProgressBar:
    """One tqdm bar per stage; the denoising bar shows steps, rate and ETA."""

    NAMES = {
        "text": "text encoding",
        "encode": "encoding video",
        "denoise": "denoising",
        "decode": "decoding",
    }

    def __enter__(self) -> _ProgressBar:
        self.stage, self.bar = None, None
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            if self.bar is not None:
                self.bar.close()
            self.stage = stage
            self.bar = tqdm(total=total, unit="step", desc=self.NAMES[stage], dynamic_ncols=True, leave=False)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# The registrars of this module's sub-commands, in the order `mochi --help` lists them.
COMMANDS = (_add_generate,)
