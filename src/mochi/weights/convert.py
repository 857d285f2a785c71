"""Convert a DiT checkpoint of any supported format to Genmo's or diffusers' layout.

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

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from mochi.files import atomic_write_text
from mochi.weights import ggml
from mochi.weights.dit import Consumed, read_dit, shape_facts
from mochi.weights.formats import detect, iter_component
from mochi.weights.io import save_state_dict

TARGETS = ("genmo", "diffusers")
CONVERT_QUANT = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
DEFAULT_SHARD_BYTES = 10 * 2**30  # diffusers' default max_shard_size
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
    """Convert the DiT at ``src`` (any format `mochi.weights.formats.detect` knows) to ``to`` at ``dst``.

    dtype: the output dtype of the DiT's weights (fp32 islands stay fp32); None keeps the stored dtype,
    except that fp8 weights are always dequantized (to the dtype of the file's other tensors).
    variant: the diffusers variant to read when ``src`` holds several. Returns the path written (the
    ``dit.safetensors`` file or the ``transformer`` folder). Converting and converting back is bit-exact
    when no dtype change is asked for. quantize: "q8_0" or "q4_0" block-quantizes the blocks' Linear
    weights (Genmo output only); a quantized source (fp8, GGUF) is dequantized first, then quantized again.
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
    det = detect(src, variant=variant)
    sd, _ = read_dit(det, dtype=dtype, fp8="dequantize")
    if quantize is not None:
        sd = quantize_state_dict(sd, CONVERT_QUANT[quantize])
    dst = Path(dst)
    if to == "genmo":
        out = dst if dst.suffix == ".safetensors" else dst / "dit.safetensors"
        _check_free(out, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(sd, out, metadata={"format": "pt"})
        if out.name == "dit.safetensors":
            _copy_genmo_vae(det, out.parent, overwrite)
        return out
    return save_diffusers(
        Consumed(sd), dst / "transformer", overwrite=overwrite, max_shard_bytes=max_shard_bytes
    )


def quantize_state_dict(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Genmo-named DiT tensors with the blocks' Linear weights as ``<layer>.<kind>_qweight`` ggml blocks.

    The layers are those `mochi.weights.quantize.quantize_model` quantizes (2-D weights inside the blocks
    whose input width divides by 32). Each full-width weight is freed as soon as its blocks exist.
    """
    out = {}
    for key in list(sd):
        t = sd.pop(key)
        if (
            key.startswith("blocks.")
            and key.endswith(".weight")
            and t.ndim == 2
            and t.shape[1] % ggml.BLOCK == 0
        ):
            out[f"{key.removesuffix('.weight')}.{kind}_qweight"] = ggml.quantize(t, kind)
        else:
            out[key] = t
    return out


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        if len(shards) == 1:
            save_state_dict(shards[0], tmp / f"{stem}.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
                save_state_dict(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            index_name = f"{_WEIGHTS}.safetensors.index" + (f".{variant}" if variant else "") + ".json"
            total = sum(t.numel() * t.element_size() for t in sd.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(tmp / index_name, json.dumps(index, indent=2) + "\n")
        atomic_write_text(tmp / "config.json", json.dumps(diffusers_config(facts), indent=2) + "\n")
        _replace_folder(tmp, folder)
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


def _copy_genmo_vae(det, folder: Path, overwrite: bool) -> None:  # noqa: ANN001 - Detected
    """Copy VAE parts held in Genmo's naming (ComfyUI all-in-one files) as Genmo's decoder/encoder files."""
    for comp, name in (("vae_decoder", "decoder.safetensors"), ("vae_encoder", "encoder.safetensors")):
        if det.layouts.get(comp) != "genmo" or det.files[comp][0].parent == folder:
            continue
        out = folder / name
        _check_free(out, overwrite)
        save_state_dict(dict(iter_component(det, comp)), out, metadata={"format": "pt"})
