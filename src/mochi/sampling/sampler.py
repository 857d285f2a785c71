"""The rectified-flow Euler sampler with classifier-free guidance (genmo-mochi.md §3.2–3.4).

An ancestral variant (``eta`` > 0; not part of Genmo's sampler, off in ``sample`` by default, and the embedded
model's default through its bundle's request defaults) re-noises at each step: it moves to σ_next along the
step's estimate x0 = z + σ·v, and replaces a share η of the step's noise
estimate ε = z − (1 − σ)·v with fresh noise, keeping unit variance (√(1 − η²)·ε + η·ξ). At η = 0 this is
the Euler step; at η = 1 it draws each step's noise afresh, as ancestral samplers elsewhere (ComfyUI's
``euler_ancestral`` for flow models, diffusers' ``stochastic_sampling``) do. Fresh noise comes from each
video's own seed and the step index (``step_noise``), so one seed still gives one video.

The denoiser is any callable ``model(x, sigma, text, text_mask) -> v``:
x (B, C, T, H, W), sigma (B,) float32, text (B, L, D), text_mask (B, L) bool → v (B, C, T, H, W), where
v estimates x0 − ε (Genmo's sign). The sampler knows nothing of the DiT: timestep scaling, autocast and
attention are the model's business. Latents stay float32 throughout, as in Genmo. During each call
``GUIDANCE_PASS`` says which guidance pass it computes, for denoisers that keep state per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar

import numpy as np
import torch

from mochi.sampling.schedules import validate_sigmas

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ProgressCallback = Callable[[int, int, float], None]
# The pass the denoiser call under way computes: "cond" (the prompt; also a step whose guidance is 1.0),
# "uncond" (the negative prompt) or "cond+uncond" (both in one batched forward); None outside ``sample``.
# A step cache keeps one cache per pass by it: a negative prompt equal to the prompt makes the two passes'
# inputs alike, so nothing in the call itself tells them apart.
GUIDANCE_PASS: ContextVar[str | None] = ContextVar("GUIDANCE_PASS", default=None)


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in fp32: uncond + scale·(cond − uncond) (genmo-mochi.md §3.3)."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + scale * (cond - uncond)


def euler_step(z: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step from σ to σ_next < σ: z + (σ − σ_next)·v, with v = x0 − ε."""
    return z + (sigma - sigma_next) * v


def step_noise(
    shape: Sequence[int], seed: int, step: int, device: str | torch.device = "cpu", row: int = 0
) -> torch.Tensor:
    """The ancestral sampler's fresh noise for ``step`` (0-based) of a video seeded ``seed``: float32 of
    ``shape``, drawn on the CPU from a generator seeded with a hash of (seed, step) — not ``seed + k``, which
    would repeat another seed's initial noise. ``row`` > 0 tells apart the videos of one batch that share a
    seed (the pipeline's prompts of one request)."""
    key = [int(seed), 1, int(step)] + ([int(row)] if row else [])
    state = np.random.SeedSequence(key).generate_state(1, np.uint64)
    generator = torch.Generator(device="cpu").manual_seed(int(state[0]))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device)


def check_eta(eta: float, eta_above: float) -> None:
    """The ancestral options' rules: η in [0, 1] and a σ threshold in [0, 1)."""
    if not 0.0 <= eta <= 1.0:
        nearest = 1.0 if eta > 1.0 else 0.0  # NaN too
        raise ValueError(
            f"eta={eta} must lie in [0, 1] (the share of fresh noise per step; 0 is the Euler sampler); "
            f"nearest valid: {nearest:g}"
        )
    if not 0.0 <= eta_above < 1.0:
        nearest = 0.99 if eta_above >= 1.0 else 0.0
        raise ValueError(
            f"eta_above={eta_above} must lie in [0, 1) (fresh noise only at steps whose σ is above it); "
            f"nearest valid: {nearest:g}"
        )


def initial_noise(
    shape: Sequence[int], seed: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn from a CPU generator seeded with ``seed``, then moved.

    Drawing on the CPU makes one seed give one video on every device (CUDA's Philox stream differs from the
    CPU's, so this does not reproduce Genmo's CUDA-seeded noise bit for bit; genmo-mochi.md §3.4).
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def noise_to(z0: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """The latent at noise level σ on the straight path from ``z0`` to ``noise``: (1 − σ)·z0 + σ·noise."""
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must lie in [0, 1], got {sigma}")
    if noise.shape != z0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from latent shape {tuple(z0.shape)}")
    return (1.0 - sigma) * z0.float() + sigma * noise.float()


def guidance_schedule(guidance: float | Sequence[float], num_steps: int) -> list[float]:
    """A guidance scale per step from a constant or a list of ``num_steps`` values."""
    if isinstance(guidance, int | float):
        return [float(guidance)] * num_steps
    values = [float(g) for g in guidance]
    if len(values) != num_steps:
        raise ValueError(
            f"guidance schedule has {len(values)} values but the sigma schedule has {num_steps} steps; "
            f"give one value per step or a single number"
        )
    return values


def _batch_text(
    text: torch.Tensor, mask: torch.Tensor, batch: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if text.ndim != 3 or mask.shape != text.shape[:2]:
        raise ValueError(
            f"{name} must be features (B, L, D) and mask (B, L), got {tuple(text.shape)} and "
            f"{tuple(mask.shape)}"
        )
    if text.shape[0] == batch:
        return text, mask.bool()
    if text.shape[0] == 1:
        return text.expand(batch, -1, -1), mask.bool().expand(batch, -1)
    raise ValueError(
        f"{name} has batch {text.shape[0]} but the latents have batch {batch}; give {batch} or 1"
    )


def _denoise(
    model: Denoiser, guidance_pass: str, x: torch.Tensor, sigma: torch.Tensor, text: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """``model(x, sigma, *text)`` with ``GUIDANCE_PASS`` set to ``guidance_pass`` for the call."""
    token = GUIDANCE_PASS.set(guidance_pass)
    try:
        return model(x, sigma, *text)
    finally:
        GUIDANCE_PASS.reset(token)


@torch.no_grad()
def sample(
    model: Denoiser,
    z: torch.Tensor,
    sigmas: Sequence[float],
    text: tuple[torch.Tensor, torch.Tensor],
    null_text: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    guidance: float | Sequence[float] = 6.0,
    batch_cfg: bool = True,
    callback: ProgressCallback | None = None,
    denoised: Callable[[int, int, torch.Tensor], None] | None = None,
    eta: float = 0.0,
    eta_above: float = 0.0,
    noise_seeds: Sequence[int | tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Integrate z from ``sigmas[0]`` to ``sigmas[-1]``; returns the final latent (B, C, T, H, W) float32.

    z: the starting latent at ``sigmas[0]`` (``initial_noise`` for text-to-video; ``noise_to(z0, σ0, noise)``
    with a ``truncate_schedule`` for video-to-video). text, null_text: (features (B or 1, L, D), mask (B or 1,
    L)) for the prompt and the negative prompt. guidance: one scale, or one per step; at a step whose scale
    is 1.0 the unconditional pass is skipped. batch_cfg: cond and uncond in one forward of batch 2B, ordered
    [cond, uncond] as Genmo's batched mode; False runs two forwards (cond, then uncond) as Genmo's CLI.
    callback(step, total, sigma) runs after each step with the count of steps done and the σ reached.
    denoised(step, total, x0) runs after each step with the step's estimate of the clean latent,
    x0 = z + σ·v (B, C, T, H, W) float32, a new tensor (previews; the result does not depend on it).
    eta, eta_above, noise_seeds: the ancestral variant (module docstring). At a step from σ > ``eta_above``
    to σ_next > 0, a share ``eta`` of the noise is drawn afresh, for row b from ``noise_seeds[b]``: a seed,
    or (seed, row) for rows that share one (``step_noise``). eta = 0 (the default) is the Euler sampler bit
    for bit.
    """
    sigmas = validate_sigmas(sigmas)
    check_eta(eta, eta_above)
    if eta > 0 and (noise_seeds is None or len(noise_seeds) != z.shape[0]):
        raise ValueError(
            f"eta={eta} needs one noise seed per video: got "
            f"{'none' if noise_seeds is None else len(noise_seeds)} for a batch of {z.shape[0]}"
        )
    keys = [k if isinstance(k, tuple) else (k, 0) for k in noise_seeds or ()]  # (seed, row) per row
    steps = len(sigmas) - 1
    scales = guidance_schedule(guidance, steps)
    batch = z.shape[0]
    cond = _batch_text(*text, batch, "text")
    if null_text is None:
        if any(s != 1.0 for s in scales):
            raise ValueError(
                "guidance other than 1.0 needs null_text (the negative prompt's features and mask)"
            )
        uncond = None
    else:
        uncond = _batch_text(*null_text, batch, "null_text")
    if uncond is not None and batch_cfg:
        both = (torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]]))

    z = z.float()
    for i in range(steps):
        sigma = sigmas[i]
        sigma_batch = torch.full((batch,), sigma, dtype=torch.float32, device=z.device)
        if uncond is None or scales[i] == 1.0:
            v = _denoise(model, "cond", z, sigma_batch, cond).float()
        elif batch_cfg:
            out = _denoise(
                model, "cond+uncond", torch.cat([z, z]), torch.cat([sigma_batch, sigma_batch]), both
            )
            v = apply_guidance(out[:batch], out[batch:], scales[i])
        else:
            v_cond = _denoise(model, "cond", z, sigma_batch, cond)
            v = apply_guidance(v_cond, _denoise(model, "uncond", z, sigma_batch, uncond), scales[i])
        if denoised is not None:
            denoised(i + 1, steps, z + sigma * v)
        sigma_next = sigmas[i + 1]
        if eta > 0 and sigma > eta_above and sigma_next > 0:
            row = (1, *z.shape[1:])
            fresh = torch.cat([step_noise(row, s, i, device=z.device, row=r) for s, r in keys])
            x0, noise = z + sigma * v, z - (1.0 - sigma) * v
            z = (1.0 - sigma_next) * x0 + sigma_next * ((1.0 - eta**2) ** 0.5 * noise + eta * fresh)
        else:
            z = euler_step(z, v, sigma, sigma_next)
        if callback is not None:
            callback(i + 1, steps, sigma_next)
    return z
