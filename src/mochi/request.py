"""What a user asks for: one generation request, validated at the boundary.

Every rule is checked here, before any model is loaded, and a broken rule is a ``ValueError`` that names the
value, the rule and the nearest valid choice.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

# The VAE compresses time 6× causally and space 8×; the DiT patchifies 2×2 latents, hence 16 pixels.
TEMPORAL_COMPRESSION = 6
SPATIAL_MULTIPLE = 16
MAX_SEED = 2**63 - 1
# Mochi samples at 4.5-6; far above, velocities overflow into NaN (ComfyUI's samplers stop at 100 as well).
MAX_GUIDANCE = 100.0
# Sampling steps: Mochi uses 64; a count far above only builds a huge schedule (10**20 hung in a list).
MAX_STEPS = 10_000
DEFAULT_THRESHOLD_NOISE = 0.025  # Genmo's: where the schedule's linear part ends
# The DiT attends over every visual token at once: (frames-1)/6+1 latent frames × height/16 × width/16.
# Mochi's own 163 frames at 848x480 are 44,520; 2**20 (about 24 times that) is far past what any device
# computes in a day, and a request beyond it is a typo that would otherwise fail deep in an allocator.
MAX_VISUAL_TOKENS = 2**20


def nearest_frame_counts(frames: int) -> tuple[int, int]:
    """The valid frame counts (6k+1) just below and just above ``frames``."""
    k = max(0, (frames - 1) // TEMPORAL_COMPRESSION)
    return TEMPORAL_COMPRESSION * k + 1, TEMPORAL_COMPRESSION * (k + 1) + 1


def check_frames(frames: int, name: str = "frames") -> int:
    """Return the latent frame count for ``frames`` pixel frames, which must be 6k+1."""
    if frames < 1 or (frames - 1) % TEMPORAL_COMPRESSION:
        lo, hi = nearest_frame_counts(frames)
        nearest = f"{lo} or {hi}" if frames >= 1 else f"{lo}"
        raise ValueError(
            f"{name}={frames} is not of the form 6k+1 (the VAE's causal 6× time compression); "
            f"nearest valid: {nearest}"
        )
    return (frames - 1) // TEMPORAL_COMPRESSION + 1


def check_seed(seed: int) -> int:
    """A seed is in [0, 2**63-1] (what torch's generators and an int64 broadcast take)."""
    if not 0 <= seed <= MAX_SEED:
        nearest = 0 if seed < 0 else MAX_SEED
        raise ValueError(f"seed={seed} must be in [0, 2**63-1]; nearest valid: {nearest}")
    return seed


def check_prompt(text: str, name: str = "prompt") -> str:
    """A prompt has something to read: not empty and not only whitespace (the CLI and the HTTP API refuse
    such prompts; ``negative_prompt`` may be empty, and the Python API takes any string)."""
    if not text.strip():
        state = "empty" if not text else "blank (only whitespace)"
        raise ValueError(f"{name}: is {state}; describe what the video shows")
    return check_utf8(text, name)


def _negative(text: str) -> str:
    """How an error names a negative prompt: its start, and for one of only whitespace that it is text."""
    blank = " (only whitespace, which is still encoded as text)" if not text.strip() else ""
    return f"negative_prompt={text[:40]!r}{blank}"


def check_utf8(text: str, name: str = "prompt") -> str:
    """A text the tokenizer can read: no lone surrogate (what Python makes of command-line bytes that are
    not UTF-8), which failed in the tokenizer's UTF-8 encode, after the model had loaded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name}: character {e.object[e.start]!r} at position {e.start} is a lone surrogate, not text "
            "(bytes that are not UTF-8?); write the prompt in UTF-8 or remove it"
        ) from None
    return text


def visual_tokens(frames: int, height: int, width: int) -> int:
    """The DiT's visual token count for a valid frame count and size (pixels)."""
    return check_frames(frames) * (height // SPATIAL_MULTIPLE) * (width // SPATIAL_MULTIPLE)


def check_size(frames: int, height: int, width: int) -> None:
    """At most ``MAX_VISUAL_TOKENS`` visual tokens; the error names the largest frame count (or width) that
    fits. ``frames``, ``height`` and ``width`` must already be valid."""
    tokens = visual_tokens(frames, height, width)
    if tokens <= MAX_VISUAL_TOKENS:
        return
    per_frame = (height // SPATIAL_MULTIPLE) * (width // SPATIAL_MULTIPLE)
    fit = MAX_VISUAL_TOKENS // (height // SPATIAL_MULTIPLE) * SPATIAL_MULTIPLE
    if per_frame <= MAX_VISUAL_TOKENS:
        nearest = f"frames={TEMPORAL_COMPRESSION * (MAX_VISUAL_TOKENS // per_frame - 1) + 1} at this size"
    elif fit >= SPATIAL_MULTIPLE:
        nearest = f"width={fit} at this height, with frames=1"
    else:
        nearest = f"height={MAX_VISUAL_TOKENS * SPATIAL_MULTIPLE} at width=16, with frames=1"
    raise ValueError(
        f"frames={frames} at {width}x{height} make {tokens:,} visual tokens ((frames-1)/6+1 × height/16 × "
        f"width/16); at most {MAX_VISUAL_TOKENS:,} are allowed (Mochi's 163 frames at 848x480: 44,520); "
        f"nearest valid: {nearest}"
    )


def check_multiple(value: int, multiple: int, name: str) -> int:
    """``value`` must be a positive multiple of ``multiple``; the error names the two nearest that are."""
    if value < multiple or value % multiple:
        lo = max(multiple, value // multiple * multiple)
        nearest = f"{lo}" if value < multiple else f"{lo} or {lo + multiple}"
        raise ValueError(
            f"{name}={value} must be a positive multiple of {multiple}; nearest valid: {nearest}"
        )
    return value


@dataclass
class GenerationRequest:
    """One call of the pipeline. ``None`` for frames/size/steps/guidance/eta means the model's own default.

    ``guidance`` is a scalar or one value per step (classifier-free guidance; 1.0 skips the unconditional
    pass). ``sigmas``, when given, replaces the linear-quadratic schedule and must fall from 1.0 (or below,
    for video-to-video) to 0.0. ``seed=None`` draws a fresh seed; the one used is reported back.
    """

    prompt: str | list[str]
    negative_prompt: str = ""
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | list[float] | None = None
    seed: int | None = None
    threshold_noise: float = DEFAULT_THRESHOLD_NOISE
    linear_steps: int | None = None
    sigmas: list[float] | None = None
    init_video: str | None = None
    strength: float = 0.7
    batch_cfg: bool = True
    loras: list[tuple[str, float]] = field(default_factory=list)
    cache: str = "none"  # step caching: none, teacache, fbcache or a preset (mochi.accel.cache.PRESETS)
    cache_threshold: float | None = None  # None: the kind's or preset's threshold
    # The ancestral sampler (``mochi.sampling.sampler``): a share ``eta`` of each step's noise drawn afresh
    # (seeded from ``seed``) at steps from σ above ``eta_above``; 0 = Genmo's Euler sampler. None: the model's
    # default (its bundle's ``defaults``; 0 when they name none, as for the released model), and 0 when a step
    # cache is on (``resolved``).
    eta: float | None = None
    eta_above: float | None = None

    def __post_init__(self) -> None:
        if self.strength is None:  # as a sidecar records it without a clip (null): the default
            self.strength = 0.7
        if self.negative_prompt is None:  # diffusers' default for "no negative prompt"
            self.negative_prompt = ""
        # A batch's prompts and a per-step guidance are copied: the caller's list, edited after the call,
        # changed the returned record of what ran. A tuple or 1-D array of guidance values is such a list.
        if isinstance(self.prompt, list | tuple):
            self.prompt = list(self.prompt)
        if isinstance(self.guidance, list | tuple):
            self.guidance = list(self.guidance)
        elif getattr(self.guidance, "ndim", None) == 1 and hasattr(self.guidance, "tolist"):  # numpy, torch
            self.guidance = self.guidance.tolist()

    @property
    def prompts(self) -> list[str]:
        if not isinstance(self.prompt, str | list | tuple):  # list(None) or list(b"..") failed deep inside
            raise ValueError(
                f"prompt={self.prompt!r:.60} must be a string, or a list of strings for a batch, not "
                f"{type(self.prompt).__name__}"
            )
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def resolved(self, defaults: dict, video_to_video: bool | None = None) -> GenerationRequest:
        """A copy with every ``None`` default filled from ``defaults`` and a seed drawn, then validated
        (``video_to_video`` as for ``validate``)."""
        values = {k: defaults[k] for k in ("frames", "height", "width", "steps", "guidance")}
        values.update({k: defaults.get(k, 0.0) for k in ("eta", "eta_above")})
        values = {k: v for k, v in values.items() if getattr(self, k) is None}
        if self.seed is None:
            values["seed"] = secrets.randbelow(2**32)
        if self.sigmas is not None and self.steps is None:
            values["steps"] = len(self.sigmas) - 1
        out = dataclasses.replace(self, **values)
        out.validate(video_to_video)
        out = dataclasses.replace(out, **out._plain_numbers())
        from mochi.accel.cache import CacheSetting

        setting = CacheSetting.parse(out.cache, out.cache_threshold)  # a preset → kind, options, threshold
        out.cache, out.cache_threshold = setting.spec, setting.threshold
        if setting.enabled and self.eta is None:
            # A step cache skips no step of an ancestral run (its fresh noise changes every step's input), so
            # a cached request takes the Euler sampler unless it names eta itself (an eta_above it names is
            # kept: it does nothing at eta 0).
            out.eta = 0.0
            if self.eta_above is None:
                out.eta_above = 0.0
        return out

    def _check_schedule(self, video_to_video: bool | None) -> None:
        """The schedule the request makes is a schedule (a large ``threshold_noise`` made σ go negative deep
        in sampling), a clip's ``strength`` leaves it at least one step, and a negative prompt has a guided
        step among those that run: errors naming the fields."""
        from mochi.sampling.sampler import guidance_schedule
        from mochi.sampling.schedules import linear_quadratic_schedule, nearest_settings, truncate_schedule

        sigmas = self.sigmas
        if sigmas is None and self.steps is not None:
            steps, tau = int(self.steps), float(self.threshold_noise)
            linear = steps // 2 if self.linear_steps is None else int(self.linear_steps)
            if steps == 1 and self.linear_steps not in (None, 0):
                raise ValueError(
                    f"linear_steps={self.linear_steps} must be left out with steps=1 (one step has no linear "
                    "part); nearest valid: None"
                )
            if steps > 1 and not 1 <= linear < steps:
                raise ValueError(
                    f"linear_steps={linear} must be in [1, {steps - 1}] (below steps={steps}); "
                    f"nearest valid: {min(max(linear, 1), steps - 1)}"
                )
            try:
                sigmas = linear_quadratic_schedule(steps, tau, None if steps == 1 else linear)
            except ValueError:
                named = "" if self.linear_steps is not None else " (the default, steps // 2)"
                raise ValueError(
                    f"threshold_noise={self.threshold_noise} with steps={steps} and linear_steps={linear}"
                    f"{named} make no schedule falling steadily from 1 to 0; nearest valid: "
                    f"{nearest_settings(steps, tau, linear)}"
                ) from None
        from_clip = self.init_video is not None if video_to_video is None else video_to_video
        if sigmas is not None and from_clip:
            try:
                steps = len(truncate_schedule([float(v) for v in sigmas], float(self.strength))) - 1
            except ValueError:
                raise ValueError(
                    f"strength={self.strength} must lie in ({sigmas[-1]}, {sigmas[0]}] for this schedule "
                    "(it is where the clip's noising starts, and one step must remain)"
                ) from None
            # The steps a clip's strength leaves are the schedule's last: guidance above it never runs.
            tail = self.guidance[-steps:] if isinstance(self.guidance, list) else self.guidance
            unguided = tail is not None and all(g == 1.0 for g in guidance_schedule(tail, steps))
            if self.negative_prompt and unguided:
                raise ValueError(
                    f"{_negative(self.negative_prompt)} needs guidance other than 1.0, and the "
                    f"{steps} steps strength={self.strength} leaves all have guidance 1.0; raise their "
                    "guidance or leave negative_prompt out"
                )

    def _plain_numbers(self) -> dict:
        """The numeric fields as Python ints and floats (a numpy or torch scalar passes ``validate`` as a
        number; the sampler and the output record want plain ones)."""
        out: dict = {}
        for name in ("frames", "height", "width", "steps", "seed", "linear_steps"):
            if getattr(self, name) is not None:
                out[name] = int(getattr(self, name))
        for name in ("threshold_noise", "strength", "eta", "eta_above", "cache_threshold"):
            if getattr(self, name) is not None:
                out[name] = float(getattr(self, name))
        if self.guidance is not None:
            g = self.guidance
            out["guidance"] = [float(v) for v in g] if isinstance(g, list) else float(g)
        if self.sigmas is not None:
            out["sigmas"] = [float(v) for v in self.sigmas]
        out["loras"] = [(str(p), float(v)) for p, v in self.loras]
        return out

    def _check_types(self) -> None:
        """Whole numbers where counts and seeds go, real numbers where scales go (bools are neither; the
        range checks refuse NaN and infinities), so that a 7.0 or a "1" is named here rather than failing
        deep in torch or being truncated silently."""
        for name in ("frames", "height", "width", "steps", "seed", "linear_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name}={value!r} must be a whole number, not {type(value).__name__}")
        scales = {"threshold_noise": self.threshold_noise, "strength": self.strength}
        scales.update({k: getattr(self, k) for k in ("eta", "eta_above", "cache_threshold")})
        guidance = self.guidance if isinstance(self.guidance, list) else [self.guidance]
        scales.update(
            {f"guidance[{i}]" if len(guidance) > 1 else "guidance": g for i, g in enumerate(guidance)}
        )
        for name, value in scales.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}={value!r} must be a number, not {type(value).__name__}")
        if not isinstance(self.cache, str):
            raise ValueError(
                f"cache={self.cache!r} must be a name such as 'none', 'teacache' or 'fbcache:fast'"
            )
        if not isinstance(self.batch_cfg, bool):  # "no" is truthy: it ran batched
            raise ValueError(f"batch_cfg={self.batch_cfg!r} must be True or False")
        if self.init_video is not None and not isinstance(self.init_video, str | os.PathLike):
            raise ValueError(f"init_video={self.init_video!r} must be a video file's path (a string)")
        if self.init_video is not None and not os.fspath(self.init_video).strip():  # read as the folder "."
            raise ValueError(
                f"init_video={self.init_video!r} is empty; give a video file's path, or None for "
                "text-to-video"
            )
        if self.sigmas is not None and not isinstance(self.sigmas, list | tuple):
            raise ValueError(
                f"sigmas={self.sigmas!r:.60} must be a list of numbers falling to 0.0, e.g. [1.0, 0.5, 0.0]"
            )
        for i, value in enumerate(self.sigmas or ()):  # as guidance's: float() read "1" and True as numbers
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"sigmas[{i}]={value!r} must be a number, not {type(value).__name__}")
        if not isinstance(self.loras, list | tuple):  # each entry is checked where the LoRAs are read
            raise ValueError(
                f"loras={self.loras!r:.60} must be a list of (path, scale) pairs, e.g. [('a.safetensors', 1)]"
            )

    def validate(self, video_to_video: bool | None = None) -> None:
        """Raise ``ValueError`` naming the first field that breaks its rule. ``video_to_video``: whether the
        request starts from a clip (None: whether it names ``init_video``; the Python API's ``init_frames``
        make it True), which lets a custom schedule start below σ = 1."""
        prompts = self.prompts
        if not prompts:
            raise ValueError("prompt list is empty; give at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                name = "prompt" if isinstance(self.prompt, str) else f"prompt[{i}]"
                raise ValueError(f"{name}={p!r:.60} must be a string, not {type(p).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(
                f"negative_prompt={self.negative_prompt!r:.60} must be a string (one for the whole batch; "
                f'"" or None for none), not {type(self.negative_prompt).__name__}'
            )
        for i, p in enumerate(prompts):
            check_utf8(p, "prompt" if isinstance(self.prompt, str) else f"prompt[{i}]")
        check_utf8(self.negative_prompt, "negative_prompt")
        self._check_types()
        if self.sigmas is not None:
            from mochi.sampling.schedules import validate_sigmas

            # They shape the linear-quadratic schedule, which a custom one replaces: they would do nothing.
            if self.linear_steps is not None or self.threshold_noise != DEFAULT_THRESHOLD_NOISE:
                which = "linear_steps" if self.linear_steps is not None else "threshold_noise"
                raise ValueError(
                    f"{which}={getattr(self, which)} shapes the default schedule, which sigmas replace; "
                    f"leave {which} out with sigmas"
                )

            sigmas = validate_sigmas(self.sigmas)
            if sigmas[-1] != 0.0:  # a diffusers schedule (its scheduler appends the 0) decoded a noisy latent
                raise ValueError(
                    f"sigmas end at {sigmas[-1]:g}, but a schedule falls to 0.0 (its last step lands on the "
                    "clean latent); append 0.0 (diffusers' scheduler appends it to the sigmas it is given)"
                )
            from_clip = self.init_video is not None if video_to_video is None else video_to_video
            if sigmas[0] != 1.0 and not from_clip:
                raise ValueError(
                    f"sigmas start at {sigmas[0]}, but text-to-video starts from pure noise at sigma 1.0 (a "
                    "lower start would read the noise as a partly clean video); start the schedule at 1.0, "
                    "or give init_video (then strength sets where it starts)"
                )
        if self.frames is not None:
            check_frames(self.frames)
        if self.height is not None:
            check_multiple(self.height, SPATIAL_MULTIPLE, "height")
        if self.width is not None:
            check_multiple(self.width, SPATIAL_MULTIPLE, "width")
        if None not in (self.frames, self.height, self.width):
            check_size(self.frames, self.height, self.width)
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            nearest = 1 if self.steps < 1 else MAX_STEPS
            raise ValueError(
                f"steps={self.steps} must be in [1, {MAX_STEPS}] (Mochi uses 64); nearest valid: {nearest}"
            )
        if self.sigmas is not None and self.steps is not None and self.steps != len(self.sigmas) - 1:
            raise ValueError(
                f"steps={self.steps} disagrees with the {len(self.sigmas)} sigmas given "
                f"({len(self.sigmas) - 1} steps); leave steps out or make them agree"
            )
        if self.seed is not None:
            check_seed(self.seed)
        if not 0.0 < self.threshold_noise < 1.0:
            raise ValueError(
                f"threshold_noise={self.threshold_noise} must be in (0, 1); "
                f"the default is {DEFAULT_THRESHOLD_NOISE}"
            )
        guidance = self.guidance if isinstance(self.guidance, list) else [self.guidance]
        for g in guidance:
            if g is not None and not 0 <= g <= MAX_GUIDANCE:
                nearest = MAX_GUIDANCE if g > MAX_GUIDANCE else 0.0
                raise ValueError(
                    f"guidance={g} must be in [0, {MAX_GUIDANCE:g}] (1.0 disables guidance; Mochi uses 6); "
                    f"nearest valid: {nearest:g}"
                )
        # Any text but "" counts, whitespace included: the pipeline encodes it as given (Genmo zeroes only "",
        # genmo-mochi.md §3.5), so with guidance it steers the video, and with guidance 1.0 it is ignored.
        if self.negative_prompt and self.guidance is not None and all(g == 1.0 for g in guidance):
            raise ValueError(
                f"{_negative(self.negative_prompt)} needs guidance other than 1.0 (1.0 runs no "
                "unconditional pass, so it would be ignored); raise guidance or leave negative_prompt out"
            )
        if isinstance(self.guidance, list) and self.steps is not None and len(self.guidance) != self.steps:
            raise ValueError(
                f"a per-step guidance list has {len(self.guidance)} values for steps={self.steps}; "
                "give one value per step"
            )
        from mochi.sampling.sampler import check_eta

        check_eta(self.eta or 0.0, self.eta_above or 0.0)  # None: the model's, checked when resolved
        if not 0.0 < self.strength <= 1.0:
            nearest = min(max(self.strength, 0.01), 1.0) if math.isfinite(self.strength) else 0.7
            raise ValueError(f"strength={self.strength} must be in (0, 1]; nearest valid: {nearest}")
        from mochi.accel.cache import CacheSetting

        CacheSetting.parse(self.cache, self.cache_threshold)
        self._check_schedule(video_to_video)
        from mochi.models.lora import check_scale

        for entry in self.loras:
            if (
                isinstance(entry, str | bytes | os.PathLike)
                or not isinstance(entry, Sequence)
                or len(entry) != 2
            ):
                raise ValueError(
                    f"loras entry {entry!r} must be a (path, scale) pair, e.g. ('style.safetensors', 1.0)"
                )
            path, scale = entry
            if not isinstance(path, str | os.PathLike):
                raise ValueError(
                    f"loras entry {entry!r}: the path must be a string, not {type(path).__name__}"
                )
            if not os.fspath(path).strip():  # read as the current folder, and a lone file there as the LoRA
                raise ValueError(f"loras entry {entry!r}: the path is empty; name the LoRA file")
            check_scale(scale, f"LoRA {str(path)!r}")
