"""Genmo ↔ diffusers (`AutoencoderKLMochi`) VAE key names (diffusers-mochi.md §2.2, §2.3).

The table is generated from the config (Genmo numbers the encoder's top-level layers flatly, so the
position of each block depends on the res-block counts) as explicit pairs, and read both ways. A pair
whose diffusers side is a 3-tuple is a split: the fused `qkv` rows are [q; k; v] (Genmo views them as
(3, heads, 32)), and diffusers holds them as `to_q`, `to_k`, `to_v`. No values change sign or scale.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mochi.models.vae import DecoderConfig, EncoderConfig
from mochi.weights.io import WeightsError

# ResBlock leaves: Genmo's Sequential index → diffusers' module name.
RESBLOCK = (
    ("stack.0", "norm1.norm_layer"),
    ("stack.2", "conv1.conv"),
    ("stack.3", "norm2.norm_layer"),
    ("stack.5", "conv2.conv"),
)
# Attention leaves: Genmo `attn_block.*` → diffusers, relative to the block holding resnet i.
ATTENTION = (
    ("attn_block.norm.weight", "norms.{i}.norm_layer.weight"),
    ("attn_block.norm.bias", "norms.{i}.norm_layer.bias"),
    (
        "attn_block.attn.qkv.weight",
        ("attentions.{i}.to_q.weight", "attentions.{i}.to_k.weight", "attentions.{i}.to_v.weight"),
    ),
    ("attn_block.attn.out.weight", "attentions.{i}.to_out.0.weight"),
    ("attn_block.attn.out.bias", "attentions.{i}.to_out.0.bias"),
)

Pair = tuple[str, str | tuple[str, str, str]]


def _resblock(ours: str, theirs: str, i: int, attention: bool) -> list[Pair]:
    """Pairs for one ResBlock at Genmo prefix `ours` and diffusers block prefix `theirs`, resnet i."""
    pairs: list[Pair] = [
        (f"{ours}.{g}.{p}", f"{theirs}.resnets.{i}.{d}.{p}") for g, d in RESBLOCK for p in ("weight", "bias")
    ]
    if attention:
        for g, d in ATTENTION:
            target = (
                tuple(f"{theirs}.{x.format(i=i)}" for x in d)
                if isinstance(d, tuple)
                else f"{theirs}.{d.format(i=i)}"
            )
            pairs.append((f"{ours}.{g}", target))
    return pairs


def decoder_pairs(cfg: DecoderConfig) -> list[Pair]:
    """(Genmo key, diffusers key) for every decoder tensor; diffusers keys carry the `decoder.` prefix."""
    nrb = cfg.num_res_blocks
    n_up = len(cfg.channel_multipliers) - 1
    pairs: list[Pair] = [(f"blocks.0.0.{p}", f"decoder.conv_in.{p}") for p in ("weight", "bias")]
    for i in range(nrb[-1]):
        pairs += _resblock(f"blocks.0.{i + 1}", "decoder.block_in", i, False)
    for b in range(n_up):
        for i in range(nrb[-b - 2]):
            pairs += _resblock(f"blocks.{b + 1}.blocks.{i}", f"decoder.up_blocks.{b}", i, False)
        pairs += [(f"blocks.{b + 1}.proj.{p}", f"decoder.up_blocks.{b}.proj.{p}") for p in ("weight", "bias")]
    for i in range(nrb[0]):
        pairs += _resblock(f"blocks.{n_up + 1}.{i}", "decoder.block_out", i, False)
    pairs += [(f"output_proj.{p}", f"decoder.proj_out.{p}") for p in ("weight", "bias")]
    return pairs


def encoder_pairs(cfg: EncoderConfig) -> list[Pair]:
    """(Genmo key, diffusers key or q/k/v triple) for every encoder tensor; prefix `encoder.`."""
    nrb, att = cfg.num_res_blocks, cfg.has_attentions
    n_down = len(cfg.channel_multipliers) - 1
    pairs: list[Pair] = [(f"layers.0.{p}", f"encoder.proj_in.{p}") for p in ("weight", "bias")]
    for i in range(nrb[0]):
        pairs += _resblock(f"layers.{i + 1}", "encoder.block_in", i, att[0])
    for b in range(n_down):
        layer = nrb[0] + 1 + b
        pairs += [
            (f"layers.{layer}.layers.0.{p}", f"encoder.down_blocks.{b}.conv_in.conv.{p}")
            for p in ("weight", "bias")
        ]
        for i in range(nrb[b + 1]):
            pairs += _resblock(f"layers.{layer}.layers.{i + 1}", f"encoder.down_blocks.{b}", i, att[b + 1])
    for i in range(nrb[-1]):
        pairs += _resblock(f"layers.{nrb[0] + 1 + n_down + i}", "encoder.block_out", i, att[-1])
    pairs += [(f"output_norm.{p}", f"encoder.norm_out.norm_layer.{p}") for p in ("weight", "bias")]
    pairs.append(("output_proj.weight", "encoder.proj_out.weight"))
    return pairs


def _unknown(keys: set[str], side: str) -> None:
    if keys:
        shown = ", ".join(sorted(keys)[:8])
        raise WeightsError(f"{len(keys)} keys have no {side} name in the VAE key map: {shown}")


def to_diffusers(sd: Mapping[str, torch.Tensor], pairs: list[Pair]) -> dict[str, torch.Tensor]:
    """Genmo-named tensors → diffusers names (qkv split in three)."""
    out: dict[str, torch.Tensor] = {}
    known = set()
    for ours, theirs in pairs:
        if ours not in sd:
            continue
        known.add(ours)
        if isinstance(theirs, tuple):
            for name, part in zip(theirs, sd[ours].chunk(3, dim=0)):
                out[name] = part
        else:
            out[theirs] = sd[ours]
    _unknown(set(sd) - known, "diffusers")
    return out


def from_diffusers(sd: Mapping[str, torch.Tensor], pairs: list[Pair]) -> dict[str, torch.Tensor]:
    """diffusers-named tensors → Genmo names (to_q/to_k/to_v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    known = set()
    for ours, theirs in pairs:
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        if not all(n in sd for n in names):
            continue
        known.update(names)
        out[ours] = torch.cat([sd[n] for n in names], dim=0) if len(names) > 1 else sd[names[0]]
    _unknown(set(sd) - known, "Genmo")
    return out
