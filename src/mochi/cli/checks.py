"""What the commands check before any heavy work: every option a user gave, and every file named.

Loading a model (seconds to minutes) and sampling (minutes) must not come before a mistake that a look at
the arguments or a file header reveals; each check raises a one-line ValueError.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np


def check_output(out: Path, init_video: str | None = None) -> None:
    """``out`` can take a video, and its sidecar (``out`` with ``.json``) can be written beside it, and it
    is not the video ``init_video`` read (it would be replaced by the output, its sidecar naming it)."""
    from mochi.files import check_folder
    from mochi.outputs import sidecar_path
    from mochi.video import CONTAINERS

    if out.suffix.lower() not in CONTAINERS:
        folder = f", or {out}/ for a folder" if not out.suffix else ""
        raise ValueError(
            f"output {str(out)!r} must end in one of {', '.join(CONTAINERS)}; e.g. {out.stem}.mp4{folder}"
        )
    if out.is_dir():
        raise ValueError(f"output {str(out)!r} is a folder; give a file name such as {out / 'video.mp4'}")
    if init_video and (Path(init_video).absolute() == out.absolute() or _same_file(Path(init_video), out)):
        raise ValueError(
            f"output {str(out)!r} is the --init-video file: it would be overwritten by the result; choose "
            f"another --out, e.g. {str(out.with_name(out.stem + '-v2v' + out.suffix))!r}"
        )
    check_folder(out)
    sidecar = sidecar_path(out)
    if sidecar.is_dir():
        raise ValueError(f"cannot write the sidecar {str(sidecar)!r}: it is a folder; choose another --out")
    # Another container of the same stem shares the sidecar: writing this one would pair that video with
    # this run's parameters. The folder is scanned for any case of the suffix (clip.mp4 beside clip.MP4);
    # on a case-insensitive file system a name that is ``out`` itself is not another video.
    other = next((p for p in _same_stem_videos(out) if not _same_file(p, out)), None)
    if other is not None:
        raise ValueError(
            f"output {str(out)!r} would share the sidecar {sidecar.name} with {other.name}, another video of "
            f"this name; choose another --out, or remove {other.name}"
        )


def _same_stem_videos(out: Path) -> list[Path]:
    """The videos beside ``out`` (any container, any case of its suffix) whose stem is ``out``'s."""
    import os

    from mochi.video import CONTAINERS

    folder = out.parent
    try:
        names = sorted(os.listdir(folder if str(folder) else "."))
    except OSError:
        return []
    return [
        folder / name
        for name in names
        if name != out.name and Path(name).stem == out.stem and Path(name).suffix.lower() in CONTAINERS
    ]


def _same_file(path: Path, out: Path) -> bool:
    """``path`` names the file ``out`` names (a case-insensitive file system)."""
    try:
        return out.exists() and path.samefile(out)
    except OSError:
        return False


def parse_max_memory(text: str | None) -> int | None:
    """``--max-memory`` in bytes; zero or less is an error, not "unset"."""
    from mochi.devices import parse_size

    if text is None:
        return None
    size = parse_size(text, "--max-memory", budget=True)
    if size <= 0:
        raise ValueError(
            f"--max-memory {text!r} must be a positive size such as 8GB; leave it out for the default"
        )
    return size


def check_loras(files: list[str]) -> None:
    """Each ``--lora`` exists and reads as a LoRA with finite values (small files: read whole)."""
    from mochi.weights.lora import read_lora

    for file in files:
        if not Path(file).exists():
            raise ValueError(f"--lora {file!r} does not exist")
        read_lora(file)


def read_init_video(path: str, frames: int, size: tuple[int, int]) -> np.ndarray:
    """The first ``frames`` frames of ``path`` fitted to ``size`` (height, width) as they are decoded,
    uint8 (T, H, W, 3), decoding no more; ValueError if short."""
    from mochi.video import read_video

    video, _ = read_video(path, max_frames=frames, size=size)
    if video.shape[0] < frames:
        raise ValueError(
            f"--init-video {path!r} has {video.shape[0]} frames, fewer than the {frames} to generate; "
            f"pass --frames {6 * ((video.shape[0] - 1) // 6) + 1} or a longer clip"
        )
    return video


def check_generate(args: argparse.Namespace, request) -> dict:  # noqa: ANN001 - GenerationRequest
    """Check every generate option before loading; returns what was read: ``max_memory`` (bytes or None)
    and ``init`` (the init video's frame count, checked to be enough, or None)."""
    from mochi.video import video_rate
    from mochi.weights.components import check_model_paths, model_defaults

    video_rate(args.fps)
    if args.strength is not None and not args.init_video:
        raise ValueError("--strength applies only to video-to-video; give --init-video FILE or leave it out")
    from mochi.cli.accel import check_cache_options

    check_cache_options(args)
    if args.lora_merge and not args.lora:
        raise ValueError("--lora-merge applies only with --lora FILE; give a LoRA or leave it out")
    if getattr(args, "lora_merge", False) and getattr(args, "quantize", None):
        raise ValueError(
            f"--lora-merge cannot merge into --quantize {args.quantize} weights (re-quantizing would lose "
            "the LoRA); leave out --lora-merge (the LoRA is then applied unmerged) or --quantize"
        )
    if args.lora_merge and getattr(args, "parallel_weights", "auto") == "shard":  # found after the load
        raise ValueError(
            "--lora-merge cannot merge into weights sharded over ranks (--parallel-weights shard); leave out "
            "--lora-merge (the LoRA is then applied unmerged), or use --parallel-weights replicate"
        )
    if getattr(args, "devices", None) is not None and getattr(args, "memory", None) == "auto":
        raise ValueError(
            f"--memory auto plans for one device, and --devices {args.devices} places the model over "
            "several devices; give one of them"
        )
    if getattr(args, "devices", None) is not None and getattr(args, "device", "auto") != "auto":
        raise ValueError(  # it was ignored: the DiT went to --devices, and T5 and the VAE to their first
            f"--device {args.device} and --devices {args.devices} both say where to run; give one of them "
            "(--devices puts the DiT over several devices, and T5 and the VAE on the first)"
        )
    if getattr(args, "devices", None) is not None:  # then --max-memory is one size per device (placement)
        from mochi.memory.placement import check_no_offload, parse_budgets, parse_devices

        devices = parse_devices(args.devices)
        # Before --offload blocks:N's depth and the placement's budgets: neither matters without --offload.
        check_no_offload(getattr(args, "offload", None))
        if getattr(args, "attention", None):  # spread_pipeline's pipeline checks it only after loading
            from mochi.devices import resolve_dit_dtype
            from mochi.ops.attention import check_backend

            check_backend(args.attention, devices[0], resolve_dit_dtype(args.dtype, devices[0]))
        max_memory = None
        if args.max_memory is not None and min(parse_budgets(args.max_memory, devices, 0)) <= 0:
            raise ValueError(f"--max-memory {args.max_memory!r}: every device's budget must be positive")
    else:
        max_memory = parse_max_memory(args.max_memory)
    check_model_paths(args.model, args.vae, args.t5, args.tokenizer)
    # The rules that need the model's defaults (the size limit, the schedule of its step count), which the
    # pipeline checks again once loaded: without this a --frames or --linear-steps that does not fit was
    # refused only after minutes of loading. The later checks plan this resolved request.
    resolved = request.resolved(model_defaults(args.model))
    if getattr(args, "guidance_parallel", False):
        from mochi.sampling.sampler import guidance_schedule

        if all(g == 1.0 for g in guidance_schedule(resolved.guidance, resolved.steps)):
            raise ValueError(
                "--guidance-parallel runs the prompt's and the negative prompt's passes on two halves of the "
                "ranks, and guidance 1.0 runs no negative pass: each half would repeat the other's work on "
                "half the ranks; leave --guidance-parallel out (every rank then splits the video's tokens)"
            )
    if getattr(args, "offload", None):  # blocks:N beyond the depth, from headers (it was found after loading)
        from mochi.offload import check_resident, parse_offload
        from mochi.weights.components import dit_depth

        check_resident(parse_offload(args.offload), dit_depth(args.model, getattr(args, "variant", None)))
    if args.lora_merge and args.model:  # a DiT kept quantized as stored: found from the headers, not the load
        from mochi.weights.formats import detect, quant_label

        quant = None
        with contextlib.suppress(ValueError):  # a bundle or a layout detect() does not read: left to the load
            quant = detect(args.model, variant=getattr(args, "variant", None)).quant.get("dit")
        if quant and getattr(args, "fp8", "keep") == "keep":  # --fp8 dequantize widens fp8 and GGUF alike
            raise ValueError(
                f"--lora-merge cannot merge into this checkpoint's {quant_label(quant)} weights (they stay "
                "quantized); leave out --lora-merge (the LoRA is then applied unmerged), or add --fp8 "
                "dequantize"
            )
    if getattr(args, "devices", None) is not None:  # found once the weights were loaded otherwise
        check_placement(args, resolved, devices)
    check_loras(args.lora)
    if max_memory is not None:  # the decode split, found after loading (and the text stage) otherwise
        check_decode_budget(args, resolved, max_memory)
    init = None
    if args.init_video:
        from mochi.video import crop_box, video_size

        # The pixels are read again at the output size once the model is loaded: here only the count.
        init = read_init_video(args.init_video, resolved.frames, size=(8, 8)).shape[0]
        # ... and whether a frame crops to the output's shape at all (at 8x8 a thin clip still does).
        crop_box(*video_size(args.init_video), resolved.height, resolved.width)
    return {"max_memory": max_memory, "init": init}


def check_placement(args: argparse.Namespace, request, devices: list) -> None:  # noqa: ANN001
    """``--devices``: the DiT's blocks fit the devices' budgets for ``request`` (resolved at the model's
    defaults), refused with ``place_blocks``' message as ``spread_pipeline`` would refuse them after
    loading. The blocks' bytes come from the checkpoint's headers or bundle config (`mochi.memory.stored`)
    as the load will hold them: in the DiT's dtype, layers kept as stored (``--fp8 keep``) at their stored
    bytes, the others as ``--quantize``."""
    from mochi.devices import resolve_dit_dtype
    from mochi.memory.auto import job_of
    from mochi.memory.estimate import dit_activations, dit_weights
    from mochi.memory.placement import cache_shares, parse_budgets, place_blocks
    from mochi.memory.planner import CUDA_RESERVE
    from mochi.memory.stored import stored_dit
    from mochi.weights.quantize import device_mode

    try:
        dit = stored_dit(args.model, getattr(args, "variant", None), getattr(args, "fp8", "keep"))
    except (ValueError, KeyError, TypeError, OSError):  # unreadable here: the load says why
        return
    dtype = resolve_dit_dtype(args.dtype, devices[0])
    quant = device_mode(args.quantize, devices[0])[0] if getattr(args, "quantize", None) else "none"
    weights = dit_weights(dit.config, dtype, quant, dit.kept)
    job = job_of(request)
    activations = dit_activations(dit.config, job.latent, job.batch, tuple(job.text_tokens), dtype)
    reserve = CUDA_RESERVE if devices[0].type == "cuda" else 0
    budgets = parse_budgets(args.max_memory, devices, reserve)
    place_blocks(weights.blocks, budgets, weights.rest, activations, cache_shares(dit.config, job, dtype))


def check_decode_budget(args: argparse.Namespace, request, max_memory: int) -> None:  # noqa: ANN001
    """``--max-memory`` holds some decode split of ``request``'s video (resolved at the model's defaults; the
    decoder's config from the checkpoint's bundle config, else the released decoder's), as the pipeline will
    check after loading."""
    import torch

    from mochi.devices import parse_device, parse_dtype, size_text
    from mochi.memory.estimate import pipeline_decode_plan
    from mochi.request import check_frames
    from mochi.weights.components import decoder_config

    frames, height, width = request.frames, request.height, request.width
    shape = (len(request.prompts), check_frames(frames), height // 8, width // 8)
    cfg = decoder_config(args.model, getattr(args, "vae", None))
    dtype = parse_dtype(getattr(args, "vae_dtype", None)) or torch.float32
    cpu = parse_device(getattr(args, "device", None)).type == "cpu"
    plan, need = pipeline_decode_plan(cfg, shape, 0, dtype, max_memory, cpu)  # the pipeline's rule, on meta
    if plan is None:
        raise ValueError(
            f"--max-memory {args.max_memory!r} is too small to decode a {frames}-frame {width}x{height} "
            f"video: the smallest split needs about {size_text(need)}; nearest valid: {size_text(need)}"
        )


def check_prepare_data(args: argparse.Namespace) -> None:
    """The videos folder exists, OUT_DIR can be made and the model paths are usable, before loading."""
    from mochi.files import folder_problem, not_a_folder
    from mochi.train.data import _inputs
    from mochi.weights.components import check_model_paths

    if not Path(args.videos).is_dir():
        raise ValueError(f"videos folder {args.videos!r} {not_a_folder(args.videos)}")
    if problem := folder_problem(args.out):
        raise ValueError(f"OUT_DIR {str(args.out)!r} {problem}; give a folder for the prepared clips")
    check_model_paths(args.model, args.vae, args.t5, args.tokenizer)
    _inputs(Path(args.videos))  # a folder with no video at all: said before the model loads


def check_train_lora(args: argparse.Namespace) -> None:
    """The data folder holds clips and the run folder can be made, before the model loads."""
    from mochi.files import folder_problem, safetensors_in
    from mochi.weights.components import check_model_paths

    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise ValueError(f"data folder {str(data)!r} does not exist; make it with `mochi prepare-data`")
    if not safetensors_in(data):
        raise ValueError(f"data folder {str(data)!r} holds no clips; run `mochi prepare-data` first")
    if problem := folder_problem(out):
        raise ValueError(f"--out {str(out)!r} {problem}; give a folder for the run")
    if out.resolve() == data.resolve() or data.resolve() in out.resolve().parents:
        # The run's LoRA files would sit among the clips, and every later run would read them as clips.
        raise ValueError(
            f"--out {str(out)!r} is inside the data folder {str(data)!r}; give the run a folder of its own, "
            f"e.g. {str(data.parent / 'lora-run')!r}"
        )
    check_model_paths(args.model, args.vae, args.t5, args.tokenizer)
