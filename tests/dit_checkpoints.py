"""Writers for every released DiT checkpoint format, from a small random model (tests only).

Each writer lays files out the way the real release does (genmo-mochi.md §9, diffusers' save_pretrained,
ecosystem.md §1.3), independently of mochi's own converter, so that loading them tests detection for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mochi.models.dit import DIT_PRESETS, AsymmDiT
from mochi.weights.fp8 import quantize

COMFY = "model.diffusion_model."
# Stand-ins for the other components of a ComfyUI all-in-one file (names as ComfyUI stores them).
VAE_KEYS = {
    "vae.decoder.blocks.0.0.weight": (8, 12, 1, 1, 1),
    "vae.decoder.output_proj.weight": (3, 8),
    "vae.encoder.layers.0.weight": (8, 15),
    "vae.encoder.output_proj.weight": (24, 8),
}
T5_KEYS = {
    "text_encoders.t5xxl.transformer.shared.weight": (10, 8),
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8),
}


def tiny_model(seed: int = 0, preset: str = "tiny") -> AsymmDiT:
    torch.manual_seed(seed)
    return AsymmDiT(DIT_PRESETS[preset]).eval().requires_grad_(False)


def inputs(model: AsymmDiT, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """x (2, C, 2, 4, 4), sigma (2,), text (2, 5, D), mask with 5 and 2 valid tokens."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    text = torch.randn(2, 5, cfg.t5_feat_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    return x, sigma, text, mask


def state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return {k: v.to(dtype) if dtype else v for k, v in sd.items()}


def write_genmo(folder: Path, model: nn.Module) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(model), folder / "dit.safetensors")
    return folder


def write_diffusers(folder: Path, model: AsymmDiT, variant: str | None = None, shard: str = "20KB") -> Path:
    """A diffusers pipeline folder written by diffusers itself (``save_pretrained``, sharded)."""
    from mochi.weights.keymaps.dit_diffusers import diffusers_model

    theirs = diffusers_model(model)
    if variant == "bf16":
        theirs = theirs.to(torch.bfloat16)
    theirs.save_pretrained(folder / "transformer", variant=variant, max_shard_size=shard)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "MochiPipeline"}))
    return folder


def write_comfyui(path: Path, model: nn.Module, *, all_in_one: bool = False, dtype=torch.bfloat16) -> Path:
    tensors = {COMFY + k: v for k, v in state_dict(model, dtype).items()}
    if all_in_one:
        tensors.update({k: torch.randn(s).to(dtype) for k, s in {**VAE_KEYS, **T5_KEYS}.items()})
    save_file(tensors, path)
    return path


def linear_weights(model: nn.Module) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def write_fp8_scaled(
    path: Path, model: nn.Module, *, layout: str, all_in_one: bool = True, rest: torch.dtype = torch.bfloat16
) -> Path:
    """An fp8_scaled file: every Linear weight fp8 (e4m3fn) with a per-tensor scale, the rest in ``rest``.

    layout "legacy": ``scaled_fp8`` marker + ``scale_weight`` (+ ``scale_input`` = 1);
    layout "new": ``weight_scale`` + ``comfy_quant`` JSON tensors + ``_quantization_metadata`` header.
    """
    sd = state_dict(model, rest)
    fp32 = state_dict(model)
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for key, t in sd.items():
        if key in linear_weights(model):
            layer = key.removesuffix(".weight")
            q, scale = quantize(fp32[key])
            tensors[COMFY + key] = q
            if layout == "legacy":
                tensors[COMFY + layer + ".scale_weight"] = scale
                tensors[COMFY + layer + ".scale_input"] = torch.tensor(1.0)
            else:
                tensors[COMFY + layer + ".weight_scale"] = scale
                conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                tensors[COMFY + layer + ".comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
                layers[COMFY + layer] = {"format": "float8_e4m3fn"}
        else:
            tensors[COMFY + key] = t
    metadata = None
    if layout == "legacy":
        tensors[COMFY + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    else:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    if all_in_one:
        tensors.update({k: torch.randn(s).to(torch.bfloat16) for k, s in {**VAE_KEYS, **T5_KEYS}.items()})
    save_file(tensors, path, metadata=metadata)
    return path


def dequantized_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear weights went through fp8 quantization (fp32 compute)."""
    import copy

    out = copy.deepcopy(model)
    for name in linear_weights(out):
        mod = out.get_submodule(name.removesuffix(".weight"))
        q, scale = quantize(mod.weight)
        mod.weight.copy_(q.float() * scale)
    return out
