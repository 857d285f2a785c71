"""``generate --memory auto``: plan the loaded models for the device's free memory and pick a setting."""

from __future__ import annotations

import torch

from mochi.devices import available_memory, parse_device, resolve_dit_dtype
from mochi.memory.estimate import QUANT_MODES
from mochi.memory.planner import CUDA_RESERVE, GB, Job, Models, Option, choose, plan
from mochi.request import GenerationRequest
from mochi.weights.components import Components


def models_of(c: Components) -> Models:
    return Models(c.dit.config, c.text_encoder.config, c.decoder.cfg, kept_of(c.dit))


def kept_of(model: torch.nn.Module) -> tuple[tuple[str, int], ...]:
    """(layer, bytes of its weight and scale) of each Linear a loaded DiT keeps as stored (ggml blocks, fp8
    weights), as `mochi.memory.stored.kept_layers` reads them from a checkpoint's headers."""
    from mochi.weights.fp8 import Fp8Linear
    from mochi.weights.ggml import GgufLinear
    from mochi.weights.quantize import Int8Linear

    out = []
    for name, m in model.named_modules():
        if isinstance(m, GgufLinear) or (isinstance(m, Fp8Linear) and not isinstance(m, Int8Linear)):
            own = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
            out.append((name, sum(t.numel() * t.element_size() for n, t in own if n != "bias")))
    return tuple(sorted(out))


def quantization_of(model: torch.nn.Module) -> str:
    """The weight mode a loaded DiT or T5 is in, as the planner names them: "q8_0"/"q4_0" (ggml blocks kept;
    the types joined by "+" when layers differ: "q4_0+q8_0"), "fp8" (fp8 Linears kept), "int8" (mochi's or
    torchao's int8), else "none"."""
    from mochi.weights.fp8 import Fp8Linear
    from mochi.weights.ggml import GgufLinear
    from mochi.weights.quantize import Int8Linear, is_quantized

    kinds = sorted({m.kind.lower() for m in model.modules() if isinstance(m, GgufLinear)})
    if kinds:  # every layer's type, not the first met: the plan counts each layer as stored
        return "+".join(kinds)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            return "int8"
        if isinstance(m, Fp8Linear):
            return "fp8"
        if isinstance(m, torch.nn.Linear) and is_quantized(m):  # a torchao tensor: mochi's torchao mode
            return "int8"
    return "none"


def held(stored: tuple[str, str], quantize: str | None) -> tuple[str, str]:
    """(the DiT's, T5's) weight modes once loaded: each as ``stored`` (`quantization_of` the loaded model)
    where stored quantized, since ``--quantize`` keeps such layers as stored, else ``quantize`` when given.
    A DiT stored quantized holds its other block Linears, if any, as ``quantize`` (plan's ``dit_rest``)."""
    return tuple(s if s != "none" or quantize is None else quantize for s in stored)


def job_of(request: GenerationRequest) -> Job:
    """The planner's job for a resolved request (batched guidance unless guidance is off)."""
    scales = request.guidance if isinstance(request.guidance, list) else [request.guidance]
    guided, cond_only = any(g != 1.0 for g in scales), any(g == 1.0 for g in scales)
    return Job.from_request(
        request.frames,
        request.height,
        request.width,
        guided,
        request.cache,
        request.cache_threshold,
        cond_only,
    )


def choose_setting(
    c: Components,
    request: GenerationRequest,
    device: str | torch.device | None,
    dtype: str | None = None,
    quantize: str | None = None,
    vae_dtype: str | torch.dtype | None = None,
    max_memory: int | None = None,
) -> tuple[Option | None, str]:
    """(the fastest setting that fits the device's free memory, a sentence saying what was chosen).

    The weights are planned as they will be: a model stored quantized (a kept fp8 or GGUF DiT) as stored,
    since ``--quantize`` keeps such layers; any other model as ``quantize`` (``--quantize``, applied after
    loading) when given, else as loaded (full width); the decode within ``max_memory`` (``--max-memory``)
    when given, as the pipeline will decode.
    None on the CPU (nothing to plan: weights and activations share host memory). ValueError when nothing
    fits, naming the closest setting and, when one exists, a quantization that would fit.
    """
    from mochi.devices import parse_dtype

    dev = parse_device(device)
    if dev.type != "cuda":
        return None, f"--memory auto: running on {dev.type}, where there is no accelerator memory to plan"
    dit_dtype = resolve_dit_dtype(dtype, dev)
    budget = available_memory(dev)
    models, job = models_of(c), job_of(request)
    stored = quantization_of(c.dit), quantization_of(c.text_encoder)
    if quantize is not None:
        from mochi.weights.quantize import device_mode

        quantize = device_mode(quantize, dev)[0]
    quant, t5_quant = held(stored, quantize)
    common = {
        "dtypes": (dit_dtype,),
        "reserve": CUDA_RESERVE,
        "vae_dtype": parse_dtype(vae_dtype) or torch.float32,
        "max_memory": max_memory,  # the VAE budget the pipeline will decode within (--max-memory)
    }
    options = plan(
        models, job, budget, quants=(quant,), t5_quant=t5_quant, dit_rest=quantize or "none", **common
    )
    try:
        chosen = choose(options, budget)
    except ValueError as e:
        hint = ""
        for mode in QUANT_MODES[1:] if quantize is None else ():
            dit_mode, t5_mode = held(stored, mode)
            fitting = [
                o
                for o in plan(
                    models, job, budget, quants=(dit_mode,), t5_quant=t5_mode, dit_rest=mode, **common
                )
                if o.fits
            ]
            if fitting and (fitting[0].dit_rest is not None or (dit_mode, t5_mode) != (quant, t5_quant)):
                hint = f"; {fitting[0].describe()} would fit (--quantize {mode})"
                break
        raise ValueError(f"--memory auto: {e}{hint}") from None
    stage = max(chosen.peaks, key=chosen.peaks.__getitem__)
    note = (
        f"--memory auto: {chosen.describe()} (estimated peak {chosen.peak / GB:.1f} GB in the {stage} stage, "
        f"{budget / GB:.1f} GB free on {dev})"
    )
    return chosen, note


def auto_pipeline(model: str | None, device: str, request: GenerationRequest, options: dict):  # noqa: ANN201
    """Load the components, choose the offload that fits (``choose_setting``), build the pipeline.

    options: ``MochiPipeline.from_pretrained`` keywords; their "offload" must be unset ("none").
    Returns (MochiPipeline, the note saying what was chosen).
    """
    from mochi.pipeline import MochiPipeline
    from mochi.weights.components import load_components

    options = dict(options)
    if options.get("offload") not in (None, "none", False):
        raise ValueError(f"--memory auto chooses the offload itself; drop --offload {options['offload']}")
    loading = {k: options.pop(k) for k in ("vae", "t5", "tokenizer", "fp8") if k in options}
    dit_dtype = resolve_dit_dtype(options.get("dit_dtype"), parse_device(device))
    c = load_components(model, dit_dtype=dit_dtype, **loading)
    chosen, note = choose_setting(
        c,
        request.resolved(c.defaults),
        device,
        options.get("dit_dtype"),
        quantize=options.get("quantize"),
        vae_dtype=options.get("vae_dtype"),
        max_memory=options.get("max_memory"),
    )
    options["offload"] = chosen.offload if chosen is not None else "none"
    return MochiPipeline(c, device=device, **options), note
