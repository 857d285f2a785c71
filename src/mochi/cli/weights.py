"""`mochi info` and `mochi convert`: inspect and convert checkpoints."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mochi.cli.options import Subparsers


def _add_info(sub: Subparsers) -> None:
    p = sub.add_parser(
        "info",
        help="show what a checkpoint holds: format, dtypes, parameter counts, DiT config",
        description=(
            "Detect a checkpoint's format (Genmo folder, diffusers folder or file, ComfyUI single file, "
            "all-in-one, fp8_scaled, GGUF) and print its components, dtypes, parameter counts and the DiT "
            "config inferred from its shapes. Reads safetensors headers only, never tensor data "
            "(weights-only .pt/.bin files are memory-mapped instead). Also describes a LoRA file (format, "
            "ranks, alphas, targets), a clip or the data folder of `mochi prepare-data` (captions, size), "
            "and a `train-lora` state file or run folder (step, settings, data)."
        ),
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a folder, a .safetensors file or an *.index.json (or a LoRA, clip, data folder, state file or "
        "run folder)",
    )
    p.add_argument("--variant", help="diffusers weight variant to inspect when several exist (e.g. bf16)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from mochi.weights.info import checkpoint_info, format_info
    from mochi.weights.io import WeightsError

    if args.checkpoint.startswith("embedded:"):
        from mochi.weights.bundle import embedded_path, model_alias

        if model_alias(args.checkpoint, "info") is None:
            args.checkpoint = str(embedded_path())
    try:
        info = checkpoint_info(args.checkpoint, variant=args.variant)
    except WeightsError:
        if args.variant is not None:  # a variant names a diffusers folder: nothing else is described
            raise
        # Not a model: a LoRA file, a prepared clip or a training state is described as one.
        other = None
        for describe in (_lora_info, _clip_info, _state_info, _data_info, _run_folder_info):
            if (other := describe(args.checkpoint)) is not None:
                break
        if other is None:
            raise
        print(
            json.dumps(other, indent=2) if args.json else "\n".join(f"{k:<11} {v}" for k, v in other.items())
        )
        return 0
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _clip_info(path: str) -> dict | None:
    """What ``mochi info`` says of a clip ``mochi prepare-data`` wrote, or None if it is not one."""
    import contextlib

    from mochi.train.data import CLIP_TENSORS
    from mochi.weights.io import read_metadata, read_state_dict

    if not Path(path).is_file():  # a folder of clips is _data_info's
        return None
    with contextlib.suppress(Exception):  # anything that does not read as a clip keeps the model's error
        tensors, meta = read_state_dict(path), read_metadata(path)
        if tensors.keys() >= CLIP_TENSORS and "caption" in meta:
            folder = str(Path(path).parent)
            return {
                "path": str(path),
                "format": "prepared clip (mochi prepare-data)",
                "caption": meta["caption"],
                "source": meta.get("source", "?"),
                "size": "{} frames, {}x{}".format(*(meta.get(k, "?") for k in ("frames", "width", "height"))),
                "latents": "x".join(str(n) for n in tensors["mean"].shape),
                "text": f"{tensors['text'].shape[0]} tokens",
                "use": f"mochi train-lora {folder} --out RUN",
            }
    return None


def _data_info(path: str) -> dict | None:
    """What ``mochi info`` says of a folder ``mochi prepare-data`` wrote, or None if it is not one."""
    import contextlib

    from mochi.errors import MochiError
    from mochi.train.data import REPORT_NAME, LatentDataset

    if not Path(path).is_dir():
        return None
    try:
        data = LatentDataset(path)
    except Exception as e:
        if (Path(path) / REPORT_NAME).is_file() and isinstance(e, MochiError | ValueError | OSError):
            # prepare-data's folder: what it cannot read is the answer
            raise ValueError(f"{str(path)!r} is a prepare-data folder that cannot be read: {e}") from None
        return None  # anything else that does not read as prepared data keeps the model's error
    with contextlib.suppress(Exception):
        shape = "x".join(str(n) for n in data.examples[0].mean.shape)
        size = "{} frames, {}x{}".format(*(data.settings.get(k, "?") for k in ("frames", "width", "height")))
        captions = [e.caption for e in data.examples if e.caption.strip()]
        return {
            "path": str(path),
            "format": "prepared data (mochi prepare-data)",
            "clips": f"{len(data)} ({len(captions)} with a caption)",
            "size": size,
            "latents": shape,
            "model": data.model or "?",
            "caption": captions[0] if captions else "",
            "use": f"mochi train-lora {path} --out RUN",
        }
    return None


def _run_folder_info(path: str) -> dict | None:
    """What ``mochi info`` says of a ``train-lora`` run folder, or None if it is not one."""
    from mochi.train.lora_state import list_states

    folder = Path(path)
    if not (folder / "config.json").is_file():
        return None
    # A run's own files beside config.json (a diffusers component folder has a config.json too): what
    # cannot be read is the answer, not the model's "no Mochi component recognised".
    ran = list_states(folder) or any(folder.glob("lora*.safetensors"))
    try:
        info = _read_run_folder(folder, path)
    except Exception as e:
        if not ran:
            return None
        raise ValueError(f"{str(path)!r} is a train-lora run folder that cannot be read: {e}") from None
    return info


def _read_run_folder(folder: Path, path: str) -> dict:
    import json

    from mochi.train.lora_state import load_latest_state

    try:
        config = json.loads((folder / "config.json").read_bytes())
    except ValueError as e:
        raise ValueError(f"its config.json is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError("its config.json is not a JSON object of train-lora settings")
    state = load_latest_state(folder, tidy=False)  # a reading command changes nothing
    # By step number: lora-step-1000000 sorts before lora-step-200000 as text.
    checkpoints = sorted(
        (int(m.group(1)), p)
        for p in folder.glob("lora-step-*.safetensors")
        if (m := re.fullmatch(r"lora-step-(\d+)\.safetensors", p.name))
    )
    final = folder / "lora.safetensors"
    if state:
        step = state["step"]
    else:  # the states (optimizer and all) deleted after the run: the LoRA files' own steps
        step = max([_lora_step(final) or 0 if final.is_file() else 0] + [n for n, _ in checkpoints])
    # lora.safetensors is the run's result only once the run is finished: resumed with more --steps, the
    # earlier run's stays until the new end, and was named as this run's.
    done = final.is_file() and step >= config.get("steps", step) and _lora_step(final) in (step, None)
    lora = final if done else (checkpoints[-1][1] if checkpoints else None)
    return {
        "path": str(path),
        "format": "train-lora run",
        "step": f"{step} of {config.get('steps', '?')}",
        "settings": f"rank {config.get('rank', '?')}, alpha {config.get('alpha', '?')}, "
        f"targets {','.join(config.get('targets', []))}",
        "lora": str(lora) if lora else "none yet",
        "use": f"mochi generate PROMPT --lora {final}"
        if done
        else f"mochi train-lora DATA --out {path} (resumes)"
        if state or not lora
        else f"mochi generate PROMPT --lora {lora} (the training states are gone: train-lora would "
        "start over from step 0)",
    }


def _lora_step(path: Path) -> int | None:
    """The training step a train-lora LoRA file records (metadata ``mochi_lora``), or None."""
    import json

    from mochi.weights.io import read_metadata

    step = json.loads(read_metadata(path).get("mochi_lora") or "{}").get("step")
    return step if isinstance(step, int) else None


def _state_info(path: str) -> dict | None:
    """What ``mochi info`` says of a ``train-lora`` state file, or None if it is not one."""
    import contextlib

    from mochi.train.lora_state import read_state

    with contextlib.suppress(Exception):  # anything that does not read as a state keeps the model's error
        state = read_state(Path(path))
        run = Path(path).resolve().parent.parent
        config = state["config"]
        return {
            "path": str(path),
            "format": "train-lora state",
            "step": f"{state['step']} of {config.get('steps', '?')}",
            "lora": f"{len(state['lora'])} tensors, rank {config.get('rank', '?')}",
            "data": state.get("data") or "?",
            "use": f"mochi train-lora DATA --out {run} (resumes after step {state['step']})",
        }
    return None


def _lora_info(path: str) -> dict | None:
    """What ``mochi info`` says of a LoRA file (Genmo or diffusers/PEFT), or None if it is not one."""
    from mochi.errors import MochiError, listing
    from mochi.weights.lora import foreign_layers, is_lora_shaped, read_lora

    lora = None
    try:
        lora = read_lora(path)
    except Exception as e:
        if isinstance(e, MochiError | ValueError | OSError) and is_lora_shaped(path):
            # Named as a LoRA's keys are: what is wrong with it is the answer, not "no Mochi component"
            raise ValueError(f"{str(path)!r} is a LoRA that cannot be used: {e}") from None
        # anything else that does not read as a LoRA keeps the model's error
    if lora is None or not lora.layers:
        return None

    def summary(layers: dict) -> tuple[int, list[int], list[float]]:
        return (
            len(layers),
            sorted({layer.rank for layer in layers.values()}),
            sorted({layer.alpha for layer in layers.values()}),
        )

    count, ranks, alphas = summary(lora.stored)  # the file's own factors, as read
    fused = summary(lora.layers)  # as applied: a diffusers file's q, k and v fused into Genmo's qkv layers
    out = {
        "path": str(path),
        "format": f"lora ({lora.format})",
        "layers": count,
        "ranks": ranks,
        "alphas": alphas,
    }
    if fused != (count, ranks, alphas):
        out["applied as"] = f"{fused[0]} Genmo layers (q, k, v fused), ranks {fused[1]}, alphas {fused[2]}"
    out["targets"] = list(lora.targets)
    foreign = foreign_layers(lora.layers)
    if foreign:  # generate and convert-lora refuse the file: say so here rather than suggest using it
        shown = listing(foreign, 3)
        return out | {"unusable": f"{len(foreign)} layer(s) that Mochi's DiT does not have: {shown}"}
    return out | {"use": f"mochi generate PROMPT --lora {path}"}


def _add_convert(sub: Subparsers) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint's DiT and VAE to Genmo's or diffusers' layout",
        description=(
            "Convert the DiT and the VAE of any supported checkpoint (Genmo, diffusers, ComfyUI bf16, "
            "all-in-one, fp8_scaled or GGUF; a VAE-only folder too; detected automatically). --to genmo "
            "writes DST/dit.safetensors and the VAE as DST/decoder.safetensors and encoder.safetensors "
            "(DST itself if it ends in .safetensors: the DiT alone, or a VAE-only source's two parts); "
            "--to diffusers writes DST/transformer/ and DST/vae/, each with config.json and safetensors, "
            "sharded with an index when large. Quantized weights (fp8, GGUF) are dequantized unless "
            "--quantize asks for blocks. Files are written atomically; converting and converting back is "
            "bit-exact."
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
        metavar="SIZE",
        help="with --to diffusers: largest shard, e.g. 5GB or 500MB (default: 10GB)",
    )
    p.add_argument(
        "--quantize",
        choices=("q8_0", "q4_0"),
        help="with --to genmo: store the blocks' Linear weights as GGUF Q8_0/Q4_0 blocks, in the layout of "
        "Kijai's mochi_preview_dit_GGUF_*.safetensors files (a quantized source is dequantized first)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(run=_run_convert)


# Names of single weight files: a DST ending in one of them would become a folder of that name.
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".gguf", ".sft", ".json")


def _requantize_note(quant: str, kind: str, layout: str = "genmo") -> str:
    """What convert --quantize KIND does to a source quantized as ``quant`` ("gguf Q8_0+Q4_0", "scaled")
    whose DiT keys are named in ``layout`` (fp8 in diffusers' naming is dequantized in the file's dtype)."""
    kind = kind.upper()
    kinds = quant.removeprefix("gguf ").split("+") if quant.startswith("gguf") else []
    if kinds == [kind]:
        return f"its {kind} blocks are kept as they are"
    again = f"quantized again to {kind.lower()} (the two roundings add up)"
    if kind in kinds:
        return f"its {kind} blocks are kept as they are, its other weights dequantized (in fp32) and {again}"
    return f"its weights are dequantized{' (in fp32)' if kinds or layout == 'genmo' else ''} and {again}"


def _shard_bytes(text: str | None) -> int:
    from mochi.devices import parse_size
    from mochi.weights.convert import DEFAULT_SHARD_BYTES

    if text is None:
        return DEFAULT_SHARD_BYTES
    size = parse_size(text, "--max-shard-size", budget=True)  # "10" wrote one tensor per shard
    if size <= 0:
        raise ValueError(
            f"--max-shard-size {text!r} must be a positive size such as 5GB (diffusers' default)"
        )
    return size


def _run_convert(args: argparse.Namespace) -> int:
    from mochi.devices import parse_dtype
    from mochi.weights.convert import convert

    if Path(args.dst).suffix.lower() in FILE_SUFFIXES:
        raise ValueError(
            f"DST {args.dst!r} names a {Path(args.dst).suffix} file, but convert writes safetensors: give a "
            f"folder, or {str(Path(args.dst).with_suffix('.safetensors'))!r} with --to genmo"
        )
    if args.max_shard_size is not None and args.to != "diffusers":
        raise ValueError(
            f"--max-shard-size {args.max_shard_size} applies only to --to diffusers (Genmo's layout is one "
            "file); leave it out"
        )

    from mochi.weights.formats import detect, quant_label
    from mochi.weights.io import WeightsError

    dtype, shard_bytes = parse_dtype(args.dtype), _shard_bytes(args.max_shard_size)  # options before files
    try:
        det = detect(args.src, variant=args.variant)
    except WeightsError as e:
        _refuse_lora(args, e)
        raise
    quant = det.quant.get("dit")
    if args.quantize and quant:
        done = _requantize_note(quant, args.quantize, det.layouts["dit"])
        print(f"mochi: note: {args.src} is already quantized ({quant_label(quant)}); {done}")
    one_file = args.to == "genmo" and Path(args.dst).suffix.lower() == ".safetensors" and "dit" in det.files
    left = [c for c in det.files if c.startswith("vae_")] if one_file else []
    out = convert(
        args.src,
        args.dst,
        to=args.to,
        dtype=dtype,
        variant=args.variant,
        overwrite=args.overwrite,
        max_shard_bytes=shard_bytes,
        quantize=args.quantize,
    )
    held = [p for p in ("decoder", "encoder") if f"vae_{p}" in det.files]
    if args.to == "diffusers" and len(held) == 1:
        missing = "encoder" if held == ["decoder"] else "decoder"
        print(
            f"mochi: note: {args.src} holds no VAE {missing}, so vae/ holds the {held[0]} alone: diffusers' "
            f"AutoencoderKLMochi would make up a random {missing} for it (with a warning); mochi loads vae/ "
            f"as the {held[0]} only"
        )
    if left:
        print(
            f"mochi: note: {args.src} holds a VAE too ({', '.join(left)}), which a single .safetensors DST "
            "does not take: give a folder to write decoder.safetensors / encoder.safetensors as well"
        )
    print(f"wrote {out}")
    return 0


def _refuse_lora(args: argparse.Namespace, error: Exception) -> None:
    """Raise a pointer to ``convert-lora`` when ``convert`` was given a LoRA (no model component is found
    in one); return otherwise, leaving ``error`` to be raised."""
    from mochi.weights.lora import read_lora

    try:
        read_lora(args.src)
    except Exception:  # noqa: BLE001 - not a LoRA either: the detection error stands
        return
    raise ValueError(
        f"{args.src!r} is a LoRA, which convert does not take; use: mochi convert-lora {args.src} {args.dst} "
        f"--to {args.to}"
    ) from error


# The registrars of this module's sub-commands, in the order `mochi --help` lists them.
COMMANDS = (
    _add_info,
    _add_convert,
)
