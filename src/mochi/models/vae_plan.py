"""The split a pipeline decodes (and encodes) with: a function of the request, never of free memory.

Spatial tiles blend approximately and temporal chunks are exact only to float rounding, so the split
changes the pixels: near tile seams by tens of levels, more the smaller the tiles (the embedded decoder: up
to 43/255 at 16-cell tiles, 73/255 at 7-cell ones, and past 100/255 on a 16-pixel-high strip split into
7-cell tiles at a 4 MB budget), and by a level here and there for chunks. The split is
therefore planned from a fixed budget, ``DEFAULT_VAE_BUDGET`` (or the user's ``--max-memory``), and the
latent shape alone: the same request gives the same split, and so the same video, on any machine. Only
when the device has less free memory than that split needs does the pipeline take a smaller one, with a
warning; either way the split used is returned for the sidecar.
"""

from __future__ import annotations

import warnings

from mochi.models.vae import Decoder, Encoder
from mochi.models.vae_memory import estimate_decode_memory, estimate_encode_memory
from mochi.models.vae_tiling import Plan, on_cpu, plan_decode, plan_encode

# Bytes of activations and output the default split may use: what a 24 GB GPU has left for the VAE with
# --offload. The released decoder in fp32 then decodes 848x480x163 as one tile, one latent frame at a time.
DEFAULT_VAE_BUDGET = 12 * 10**9


def plan_record(plan: Plan, budget: int) -> dict:
    """The sidecar's account of a split: tile (h, w) and overlap in latent cells, chunk in latent frames."""
    return {"tile": list(plan.tile), "overlap": plan.overlap, "chunk": plan.chunk, "budget": budget}


def choose_plan(
    module: Decoder | Encoder,
    latent_shape: tuple[int, int, int, int],
    max_memory: int | None = None,
    available: int | None = None,
    cpu: bool | None = None,
) -> tuple[Plan, dict]:
    """(split, record) for decoding (``module`` a Decoder) or encoding a (B, t, h, w) latent.

    max_memory: the user's budget in bytes (default ``DEFAULT_VAE_BUDGET``, doubled until some split fits,
    for videos whose output alone exceeds it). available: bytes free on the
    device now; consulted only without ``max_memory``, and only to fall back when the default split would
    not fit: first to shorter chunks over the same tiles, then to smaller tiles (with a warning). cpu:
    whether it runs on the CPU (default: whether the module's weights are there).
    """
    decoding = isinstance(module, Decoder)
    planner = plan_decode if decoding else plan_encode
    dtype = module.output_proj.weight.dtype
    estimate = estimate_decode_memory if decoding else estimate_encode_memory
    budget = DEFAULT_VAE_BUDGET if max_memory is None else max_memory
    cpu = on_cpu(module) if cpu is None else cpu
    while True:
        try:
            plan = planner(module, latent_shape, budget, cpu=cpu)
            break
        except ValueError:
            # A video whose output alone exceeds the default budget: double it, still a function of the
            # request alone. A budget the user gave is theirs to change.
            if max_memory is not None or budget > 2**50:
                raise
            budget *= 2
    record = plan_record(plan, budget)
    need = estimate(module.cfg, latent_shape, plan.tile, plan.chunk, dtype, cpu)
    if max_memory is not None or available is None or need <= available:
        return plan, record
    default = plan
    try:
        plan = planner(module, latent_shape, available, tile=plan.tile, cpu=cpu)
    except ValueError:
        plan = planner(module, latent_shape, available, cpu=cpu)
    record = {**plan_record(plan, available), "default": plan_record(default, budget)}
    warnings.warn(
        f"VAE {'decode' if decoding else 'encode'}: the default split (tile {default.tile}, chunk "
        f"{default.chunk}) needs about {need / 1e9:.1f} GB but {available / 1e9:.1f} GB are free; using tile "
        f"{plan.tile}, chunk {plan.chunk}, so the video differs slightly from other runs of this request "
        "(the sidecar records the split; --max-memory fixes one)",
        stacklevel=2,
    )
    return plan, record


def split_options(plan: Plan) -> dict:
    """``mochi.models.vae_tiling.decode``/``encode`` keyword arguments that reproduce ``plan``."""
    return {"tile": plan.tile, "overlap": plan.overlap, "chunk": plan.chunk}
