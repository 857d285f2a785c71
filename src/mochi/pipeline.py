"""Text in, frames out: T5 → AsymmDiT with the rectified-flow sampler → AsymmVAE decoder.

The pipeline writes nothing by itself (``mochi.video.write_video`` does); it returns uint8 frames. Each
component has its own device placement and dtype: T5 in fp32, the DiT in bf16 on accelerators, the VAE
decoder as configured. With ``offload`` each component is on the accelerator only for its stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mochi.devices import available_memory, parse_device, parse_dtype, resolve_dit_dtype
from mochi.finite import NonFiniteError, all_finite
from mochi.models.latents import dit_to_vae, vae_to_dit
from mochi.models.prompts import encode_prompts
from mochi.models.vae_plan import choose_plan, split_options
from mochi.models.vae_tiling import decode, encode
from mochi.offload import Offload, check_resident, offloaded, parse_offload
from mochi.ops.attention import check_backend
from mochi.request import GenerationRequest, check_frames
from mochi.sampling.sampler import guidance_schedule, initial_noise, noise_to, sample
from mochi.sampling.schedules import linear_quadratic_schedule, truncate_schedule, validate_sigmas
from mochi.weights.components import Components, load_components
from mochi.weights.dit import FP8_MODES

# progress(stage, done, total): stage is "text", "denoise", "decode" or "encode".
Progress = Callable[[str, int, int], None]


@dataclass
class Generation:
    """The result of one request: frames (B, T, H, W, 3) uint8, final DiT-space latents (B, 12, t, h, w).

    ``vae_plans``: the VAE splits used ("decode", and "encode" for video-to-video; see ``vae_plan``).
    """

    frames: torch.Tensor
    latents: torch.Tensor
    request: GenerationRequest
    seconds: dict[str, float] = field(default_factory=dict)
    vae_plans: dict[str, dict] = field(default_factory=dict)
    # What the denoiser ran (mochi.accel): cache setting, "dit_forwards", skipped steps, compile seconds.
    stats: dict = field(default_factory=dict)


class MochiPipeline:
    """Holds the components and runs requests; see ``from_pretrained`` for loading.

    device: where computation happens (default: CUDA if present). dit_dtype: the DiT's compute dtype
    (default bf16 on CUDA, fp32 on CPU). vae_dtype: the decoder's (default fp32, as Genmo's CLI decodes).
    offload: keep components on the CPU between their stages: True or "model" (whole models), "blocks[:N]"
    (stream DiT blocks and T5 layers, N DiT blocks resident; ``mochi.offload``). max_memory: bytes the VAE
    decode may use (default: ``mochi.models.vae_plan.DEFAULT_VAE_BUDGET``, so that the split never depends on
    free memory). quantize: "int8", "fp8", "q8_0" or "q4_0" quantizes the DiT's and T5's block Linear weights
    after the dtype cast, before they reach the device (`mochi.weights.quantize`; ``from_pretrained`` does it
    while reading the checkpoint, layer by layer); ``self.quantization`` then says what was done, and what
    holds on components quantized already (another mode is refused: a weight is quantized once). compile:
    regional torch.compile of the DiT (mochi.accel.compile; falls back to eager with one line where no
    compiler works).

    The pipeline owns ``components``: the dtype cast, quantization, device moves and LoRA hooks change those
    modules in place. Two pipelines with different settings need two ``load_components`` calls.
    """

    def __init__(
        self,
        components: Components,
        *,
        device: str | torch.device | None = None,
        dit_dtype: str | torch.dtype | None = None,
        vae_dtype: str | torch.dtype | None = None,
        offload: bool | str | Offload = False,
        attention: str | None = None,
        max_memory: int | None = None,
        quantize: str | None = None,
        compile: bool = False,
    ) -> None:
        self.components = components
        self.device = parse_device(device)
        self.dit_dtype = resolve_dit_dtype(dit_dtype, self.device)
        self.vae_dtype = parse_dtype(vae_dtype) or torch.float32
        mode = parse_offload(offload)  # validated everywhere; offload is a no-op on the CPU
        check_resident(mode, len(components.dit.blocks))
        self.offload_mode = mode if self.device.type != "cpu" else Offload()
        self.offload = self.offload_mode.active
        if max_memory is not None and (
            isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Integral) or max_memory <= 0
        ):
            raise ValueError(
                f"max_memory={max_memory!r} must be a positive whole number of bytes (e.g. 8 * 10**9; "
                "mochi.devices.parse_size('8GB') reads a size), or None for the default"
            )
        if not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r} must be True or False")
        self.max_memory = max_memory
        self.vae_plans: dict[str, dict] = {}  # the VAE splits of the latest request
        self.lora_merge = False  # how generate() applies a request's LoRAs
        # Merged LoRAs keep a CPU copy of each weight they touch, so that they come off bit for bit; a
        # caller that never takes them off (one `mochi generate`) turns this off and holds no copies.
        self.lora_keep_originals = True
        # One generate() at a time: it changes the shared DiT (LoRAs). load_lora and unload_loras take it too
        # (re-entered from generate's own _use_loras): from another thread they changed a running request's
        # DiT between two of its steps.
        self._running = threading.RLock()
        self.loras: list = []  # (path, scale, LoraHandle) in the order applied
        # Set by mochi.parallel.parallelize under torchrun: .denoiser(dit) and .decode(decoder, z, …).
        self.parallel = None
        c = components
        if attention is not None:
            check_backend(attention, self.device, self.dit_dtype)
            c.dit.attention_backend = attention
        c.text_encoder.to(dtype=torch.float32)
        c.dit.to(dtype=self.dit_dtype)
        c.decoder.to(dtype=self.vae_dtype)
        if c.encoder is not None:
            c.encoder.to(dtype=self.vae_dtype)
        # What holds, whether or not this pipeline asked: components quantized at load (from_pretrained) or
        # by an earlier pipeline are not quantized again, and another mode is refused.
        self.quantization: str | None = "; ".join(c.quantized.values()) or None
        if quantize is not None:
            from mochi.weights.quantize import quantize_components

            self.quantization = quantize_components(c, quantize, self.device)
        if not self.offload:
            for module in c.modules():
                module.to(self.device)
        # TeaCache's rescale polynomial; None: found beside the checkpoint (mochi.accel.calibrate).
        self.cache_coefficients: list[float] | None = None
        self.cache_coefficients_source: str | None = None  # where those came from, for the stats
        if compile:
            from mochi.accel.compile import compile_dit

            compile_dit(c.dit, self.device)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        vae: str | None = None,
        t5: str | None = None,
        tokenizer: str | None = None,
        fp8: str = "keep",
        **options: object,
    ) -> MochiPipeline:
        """Load a checkpoint in any supported layout (the embedded default when ``model`` is None).

        vae/t5/tokenizer supply what the checkpoint lacks; ``options`` go to the constructor.
        """
        # Checked before minutes of loading: a misspelt option or fp8 mode would only fail after it.
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "components"}
        unknown = sorted(set(options) - known)
        if unknown:
            near = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TypeError(
                f"from_pretrained got an unknown option {unknown[0]!r}{hint} "
                f"(options: {', '.join(sorted(known))})"
            )
        if fp8 not in FP8_MODES:
            raise ValueError(f"fp8={fp8!r} is not a valid mode; choose one of {', '.join(FP8_MODES)}")
        from mochi.weights.bundle import model_alias

        model = model_alias(model, "model")
        from mochi.weights.components import check_model_paths

        check_model_paths(model, vae, t5, tokenizer)  # named as this call's arguments (flags under `mochi`)
        if options.get("offload") is not None:
            from mochi.weights.components import dit_depth

            check_resident(parse_offload(options["offload"]), dit_depth(model))
        device = parse_device(options.get("device"))
        at_load = {"dit_dtype": resolve_dit_dtype(options.get("dit_dtype"), device)}
        if options.get("attention") is not None:
            check_backend(str(options["attention"]), device, at_load["dit_dtype"])
        if options.get("quantize") is not None:
            from mochi.weights.quantize import check_mode, device_mode

            check_mode(str(options["quantize"]))  # before minutes of loading
            # The DiT is quantized while it is read, in its compute dtype: the full-width model never exists.
            at_load["quantize"] = device_mode(str(options["quantize"]), device)[0]
        components = load_components(model, vae=vae, t5=t5, tokenizer=tokenizer, fp8=fp8, **at_load)
        return cls(components, **options)

    # -- stages -------------------------------------------------------------------------------------------

    def encode_text(
        self, prompts: list[str], names: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, 256, D) float32 and mask (B, 256) bool on the pipeline device; ``names`` name the
        prompts in a truncation warning (default "prompt {row}")."""
        c = self.components
        with offloaded(c.text_encoder, self.device, self.offload_mode):
            feats, mask = encode_prompts(prompts, c.tokenizer, c.text_encoder, names=names)
        return feats.to(self.device), mask.to(self.device)

    @property
    def compiled(self) -> bool:
        """Whether the DiT runs compiled: False without ``compile``, where no compiler works, and after a
        compile failure at a first call put it back to eager (``mochi.accel.compile.CallTimer``)."""
        from mochi.accel.compile import is_compiled

        return is_compiled(self.components.dit)

    @property
    def _latent_stats(self) -> tuple | None:
        c = self.components
        return None if c.latent_mean is None else (c.latent_mean, c.latent_std)

    def _vae_split(self, module: torch.nn.Module, latent_shape: tuple, kind: str) -> dict:
        # Free memory may only shrink the split in one process: ranks must agree on their tiles.
        free = int(available_memory(self.device) * 0.8) if self.parallel is None else None
        plan, self.vae_plans[kind] = choose_plan(module, latent_shape, self.max_memory, free)
        return split_options(plan)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT-space latents (B, 12, t, h, w) → frames (B, 6t−5, 8h, 8w, 3) uint8."""
        if not isinstance(latents, torch.Tensor):
            kind = type(latents)
            raise TypeError(
                f"latents must be a torch.Tensor (B, 12, t, h, w), not {kind.__module__}.{kind.__name__}"
                f"{' (torch.from_numpy converts an array)' if kind.__module__ == 'numpy' else ''}"
            )
        if latents.is_floating_point() and not all_finite(latents):  # not the decoder's fault, as it said
            raise NonFiniteError("the latents to decode hold NaN or infinite values; no video written")
        decoder = self.components.decoder
        with offloaded(decoder, self.device, self.offload_mode):
            z = dit_to_vae(latents.float(), self._latent_stats).to(self.device, self.vae_dtype)
            run = decode if self.parallel is None else self.parallel.decode
            b, _, t, h, w = z.shape
            frames = run(decoder, z, **self._vae_split(decoder, (b, t, h, w), "decode"))
        if not all_finite(frames):
            raise NonFiniteError("the VAE decoder produced NaN or infinite pixels; no video written")
        frames = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return frames.permute(0, 2, 3, 4, 1).cpu()  # B C T H W -> B T H W C

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (B, T, H, W, 3) uint8 → DiT-space latent means (B, 12, t, h, w) float32."""
        encoder = self.components.encoder
        if encoder is None:
            raise ValueError("video-to-video needs the VAE encoder, and this model has none")
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames is a {type(frames).__name__}; give a uint8 tensor (B, T, H, W, 3)")
        _check_uint8(frames, "frames")  # floats in [0, 1] were read as 0-255 levels
        if frames.dim() != 5 or frames.shape[-1] != 3:
            raise ValueError(
                f"frames have shape {tuple(frames.shape)}; give (batch, frames, height, width, 3), e.g. "
                "frames[None] for one clip"
            )
        with offloaded(encoder, self.device, self.offload_mode):
            # fp32 whatever the VAE's dtype: the encoder's Fourier features multiply pixels by 2π·2^7, so
            # bf16's rounding of x (up to 2^-9) would turn their phases by radians (genmo-mochi.md §2.3).
            x = frames.permute(0, 4, 1, 2, 3).to(self.device, torch.float32) / 127.5 - 1.0
            b, _, f, hp, wp = x.shape
            shape = (b, check_frames(f, "init video frames"), hp // 8, wp // 8)
            mean, _ = encode(encoder, x, **self._vae_split(encoder, shape, "encode"))
        return vae_to_dit(mean.float(), self._latent_stats)

    # -- LoRAs (mochi.models.lora, docs/lora.md) ------------------------------------------------------------

    def load_lora(self, path: str, scale: float = 1.0, merge: bool | None = None):  # noqa: ANN201
        """Apply a LoRA file (Genmo or diffusers/PEFT format) to the DiT at ``scale``; several may stack.

        merge: add it into the weights (default ``self.lora_merge``) or hook it in unmerged. A merged LoRA
        keeps a CPU copy of each weight it touches (``apply_lora``'s ``keep_original``; 5.4 GB for the
        default targets of the 10B DiT in bf16), so that taking it off restores the weights bit for bit
        however often requests change the scale; ``self.lora_keep_originals = False`` keeps none (taking
        it off then subtracts it, as exact as float rounding allows).
        """
        from mochi.models.lora import apply_lora
        from mochi.weights.lora import check_lora_path, lora_stamp, read_lora

        check_lora_path(path)
        # "no" is truthy: it merged, and the run record said lora_merge "no".
        name, merge = ("lora_merge", self.lora_merge) if merge is None else ("merge", merge)
        if not isinstance(merge, bool):
            raise ValueError(f"{name}={merge!r} must be True or False")
        with self._running:
            stamp = lora_stamp(path)  # before reading: a file replaced meanwhile is read again next time
            layers = read_lora(path).layers
            handle = apply_lora(
                self.components.dit,
                layers,
                scale,
                merge,
                keep_original=merge and self.lora_keep_originals,
                source=f"LoRA {str(path)!r}",
            )
            handle.stamp = stamp  # what _use_loras compares: the file the LoRA was read from, unchanged
            self.loras.append((str(path), handle.scale, handle))
        return handle

    def unload_loras(self) -> None:
        """Take every applied LoRA off again, newest first (merged weights are restored from their copies)."""
        with self._running:
            while self.loras:
                self.loras.pop()[2].remove()

    def _use_loras(self, loras: list[tuple[str, float]]) -> None:
        """Make exactly ``loras`` applied, unless the request names none (then leave what is loaded).

        A handle taken off by its own ``remove()`` no longer counts as applied, nor does one whose file has
        been replaced or written over since it was read (a retrained LoRA saved under the same name: the
        old one stayed applied, so the request's video depended on what this process had loaded before).
        If one of ``loras`` fails to load, none stays applied (no half-applied list decides what later
        requests get)."""
        from mochi.weights.lora import lora_stamp

        self.loras = [entry for entry in self.loras if not entry[2].removed]
        wanted = [(str(p), float(s), self.lora_merge, lora_stamp(p)) for p, s in loras]
        applied = [(p, s, h.merged, getattr(h, "stamp", None)) for p, s, h in self.loras]
        if wanted and wanted != applied:
            self.unload_loras()
            try:
                for path, scale, _, _ in wanted:
                    self.load_lora(path, scale)
            except BaseException:
                self.unload_loras()
                raise

    # -- the whole request ----------------------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        progress: Progress | None = None,
        init_frames: torch.Tensor | np.ndarray | None = None,
        denoised: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> Generation:
        """Run one request; ``init_frames`` (T, H, W, 3) uint8 at the output size (a tensor, or a numpy array
        as ``mochi.video.fit_frames`` returns) make it video-to-video,
        as does ``request.init_video`` (a video file: its first frames, centre-cropped and resized) without
        them.

        denoised(step, total, x0): called after each denoising step with the current estimate of the clean
        DiT-space latents (B, 12, t, h, w) float32 (previews, ``mochi.serve.preview``).

        One request runs at a time per pipeline: a call from another thread waits for the running one (a
        request's LoRAs are applied to the shared DiT, so two at once gave one of them the other's LoRA).

        The result's ``frames`` and ``latents`` are ordinary tensors (the work runs under
        ``torch.inference_mode``, whose tensors refuse in-place edits and autograd outside it).
        """
        if not isinstance(request, GenerationRequest):
            hint = (
                "GenerationRequest([...], ...) for a batch"
                if isinstance(request, list | tuple)
                else "GenerationRequest(prompt, ...)"
            )
            raise TypeError(f"generate takes a GenerationRequest, not {type(request).__name__}; give {hint}")
        for name, fn, signature in (
            ("progress", progress, "progress(stage, done, total)"),
            ("denoised", denoised, "denoised(step, total, x0)"),
        ):
            if fn is not None and not callable(fn):  # found after the text stage or the first DiT step
                raise TypeError(f"{name}={fn!r:.40} is not callable; give a function {signature} or None")
        with self._running, torch.inference_mode():
            result = self._generate(request, progress, init_frames, denoised)
        result.frames, result.latents = result.frames.clone(), result.latents.clone()  # outside: ordinary
        return result

    def _generate(
        self,
        request: GenerationRequest,
        progress: Progress | None,
        init_frames: torch.Tensor | np.ndarray | None,
        denoised: Callable[[int, int, torch.Tensor], None] | None,
    ) -> Generation:
        if init_frames is not None and request.init_video is not None:
            raise ValueError(
                f"init_frames and init_video={request.init_video!r} both give the clip to start from; "
                "give one of them"
            )
        if isinstance(init_frames, np.ndarray):  # mochi.video's readers return numpy
            # A view with negative strides (frame[..., ::-1], OpenCV's BGR to RGB) has no tensor form.
            init_frames = torch.as_tensor(np.ascontiguousarray(init_frames))
        if init_frames is not None and not isinstance(init_frames, torch.Tensor):
            raise TypeError(
                f"init_frames is a {type(init_frames).__name__}; give a uint8 tensor or numpy array "
                "(frames, height, width, 3), e.g. mochi.video.fit_frames(clip, frames, height, width)"
            )
        from_clip = init_frames is not None or request.init_video is not None
        req = request.resolved(self.components.defaults, from_clip)
        if init_frames is None and req.init_video is not None:  # read and checked before any work
            from mochi.video import VideoError, read_video

            clip, _ = read_video(req.init_video, max_frames=req.frames, size=(req.height, req.width))
            if clip.shape[0] < req.frames:
                raise VideoError(f"video has {clip.shape[0]} frames, fewer than the {req.frames} asked for")
            init_frames = torch.from_numpy(clip)
        if init_frames is not None:
            _check_init_frames(init_frames, (req.frames, req.height, req.width, 3))
        self._use_loras(req.loras)
        if not req.loras and self.loras:  # loaded LoRAs stay for a request naming none: recorded as run
            req = dataclasses.replace(req, loras=[(path, scale) for path, scale, _ in self.loras])
        self.vae_plans = {}
        report = progress or (lambda stage, done, total: None)
        seconds: dict[str, float] = {}
        prompts = req.prompts
        batch = len(prompts)

        t0 = time.perf_counter()
        report("text", 0, 1)
        sigmas = self._sigmas(req)
        self._check_before_sampling(req, batch)
        guided = any(g != 1.0 for g in guidance_schedule(req.guidance, len(sigmas) - 1))
        texts = prompts + ([req.negative_prompt] if guided else [])
        # The negative prompt is the last row: a warning called it "prompt 1" of a one-prompt request.
        feats, mask = self.encode_text(texts, [f"prompt {i}" for i in range(batch)] + ["negative prompt"])
        cond = feats[:batch], mask[:batch]
        null = (feats[batch:], mask[batch:]) if guided else None
        report("text", 1, 1)
        seconds["text"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        shape = (batch, 12, check_frames(req.frames), req.height // 8, req.width // 8)
        noise = initial_noise(shape, req.seed, device=self.device)
        if init_frames is not None:
            report("encode", 0, 1)
            z0 = self.encode_frames(init_frames.unsqueeze(0)).expand(batch, -1, -1, -1, -1)
            sigmas = truncate_schedule(sigmas, req.strength)
            z = noise_to(z0, sigmas[0], noise)
            report("encode", 1, 1)
        else:
            z = noise
        steps = len(sigmas) - 1
        guidance = req.guidance[-steps:] if isinstance(req.guidance, list) else req.guidance
        report("denoise", 0, steps)  # the bar shows before the first step, which may take long
        with offloaded(self.components.dit, self.device, self.offload_mode):
            denoiser, stats = self._denoiser(req, sigmas)
            latents = sample(
                denoiser,
                z,
                sigmas,
                cond,
                null,
                guidance=guidance,
                batch_cfg=req.batch_cfg,
                callback=lambda done, total, sigma: report("denoise", done, total),
                denoised=denoised,
                eta=req.eta,
                eta_above=req.eta_above,
                noise_seeds=[(req.seed, b) for b in range(batch)],
            )
        seconds["denoise"] = time.perf_counter() - t0
        if not all_finite(latents):
            raise NonFiniteError(
                "sampling produced NaN or infinite latents (the model, a LoRA or the guidance scale "
                f"{req.guidance} made them diverge); no video written"
            )
        stats = stats()
        # The step cache's probe and residuals (about 0.5 GB each for the released model) are not held
        # through the decode, whose split is sized by the memory left free.
        del denoiser

        t0 = time.perf_counter()
        report("decode", 0, 1)
        frames = self.decode_latents(latents)
        report("decode", 1, 1)
        seconds["decode"] = time.perf_counter() - t0
        return Generation(
            frames=frames,
            latents=latents.cpu(),
            request=req,
            seconds=seconds,
            vae_plans=dict(self.vae_plans),
            stats=stats,
        )

    def run_record(self, result: Generation) -> dict:
        """What ran for ``result``, as a sidecar records it beside the request: device (``N x cuda`` under
        torchrun), compute dtypes, attention backend, VAE splits, quantization, offload as it acted (none on
        a CPU, where it is a no-op), the parallel layout, and the denoiser's stats (cache, DiT forwards,
        skipped steps, compile seconds). The CLI and the server write the same fields."""
        plan = self.parallel
        parallel = None
        if plan is not None:
            parallel = {
                "ranks": plan.world.size,
                "sequence": plan.sequence,
                "guidance": plan.guidance,
                "weights": plan.weights,
            }
        return {
            "device": str(self.device) if plan is None else f"{plan.world.size} x {self.device.type}",
            "dtype": str(self.dit_dtype).removeprefix("torch."),
            "vae_dtype": str(self.vae_dtype).removeprefix("torch."),  # the decode's pixels depend on it
            "attention": self.components.dit.attention_backend,
            "vae_plans": result.vae_plans,
            "quantization": self.quantization or None,  # what was done (int8: by torchao or by mochi)
            "offload": str(self.offload_mode),
            "parallel": parallel,
            "lora_merge": self.lora_merge if result.request.loras else None,  # merging may move the last bit
            **result.stats,
        }

    def _check_before_sampling(self, req: GenerationRequest, batch: int) -> None:
        """What would fail only after sampling, found before it: a ``max_memory`` too small for any decode
        split, and ``cache_coefficients`` that are no polynomial (a request's own rules, an unguided negative
        prompt included, are ``GenerationRequest``'s)."""
        from mochi.accel.cache import CacheSetting

        coefficients = self.cache_coefficients
        if coefficients is not None and CacheSetting.parse(req.cache, req.cache_threshold).kind == "teacache":
            # NaN ones skipped every step but the first and last without a word; a string failed in numpy.
            values = list(coefficients) if isinstance(coefficients, list | tuple) else None
            if getattr(coefficients, "ndim", None) == 1 and hasattr(coefficients, "tolist"):  # np.polyfit's
                values = coefficients.tolist()
            if not values or not all(
                isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c) for c in values
            ):
                raise ValueError(
                    f"cache_coefficients={coefficients!r:.60} must be a list of finite numbers (TeaCache's "
                    "polynomial, highest power first, as mochi.accel.calibrate.load_coefficients reads "
                    "it), or None for the model's own"
                )
        if self.max_memory is not None:  # the default budget grows until a split fits; the user's does not
            shape = (batch, check_frames(req.frames), req.height // 8, req.width // 8)
            choose_plan(self.components.decoder, shape, self.max_memory, cpu=self.device.type == "cpu")

    def _denoiser(self, req: GenerationRequest, sigmas: list[float]):  # noqa: ANN202
        """The sampler's denoiser for ``req`` (parallel, cached, timed) and a function giving its stats."""
        from mochi.accel.cache import CacheSetting, StepCache
        from mochi.accel.compile import CallTimer

        dit = self.components.dit
        model = dit if self.parallel is None else self.parallel.denoiser(dit)
        setting = CacheSetting.parse(req.cache, req.cache_threshold)
        cache = source = None
        if setting.enabled:
            coefficients = self.cache_coefficients
            if setting.kind == "teacache" and coefficients is not None:
                source = self.cache_coefficients_source or "set on the pipeline"
            if setting.kind == "teacache" and coefficients is None:
                from mochi.accel.calibrate import find_coefficients

                coefficients, source = find_coefficients(self.components.source, dit.config)
            cache = StepCache(dit, setting, model=model, coefficients=coefficients, sigmas=sigmas)
            model = cache
        timer = CallTimer(model, dit if self.compiled else None)

        def stats() -> dict:
            # Counted per step, so that separate cond and uncond forwards (batch_cfg=False) report what a
            # batched run of the same request does: every step ran its blocks unless the cache skipped them.
            out = {"cache": str(setting), "dit_forwards": len(sigmas) - 1, "skipped_steps": []}
            if cache is not None:
                forwards, skipped, partly = cache.stats.by_step()
                out.update(dit_forwards=forwards, skipped_steps=skipped, partly_skipped_steps=partly)
            if source is not None:
                # What the cache used, not only where from: a file fitted again under the same name (the
                # default teacache.json beside a model) changed the video under the same record.
                out["cache_coefficients"] = _coefficients_name(source)
                out["cache_polynomial"] = [float(c) for c in coefficients]
            # Compiled kernels round differently from eager ones (a level or two in a frame, more after
            # the mp4 encode): the record says which ran (False after a failed compile fell back to eager).
            out["compile"] = bool(self.compiled)
            if self.compiled:
                out["compile_seconds"] = timer.compile_seconds
            return out

        return timer, stats

    @staticmethod
    def _sigmas(req: GenerationRequest) -> list[float]:
        if req.sigmas is not None:
            return validate_sigmas(req.sigmas)
        return linear_quadratic_schedule(req.steps, req.threshold_noise, req.linear_steps)


def _coefficients_name(source: str) -> str:
    """A TeaCache coefficient source as the record names it: the embedded model's file as
    "embedded:<name>" (its install path made the same request's bytes differ between installs), another file
    by its absolute path, anything else ("published (TeaCache4Mochi)") as it is."""
    from mochi.weights.bundle import embedded_path

    path = Path(source)
    if not path.is_file():
        return source
    if path.resolve().parent == embedded_path().resolve().parent:
        return f"embedded:{path.name}"
    return str(path.resolve())


def _check_uint8(frames: torch.Tensor, name: str) -> None:
    """ValueError unless ``frames`` (called ``name``) are uint8 levels, naming the conversion of floats."""
    if frames.dtype != torch.uint8:
        raise ValueError(
            f"{name} are {str(frames.dtype).removeprefix('torch.')}; give uint8 RGB frames (0-255), "
            "e.g. torch.from_numpy(mochi.video.to_uint8(frames)) for floats in [0, 1]"
        )


def _check_init_frames(frames: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Video-to-video frames are uint8 (T, H, W, 3) at the request's frame count and size."""
    _check_uint8(frames, "init_frames")
    if tuple(frames.shape) != shape:
        raise ValueError(
            f"init_frames have shape {tuple(frames.shape)}; this request needs {shape} (frames, height, "
            "width, RGB): mochi.video.fit_frames(clip, frames, height, width) crops and resizes a clip"
        )
