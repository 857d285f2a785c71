"""Bytes of weights and activations of each stage, from configs and request sizes; nothing is allocated.

Weights: every model is built on the meta device and its tensors summed, the quantizable Linear weights
(the DiT's and T5's block Linears; the fp32 islands, embeddings, norms and the final layer stay as they
are) at the bytes per weight of their quantization (``QUANT_BYTES``). Activations: the DiT and T5 forwards
are traced on the meta device (``mochi.memory.trace``) at the request's shapes, with two blocks (at
inference each block frees its temporaries, so the peak of two blocks, one updating the text stream and
the last one, is the peak of any depth); the VAE decode uses its own estimate and tile planner
(``mochi.models.vae_memory``, ``vae_tiling.plan_decode``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

from mochi.memory.trace import LiveBytes, meta_attention
from mochi.models.dit import AsymmDiT, DiTConfig, PackedText
from mochi.models.t5 import T5Config, T5Encoder
from mochi.models.vae import Decoder, DecoderConfig
from mochi.models.vae_memory import estimate_decode_memory
from mochi.models.vae_tiling import Plan
from mochi.ops.rope import rope_positions, rope_table
from mochi.weights.quantize import bytes_per_param

QUANT_MODES = ("none", "fp8", "int8", "q8_0", "q4_0")


def quantized_linear_bytes(quant: str, out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """Bytes of one (out, in) Linear weight: ``dtype`` unquantized, otherwise as
    `mochi.weights.quantize.bytes_per_param` counts them (scales included). A q8_0/q4_0 layer whose input
    width is not a multiple of 32 stays unquantized (`mochi.weights.quantize.quantizable`)."""
    n = out_features * in_features
    if quant not in ("none", *QUANT_MODES):
        raise ValueError(f"quantization {quant!r} is not one of {', '.join(QUANT_MODES)}")
    if quant == "none" or (quant in ("q8_0", "q4_0") and in_features % 32):
        return n * dtype.itemsize
    return round(n * bytes_per_param(quant, dtype, in_features))


def _check_quant(quant: str) -> None:
    quantized_linear_bytes(quant, 1, 1, torch.float32)


@dataclass(frozen=True)
class Weights:
    """Bytes of a model's weights: ``blocks`` (one entry per streamable block) and ``rest`` (the others)."""

    blocks: tuple[int, ...]
    rest: int

    @property
    def total(self) -> int:
        return sum(self.blocks) + self.rest


def _meta_dit(cfg: DiTConfig) -> AsymmDiT:
    """The DiT on the meta device, without running its initialisation (slow there, and values are moot)."""
    with torch.device("meta"):
        return AsymmDiT(cfg)


def _module_bytes(module: nn.Module, dtype_of, quant: str, quantizable, kept=None, at: str = "") -> int:  # noqa: ANN001
    """Bytes of ``module``'s parameters; ``kept``: layer (its name in the model, where ``module`` is named
    ``at``) → the stored bytes of its weight, which replace the weight's own count."""
    total = 0
    for name, sub in module.named_modules():
        layer = ".".join(n for n in (at, name) if n)
        for pname, p in sub.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if pname == "weight" and kept and layer in kept:
                total += kept[layer]
            elif pname == "weight" and isinstance(sub, nn.Linear) and quantizable(name):
                total += quantized_linear_bytes(quant, *p.shape, dtype_of(full))
            else:
                total += p.numel() * dtype_of(full).itemsize
    return total


@functools.lru_cache(maxsize=64)
def dit_weights(
    cfg: DiTConfig, dtype: torch.dtype, quant: str = "none", kept: tuple[tuple[str, int], ...] = ()
) -> Weights:
    """The DiT's weights in ``dtype`` (fp32 islands fp32), its blocks' Linears quantized by ``quant``.

    kept: (layer, bytes) of the Linears a checkpoint stores quantized and loading keeps so (a GGUF's ggml
    blocks, whatever their type, and fp8 weights with their scales: `mochi.memory.stored`); each weight
    counts its own stored bytes, whatever ``quant``.
    """
    _check_quant(quant)
    dit = _meta_dit(
        dataclasses.replace(cfg, depth=min(cfg.depth, 2))
    )  # the blocks are all alike but the last

    def dtype_of(name: str) -> torch.dtype:
        return torch.float32 if AsymmDiT.is_fp32_param(name) else dtype

    stored = dict(kept)

    def block(i: int) -> int:
        like = dit.blocks[0] if i < cfg.depth - 1 else dit.blocks[-1]
        return _module_bytes(like, dtype_of, quant, lambda n: True, stored, f"blocks.{i}")

    if kept:  # layer by layer: kept layers may differ from block to block (Q4_0 here, Q8_0 there)
        blocks = tuple(block(i) for i in range(cfg.depth))
    else:
        blocks = (block(0),) * (cfg.depth - 1) + (block(cfg.depth - 1),)
    rest = sum(
        _module_bytes(m, dtype_of, quant, lambda n: False, stored, n)
        for n, m in dit.named_children()
        if n != "blocks"
    )
    rest += dit.pos_frequencies.numel() * 4
    return Weights(blocks, rest)


@functools.lru_cache(maxsize=16)
def t5_weights(cfg: T5Config, quant: str = "none") -> Weights:
    """T5's weights, fp32 as the pipeline holds them, its layers' Linears quantized by ``quant``."""
    _check_quant(quant)
    with torch.device("meta"):
        t5 = T5Encoder(cfg)
    f32 = lambda name: torch.float32  # noqa: E731
    blocks = tuple(_module_bytes(b, f32, quant, lambda n: True) for b in t5.encoder.block)
    rest = sum(p.numel() * 4 for n, p in t5.named_parameters() if not n.startswith("encoder.block."))
    return Weights(blocks, rest)


@functools.lru_cache(maxsize=16)
def decoder_weights(cfg: DecoderConfig, dtype: torch.dtype = torch.float32) -> int:
    with torch.device("meta"):
        decoder = Decoder(cfg)
    return sum(p.numel() for p in decoder.parameters()) * dtype.itemsize


def cache_bytes(
    cfg: DiTConfig, latent: tuple[int, int, int], batch: int, dtype: torch.dtype, tensors: int
) -> int:
    """Bytes the step cache (`mochi.accel.cache`) holds between steps: ``tensors`` (`cache_tensors`) of the
    blocks' visual stream, (batch, visual tokens, width) each in ``dtype``."""
    t, h, w = latent
    tokens = t * (h // cfg.patch_size) * (w // cfg.patch_size)
    return tensors * batch * tokens * cfg.hidden_size_x * dtype.itemsize


def cache_tensors(cache: str | None, threshold: float | None = None) -> int:
    """How many visual-stream tensors a step cache keeps between steps: none for no cache; else the probe
    (TeaCache's modulated input, FBCache's first-block residual) and the blocks' residual, plus the one
    before it with ``extrapolate``."""
    from mochi.accel.cache import CacheSetting

    setting = CacheSetting.parse(cache, threshold)
    if setting.kind == "none":
        return 0
    return 3 if setting.extrapolate else 2


@functools.lru_cache(maxsize=64)  # each call builds and traces a meta DiT; plan asks often
def dit_activations(
    cfg: DiTConfig,
    latent: tuple[int, int, int],
    batch: int,
    text_tokens: tuple[int, ...],
    dtype: torch.dtype,
) -> int:
    """Peak bytes a DiT forward allocates (weights and inputs excluded), traced on the meta device.

    latent: (t, h, w) latent frames, rows, columns; batch: B; text_tokens: valid T5 tokens per sample
    (a tuple).
    The inputs are fp32 as the sampler passes them; attention as the fused kernels allocate
    (``meta_attention``).
    """
    if len(text_tokens) != batch:
        raise ValueError(f"text_tokens must give one count per sample ({batch}), got {list(text_tokens)}")
    t, h, w = latent
    small = dataclasses.replace(cfg, depth=min(cfg.depth, 2))
    dit = _meta_dit(small).to(dtype)
    with torch.device("meta"):
        x = torch.empty(batch, cfg.in_channels, t, h, w)
        sigma = torch.empty(batch)
        length = max(text_tokens) if text_tokens else 0
        text = torch.empty(batch, max(length, 1), cfg.t5_feat_dim)
    total = sum(text_tokens)
    sample = torch.cat([torch.full((n,), i) for i, n in enumerate(text_tokens)]) if total else torch.empty(0)
    packed = PackedText(
        list(text_tokens), torch.empty(total, dtype=torch.long, device="meta"), sample.long().to("meta")
    )
    p = cfg.patch_size
    with (
        mock.patch("mochi.models.dit.attention", meta_attention),
        torch.inference_mode(),
        LiveBytes() as live,
    ):
        # AsymmDiT.forward after its input checks and mask packing (both read values, which meta lacks).
        tokens = text.flatten(0, 1)[packed.index]
        c = dit.t_embedder(sigma, dtype) + dit.t5_y_embedder(tokens, packed, dtype)
        c = torch.nn.functional.silu(c)
        y = dit.t5_yproj(tokens.to(dtype))
        hidden = dit.x_embedder(x.to(dtype))
        rope = rope_table(dit.pos_frequencies, rope_positions(t, h // p, w // p, device=x.device))
        for block in dit.blocks:
            hidden, y = block(hidden, y, c, rope, packed, "sdpa")
        out = dit.final_layer(hidden, c)
        del out, hidden, y, rope, c, tokens
    return live.peak


@functools.lru_cache(maxsize=16)
def t5_activations(cfg: T5Config, batch: int, length: int = 256) -> int:
    """Peak bytes a T5 forward over (batch, length) token ids allocates, traced on the meta device."""
    small = dataclasses.replace(cfg, num_layers=min(cfg.num_layers, 2))
    with torch.device("meta"):
        t5 = T5Encoder(small)
        ids = torch.zeros(batch, length, dtype=torch.long)
        mask = torch.ones(batch, length, dtype=torch.bool)
    with torch.inference_mode(), LiveBytes() as live:
        t5(ids, mask)
    return live.peak


@functools.lru_cache(maxsize=256)
def pipeline_decode_plan(
    cfg: DecoderConfig,
    latent: tuple[int, int, int, int],
    available: int,
    dtype: torch.dtype = torch.float32,
    max_memory: int | None = None,
    cpu: bool = False,
) -> tuple[Plan | None, int]:
    """(the split the pipeline decodes with when ``available`` bytes are free, its estimated bytes):
    ``choose_plan``'s rule, the default budget's split (or the user's ``max_memory``) unless it needs more
    than is free, then a smaller one. (None, the smallest split's bytes) when nothing fits. cpu: decoding
    on the CPU (``mochi.models.vae_memory``)."""
    import warnings

    from mochi.models.vae_plan import choose_plan

    with torch.device("meta"):
        decoder = Decoder(cfg).to(dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's warning is the pipeline's to give
            plan, _ = choose_plan(decoder, latent, max_memory, max(available, 0), cpu=cpu)
    except ValueError:
        _, t, h, w = latent
        tile = (min(h, 7), min(w, 7))
        return None, min(estimate_decode_memory(cfg, latent, tile, c, dtype, cpu) for c in range(1, t + 1))
    return plan, estimate_decode_memory(cfg, latent, plan.tile, plan.chunk, dtype, cpu)
