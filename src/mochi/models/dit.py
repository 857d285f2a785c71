"""AsymmDiT: Mochi 1's 10B-parameter asymmetric joint diffusion transformer (genmo-mochi.md §1).

Two token streams: visual tokens (width ``hidden_size_x``) from 2×2 patches of the 12-channel latent, and text
tokens (width ``hidden_size_y``) projected from T5 features. Every block modulates both streams from one
conditioning vector c = timestep embedding + attention-pooled caption, runs joint attention over
[visual ‖ text] (learned 3D RoPE on visual q/k only) and tanh-gated, RMS-normed residual branches; the last
block updates only the visual stream. Module attribute names are Genmo's checkpoint keys, so
``dit.safetensors`` loads strictly with no renaming.

Text is carried packed: only valid tokens exist, laid end to end over the batch (``(L_total, D)``), so padding
never enters the text projection, the pooler, the text MLPs or attention, and a batch equals separate calls.
Packing was chosen over masking because a mask still pays for every padding token in the text stream and the
pooler (the empty guidance prompt would cost a full 256-token text stream); here the guidance batch costs
exactly its valid tokens, and attention runs one fused, unmasked kernel per sample (``mochi.ops.attention``).

dtype: the model computes in the dtype of its weights (fp32, bf16 or fp16; no autocast needed), with the
reference's fp32 islands (norms, RoPE, final LayerNorm). ``pos_frequencies`` and the q/k norm weights stay
fp32 when the module is cast with ``.to(dtype)``/``.half()``/``.bfloat16()`` (see ``AsymmDiT._apply``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mochi.ops.attention import attention, check_backend
from mochi.ops.norms import RMSNorm, final_layer_norm, modulated_rms_norm, tanh_gated_residual
from mochi.ops.rope import apply_rope, rope_positions, rope_table


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the DiT. The defaults are the released Mochi 1 preview (10,027,677,744 parameters)."""

    depth: int = 48
    patch_size: int = 2
    num_heads: int = 24
    hidden_size_x: int = 3072  # visual stream; head_dim = hidden_size_x / num_heads
    hidden_size_y: int = 1536  # text stream
    mlp_ratio_x: float = 4.0
    mlp_ratio_y: float = 4.0
    mlp_multiple_of: int = 256  # Genmo rounds the SwiGLU width up to this; 1 gives diffusers' (8·dim)//3
    in_channels: int = 12
    t5_feat_dim: int = 4096
    timestep_embed_dim: int = 256
    pool_heads: int = 8  # heads of the caption attention pool

    @property
    def head_dim(self) -> int:
        return self.hidden_size_x // self.num_heads

    def mlp_hidden(self, width: int, ratio: float) -> int:
        """SwiGLU inner width: int(2/3 · width · ratio) rounded up to ``mlp_multiple_of``."""
        hidden = int(2 * int(width * ratio) / 3)
        return self.mlp_multiple_of * math.ceil(hidden / self.mlp_multiple_of)


DIT_PRESETS: dict[str, DiTConfig] = {
    "mochi-1-preview": DiTConfig(),
    # Test and benchmark sizes. mlp_multiple_of=1 matches diffusers' FeedForward width at any size.
    "tiny": DiTConfig(
        depth=2,
        num_heads=2,
        hidden_size_x=32,
        hidden_size_y=16,
        t5_feat_dim=32,
        timestep_embed_dim=16,
        mlp_multiple_of=1,
    ),  # fmt: skip
    "small": DiTConfig(depth=4, num_heads=8, hidden_size_x=1024, hidden_size_y=512, mlp_multiple_of=1),
    "full-width-2": DiTConfig(depth=2),
}


@dataclass(frozen=True)
class PackedText:
    """Where each sample's valid text tokens sit in the packed text stream.

    lengths: valid tokens per sample; index: (L_total,) positions in the flattened (B·L) input;
    sample: (L_total,) the sample each packed token belongs to.
    """

    lengths: list[int]
    index: torch.Tensor
    sample: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> PackedText:
        """mask: (B, L) bool, True = valid token (any positions, not only right padding)."""
        index = mask.flatten().nonzero().squeeze(1)
        return cls(mask.sum(1).tolist(), index, torch.div(index, mask.shape[1], rounding_mode="floor"))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size_x, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) latents → (B, T·H/p·W/p, D) tokens, frame-major then row then column."""
        B = x.shape[0]
        x = self.proj(rearrange(x, "B C T H W -> (B T) C H W"))
        # Contiguous: every block reads and writes the residual stream, and strided passes are slow.
        return rearrange(x, "(B T) D hp wp -> B (T hp wp) D", B=B).contiguous()


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.freq_dim = cfg.timestep_embed_dim
        d = cfg.hidden_size_x
        self.mlp = nn.Sequential(nn.Linear(cfg.timestep_embed_dim, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sigma (B,) in [0, 1] → (B, D) in ``dtype``; the sinusoid [cos, sin] of t = 1000·(1 − σ) is fp32."""
        t = (1 - sigma.float()) * 1000.0
        half = self.freq_dim // 2
        freqs = torch.exp(
            torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half)
        )
        args = t[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(dtype))


class AttentionPool(nn.Module):
    """Caption vector: the masked mean of the valid T5 tokens queries [mean ‖ valid tokens] (8 heads)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.t5_feat_dim
        self.heads = cfg.pool_heads
        self.to_kv = nn.Linear(d, 2 * d)
        self.to_q = nn.Linear(d, d)
        self.to_out = nn.Linear(d, cfg.hidden_size_x)

    def forward(self, tokens: torch.Tensor, text: PackedText, dtype: torch.dtype) -> torch.Tensor:
        """tokens: (L_total, d) packed valid T5 features, any dtype → (B, hidden_size_x) in ``dtype``.

        The mean is taken in fp32 (as the reference pools its fp32 T5 features), the rest in ``dtype``.
        An empty prompt pools to zeros and attends only to itself: to_out(to_kv's value bias) (§1.3.5).
        """
        B = len(text.lengths)
        counts = torch.tensor(text.lengths, device=tokens.device).clamp(min=1)
        pooled = torch.zeros(B, tokens.shape[1], device=tokens.device)
        pooled = (pooled.index_add(0, text.sample, tokens.float()) / counts[:, None]).to(dtype)  # (B, d)
        tokens = tokens.to(dtype)
        kv = rearrange(
            self.to_kv(torch.cat([pooled, tokens])), "S (two h e) -> two h S e", two=2, h=self.heads
        )
        q = rearrange(self.to_q(pooled), "B (h e) -> B h 1 e", h=self.heads)
        out, start = [], B
        for b, n in enumerate(text.lengths):
            keys = torch.cat([kv[:, :, b : b + 1], kv[:, :, start : start + n]], dim=2)  # (2, h, 1+n, e)
            out.append(F.scaled_dot_product_attention(q[b], keys[0], keys[1]))  # (h, 1, e)
            start += n
        return self.to_out(rearrange(torch.stack(out), "B h 1 e -> B (h e)"))


class FeedForward(nn.Module):
    """SwiGLU: w2(SiLU(first half of w1 x) · second half)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w1(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return self.w2(F.silu(a) * b)
        # Without autograd, reuse w1's output: the (tokens, hidden) buffers are the DiT's peak memory.
        return self.w2(F.silu(a, inplace=True).mul_(b))


class AsymmetricAttention(nn.Module):
    def __init__(self, cfg: DiTConfig, update_y: bool) -> None:
        super().__init__()
        dx, dy, hd = cfg.hidden_size_x, cfg.hidden_size_y, cfg.head_dim
        self.heads, self.update_y = cfg.num_heads, update_y
        self.qkv_x = nn.Linear(dx, 3 * dx, bias=False)
        self.qkv_y = nn.Linear(dy, 3 * dx, bias=False)
        self.q_norm_x, self.k_norm_x = RMSNorm(hd), RMSNorm(hd)
        self.q_norm_y, self.k_norm_y = RMSNorm(hd), RMSNorm(hd)
        self.proj_x = nn.Linear(dx, dx)
        self.proj_y = nn.Linear(dx, dy) if update_y else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        rope: torch.Tensor,
        text: PackedText,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, dx) normed visual tokens; y: (L_total, dy) normed packed text.

        Returns (B, N, dx) and (L_total, dy), or None for the text output of the last block.
        """
        B, N, _ = x.shape
        q_x, k_x, v_x = rearrange(self.qkv_x(x), "B N (three h e) -> three B N h e", three=3, h=self.heads)
        q_x = apply_rope(self.q_norm_x(q_x), rope)
        k_x = apply_rope(self.k_norm_x(k_x), rope)
        q_y, k_y, v_y = rearrange(self.qkv_y(y), "L (three h e) -> three L h e", three=3, h=self.heads)
        q_y, k_y = self.q_norm_y(q_y), self.k_norm_y(k_y)

        # Pack each sample's joint sequence [N visual ‖ its valid text] end to end.
        seqs = [N + n for n in text.lengths]
        cu_seqlens = [0, *itertools.accumulate(seqs)]

        def pack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            """(B, N, h, e) visual ‖ (L_total, h, e) text → (total, h, e), per sample [N ‖ its text].

            The result is a view of a head-major (h, total, e) buffer: each head's sequence is contiguous,
            which SDPA's CPU kernel runs about 10% faster than the token-major layout.
            """
            pieces = [t for i, part in enumerate(b.split(text.lengths)) for t in (a[i], part)]
            return torch.cat([t.transpose(0, 1) for t in pieces], dim=1).transpose(0, 1)

        out = attention(pack(q_x, q_y), pack(k_x, k_y), pack(v_x, v_y), cu_seqlens, backend=backend)
        parts = rearrange(out, "S h e -> S (h e)").split([n for s in text.lengths for n in (N, s)])
        out_x = parts[0][None] if B == 1 else torch.stack(parts[0::2])  # (B, N, dx)
        out_y = parts[1] if B == 1 else torch.cat(parts[1::2])  # (L_total, dx)
        return self.proj_x(out_x), (self.proj_y(out_y) if self.update_y else None)


class AsymmetricJointBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, update_y: bool) -> None:
        super().__init__()
        dx, dy = cfg.hidden_size_x, cfg.hidden_size_y
        self.update_y = update_y
        self.mod_x = nn.Linear(dx, 4 * dx)
        self.mod_y = nn.Linear(dx, 4 * dy if update_y else dy)
        self.attn = AsymmetricAttention(cfg, update_y)
        self.mlp_x = FeedForward(dx, cfg.mlp_hidden(dx, cfg.mlp_ratio_x))
        if update_y:
            self.mlp_y = FeedForward(dy, cfg.mlp_hidden(dy, cfg.mlp_ratio_y))

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        c: torch.Tensor,
        rope: torch.Tensor,
        text: PackedText,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, dx); y: (L_total, dy) packed; c: (B, dx) = SiLU(conditioning). Returns updated x, y."""
        # Modulation chunks: (scale_msa, gate_msa, scale_mlp, gate_mlp); the last block has only scale_msa_y.
        mod_x = self.mod_x(c)[:, None]  # (B, 1, 4·dx)
        scale_msa_x, gate_msa_x, scale_mlp_x, gate_mlp_x = mod_x.chunk(4, dim=-1)
        mod_y = self.mod_y(c)[text.sample]  # (L_total, 4·dy) or (L_total, dy): each token its sample's row
        scale_msa_y, gate_msa_y, scale_mlp_y, gate_mlp_y = (
            mod_y.chunk(4, dim=-1) if self.update_y else (mod_y,) * 4
        )

        x_attn, y_attn = self.attn(
            modulated_rms_norm(x, scale_msa_x), modulated_rms_norm(y, scale_msa_y), rope, text, backend
        )
        x = tanh_gated_residual(x, x_attn, gate_msa_x)
        x = tanh_gated_residual(x, self.mlp_x(modulated_rms_norm(x, scale_mlp_x)), gate_mlp_x)
        if self.update_y:
            y = tanh_gated_residual(y, y_attn, gate_msa_y)
            y = tanh_gated_residual(y, self.mlp_y(modulated_rms_norm(y, scale_mlp_y)), gate_mlp_y)
        return x, y


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.mod = nn.Linear(cfg.hidden_size_x, 2 * cfg.hidden_size_x)
        self.linear = nn.Linear(cfg.hidden_size_x, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D); c: (B, D) = SiLU(conditioning) → (B, N, p·p·C). Chunks are (shift, scale)."""
        shift, scale = self.mod(c)[:, None].chunk(2, dim=-1)
        return self.linear(final_layer_norm(x, shift, scale).to(x.dtype))


class AsymmDiT(nn.Module):
    """The Mochi 1 denoiser: ``forward(x, sigma, text, text_mask) → velocity``; knows no schedule or guidance.

    attention_backend: "sdpa" (default), "flash" or "sage" (see ``mochi.ops.attention``); settable later.
    Build the released model without memory on the meta device (``with torch.device("meta"): AsymmDiT(cfg)``),
    then load weights with ``load_state_dict(..., assign=True)``.
    """

    FP32_PARAMS = ("pos_frequencies", *(f"{qk}_norm_{s}.weight" for qk in "qk" for s in "xy"))

    def __init__(self, config: DiTConfig, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.config = cfg = config
        self.attention_backend = attention_backend
        # None, or a callable replacing the loop over the blocks for a forward: installed from outside by
        # ``mochi.accel.cache`` (step caching), so the DiT itself never knows which step it is at.
        self.block_runner = None
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg)
        self.t5_y_embedder = AttentionPool(cfg)
        self.t5_yproj = nn.Linear(cfg.t5_feat_dim, cfg.hidden_size_y)
        self.pos_frequencies = nn.Parameter(torch.empty(3, cfg.num_heads, cfg.head_dim // 2))
        self.blocks = nn.ModuleList(
            AsymmetricJointBlock(cfg, update_y=i < cfg.depth - 1) for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(cfg)
        # On the meta device (built to be loaded) there are no values to draw, and drawing them there goes
        # through torch's Python decompositions, whose import alone costs seconds.
        if self.pos_frequencies.device.type != "meta":
            self.initialize_weights()

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        self._attention_backend = check_backend(name)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the patch embedding's weight (a Conv2d, never fp8-quantized).

        Inputs are cast to it and the output back to x's dtype; fp8 Linear layers compute in it.
        """
        return self.x_embedder.proj.weight.dtype

    def initialize_weights(self) -> None:
        """Random weights for tests and training from scratch (the released weights replace them all).

        Every branch is live (no zero-init gates), so parity tests exercise every path.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.02)
            elif isinstance(m, RMSNorm):
                nn.init.normal_(m.weight, mean=1.0, std=0.1)
        # Angles of a few radians across the ±96 row/column range and tens of frames.
        nn.init.normal_(self.pos_frequencies, std=0.05)

    @classmethod
    def is_fp32_param(cls, name: str) -> bool:
        """Whether a parameter (by state-dict key) is an fp32 island, kept fp32 when the model is cast."""
        return name.endswith(cls.FP32_PARAMS)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        """Cast/move like nn.Module, but fp32 islands end up fp32: never rounded by a cast, and upcast
        (exactly) if they were loaded in lower precision, e.g. from a bf16 checkpoint with ``assign=True``.
        """
        keep = {n: p.data for n, p in self.named_parameters() if self.is_fp32_param(n)}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self.get_parameter(name)
            if new.dtype != torch.float32:
                src = new if old.is_meta and not new.is_meta else old  # to_empty(): nothing to keep
                new.data = src.to(device=new.device, dtype=torch.float32)
        return self

    def _check_inputs(self, x, sigma, text, text_mask) -> None:  # noqa: ANN001 - shapes are in forward's doc
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"latents must be (B, {cfg.in_channels}, T, H, W), got shape {tuple(x.shape)}: "
                f"the channel axis must have {cfg.in_channels} channels"
            )
        p = cfg.patch_size
        for axis, n in (("height", x.shape[3]), ("width", x.shape[4])):
            if n % p:
                raise ValueError(
                    f"latent {axis} {n} must be a multiple of the patch size {p}; "
                    f"nearest valid: {n - n % p or p} or {n - n % p + p}"
                )
        if text.ndim != 3 or text.shape[-1] != cfg.t5_feat_dim:
            raise ValueError(
                f"text features must be (B, L, {cfg.t5_feat_dim}), got shape {tuple(text.shape)}: "
                f"the feature width must equal t5_feat_dim={cfg.t5_feat_dim}"
            )
        if text_mask.shape != text.shape[:2]:
            raise ValueError(
                f"text_mask must have shape (B, L) = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}"
            )
        if sigma.ndim != 1:
            raise ValueError(f"sigma must have shape (B,), got {tuple(sigma.shape)}")
        sizes = {
            "latents": x.shape[0],
            "sigma": sigma.shape[0],
            "text": text.shape[0],
            "text_mask": text_mask.shape[0],
        }
        if len(set(sizes.values())) != 1:
            raise ValueError(f"batch sizes must match, got {sizes}")
        lo, hi = sigma.min().item(), sigma.max().item()
        if not (lo >= 0.0 and hi <= 1.0):  # written so that NaN fails too
            bad = lo if not lo >= 0.0 else hi
            raise ValueError(
                f"sigma must lie in [0, 1] (1 = pure noise), got {bad}; nearest valid: {min(max(bad, 0), 1)}"
            )

    def run_blocks(
        self,
        h: torch.Tensor,
        y: torch.Tensor,
        c: torch.Tensor,
        rope: torch.Tensor,
        text: PackedText,
        start: int = 0,
        stop: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``start``..``stop`` (default all): h (B, N, dx), y (L_total, dy), c (B, dx) = SiLU(cond)."""
        for block in self.blocks[start:stop]:
            h, y = block(h, y, c, rope, text, self.attention_backend)
        return h, y

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Predict the rectified-flow velocity v = x0 − ε.

        x: (B, 12, T, H, W) latents (DiT-normalised), H and W even; sigma: (B,) noise level in [0, 1];
        text: (B, L, 4096) T5 features; text_mask: (B, L) bool (or 0/1 ints), True = valid token. An all-false
        row is the empty prompt (zero text tokens). Returns (B, 12, T, H, W) in x's dtype.
        """
        self._check_inputs(x, sigma, text, text_mask)
        B, _, T, H, W = x.shape
        p, dtype = self.config.patch_size, self.dtype
        packed = PackedText.from_mask(text_mask.bool())

        tokens = text.flatten(0, 1)[packed.index]  # (L_total, 4096), valid tokens only
        c = self.t_embedder(sigma, dtype) + self.t5_y_embedder(tokens, packed, dtype)  # (B, dx)
        c = F.silu(c)  # every consumer of c takes SiLU(c) first
        y = self.t5_yproj(tokens.to(dtype))  # (L_total, dy)
        h = self.x_embedder(x.to(dtype))  # (B, N, dx)
        rope = rope_table(self.pos_frequencies, rope_positions(T, H // p, W // p, device=x.device))

        if self.block_runner is None:
            h, _ = self.run_blocks(h, y, c, rope, packed)
        else:
            h = self.block_runner(self, h, y, c, rope, packed)
        h = self.final_layer(h, c)  # (B, N, p·p·C)
        out = rearrange(h, "B (T hp wp) (p1 p2 c) -> B c T (hp p1) (wp p2)", T=T, hp=H // p, p1=p, p2=p)
        return out.to(x.dtype)
