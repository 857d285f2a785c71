"""Convert a DiT checkpoint (and the VAE beside it) of any supported format to Genmo's or diffusers' layout.

Genmo output: ``DST/dit.safetensors`` (plus ``decoder.safetensors`` / ``encoder.safetensors`` copied
unchanged when the source holds the VAE in Genmo's naming, as ComfyUI all-in-one files do), or the file
``DST`` itself when it ends in ``.safetensors``. Diffusers output: ``DST/transformer/`` with
``config.json`` and ``diffusion_pytorch_model.safetensors``, sharded with an index when large. Every file
is written atomically, and the diffusers folder appears only once complete.

``quantize="q8_0"|"q4_0"`` (Genmo output only) writes the block-quantized Linear weights of the DiT's
blocks as Kijai's GGUF-in-safetensors files do (``<layer>.Q8_0_qweight`` uint8 ggml blocks, every other
tensor as usual), so that a file made here loads in Kijai's wrapper and vice versa.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from mochi.errors import OutputError, listing
from mochi.files import atomic_write_text, umask
from mochi.finite import NonFiniteError, all_finite
from mochi.weights import fp8, ggml
from mochi.weights.convert_vae import diffusers_vae, read_vae_part, vae_parts
from mochi.weights.dit import Consumed, check_dit_tensors, read_dit, shape_facts, target_dtype
from mochi.weights.formats import GENMO_FILES, Detected, detect
from mochi.weights.io import WeightsError, save_state_dict

TARGETS = ("genmo", "diffusers")
CONVERT_QUANT = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
DEFAULT_SHARD_BYTES = 10 * 10**9  # diffusers' max_shard_size default "10GB" (decimal, as hf_hub reads it)
_WEIGHTS = "diffusion_pytorch_model"


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    quantize: str | None = None,
) -> Path:
    """Convert the DiT and VAE at ``src`` (any format `formats.detect` knows) to layout ``to`` at ``dst``.

    dtype: the output dtype of the DiT's weights (fp32 islands stay fp32); None keeps the stored dtype,
    except that fp8 weights are always dequantized (to the dtype of the file's other tensors). The VAE
    keeps its stored dtype. variant: the diffusers variant to read when ``src`` holds several. Returns the
    main path written (``dit.safetensors`` or ``transformer``; for a VAE-only source the folder, or the
    file). Converting and converting back is bit-exact when no dtype change is asked for. quantize: "q8_0"
    or "q4_0" block-quantizes the blocks' Linear weights (Genmo output only); a quantized source's blocks
    of that type are kept as stored, its other quantized weights (fp8, other GGUF types) dequantized in
    fp32, then quantized.

    Every output path is checked before the first is written: none may exist (unless ``overwrite``) and
    none may be, or hold, a file of ``src``. A mochi bundle is refused: see `_refuse_bundle`.
    """
    if to not in TARGETS:
        raise ValueError(f"--to {to!r} is not a supported layout; choose one of {', '.join(TARGETS)}")
    if quantize is not None and quantize not in CONVERT_QUANT:
        raise ValueError(
            f"--quantize {quantize!r} cannot be written to a file; choose one of {', '.join(CONVERT_QUANT)} "
            "(int8 and fp8 quantize at load: mochi generate --quantize int8)"
        )
    if quantize is not None and to != "genmo":
        raise ValueError(
            f"--quantize {quantize} writes Kijai's GGUF-in-safetensors layout, which uses Genmo's names; "
            "use --to genmo"
        )
    dst = Path(dst)
    one_file = dst.suffix.lower() == ".safetensors"
    if dst.exists() and not dst.is_dir() and not (to == "genmo" and one_file):
        written = "a folder or a file named *.safetensors" if to == "genmo" else "a folder"
        raise ValueError(
            f"DST {str(dst)!r} is an existing file that is not .safetensors, and --to {to} writes {written}; "
            "give a folder"
        )
    if to == "diffusers" and one_file:
        raise ValueError(
            f"--to diffusers writes a folder (DST/transformer/, DST/vae/), but {str(dst)!r} names a "
            f".safetensors file; give a folder such as {str(dst.with_suffix(''))!r}, or use --to genmo "
            "for a single file"
        )
    _refuse_bundle(src)
    det = detect(src, variant=variant)
    parts = vae_parts(det)
    if "dit" not in det.files and not parts:
        raise WeightsError(
            f"{str(src)!r} (detected format: {det.describe()}) holds no DiT and no VAE: nothing to convert"
        )
    if quantize is not None and "dit" not in det.files:
        raise ValueError(
            f"--quantize {quantize} quantizes a DiT, and {str(src)!r} holds only a VAE; leave it out"
        )
    outputs = _outputs(det, dst, to, parts)
    _check_outputs(outputs, det, overwrite)
    _refuse_mixed_layouts(dst, to)
    # Each output is written whole (temporary, then renamed); should a later part fail (a VAE that is not
    # the released size has no diffusers config), the ones this call created are taken away again, so a
    # failed conversion leaves no half of a model behind.
    new = [path for _, path in outputs if not path.exists()] + ([dst] if not dst.exists() else [])
    try:
        if to == "genmo":
            return _to_genmo(det, outputs, dtype, quantize)
        written = [
            save_diffusers(
                Consumed(_checked_dit(det, dtype)),
                path,
                overwrite=True,
                max_shard_bytes=max_shard_bytes,
            )  # fmt: skip
            for kind, path in outputs
            if kind == "dit"
        ]
        if parts:
            tensors, config = diffusers_vae([read_vae_part(det, p, need_config=True) for p in parts])
            written.append(_write_folder({_WEIGHTS + ".safetensors": tensors}, config, dst / "vae"))
        return written[0]
    except BaseException:
        for path in new:
            if path == dst:  # the folder made for the outputs: removed only if nothing else went in
                with contextlib.suppress(OSError):
                    dst.rmdir()
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _outputs(det: Detected, dst: Path, to: str, parts: list[str]) -> list[tuple[str, Path]]:
    """(what, path) of every file or folder the conversion writes, in writing order."""
    if to == "diffusers":
        out = [("dit", dst / "transformer")] if "dit" in det.files else []
        return out + ([("vae", dst / "vae")] if parts else [])
    if dst.suffix.lower() == ".safetensors":
        # One file: the DiT alone, or for a VAE-only source both parts under decoder./encoder. (ComfyUI's
        # VAE file layout).
        return [("dit" if "dit" in det.files else "vae", dst)]
    out = [("dit", dst / GENMO_FILES["dit"])] if "dit" in det.files else []
    return out + [(p, dst / GENMO_FILES[f"vae_{p}"]) for p in parts]


def _refuse_mixed_layouts(dst: Path, to: str) -> None:
    """A folder that already holds a checkpoint of another layout (the source folder itself, converted into
    itself) would hold two, of which a load reads one: refused, whatever ``overwrite`` says."""
    if not dst.is_dir():
        return
    try:
        there = detect(dst)
    except WeightsError:  # no checkpoint there
        return
    if there.format != to:
        raise ValueError(
            f"DST {str(dst)!r} already holds a checkpoint ({there.describe()}); writing the {to} layout "
            f"beside it would make one folder of two layouts, of which a load reads one: choose a new or "
            f"empty folder, e.g. {str(dst.with_name(dst.name + '-' + to))!r}"
        )


def _check_outputs(outputs: list[tuple[str, Path]], det: Detected, overwrite: bool) -> None:
    sources = {f.resolve() for files in det.files.values() for f in files} | {det.path.resolve()}
    for _, path in outputs:
        target = path.resolve()
        clash = next((s for s in sorted(sources) if s == target or target in s.parents), None)
        if clash is not None:
            raise ValueError(
                f"output {str(path)!r} would replace the source {str(clash)!r} while reading it; "
                "choose another DST (--overwrite does not allow this)"
            )
        _check_free(path, overwrite)


def _to_genmo(
    det: Detected, outputs: list[tuple[str, Path]], dtype: torch.dtype | None, quantize: str | None
) -> Path:
    for kind, path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dit":
            if quantize is None:
                sd = _checked_dit(det, dtype)
            else:
                sd = quantize_state_dict(
                    _checked_dit(det, dtype, CONVERT_QUANT[quantize]), CONVERT_QUANT[quantize]
                )
            save_state_dict(sd, path, metadata={"format": "pt"})
        elif kind == "vae":  # a VAE-only source into one file
            tensors = {
                f"{p}.{k}": v for p in vae_parts(det) for k, v in read_vae_part(det, p, False).genmo.items()
            }
            save_state_dict(tensors, path, metadata={"format": "pt"})
        else:
            save_state_dict(read_vae_part(det, kind, False).genmo, path, metadata={"format": "pt"})
    return outputs[0][1] if outputs[0][0] == "dit" or len(outputs) == 1 else outputs[0][1].parent


def _checked_dit(
    det: Detected, dtype: torch.dtype | None, kind: str | None = None
) -> dict[str, torch.Tensor]:
    """The DiT's tensors as the output gets them: fp32 islands as stored unless a dtype is asked for (so a
    round trip keeps every dtype), refused when they would not load.

    ``kind`` (a ggml block type about to be written): a source's blocks of that type are kept byte for byte
    (quantizing their dequantization again would move some of them a step), and those of another type that
    `quantize_state_dict` quantizes are dequantized in fp32, not in the file's dtype, before that."""
    # fp8 weights kept too (Genmo names only: read_dit refuses fp8 in diffusers' naming), to widen here.
    keep = kind is not None and (det.quant.get("dit", "").startswith("gguf") or det.layouts["dit"] == "genmo")
    sd, scales = read_dit(
        det, dtype=dtype, fp8="keep" if keep else "dequantize", fp32_islands=dtype is not None
    )
    narrow = target_dtype(det, dtype) or torch.bfloat16
    for layer, scale in scales.items():
        w = sd[f"{layer}.weight"]
        wide = _requantized(f"{layer}.weight", tuple(w.shape))
        sd[f"{layer}.weight"] = fp8.dequantize(w, scale, torch.float32 if wide else narrow)
    kinds = ggml.block_kinds(sd)
    for layer, k in kinds.items():
        if k != kind:
            q = sd.pop(f"{layer}.{k}_qweight")
            shape = ggml.weight_shape(tuple(q.shape), k)
            wide = _requantized(f"{layer}.weight", shape)
            sd[f"{layer}.weight"] = ggml.dequantize(q, k, torch.float32 if wide else narrow)
    check_dit_tensors(sd, det.describe())  # what would not load is not written
    kept = {f"{layer}.{k}_qweight": k for layer, k in kinds.items() if k == kind}
    bad = [
        key
        for key, t in sd.items()
        if (t.is_floating_point() and not all_finite(t))
        or (key in kept and not all_finite(ggml.block_scales(t, kept[key])))
    ]
    if bad:  # load refuses NaN and infinities (check_finite): the file written would not load
        shown = listing(bad, 3)
        cast = (
            f" as {str(dtype).removeprefix('torch.')} (values beyond its range overflow: "
            f"{'use --dtype bf16, or ' if dtype == torch.float16 else ''}leave --dtype out; or the source is "
            "damaged)"
            if dtype is not None
            else " (it is damaged, e.g. written by a run that diverged)"
        )
        raise NonFiniteError(
            f"{det.describe()} holds NaN or infinite values in {len(bad)} of {len(sd)} tensors ({shown}) read"
            f"{cast}; nothing was written"
        )
    return sd


def _refuse_bundle(src: str | os.PathLike) -> None:
    """A mochi bundle (the embedded model is one) converts to nothing that computes the same."""
    from mochi.weights.bundle import FORMAT, bundle_config, is_bundle

    if not is_bundle(src):
        return
    config = bundle_config(src)
    pool_heads = config["dit"].get("pool_heads")
    raise ValueError(
        f"{str(src)!r} is a {FORMAT} ({config.get('name', 'custom')!r}): a whole model whose byte "
        f"tokenizer, small T5, latent statistics and DiT settings (pool_heads={pool_heads}) "
        "Genmo's and diffusers' layouts cannot record, so its converted parts would load as a different "
        f"model; use the file itself: mochi generate --model {str(src)!r}"
    )


def quantize_state_dict(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Genmo-named DiT tensors with the blocks' Linear weights as ``<layer>.<kind>_qweight`` ggml blocks.

    The layers are those `mochi.weights.quantize.quantize_model` quantizes (2-D weights inside the blocks
    whose input width divides by 32). Each full-width weight is freed as soon as its blocks exist.
    """
    out = {}
    for key in list(sd):
        t = sd.pop(key)
        if _requantized(key, tuple(t.shape)):
            out[f"{key.removesuffix('.weight')}.{kind}_qweight"] = ggml.quantize(t, kind)
        else:
            out[key] = t
    return out


def _requantized(key: str, shape: tuple[int, ...]) -> bool:
    """Whether `quantize_state_dict` writes the tensor ``key`` of ``shape`` as ggml blocks."""
    return (
        key.startswith("blocks.")
        and key.endswith(".weight")
        and len(shape) == 2
        and shape[1] % ggml.BLOCK == 0
    )


def save_diffusers(
    genmo_sd: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    variant: str | None = None,
) -> Path:
    """Write a Genmo-named DiT state dict as a diffusers ``transformer`` folder (config + safetensors).

    Shards hold at most ``max_shard_bytes`` each (one tensor may exceed it alone) and are named as
    diffusers names them; the folder is assembled beside ``folder`` and renamed into place at the end.
    Pass ``Consumed(sd)`` to hand the tensors over, so that each is freed once converted.
    """
    from mochi.weights.keymaps.dit_diffusers import genmo_to_diffusers

    folder = Path(folder)
    _check_free(folder, overwrite)
    owned = dict(genmo_sd)  # takes the tensors out of a `Consumed` view; copies only references otherwise
    facts = shape_facts({k: tuple(v.shape) for k, v in owned.items()})
    sd = genmo_to_diffusers(Consumed(owned))
    shards = _shard(sd, max_shard_bytes)
    stem = f"{_WEIGHTS}.{variant}" if variant else _WEIGHTS
    if len(shards) == 1:
        return _write_folder({f"{stem}.safetensors": shards[0]}, diffusers_config(facts), folder)
    files = {f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards, 1)}
    weight_map = {k: name for name, shard in files.items() for k in shard}
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_name = f"{_WEIGHTS}.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    return _write_folder(files, diffusers_config(facts), folder, {index_name: index})


def _write_folder(
    files: dict[str, dict[str, torch.Tensor]], config: dict, folder: Path, extra: dict | None = None
) -> Path:
    """A diffusers model folder (safetensors ``files``, ``config.json``, ``extra`` JSON files) assembled
    beside ``folder`` and renamed into place once complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's folder is private (0700); the output follows the umask
    try:
        for name, tensors in files.items():
            save_state_dict(tensors, tmp / name, metadata={"format": "pt"})
        for name, value in {**(extra or {}), "config.json": config}.items():
            atomic_write_text(tmp / name, json.dumps(value, indent=2) + "\n")
        _replace_folder(tmp, folder)
    except OutputError as e:  # a full disk: name the file the user asked for, not the folder it is built in
        raise OutputError(str(e).replace(os.fspath(tmp), os.fspath(folder))) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def diffusers_config(facts: dict) -> dict:
    """The ``config.json`` of ``MochiTransformer3DModel`` for a DiT with these `shape_facts`."""
    return {
        "_class_name": "MochiTransformer3DModel",
        "_diffusers_version": "0.32.0",
        "patch_size": facts["patch_size"],
        "num_attention_heads": facts["num_heads"],
        "attention_head_dim": facts["head_dim"],
        "num_layers": facts["depth"],
        "pooled_projection_dim": facts["hidden_size_y"],
        "in_channels": facts["in_channels"],
        "out_channels": facts["out_channels"],
        "qk_norm": "rms_norm",
        "text_embed_dim": facts["t5_feat_dim"],
        "time_embed_dim": facts["timestep_embed_dim"],
        "activation_fn": "swiglu",
        "max_sequence_length": 256,
    }


def _shard(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += n
    return shards


def _check_free(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ValueError(f"{str(path)!r} already exists; remove it or pass --overwrite")


def _replace_folder(new: Path, folder: Path) -> None:
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(new, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
