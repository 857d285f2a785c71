"""AsymmVAE: the causal video decoder and encoder of Mochi 1 (genmo-mochi.md §2.2, §2.3).

Latents have 12 channels at 1/8 the height and width and 1/6 the frame rate (causally: t latent frames
↔ 6t−5 video frames). Module attribute names are Genmo's checkpoint keys, so `decoder.safetensors` and
`encoder.safetensors` load with no renaming. Both models take an optional `CausalContext` so that long
videos can be processed in temporal chunks with the same result (see `mochi.models.vae_tiling`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mochi.models.vae_blocks import (
    CausalContext,
    CausalUpsampleBlock,
    Conv1x1,
    DownsampleBlock,
    GroupNormSpatial,
    ResBlock,
    fourier_features,
)

TEMPORAL_FACTOR = 6
SPATIAL_FACTOR = 8


@dataclass(frozen=True)
class DecoderConfig:
    """Genmo's decoder factory arguments; the defaults are the released decoder (362,526,595 params)."""

    latent_dim: int = 12
    out_channels: int = 3
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 6)
    num_res_blocks: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_expansions: tuple[int, ...] = (1, 2, 3)
    spatial_expansions: tuple[int, ...] = (2, 2, 2)

    @property
    def channels(self) -> list[int]:
        return [m * self.base_channels for m in self.channel_multipliers]


@dataclass(frozen=True)
class EncoderConfig:
    """Genmo's encoder factory arguments; the defaults are the released encoder (97,222,016 params)."""

    in_channels: int = 15
    latent_dim: int = 12
    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 6)
    num_res_blocks: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_reductions: tuple[int, ...] = (1, 2, 3)
    spatial_reductions: tuple[int, ...] = (2, 2, 2)
    has_attentions: tuple[bool, ...] = (False, True, True, True, True)

    @property
    def channels(self) -> list[int]:
        return [m * self.base_channels for m in self.channel_multipliers]


DECODER_PRESETS: dict[str, DecoderConfig] = {
    "mochi-1-preview": DecoderConfig(),
    # Test size: every structural feature (3 up blocks, te 3/2/1) at 32 channels and one ResBlock each.
    "tiny": DecoderConfig(base_channels=32, channel_multipliers=(1, 1, 1, 1), num_res_blocks=(1, 1, 1, 1, 1)),
}
ENCODER_PRESETS: dict[str, EncoderConfig] = {
    "mochi-1-preview": EncoderConfig(),
    "tiny": EncoderConfig(base_channels=32, channel_multipliers=(1, 1, 1, 1), num_res_blocks=(1, 1, 1, 1, 1)),
}


def num_frames_for_latents(t: int) -> int:
    """t latent frames decode to 6t−5 video frames."""
    if t < 1:
        raise ValueError(f"latent frame count {t} is invalid: the decoder needs at least 1 latent frame")
    return TEMPORAL_FACTOR * (t - 1) + 1


def num_latents_for_frames(frames: int) -> int:
    """6k+1 video frames encode to k+1 latent frames; any other count is a ValueError."""
    if frames < 1 or (frames - 1) % TEMPORAL_FACTOR:
        low = TEMPORAL_FACTOR * ((frames - 1) // TEMPORAL_FACTOR) + 1
        nearest = f"{low} or {low + 6}" if low >= 1 else "7" if frames > 1 else "1 or 7"
        raise ValueError(
            f"frame count {frames} is invalid: the VAE needs 6k+1 frames (1, 7, 13, …, 163); "
            f"nearest: {nearest}"
        )
    return (frames - 1) // TEMPORAL_FACTOR + 1


def check_frame_size(height: int, width: int, multiple: int = SPATIAL_FACTOR) -> None:
    """Raise ValueError unless height and width are positive multiples of `multiple` (8 for the VAE)."""
    for name, v in (("height", height), ("width", width)):
        if v < multiple or v % multiple:
            low = max(multiple, v // multiple * multiple)
            high = low if v < multiple else low + multiple
            nearest = f"{low}" if low == high else f"{low} or {high}"
            raise ValueError(
                f"{name} {v} is invalid: it must be a multiple of {multiple}; nearest: {nearest}"
            )


class Decoder(nn.Module):
    """Latents in VAE space → RGB in about [−1, 1]: (B, 12, t, h, w) → (B, 3, 6t−5, 8h, 8w).

    blocks.0 = [Conv3d 1³ 12→768, ResBlock×3]; blocks.1..3 = upsample (te 3, 2, 1; se 2);
    blocks.4 = ResBlock×3; then SiLU and output_proj (Conv1x1 128→3). No attention.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        nrb = cfg.num_res_blocks
        n_up = len(ch) - 1
        if len(nrb) != n_up + 2 or len(cfg.temporal_expansions) != n_up:
            raise ValueError(f"decoder config {cfg} is inconsistent: needs {n_up + 2} res-block counts")
        first: list[nn.Module] = [nn.Conv3d(cfg.latent_dim, ch[-1], kernel_size=1)]
        blocks: list[nn.Module] = [nn.ModuleList(first + [ResBlock(ch[-1]) for _ in range(nrb[-1])])]
        for i in range(n_up):
            te, se = cfg.temporal_expansions[-i - 1], cfg.spatial_expansions[-i - 1]
            blocks.append(CausalUpsampleBlock(ch[-i - 1], ch[-i - 2], nrb[-i - 2], te, se))
        blocks.append(nn.ModuleList([ResBlock(ch[0]) for _ in range(nrb[0])]))
        self.blocks = nn.ModuleList(blocks)
        self.output_proj = Conv1x1(ch[0], cfg.out_channels)

    def forward(self, z: Tensor, ctx: CausalContext | None = None) -> Tensor:
        """z: (B, 12, t, h, w) → (B, 3, T, 8h, 8w); T = 6t−5 for the first chunk, 6t for later ones."""
        ctx = ctx or CausalContext(carry=False)
        x = z.to(self.output_proj.weight.dtype)
        for block in self.blocks:
            if isinstance(block, CausalUpsampleBlock):
                x = block(x, ctx)
                continue
            for layer in block:
                x = layer(x, ctx) if isinstance(layer, ResBlock) else layer(x)
        x = self.output_proj(torch.nn.functional.silu(x, inplace=True))
        ctx.started = True
        return x


class Encoder(nn.Module):
    """RGB in [−1, 1] → latent mean and log-variance: (B, 3, T, H, W) → 2 × (B, 12, t, H/8, W/8).

    T = 6k+1 gives t = k+1. The 15-channel Fourier input is computed inside (fp32). layers.0 = Conv1x1
    15→64; layers.1..3 ResBlocks; layers.4..6 downsample (te 1, 2, 3; se 2) with causal temporal
    attention; layers.7..9 ResBlocks with attention; output_norm, SiLU, output_proj (no bias) → 24.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        nrb, att = cfg.num_res_blocks, cfg.has_attentions
        n_down = len(ch) - 1
        if len(nrb) != n_down + 2 or len(att) != n_down + 2 or len(cfg.temporal_reductions) != n_down:
            raise ValueError(f"encoder config {cfg} is inconsistent: needs {n_down + 2} res-block counts")
        layers: list[nn.Module] = [Conv1x1(cfg.in_channels, ch[0])]
        layers += [ResBlock(ch[0], att[0]) for _ in range(nrb[0])]
        for i in range(n_down):
            te, se = cfg.temporal_reductions[i], cfg.spatial_reductions[i]
            layers.append(DownsampleBlock(ch[i], ch[i + 1], nrb[i + 1], te, se, att[i + 1]))
        layers += [ResBlock(ch[-1], att[-1]) for _ in range(nrb[-1])]
        self.layers = nn.ModuleList(layers)
        self.output_norm = GroupNormSpatial(ch[-1])
        self.output_proj = Conv1x1(ch[-1], 2 * cfg.latent_dim, bias=False)

    def forward(self, x: Tensor, ctx: CausalContext | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, 3, T, H, W) in [−1, 1] → (mean, logvar), each (B, 12, t, H/8, W/8)."""
        ctx = ctx or CausalContext(carry=False)
        h = fourier_features(x).to(self.output_proj.weight.dtype)
        for layer in self.layers:
            h = layer(h) if isinstance(layer, Conv1x1) else layer(h, ctx)
        h = self.output_proj(torch.nn.functional.silu(self.output_norm(h), inplace=True))
        ctx.started = True
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar
