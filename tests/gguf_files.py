"""Writing test checkpoints in GGUF layouts: Kijai's GGUF-in-safetensors and real .gguf files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mochi.weights import ggml


def block_layers(sd: dict[str, torch.Tensor]) -> list[str]:
    """The blocks' Linear layers whose weights can be block-quantized (2-D, input width divisible by 32)."""
    return [
        k.removesuffix(".weight")
        for k, t in sd.items()
        if k.startswith("blocks.") and k.endswith(".weight") and t.ndim == 2 and t.shape[1] % 32 == 0
    ]


def write_kijai(path: Path, sd: dict[str, torch.Tensor], kind: str, rest=torch.bfloat16) -> Path:
    """A Kijai-style file: ``<layer>.<kind>_qweight`` ggml blocks for the blocks' Linears, the rest in
    ``rest`` (fp32 islands stay fp32), under Genmo's names."""
    layers = set(block_layers(sd))
    out = {}
    for k, t in sd.items():
        layer = k.removesuffix(".weight")
        if layer in layers and k.endswith(".weight"):
            out[f"{layer}.{kind}_qweight"] = ggml.quantize(t, kind)
        else:
            keep = k == "pos_frequencies" or "norm" in k
            out[k] = t.contiguous() if keep else t.to(rest).contiguous()
    save_file(out, path)
    return path


def write_gguf(path: Path, sd: dict[str, torch.Tensor], kinds: dict[str, str]) -> Path:
    """A .gguf file written by the gguf package: tensors named in ``kinds`` (key → "Q8_0"/"Q4_0") are
    quantized by gguf's own quantizers, the rest stored as they are (F32/F16)."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    writer = GGUFWriter(path, "mochi")
    for name, t in sd.items():
        if name in kinds:
            qtype = GGMLQuantizationType[kinds[name]]
            q = quants.quantize(t.detach().float().numpy(), qtype)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, t.detach().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
