"""Loading the T5 v1.1 encoder from the formats people actually have on disk.

* A Hugging Face folder: ``config.json`` plus ``model.safetensors`` or sharded
  ``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``
  (``genmo/mochi-1-preview/text_encoder``), or ``pytorch_model.bin`` (``google/t5-v1_1-xxl``, a full
  encoder-decoder checkpoint whose ``decoder.*``/``lm_head`` keys are ignored, as HF's ``T5EncoderModel``
  ignores them). A diffusers pipeline root with a ``text_encoder/`` subfolder works too.
* ComfyUI single files: ``t5xxl_fp16.safetensors`` (HF key names, no prefix) and
  ``t5xxl_fp8_e4m3fn_scaled.safetensors`` (ecosystem.md §1.3): a ``scaled_fp8`` marker tensor, Linear weights
  in float8_e4m3fn with a per-tensor ``<layer>.scale_weight``; newer ComfyUI writes ``<layer>.weight_scale``
  and ``<layer>.comfy_quant`` instead. Weights are dequantized here, at load, to the requested dtype. Keys
  under a prefix (``text_encoders.t5xxl.transformer.`` in all-in-one files) are found and stripped.

Without a ``config.json`` the config is inferred from tensor shapes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from mochi.files import safetensors_in
from mochi.models.t5 import T5Config, T5Encoder
from mochi.weights.formats import Detected, iter_component
from mochi.weights.io import (
    WeightsError,
    index_shards,
    json_object,
    load_strict,
    quantization_layers,
    read_metadata,
    read_state_dict,
)

_ANCHOR = "encoder.final_layer_norm.weight"
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# Keys holding no encoder weights: decoder halves of full T5 checkpoints, ComfyUI's quantization markers.
_IGNORED = re.compile(
    r"^(decoder\..*|lm_head\.weight|scaled_fp8|.*\.comfy_quant|.*\.scale_input|.*\.input_scale)$"
)
_SUPPORTED_QUANT = {"float8_e4m3fn", "float8_e5m2"}


def _folder_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder, preferring the unsuffixed (non-variant) checkpoint."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            return list(index_shards(folder / index))
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    indexes = sorted(folder.glob("*.index*.json"))
    if len(indexes) == 1:
        return list(index_shards(indexes[0]))
    files = safetensors_in(folder)
    if len(files) == 1:
        return files
    raise WeightsError(
        f"found no T5 weights in folder {str(folder)!r}: looked for model.safetensors(.index.json), "
        f"pytorch_model.bin(.index.json), a single *.index*.json or a single *.safetensors file "
        f"(found {', '.join(p.name for p in sorted(folder.iterdir())) or 'nothing'})"
    )


def _locate(path: Path) -> tuple[list[Path], dict | None]:
    """Weight files and the HF config dict (None for single files) that ``path`` stands for."""
    if not path.exists():
        raise WeightsError(
            f"T5 checkpoint {str(path)!r} does not exist; give a Hugging Face folder (config.json + "
            "safetensors), a diffusers pipeline folder with text_encoder/, or a ComfyUI t5xxl .safetensors "
            "file"
        )
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "text_encoder" / "config.json").exists():
            path = path / "text_encoder"
        return _folder_files(path), _config(path / "config.json")
    return [path], None


def _keep_raw(key: str, value: torch.Tensor) -> bool:
    return value.dtype in _FP8 or not value.is_floating_point() or key.endswith(_SCALE_SUFFIXES)


def _find_prefix(keys: list[str]) -> str:
    prefixes = sorted({k[: -len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)})
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    if not prefixes:
        raise WeightsError(f"checkpoint holds no T5 encoder: no key ends in {_ANCHOR!r} ({len(keys)} keys)")
    if len(prefixes) > 1:
        raise WeightsError(
            f"checkpoint holds several T5 encoders (prefixes {prefixes}); pass a file with one"
        )
    return prefixes[0]


def _check_quantization(metadata: dict[str, str]) -> None:
    formats = set(quantization_layers(metadata).values())
    unsupported = formats - _SUPPORTED_QUANT
    if unsupported:
        raise WeightsError(
            f"T5 checkpoint uses quantization format(s) {sorted(unsupported)}; mochi reads "
            f"{sorted(_SUPPORTED_QUANT)} (ComfyUI scaled fp8) or unquantized 16/32-bit files"
        )


def convert_t5_state_dict(
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    take: Callable[[str, torch.Tensor], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported T5 layout → (our keys dequantized to ``dtype``, a name for the detected format).

    take(key, tensor): offered each tensor (our key, dequantized) as it is made; one it returns True for is
    the caller's and is left out (quantization at load: `mochi.weights.quantize.AtLoad`)."""
    prefix = _find_prefix(list(state_dict))
    marker = state_dict.get(f"{prefix}scaled_fp8")
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    scaled = marker is not None or any(k.endswith(_SCALE_SUFFIXES) for k in sd)
    fmt = "ComfyUI scaled fp8" if scaled else "16/32-bit"
    if prefix:
        fmt += f", keys under {prefix!r}"

    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _IGNORED.match(key) or key.endswith(_SCALE_SUFFIXES):
            continue
        layer = key.removesuffix(".weight")
        scale = sd.get(f"{layer}.scale_weight", sd.get(f"{layer}.weight_scale"))
        if scale is not None:
            # Per-tensor (0-d) scale in practice; a per-output-row scale broadcasts the same way.
            scale = (
                scale.float().reshape(-1, *([1] * (value.dim() - 1))) if scale.numel() > 1 else scale.float()
            )
            value = value.float() * scale
        value = value.to(dtype) if value.is_floating_point() else value
        if take is None or not take(key, value):
            out[key] = value
    if "shared.weight" not in out and "encoder.embed_tokens.weight" in out:
        out["shared.weight"] = out["encoder.embed_tokens.weight"]
    out.pop("encoder.embed_tokens.weight", None)  # HF's tied alias of shared.weight
    return out, fmt


def infer_t5_config(state_dict: dict[str, torch.Tensor]) -> T5Config:
    """Config from tensor shapes (our key names). ``relative_attention_max_distance`` cannot be seen: 128."""
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in state_dict:
        raise WeightsError(
            "checkpoint is an original T5 (v1.0, ReLU feed-forward 'wi'); Mochi uses T5 v1.1 (gated GELU "
            "'wi_0'/'wi_1'), e.g. google/t5-v1_1-xxl"
        )

    def shape(key: str) -> tuple[int, int]:
        if key not in state_dict:
            raise WeightsError(f"cannot infer the T5 config: checkpoint lacks {key!r}")
        found = tuple(state_dict[key].shape)
        if len(found) != 2 or 0 in found:
            raise WeightsError(
                f"cannot infer the T5 config: {key!r} has shape {found}, where a T5 has two dimensions, "
                "none of them 0; the checkpoint is damaged or not a T5 encoder"
            )
        return found

    vocab, d_model = shape("shared.weight")
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    if len(layers) != max(layers) + 1:
        raise WeightsError(
            f"cannot infer the T5 config: its layers run up to encoder.block.{max(layers)} with "
            f"{max(layers) + 1 - len(layers)} indices missing; they run from 0 without gaps"
        )
    if inner % heads:
        raise WeightsError(
            f"cannot infer the T5 config: the attention width {inner} does not divide into its {heads} heads"
        )
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        num_heads=heads,
        d_ff=d_ff,
        num_layers=max(layers) + 1,
        relative_attention_num_buckets=buckets,
    )


def _detected_files(det: Detected) -> tuple[list[Path], dict | None]:
    """The T5 files (every shard) and HF config of what ``formats.detect`` found."""
    if "t5" not in det.files:
        raise WeightsError(f"{str(det.path)!r} (detected format: {det.describe()}) holds no T5 encoder")
    folder = det.extras.get("text_encoder")
    return list(det.files["t5"]), _config(folder / "config.json") if folder is not None else None


def _config(path: Path) -> dict | None:
    """A Hugging Face config.json as a dict (None when there is none); a WeightsError naming it otherwise."""
    return json_object(path.read_bytes(), repr(str(path))) if path.is_file() else None


def load_t5(
    path: str | os.PathLike | Detected,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> T5Encoder:
    """Build a ``T5Encoder`` and load it strictly from a HF folder or a ComfyUI single file (see module doc),
    or from what ``formats.detect`` found in a model checkpoint (its text_encoder/ folder or its T5 part).

    fp32 is Genmo's choice (genmo-mochi.md §4). In float16 the ``wo`` projections are kept in fp32, as HF
    does, because T5 v1.1's feed-forward overflows float16. Returns the model in eval mode, gradients off.
    """
    return load_t5_quantized(path, None, dtype=dtype, device=device)[0]


def load_t5_quantized(
    path: str | os.PathLike | Detected,
    quantize: str | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):  # noqa: ANN201 - (T5Encoder, mochi.weights.quantize.Quantized | None)
    """`load_t5` with the encoder blocks' Linear weights quantized to ``quantize`` as they are read (in
    ``dtype``), so that the load holds the quantized encoder plus one layer, not the full-width one (T5-XXL
    in fp32: 19 GB). Only safetensors files are read that way (ComfyUI's scaled fp8 weights are quantized
    as they are widened), and not in float16 (whose ``wo`` layers widen to fp32 first); others are loaded
    whole, then quantized.
    Returns (model, what was quantized, or None when ``quantize`` is None).
    """
    from mochi.finite import check_finite
    from mochi.weights.io import check_state_dict, iter_safetensors
    from mochi.weights.quantize import quantize_model

    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"T5 dtype {dtype} is not supported; use torch.float32 (Genmo's choice) or torch.bfloat16"
        )
    prefix = ""
    if isinstance(path, Detected):
        files, hf_config = _detected_files(path)
        prefix = path.prefixes["t5"]
    else:
        files, hf_config = _locate(Path(path))
    for file in files:
        if file.suffix == ".safetensors":
            _check_quantization(read_metadata(file))
    quantizer = None
    if quantize is not None and dtype != torch.float16 and all(f.suffix == ".safetensors" for f in files):
        quantizer, inner = _quantizer(files, prefix, hf_config, quantize)
    if quantizer is not None:
        tensors = iter_safetensors(files, prefix, device)
    elif isinstance(path, Detected):
        tensors = iter_component(path, "t5")  # only the T5's tensors, not the rest of an all-in-one file
    else:
        tensors = (item for file in files for item in read_state_dict(file).items())
    # Cast tensor by tensor to bound peak memory; fp8 tensors and their scales wait for dequantization.
    raw = {}
    for k, v in tensors:
        v = v if _keep_raw(k, v) else v.to(dtype)
        if not (quantizer is not None and k.startswith(inner) and quantizer(k[len(inner) :], v)):
            raw[k] = v
    # fp8 weights are widened here, so those of a scaled file are quantized here, one at a time.
    sd, fmt = convert_t5_state_dict(raw, dtype, quantizer)
    del raw
    taken = {k: torch.empty(s, device="meta") for k, s in quantizer.shapes().items()} if quantizer else {}
    config = T5Config.from_hf(hf_config) if hf_config is not None else infer_t5_config({**sd, **taken})
    if dtype == torch.float16:
        sd = {k: v.float() if k.endswith("DenseReluDense.wo.weight") else v for k, v in sd.items()}
    with torch.device("meta"):
        model = T5Encoder(config)
    source = "T5 folder" if hf_config is not None else "T5 single file"
    if quantizer is None:
        load_strict(model, sd, f"{source}, {fmt}")
        done = None
    else:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_state_dict(expected, {**sd, **taken}, f"{source}, {fmt}")
        check_finite(sd, f"checkpoint (detected format: {source}, {fmt})")
        done = quantizer.install(model, sd)
        model.load_state_dict(sd, strict=False, assign=True)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        assert not left, f"tensors left on the meta device after loading: {left[:5]}"
    model = model.to(device).eval().requires_grad_(False)
    if quantize is not None and done is None:
        done = quantize_model(model, quantize)
    return model, done


def _quantizer(files: list[Path], prefix: str, hf_config: dict | None, mode: str):  # noqa: ANN202
    """(an `AtLoad` for the T5 these files hold, the key prefix its names carry) from headers only."""
    from mochi.finite import check_finite
    from mochi.weights.io import read_keys
    from mochi.weights.quantize import AtLoad

    keys = {k: shape for f in files for k, (_, shape) in read_keys(f).items() if k.startswith(prefix)}
    inner = prefix + _find_prefix([k[len(prefix) :] for k in keys])
    shapes = {k[len(inner) :]: torch.empty(s, device="meta") for k, s in keys.items() if k.startswith(inner)}
    if "shared.weight" not in shapes and "encoder.embed_tokens.weight" in shapes:
        shapes["shared.weight"] = shapes["encoder.embed_tokens.weight"]
    config = T5Config.from_hf(hf_config) if hf_config is not None else infer_t5_config(shapes)
    with torch.device("meta"):
        model = T5Encoder(config)
    check = lambda key, t: check_finite({key: t}, "T5 checkpoint")  # noqa: E731
    return AtLoad(model, mode, check), inner
