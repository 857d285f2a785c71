"""The cap on work per job, and its defaults (importable without the serve extra, for `mochi --help`).

Two products bound a job: frames x height x width (the pixels, which bound the tokens one DiT call sees, so
how long one module call and hence a cancel can take, and the size of the decode) and that times the steps
(the whole job). Above either, a request is refused with the largest frame or step count that fits.
"""

from __future__ import annotations

from mochi.request import GenerationRequest

# On a GPU: the released model's 163 frames at 720x1280 (its own default is 163 x 480 x 848), at 64 steps.
MAX_PIXELS = 163 * 720 * 1280
MAX_PIXEL_STEPS = MAX_PIXELS * 64
# On a CPU, where the VAE decode runs as one chunk and its longest call (one convolution over the whole clip
# at full resolution) grows with the pixels: 25 x 128 x 128 (or 97 frames at the embedded model's 64 x 64)
# keeps it near a second on one busy thread (benchmarks/serve_cancel_latency.py; docs/serve.md).
CPU_MAX_PIXELS = 25 * 128 * 128
CPU_MAX_PIXEL_STEPS = CPU_MAX_PIXELS * 64


def default_caps(device_type: str) -> tuple[int, int]:
    """(max pixels, max pixel-steps) per job by default on a device of ``device_type`` ("cpu", "cuda"...)."""
    if device_type == "cpu":
        return CPU_MAX_PIXELS, CPU_MAX_PIXEL_STEPS
    return MAX_PIXELS, MAX_PIXEL_STEPS


def check_work(request: GenerationRequest, max_pixels: int, max_pixel_steps: int) -> None:
    """Refuse (ValueError) a resolved request whose frames x height x width exceed ``max_pixels`` or whose
    pixels x steps exceed ``max_pixel_steps``, naming the largest frame count or step count that fits."""
    area = request.height * request.width
    pixels = request.frames * area
    steps = len(request.sigmas) - 1 if request.sigmas is not None else request.steps
    if pixels > max_pixels:
        frames = (max_pixels // area - 1) // 6 * 6 + 1
        fits = (
            f"at most {frames} frames at {request.width}x{request.height}"
            if frames >= 1
            else "a smaller size"
        )
        raise ValueError(
            f"frames x height x width = {request.frames}x{request.height}x{request.width} = {pixels} pixels "
            f"exceeds this server's limit of {max_pixels} per job; ask for {fits}"
        )
    if pixels * steps > max_pixel_steps:
        raise ValueError(
            f"{pixels} pixels x {steps} steps = {pixels * steps} exceeds this server's limit of "
            f"{max_pixel_steps} pixel-steps per job; ask for at most {max(1, max_pixel_steps // pixels)} "
            "steps"
        )
