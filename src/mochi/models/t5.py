"""The T5 v1.1 encoder that turns Mochi's prompts into (B, 256, 4096) features (genmo-mochi.md §4).

Module attribute names are Hugging Face's ``T5EncoderModel`` checkpoint keys (``shared.weight``,
``encoder.block.N.layer.0.SelfAttention.q.weight``, …), so a ``google/t5-v1_1-xxl`` folder loads strictly with
no renaming (see ``mochi.weights.t5``). HF also exposes ``encoder.embed_tokens.weight``, a tied alias of
``shared.weight`` that ``save_pretrained`` leaves out; we keep only ``shared``.

T5 v1.1 specifics: gated GELU (tanh approximation) feed-forward, RMS layer norm with the variance taken in
fp32, relative position buckets whose bias is learned in block 0 and shared by all blocks, and no 1/√d
scaling of the attention logits (the scale is folded into the weights at training time).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)`` with its default N(0, 1) initialisation, skipped on the meta device: there
    are no values to draw there (the model is built to be loaded), and ``normal_`` on meta goes through
    torch's Python decompositions, whose first import costs about 3 s of ``mochi generate``'s start-up."""
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_hf(cls, config: dict) -> T5Config:
        """Read a Hugging Face ``config.json`` dict; only T5 v1.1's gated-GELU feed-forward is supported."""
        ff = config.get("feed_forward_proj", "gated-gelu")
        if ff != "gated-gelu":
            raise ValueError(
                f"T5 config has feed_forward_proj={ff!r}; mochi implements T5 v1.1 only, which uses "
                "'gated-gelu' (as google/t5-v1_1-xxl does)"
            )
        fields = {k: config[k] for k in asdict(cls()) if k in config}
        return cls(**fields)

    def to_hf(self) -> dict:
        """The matching Hugging Face ``config.json`` entries."""
        return {
            **asdict(self),
            "model_type": "t5",
            "architectures": ["T5EncoderModel"],
            "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu_new",
            "is_gated_act": True,
        }


T5_PRESETS: dict[str, T5Config] = {
    # google/t5-v1_1-xxl, the encoder Genmo uses: 4.76 B parameters.
    "t5-v1_1-xxl": T5Config(),
    # A test size with the byte tokenizer's 259-token vocabulary; d_kv · heads = d_model as in XXL.
    "t5-tiny": T5Config(vocab_size=259, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2),
}


def relative_position_bucket(
    relative_position: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bidirectional T5 bucket of ``key_pos − query_pos`` (any integer shape → same shape, int64).

    Half the buckets are for positive offsets. Within each half, offsets below ``num_buckets // 4`` get their
    own bucket and larger ones share logarithmically wider buckets up to ``max_distance``. The float
    expression is evaluated in the same order as Mesh TensorFlow / HF so boundary offsets land identically.
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).long() * half
    distance = relative_position.abs()
    max_exact = half // 2
    # clamp(min=1) only avoids log(0) in the branch that torch.where discards for small distances.
    large = (
        max_exact
        + (
            torch.log(distance.clamp(min=1).float() / max_exact)
            / math.log(max_distance / max_exact)
            * (half - max_exact)
        ).long()
    )
    large = large.clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; the mean square is taken in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = _embedding(config.relative_attention_num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D); bias: (B or 1, H, L, L) additive (position bias plus padding mask) → (B, L, D)."""
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        # T5 does not scale the logits (scale=1.0). SDPA is used directly rather than mochi's shared attention
        # function because T5 needs an arbitrary additive bias, which the fused kernels there do not take.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedGelu(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        w = self.wo.weight
        # wo may be kept fp32 under fp16 (HF's overflow guard); a quantized wo widens its weight to h's dtype.
        return self.wo(h.to(w.dtype) if w.is_floating_point() and w.element_size() > 1 else h)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedGelu(config)  # HF's attribute name, kept for the checkpoint keys
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.block = nn.ModuleList([T5Block(config, i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: token ids (B, L) → last hidden state (B, L, d_model), final layer norm included."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = _embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """The learned relative position bias of block 0, shared by every block: (1, H, L, L)."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, L) int64; attention_mask: (B, L), True/1 = real token → (B, L, d_model).

        Padded keys are excluded from attention; padded positions still get (meaningless) features, as in
        HF. A row whose mask is all False gives finite but meaningless features (callers skip such rows).
        """
        x = self.shared(input_ids)
        bias = self.position_bias(input_ids.shape[1], input_ids.device)
        if attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :]
            # A large finite negative rather than -inf so a fully masked row cannot produce NaN.
            bias = torch.where(keep, bias, torch.finfo(bias.dtype).min)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None, factor: float = 1.0) -> None:
        """T5's initialisation (normal with fan-in stds, unit norms), for random test and tiny models."""
        c = self.config

        def normal(p: torch.Tensor, std: float) -> None:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)

        normal(self.shared.weight, factor)
        for m in self.modules():
            if isinstance(m, T5LayerNorm):
                m.weight.fill_(factor)
            elif isinstance(m, T5DenseGatedGelu):
                normal(m.wi_0.weight, factor * c.d_model**-0.5)
                normal(m.wi_1.weight, factor * c.d_model**-0.5)
                normal(m.wo.weight, factor * c.d_ff**-0.5)
            elif isinstance(m, T5Attention):
                normal(m.q.weight, factor * (c.d_model * c.d_kv) ** -0.5)
                normal(m.k.weight, factor * c.d_model**-0.5)
                normal(m.v.weight, factor * c.d_model**-0.5)
                normal(m.o.weight, factor * (c.num_heads * c.d_kv) ** -0.5)
                if hasattr(m, "relative_attention_bias"):
                    normal(m.relative_attention_bias.weight, factor * c.d_model**-0.5)
