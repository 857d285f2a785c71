"""Block-streamed offload (mochi.offload): same output as no offload, and only the asked blocks resident.

On the CPU the streamer copies nothing by default (the device holds the masters); with ``copy=True`` a
"device copy" is a clone, so residency is counted from the tensors themselves: a block is on the device
when its weights are not the host masters.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mochi.models.dit import DIT_PRESETS, AsymmDiT
from mochi.models.t5 import T5_PRESETS, T5Encoder
from mochi.offload import BlockStreamer, Offload, offloaded, parse_offload
from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest

from .test_pipeline import tiny_components

DIT6 = dataclasses.replace(DIT_PRESETS["tiny"], depth=6)


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 12, 2, 4, 4, generator=g)
    text = torch.randn(batch, 5, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]][:batch]).bool()
    return x, torch.tensor([0.3, 0.8][:batch]), text, mask


def _dit() -> AsymmDiT:
    torch.manual_seed(0)
    return AsymmDiT(DIT6).eval().requires_grad_(False)


def _ptrs(module: torch.nn.Module) -> list[int]:
    return [p.data_ptr() for p in module.parameters()]


def test_parse_offload():
    assert parse_offload(None) == parse_offload(False) == parse_offload("none") == Offload()
    assert parse_offload(True) == parse_offload("model") == Offload("model")
    assert parse_offload("blocks") == Offload("blocks", 0)
    assert parse_offload("blocks:12") == Offload("blocks", 12)
    assert str(Offload("blocks", 3)) == "blocks:3"
    with pytest.raises(ValueError, match=r"'blocks:x' is not understood; choose none, model, blocks"):
        parse_offload("blocks:x")
    with pytest.raises(ValueError, match="'layers'"):
        MochiPipeline(tiny_components(), device="cpu", offload="layers")


@pytest.mark.parametrize(("resident", "group"), [(0, 1), (2, 1), (1, 2), (6, 1)])
@torch.inference_mode()
def test_streamed_dit_equals_resident_and_bounds_residency(resident, group):
    dit = _dit()
    inputs = _inputs()
    expected = dit(*inputs)
    masters = [_ptrs(b) for b in dit.blocks]
    seen = []

    def count(*_):  # how many blocks hold device copies while each block runs
        seen.append(sum(_ptrs(b) != m for b, m in zip(dit.blocks, masters, strict=True)))

    hooks = [b.register_forward_pre_hook(count) for b in dit.blocks]
    with BlockStreamer(dit.blocks, "cpu", resident=resident, group=group, copy=True) as streamer:
        first = dit(*inputs)
        second = dit(*inputs)
    for h in hooks:
        h.remove()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    bound = min(6, resident + 2 * group)
    assert max(seen) <= bound and streamer.peak_blocks <= bound
    assert max(seen) >= min(6, resident + 1)  # something really was on the "device"
    streamed_groups = -(-(6 - resident) // group)
    # Each call loads every streamed group once, plus the first group prefetched for a call to come.
    assert streamer.loads == (2 * streamed_groups + 1 if streamed_groups > 1 else streamed_groups)
    assert [_ptrs(b) for b in dit.blocks] == masters  # back on the host masters, no copies left


@torch.inference_mode()
def test_offloaded_t5_and_whole_dit_equal_no_offload():
    torch.manual_seed(0)
    t5 = T5Encoder(T5_PRESETS["t5-tiny"])
    t5.initialize_weights()
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4:] = False
    expected = t5(ids, mask)
    with offloaded(t5, torch.device("cpu"), Offload("blocks", 5), copy=True):
        assert torch.equal(t5(ids, mask), expected)
    dit = _dit()
    inputs = _inputs()
    expected = dit(*inputs)
    before = _ptrs(dit)
    with offloaded(dit, torch.device("cpu"), Offload("blocks", 1), copy=True):
        # Outside the blocks everything is resident for the stage: the embedders are copies now.
        assert dit.x_embedder.proj.weight.data_ptr() != before[0]
        assert torch.equal(dit(*inputs), expected)
    assert _ptrs(dit) == before


@torch.inference_mode()
def test_streaming_on_the_cpu_copies_nothing_by_default():
    dit = _dit()
    inputs = _inputs()
    expected = dit(*inputs)
    before = _ptrs(dit)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda *_: seen.append(_ptrs(dit) == before)) for b in dit.blocks]
    with offloaded(dit, torch.device("cpu"), Offload("blocks", 1)):
        got = dit(*inputs)
    for h in hooks:
        h.remove()
    # Every block ran from its host master: the "device" is where the masters live already.
    assert seen == [True] * 6 and torch.equal(got, expected) and _ptrs(dit) == before
    with BlockStreamer(dit.blocks, "cpu", resident=0) as streamer:
        assert torch.equal(dit(*inputs), expected)
    assert streamer.loads == 7 and streamer.peak_blocks == 2  # the bookkeeping runs as with copies


def test_pipeline_with_block_offload_generates_the_same_video():
    request = GenerationRequest("a red circle moving right", seed=3)
    pipe = MochiPipeline(tiny_components(), device="cpu")
    expected = pipe.generate(request)
    # On the CPU the pipeline ignores offload; force the mode to run the streaming logic end to end.
    pipe.offload_mode = Offload("blocks", 1)
    got = pipe.generate(request)
    assert torch.equal(got.frames, expected.frames) and torch.equal(got.latents, expected.latents)


@pytest.mark.parametrize("mode", ["int8", "fp8", "q4_0"])
@torch.inference_mode()
def test_quantized_weights_stream_as_plain_ones(mode):
    """torchao's int8 weights (a tensor subclass) could not be streamed in inference mode (`.data =`
    raised NotImplementedError): --quantize int8 with --offload blocks failed on every GPU."""
    from mochi.weights.quantize import quantize_model, torchao_available

    if mode == "int8" and not torchao_available():
        pytest.skip("torchao is not installed: int8 is mochi's own Int8Linear, a plain module")
    dit = _dit()
    quantize_model(dit, mode)
    inputs = _inputs()
    expected = dit(*inputs)
    with offloaded(dit, torch.device("cpu"), Offload("blocks", 1), copy=True):  # the GPU path: copies
        assert torch.equal(dit(*inputs), expected)
    assert torch.equal(dit(*inputs), expected)
    # Pinning and record_stream (CUDA only) reach a subclass through its parts: a weight rebuilt from
    # copies of its parts computes the same.
    from mochi.offload import _inner, _map_inner

    if mode == "int8":  # torchao's Int8Tensor: qdata, scale, ...
        weight = dit.blocks[0].attn.qkv_x.weight
        parts = _inner(weight)
        assert len(parts) > 1 and all(type(p) is torch.Tensor for p in parts)
        rebuilt = _map_inner(weight, torch.clone)
        assert type(rebuilt) is type(weight) and all(
            a.equal(b) and a.data_ptr() != b.data_ptr() for a, b in zip(_inner(rebuilt), parts, strict=True)
        )


@pytest.mark.gpu
@torch.inference_mode()
def test_cuda_streaming_overlaps_copies_with_compute():
    dit = dataclasses.replace(DIT_PRESETS["small"], depth=6)
    torch.manual_seed(0)
    model = AsymmDiT(dit).eval().requires_grad_(False).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, 4, 16, 16, generator=g)
    inputs = (
        x,
        torch.tensor([0.5]),
        torch.randn(1, 8, 4096, generator=g),
        torch.ones(1, 8, dtype=torch.bool),
    )
    cuda = [t.cuda() for t in inputs]
    expected = model.cuda()(*cuda).cpu()
    model.cpu()

    def size(m: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    block, rest = size(model.blocks[0]), size(model) - size(model.blocks)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    device = torch.device("cuda")
    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
        offloaded(model, device, Offload("blocks", 1)),
    ):
        got = model(*cuda).cpu()
    assert torch.equal(got, expected)
    # On the device at once: the non-block layers, 1 resident block and at most 2 streamed (of 6), plus
    # activations (a few MB here).
    assert torch.cuda.max_memory_allocated() - base < rest + 4.5 * block
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.blocks.parameters())
    streams = {"copy": set(), "compute": set()}
    for e in prof.profiler.kineto_results.events():  # device_resource_id: the CUDA stream of a kernel
        if e.device_type() != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name()
        kind = "copy" if "HtoD" in name else None if "Memcpy" in name or "Memset" in name else "compute"
        if kind is not None:
            streams[kind].add(e.device_resource_id())
    # Block copies run on a side stream, one no kernel of the forward runs on.
    assert streams["compute"] and streams["copy"] - streams["compute"]


def test_teacaches_probe_waits_for_the_streamed_block_0(monkeypatch):
    """TeaCache reads block 0's modulation before the block runs. Under block offload on a GPU its copy may
    still be on the side stream then (only the block's own forward waited for it): the probe must wait too.
    On the CPU the copies are synchronous, so the order of load, wait and read is what is checked."""
    from mochi import offload
    from mochi.accel.cache import CacheSetting, StepCache

    dit = _dit()
    sets, state, seen = [], {}, []
    load, wait = offload._TensorSet.load, offload._TensorSet.wait

    def loading(self, stream=None):  # noqa: ANN001, ANN202
        if not any(s is self for s in sets):
            sets.append(self)
        if not self.loaded:
            state[id(self)] = "in flight"
        load(self, stream)

    def waiting(self):  # noqa: ANN001, ANN202
        wait(self)
        state[id(self)] = "ready"

    def reading(module, args):  # noqa: ANN001, ANN202
        holder = next(s for s in sets if any(owner is module for owner, _, _ in s.entries))
        seen.append(state[id(holder)])

    monkeypatch.setattr(offload._TensorSet, "load", loading)
    monkeypatch.setattr(offload._TensorSet, "wait", waiting)
    dit.blocks[0].mod_x.register_forward_pre_hook(reading)
    x, _, text, mask = _inputs()
    sigmas = [1.0, 0.9, 0.8, 0.5, 0.0]
    cache = StepCache(dit, CacheSetting("teacache", 0.05), sigmas=sigmas)
    with offloaded(dit, torch.device("cpu"), Offload("blocks", 0), copy=True):
        for sigma in sigmas[:-1]:
            cache(x, torch.full((2,), sigma), text, mask)
    assert len(seen) >= 4 and set(seen) == {"ready"}, seen
    assert not hasattr(dit.blocks[0], "mochi_ready")  # gone with the streamer
