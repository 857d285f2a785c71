"""Prompts → T5 features and mask, the text conditioning of the DiT (genmo-mochi.md §3.5, §4)."""

from __future__ import annotations

import torch

from mochi.models.t5 import T5Encoder
from mochi.models.tokenizer import Tokenizer, tokenize_prompts


@torch.no_grad()
def encode_prompts(
    prompts: list[str],
    tokenizer: Tokenizer,
    encoder: T5Encoder,
    max_length: int = 256,
    names: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, max_length, d_model) float32 and mask (B, max_length) bool, on the encoder's device.

    Follows Genmo: fp32 output, encoded with autocast off (T5 overflows under fp16 autocast); padded
    positions hold whatever T5 computes there (the DiT ignores them). An empty prompt "" has zero valid
    tokens and all-zero features, and T5 is not run for it. Genmo applies this to the *last* prompt of
    its batch only; here it applies to every empty prompt, which gives the same result in both of Genmo's
    CFG modes for an empty negative prompt. Diffusers by default encodes "" as one end token instead
    (diffusers-mochi.md §4.5, §7b).
    """
    ids, mask = tokenize_prompts(prompts, tokenizer, max_length, names)
    device = encoder.shared.weight.device
    ids, mask = ids.to(device), mask.to(device)
    features = torch.zeros(
        len(prompts), max_length, encoder.config.d_model, dtype=torch.float32, device=device
    )
    rows = mask.any(dim=1).nonzero().flatten()
    if len(rows):
        with torch.autocast(device.type, enabled=False):
            features[rows] = encoder(ids[rows], mask[rows]).float()
    return features, mask
