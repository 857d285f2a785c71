"""Training-free step caching: a denoiser wrapper that skips the DiT's blocks at steps where they would
change little, reusing the residual of the last full pass (docs/acceleration.md).

Two policies, both wrapped around the DiT from outside (the DiT never learns which step it is at; the
wrapper installs ``AsymmDiT.block_runner`` for the duration of each call):

* **TeaCache** (Liu et al. 2024, ali-vilab/TeaCache): before the blocks, the first block's *modulated visual
  input* RMSNorm(h)·(1 + scale_msa) is compared with the previous step's by relative L1 (mean |a − b| /
  mean |b|), mapped through a per-model rescale polynomial and accumulated; while the sum stays below the
  threshold the blocks are skipped and the visual residual (blocks' output − input) cached at the last full
  pass is added. A full pass resets the sum. The first and the last step of a trajectory always run.
  Difference from the reference: its cached residual ends after the final layer's modulated LayerNorm (it
  reuses the previous step's timestep modulation); ours ends at the blocks, so the final layer always runs
  with the current step's conditioning, at the cost of one (B, N, 2·dx) modulation.
* **First-block cache** (ParaAttention, diffusers' FirstBlockCache): block 0 always runs; its residual is
  compared by relative L1 with the residual at the last full pass; below the threshold the other blocks
  are skipped and their cached residual added. First and last step always run (diffusers does not force
  them; forcing costs two of the forwards and guards the final, detail-setting step).

Options shape where skips may fall (``CacheSetting``): a cap on consecutive skips, a σ window whose steps
always run (on the embedded model the steps where σ starts to fall fast set the layout; skipping one of
them alone costs a video up to 12 dB), and a residual extrapolated linearly in σ from the last two full
passes. None of them changes a run at threshold 0.

Batched classifier-free guidance: cond and uncond of one batched forward share one decision, from the
relative L1 pooled over the whole batch (as the TeaCache reference). Separate forwards (``batch_cfg=False``)
are separate *streams* with one cache each; streams are told apart by the pass the sampler says it runs
(``GUIDANCE_PASS``: a negative prompt equal to the prompt gives both passes the same inputs) and by the
call's batch size and text, so a guidance schedule's cond-only steps share the cond pass's stream under
separate forwards and are a stream of their own beside batched ones. A call at a σ not below the stream's
last one (with the schedule known: none of the steps after the stream's last) starts a new trajectory (the
wrapper can serve several ``sample`` calls).

Context/guidance parallelism: the metric's two sums are all-reduced over every rank before the decision, so
all ranks take the same decision, and padding rows of a sequence split are left out (they are not tokens).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mochi.ops.norms import modulated_rms_norm
from mochi.sampling.sampler import GUIDANCE_PASS

KINDS = ("none", "teacache", "fbcache")
# Rescale polynomial for the released Mochi 1 preview, highest power first (ali-vilab/TeaCache,
# TeaCache4Mochi/teacache_mochi.py).
RELEASED_COEFFICIENTS = (-3.51241319e03, 8.11675948e02, -6.09400215e01, 2.42429681e00, 3.05291719e-03)
# Named settings, measured in docs/acceleration.md. The TeaCache quality/fast ones are the reference's 1.5×
# and 2.1× settings for the released model (with a calibrated polynomial a threshold means a similar output
# change on any model); the first-block ones bracket 2× fewer forwards on the embedded model. "teacache:2x"
# and "fbcache:3x" add the options below, tuned on the embedded model (seeds 0-11): 2× fewer forwards with
# 380 of 384 videos ≥ 28 dB over eight seed sets (not all: docs/acceleration.md), and first-block caching
# ahead of diffusers' FirstBlockCache 0.15 at fewer forwards (on the embedded model before v2; on v2 it
# overshoots: docs/acceleration.md).
PRESETS: dict[str, tuple[str, float, str]] = {
    "teacache:quality": ("teacache", 0.06, ""),
    "teacache:fast": ("teacache", 0.09, ""),
    "teacache:2x": ("teacache", 0.15, "max-skips=3,keep=0.85-0.975,extrapolate=0.5"),
    "fbcache:quality": ("fbcache", 0.1, ""),
    "fbcache:fast": ("fbcache", 0.15, ""),
    "fbcache:3x": ("fbcache", 0.2, "extrapolate"),
}
DEFAULT_PRESET = {"teacache": "teacache:fast", "fbcache": "fbcache:fast"}
OPTIONS = ("max-skips=N", "keep=LO-HI", "extrapolate[=F]")
# How a number in a cache spec is spelled: ASCII digits, an optional sign, point and exponent. Python's float
# also reads "0_1" (as 1.0) and non-ASCII digits ("٠.١"), which a reader of the spec would not.
_PLAIN_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class CacheSetting:
    """What to cache: ``kind`` one of ``KINDS`` and its threshold (> 0, finite; None for "none"), and
    three options that shape where skips may fall:

    max_skips: at most this many consecutive skipped steps (≥ 1; None: no cap). keep: (lo, hi), every step
    whose σ lies in [lo, hi] runs in full (the steps where the layout forms; 0 ≤ lo ≤ hi ≤ 1). extrapolate:
    a skipped step adds the blocks' residual extrapolated linearly in σ from the last two full passes
    instead of the last one, the line's slope scaled by this factor (0: off; 1: the full line, written
    ``extrapolate``; 0 < F ≤ 1 written ``extrapolate=F``: a damped line that overshoots less on long runs).
    """

    kind: str = "none"
    threshold: float | None = None
    max_skips: int | None = None
    keep: tuple[float, float] | None = None
    extrapolate: float = 0.0

    @classmethod
    def parse(cls, name: str | None, threshold: float | None = None) -> CacheSetting:
        """From a kind ("teacache") or preset ("teacache:fast"), optionally followed by comma-separated
        options ("teacache,max-skips=3,keep=0.85-0.975,extrapolate"), and a threshold overriding the
        kind's or preset's.

        ValueError naming the valid choices for an unknown name or option and the valid range for a bad
        threshold or option value.
        """
        head, *options = [part.strip() for part in (name or "none").strip().lower().split(",")]
        kind_part, _, number = head.partition(":")
        if kind_part in KINDS and kind_part != "none" and _is_number(number):
            # "teacache:0.15": a kind with its threshold, as the sidecar's "cache" entry (str(setting)) reads.
            value = _plain_number(number, f"cache {head!r}: threshold")
            if not math.isfinite(value) or value <= 0:
                check_threshold(number)  # refused naming the number as written ("1e-400", not "0.0")
            if threshold is not None and threshold != value:
                raise ValueError(
                    f"cache {head!r} names threshold {number} and the cache threshold is "
                    f"{format_number(threshold)}; give one"
                )
            head, threshold = kind_part, value
        preset_options: list[str] = []
        if head in PRESETS:
            kind, preset, extra = PRESETS[head]
            preset_options = [o for o in extra.split(",") if o]
        elif head in KINDS:
            kind, preset = head, PRESETS[DEFAULT_PRESET[head]][1] if head != "none" else None
        else:
            choices = ", ".join([*KINDS, *PRESETS])
            raise ValueError(f"cache {head or name!r} is unknown; choose one of {choices}")
        if kind == "none":
            if threshold is not None:
                raise ValueError(
                    f"cache threshold {threshold} given without a cache; add --cache teacache or fbcache"
                )
            if options:
                raise ValueError(f"cache options {','.join(options)!r} given without a cache; add teacache")
            return cls()
        value = preset if threshold is None else check_threshold(threshold)
        # Options given after a preset override the preset's own.
        return cls(kind, value, **{**_parse_options(preset_options), **_parse_options(options)})

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def spec(self) -> str:
        """The kind and its options, without the threshold: what ``parse`` reads back to the same values."""
        parts = [self.kind]
        if self.max_skips is not None:
            parts.append(f"max-skips={self.max_skips}")
        if self.keep is not None:
            parts.append(f"keep={format_number(self.keep[0])}-{format_number(self.keep[1])}")
        if self.extrapolate == 1.0:
            parts.append("extrapolate")
        elif self.extrapolate:
            parts.append(f"extrapolate={format_number(self.extrapolate)}")
        return ",".join(parts)

    def __str__(self) -> str:
        if not self.enabled:
            return "none"
        kind, *options = self.spec.split(",")
        return ",".join([f"{kind}:{format_number(self.threshold)}", *options])


def format_number(value: float) -> str:
    """The shortest plain decimal that reads back as exactly ``value`` (0.1234567 → "0.1234567", 1.0 → "1",
    1e-05 → "0.00001"): no exponent, so that a σ in ``keep=LO-HI`` never carries a "-" of its own."""
    return np.format_float_positional(float(value), trim="-")


def _plain_number(text: str, what: str) -> float:
    """``float(text)`` for a number spelled plainly (``_PLAIN_NUMBER``); NaN for no number at all and the
    value for "inf"/"nan", both left to the caller's range check. ValueError naming ``what`` and the plain
    spelling of the value float() would read for other spellings ("0_1" silently read as 1.0)."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return math.nan
    if math.isfinite(value) and not _PLAIN_NUMBER.fullmatch(text):
        raise ValueError(
            f"{what} {text!r} must be a plain decimal number (ASCII digits and at most one '.', no '_'); "
            f"nearest: {format_number(value)}, the value it reads as"
        )
    return value


KEEP_TOLERANCE = 1e-6  # float32's spacing near 1 is 6e-8: a bound written in decimals includes its σ


def _parse_options(options: list[str]) -> dict:
    """``["max-skips=3", "keep=0.85-0.975", "extrapolate"]`` → CacheSetting's keyword arguments."""
    out: dict = {}
    named: set[str] = set()
    for option in options:
        key, _, value = option.partition("=")
        if key in named:  # the same option twice is a slip (the last one silently won)
            raise ValueError(f"cache option {key} is given twice ({option!r}); give it once")
        named.add(key)
        if key == "max-skips":
            if not (value.isascii() and value.isdigit()) or int(value) < 1:
                nearest = 1
                with contextlib.suppress(ValueError, OverflowError):  # "3.0", "2.5": the whole number near it
                    nearest = max(1, round(float(value)))  # inf: OverflowError, nan: ValueError
                raise ValueError(
                    f"cache option max-skips={value} must be a whole number ≥ 1; nearest: {nearest}"
                )
            out["max_skips"] = int(value)
        elif key == "keep":
            lo, _, hi = value.partition("-")
            keep = (
                _plain_number(lo, f"cache option keep={value}: σ"),
                _plain_number(hi, f"cache option keep={value}: σ"),
            )
            if not 0.0 <= keep[0] <= keep[1] <= 1.0:
                raise ValueError(
                    f"cache option keep={value} must be two σ values LO-HI with 0 ≤ LO ≤ HI ≤ 1, "
                    "e.g. keep=0.85-0.975"
                )
            out["keep"] = keep
        elif key == "extrapolate":
            factor = _plain_number(value, f"cache option extrapolate={value}: factor") if value else 1.0
            if not 0.0 < factor <= 1.0:
                nearest = (
                    "extrapolate=1"
                    if factor > 1.0
                    else "no extrapolate option (off)"
                    if factor <= 0.0
                    else "extrapolate=0.5"
                )
                raise ValueError(
                    f"cache option extrapolate={value} must be a factor F with 0 < F ≤ 1 (plain "
                    f"'extrapolate' is 1); nearest: {nearest}"
                )
            out["extrapolate"] = factor
        else:
            raise ValueError(f"cache option {option!r} is unknown; choose from {', '.join(OPTIONS)}")
    return out


def _is_number(text: str) -> bool:
    """Whether ``text`` reads as a number, "inf" and "nan" included: "teacache:inf" names a threshold, which
    ``check_threshold`` refuses by its rule (it was called an unknown cache)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_threshold(threshold: float) -> float:
    """A cache threshold must be a finite number > 0 (useful values lie around 0.02 to 0.3)."""
    shown = threshold
    try:
        value = float(threshold)
    except OverflowError:  # an int beyond float's range (10**400)
        digits = int(threshold.bit_length() * math.log10(2)) + 1  # str() of > 4300 digits raises
        value, shown = math.inf, f"an integer of about {digits} digits"
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"cache threshold {shown} must be a finite number > 0 (useful: 0.02 to 0.3); "
            "nearest valid: 0.02, or --cache none for exact results"
        )
    return value


@dataclass
class _Stream:
    """One trajectory's cache: the last probe (TeaCache input / FBCache first-block residual), the
    residual of the blocks at the last full pass, the accumulated change and the last σ seen."""

    sigma: float | None = None
    probe: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    residual_sigma: float | None = None
    previous: torch.Tensor | None = None  # the full pass before (extrapolate): residual and σ
    previous_sigma: float | None = None
    accumulated: float = 0.0
    output: torch.Tensor | None = None  # calibration: the previous DiT output
    calls: int = 0
    skips: int = 0  # consecutive skipped calls just before this one
    step: int | None = None  # the schedule index of the last call (None: unknown)


@dataclass
class CacheStats:
    """What one or more trajectories ran, per DiT call: full block passes (a batched CFG forward counts
    once, separate cond and uncond forwards twice), calls whose blocks were skipped, the step index of each
    skipped call, (step index, skipped) of every call, and the calibration trace. ``by_step`` counts per
    step instead, as the sidecar reports it."""

    forwards: int = 0
    skipped: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    calls: list[tuple[int, bool]] = field(default_factory=list)
    # (input change, output change) per call after a stream's first: what ``mochi calibrate-cache`` fits.
    trace: list[tuple[float, float]] = field(default_factory=list)

    def by_step(self) -> tuple[int, list[int], list[int]]:
        """Per denoising step, whether its cond and uncond ran as one batched forward or as two: how many
        steps ran the blocks in at least one call, the steps whose every call skipped them, and the steps
        where one call skipped them and another ran them (separate forwards, one cache each, can disagree).
        Over one trajectory (a pipeline request) the first count plus the skipped steps is the step count.
        """
        skips: dict[int, set[bool]] = {}
        for step, skipped in self.calls:
            skips.setdefault(step, set()).add(skipped)
        skipped = [step for step, seen in skips.items() if seen == {True}]
        partly = [step for step, seen in skips.items() if len(seen) == 2]
        return len(skips) - len(skipped), skipped, partly


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _valid_local_tokens() -> int | None:
    """Under a sequence split: how many of this rank's token rows are real tokens (None: all are)."""
    from mochi.parallel import sequence

    s = sequence._active
    if s is None:
        return None
    return max(0, min(s.local, s.tokens - s.rank * s.local))


def _first_scale(block: torch.nn.Module, c: torch.Tensor) -> torch.Tensor:
    """Block 0's scale_msa_x (B, 1, dx) from SiLU(conditioning) c (B, dx). Under FSDP2 (``--parallel-weights
    shard``) the block's weights are gathered for this call as its own forward would, then released; under
    block offload they are waited for (``mochi_ready``: loaded, and the side stream's copy done)."""
    ready = getattr(block, "mochi_ready", None)
    if ready is not None:
        ready()
    fsdp = callable(getattr(block, "unshard", None))
    if fsdp:
        block.unshard()
    try:
        # Under --devices block 0 may live on another device than the conditioning (placed by budget).
        device = next(block.mod_x.parameters()).device
        return block.mod_x(c.to(device))[:, None].chunk(4, dim=-1)[0]
    finally:
        if fsdp:
            block.reshard()


class StepCache:
    """A denoiser ``(x, sigma, text, mask) → v`` running ``dit`` with step caching.

    dit: the ``AsymmDiT`` whose blocks are skipped. model: what to call (default ``dit``; e.g.
    ``GuidanceParallel(dit)`` under guidance parallelism; it must end up calling ``dit``). setting: the
    policy; a threshold of 0 computes every step (for checks). coefficients: TeaCache's rescale polynomial,
    highest power first (default: identity, the raw relative L1). sigmas: the schedule, so the last step is
    always computed and skipped steps are reported by index. record: compute every step and record
    (raw input change, output change) pairs in ``stats.trace`` for calibration.
    """

    def __init__(
        self,
        dit: torch.nn.Module,
        setting: CacheSetting,
        *,
        model: Callable | None = None,
        coefficients: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        record: bool = False,
    ) -> None:
        if setting.kind not in ("teacache", "fbcache"):
            raise ValueError(f"StepCache needs a teacache or fbcache setting, got {setting}")
        self.dit, self.setting, self.model = dit, setting, model or dit
        self.rescale = np.poly1d(list(coefficients) if coefficients is not None else [1.0, 0.0])
        # As the sampler hands them over: float32 (so that the last step is recognised exactly).
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32).tolist() if sigmas is not None else None
        # The schedule as given, which ``keep`` compares (σ 0.7 is 0.69999999 in float32: below keep=0.7-0.9).
        self.schedule = [float(x) for x in sigmas] if sigmas is not None else None
        self.record = record
        self.streams: dict[tuple, _Stream] = {}
        self.stats = CacheStats()
        self._stream: _Stream | None = None
        self._force = False
        self._change: float | None = None

    def _key(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> tuple:
        lengths = tuple(mask.bool().sum(1).tolist())
        # The pass first: calls outside ``sample`` (None) are told apart by their inputs alone.
        return (GUIDANCE_PASS.get(), x.shape[0], tuple(x.shape[2:]), lengths, float(text.double().sum()))

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        stream = self.streams.setdefault(self._key(x, text, mask), _Stream())
        s = float(sigma.max())
        index = self._index(stream, s)
        # A new trajectory: σ did not fall, or (with the schedule known) is none of the steps after the
        # stream's last (steps whose σ float32 cannot tell apart, as --threshold-noise 1e-9 gives, follow on).
        if stream.sigma is not None and (index is None if stream.step is not None else s >= stream.sigma):
            self.streams[self._key(x, text, mask)] = stream = _Stream()
            index = self._index(stream, s)
        last = self.sigmas is not None and len(self.sigmas) > 1 and index == len(self.sigmas) - 2
        exact = self.schedule[index] if index is not None else s
        self._stream, self._force = (
            stream,
            stream.sigma is None or last or self.record or self._kept(stream, exact),
        )
        self._skipped, self._sigma = False, s
        self.dit.block_runner = self._run
        try:
            out = self.model(x, sigma, text, mask)
        finally:
            self.dit.block_runner = None
        stream.skips = stream.skips + 1 if self._skipped else 0
        step = index if index is not None else stream.calls
        self.stats.calls.append((step, self._skipped))
        if self._skipped:
            self.stats.skipped += 1
            self.stats.skipped_steps.append(step)
        else:
            self.stats.forwards += 1
        if self.record:
            out_change = self._relative_l1(out, stream.output, local=False)
            if out_change is not None and self._change is not None:
                self.stats.trace.append((self._change, out_change))
            stream.output = out
        stream.sigma, stream.calls, stream.step = s, stream.calls + 1, index
        return out

    def _index(self, stream: _Stream, sigma: float) -> int | None:
        """The schedule index of a call at ``sigma`` (float32, as the sampler hands it over): the first step
        after the stream's last one with that σ; None without a schedule or when none matches."""
        if self.sigmas is None:
            return None
        start = 0 if stream.step is None else stream.step + 1
        return next((i for i in range(start, len(self.sigmas)) if self.sigmas[i] == sigma), None)

    def _kept(self, stream: _Stream, sigma: float) -> bool:
        """Whether the options force a full pass here: the skip cap is reached or σ lies in ``keep``, bounds
        included to float32's rounding (the linear part of the schedule ends at 1 − 0.025 =
        0.9750000000000001, 0.97500002 as a float32: it fell outside keep=0.85-0.975 and was skipped)."""
        setting = self.setting
        capped = setting.max_skips is not None and stream.skips >= setting.max_skips
        if capped or setting.keep is None:
            return capped
        lo, hi = setting.keep
        return lo - KEEP_TOLERANCE <= sigma <= hi + KEEP_TOLERANCE

    def _relative_l1(self, a: torch.Tensor, b: torch.Tensor | None, local: bool = True) -> float | None:
        """mean |a − b| / mean |b| over every real token of every rank; None without a previous ``b``."""
        if b is None:
            return None
        n = _valid_local_tokens() if local else None
        if n is not None:
            a, b = a[:, :n], b[:, :n]
        sums = torch.stack([(a - b).abs().sum(dtype=torch.float64), b.abs().sum(dtype=torch.float64)])
        if local and _distributed():
            import torch.distributed as dist

            dist.all_reduce(sums)
        num, den = sums.tolist()
        return num / den if den > 0 else math.inf

    def _run(self, dit, h, y, c, rope, packed) -> torch.Tensor:  # noqa: ANN001 - AsymmDiT.forward's values
        """The block loop with caching: h (B, N, dx) in, the last block's h out."""
        stream, threshold = self._stream, self.setting.threshold
        if self.setting.kind == "teacache":
            scale = _first_scale(dit.blocks[0], c)  # on block 0's device, as is the probe
            probe = modulated_rms_norm(h.to(scale.device), scale)  # block 0's modulated visual input
            self._change = self._relative_l1(probe, stream.probe)
            stream.probe = probe
            if not self._force:
                stream.accumulated += float(self.rescale(self._change))
            if self._force or threshold == 0 or stream.accumulated >= threshold:
                stream.accumulated = 0.0
                out, _ = dit.run_blocks(h, y, c, rope, packed)
                # .to: with --devices the last block (and so out) may be on another device than h; the
                # residual stays there, where a full pass would leave the output.
                self._store(stream, out - h.to(out.device))
                return out
            self._skipped = True
            reused = self._reuse(stream)
            return h.to(reused.device) + reused
        h1, y1 = dit.run_blocks(h, y, c, rope, packed, 0, 1)
        first = h1 - h.to(h1.device)  # h1 is on block 0's device (--devices)
        self._change = self._relative_l1(first, stream.probe)
        if self._force or threshold == 0 or self._change >= threshold:
            stream.probe = first
            out, _ = dit.run_blocks(h1, y1, c, rope, packed, 1, None)
            self._store(stream, out - h1.to(out.device))
            return out
        self._skipped = True
        reused = self._reuse(stream)
        return h1.to(reused.device) + reused

    def _store(self, stream: _Stream, residual: torch.Tensor) -> None:
        if self.setting.extrapolate:
            stream.previous, stream.previous_sigma = stream.residual, stream.residual_sigma
        stream.residual, stream.residual_sigma = residual, self._sigma

    def _reuse(self, stream: _Stream) -> torch.Tensor:
        """The residual a skipped step adds: the last full pass's, or with ``extrapolate`` the line in σ
        through the last two full passes' residuals (the residual drifts smoothly between full passes)."""
        if not self.setting.extrapolate or stream.previous is None:
            return stream.residual
        if stream.residual_sigma == stream.previous_sigma:  # two full passes at one float32 σ: no line
            return stream.residual
        slope = (self._sigma - stream.residual_sigma) / (stream.residual_sigma - stream.previous_sigma)
        return stream.residual + self.setting.extrapolate * slope * (stream.residual - stream.previous)
