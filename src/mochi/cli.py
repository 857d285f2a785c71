"""The `mochi` command: parse arguments, build a request, hand it to the library. No logic lives here.

Each sub-command is a pair: ``_add_<name>`` registers its parser, ``_run_<name>`` runs it. Handlers import
the library lazily, so `mochi --help` is instant. User errors (ValueError, missing files) print one line
and exit 2, never a traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from mochi import __version__

Subparsers = argparse._SubParsersAction

# Sub-command registrars, in the order `mochi --help` lists them.
COMMANDS: list[Callable[[Subparsers], None]] = []


def command(add: Callable[[Subparsers], None]) -> Callable[[Subparsers], None]:
    COMMANDS.append(add)
    return add


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mochi", description="Mochi 1 text-to-video: generate, convert, fine-tune, serve."
    )
    parser.add_argument("--version", action="version", version=f"mochi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("mochi: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"mochi: error: {e}", file=sys.stderr)
        return 2


@command
def _add_info(sub: Subparsers) -> None:
    p = sub.add_parser(
        "info",
        help="show what a checkpoint holds: format, dtypes, parameter counts, DiT config",
        description=(
            "Detect a checkpoint's format (Genmo folder, diffusers folder or file, ComfyUI single file, "
            "all-in-one, fp8_scaled) and print its components, dtypes, parameter counts and the DiT "
            "config inferred from its shapes. Reads safetensors headers only, never tensor data "
            "(weights-only .pt/.bin files are memory-mapped instead)."
        ),
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a folder, a .safetensors file or an *.index.json"
    )
    p.add_argument("--variant", help="diffusers weight variant to inspect when several exist (e.g. bf16)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from mochi.weights.info import checkpoint_info, format_info

    info = checkpoint_info(args.checkpoint, variant=args.variant)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


@command
def _add_convert(sub: Subparsers) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a DiT checkpoint to Genmo's or diffusers' layout",
        description=(
            "Convert the DiT of any supported checkpoint (Genmo, diffusers, ComfyUI bf16, all-in-one "
            "or fp8_scaled; detected automatically). --to genmo writes DST/dit.safetensors (or DST itself "
            "if it ends in .safetensors) and copies the VAE parts of all-in-one files as decoder/encoder"
            ".safetensors; --to diffusers writes DST/transformer/ with config.json and safetensors, "
            "sharded with an index when large. fp8 weights are dequantized. Files are written "
            "atomically; converting and converting back is bit-exact."
        ),
    )
    p.add_argument("src", metavar="SRC", help="checkpoint to read (folder, .safetensors file or index)")
    p.add_argument("dst", metavar="DST", help="output folder (or .safetensors file with --to genmo)")
    p.add_argument("--to", required=True, choices=("genmo", "diffusers"), help="output layout")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        help="dtype of the written DiT weights (RoPE frequencies and norm weights stay fp32); "
        "default: as stored (fp8 becomes the dtype of the file's other tensors)",
    )
    p.add_argument("--variant", help="diffusers weight variant to read when SRC holds several (e.g. bf16)")
    p.add_argument(
        "--max-shard-size",
        default="10GB",
        metavar="SIZE",
        help="largest diffusers shard, e.g. 5GB or 500MB (default: 10GB)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from mochi.devices import parse_dtype, parse_size
    from mochi.weights.convert import convert

    out = convert(
        args.src,
        args.dst,
        to=args.to,
        dtype=parse_dtype(args.dtype),
        variant=args.variant,
        overwrite=args.overwrite,
        max_shard_bytes=parse_size(args.max_shard_size),
    )
    print(f"wrote {out}")
    return 0


@command
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
    _add_model_options(p, runtime=True)
    p.add_argument("--init-video", metavar="FILE", help="video-to-video: start from this clip")
    p.add_argument("--strength", type=float, default=0.7, help="video-to-video: how much to change (0-1]")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of the written video (30)")
    p.add_argument("--out", metavar="FILE.mp4", help="output video (default: PROMPT-SEED.mp4 here)")
    _add_lora_options(p)
    _add_parallel_options(p)
    p.set_defaults(run=_run_generate)


def _slug(text: str, limit: int = 48) -> str:
    words = "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
    return "-".join(words)[:limit].rstrip("-") or "video"


def _run_generate(args: argparse.Namespace) -> int:
    import json
    import secrets
    import time
    from pathlib import Path

    from mochi.request import GenerationRequest

    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    world = _start_parallel(args)  # None unless launched by torchrun
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
        init_video=args.init_video,
        strength=args.strength,
        loras=_lora_pairs(args.lora, args.lora_scale),
    )
    request.validate()
    out = Path(args.out) if args.out else Path(f"{_slug(args.prompt)}-{seed}.mp4")
    if main:
        _check_output(out)
    init = _read_init_video(args.init_video) if args.init_video else None

    from mochi.pipeline import MochiPipeline
    from mochi.video import fit_frames, write_video

    started = time.perf_counter()
    options = _pipeline_options(args)
    if world is None:
        pipe = MochiPipeline.from_pretrained(args.model, device=args.device, **options)
    else:
        from mochi.parallel.apply import load_pipeline

        weights, guidance = args.parallel_weights, args.guidance_parallel
        pipe = load_pipeline(world, args.model, weights=weights, guidance=guidance, **options)
    pipe.lora_merge = args.lora_merge
    loaded = time.perf_counter() - started
    resolved = request.resolved(pipe.components.defaults)
    init_frames = None
    if init is not None:
        import torch

        init_frames = torch.from_numpy(fit_frames(init, resolved.frames, resolved.height, resolved.width))
    with _ProgressBar() as bar:
        result = pipe.generate(resolved, progress=bar if main else None, init_frames=init_frames)
    if not main:
        return 0
    write_video(result.frames[0], out, fps=args.fps)
    sidecar = {
        **vars(result.request),
        "model": args.model or f"embedded:{pipe.components.name}",
        "device": str(pipe.device) if world is None else f"{world.size} x {pipe.device.type}",
        "dtype": str(pipe.dit_dtype).removeprefix("torch."),
        "fps": args.fps,
        "seconds": {"load": round(loaded, 3), **{k: round(v, 3) for k, v in result.seconds.items()}},
    }
    from mochi.files import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    total = time.perf_counter() - started
    print(f"wrote {out} ({result.frames.shape[1]} frames, {total:.1f} s; seed {result.request.seed})")
    return 0


@command
def _add_serve(sub: Subparsers) -> None:
    p = sub.add_parser(
        "serve",
        help="run the web UI and HTTP API",
        description=(
            "Serve a web UI and an HTTP API (OpenAPI at /docs) on one port. Jobs run one at a time per "
            "device; others wait in a bounded queue. Videos and their JSON parameters go to --out-dir. "
            "Binding to anything other than loopback needs a bearer token (--token or MOCHI_SERVE_TOKEN). "
            "Needs the serve extra: pip install 'mochi-video[serve]'."
        ),
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument(
        "--token",
        default=os.environ.get("MOCHI_SERVE_TOKEN"),
        help="bearer token every API call must carry (default: $MOCHI_SERVE_TOKEN); required off loopback",
    )
    p.add_argument("--out-dir", default="mochi-serve-out", metavar="DIR", help="where videos are written")
    p.add_argument("--queue-size", type=int, default=8, metavar="N", help="jobs that may wait (default: 8)")
    p.add_argument("--lora-dir", metavar="DIR", help="folder of LoRA .safetensors files offered in the UI")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of the written videos (30)")
    _add_model_options(p, runtime=True)
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from mochi.serve.api import create_app
        from mochi.serve.jobs import JobManager
        from mochi.serve.server import check_binding, check_port, run
    except ImportError as e:
        raise ValueError(
            f"mochi serve needs the serve extra ({e.name} is missing): pip install 'mochi-video[serve]'"
        ) from None
    check_binding(args.host, args.token)
    check_port(args.host, args.port)
    if args.lora_dir and not os.path.isdir(args.lora_dir):
        raise ValueError(f"--lora-dir {args.lora_dir!r} is not a folder")

    from mochi.pipeline import MochiPipeline

    pipe = MochiPipeline.from_pretrained(args.model, device=args.device, **_pipeline_options(args))
    jobs = JobManager(pipe, args.out_dir, queue_size=args.queue_size, fps=args.fps)
    app = create_app(jobs, token=args.token, lora_dir=args.lora_dir)
    print(f"mochi serve: model {pipe.components.name} on {pipe.device}; open http://{args.host}:{args.port}/")
    try:
        run(app, args.host, args.port)
    finally:
        jobs.close()
    return 0


def _check_output(out) -> None:  # noqa: ANN001 - a Path
    import os

    from mochi.video import CONTAINERS

    if out.suffix.lower() not in CONTAINERS:
        raise ValueError(
            f"output {str(out)!r} must end in one of {', '.join(CONTAINERS)}; e.g. {out.stem}.mp4"
        )
    if out.is_dir():
        raise ValueError(f"output {str(out)!r} is a folder; give a file name such as {out / 'video.mp4'}")
    folder = out.parent if str(out.parent) else "."
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {str(out)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {str(out)!r}: folder {str(folder)!r} is not writable")


def _read_init_video(path: str):  # noqa: ANN202 - numpy array
    from mochi.video import read_video

    frames, _ = read_video(path)
    return frames


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


# -- LoRA: options of `generate`, and the prepare-data / train-lora / convert-lora commands ----------------


def _add_lora_options(p: argparse.ArgumentParser) -> None:
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


def _lora_pairs(files: list[str], scales: list[float]) -> list[tuple[str, float]]:
    if len(scales) > len(files):
        raise ValueError(
            f"{len(scales)} --lora-scale values for {len(files)} --lora files; "
            "give at most one scale per LoRA"
        )
    return [(f, scales[i] if i < len(scales) else 1.0) for i, f in enumerate(files)]


def _add_model_options(p: argparse.ArgumentParser, runtime: bool = False) -> None:
    """Where the model comes from and where it runs; ``runtime`` adds the inference-only choices."""
    p.add_argument(
        "--model",
        metavar="PATH",
        help="Genmo folder, diffusers folder, ComfyUI file or mochi bundle (default: the embedded model)",
    )
    p.add_argument("--vae", metavar="PATH", help="VAE weights, when --model has none")
    p.add_argument(
        "--t5", metavar="PATH", help="T5 encoder weights (google/t5-v1_1-xxl folder or ComfyUI file)"
    )
    p.add_argument("--tokenizer", metavar="PATH", help="folder with spiece.model or tokenizer.json")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: CUDA if present)")
    if not runtime:
        return
    dtypes = ("fp32", "bf16", "fp16")
    p.add_argument("--dtype", choices=dtypes, help="DiT dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--vae-dtype", choices=dtypes, default="fp32", help="VAE dtype (fp32)")
    p.add_argument(
        "--fp8", choices=("keep", "dequantize"), default="keep", help="fp8 checkpoints: keep or widen"
    )
    p.add_argument("--attention", choices=("sdpa", "flash", "sage"), help="attention backend (default: sdpa)")
    p.add_argument("--offload", action="store_true", help="keep each model on the GPU only for its stage")
    p.add_argument("--max-memory", metavar="SIZE", help="memory budget for VAE decoding, e.g. 8GB")


def _pipeline_options(args: argparse.Namespace) -> dict:
    """``MochiPipeline.from_pretrained`` keyword arguments (all but model and device) from the options."""
    from mochi.devices import parse_size

    return {
        "vae": args.vae,
        "t5": args.t5,
        "tokenizer": args.tokenizer,
        "fp8": args.fp8,
        "dit_dtype": args.dtype,
        "vae_dtype": args.vae_dtype,
        "offload": args.offload,
        "attention": args.attention,
        "max_memory": parse_size(args.max_memory) if args.max_memory else None,
    }


def _load_pipeline(args: argparse.Namespace):  # noqa: ANN202 - MochiPipeline
    from mochi.pipeline import MochiPipeline

    # Offload (a no-op on CPU): T5 and the VAE visit the GPU only when used; training keeps the DiT there.
    return MochiPipeline.from_pretrained(
        args.model, vae=args.vae, t5=args.t5, tokenizer=args.tokenizer, device=args.device, offload=True
    )


@command
def _add_prepare_data(sub: Subparsers) -> None:
    p = sub.add_parser(
        "prepare-data",
        help="encode captioned videos into latents for train-lora",
        description=(
            "For every video in VIDEOS_DIR with a same-stem .txt caption: take the first --frames frames, "
            "centre-crop to the aspect of --width x --height, resize, and cache the VAE encoder's mean and "
            "log-variance and the caption's T5 features as OUT_DIR/<stem>.safetensors. Bad files "
            "(unreadable, too short, too small, no caption) are skipped and listed at the end; a re-run "
            "skips clips already cached with the same settings."
        ),
    )
    p.add_argument("videos", metavar="VIDEOS_DIR", help="folder of videos and their .txt captions")
    p.add_argument("out", metavar="OUT_DIR", help="folder for the cached clips")
    p.add_argument("--frames", type=int, required=True, help="frames per clip, 6k+1 (e.g. 25, 37)")
    p.add_argument("--width", type=int, required=True, help="width in pixels, a multiple of 16")
    p.add_argument("--height", type=int, required=True, help="height in pixels, a multiple of 16")
    _add_model_options(p)
    p.set_defaults(run=_run_prepare_data)


def _run_prepare_data(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mochi.request import SPATIAL_MULTIPLE, check_frames, check_multiple
    from mochi.train.data import prepare_data

    check_frames(args.frames)
    check_multiple(args.width, SPATIAL_MULTIPLE, "width")
    check_multiple(args.height, SPATIAL_MULTIPLE, "height")
    pipe = _load_pipeline(args)
    with tqdm(unit="video", dynamic_ncols=True) as bar:

        def progress(done: int, total: int, name: str) -> None:
            if bar.total != total:
                bar.reset(total=total)
            bar.set_postfix_str(name)
            bar.update(done - bar.n)

        report = prepare_data(
            args.videos,
            args.out,
            pipe.components,
            args.frames,
            args.width,
            args.height,
            pipe.device,
            progress,
        )
    print(report.summary())
    return 0


@command
def _add_train_lora(sub: Subparsers) -> None:
    p = sub.add_parser(
        "train-lora",
        help="fine-tune a LoRA on data made by prepare-data (resumable)",
        description=(
            "Train a LoRA on the DiT with the rectified-flow loss in the DiT's latent space. Writes "
            "checkpoints (state/ and lora-step-N.safetensors) and sample videos into --out, and "
            "--out/lora.safetensors at the end. Interrupt it at any moment and run the same command again "
            "to continue from the last checkpoint (Ctrl-C saves one first)."
        ),
    )
    p.add_argument("data", metavar="DATA_DIR", help="folder written by `mochi prepare-data`")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (created; resumed if it exists)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (16)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha/rank (16)")
    p.add_argument(
        "--targets",
        default="qkv_x,qkv_y,proj_x,proj_y",  # = models.lora.DEFAULT_TARGETS (no import: fast --help)
        help="comma-separated layers per block (%(default)s)",
    )
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (2e-4)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (2000)")
    p.add_argument("--batch-size", type=int, default=1, help="clips per micro-batch (1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (1)")
    p.add_argument("--sigma-sampling", choices=("uniform", "shifted"), default="uniform", help="(uniform)")
    p.add_argument("--sigma-shift", type=float, default=3.0, help="shift of --sigma-sampling shifted (3)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (0.1)")
    p.add_argument(
        "--latents",
        choices=("sample", "mean"),
        default="sample",
        help="train on posterior samples (Genmo) or means (the embedded model was trained on means)",
    )
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps, then cosine (200)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (0.01)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (200)")
    p.add_argument("--sample-every", type=int, default=200, help="steps between sample videos; 0: none")
    p.add_argument(
        "--sample-prompt", action="append", default=[], help="prompt for samples (repeatable; default: data)"
    )
    p.add_argument("--sample-steps", type=int, help="sampling steps of samples (default: the model's)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, data order and noise (0)")
    _add_model_options(p)
    _add_parallel_options(p, guidance=False)
    p.set_defaults(run=_run_train_lora)


def _run_train_lora(args: argparse.Namespace) -> int:
    from mochi.train.lora_train import LoraTrainConfig, train_lora

    cfg = LoraTrainConfig(
        rank=args.rank,
        alpha=args.alpha,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        lr=args.lr,
        weight_decay=args.weight_decay,
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        sigma_sampling=args.sigma_sampling,
        sigma_shift=args.sigma_shift,
        caption_dropout=args.caption_dropout,
        latents=args.latents,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompt),
        sample_steps=args.sample_steps,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
    )
    cfg.validate()
    world = _start_parallel(args)
    if world is None:
        path = train_lora(_load_pipeline(args), args.data, args.out, cfg)
    else:  # under torchrun the ranks split each batch's tokens; base weights are replicated
        import dataclasses

        from mochi.parallel.apply import load_pipeline
        from mochi.parallel.context import broadcast_int
        from mochi.parallel.train import parallelize_training

        cfg = dataclasses.replace(cfg, seed=broadcast_int(cfg.seed, world))
        files = {"vae": args.vae, "t5": args.t5, "tokenizer": args.tokenizer}
        pipe = load_pipeline(world, args.model, weights=args.parallel_weights, **files)
        path = train_lora(pipe, args.data, args.out, cfg, parallel=parallelize_training(pipe, world))
        if not world.is_main:
            return 0
    print(f"wrote {path}")
    return 0


@command
def _add_convert_lora(sub: Subparsers) -> None:
    p = sub.add_parser(
        "convert-lora",
        help="convert a LoRA between Genmo's and the diffusers/PEFT format",
        description=(
            "Read a DiT LoRA in Genmo's format (blocks.N.attn.qkv_x.lora_A, kwargs metadata) or the "
            "diffusers/PEFT format (transformer_blocks.N.attn1.to_q.lora_A.weight; detected from the keys) "
            "and write it in the format --to names. Genmo's fused qkv LoRA becomes three diffusers LoRAs "
            "sharing A; back, equal A fuse again, otherwise a LoRA of three times the rank computes the same."
        ),
    )
    p.add_argument("src", metavar="SRC", help="LoRA .safetensors file (or a PEFT/diffusers folder)")
    p.add_argument("dst", metavar="DST", help="output .safetensors file (or folder)")
    p.add_argument("--to", required=True, choices=("genmo", "diffusers"), help="output format")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(run=_run_convert_lora)


def _run_convert_lora(args: argparse.Namespace) -> int:
    from mochi.weights.lora import convert_lora

    dst, lora = convert_lora(args.src, args.dst, to=args.to, overwrite=args.overwrite)
    print(f"wrote {dst} ({lora.format} → {args.to}, {len(lora.layers)} layers, ranks {sorted(lora.ranks)})")
    return 0


# -- torchrun: several processes cooperate on one video or one batch (docs/parallel.md) --------------------


def _add_parallel_options(p: argparse.ArgumentParser, guidance: bool = True) -> None:
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


def _start_parallel(args: argparse.Namespace):  # noqa: ANN202 - mochi.parallel.context.World | None
    """Join torchrun's process group when launched by it (WORLD_SIZE/RANK/LOCAL_RANK set), else None."""
    from mochi.parallel.context import launched_by_torchrun

    if not launched_by_torchrun():
        return None
    import atexit

    from mochi.parallel.context import close_world, init_world

    world = init_world(args.device)
    atexit.register(close_world)
    return world
