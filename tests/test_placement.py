"""One DiT over several devices (mochi.memory.placement): placement by budgets, output equal to one device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mochi.cli import main
from mochi.memory.placement import parse_budgets, parse_devices, place_blocks, spread_dit
from mochi.models.dit import DIT_PRESETS, AsymmDiT
from mochi.video import read_video

from .test_cli_generate import tiny  # noqa: F401 - the fixture
from .test_pipeline import tiny_components

DIT6 = dataclasses.replace(DIT_PRESETS["tiny"], depth=6)


def test_place_blocks_fills_devices_in_order():
    # Device 0: 100 − 20 activations − 10 non-block weights = 70 → 7 blocks; device 1: 80 → the other 3.
    assert place_blocks([10] * 10, [100, 100], rest=10, activations=20) == [0] * 7 + [1] * 3
    assert place_blocks([10] * 4, [30, 30, 100], rest=0, activations=10) == [0, 0, 1, 1]
    # A block that does not fit the rest of a device starts the next one (blocks stay consecutive).
    assert place_blocks([30, 30, 50, 10], [100, 100], rest=0, activations=0) == [0, 0, 1, 1]
    gb = 10**9
    message = r"budgets \(5GB, 5GB\): blocks 8-9 are left over, about 2GB more is needed \(add a device or"
    with pytest.raises(ValueError, match=message):
        place_blocks([gb] * 10, [5 * gb, 5 * gb], rest=0, activations=gb)
    # Small budgets in their own units (they read "0.0 GB"), and no advice --devices refuses (--offload).
    with pytest.raises(ValueError, match=r"budgets \(300KB, 300KB\): .* about 1\.3MB more is needed") as e:
        place_blocks([400_000] * 4, [300_000, 300_000], rest=0, activations=0)
    assert "use --offload" not in str(e.value)
    # Device 0 holds the layers around the blocks and a forward's activations (150 + 20 > 100 was accepted).
    with pytest.raises(ValueError, match=r"first device's budget \(100B\) cannot hold .* \(170B\); .* 180B"):
        place_blocks([10] * 4, [100, 1000], rest=150, activations=20)


def test_parse_devices_and_budgets():
    assert parse_devices("cpu, cpu") == [torch.device("cpu")] * 2
    devices = [torch.device("cpu")] * 2
    assert parse_budgets("20GB,24GB", devices, 0) == [20 * 10**9, 24 * 10**9]
    assert parse_budgets("8GB", devices, 0) == [8 * 10**9] * 2
    with pytest.raises(ValueError, match="3 sizes for 2 devices"):
        parse_budgets("1GB,2GB,3GB", devices, 0)
    with pytest.raises(ValueError, match="names no device"):
        parse_devices(" , ")
    if not torch.cuda.is_available():  # the hint names --devices' own remedy, not --device
        with pytest.raises(
            ValueError, match=r"--devices 'cpu,cuda:0': device 'cuda:0' asked for, .*; name cpu"
        ):
            parse_devices("cpu,cuda:0")


def test_one_gpu_named_twice_is_refused(monkeypatch):
    """ "cuda,cuda:0" named the current GPU twice and counted its memory twice."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for text in ("cuda,cuda:0", "cuda:0,cuda"):
        with pytest.raises(ValueError, match="names a device twice"):
            parse_devices(text)
    assert parse_devices("cuda,cuda:1") == [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1" + "0" * 309, "is larger than any device; write it like 24GB"),
        ("1" + "0" * 300 + "GB", "is larger than any device"),
        (
            "24GiB",
            "is in binary units, which are not read; sizes count powers of 1000: nearest valid: 25.8GB",
        ),
    ],
)
def test_sizes_too_large_or_in_binary_units_are_one_line(text, message):
    """A 310-digit size was an OverflowError traceback (float infinity)."""
    from mochi.devices import parse_size

    with pytest.raises(ValueError, match=message):
        parse_size(text, "--max-memory")


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 2, 4, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()
    return x, torch.tensor([0.3, 0.8]), torch.randn(2, 5, 32, generator=g), mask


@torch.inference_mode()
def test_spread_dit_on_cpu_devices_equals_one_device():
    torch.manual_seed(0)
    dit = AsymmDiT(DIT6).eval().requires_grad_(False)
    expected = dit(*_inputs())
    block = sum(p.numel() * 4 for p in dit.blocks[0].parameters())
    rest = sum(p.numel() * 4 for p in dit.parameters()) - sum(p.numel() * 4 for p in dit.blocks.parameters())
    # Three "devices": room for 2, 3 and the remaining blocks.
    budgets = [rest + 2 * block + 100, 3 * block + 100, 10 * block]
    spread = spread_dit(dit, ["cpu", "cpu", "cpu"], budgets, activations=100)
    assert spread.placement == [0, 0, 1, 1, 1, 2]
    assert torch.equal(dit(*_inputs()), expected)
    assert spread.moves == 3  # into device 1, into device 2, and back to device 0 for the final layer
    spread.remove()


def test_generate_with_devices_matches_one_device(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr("mochi.weights.components.load_components", lambda *a, **k: tiny_components())
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    args = ["generate", "a red circle moving right", "--seed", "4", "--steps", "2"]
    assert main([*args, "--out", str(one)]) == 0
    assert main([*args, "--out", str(two), "--devices", "cpu,cpu", "--max-memory", "1GB,1GB"]) == 0
    assert "DiT blocks per device: cpu 2, cpu 0" in capsys.readouterr().out
    assert (read_video(one)[0] == read_video(two)[0]).all()
    assert main([*args, "--devices", "cpu", "--offload", "blocks"]) == 2
    assert "drop --offload blocks" in capsys.readouterr().err
    assert main([*args, "--devices", "cpu,cpu", "--memory", "auto"]) == 2  # --memory auto was ignored
    assert "--memory auto plans for one device, and --devices cpu,cpu" in capsys.readouterr().err


@pytest.mark.gpu
@torch.inference_mode()
def test_spread_over_two_gpus_equals_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.manual_seed(0)
    dit = AsymmDiT(DIT6).eval().requires_grad_(False)
    inputs = [t.cuda() for t in _inputs()]
    expected = dit.cuda()(*inputs)
    dit.cpu()
    block = sum(p.numel() * 4 for p in dit.blocks[0].parameters())
    spread = spread_dit(dit, ["cuda:0", "cuda:1"], [3 * block + 10**6, 10**9], activations=10**5)
    assert {p.device.index for p in dit.blocks[-1].parameters()} == {1}
    assert torch.equal(dit(*inputs), expected)
    spread.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("first", [0, 1])  # block 0 on the first device, or every block on the second
@pytest.mark.parametrize("cache", ["teacache:fast", "fbcache"])
def test_a_step_cache_over_two_gpus_equals_one(cache, first):
    """The cache subtracted the blocks' input (first device) from their output (last device), and with
    block 0 placed on the second device its probe mixed block 0's device with the first's: cross-device
    errors on CUDA (cpu,cpu cannot show them). Not run where this was written: no machine with two GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from mochi.pipeline import MochiPipeline
    from mochi.request import GenerationRequest

    request = GenerationRequest("a red circle moving right", seed=4, steps=8, cache=cache)
    expected = MochiPipeline(tiny_components(), device="cuda:0").generate(request)
    assert expected.stats["skipped_steps"]  # the cache's reuse path runs too
    c = tiny_components()
    pipe = MochiPipeline(c, device="cuda:0", offload="model")  # as spread_pipeline builds it
    block = sum(p.numel() * 4 for p in c.dit.blocks[0].parameters())
    rest = sum(p.numel() * 4 for p in c.dit.parameters()) - block * len(c.dit.blocks)
    budgets = [rest + block, 10**9] if first == 0 else [rest, 10**9]
    spread = spread_dit(c.dit, ["cuda:0", "cuda:1"], budgets, activations=0)
    assert spread.placement[0] == first and spread.placement[-1] == 1
    got = pipe.generate(request)
    assert got.stats == expected.stats and torch.equal(got.latents.cpu(), expected.latents.cpu())
    spread.remove()


def _no_load(*args, **kwargs):  # noqa: ANN202
    raise AssertionError("the weights were loaded")


def test_devices_that_cannot_hold_the_dit_are_refused_before_loading(monkeypatch, capsys):
    """generate --devices found that the blocks do not fit only once the weights were loaded; the blocks'
    bytes come from the checkpoint's headers (here the embedded bundle's config), and the message is the
    one the load would have given."""
    from mochi.memory.placement import spread_pipeline
    from mochi.request import GenerationRequest

    # 5MB each: the first device holds the non-block layers, the activations and 1 block, the second 1.
    with pytest.raises(ValueError) as after_load:
        spread_pipeline(None, "cpu,cpu", "5MB,5MB", GenerationRequest("a red circle", seed=1), {})
    assert "blocks 2-3 are left over" in str(after_load.value)
    monkeypatch.setattr("mochi.weights.components.load_components", _no_load)
    args = ["generate", "a red circle", "--seed", "1", "--devices", "cpu,cpu"]
    assert main([*args, "--max-memory", "5MB,5MB"]) == 2
    assert capsys.readouterr().err.strip() == f"mochi: error: {after_load.value}"


def test_the_step_cache_is_placed_where_its_tensors_live(monkeypatch, capsys):
    """--devices counted no step cache: its probe and residuals (0.55 GB each in bf16 at 163 frames of
    848x480) stay on the devices between steps. The probe (TeaCache's or FBCache's) sits beside the first
    block, the residuals beside the last block, before and after loading alike."""
    from mochi.memory.estimate import cache_bytes
    from mochi.memory.placement import cache_shares, spread_pipeline
    from mochi.memory.planner import Job
    from mochi.request import GenerationRequest

    # The last block carries the residuals: 10 + 70 no longer fits beside 30 on device 0.
    assert place_blocks([10] * 4, [100, 100], rest=0, activations=0, cache=(0, 70)) == [0, 0, 0, 1]
    assert place_blocks([10] * 4, [100, 100], rest=0, activations=0, cache=(75, 0)) == [0, 0, 1, 1]
    # The probe goes with block 0, wherever that is (here: the second device).
    assert place_blocks([10] * 4, [100, 100], rest=90, activations=0, cache=(20, 0)) == [1, 1, 1, 1]
    one = cache_bytes(DIT6, (28, 60, 106), 2, torch.bfloat16, 1)
    assert one == 28 * 30 * 53 * 2 * DIT6.hidden_size_x * 2
    shares = {
        cache: cache_shares(DIT6, Job.from_request(163, 480, 848, True, cache), torch.bfloat16)
        for cache in ("none", "teacache", "fbcache", "fbcache:3x", "teacache:2x")
    }
    assert shares == {
        "none": (0, 0),
        "teacache": (one, one),
        "fbcache": (one, one),
        "fbcache:3x": (one, 2 * one),  # extrapolate keeps the residual before the last one too
        "teacache:2x": (one, 2 * one),
    }
    # A guidance schedule with cond-only steps: a batch-1 stream of its own beside the guided batch's.
    mixed = Job.from_request(163, 480, 848, True, "teacache", cond_only_steps=True)
    assert cache_shares(DIT6, mixed, torch.bfloat16) == (3 * one // 2, 3 * one // 2)
    # 6.18MB each: the embedded DiT fits two devices, but not with a TeaCache's two tensors besides.
    spread_pipeline(None, "cpu,cpu", "6.18MB,6.18MB", GenerationRequest("a red circle", seed=1), {})
    cached = GenerationRequest("a red circle", seed=1, cache="teacache")
    with pytest.raises(ValueError, match="the DiT does not fit the devices' budgets") as after_load:
        spread_pipeline(None, "cpu,cpu", "6.18MB,6.18MB", cached, {})
    monkeypatch.setattr("mochi.weights.components.load_components", _no_load)
    args = ["generate", "a red circle", "--seed", "1", "--devices", "cpu,cpu", "--cache", "teacache"]
    assert main([*args, "--max-memory", "6.18MB,6.18MB"]) == 2
    assert capsys.readouterr().err.strip() == f"mochi: error: {after_load.value}"


def test_gpus_too_small_for_the_dit_are_refused_before_loading(monkeypatch, capsys):
    """The same on (faked) GPUs, whose budgets are their free memory less the CUDA reserve, in bf16."""
    from mochi.memory.planner import CUDA_RESERVE

    free = {0: CUDA_RESERVE + 3 * 10**6, 1: CUDA_RESERVE + 3 * 10**6}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[torch.device(d).index], 80 * 10**9))
    monkeypatch.setattr("mochi.weights.components.load_components", _no_load)
    args = ["generate", "a red circle", "--seed", "1", "--devices", "cuda:0,cuda:1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the DiT does not fit the devices' budgets (3MB, 3MB): blocks 3-3 are left over" in err
    free[1] += 10**6  # room for the last block: the check passes, and the weights are loaded
    with pytest.raises(AssertionError, match="the weights were loaded"):
        main(args)


def test_quantized_blocks_are_placed_by_the_bytes_they_hold():
    """torchao's int8 weight reports its bf16 wrapper's element size: counted by numel·element_size, the
    blocks of a --quantize int8 DiT took about 1.7 times their bytes, and spread_pipeline refused after
    loading devices the check before loading (from the estimate) had passed. (With mochi's own Int8Linear,
    where torchao is missing, both counts agree.)"""
    from mochi.memory.estimate import dit_weights
    from mochi.weights.quantize import quantize_model, stored_bytes

    torch.manual_seed(0)
    dit = AsymmDiT(DIT6).to(torch.bfloat16)
    quantize_model(dit, "int8")
    blocks = [stored_bytes(b) for b in dit.blocks]
    assert tuple(blocks) == dit_weights(DIT6, torch.bfloat16, "int8").blocks  # what the check counts
    rest = stored_bytes(dit) - sum(blocks)
    spread = spread_dit(dit, ["cpu", "cpu"], [rest + sum(blocks[:3]), sum(blocks[3:])], 0)
    assert spread.placement == [0, 0, 0, 1, 1, 1]
    spread.remove()
