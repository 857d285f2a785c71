"""TeaCache's rescale polynomial: fitted per model, stored beside its weights, found again at load time.

TeaCache decides from how much the first block's modulated input changed between steps, but what matters
is how much the model's *output* changes; the relation depends on the model, so a polynomial fitted on
a few uncached runs maps one to the other (Liu et al. 2024, §3.3). ``calibrate`` records the (input
change, output change) pair of every step after the first, ``fit`` fits a degree-4 polynomial by least
squares, and ``save_coefficients`` writes a small JSON:

    {"format": "mochi-teacache", "model": ..., "dit_config": {...}, "coefficients": [highest power first],
     "fit": {"runs": ..., "points": ..., "r2": ..., "seed": ..., "prompts": [one per run], "lora": ...,
             "steps": ..., "guidance": ..., "frames": ..., "width": ..., "height": ...}}

Only "format", "dit_config" and "coefficients" are read back; "fit" records how they were made (files
written before it named the steps, guidance and size hold only runs to lora).

Where the loader looks (``coefficients_path``): beside the asset for the embedded model
(``mochi/assets/mochi-tiny.teacache.json``, shipped), ``NAME.teacache.json`` beside a checkpoint file,
``teacache.json`` inside a checkpoint folder. Without a file, a DiT with the released architecture gets
TeaCache's published coefficients; any other gets the identity (the raw relative change) and a warning.
A file fitted for another architecture (``dit_config`` differs) is an error naming the difference.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from mochi.accel.cache import RELEASED_COEFFICIENTS, CacheSetting, StepCache
from mochi.models.dit import DiTConfig

FORMAT = "mochi-teacache"
DEGREE = 4
MIN_RUNS = 2
# Each run is a whole uncached generation; the packaged fit took 8. More than this is a typo (and past 2**63
# the seeds seed + i ran out, which was reported as a --seed range [0, negative]).
MAX_RUNS = 10_000
DEFAULT_PROMPTS = (
    "a red circle moving right",
    "a blue square moving up on a gray background",
    "a yellow triangle moving left",
    "a green circle moving down on a gray background",
)


def coefficients_path(model: str | os.PathLike) -> Path:
    """Where the coefficients of the checkpoint ``model`` live (the embedded bundle's: beside it)."""
    path = Path(model)
    return path / "teacache.json" if path.is_dir() else path.with_suffix(".teacache.json")


def _json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words: "a list", "null", "a string"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    kinds = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def load_coefficients(path: str | os.PathLike, config: DiTConfig | None) -> list[float]:
    """The polynomial in ``path``; ValueError when the file is not a coefficient file as
    `save_coefficients` writes it (``DEGREE + 1`` finite numbers) or was fitted for a DiT of another
    architecture than ``config`` (None: the model is not loaded yet, only the file's form is checked)."""
    name = str(path)
    remedy = "write one with `mochi calibrate-cache`"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(
            f"{name!r} is not a {FORMAT} coefficient file (not UTF-8 JSON text); {remedy}"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{name!r} is not a {FORMAT} coefficient file (not JSON: {e.msg} at line {e.lineno} column "
            f"{e.colno}); {remedy}"
        ) from None
    except RecursionError:
        raise ValueError(
            f"{name!r} is not a {FORMAT} coefficient file (JSON nested too deeply); {remedy}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{name!r} is not a {FORMAT} coefficient file (its top level is {_json_kind(data)}, not an "
            f"object with format, dit_config and coefficients); {remedy}"
        )
    if data.get("format") != FORMAT or "coefficients" not in data:
        raise ValueError(f"{name!r} is not a {FORMAT} coefficient file (no format/coefficients)")
    want = DEGREE + 1
    coefficients = data["coefficients"]
    if not isinstance(coefficients, list) or len(coefficients) != want:
        got = f"{len(coefficients)}" if isinstance(coefficients, list) else _json_kind(coefficients)
        raise ValueError(
            f"cache coefficients {name!r}: 'coefficients' must be a list of {want} numbers (the "
            f"degree-{DEGREE} polynomial, highest power first), got {got}; {remedy}"
        )
    bad = [i for i, c in enumerate(coefficients) if not _finite_number(c)]
    if bad:
        i = bad[0]
        raise ValueError(
            f"cache coefficients {name!r}: coefficient {i} is {json.dumps(coefficients[i])[:40]}; all {want} "
            f"must be finite numbers; {remedy}"
        )
    theirs = data.get("dit_config")
    if not isinstance(theirs, dict):
        raise ValueError(
            f"cache coefficients {name!r}: 'dit_config' must be an object of the DiT's settings, got "
            f"{_json_kind(theirs) if 'dit_config' in data else 'none'}; {remedy}"
        )
    if config is None:
        return [float(c) for c in coefficients]
    ours = asdict(config)
    differ = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if differ:
        shown = ", ".join(f"{k}={a} (model: {b})" for k, (a, b) in sorted(differ.items())[:4])
        raise ValueError(
            f"cache coefficients {name!r} were fitted for another model ({shown}); "
            "run `mochi calibrate-cache` for this one"
        )
    return [float(c) for c in coefficients]


class UncalibratedWarning(UserWarning):
    """A TeaCache run on a model with no calibration: thresholds apply to the raw input change."""


UNCALIBRATED = "identity (uncalibrated)"  # find_coefficients' source for a model with no calibration


def uncalibrated_message(absent: str) -> str:
    """What is said of a TeaCache run on a model whose calibration file ``absent`` (as shown) is missing."""
    return (
        f"no TeaCache calibration for this model ({absent} is absent): thresholds apply to the raw input "
        "change; run `mochi calibrate-cache` for calibrated ones"
    )


def find_coefficients(model: str | os.PathLike | None, config: DiTConfig) -> tuple[list[float], str]:
    """(coefficients, where they came from) for ``model``'s TeaCache (see the module doc); ``model`` None:
    components built in memory, which have no file."""
    path = coefficients_path(model) if model is not None else None
    if path is not None and path.is_file():
        return load_coefficients(path, config), str(path)
    if config == DiTConfig():
        return list(RELEASED_COEFFICIENTS), "published (TeaCache4Mochi)"
    if path is not None:
        warnings.warn(uncalibrated_message(str(path)), UncalibratedWarning, stacklevel=2)
    return [1.0, 0.0], UNCALIBRATED


def negative_span(coefficients: Sequence[float], lo: float, hi: float) -> tuple[float, float] | None:
    """The part of [lo, hi] where the polynomial is below zero (first to last such point of 1001), or None.
    TeaCache adds the polynomial's value up to a threshold: negative there, a large change of the input
    would bring a skip nearer instead of forcing a pass."""
    xs = np.linspace(lo, hi, 1001)
    below = xs[np.polyval(np.asarray(coefficients, dtype=np.float64), xs) < 0]
    return (float(below[0]), float(below[-1])) if below.size else None


def save_coefficients(
    path: str | os.PathLike, coefficients: Sequence[float], config: DiTConfig, model: str, fit: dict
) -> None:
    from mochi.files import atomic_write_text

    data = {
        "format": FORMAT,
        "model": model,
        "dit_config": asdict(config),
        "coefficients": [float(c) for c in coefficients],
        "fit": fit,
    }
    atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")


def fit(trace: Sequence[tuple[float, float]], degree: int = DEGREE) -> tuple[list[float], float]:
    """Least-squares polynomial output_change ≈ p(input_change); returns (coefficients, R²)."""
    if len(trace) < degree + 2:
        raise ValueError(
            f"calibration has {len(trace)} (input, output) pairs; a degree-{degree} fit needs at least "
            f"{degree + 2}: use more runs or steps"
        )
    x, y = np.array(trace, dtype=np.float64).T
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    r2 = 1.0 - float(residual @ residual) / max(float(((y - y.mean()) ** 2).sum()), 1e-30)
    return [float(c) for c in coefficients], r2


def check_points(runs: int, steps: int, degree: int = DEGREE) -> None:
    """ValueError unless ``runs`` runs of ``steps`` steps give the fit enough points (each step after the
    first gives one), naming the fewest runs that would at these steps."""
    points = runs * (steps - 1)
    if points < degree + 2:
        fewest = -(-(degree + 2) // (steps - 1)) if steps > 1 else None
        fix = f"use at least {fewest} runs at {steps} steps" if fewest else "use at least 2 steps"
        raise ValueError(
            f"{runs} runs of {steps} steps give {points} (input, output) pairs; a degree-{degree} fit needs "
            f"at least {degree + 2}: {fix}"
        )


@torch.inference_mode()
def calibrate(pipe, prompts: Sequence[str], runs: int, seed: int = 0, **request: object) -> dict:  # noqa: ANN001
    """Run ``runs`` uncached denoising runs (prompt i mod len, seed ``seed + i``) of ``pipe`` (a
    ``MochiPipeline``; ``request``: GenerationRequest fields such as steps, guidance, frames), recording
    every step's (input change, output change); returns the fit as a dict with ``coefficients``, ``r2``,
    ``points``, ``trace``, the ``prompts`` of the runs made (one per run) and the resolved request the runs
    shared: ``steps``, ``guidance``, ``frames``, ``width``, ``height``. ValueError for fewer than
    ``MIN_RUNS`` runs. Nothing is decoded."""
    if runs < MIN_RUNS:
        raise ValueError(
            f"calibration needs at least {MIN_RUNS} uncached runs (one run gives one noisy curve), got "
            f"{runs}; nearest valid: {MIN_RUNS}"
        )
    if runs > MAX_RUNS:
        raise ValueError(
            f"calibration runs {runs:,} uncached runs, more than {MAX_RUNS:,} (the packaged fit used 8); "
            f"nearest valid: {MAX_RUNS}"
        )
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    from mochi.offload import offloaded
    from mochi.request import GenerationRequest, check_frames
    from mochi.sampling.sampler import guidance_schedule, initial_noise, sample

    first = GenerationRequest(prompts[0], seed=seed, **request).resolved(pipe.components.defaults)
    check_points(runs, first.steps)

    trace: list[tuple[float, float]] = []
    dit = pipe.components.dit
    for i in range(runs):
        # The Euler sampler: the one a cached request runs (GenerationRequest.resolved); a cache skips no step
        # of an ancestral run.
        req = GenerationRequest(prompt=prompts[i % len(prompts)], seed=seed + i, eta=0.0, **request)
        req = req.resolved(pipe.components.defaults)
        sigmas = pipe._sigmas(req)
        guided = any(g != 1.0 for g in guidance_schedule(req.guidance, len(sigmas) - 1))
        texts = [req.prompt] + ([req.negative_prompt] if guided else [])
        # Named as the pipeline names them: a truncation warning called the negative prompt "prompt 1".
        feats, mask = pipe.encode_text(texts, [f"prompt {i % len(prompts)}", "negative prompt"])
        shape = (1, 12, check_frames(req.frames), req.height // 8, req.width // 8)
        recorder = StepCache(dit, CacheSetting("teacache", 1.0), sigmas=sigmas, record=True)
        null = (feats[1:], mask[1:]) if guided else None
        z = initial_noise(shape, req.seed, device=pipe.device)
        with offloaded(dit, pipe.device, pipe.offload_mode):  # block offload streams, as in generate
            sample(recorder, z, sigmas, (feats[:1], mask[:1]), null, guidance=req.guidance)
        trace += recorder.stats.trace
    coefficients, r2 = fit(trace)
    # Only prompt and seed differ between runs, so the first run's resolved request names the others'.
    used = {k: getattr(first, k) for k in ("steps", "guidance", "frames", "width", "height")}
    ran = [prompts[i % len(prompts)] for i in range(runs)]
    return {
        "coefficients": coefficients,
        "r2": r2,
        "points": len(trace),
        "trace": trace,
        "prompts": ran,
        **used,
    }
