"""Genmo ⇄ diffusers key map of the DiT (diffusers-mochi.md §2.1), as one declarative, reversible table.

Each rule names a Genmo key, the diffusers key(s) it becomes and an invertible transform:

* ``copy``: same tensor;
* ``split``: Genmo's fused qkv weight (3·D, in) ⇄ diffusers' q, k, v weights (``chunk(3)`` / ``cat``);
* ``swap``: exchange the two halves along dim 0 (an involution). SwiGLU ``w1``: Genmo applies SiLU to the
  first half, diffusers to the second; final layer ``mod``: Genmo is (shift, scale), diffusers (scale, shift).

Block rules apply to every block, to the blocks that update the text stream (all but the last), or to the
last one. Conversions are bit-exact both ways. Outputs never share storage with each other (``split`` clones
its chunks; ``copy`` passes the input tensor through), so a result can be saved with safetensors directly.
Any key the table does not cover is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mochi.weights.io import WeightsError

if TYPE_CHECKING:
    from mochi.models.dit import AsymmDiT, DiTConfig


@dataclass(frozen=True)
class Rule:
    genmo: str
    diffusers: tuple[str, ...]
    op: str = "copy"  # "copy" | "split" | "swap"
    blocks: str = "all"  # block rules only: "all" | "update_y" (not the last block) | "last"


def _wb(genmo: str, diffusers: str, op: str = "copy", blocks: str = "all") -> list[Rule]:
    """A Linear/Conv's weight and bias."""
    return [Rule(f"{genmo}.{s}", (f"{diffusers}.{s}",), op, blocks) for s in ("weight", "bias")]


TOP_RULES: list[Rule] = [
    *_wb("x_embedder.proj", "patch_embed.proj"),
    *_wb("t_embedder.mlp.0", "time_embed.timestep_embedder.linear_1"),
    *_wb("t_embedder.mlp.2", "time_embed.timestep_embedder.linear_2"),
    *_wb("t5_y_embedder.to_kv", "time_embed.pooler.to_kv"),
    *_wb("t5_y_embedder.to_q", "time_embed.pooler.to_q"),
    *_wb("t5_y_embedder.to_out", "time_embed.pooler.to_out"),
    *_wb("t5_yproj", "time_embed.caption_proj"),
    Rule("pos_frequencies", ("pos_frequencies",)),
    *_wb("final_layer.mod", "norm_out.linear", "swap"),
    *_wb("final_layer.linear", "proj_out"),
]

# Relative to "blocks.{i}." (Genmo) and "transformer_blocks.{i}." (diffusers).
BLOCK_RULES: list[Rule] = [
    *_wb("mod_x", "norm1.linear"),
    *_wb("mod_y", "norm1_context.linear", blocks="update_y"),
    *_wb("mod_y", "norm1_context.linear_1", blocks="last"),
    Rule("attn.qkv_x.weight", ("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"), "split"),
    Rule("attn.qkv_y.weight", tuple(f"attn1.add_{n}_proj.weight" for n in "qkv"), "split"),
    Rule("attn.q_norm_x.weight", ("attn1.norm_q.weight",)),
    Rule("attn.k_norm_x.weight", ("attn1.norm_k.weight",)),
    Rule("attn.q_norm_y.weight", ("attn1.norm_added_q.weight",)),
    Rule("attn.k_norm_y.weight", ("attn1.norm_added_k.weight",)),
    *_wb("attn.proj_x", "attn1.to_out.0"),
    *_wb("attn.proj_y", "attn1.to_add_out", blocks="update_y"),
    Rule("mlp_x.w1.weight", ("ff.net.0.proj.weight",), "swap"),
    Rule("mlp_x.w2.weight", ("ff.net.2.weight",)),
    Rule("mlp_y.w1.weight", ("ff_context.net.0.proj.weight",), "swap", "update_y"),
    Rule("mlp_y.w2.weight", ("ff_context.net.2.weight",), blocks="update_y"),
]  # fmt: skip


def _depth(keys: list[str], prefix: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(found) + 1 if found else 0


def rules(depth: int) -> list[Rule]:
    """Every rule with concrete keys, for a model of ``depth`` blocks."""
    out = list(TOP_RULES)
    for i in range(depth):
        kind = "last" if i == depth - 1 else "update_y"
        for r in BLOCK_RULES:
            if r.blocks in ("all", kind):
                out.append(
                    Rule(
                        f"blocks.{i}.{r.genmo}",
                        tuple(f"transformer_blocks.{i}.{d}" for d in r.diffusers),
                        r.op,
                    )
                )
    return out


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def _convert(sd: Mapping[str, torch.Tensor], to_diffusers: bool) -> dict[str, torch.Tensor]:
    src_fmt, prefix = ("genmo", "blocks.") if to_diffusers else ("diffusers", "transformer_blocks.")
    table = rules(_depth(list(sd), prefix))
    wanted = [k for r in table for k in ((r.genmo,) if to_diffusers else r.diffusers)]
    missing = [k for k in wanted if k not in sd]
    unexpected = sorted(sd.keys() - set(wanted))
    if missing or unexpected:
        raise WeightsError(
            f"not a {src_fmt}-format Mochi DiT state dict: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    out: dict[str, torch.Tensor] = {}
    for r in table:
        if to_diffusers:
            t = sd[r.genmo]
            if r.op == "split":
                out.update(zip(r.diffusers, (c.clone() for c in t.chunk(3, dim=0))))
            else:
                out[r.diffusers[0]] = _swap(t) if r.op == "swap" else t
        else:
            parts = [sd[k] for k in r.diffusers]
            if r.op == "split":
                out[r.genmo] = torch.cat(parts)
            else:
                out[r.genmo] = _swap(parts[0]) if r.op == "swap" else parts[0]
    return out


def genmo_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Genmo ``dit.safetensors`` keys → ``diffusers.MochiTransformer3DModel`` keys. Raises WeightsError on any
    missing or unexpected key."""
    return _convert(sd, to_diffusers=True)


def diffusers_to_genmo(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``diffusers.MochiTransformer3DModel`` keys → Genmo keys (``AsymmDiT``'s). Raises WeightsError on any
    missing or unexpected key."""
    return _convert(sd, to_diffusers=False)


def diffusers_kwargs(cfg: DiTConfig) -> dict[str, int]:
    """Constructor arguments of diffusers' ``MochiTransformer3DModel`` for a DiT of this config."""
    return {
        "patch_size": cfg.patch_size,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "num_layers": cfg.depth,
        "pooled_projection_dim": cfg.hidden_size_y,
        "in_channels": cfg.in_channels,
        "text_embed_dim": cfg.t5_feat_dim,
        "time_embed_dim": cfg.timestep_embed_dim,
    }


def diffusers_model(model: AsymmDiT) -> torch.nn.Module:
    """diffusers' ``MochiTransformer3DModel`` holding ``model``'s weights, in eval mode (parity checks;
    needs diffusers, a test-only dependency)."""
    from diffusers import MochiTransformer3DModel

    cfg = model.config
    with torch.device("meta"):
        theirs = MochiTransformer3DModel(**diffusers_kwargs(cfg))
        # diffusers derives the SwiGLU width from the model width as (8·dim)//3, Genmo rounds it up to
        # mlp_multiple_of (equal for the released model); other widths get layers of our shapes.
        for i, block in enumerate(theirs.transformer_blocks):
            pairs = [("ff", cfg.hidden_size_x, cfg.mlp_ratio_x)]
            pairs += [("ff_context", cfg.hidden_size_y, cfg.mlp_ratio_y)] if i < cfg.depth - 1 else []
            for name, width, ratio in pairs:
                ff = getattr(block, name, None)
                hidden = cfg.mlp_hidden(width, ratio)
                if ff is not None and ff.net[2].in_features != hidden:
                    ff.net[0].proj = torch.nn.Linear(width, 2 * hidden, bias=False)
                    ff.net[2] = torch.nn.Linear(hidden, width, bias=False)
    theirs.time_embed.pooler.num_attention_heads = cfg.pool_heads  # diffusers fixes 8 (the released value)
    # assign: diffusers' tensors are ours (or splits of them), so no second copy of the model is made.
    theirs.load_state_dict(genmo_to_diffusers(model.state_dict()), strict=True, assign=True)
    return theirs.eval()
