"""LoRA on a built DiT, applied from outside: the model file knows nothing of it (genmo-mochi.md §6.1).

A LoRA adds ``Δ(x) = (x·Aᵀ·Bᵀ)·scale·alpha/r`` to a Linear layer's output, with A (r, in) and B (out, r).
Two ways to carry one:

* **trainable** (``add_trainable_lora``): ``lora_A``/``lora_B`` are registered as parameters on the target
  ``nn.Linear`` itself, and a forward hook adds Δ. The model's state-dict keys are then exactly Genmo's
  (``blocks.3.attn.qkv_x.lora_A``), A is kaiming-uniform(a=√5) and B zero, so a fresh LoRA changes nothing.
* **applied** (``apply_lora``): a loaded LoRA, any number at once, each with its own scale, either
  *unmerged* (a forward hook per LoRA and layer; the base weights are untouched) or *merged* into the
  weights, W += scale·(alpha/r)·B·A computed in fp32 and rounded once to the weight's dtype.

Unmerging (``LoraHandle.remove``) subtracts the same fp32 Δ and rounds again. That restores each element to
within a unit in the last place of the larger of it and its merged value: an element small beside Δ (a bf16
one most of all) can come back many of its own units off, and the errors add up over repeated merges;
``keep_original=True`` keeps a copy of each touched weight, on the CPU, one per weight however many LoRAs
are merged into it: removing a LoRA, in any order, rebuilds the weight from that copy and the LoRAs still
merged (bit for bit what merging only those would give; the copy itself once none is left). A Δ too large
for subtraction to give the weight back (a huge scale) keeps the copy anyway, and one that would make a
weight infinite is refused before any weight changes. The copies cost the touched weights' size in their
dtype, in CPU memory: 5.4 GB for the default targets of the released 10B DiT in bf16 (191 weights), 19.9 GB
with every target. Scales are finite real numbers (``check_scale``).
Quantized weights (fp8, int8, GGUF blocks: `mochi.weights.quantize.is_quantized`) are never merged into:
re-quantizing the sum would lose most of Δ. Apply the LoRA unmerged (its hook adds Δ to the quantized
layer's output), or load the checkpoint unquantized.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mochi.finite import all_finite

# Genmo's targets (§6.1): the qkv_proj group and the out_proj group of every block's attention.
DEFAULT_TARGETS: tuple[str, ...] = ("qkv_x", "qkv_y", "proj_x", "proj_y")
# Every Linear inside a block that a LoRA may target, by its name relative to the block.
BLOCK_LINEARS: dict[str, str] = {
    "qkv_x": "attn.qkv_x",
    "qkv_y": "attn.qkv_y",
    "proj_x": "attn.proj_x",
    "proj_y": "attn.proj_y",
    "mod_x": "mod_x",
    "mod_y": "mod_y",
    "mlp_x.w1": "mlp_x.w1",
    "mlp_x.w2": "mlp_x.w2",
    "mlp_y.w1": "mlp_y.w1",
    "mlp_y.w2": "mlp_y.w2",
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)$")


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Validate target names (``qkv_x``, ``proj_y``, ``mlp_x.w1`` …); returns them as a tuple."""
    targets = tuple(targets)
    if not targets:
        raise ValueError(f"LoRA targets are empty; choose from {list(BLOCK_LINEARS)}")
    for t in targets:
        if t not in BLOCK_LINEARS:
            import difflib

            near = difflib.get_close_matches(t, list(BLOCK_LINEARS), n=1, cutoff=0.0)
            raise ValueError(
                f"unknown LoRA target {t!r}: must be one of {list(BLOCK_LINEARS)}; did you mean {near[0]!r}?"
            )
    return targets


def target_of(name: str) -> str | None:
    """The target name (``qkv_x`` …) of a module path such as ``blocks.3.attn.qkv_x``, or None."""
    m = _BLOCK.match(name)
    if m is None:
        return None
    return next((t for t, rel in BLOCK_LINEARS.items() if rel == m.group(2)), None)


def target_modules(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """The Linear layers named by ``targets`` in every block, by module path. A block where the target is not
    a Linear (the last block's ``proj_y`` is an Identity, it has no ``mlp_y``) is skipped."""
    wanted = set(check_targets(targets))
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and target_of(name) in wanted
    }


def _delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """(…, in) → (…, out): x·Aᵀ·Bᵀ·scaling, in x's dtype (autocast, when on, picks the matmul dtype).

    The factors follow x to its device, so an offloaded model may move after the LoRA is applied.
    """
    a, b = a.to(x.device, x.dtype), b.to(x.device, x.dtype)
    return F.linear(F.linear(x, a), b) * scaling


# -- trainable LoRA: Genmo's parameter names on the layer itself ------------------------------------------


def add_trainable_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 16.0,
    targets: Iterable[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Register ``lora_A`` (r, in) and ``lora_B`` (out, r) on every target Linear and hook them in.

    A is kaiming_uniform(a=√5) as nn.Linear's weight, B zeros (§6.1); both ``dtype`` (fp32 by default, also
    under a bf16 base) on the layer's device. ``dropout`` applies to the LoRA branch's input in training
    mode. Freezes every other parameter. Returns the module paths that got a LoRA.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank={rank} must be at least 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout={dropout} must be in [0, 1)")
    modules = target_modules(model, targets)
    if not modules:
        raise ValueError(f"the model has no Linear layer named by the LoRA targets {list(targets)}")
    model.requires_grad_(False)
    scaling = alpha / rank
    for layer in modules.values():
        if hasattr(layer, "lora_A"):
            raise ValueError("the model already has a trainable LoRA; remove it first")
        device = layer.weight.device
        a = torch.empty(rank, layer.in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        layer.lora_A = nn.Parameter(a)
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, rank, dtype=dtype, device=device))

        def hook(m: nn.Module, args: tuple, out: torch.Tensor, scaling: float = scaling) -> torch.Tensor:
            x = F.dropout(args[0], dropout, m.training) if dropout else args[0]
            return out + _delta(x, m.lora_A, m.lora_B, scaling).to(out.dtype)

        layer._lora_trainable_hook = layer.register_forward_hook(hook)
    return list(modules)


def trainable_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable LoRA's tensors under Genmo's keys (``blocks.i.attn.qkv_x.lora_A`` …), detached."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def remove_trainable_lora(model: nn.Module) -> None:
    """Take the trainable LoRA's hooks and parameters off every layer."""
    for m in model.modules():
        if hasattr(m, "_lora_trainable_hook"):
            m._lora_trainable_hook.remove()
            del m._lora_trainable_hook, m.lora_A, m.lora_B


# -- applied LoRAs: loaded files, merged or not ---------------------------------------------------------


@dataclass
class LoraLayer:
    """One layer's factors: A (r, in), B (out, r) and alpha; the layer adds scale·(alpha/r)·x·Aᵀ·Bᵀ."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self, scale: float = 1.0) -> torch.Tensor:
        """scale·(alpha/r)·B·A (out, in) in fp32."""
        return (self.B.float() @ self.A.float()) * (scale * self.scaling)


@dataclass
class _Merged:
    """The applied LoRAs merged into one weight, oldest first, and a copy of the weight as it was before them
    (on the CPU; None when no merge asked for one)."""

    original: torch.Tensor | None
    loras: list[tuple[LoraHandle, LoraLayer]] = field(default_factory=list)


@dataclass
class LoraHandle:
    """A LoRA applied to a model; ``remove()`` takes it off again (unmerging if it was merged)."""

    model: nn.Module
    layers: dict[str, LoraLayer]
    scale: float
    merged: bool
    _hooks: list = field(default_factory=list)
    removed: bool = False

    @property
    def originals(self) -> dict[str, torch.Tensor]:
        """The kept copies (CPU) of the weights this merged LoRA is in, by module path; shared with the other
        LoRAs merged into the same weights."""
        kept = {}
        for name in self.layers:
            record = getattr(self.model.get_submodule(name), "_lora_merged", None)
            if record is not None and record.original is not None:
                kept[name] = record.original
        return kept

    @torch.no_grad()
    def remove(self) -> None:
        """Take the LoRA off, in any order among several. A merged weight with a kept original is rebuilt
        from it and the LoRAs still merged into it, oldest first, so that it ends bit for bit as merging
        only those would have left it (the original itself once none is left); without one, Δ is
        subtracted again."""
        if self.removed:
            return
        for h in self._hooks:
            h.remove()
        if self.merged:
            for name, layer in self.layers.items():
                m = self.model.get_submodule(name)
                record: _Merged = m._lora_merged
                record.loras = [(h, lr) for h, lr in record.loras if h is not self]
                w = m.weight
                if record.original is None:
                    w.copy_(w.float() - layer.delta_weight(self.scale).to(w.device))
                else:
                    rebuilt = record.original.to(w.device)
                    for h, lr in record.loras:
                        rebuilt = (rebuilt.float() + lr.delta_weight(h.scale).to(w.device)).to(w.dtype)
                    w.copy_(rebuilt)
                if not record.loras:
                    del m._lora_merged
        self.removed = True


def check_scale(scale: object, source: str = "LoRA") -> float:
    """A LoRA's scale as a float: a finite real number (bools and strings are not scales)."""
    import numbers

    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"{source}: scale {scale!r} must be a number, not {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{source}: scale {scale} must be finite; 1.0 applies the LoRA as trained")
    return float(scale)


def check_fits(model: nn.Module, layers: Mapping[str, LoraLayer], source: str = "LoRA") -> None:
    """Raise ValueError unless every LoRA layer names a Linear of ``model`` with matching shapes."""
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise ValueError(
                f"{source} targets {name!r}, which is not a Linear layer of this model "
                f"(depth {len(getattr(model, 'blocks', []))}); was it trained for another model?"
            )
        if layer.rank < 1:
            raise ValueError(
                f"{source} layer {name!r} has rank 0 (A {tuple(layer.A.shape)}); it needs rank 1 or more"
            )
        if layer.A.shape != (layer.rank, m.in_features) or layer.B.shape != (m.out_features, layer.rank):
            raise ValueError(
                f"{source} layer {name!r} has A {tuple(layer.A.shape)}, B {tuple(layer.B.shape)}; "
                f"the model's layer needs A (r, {m.in_features}) and B ({m.out_features}, r): "
                "trained for another model?"
            )


def apply_lora(
    model: nn.Module,
    layers: Mapping[str, LoraLayer],
    scale: float = 1.0,
    merge: bool = False,
    keep_original: bool = False,
    source: str = "LoRA",
) -> LoraHandle:
    """Apply a LoRA (module path → factors) to ``model`` at ``scale``; several may be applied at once.
    ``source`` names the LoRA in errors (e.g. "LoRA 'style.safetensors'").

    merge=False hooks Δ into each layer's output (factors are moved to the layer's device, kept in their
    dtype); merge=True adds it into the weights in fp32 (see the module docstring for unmerging and fp8).
    """
    from mochi.weights.quantize import is_quantized

    scale = check_scale(scale, source)
    check_fits(model, layers, source)
    handle = LoraHandle(model, {}, scale, merge)
    if merge:
        sharded = [n for n in layers if type(model.get_submodule(n).weight).__name__ == "DTensor"]
        if sharded:  # FSDP2's weights: each rank holds some rows, which a merge cannot add a delta to
            raise ValueError(
                f"cannot merge a LoRA into weights sharded over ranks ({sharded[0]} …, --parallel-weights "
                "shard): apply it unmerged (leave out --lora-merge), or use --parallel-weights replicate"
            )
        quantized = [n for n in layers if is_quantized(model.get_submodule(n))]
        if quantized:
            raise ValueError(
                f"cannot merge a LoRA into quantized weights ({quantized[0]} …): re-quantizing would lose "
                "it; apply it unmerged, or load the model unquantized (no --quantize, --fp8 dequantize)"
            )
    try:
        for name, layer in layers.items():
            m = model.get_submodule(name)
            device = m.weight.device
            placed = LoraLayer(layer.A.to(device), layer.B.to(device), layer.alpha)
            if merge:
                _merge(handle, name, m, placed, keep_original, source)
            else:
                handle.layers[name] = placed

                def hook(m: nn.Module, args: tuple, out: torch.Tensor, p: LoraLayer = placed) -> torch.Tensor:
                    return out + _delta(args[0], p.A, p.B, scale * p.scaling).to(out.dtype)

                handle._hooks.append(m.register_forward_hook(hook))
    except BaseException:
        handle.remove()  # none of it stays applied
        raise
    return handle


@torch.no_grad()
def _merge(
    handle: LoraHandle, name: str, m: nn.Linear, layer: LoraLayer, keep_original: bool, source: str
) -> None:
    """Add one layer's Δ into ``m.weight``, recorded on ``m`` (``_lora_merged``) so that ``remove`` takes it
    off again.

    A Δ that is not finite in fp32 is refused before the weight is touched. With ``keep_original`` the weight
    is copied to the CPU unless it already has a copy: one copy per weight, however many LoRAs are merged
    into it. Where subtracting Δ again would not give the weight back to within a few units of its dtype's
    last place (a Δ so large that the sum rounds the weight away, e.g. a huge scale), the copy is taken
    whatever ``keep_original`` says, so that a merged LoRA can always be taken off. A copy taken while
    LoRAs merged without one are in the weight is of the weight with their Δ subtracted.
    """
    weight = m.weight
    delta = layer.delta_weight(handle.scale)
    merged = (weight.float() + delta).to(weight.dtype)
    if not (all_finite(delta) and all_finite(merged)):
        raise ValueError(
            f"{source} layer {name!r} at scale {handle.scale:g} makes the merged weight infinite or NaN in "
            f"{str(weight.dtype).removeprefix('torch.')}; lower the scale (1.0 applies the LoRA as trained)"
        )
    record: _Merged = getattr(m, "_lora_merged", None) or _Merged(None)
    if record.original is None and not keep_original:
        # Unmerging rounds once more; beyond a few units of the weight's largest magnitude it is lossy.
        error = (merged.float() - delta - weight.float()).abs().max()
        keep_original = bool(error > 4 * torch.finfo(weight.dtype).eps * weight.float().abs().max())
    if record.original is None and keep_original:
        original = weight.detach()
        for h, lr in reversed(record.loras):
            original = (original.float() - lr.delta_weight(h.scale).to(weight.device)).to(weight.dtype)
        record.original = original.to("cpu", copy=True)
    record.loras.append((handle, layer))
    m._lora_merged = record
    handle.layers[name] = layer
    weight.copy_(merged)
