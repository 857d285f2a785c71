"""Step caching options of `mochi generate` and the `mochi calibrate-cache` command (docs/acceleration.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mochi.cli.options import DTYPES, Subparsers, add_dit_options, add_model_options


def add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache",
        default="none",
        metavar="KIND",
        help="skip DiT blocks at steps that change little: none (exact, default), teacache, fbcache, or "
        "a preset: teacache:quality, teacache:fast, teacache:2x, fbcache:quality, fbcache:fast, fbcache:3x; "
        "options after commas: max-skips=N, keep=LO-HI (σ range that always runs), extrapolate[=F] (damped "
        "by 0 < F ≤ 1)",
    )
    p.add_argument(
        "--cache-threshold", type=float, metavar="X", help="the cache's threshold (> 0; larger skips more)"
    )
    p.add_argument(
        "--cache-coefficients",
        metavar="FILE",
        help="TeaCache coefficient JSON (default: the one beside the model, see calibrate-cache)",
    )


def check_cache_options(args: argparse.Namespace) -> None:
    """ValueError for --cache-coefficients without a TeaCache kind of --cache (only TeaCache reads them),
    naming no file, or naming a file that is no coefficient file (before the model loads; whether it was
    fitted for this model is checked once it is loaded)."""
    path = getattr(args, "cache_coefficients", None)
    from mochi.accel.cache import CacheSetting

    cache = getattr(args, "cache", None) or "none"
    if path is None:
        model = getattr(args, "model", None)
        if model is not None and CacheSetting.parse(cache).kind == "teacache":
            # The file beside the model, which generate reads: a malformed one was refused after the load.
            from mochi.accel.calibrate import coefficients_path, load_coefficients

            if (beside := coefficients_path(model)).is_file():
                load_coefficients(beside, None)
        return
    if CacheSetting.parse(cache).kind != "teacache":
        raise ValueError(
            f"--cache-coefficients {path!r} applies only to TeaCache, not --cache {cache}; add --cache "
            "teacache (or a teacache preset) or leave it out"
        )
    file = Path(path)
    if not path or not file.is_file():
        why = "is empty" if not path else "is a folder" if file.is_dir() else "does not exist"
        raise ValueError(
            f"--cache-coefficients {path!r} {why}; give a file written by `mochi calibrate-cache`"
        )
    from mochi.accel.calibrate import load_coefficients

    load_coefficients(file, None)  # a malformed file was refused only after the model (minutes) had loaded


def apply_cache_options(pipe, args: argparse.Namespace) -> None:  # noqa: ANN001 - a MochiPipeline
    """Give the pipeline the TeaCache coefficients named by --cache-coefficients (checked against it)."""
    check_cache_options(args)
    if getattr(args, "cache_coefficients", None) is not None:
        from mochi.accel.calibrate import load_coefficients

        pipe.cache_coefficients = load_coefficients(args.cache_coefficients, pipe.components.dit.config)
        pipe.cache_coefficients_source = str(args.cache_coefficients)


def _add_calibrate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "calibrate-cache",
        help="fit TeaCache's rescale polynomial for a model",
        description=(
            "Run a few uncached denoising runs, record how much the first block's modulated input and the "
            "DiT's output change at every step, fit the degree-4 polynomial TeaCache maps one to the other "
            "with, print it and store it beside the model (NAME.teacache.json beside a file, teacache.json "
            "in a folder), where `mochi generate --cache teacache` finds it."
        ),
    )
    add_model_options(p)
    p.add_argument("--dtype", choices=DTYPES, help="DiT dtype (default: bf16 on GPU, fp32 on CPU)")
    add_dit_options(p)  # the DiT as generate will run it: a fit of the quantized model is the one to use
    p.add_argument("--prompt", action="append", default=[], help="a calibration prompt; repeat for several")
    p.add_argument("--runs", type=int, default=4, help="uncached runs (at least 2; default 4)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--frames", type=int, help="frame count (default: the model's)")
    p.add_argument("--width", type=int, help="width in pixels (default: the model's)")
    p.add_argument("--height", type=int, help="height in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="run i uses seed SEED + i (default 0)")
    p.add_argument("--lora", metavar="FILE", help="calibrate with this LoRA merged in")
    p.add_argument(
        "--out",
        metavar="FILE.json",
        help="where to write (default: beside the model; needed for the embedded model, whose packaged fit "
        "it would replace, and with --lora or --quantize)",
    )
    p.set_defaults(run=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from mochi.accel.calibrate import (
        DEFAULT_PROMPTS,
        MAX_RUNS,
        MIN_RUNS,
        calibrate,
        check_points,
        coefficients_path,
        save_coefficients,
    )

    if args.runs < MIN_RUNS:
        raise ValueError(
            f"--runs {args.runs}: calibration needs at least {MIN_RUNS} uncached runs; "
            f"nearest valid: {MIN_RUNS}"
        )
    if args.runs > MAX_RUNS:  # each run is a whole generation; past 2**63 the --seed range came out empty
        raise ValueError(
            f"--runs {args.runs}: more than {MAX_RUNS:,} uncached runs (the packaged fit used 8); "
            f"nearest valid: {MAX_RUNS}"
        )
    from mochi.request import MAX_SEED, check_prompt

    for prompt in args.prompt:
        check_prompt(prompt, "--prompt")
    if not 0 <= args.seed <= MAX_SEED - args.runs + 1:
        raise ValueError(
            f"--seed {args.seed}: run i uses seed {args.seed} + i, so with --runs {args.runs} it must be in "
            f"[0, {MAX_SEED - args.runs + 1}]"
        )
    if args.lora and not args.out:  # beside the checkpoint it would replace the model's own fit
        raise ValueError(
            f"--lora {args.lora}: the fit is of the LoRA-merged model, and without --out it would replace "
            "the model's own coefficient file (used by every later --cache teacache run without the LoRA); "
            "give --out FILE.json and pass that file with --cache-coefficients"
        )
    if args.out:
        out = Path(args.out)
        _check_out(out, "--out")
    elif args.model is None or _is_embedded(args.model):
        # The packaged fit: replacing it would change every later cache run of the embedded model.
        raise ValueError(
            "without --out the fit would replace the embedded model's packaged coefficient file (used by "
            "every --cache teacache run of the embedded model); give --out FILE.json and pass that file "
            "with --cache-coefficients"
        )
    elif args.quantize:
        # A fit of the quantized DiT would become the model's own, read by every later --cache teacache
        # run of it, quantized or not; writing it there is the user's call, so ask for the file by name.
        own = coefficients_path(args.model)
        raise ValueError(
            f"--quantize {args.quantize}: the fit is of the quantized DiT, and without --out it would "
            "replace the model's own coefficient file (used by every later --cache teacache run, unquantized "
            f"ones too); give --out FILE.json and pass it with --cache-coefficients, or --out {own} to make "
            "it the model's fit"
        )
    else:
        out = coefficients_path(args.model)
        _check_out(out, "the coefficient file beside the model", hint="give --out FILE.json")
    # The request, the fit's size and the LoRA, before the model loads (minutes for the released one).
    from mochi.cli.checks import check_loras
    from mochi.request import GenerationRequest
    from mochi.weights.components import check_model_paths, model_defaults

    check_model_paths(args.model, args.vae, args.t5, args.tokenizer)
    asked = {k: getattr(args, k) for k in ("steps", "guidance", "frames", "width", "height")}
    first = GenerationRequest(args.prompt[0] if args.prompt else DEFAULT_PROMPTS[0], seed=args.seed, **asked)
    check_points(args.runs, first.resolved(model_defaults(args.model)).steps)
    if args.lora:
        check_loras([args.lora])
    from mochi.pipeline import MochiPipeline

    options = {
        k: getattr(args, k) for k in ("vae", "t5", "tokenizer", "fp8", "offload", "attention", "quantize")
    }
    pipe = MochiPipeline.from_pretrained(args.model, device=args.device, dit_dtype=args.dtype, **options)
    source = pipe.components.source
    if args.lora:
        # Merged for speed, keeping no copy of the weights it changes (nothing takes it off again); hooked
        # in unmerged where the weights are quantized, as generate applies it.
        from mochi.weights.quantize import is_quantized

        # Quantized by --quantize or kept as a checkpoint stores them (fp8, GGUF: pipe.quantization is None).
        quantized = any(is_quantized(m) for m in pipe.components.dit.modules())
        pipe.lora_keep_originals = False
        pipe.load_lora(args.lora, merge=not quantized)
    if pipe.quantization:
        print(f"mochi: note: {pipe.quantization}")
    request = {k: getattr(args, k) for k in ("steps", "guidance", "frames", "width", "height")}
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    result = calibrate(
        pipe, prompts, args.runs, seed=args.seed, **{k: v for k, v in request.items() if v is not None}
    )
    coefficients = result["coefficients"]
    from mochi.memory.auto import quantization_of

    xs = [x for x, _ in result["trace"]]
    print(f"fitted on {result['points']} steps of {args.runs} runs: R² {result['r2']:.4f}")
    print("coefficients (highest power first): [" + ", ".join(f"{c:.8e}" for c in coefficients) + "]")
    print(f"input change range: {min(xs):.4g} to {max(xs):.4g}")
    from mochi.accel.calibrate import negative_span

    if (span := negative_span(coefficients, min(xs), max(xs))) is not None:
        print(
            f"mochi: warning: the fitted polynomial is negative for input changes {span[0]:.4g} to "
            f"{span[1]:.4g}, inside the range it was fitted on: there a large change would make TeaCache "
            f"skip sooner, not later. {result['points']} points fit its 5 coefficients; calibrate with more "
            "--runs (or more --prompt) for a steadier fit",
            file=sys.stderr,
        )
    fit = {
        "runs": args.runs,
        "points": result["points"],
        "r2": result["r2"],
        "seed": args.seed,
        "prompts": result["prompts"],  # those of the runs made, not every --prompt given
        "lora": args.lora,
        # What the DiT's weights were (--quantize as the device ran it, or kept as stored), not what was asked
        "quantize": None if (held := quantization_of(pipe.components.dit)) == "none" else held,
        "dtype": str(pipe.dit_dtype).removeprefix("torch."),  # the DiT's compute dtype
        **{k: result[k] for k in ("steps", "guidance", "frames", "width", "height")},  # as resolved
    }
    name = Path(source).name if source else "custom"
    save_coefficients(out, coefficients, pipe.components.dit.config, name, fit)
    print(f"wrote {out}")
    return 0


def _is_embedded(model: str) -> bool:
    from mochi.weights.bundle import embedded_path

    return Path(model).resolve() == embedded_path().resolve()


def _check_out(out: Path, what: str, hint: str = "") -> None:
    """``out`` (called ``what``) can take the coefficient file: a .json name, not a folder, in a writable
    folder, and not a file other than an earlier fit (a sidecar or a checkpoint's config.json, replaced)."""
    import json

    from mochi.accel.calibrate import FORMAT
    from mochi.files import check_folder

    hint = hint or f"give a file name such as {out / 'teacache.json'}"
    if out.is_dir():
        raise ValueError(f"{what} {str(out)!r} is a folder; {hint}")
    if out.suffix != ".json":
        # A bare ".json" is a dot-file without a suffix: its nearest valid name is not ".json.json".
        named = out.with_suffix(".json") if out.name.strip(".") != "json" else out.with_name("teacache.json")
        raise ValueError(f"{what} {str(out)!r} must be a name ending in .json, e.g. {named}")
    if out.exists():
        try:
            earlier = json.loads(out.read_bytes())
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, dict) or earlier.get("format") != FORMAT:
            raise ValueError(
                f"{what} {str(out)!r} exists and is not a {FORMAT} coefficient file; it would be replaced: "
                "give another name"
            )
    check_folder(out)


# The registrars of this module's sub-commands, in the order `mochi --help` lists them.
COMMANDS = (_add_calibrate,)
