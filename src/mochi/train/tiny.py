"""Train the embedded ``mochi-tiny`` model from scratch, one command per stage (docs/embedded-model.md).

    python -m mochi.train.tiny vae     --out runs/tiny  # AsymmVAE encoder + decoder
    python -m mochi.train.tiny decoder --out runs/tiny  # the decoder alone, sharpened (may run beside dit)
    python -m mochi.train.tiny dit     --out runs/tiny  # latent cache, then T5 + AsymmDiT jointly
    python -m mochi.train.tiny export  --out runs/tiny  # → src/mochi/assets/mochi-tiny.safetensors

Every stage is seeded and resumable: run the same command again after an interruption and it continues
from its last checkpoint in ``--out`` as if it had never stopped.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from dataclasses import replace
from pathlib import Path

import torch

from mochi.files import folder_problem
from mochi.presets import MODEL_PRESETS, ModelPreset, model_preset
from mochi.train import shapes
from mochi.train.train_vae import VAERecipe

DEFAULT_ASSET = Path(__file__).resolve().parent.parent / "assets" / "mochi-tiny.safetensors"


def _log_to(path: Path):
    def log(line: str) -> None:
        print(line, flush=True)
        with path.open("a") as f:
            f.write(line + "\n")

    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mochi.train.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("vae", "decoder", "dit", "export"))
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run folder (checkpoints, logs)")
    vae = VAERecipe()
    parser.add_argument(
        "--steps",
        type=int,
        help="optimizer steps of the stage's first phase (default: the recipe's). vae: the joint phase, "
        f"whose encoder is frozen from step {vae.encoder_steps} (so N >= {vae.encoder_steps}); "
        f"{vae.decoder_steps} decoder-only and {vae.tune_steps} tuning steps follow (the stage ends at "
        f"step N + {vae.decoder_steps + vae.tune_steps}); decoder: the whole stage; dit: the phase before "
        "--tune-steps and --finish-steps",
    )
    parser.add_argument("--batch", type=int, help="clips per step (default: the recipe's)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        help="steps between checkpoints (default: the recipe's); results do not depend on it",
    )
    parser.add_argument(
        "--pooled-caption",
        action=argparse.BooleanOptionalAction,
        help="dit: train the DiT's pooled caption vector, or hold it at zero (default: the recipe's)",
    )
    parser.add_argument(
        "--word-consistency", type=float, help="dit: weight of the T5 word-consistency loss (0 = off)"
    )
    parser.add_argument(
        "--object-weight",
        type=float,
        help="dit: weigh the flow loss 1 + W times where the latent holds the object (0 = off)",
    )
    parser.add_argument(
        "--early-foreground-weight",
        type=float,
        help="vae: weight the object's pixels 1 + W times in the joint and decoder-only phases too (0 = off)",
    )
    parser.add_argument(
        "--separation-weight",
        type=float,
        help="vae: weight of the shape-separation margin in the encoder phase (0 = off; each clip is "
        "rendered again with another shape and their latents held apart)",
    )
    parser.add_argument(
        "--separation-margin",
        type=float,
        help="vae: the least distance between a clip's latent and its twin's, relative to the clip's "
        "distance from its empty background (default 0.5)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="vae, dit: the stage's seed (initial weights, clips, noise; default: the recipe's, 1 for the "
        "vae stage, 2 for the dit stage). Another vae seed draws another encoder, to pick among on VAE-only "
        "measures (benchmarks/latent_probe.py); another dit seed another DiT on the same encoder",
    )
    parser.add_argument(
        "--source",
        type=Path,
        help="decoder: the VAE to start from, a vae.ckpt or a mochi bundle (default: OUT/vae.ckpt); "
        "export: a bundle that gives every part but the decoder (when only the decoder stage ran)",
    )
    parser.add_argument(
        "--contrast-power",
        type=float,
        help="vae, decoder, dit: weigh each clip's loss by contrast^-P, P >= 0 (0 = off; the recipes' "
        "contrast_power)",
    )
    parser.add_argument(
        "--contrast-steps",
        type=int,
        help="vae: apply --contrast-power only before step N (e.g. the encoder's steps; default: every step)",
    )
    parser.add_argument(
        "--refine-share",
        type=float,
        help="decoder: share of the steps (0 to 1) that train on latents the frozen DiT refined from sigma "
        "<= --refine-sigma (0 = off; needs OUT's dit stage or a bundle --source)",
    )
    parser.add_argument(
        "--focus",
        metavar="COLOR:SHAPE",
        help="decoder: draw a share (--focus-share) of the clips as this composition, e.g. green:triangle",
    )
    parser.add_argument(
        "--focus-share", type=float, help="decoder: the share of clips --focus redraws (0 < S <= 1)"
    )
    parser.add_argument(
        "--refine-sigma", type=float, help="decoder: the largest sigma of a refined latent (0 < S <= 1)"
    )
    parser.add_argument(
        "--heldout-pixels",
        action=argparse.BooleanOptionalAction,
        help="vae, decoder: train on clips of held-out compositions too (the VAE reads no caption; "
        "default: yes for the decoder stage, no for the vae stage, as v2 was trained)",
    )
    tune = parser.add_argument_group(
        "dit tuning phase (off by default; stage 2b and the experiments of docs/embedded-model.md)"
    )
    tune.add_argument("--tune-steps", type=int, help="steps after --steps, with a fresh cosine schedule")
    tune.add_argument("--tune-lr", type=float, help="peak learning rate of the tuning phase")
    tune.add_argument("--word-dropout", type=float, help="chance to leave out each caption word (0 to 1)")
    tune.add_argument(
        "--tune-clips", type=int, help="extra clips of every composition (held-out captions lose a word)"
    )
    finish = parser.add_argument_group("dit finishing phase (off by default; v5 in docs/embedded-model.md)")
    finish.add_argument(
        "--finish-steps", type=int, help="steps after the tuning phase, fresh cosine schedule"
    )
    finish.add_argument("--finish-lr", type=float, help="peak learning rate of the finishing phase")
    finish.add_argument(
        "--finish-logit-mean", type=float, help="centre of the finishing phase's logit-normal sigmas"
    )
    finish.add_argument(
        "--init",
        type=Path,
        help="a mochi bundle to start the run folder from, at the end of its tuning phase (give the tuning "
        "options it was trained with); ignored once OUT holds a dit.ckpt",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--preset", default="mochi-tiny", help="model preset to train")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_ASSET, help="export: where the bundle goes")
    parser.add_argument(
        "--dtype", default="float16", choices=("float32", "float16"), help="export: storage dtype"
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be 1 or more, got {args.steps}")
    if args.stage == "vae" and args.steps is not None and args.steps < vae.encoder_steps:
        # The phases after it train the decoder alone: the encoder must have had its steps by then.
        parser.error(
            f"--steps of the vae stage is its joint phase, which trains the encoder until step "
            f"{vae.encoder_steps} (encoder_steps): it must be {vae.encoder_steps} or more, got {args.steps} "
            f"(the stage runs {vae.decoder_steps + vae.tune_steps} more steps after it)"
        )
    for flag, value in (
        ("--threads", args.threads),
        ("--batch", args.batch),
        ("--checkpoint-every", args.checkpoint_every),
    ):
        if value is not None and value < 1:
            parser.error(f"{flag} must be 1 or more, got {value}")
    if args.preset not in MODEL_PRESETS:
        parser.error(f"--preset {args.preset!r} is unknown; choose one of {', '.join(sorted(MODEL_PRESETS))}")
    preset = model_preset(args.preset)
    if args.stage != "export" and (problem := folder_problem(args.out)):
        parser.error(f"--out {str(args.out)!r} {problem}; give a folder for the run")
    overrides = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("batch", args.batch),
            ("checkpoint_every", args.checkpoint_every),
        )
        if v is not None
    }
    if args.pooled_caption is not None:
        if args.stage != "dit":
            parser.error("--pooled-caption/--no-pooled-caption is an option of the dit stage")
        overrides["pooled_caption"] = args.pooled_caption
    # Numeric options of some stages: (recipe field, the stages that take it, its rule).
    for key, stages, ok, rule in (
        ("word_consistency", ("dit",), lambda v: v >= 0, "be 0 or more"),
        ("object_weight", ("dit",), lambda v: v >= 0, "be 0 or more"),
        ("early_foreground_weight", ("vae",), lambda v: v >= 0, "be 0 or more"),
        ("contrast_power", ("vae", "decoder", "dit"), lambda v: v >= 0, "be 0 or more"),
        ("contrast_steps", ("vae",), lambda v: v >= 0, "be 0 or more"),
        ("separation_weight", ("vae",), lambda v: v >= 0, "be 0 or more"),
        ("separation_margin", ("vae",), lambda v: v > 0, "be above 0"),
        ("seed", ("vae", "dit"), lambda v: v >= 0, "be 0 or more"),
        ("refine_share", ("decoder",), lambda v: 0.0 <= v <= 1.0, "lie in [0, 1]"),
        ("refine_sigma", ("decoder",), lambda v: 0.0 < v <= 1.0, "lie in (0, 1]"),
        ("focus_share", ("decoder",), lambda v: 0.0 < v <= 1.0, "lie in (0, 1]"),
    ):
        value = getattr(args, key)
        if value is not None:
            flag = f"--{key.replace('_', '-')}"
            if args.stage not in stages:
                which = (
                    f"{', '.join(stages[:-1])} and {stages[-1]} stages"
                    if len(stages) > 1
                    else f"{stages[0]} stage"
                )
                parser.error(f"{flag} is an option of the {which}")
            if not ok(value):
                parser.error(f"{flag} must {rule}, got {value}")
            overrides[key] = value
    if overrides.get("contrast_steps") is not None and not overrides.get("contrast_power"):
        parser.error("--contrast-steps needs --contrast-power P (P > 0): it ends that weighting")
    if overrides.get("separation_margin") is not None and not overrides.get("separation_weight"):
        parser.error("--separation-margin needs --separation-weight W (W > 0): it sets that term's margin")
    if (args.focus is None) != (args.focus_share is None):
        parser.error(
            "--focus COLOR:SHAPE and --focus-share S go together, e.g. --focus green:triangle "
            "--focus-share 0.25"
        )
    if args.focus is not None:
        if args.stage != "decoder":
            parser.error("--focus is an option of the decoder stage")
        color, _, shape = args.focus.partition(":")
        if color not in shapes.DEFAULT_VOCAB.colors or shape not in shapes.DEFAULT_VOCAB.shapes:
            parser.error(
                f"--focus {args.focus!r} must be COLOR:SHAPE of the world's palette "
                f"({', '.join(shapes.DEFAULT_VOCAB.colors)}) and shapes "
                f"({', '.join(shapes.DEFAULT_VOCAB.shapes)}), e.g. green:triangle"
            )
        overrides["focus"] = args.focus
    if args.heldout_pixels is not None:
        if args.stage not in ("vae", "decoder"):
            parser.error("--heldout-pixels/--no-heldout-pixels is an option of the vae and decoder stages")
        overrides["heldout_pixels"] = args.heldout_pixels
    if args.source is not None and args.stage not in ("decoder", "export"):
        parser.error("--source is an option of the decoder and export stages")
    tuning = {k: getattr(args, k) for k in ("tune_steps", "tune_lr", "word_dropout", "tune_clips")}
    tuning = {k: v for k, v in tuning.items() if v is not None}
    if tuning and args.stage != "dit":
        parser.error(f"--{next(iter(tuning)).replace('_', '-')} is an option of the dit stage")
    if tuning and not tuning.get("tune_steps"):
        parser.error(
            f"--{next(iter(tuning)).replace('_', '-')} needs --tune-steps N (N > 0): it acts in that phase"
        )
    if tuning.get("tune_lr", 1.0) <= 0:
        parser.error(f"--tune-lr must be above 0, got {tuning['tune_lr']}")
    if not 0.0 <= tuning.get("word_dropout", 0.0) <= 1.0:
        parser.error(f"--word-dropout must lie in [0, 1], got {tuning['word_dropout']}")
    for k in ("tune_steps", "tune_clips"):
        if tuning.get(k, 0) < 0:
            parser.error(f"--{k.replace('_', '-')} must be 0 or more, got {tuning[k]}")
    finishing = {k: getattr(args, k) for k in ("finish_steps", "finish_lr", "finish_logit_mean")}
    finishing = {k: v for k, v in finishing.items() if v is not None}
    if (finishing or args.init is not None) and args.stage != "dit":
        parser.error(
            "--finish-steps, --finish-lr, --finish-logit-mean and --init are options of the dit stage"
        )
    if finishing.get("finish_steps", 0) < 0:
        parser.error(f"--finish-steps must be 0 or more, got {finishing['finish_steps']}")
    if not finishing.get("finish_lr", 1.0) > 0:
        parser.error(f"--finish-lr must be above 0, got {finishing['finish_lr']}")
    if not math.isfinite(finishing.get("finish_logit_mean", 0.0)):
        parser.error(f"--finish-logit-mean must be a finite number, got {finishing['finish_logit_mean']}")
    if args.init is not None and not args.init.is_file():
        parser.error(f"--init {str(args.init)!r}: no such file")
    recipe = None
    if args.stage == "vae":
        recipe = replace(VAERecipe(), **overrides)
    elif args.stage == "decoder":
        from mochi.train.train_decoder import DecoderRecipe

        recipe = replace(DecoderRecipe(), **overrides)
    elif args.stage == "dit":
        from mochi.train.train_dit import DiTRecipe

        recipe = replace(DiTRecipe(), **overrides, **tuning, **finishing)
        if recipe.word_consistency and recipe.tune_steps and args.init is None:
            # The loss acts on every step the command runs. Stage 2b gives it only to the tuning phase by
            # running after the first phase has ended; one command that starts earlier is another recipe.
            from mochi.train.checkpoint import load_checkpoint
            from mochi.train.train_dit import DIT_CHECKPOINT

            state = load_checkpoint(args.out / DIT_CHECKPOINT)
            step = state["step"] if state is not None else 0
            if step < recipe.steps:
                parser.error(
                    f"--word-consistency with --tune-steps would act on the first phase too "
                    f"({args.out / DIT_CHECKPOINT} is at step {step} of --steps {recipe.steps}): run "
                    f"`dit` without the tuning options first, then again with them (stage 2b); for the "
                    f"loss in both phases, give --word-consistency to both commands"
                )
    try:
        _run(args, preset, recipe)
    except ValueError as e:  # WeightsError too: a run folder, source or bundle that does not fit
        print(f"tiny: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the checkpoints are written atomically, so the last one stands
        print(f"tiny: {_interrupted(args)}", file=sys.stderr)
        return 130
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C of stage ``args.stage`` left: the step of its last checkpoint, which a rerun resumes
    from (the steps after it are done again, as the batches are a function of the step)."""
    if args.stage == "export":
        return "export interrupted (the bundle is written whole or not at all); rerun the same command"
    from mochi.train.train_decoder import DECODER_CHECKPOINT
    from mochi.train.train_dit import DIT_CHECKPOINT
    from mochi.train.train_vae import VAE_CHECKPOINT

    path = (
        args.out / {"vae": VAE_CHECKPOINT, "decoder": DECODER_CHECKPOINT, "dit": DIT_CHECKPOINT}[args.stage]
    )
    try:  # mapped, not read: only the step is wanted
        step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except FileNotFoundError:
        return f"{args.stage} interrupted before its first checkpoint; rerun the same command to resume"
    except (OSError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError):  # the rerun says what
        return f"{args.stage} interrupted; rerun the same command to resume from {str(path)!r}"
    return (
        f"{args.stage} interrupted; its last checkpoint, {str(path)!r}, is at step {step}: rerun the same "
        "command to resume from there"
    )


def _run(args: argparse.Namespace, preset: ModelPreset, recipe) -> None:
    """Run the stage ``args.stage`` with its recipe (None for export); the arguments are checked."""
    torch.set_num_threads(args.threads)
    # Before --out is made (a missing source left an empty run folder); a resume's own checks come first.
    if args.stage == "decoder":
        from mochi.train.train_decoder import DECODER_CHECKPOINT, check_vae_source
        from mochi.train.train_vae import VAE_CHECKPOINT

        if not (args.out / DECODER_CHECKPOINT).exists():
            check_vae_source(args.source if args.source is not None else args.out / VAE_CHECKPOINT)
    if args.stage != "export":  # export only reads the run folder
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # what access() cannot tell: /proc, a read-only mount seen by root
            raise ValueError(f"--out {str(args.out)!r} cannot be made: {e.strerror}") from None
    if args.stage == "vae":
        from mochi.train.train_vae import train_vae

        train_vae(args.out, preset, recipe, log=_log_to(args.out / "vae.log"))
    elif args.stage == "decoder":
        from mochi.train.train_decoder import train_decoder

        train_decoder(args.out, preset, recipe, source=args.source, log=_log_to(args.out / "decoder.log"))
    elif args.stage == "dit":
        from mochi.train.train_dit import init_from_bundle, train_dit

        log = _log_to(args.out / "dit.log")
        if args.init is not None:
            init_from_bundle(args.out, preset, args.init, recipe, log=log)
        train_dit(args.out, preset, recipe, log=log)
    else:
        from mochi.train.export import export_bundle

        path = export_bundle(
            args.out, preset, args.bundle, dtype=getattr(torch, args.dtype), source=args.source
        )
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
