"""Weight-only quantization of the DiT's and T5's Linear layers at load: int8, fp8, q8_0, q4_0.

  mode  storage per quantized weight                         computes with
  int8  int8 + an fp32 scale per output row (absmax/127.5)  torchao's int8 tensor (or `Int8Linear`)
  fp8   e4m3fn + an fp32 scale per output row (absmax/448)   `Fp8Linear`, dequantized per call
  q8_0  ggml blocks of 32: fp16 scale + 32 int8              `GgufLinear`, dequantized per call
  q4_0  ggml blocks of 32: fp16 scale + 16 bytes of nibbles  `GgufLinear`, dequantized per call

Every quantized layer computes in the model's compute dtype (the activations' dtype): the weight is
widened to it, one layer at a time, so only that layer's weight ever exists at full width. int8 uses
torchao when it is installed (the ``quant`` extra; its CPU and CUDA kernels multiply int8 weights directly)
and the project's `Int8Linear` (dequantized per call) otherwise. Both keep a symmetric int8 row and an fp32
row scale, but round differently (torchao: absmax/127.5 over -128..127; `Int8Linear`: absmax/127 over
-127..127), so the two give slightly different videos: the note, the sidecar and ``mochi generate`` say
which ran.

What is quantized: the Linear layers inside the DiT's blocks (99.0% of its weights) and the T5 encoder's
blocks (q, k, v, o, wi_0, wi_1, wo). What is not, and why:
  * fp32 islands (``pos_frequencies``, the q/k RMSNorm weights): the reference keeps them fp32 (§1.4);
  * norms and embeddings (the patch-embedding Conv2d, T5's token and relative-position embeddings): not
    Linear layers, and small;
  * the DiT's timestep embedder, caption pooler and caption projection (0.7% of the weights): they form
    the conditioning every block reads, and the timestep embedder's dtype is the model's compute dtype;
  * the final layer: its output is the velocity itself, with no later layer to average its error out.
A q8_0/q4_0 layer whose input width is not a multiple of 32 stays unquantized too.

LoRA applies to quantized layers unmerged (forward hooks on the Linear); merging is refused.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mochi.weights import ggml
from mochi.weights.fp8 import Fp8Linear

MODES = ("int8", "fp8", "q8_0", "q4_0")
_BLOCK_KINDS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
# Linear layers quantized: inside the DiT's blocks or the T5 encoder's blocks.
_TARGET = re.compile(r"^(blocks|encoder\.block)\.\d+\.")
_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def check_mode(mode: str) -> str:
    """``mode`` if it is a known quantization, else a ValueError naming it and the choices."""
    if mode not in MODES:
        import difflib

        near = difflib.get_close_matches(str(mode).lower(), MODES, n=1, cutoff=0.0)
        raise ValueError(
            f"quantization {mode!r} is not supported; choose one of {', '.join(MODES)} (nearest: {near[0]})"
        )
    return mode


def bytes_per_param(mode: str | None, dtype: torch.dtype = torch.bfloat16, in_features: int = 3072) -> float:
    """Bytes one weight of a quantized Linear takes, its scales included (``None``: unquantized ``dtype``).

    int8/fp8 carry one fp32 scale per output row, so 1 + 4/in_features; torchao's int8 tensor (used for int8
    when installed) also keeps an int8 zero point per row (0: the rows are symmetric), so 1 + 5/in_features;
    q8_0/q4_0 carry an fp16 scale per 32 weights (34/32 and 18/32). For whole models use `weight_bytes`,
    which counts every tensor.
    """
    if mode is None:
        return torch.empty((), dtype=dtype).element_size()
    check_mode(mode)
    if mode in _BLOCK_KINDS:
        return ggml.BLOCK_BYTES[_BLOCK_KINDS[mode]] / ggml.BLOCK
    zero_point = 1 if mode == "int8" and torchao_installed() else 0
    return 1 + (4 + zero_point) / in_features


def quantizable(name: str, module: nn.Module, mode: str) -> bool:
    """Whether ``quantize_model`` quantizes this submodule (by its path in the DiT or T5 encoder)."""
    if not isinstance(module, nn.Linear) or is_quantized(module) or not _TARGET.match(name):
        return False
    return mode not in _BLOCK_KINDS or module.in_features % ggml.BLOCK == 0


def is_quantized(module: nn.Module) -> bool:
    """Whether a Linear's weight is stored quantized (fp8, int8, ggml blocks or a torchao tensor)."""
    if isinstance(module, Fp8Linear | ggml.GgufLinear):
        return True
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and type(w) not in (torch.Tensor, nn.Parameter)


def weight_bytes(model: nn.Module, mode: str | None, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of ``model``'s weights once cast to ``dtype`` and quantized with ``mode`` (meta models work).

    fp32 islands (`AsymmDiT.is_fp32_param`) count at 4 bytes. Returns {"total", "quantized" (bytes of
    the quantized layers' weights and scales), "params" (all parameters), "quantized_params"}.
    ``mode=None`` is the unquantized model in ``dtype``.
    """
    item = torch.empty((), dtype=dtype).element_size()
    fp32 = getattr(model, "is_fp32_param", lambda name: False)
    layers = {n: m for n, m in model.named_modules() if mode is not None and quantizable(n, m, mode)}
    total = quantized = params = qparams = 0
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        params += p.numel() if isinstance(p, nn.Parameter) else 0
        layer = layers.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if layer is not None:
            n = round(p.numel() * bytes_per_param(mode, dtype, layer.in_features))
            quantized, qparams, total = quantized + n, qparams + p.numel(), total + n
        elif p.is_floating_point():
            total += p.numel() * (4 if fp32(name) else item)
        else:
            total += p.numel() * p.element_size()
    return {"total": total, "quantized": quantized, "params": params, "quantized_params": qparams}


def stored_bytes(module: nn.Module) -> int:
    """Bytes a module's parameters and buffers actually hold: a torchao tensor counts its int8 data and
    scales, ggml blocks their uint8 bytes, meta tensors their nominal size."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        names = [*getattr(t, "tensor_data_names", ()), *getattr(t, "optional_tensor_data_names", ())]
        parts = [p for n in names if isinstance(p := getattr(t, n, None), torch.Tensor)] or [t]
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


class Int8Linear(Fp8Linear):
    """`Fp8Linear` with an int8 weight: x @ (q·s)ᵀ + b in x's dtype, s an fp32 scale per output row.

    weight: (out, in) int8; weight_scale: (out, 1) fp32. Used for int8 when torchao is not installed.
    """

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _per_row(weight: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (w / s, s) with s = max|row| / qmax of shape (out, 1), clamped away from zero."""
    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    return w / scale, scale


def quantize_linear(linear: nn.Linear, mode: str) -> nn.Linear:
    """A quantized copy of ``linear`` (bias kept as is). Weights are read in their current dtype."""
    if mode in _BLOCK_KINDS:
        return ggml.GgufLinear.from_linear(linear, _BLOCK_KINDS[mode])
    if mode == "int8" and torchao_available():
        return _torchao_int8(linear)
    if mode == "int8":
        new = Int8Linear.like(linear, torch.int8)
        q, scale = _per_row(linear.weight, 127)
        q = q.round().clamp(-127, 127).to(torch.int8)
    else:
        new = Fp8Linear.like(linear, torch.float8_e4m3fn)
        q, scale = _per_row(linear.weight, _FP8_MAX)
        q = q.clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    new.weight = nn.Parameter(q, requires_grad=False)
    new.weight_scale = scale
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return new


def torchao_installed() -> bool:
    """Whether torchao is installed, found without importing it (seconds, and warnings where some of its
    kernels do not load): what the memory estimates go by, so that ``mochi plan`` never imports it."""
    return importlib.util.find_spec("torchao") is not None


def torchao_available() -> bool:
    try:
        _import_torchao()
    except ImportError:
        return False
    return True


def _import_torchao():  # noqa: ANN202 - torchao.quantization
    """torchao's quantization module, imported without the warnings newer torch logs about how torchao
    registers its enums for torch.compile ("W... register_constant() on Enum subclasses is deprecated"):
    printed above every --quantize int8 run, they were about torchao's code, not the user's."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization
    finally:
        logger.setLevel(level)
    return torchao.quantization


def _torchao_int8(linear: nn.Linear) -> nn.Linear:
    """torchao's int8 weight-only tensor (per-row symmetric scales) swapped into ``linear`` in place."""
    ao = _import_torchao()
    Int8WeightOnlyConfig, quantize_ = ao.Int8WeightOnlyConfig, ao.quantize_  # noqa: N806 - torchao's names

    linear.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's deprecation notices about its own config versions
        try:
            config = Int8WeightOnlyConfig(set_inductor_config=False)
        except TypeError:
            config = Int8WeightOnlyConfig()
        quantize_(linear, config)
    return linear


@dataclass
class Quantized:
    """What `quantize_model` did: layers quantized now, layers the checkpoint already held quantized
    (left as stored), and layers that could not take the mode (input width not a multiple of 32)."""

    mode: str
    layers: list[str]
    kept: list[str]
    skipped: list[str]

    def note(self, what: str) -> str:
        mode = self.mode
        if mode == "int8" and self.layers:  # two implementations with different numbers: say which ran
            mode += " (torchao)" if torchao_available() else " (mochi's Int8Linear)"
        parts = [f"{what}: {len(self.layers)} Linear layers quantized to {mode}"]
        if self.kept:
            parts.append(f"{len(self.kept)} already quantized in the checkpoint kept as stored")
        if self.skipped:
            parts.append(f"{len(self.skipped)} left unquantized (input width not a multiple of 32)")
        return "; ".join(parts)


def quantize_model(model: nn.Module, mode: str) -> Quantized:
    """Quantize ``model``'s eligible Linear layers (see the module docstring) to ``mode``, in place.

    Layers the checkpoint already stores quantized (fp8 kept, GGUF blocks) are left as they are:
    quantizing them again would add a second rounding to the first. Weights are read in their current
    dtype, so cast the model to its compute dtype first. Returns what was done (a `Quantized`).
    """
    check_mode(mode)
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError(
            "quantization cannot be combined with FSDP-sharded weights; use --parallel-weights replicate"
        )
    done: list[str] = []
    kept, skipped = _survey(model, mode)
    names = [n for n, m in model.named_modules() if quantizable(n, m, mode)]
    for name in names:
        _check_no_lora(name, model.get_submodule(name))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = quantize_linear(old, mode)
        if new is not old:  # an unmerged LoRA's hooks go with the layer, as they stay on torchao's (in place)
            for hooks in _HOOK_DICTS:
                setattr(new, hooks, getattr(old, hooks))
        setattr(parent, child, new)
        done.append(name)
    if done:
        _own_host_tensors(model)
    return Quantized(mode, done, kept, skipped)


# A module's forward hooks (and the dicts their handles remove them from): moved whole, so that a LoRA
# applied unmerged before quantizing still comes off with ``LoraHandle.remove``.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _check_no_lora(name: str, layer: nn.Module) -> None:
    """ValueError for a layer with a LoRA merged into its weight or a trainable LoRA on it: quantizing
    would bake the first in for good (``remove`` cannot subtract it from quantized weights) and drop the
    second's parameters."""
    if hasattr(layer, "_lora_merged"):
        raise ValueError(
            f"a LoRA is merged into {name}: quantizing would keep it in the weights for good; take it off "
            "(LoraHandle.remove) and quantize first, then apply the LoRA unmerged"
        )
    if hasattr(layer, "lora_A"):
        raise ValueError(
            f"{name} has a trainable LoRA: quantizing would drop it; save it and remove_trainable_lora first"
        )


def _survey(model: nn.Module, mode: str, ours: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(target layers stored quantized, other than ``ours``; target Linears that cannot take ``mode``)."""
    ours = set(ours)
    kept = [n for n, m in model.named_modules() if _TARGET.match(n) and is_quantized(m) and n not in ours]
    skipped = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and _TARGET.match(n)
        and not is_quantized(m)
        and not quantizable(n, m, mode)
    ]
    return kept, skipped


class AtLoad:
    """Quantization while a checkpoint is read: ``take`` for `mochi.weights.dit.read_dit` (and T5's reader).

    Each eligible Linear weight (``quantizable`` on the meta ``model``) is quantized the moment it is read and
    the full-width tensor dropped, so a load holds the quantized model plus one layer at full width, not
    the whole model. The same numbers as `quantize_model` on the loaded model: the weight is quantized in
    the dtype it was read (cast) to. Then ``install`` puts the layers into the model.
    """

    def __init__(
        self, model: nn.Module, mode: str, check: Callable[[str, torch.Tensor], None] | None = None
    ) -> None:
        self.mode = check_mode(mode)
        self.check = check  # e.g. finiteness, on each weight before it is quantized
        self.eligible = {n: m for n, m in model.named_modules() if quantizable(n, m, mode)}
        self.layers: dict[str, nn.Linear] = {}

    def __call__(self, key: str, t: torch.Tensor) -> bool:
        layer = key.removesuffix(".weight")
        m = self.eligible.get(layer) if key.endswith(".weight") else None
        if m is None or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False  # stored quantized (kept as stored), or not a target
        if tuple(t.shape) != tuple(m.weight.shape):
            return False  # left in the state dict, for the strict check to name
        if self.check is not None:
            self.check(key, t)
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(t, requires_grad=False)
        self.layers[layer] = quantize_linear(linear, self.mode)
        return True

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The full-width weight shapes of the layers taken (for the loader's strict key check)."""
        return {f"{n}.weight": tuple(self.eligible[n].weight.shape) for n in self.layers}

    def install(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> Quantized:
        """Swap the quantized layers into ``model``, their biases popped from ``sd``; what was done."""
        self.layers = {n: self.layers[n] for n in self.eligible if n in self.layers}  # the model's order
        for name, q in self.layers.items():
            if q.bias is not None:
                q.bias = nn.Parameter(sd.pop(f"{name}.bias"), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
        return Quantized(self.mode, list(self.layers), *_survey(model, self.mode, self.layers))


def _own_host_tensors(model: nn.Module) -> None:
    """Give the unquantized CPU tensors storage of their own.

    safetensors hands tensors out as views of one memory map of the file, which stays mapped while any of
    them lives: the pages of the weights just quantized would stay resident with it (a quantized bf16 model
    held ~1.9× the memory of its weights). Copying the few unquantized tensors (1% of the DiT) releases it.
    """
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            # A torchao tensor (a subclass) owns its int8 data already.
            if t is not None and t.device.type == "cpu" and type(t) in (torch.Tensor, nn.Parameter):
                t.data = t.data.clone()


def fp8_supported(device: torch.device) -> bool:
    """Whether ``device`` can hold fp8 tensors and widen them (all `Fp8Linear` needs; no fp8 matmul)."""
    try:
        torch.ones(2, device=device).to(torch.float8_e4m3fn).to(torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def device_mode(
    mode: str, device: torch.device, supported: Callable[[torch.device], bool] | None = None
) -> tuple[str, str | None]:
    """The mode to use on ``device`` and a note when it differs: fp8 falls back to int8 (same bytes)
    where the device cannot hold fp8 tensors (e.g. Apple MPS). ``supported`` defaults to `fp8_supported`."""
    check_mode(mode)
    if mode == "fp8" and not (supported or fp8_supported)(device):
        return "int8", f"{device} cannot hold fp8 tensors; quantizing to int8 instead (same memory)"
    return mode, None


def quantize_components(components, mode: str, device: torch.device) -> str:  # noqa: ANN001 - Components
    """Quantize the DiT's and T5's block Linears of ``components`` to ``mode`` for ``device``, in place, and
    record it in ``components.quantized``/``quantize_mode``; a component quantized already (at load or by
    an earlier pipeline) is not quantized again. Returns one line saying what holds.

    Raises ValueError when the components are quantized to another mode already.
    """
    asked = mode
    mode, note = device_mode(mode, device)
    held = components.quantize_mode
    if components.quantized and held != mode:
        names = " and ".join(components.quantized)
        raise ValueError(
            f"quantize={asked!r}: these components' {names} are quantized to {held} already, and a weight is "
            f"quantized once; pass quantize={held!r} or None, or load the components again to quantize them "
            f"to {mode}"
        )
    for name, module in (("dit", components.dit), ("t5", components.text_encoder)):
        if name not in components.quantized:
            components.quantized[name] = quantize_model(module, mode).note(name)
    components.quantize_mode = mode
    return "; ".join([*([note] if note else []), *components.quantized.values()])
