"""Offload: whole models visit the accelerator only for their stage, or blocks stream through it.

Modes (``parse_offload``):

* ``none``: every model lives on the device.
* ``model``: each model (T5, DiT, VAE decoder) is moved to the device for its stage and back after it
  (``mochi.devices.placed``); the peak is the largest model plus its activations.
* ``blocks[:N]``: the DiT keeps its first N joint blocks (default 0) and its small non-block layers
  (embedders, final layer: 0.3% of the weights) on the device for the denoising stage, and streams the
  other blocks from pinned host memory one group at a time: while a group computes, the next one is
  copied on a side CUDA stream, so the copy hides behind the compute. T5's 24 layers stream the same way
  (none resident: T5 runs once per request, so residency would buy nothing); the VAE decoder moves as a
  whole model, as under ``model``.

The host copy of each weight is the master: the device copy of a streamed block is dropped after its
forward (weights are read-only at inference, so nothing is copied back), and LoRA merges, which happen
between stages, write the master. When the device is where the masters live (the CPU), there is nothing
to copy: the blocks run from the masters and only the bookkeeping runs, as diffusers' group offloading
does there. ``copy=True`` forces real host-to-host copies, so that tests can count resident blocks and
check that the streamed output equals no offload.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mochi.devices import placed

OFFLOAD_KINDS = ("none", "model", "blocks")


@dataclass(frozen=True)
class Offload:
    """An offload mode: kind "none", "model" or "blocks"; ``resident`` DiT blocks kept on the device."""

    kind: str = "none"
    resident: int = 0

    def __str__(self) -> str:
        return f"blocks:{self.resident}" if self.kind == "blocks" else self.kind

    @property
    def active(self) -> bool:
        return self.kind != "none"


def parse_offload(value: bool | str | Offload | None) -> Offload:
    """False/None/"none", True/"model", "blocks" or "blocks:N" (N ≥ 0 resident DiT blocks) → ``Offload``."""
    if isinstance(value, Offload):
        return value
    if value is None or value is False:
        return Offload()
    if value is True:
        return Offload("model")
    text = str(value).strip().lower()
    if text in ("none", "model"):
        return Offload(text)
    kind, _, count = text.partition(":")
    if kind == "blocks" and (not count or (count.isascii() and count.isdigit())):  # "²" is a digit to isdigit
        return Offload("blocks", int(count or 0))
    raise ValueError(
        f"offload {value!r} is not understood; choose none, model, blocks or blocks:N "
        "(N DiT blocks kept on the GPU, e.g. blocks:8)"
    )


def check_resident(mode: Offload, depth: int | None) -> None:
    """Refuse ``blocks:N`` with more resident blocks than the DiT's ``depth`` (None: not known yet)."""
    if depth is not None and mode.kind == "blocks" and mode.resident > depth:  # it was clamped silently
        raise ValueError(
            f"offload blocks:{mode.resident} keeps more blocks on the device than the DiT's {depth}; "
            f"nearest valid: blocks:{depth} (or offload model)"
        )


def _entries(module: nn.Module, skip: Sequence[nn.Module] = ()) -> list[tuple[nn.Module, str, bool]]:
    """(owner, name, is_parameter) of every tensor of ``module`` outside the modules in ``skip``."""
    skipped = {id(m) for s in skip for m in s.modules()}
    out = []
    for m in module.modules():
        if id(m) in skipped:
            continue
        out += [(m, n, True) for n, p in m._parameters.items() if p is not None]
        out += [(m, n, False) for n, b in m._buffers.items() if b is not None]
    return out


def _get(entry: tuple[nn.Module, str, bool]) -> torch.Tensor:
    m, name, is_param = entry
    return m._parameters[name].data if is_param else m._buffers[name]


def _set(entry: tuple[nn.Module, str, bool], t: torch.Tensor) -> None:
    m, name, is_param = entry
    if is_param and type(t) is not torch.Tensor:
        # A tensor subclass (torchao's quantized weights) cannot take `.data =` in inference mode
        # (aten._has_compatible_shallow_copy_type is not implemented for it): the Parameter is replaced.
        m._parameters[name] = nn.Parameter(t, requires_grad=m._parameters[name].requires_grad)
    elif is_param:
        m._parameters[name].data = t
    else:
        m._buffers[name] = t


def _plain(t: torch.Tensor) -> bool:
    """Not a tensor subclass made of other tensors (``__tensor_flatten__``, as torchao's weights are)."""
    return type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__")


def _inner(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s data: itself, or a tensor subclass's (torchao's quantized weights
    follow PyTorch's ``__tensor_flatten__`` protocol), recursively."""
    if _plain(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for name in names for x in _inner(getattr(t, name))]


def _map_inner(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` applied to the plain tensors inside ``t``, rebuilt as ``t``'s type (pinning a subclass's
    memory need not be implemented by it: its parts' is)."""
    if _plain(t):
        return fn(t)
    names, context = t.__tensor_flatten__()
    parts = {name: _map_inner(getattr(t, name), fn) for name in names}
    return type(t).__tensor_unflatten__(parts, context, t.size(), t.stride())


def _copies(device: torch.device, copy: bool | None) -> bool:
    """Whether streaming to ``device`` makes copies: always off the CPU; on it only when forced."""
    return device.type != "cpu" if copy is None else copy


class _TensorSet:
    """The tensors of some modules, with their host masters: ``load`` puts copies on the device (on
    ``stream`` when given), ``unload`` points the modules back at the masters (the copies are freed).
    With ``copy`` False (the device holds the masters already) both only keep the bookkeeping."""

    def __init__(
        self, entries: list[tuple[nn.Module, str, bool]], device: torch.device, pin: bool, copy: bool = True
    ) -> None:
        self.entries, self.device, self.copy = entries, device, copy
        self.masters = []
        for e in entries:
            t = _get(e)
            if t.device.type != "cpu":
                raise ValueError(f"block offload needs the weights on the CPU first, found one on {t.device}")
            if pin and not all(x.is_pinned() for x in _inner(t)):
                t = _map_inner(t, torch.Tensor.pin_memory)
                _set(e, t)
            self.masters.append(t)
        self.event: torch.cuda.Event | None = None
        self.loaded = False

    def load(self, stream: torch.cuda.Stream | None = None) -> None:
        if self.loaded:
            return
        if not self.copy:
            self.loaded = True
            return
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for e, master in zip(self.entries, self.masters, strict=True):
                # On the CPU, clone: a distinct copy, so that residency is real and countable.
                on_device = (
                    master.clone() if self.device.type == "cpu" else master.to(self.device, non_blocking=True)
                )
                _set(e, on_device)
            if stream is not None:
                self.event = torch.cuda.Event()
                self.event.record(stream)
        self.loaded = True

    def wait(self) -> None:
        """Make the compute stream wait for this set's copies, and keep them alive until it is done."""
        if self.event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self.event)
        for e in self.entries:
            for t in _inner(_get(e)):  # a subclass's parts: record_stream need not be implemented by it
                t.record_stream(compute)
        self.event = None

    def unload(self) -> None:
        if not self.copy:
            self.loaded = False
            return
        for e, master in zip(self.entries, self.masters, strict=True):
            _set(e, master)
        self.loaded, self.event = False, None


class BlockStreamer:
    """Run ``blocks`` (called in order) on ``device`` with only ``resident`` of them kept there.

    The first ``resident`` blocks are loaded for the streamer's lifetime (a context manager); the others
    are loaded ``group`` blocks at a time, the next group copied while the current one computes (on a side
    CUDA stream on GPUs), and dropped after their forward; after the last group, the first one is fetched
    again for the next call. At most ``resident + 2·group`` blocks are on the device at once.
    copy: make device copies (default: off the CPU only; True forces host-to-host copies on the CPU).
    Statistics for tests: ``peak_blocks`` (most blocks on the device at once) and ``loads`` (group loads).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: str | torch.device,
        resident: int = 0,
        group: int = 1,
        copy: bool | None = None,
    ) -> None:
        if group < 1:
            raise ValueError(f"block group size {group} is invalid: it must be ≥ 1; nearest: 1")
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.resident = max(0, min(resident, len(self.blocks)))
        self.group = group
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self._pin = cuda
        self._copy = _copies(self.device, copy)
        self._hooks: list = []
        self.peak_blocks = 0
        self.loads = 0

    def _loaded_blocks(self) -> int:
        return self.resident + sum(len(g) for g, s in zip(self._groups, self._sets, strict=True) if s.loaded)

    def __enter__(self) -> BlockStreamer:
        kept = self.blocks[: self.resident]
        self._resident = _TensorSet(
            [e for b in kept for e in _entries(b)], self.device, self._pin, self._copy
        )
        self._resident.load()
        streamed = self.blocks[self.resident :]
        self._groups = [streamed[i : i + self.group] for i in range(0, len(streamed), self.group)]
        self._sets = [
            _TensorSet([e for b in g for e in _entries(b)], self.device, self._pin, self._copy)
            for g in self._groups
        ]
        for gi, g in enumerate(self._groups):
            self._hooks.append(g[0].register_forward_pre_hook(lambda m, a, gi=gi: self._before(gi)))
            self._hooks.append(g[-1].register_forward_hook(lambda m, a, o, gi=gi: self._after(gi)))
            # For code that reads a streamed block's weights without calling it (TeaCache's probe of block
            # 0's modulation): on a GPU its copy may still be in flight on the side stream.
            g[0].mochi_ready = lambda gi=gi: self._before(gi)
        self.peak_blocks = self._loaded_blocks()
        if self._sets:
            self._fetch(0)  # overlaps with whatever runs before the first streamed block
        return self

    def _fetch(self, gi: int) -> None:
        if not self._sets[gi].loaded:
            self._sets[gi].load(self.stream)
            self.loads += 1
            self.peak_blocks = max(self.peak_blocks, self._loaded_blocks())

    def _before(self, gi: int) -> None:
        self._fetch(gi)  # synchronous only if no prefetch reached it (never after the first group)
        self._sets[gi].wait()
        self._fetch((gi + 1) % len(self._sets))

    def _after(self, gi: int) -> None:
        if len(self._sets) > 1:
            self._sets[gi].unload()

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for g in self._groups:
            g[0].__dict__.pop("mochi_ready", None)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for s in [self._resident, *self._sets]:
            s.unload()


def stream_blocks_of(module: nn.Module) -> tuple[nn.ModuleList | None, int | None]:
    """(the blocks of ``module`` that stream under block offload, how many stay resident; None: as asked).

    The DiT's joint blocks (resident as the mode says); T5's encoder layers, of which only the first stays,
    because T5's forward reads its relative-position table before the first layer runs. None for other
    models (they move whole).
    """
    if isinstance(getattr(module, "blocks", None), nn.ModuleList):
        return module.blocks, None
    encoder = getattr(module, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "block", None), nn.ModuleList):
        return encoder.block, 1
    return None, None


@contextlib.contextmanager
def offloaded(
    module: nn.Module,
    device: torch.device,
    mode: Offload,
    resident: int | None = None,
    group: int = 1,
    copy: bool | None = None,
) -> Iterator[nn.Module]:
    """Run a stage with ``module`` on ``device`` as ``mode`` says (see the module docstring).

    resident: blocks kept on the device under ``blocks`` mode (default: ``mode.resident`` for the DiT, 1 for
    T5). copy: see `BlockStreamer` (None: copies off the CPU only).
    """
    if not mode.active or getattr(module, "_mochi_spread", None) is not None:
        yield module  # a DiT spread over several devices (mochi.memory.placement) stays where it is
        return
    blocks, fixed = stream_blocks_of(module)
    if mode.kind == "model" or blocks is None:
        with placed(module, device, True):
            yield module
        return
    copies = _copies(device, copy)
    rest = _TensorSet(_entries(module, skip=[blocks]), device, device.type == "cuda", copies)
    rest.load()
    try:
        keep = resident if resident is not None else fixed if fixed is not None else mode.resident
        with BlockStreamer(blocks, device, keep, group, copies):
            yield module
    finally:
        rest.unload()
        if device.type == "cuda":
            torch.cuda.empty_cache()
