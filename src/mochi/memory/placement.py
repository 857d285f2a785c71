"""One DiT over several devices in one process: consecutive blocks on each, activations handed along.

``place_blocks`` fills the devices in order: device 0 takes the DiT's non-block layers (embedders, final
layer), the activations of a forward and as many consecutive blocks as fit its budget; the next device
continues from there. ``spread_dit`` moves the blocks and hooks each block whose predecessor lives elsewhere
to carry the streams (visual tokens, packed text, conditioning, RoPE table) across; the final layer runs
back on device 0. Blocks run one after another, so this buys memory, not speed (as diffusers'
``device_map="auto"``); the output equals one device's, the same kernels seeing the same values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from mochi.devices import size_text


def place_blocks(
    block_bytes: Sequence[int],
    budgets: Sequence[int],
    rest: int,
    activations: int,
    cache: tuple[int, int] = (0, 0),
) -> list[int]:
    """The device index of each block, consecutive blocks per device, in device order.

    block_bytes: weight bytes of each block; budgets: bytes usable on each device; rest: the non-block
    weights (on device 0); activations: a forward's peak activation bytes (needed on every device that
    holds blocks); cache: the step cache's bytes kept between steps beside the first block and beside the
    last block (``cache_shares``). ValueError when the blocks do not fit, saying how many bytes are missing.
    """
    if not budgets:
        raise ValueError("no devices to place the DiT's blocks on")
    if any(cache) and block_bytes:
        block_bytes = [block_bytes[0] + cache[0], *block_bytes[1:]]
        block_bytes[-1] += cache[1]
    free = [b - activations for b in budgets]
    free[0] -= rest
    if free[0] < 0:  # device 0 holds the layers around the blocks and runs them, whatever it gets of these
        raise ValueError(
            f"the first device's budget ({size_text(budgets[0])}) cannot hold the DiT's layers outside its "
            f"blocks and a forward's activations ({size_text(rest + activations)}); give it at least "
            f"{size_text(rest + activations + max(block_bytes, default=0))} in --max-memory"
        )
    out, device = [], 0
    for i, size in enumerate(block_bytes):
        while device < len(free) and size > free[device]:
            device += 1
        if device == len(free):
            missing = sum(block_bytes[i:]) - max(0, free[-1])
            sizes = ", ".join(size_text(b) for b in budgets)
            raise ValueError(
                f"the DiT does not fit the devices' budgets ({sizes}): blocks {i}-{len(block_bytes) - 1} are "
                f"left over, about {size_text(missing)} more is needed (add a device or raise --max-memory; "
                "without --devices, --offload blocks streams the blocks through one GPU instead)"
            )
        free[device] -= size
        out.append(device)
    return out


def cache_shares(cfg, job, dtype: torch.dtype) -> tuple[int, int]:  # noqa: ANN001 - DiTConfig, Job
    """Where the step cache of ``job`` (`mochi.memory.planner.Job`: its ``cache_tensors``) keeps its bytes
    between steps under ``--devices``, as ``place_blocks``' ``cache``: the probe (TeaCache's modulated input
    of block 0, FBCache's first-block residual) beside the first block, the blocks' residual (and with
    ``extrapolate`` the one before) beside the last block, whose output it is."""
    from mochi.memory.estimate import cache_bytes

    if not job.cache_tensors:
        return (0, 0)
    one = cache_bytes(cfg, job.latent, job.cache_rows, dtype, 1)
    return (one, (job.cache_tensors - 1) * one)


def _to(value: object, device: torch.device) -> object:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _to(getattr(value, f.name), device) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **fields)
    return value


class SpreadDiT:
    """The hooks that carry a DiT forward across devices (``spread_dit``); ``remove()`` takes them off.

    ``moves`` counts device changes made (a test statistic).
    """

    def __init__(self, dit: nn.Module, devices: Sequence[torch.device], placement: Sequence[int]) -> None:
        self.devices, self.placement = list(devices), list(placement)
        self.moves = 0
        self._hooks = []
        home = self.devices[0]
        for block, index in zip(dit.blocks, self.placement, strict=True):
            block.to(self.devices[index])
        for name, child in dit.named_children():
            if name != "blocks":
                child.to(home)
        dit.pos_frequencies.data = dit.pos_frequencies.data.to(home)
        for i, block in enumerate(dit.blocks):
            if i == 0 and self.placement[0] == 0:
                continue
            if i > 0 and self.placement[i] == self.placement[i - 1]:
                continue
            self._hooks.append(block.register_forward_pre_hook(self._mover(self.devices[self.placement[i]])))
        if self.placement[-1] != 0:
            self._hooks.append(dit.final_layer.register_forward_pre_hook(self._mover(home)))
        dit._mochi_spread = self  # mochi.offload.offloaded leaves a spread model where it is

    def _mover(self, device: torch.device):  # noqa: ANN202 - a forward pre-hook
        def hook(module: nn.Module, args: tuple) -> tuple:
            self.moves += 1
            return tuple(_to(a, device) for a in args)

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def spread_dit(
    dit: nn.Module,
    devices: Sequence[str | torch.device],
    budgets: Sequence[int],
    activations: int,
    cache: tuple[int, int] = (0, 0),
) -> SpreadDiT:
    """Place ``dit``'s blocks over ``devices`` within ``budgets`` bytes each (``place_blocks``, from the
    blocks' actual weight bytes, with the step cache's ``cache`` shares) and hook the forward to follow
    them. The DiT should be on the CPU or on device 0; each block moves once, straight to its device."""
    from mochi.weights.quantize import stored_bytes

    devices = [torch.device(d) for d in devices]
    if len(budgets) != len(devices):
        raise ValueError(f"{len(budgets)} memory budgets for {len(devices)} devices; give one per device")
    # The bytes the tensors hold: a torchao int8 weight's nominal element size is its bf16 wrapper's.
    blocks = [stored_bytes(b) for b in dit.blocks]
    placement = place_blocks(blocks, budgets, stored_bytes(dit) - sum(blocks), activations, cache)
    return SpreadDiT(dit, devices, placement)


def parse_devices(text: str) -> list[torch.device]:
    """ "cuda:0,cuda:1" → devices (each checked by ``mochi.devices.parse_device``); at least one."""
    from mochi.devices import parse_device

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--devices {text!r} names no device; write e.g. cuda:0,cuda:1")
    # A bare "cuda" is the current GPU: "cuda,cuda:0" names one card twice (its memory counted twice).
    devices = []
    for n in names:
        try:
            d = parse_device(n)
        except ValueError as e:  # its hint names --device, the one-device option
            raise ValueError(
                f"--devices {text!r}: {str(e).replace('use --device cpu', 'name cpu')}"
            ) from None
        devices.append(
            torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
        )
    if len(set(devices)) != len(devices) and any(d.type == "cuda" for d in devices):
        raise ValueError(f"--devices {text!r} names a device twice; each GPU once, e.g. cuda:0,cuda:1")
    return devices


def parse_budgets(text: str | None, devices: Sequence[torch.device], reserve: int) -> list[int]:
    """Per-device budgets from ``--max-memory`` ("20GB,24GB", one per device, or one size for all);
    by default each device's free memory less ``reserve``."""
    from mochi.devices import available_memory, parse_size

    if text is None:
        return [available_memory(d) - reserve for d in devices]
    sizes = [parse_size(t, "--max-memory", budget=True) for t in text.split(",")]
    if len(sizes) == 1:
        return sizes * len(devices)
    if len(sizes) != len(devices):
        raise ValueError(
            f"--max-memory gives {len(sizes)} sizes for {len(devices)} devices; "
            "give one per device or one for all"
        )
    return sizes


def check_no_offload(offload: str | bool | None) -> None:
    """``--devices`` with an ``--offload`` other than none is refused: the placement holds the DiT's blocks
    on their devices, which offload would move (``spread_pipeline``; the CLI checks it before loading)."""
    if offload not in (None, "none", False):
        raise ValueError(f"--devices places the DiT itself; drop --offload {offload}")


def spread_pipeline(model: str | None, devices: str, max_memory: str | None, request, options: dict):  # noqa: ANN001, ANN201
    """A pipeline whose DiT is spread over ``devices`` (T5 and the VAE visit the first device for their
    stage, as under model offload). Returns (MochiPipeline, a note saying which blocks went where)."""
    from mochi.devices import resolve_dit_dtype
    from mochi.memory.auto import job_of, models_of
    from mochi.memory.estimate import dit_activations
    from mochi.memory.planner import CUDA_RESERVE
    from mochi.pipeline import MochiPipeline
    from mochi.weights.components import load_components

    devs = parse_devices(devices)
    options = {k: v for k, v in options.items() if k != "max_memory"}
    check_no_offload(options.get("offload"))
    loading = {k: options.pop(k) for k in ("vae", "t5", "tokenizer", "fp8") if k in options}
    c = load_components(model, dit_dtype=resolve_dit_dtype(options.get("dit_dtype"), devs[0]), **loading)
    options["offload"] = "model"
    pipe = MochiPipeline(c, device=devs[0], **options)
    job, models = job_of(request.resolved(c.defaults)), models_of(c)
    act = dit_activations(models.dit, job.latent, job.batch, tuple(job.text_tokens), pipe.dit_dtype)
    reserve = CUDA_RESERVE if devs[0].type == "cuda" else 0
    held = cache_shares(models.dit, job, pipe.dit_dtype)
    spread = spread_dit(c.dit, devs, parse_budgets(max_memory, devs, reserve), act, held)
    counts = [spread.placement.count(i) for i in range(len(devs))]
    note = "DiT blocks per device: " + ", ".join(f"{d} {n}" for d, n in zip(devs, counts, strict=True))
    return pipe, note
