"""Which settings fit a memory budget: the peak of each stage for every dtype × quantization × offload.

Stages: ``text`` (T5 over the prompt and the negative prompt), ``denoise`` (one DiT forward at the request's
size, under batched guidance the batch is 2, and what a step cache keeps between steps), ``decode`` (the
VAE decoder with the tile plan chosen within what the budget leaves, as the pipeline plans it: 80% of the
free memory). What is on the device in each:

* offload ``none``: all three models all the time, plus the stage's activations;
* ``model``: only the stage's model;
* ``blocks:N``: in the text stage T5's embedding and norms, its first layer and two streamed layers; in the
  denoise stage the DiT's non-block layers, N resident blocks and two streamed ones; the decode as ``model``.

Every stage adds ``reserve`` bytes (on CUDA, the context, cuBLAS workspace and allocator slack: 1 GB by
default). Speed order, used to pick the "fastest that fits": no quantization before any (they dequantize at
every call), then no offload, model offload, and block offload with as many resident blocks as fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mochi.devices import DTYPE_NAMES, size_text
from mochi.memory.estimate import (
    QUANT_MODES,
    cache_bytes,
    cache_tensors,
    decoder_weights,
    dit_activations,
    dit_weights,
    pipeline_decode_plan,
    t5_activations,
    t5_weights,
)
from mochi.models.dit import DiTConfig
from mochi.models.t5 import T5Config
from mochi.models.vae import DecoderConfig
from mochi.offload import Offload

GB = 10**9
CUDA_RESERVE = 1 * GB
STAGES = ("text", "denoise", "decode")


@dataclass(frozen=True)
class Models:
    """The architectures to plan for (default: the released Mochi 1 preview and T5-XXL)."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    t5: T5Config = field(default_factory=T5Config)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # (layer, stored bytes) of the DiT's layers held as the checkpoint stores them (`mochi.memory.stored`):
    # when any are, the DiT's mode is its stored one, and its other layers are as ``dit_rest`` (plan's
    # keyword) holds them: full width, or quantized by ``--quantize``.
    dit_kept: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Job:
    """What one request asks of the models: latent (t, h, w), DiT batch, valid text tokens per prompt."""

    latent: tuple[int, int, int]
    batch: int = 2  # cond and uncond in one forward (batched guidance)
    text_tokens: tuple[int, ...] = (256, 0)  # a full-length prompt, the empty negative prompt
    cache_tensors: int = (
        0  # visual-stream tensors a step cache keeps between steps (`estimate.cache_tensors`)
    )
    # A guidance schedule with cond-only steps (1.0) among guided ones: those run the cond batch alone, and
    # a step cache keeps a stream of its own for them beside the guided batch's.
    cond_only_steps: bool = False

    @property
    def cache_rows(self) -> int:
        """The batch rows each of a step cache's kept tensors spans, over all its streams."""
        return self.batch + (1 if self.cond_only_steps and self.batch > 1 else 0)

    @classmethod
    def from_request(
        cls,
        frames: int,
        height: int,
        width: int,
        guidance: bool = True,
        cache: str | None = None,
        cache_threshold: float | None = None,
        cond_only_steps: bool = False,
    ) -> Job:
        """guidance: any step guided (batched with the negative prompt); cond_only_steps: also steps at
        guidance 1.0 (a guidance schedule)."""
        from mochi.models.vae import num_latents_for_frames

        latent = (num_latents_for_frames(frames), height // 8, width // 8)
        kept = cache_tensors(cache, cache_threshold)
        if not guidance:
            return cls(latent, 1, (256,), kept)
        return cls(latent, 2, (256, 0), kept, cond_only_steps)


@dataclass(frozen=True)
class Option:
    """One setting and its estimated peak bytes per stage; ``fits`` the budget it was planned for."""

    dtype: torch.dtype
    quant: str
    offload: Offload
    peaks: dict[str, int]
    fits: bool
    decode_tile: tuple[int, int] | None  # None: no decode split fits
    t5_quant: str | None = None  # T5's weight mode where it differs from the DiT's (``quant``)
    miss: str | None = None  # why no decode split fits (None: one does), naming a value that would
    # the mode of a stored-quantized DiT's other block Linears, where --quantize quantizes some (else None)
    dit_rest: str | None = None
    # the free memory the decode rule needs where no split fits (None: one does, or --max-memory refuses)
    decode_need: int | None = None

    @property
    def need(self) -> int:
        """The budget this setting needs at every stage, its decode split included (as far as known)."""
        return max(self.peak, self.decode_need or 0)

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    def describe(self) -> str:
        """e.g. "bf16 q8_0, offload model"; "bf16 fp8, T5 int8, offload none" where T5's mode differs;
        "bf16 fp8 (other layers int8), ..." where --quantize quantizes the layers a DiT file left wide."""
        q = "" if self.quant == "none" else f" {self.quant}"
        if self.dit_rest not in (None, "none", self.quant):
            q += f" (other layers {self.dit_rest})"
        t5 = ""
        if self.t5_quant not in (None, self.quant):
            t5 = f", T5 {'unquantized' if self.t5_quant == 'none' else self.t5_quant}"
        return f"{DTYPE_NAMES[self.dtype]}{q}{t5}, offload {self.offload}"


def stage_peaks(
    models: Models,
    job: Job,
    dtype: torch.dtype,
    quant: str,
    offload: Offload,
    budget: int,
    reserve: int = 0,
    vae_dtype: torch.dtype = torch.float32,
    t5_quant: str | None = None,
    max_memory: int | None = None,
    dit_rest: str = "none",
) -> tuple[dict[str, int], tuple[int, int] | None]:
    """({stage: peak bytes}, the decode tile) for one setting within ``budget`` bytes (see the module doc).
    ``max_memory``: the VAE budget the pipeline decodes within (``--max-memory``; None: its default).
    ``quant`` is both models' (``--quantize`` quantizes both) unless ``t5_quant`` names T5's own (a loaded
    checkpoint whose DiT kept fp8 while its T5 is full width). ``dit_rest``: where the DiT keeps stored
    layers (``models.dit_kept``), the mode of its other block Linears (--quantize's; "none": full width)."""
    kept = models.dit_kept  # then ``quant`` names the stored mode, and each kept layer counts as stored
    dit = dit_weights(models.dit, dtype, dit_rest, kept) if kept else dit_weights(models.dit, dtype, quant)
    t5 = t5_weights(models.t5, quant if t5_quant is None else t5_quant)
    vae = decoder_weights(models.decoder, vae_dtype)
    dit_act = dit_activations(models.dit, job.latent, job.batch, tuple(job.text_tokens), dtype)
    dit_act += cache_bytes(
        models.dit, job.latent, job.cache_rows, dtype, job.cache_tensors
    )  # kept between steps
    t5_act = t5_activations(models.t5, len(job.text_tokens))
    if offload.kind == "none":
        resident = {s: dit.total + t5.total + vae for s in STAGES}
    elif offload.kind == "model":
        resident = {"text": t5.total, "denoise": dit.total, "decode": vae}
    else:
        streamed_t5 = t5.blocks[0] + 2 * max(t5.blocks[1:], default=0)
        n = min(offload.resident, len(dit.blocks))
        streamed = sum(dit.blocks[:n]) + 2 * max(dit.blocks[n:], default=0)
        resident = {"text": t5.rest + streamed_t5, "denoise": dit.rest + streamed, "decode": vae}
    latent = (1, *job.latent)  # the pipeline decodes one video at a time per request sample
    # As the pipeline plans it: the default budget's split, unless that needs more than 80% of what is free
    # once the decoder is there (then a smaller one).
    plan, decode_act = pipeline_decode_plan(
        models.decoder, latent, int(0.8 * (budget - reserve - resident["decode"])), vae_dtype, max_memory
    )
    peaks = {
        "text": resident["text"] + t5_act + reserve,
        "denoise": resident["denoise"] + dit_act + reserve,
        "decode": resident["decode"] + decode_act + reserve,
    }
    return peaks, (plan.tile if plan is not None else None)


def offload_modes(depth: int) -> list[Offload]:
    """Offload settings in speed order: none, model, then blocks:N from all but two resident down to 0."""
    return [Offload(), Offload("model"), *(Offload("blocks", n) for n in range(depth - 2, -1, -1))]


def plan(
    models: Models,
    job: Job,
    budget: int,
    *,
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,),
    quants: tuple[str, ...] = QUANT_MODES,
    reserve: int = 0,
    all_blocks: bool = False,
    vae_dtype: torch.dtype = torch.float32,
    t5_quant: str | None = None,
    max_memory: int | None = None,
    dit_rest: str = "none",
) -> list[Option]:
    """Every setting, in speed order (fastest first), each with its peaks and whether it fits ``budget``.

    Block offload appears once per dtype × quantization: with the most resident blocks that fit (or 0 when
    none does); ``all_blocks`` lists every N instead. ``vae_dtype``, ``t5_quant``, ``max_memory`` (the
    VAE budget, ``--max-memory``) and ``dit_rest``: as for ``stage_peaks``.
    """
    out = []
    for dtype in dtypes:
        rest = None  # named in the options only where the DiT has block Linears it leaves for --quantize
        kept = models.dit_kept
        if (
            kept
            and dit_rest != "none"
            and dit_weights(models.dit, dtype, dit_rest, kept) != dit_weights(models.dit, dtype, "none", kept)
        ):
            rest = dit_rest
        for quant in quants:
            blocks: list[Option] = []
            for mode in offload_modes(models.dit.depth):
                peaks, tile = stage_peaks(
                    models, job, dtype, quant, mode, budget, reserve, vae_dtype, t5_quant, max_memory,
                    rest or "none",
                )  # fmt: skip
                fits = tile is not None and max(peaks.values()) <= budget
                miss = need = None
                if tile is None:
                    miss, need = decode_miss(models, job, peaks["decode"], budget, vae_dtype, max_memory)
                option = Option(dtype, quant, mode, peaks, fits, tile, t5_quant, miss, rest, need)
                if mode.kind != "blocks" or all_blocks:
                    out.append(option)
                else:
                    blocks.append(option)
                    if fits:
                        break
            if blocks and not all_blocks:
                out.append(blocks[-1])
    return out


def decode_miss(
    models: Models,
    job: Job,
    decode_peak: int,
    budget: int,
    vae_dtype: torch.dtype = torch.float32,
    max_memory: int | None = None,
) -> tuple[str, int | None]:
    """Why no decode split fits a setting whose decode stage peaks at ``decode_peak`` bytes (the smallest
    split's activations counted), and what would: a larger ``--max-memory`` when that is what refuses it,
    else the free memory the pipeline's rule (a split within 80% of what is left) needs; with that free
    memory in bytes (None where ``--max-memory`` refuses every split)."""
    smallest = pipeline_decode_plan(models.decoder, (1, *job.latent), 0, vae_dtype)[1]
    if max_memory is not None and max_memory < smallest:
        return (
            f"no decode split fits --max-memory {size_text(max_memory)}: the smallest needs about "
            f"{size_text(smallest)}; nearest valid: --max-memory {size_text(smallest)}"
        ), None
    beside = decode_peak - smallest  # the decoder's weights, what else stays resident, the reserve
    need = math.ceil(smallest / 0.8) + beside
    return (
        f"no decode split fits 80% of the {size_text(max(budget - beside, 0))} left beside the decoder "
        f"(the pipeline's rule); the smallest needs about {size_text(smallest)}, so about "
        f"{size_text(need)} free"
    ), need


def choose(options: list[Option], budget: int) -> Option:
    """The fastest option that fits; ValueError naming the closest one and by how much it misses, or, where
    one is within the budget at every stage but no decode split fits (``Option.miss``), why and what would."""
    for option in options:
        if option.fits:
            return option
    for option in options:
        if option.peak <= budget:  # missed only because no decode split fits
            raise ValueError(
                f"no setting fits {budget / GB:.1f} GB: {option.describe()} is within it at every stage, "
                f"but {option.miss}"
            )
    # Ranked by the budget each needs, its decode split's included: the lowest stage peak alone named a
    # setting whose decode no split fits ("needs about 3.3 GB, 0.1 GB more", where 3.6 GB was needed).
    closest = min(options, key=lambda o: o.need)
    if closest.decode_tile is None:
        raise ValueError(
            f"no setting fits {budget / GB:.1f} GB: the closest, {closest.describe()}, peaks at about "
            f"{_tenths_up(closest.peak)} GB, and {closest.miss}"
        )
    stage = max(closest.peaks, key=closest.peaks.__getitem__)
    raise ValueError(
        f"no setting fits {budget / GB:.1f} GB: the closest, {closest.describe()}, needs about "
        f"{_tenths_up(closest.peak)} GB in its {stage} stage, {_tenths_up(closest.peak - budget)} GB more"
    )


def _tenths_up(n: int) -> str:
    """Bytes as GB, rounded up to a tenth (at least 0.1): a gap never reads "0.0 GB more"."""
    return f"{max(math.ceil(n * 10 / GB), 1) / 10:.1f}"
