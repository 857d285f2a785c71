"""Noise-level (sigma) schedules: pure functions returning plain lists of floats, 1 → 0.

Convention (genmo-mochi.md §3.2): z_σ = (1 − σ)·x0 + σ·ε, so σ = 1 is pure noise and σ = 0 the clean latent.
A schedule of n steps has n + 1 values; step i integrates from sigmas[i] to sigmas[i + 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def linear_quadratic_schedule(
    num_steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> list[float]:
    """Genmo's schedule (genmo-mochi.md §3.1): ``num_steps + 1`` sigmas from 1.0 down to 0.0.

    The first ``linear_steps`` (default ``num_steps // 2``) lower σ linearly from 1 to 1 − threshold_noise;
    a quadratic, continuous in value and slope, then takes it to 0. The arithmetic is Genmo's, in the same
    order, so every value is bit-identical to the reference (and to diffusers', which omits the final 0).
    ``num_steps=1`` gives [1.0, 0.0] (the reference divides by zero there).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}; the default is 64")
    if not 0.0 < threshold_noise < 1.0:
        raise ValueError(
            f"threshold_noise must lie strictly between 0 and 1, got {threshold_noise}; Genmo uses 0.025"
        )
    if num_steps == 1:
        if linear_steps not in (None, 0):
            raise ValueError(
                f"linear_steps={linear_steps} needs num_steps > {linear_steps}; with 1 step use None"
            )
        return [1.0, 0.0]
    if linear_steps is None:
        linear_steps = num_steps // 2
    if not 1 <= linear_steps < num_steps:
        nearest = min(max(linear_steps, 1), num_steps - 1)
        raise ValueError(
            f"linear_steps must be at least 1 and below num_steps={num_steps}, got {linear_steps}; "
            f"nearest valid: {nearest} (default num_steps // 2 = {num_steps // 2})"
        )
    n, tau, lin = num_steps, threshold_noise, linear_steps
    try:
        return validate_sigmas(_schedule(n, tau, lin))
    except ValueError as e:
        raise ValueError(
            f"{e}: the quadratic part does not fall steadily to 0; nearest valid: "
            f"{nearest_settings(n, tau, lin)}"
        ) from None


def nearest_settings(num_steps: int, threshold_noise: float, linear_steps: int) -> str:
    """For a ``threshold_noise`` and ``linear_steps`` (in [1, num_steps)) whose quadratic part does not fall
    steadily to 0: the nearest settings that make a schedule, each changing one of them, as
    "threshold_noise=0.67 or linear_steps=35"."""
    n, tau, lin = num_steps, threshold_noise, linear_steps
    threshold, linear = _largest_threshold(n, lin, tau), _nearest_linear_steps(n, tau, lin)
    return f"threshold_noise={threshold:g} or linear_steps={linear}"


def _schedule(n: int, tau: float, lin: int) -> list[float]:
    """The ``n + 1`` sigmas, unchecked, in Genmo's arithmetic and order."""
    linear = [i * tau / lin for i in range(lin)]
    step_diff = lin - tau * n
    quad_steps = n - lin
    quad_coef = step_diff / (lin * quad_steps**2)
    lin_coef = tau / lin - 2 * step_diff / (quad_steps**2)
    const = quad_coef * (lin**2)
    quadratic = [quad_coef * (i**2) + lin_coef * i + const for i in range(lin, n)]
    return [1.0 - s for s in [*linear, *quadratic, 1.0]]


def _rises(n: int, tau: float, lin: int) -> bool:
    """Whether the schedule's 1 − σ rises at every step, in exact arithmetic: the quadratic's smallest
    step, its last, a·(2n − 1) + b, is positive, i.e. τ·Q² + (L − τ·n)·(2Q − 1) > 0 with Q = n − L."""
    q = n - lin
    return tau * q * q + (lin - tau * n) * (2 * q - 1) > 0


def _valid(n: int, tau: float, lin: int) -> bool:
    try:
        validate_sigmas(_schedule(n, tau, lin))
    except ValueError:
        return False
    return True


def _largest_threshold(n: int, lin: int, tau: float) -> float:
    """The largest threshold_noise below ``tau``, to 3 significant digits, that makes a schedule."""
    q = n - lin
    bound = min(tau, lin * (2 * q - 1) / (n * (2 * q - 1) - q * q))  # where _rises turns false
    unit = 10.0 ** (math.floor(math.log10(bound)) - 2)
    candidate = math.floor(bound / unit) * unit
    while candidate > unit and not _valid(n, float(f"{candidate:.3g}"), lin):  # rounding at the bound
        candidate -= unit
    return float(f"{candidate:.3g}")


def _nearest_linear_steps(n: int, tau: float, lin: int) -> int:
    """The linear_steps nearest ``lin`` that make a schedule (n − 1 always does)."""
    for candidate in sorted(range(1, n), key=lambda k: abs(k - lin)):  # the lower first at a tie
        if _rises(n, tau, candidate) and _valid(n, tau, candidate):
            return candidate
    return n - 1


def validate_sigmas(sigmas: Sequence[float]) -> list[float]:
    """Check a custom schedule: at least 2 finite values in [0, 1], strictly decreasing. Returns a float list.

    A schedule may start below 1 (video-to-video) and may end above 0 (leaving some noise in the result).
    """
    values = [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError(
            f"a sigma schedule needs at least 2 values (one step), got {values}; e.g. [1.0, 0.0]"
        )
    for i, s in enumerate(values):
        if not math.isfinite(s) or not 0.0 <= s <= 1.0:
            raise ValueError(
                f"sigma[{i}] = {s} is outside [0, 1]; sigmas run from 1.0 (noise) to 0.0 (clean)"
            )
    for i in range(len(values) - 1):
        if values[i + 1] >= values[i]:
            raise ValueError(
                f"sigmas must be strictly decreasing, but sigma[{i}] = {values[i]} and sigma[{i + 1}] = "
                f"{values[i + 1]}; a schedule runs from 1.0 down to 0.0"
            )
    return values


def truncate_schedule(sigmas: Sequence[float], start_sigma: float) -> list[float]:
    """The tail of ``sigmas`` below ``start_sigma``, led by ``start_sigma`` itself (for video-to-video).

    Sampling it from ``noise_to(z0, start_sigma, ε)`` keeps ``z0``'s content in proportion 1 − start_sigma.
    """
    values = validate_sigmas(sigmas)
    if not values[-1] < start_sigma <= values[0]:
        raise ValueError(
            f"start_sigma must lie in ({values[-1]}, {values[0]}] to leave at least one step, "
            f"got {start_sigma}"
        )
    return [float(start_sigma), *(s for s in values if s < start_sigma)]
