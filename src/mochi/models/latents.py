"""Per-channel latent statistics and the maps between VAE space and DiT space (genmo-mochi.md §2.4).

The DiT samples in normalised space; the VAE encodes to and decodes from raw space:
z_vae = z_dit·std + mean, z_dit = (z_vae − mean)/std. The constants are built in float32 and then cast
to the latent's dtype, as Genmo does.
"""

from __future__ import annotations

import torch
from torch import Tensor

LATENT_MEAN: tuple[float, ...] = (
    -0.06730895953510081,
    -0.038011381506090416,
    -0.07477820912866141,
    -0.05565264470995561,
    0.012767231469026969,
    -0.04703542746246419,
    0.043896967884726704,
    -0.09346305707025976,
    -0.09918314763016893,
    -0.008729793427399178,
    -0.011931556316503654,
    -0.0321993391887285,
)
LATENT_STD: tuple[float, ...] = (
    0.9263795028493863,
    0.9248894543193766,
    0.9393059390890617,
    0.959253732819592,
    0.8244560132752793,
    0.917259975397747,
    0.9294154431013696,
    1.3720942357788521,
    0.881393668867029,
    0.9168315692124348,
    0.9185249279345552,
    0.9274757570805041,
)


def _stats(z: Tensor) -> tuple[Tensor, Tensor]:
    if z.ndim != 5 or z.shape[1] != len(LATENT_MEAN):
        raise ValueError(
            f"latent shape {tuple(z.shape)} is invalid: expected (B, {len(LATENT_MEAN)}, t, h, w)"
        )
    mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD, dtype=torch.float32, device=z.device).view(1, -1, 1, 1, 1)
    return mean.to(z.dtype), std.to(z.dtype)


def dit_to_vae(z: Tensor) -> Tensor:
    """Normalised (DiT) latents (B, 12, t, h, w) → raw VAE latents, same shape and dtype."""
    mean, std = _stats(z)
    return z * std + mean


def vae_to_dit(z: Tensor) -> Tensor:
    """Raw VAE latents (B, 12, t, h, w), e.g. the encoder's mean → normalised (DiT) latents."""
    mean, std = _stats(z)
    return (z - mean) / std
