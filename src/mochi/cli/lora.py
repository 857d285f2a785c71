"""The LoRA commands: `mochi prepare-data`, `mochi train-lora`, `mochi convert-lora`."""

from __future__ import annotations

import argparse

from mochi.cli.options import (
    Subparsers,
    add_model_options,
    add_parallel_options,
    pipeline_from_args,
    start_parallel,
)


def _add_prepare_data(sub: Subparsers) -> None:
    p = sub.add_parser(
        "prepare-data",
        help="encode captioned videos into latents for train-lora",
        description=(
            "For every video in VIDEOS_DIR with a same-stem .txt caption: take the first --frames frames, "
            "centre-crop to the aspect of --width x --height, resize, and cache the VAE encoder's mean and "
            "log-variance and the caption's T5 features as OUT_DIR/<stem>.safetensors. Bad files "
            "(unreadable, too short, too small, no caption, two videos of one stem) are skipped and listed "
            "at the end; a re-run reuses a cached clip only if its video bytes, caption, settings and model "
            "are unchanged, and removes cache files of videos gone or skipped (a run that prepares no clip "
            "removes none). A full disk stops the run."
        ),
    )
    p.add_argument("videos", metavar="VIDEOS_DIR", help="folder of videos and their .txt captions")
    p.add_argument("out", metavar="OUT_DIR", help="folder for the cached clips")
    p.add_argument("--frames", type=int, required=True, help="frames per clip, 6k+1 (e.g. 25, 37)")
    p.add_argument("--width", type=int, required=True, help="width in pixels, a multiple of 16")
    p.add_argument("--height", type=int, required=True, help="height in pixels, a multiple of 16")
    add_model_options(p)
    p.set_defaults(run=_run_prepare_data)


def _run_prepare_data(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mochi.request import SPATIAL_MULTIPLE, check_frames, check_multiple
    from mochi.train.data import prepare_data

    check_frames(args.frames)
    check_multiple(args.width, SPATIAL_MULTIPLE, "width")
    check_multiple(args.height, SPATIAL_MULTIPLE, "height")
    from mochi.cli.checks import check_prepare_data

    check_prepare_data(args)  # before the model loads
    from mochi.devices import parse_device
    from mochi.weights.components import load_components

    device = parse_device(args.device)
    # Only the VAE encoder and T5 encode: the DiT (40 GB in fp32 for the released model) is not read.
    components = load_components(
        args.model, vae=args.vae, t5=args.t5, tokenizer=args.tokenizer, with_dit=False
    )
    with tqdm(unit="video", dynamic_ncols=True) as bar:

        def progress(done: int, total: int, name: str) -> None:
            if bar.total != total:
                bar.reset(total=total)
            bar.set_postfix_str(name)
            bar.update(done - bar.n)

        report = prepare_data(
            args.videos,
            args.out,
            components,
            args.frames,
            args.width,
            args.height,
            device,
            progress,
        )
    print(report.summary())
    if not report.encoded and not report.cached:
        raise ValueError(
            f"no clip of {args.videos!r} could be prepared (reasons above); the clips already in "
            f"{args.out!r} were left as they were"
        )
    return 0


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
        help="train on posterior samples (Genmo) or means (default: what the model was trained on; "
        "sample unless its defaults say otherwise, mean for the embedded model)",
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
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard the checkpoints of an earlier run in --out and train from step 0 "
        "(needed when they are unreadable or were made from other data)",
    )
    add_model_options(p)
    add_parallel_options(p, guidance=False)
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
    from mochi.cli.checks import check_train_lora

    check_train_lora(args)  # data folder, run folder, model paths: before the model loads
    world = start_parallel(args)
    if world is None:
        path = train_lora(pipeline_from_args(args), args.data, args.out, cfg, restart=args.restart)
    else:  # under torchrun the ranks split each batch's tokens; base weights are replicated
        import dataclasses

        from mochi.parallel.apply import load_pipeline
        from mochi.parallel.context import broadcast_int
        from mochi.parallel.train import parallelize_training

        cfg = dataclasses.replace(cfg, seed=broadcast_int(cfg.seed, world))
        files = {"vae": args.vae, "t5": args.t5, "tokenizer": args.tokenizer}
        pipe = load_pipeline(world, args.model, weights=args.parallel_weights, **files)
        parallel = parallelize_training(pipe, world)
        path = train_lora(pipe, args.data, args.out, cfg, parallel=parallel, restart=args.restart)
        if not world.is_main:
            return 0
    print(f"wrote {path}")
    return 0


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
    p.add_argument(
        "--depth",
        type=int,
        metavar="N",
        help="with --to diffusers: the DiT's number of blocks (48 for Mochi 1), which names the last block's "
        "layers; needed only when a LoRA on mod_y does not show it by its shapes",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(run=_run_convert_lora)


def _run_convert_lora(args: argparse.Namespace) -> int:
    from mochi.weights.lora import convert_lora

    if args.depth is not None and args.to != "diffusers":
        raise ValueError(
            f"--depth {args.depth} applies only to --to diffusers (Genmo's names are the same in every "
            "block); leave it out"
        )
    dst, lora = convert_lora(args.src, args.dst, to=args.to, overwrite=args.overwrite, depth=args.depth)
    print(f"wrote {dst} ({lora.format} → {args.to}, {len(lora.layers)} layers, ranks {sorted(lora.ranks)})")
    return 0


# The registrars of this module's sub-commands, in the order `mochi --help` lists them.
COMMANDS = (
    _add_prepare_data,
    _add_train_lora,
    _add_convert_lora,
)
