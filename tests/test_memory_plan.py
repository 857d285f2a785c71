"""The memory planner (mochi.memory): weight bytes, traced activations against measured CPU peaks, plans."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mochi.cli import main
from mochi.memory.estimate import QUANT_MODES, dit_weights, quantized_linear_bytes, t5_weights
from mochi.memory.planner import GB, Job, Models, choose, plan, stage_peaks
from mochi.models.dit import DiTConfig
from mochi.models.t5 import T5_PRESETS
from mochi.offload import Offload
from mochi.weights.quantize import torchao_installed

ROOT = Path(__file__).resolve().parents[1]
RELEASED_PARAMS = 10_027_677_744
# fp32 islands of the released DiT: RoPE frequencies (3·24·64) and the q/k norms (4·128 per block).
ISLANDS = 3 * 24 * 64 + 48 * 4 * 128


# The embedded model's own size, as `plan` options.
TINY_SIZE = ["--frames", "25", "--width", "64", "--height", "64"]


def test_bytes_per_weight_of_each_quantization():
    assert quantized_linear_bytes("none", 64, 320, torch.bfloat16) == 2 * 64 * 320
    assert quantized_linear_bytes("fp8", 64, 320, torch.bfloat16) == 64 * 320 + 4 * 64  # + fp32 scale per row
    # torchao's int8 tensor keeps an int8 zero point per row besides the scale; mochi's Int8Linear does not.
    row = 5 if torchao_installed() else 4
    assert quantized_linear_bytes("int8", 64, 320, torch.bfloat16) == 64 * 320 + row * 64
    assert quantized_linear_bytes("q8_0", 64, 320, torch.bfloat16) == 64 * 320 * 34 // 32
    assert quantized_linear_bytes("q4_0", 64, 320, torch.bfloat16) == 64 * 320 * 18 // 32
    with pytest.raises(ValueError, match="quantization 'q3_k' is not one of none, fp8, int8, q8_0, q4_0"):
        quantized_linear_bytes("q3_k", 1, 32, torch.float32)


def test_released_weights_from_the_meta_device():
    bf16 = dit_weights(DiTConfig(), torch.bfloat16)
    assert bf16.total == 2 * RELEASED_PARAMS + 2 * ISLANDS  # 20.06 GB, diffusers' published figure
    assert len(bf16.blocks) == 48 and bf16.blocks[0] > bf16.blocks[-1]  # the last block has no text MLP
    assert dit_weights(DiTConfig(), torch.float32).total == 4 * RELEASED_PARAMS
    sizes = [dit_weights(DiTConfig(), torch.bfloat16, q).total for q in QUANT_MODES]
    # Quantized: about half (fp8, int8, q8_0) and a quarter (q4_0) of bf16; the rest stays bf16.
    assert [round(s / sizes[0], 2) for s in sizes] == [1.0, 0.51, 0.51, 0.54, 0.29]
    assert t5_weights(T5_PRESETS["t5-v1_1-xxl"]).total == 4 * 4_762_310_656  # T5-XXL encoder in fp32


def test_traced_activations_match_measured_cpu_peaks_within_10_percent():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{ROOT}"
    run = subprocess.run(
        [sys.executable, "-m", "tests.memory_probe"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout)
    assert set(results) == {"dit fp32", "dit bf16", "t5", "vae decode", "vae encode"}
    for name, (measured, estimated) in results.items():
        assert measured > 4 * 2**20, name  # large enough that page-level noise is small
        assert abs(estimated / measured - 1) <= 0.10, (name, measured, estimated)


def test_plan_for_the_released_model():
    job = Job.from_request(163, 480, 848)
    assert job.latent == (28, 60, 106) and job.batch == 2
    options = plan(Models(), job, 24 * GB, quants=("none",), reserve=GB)
    kinds = [o.offload.kind for o in options]
    assert kinds == ["none", "model", "blocks"]
    none, model, blocks = options
    # No offload holds T5 (19 GB fp32), the DiT (20 GB) and the decoder at once: no decode budget is left.
    assert none.peaks["text"] > 40 * GB and not none.fits and none.decode_tile is None
    assert model.peaks["text"] < none.peaks["text"] and not model.fits  # 20 GB DiT + 7 GB activations
    assert blocks.fits and 24 < blocks.offload.resident < 46 and blocks.peak <= 24 * GB
    # One more resident block would not fit: the planner keeps as many as the budget allows.
    more = Offload("blocks", blocks.offload.resident + 1)
    peaks, _ = stage_peaks(Models(), job, torch.bfloat16, "none", more, 24 * GB, GB)
    assert max(peaks.values()) > 24 * GB
    assert choose(options, 24 * GB) is blocks
    assert choose(plan(Models(), job, 80 * GB, quants=("none",), reserve=GB), 80 * GB).offload == Offload()


def test_a_plan_traces_each_dit_forward_once():
    """Every option of a plan asks for the DiT's activations (a meta DiT built and traced, ~0.15 s); the
    cache on `dit_activations` had slipped onto another function, and `plan --dtype all --quantize all
    --all-blocks` took 79 s instead of 4."""
    from mochi.memory import estimate

    estimate.dit_activations.cache_clear()
    job = Job.from_request(163, 480, 848, cache="teacache")
    plan(Models(), job, 24 * GB, dtypes=(torch.bfloat16, torch.float32), quants=QUANT_MODES, reserve=GB)
    info = estimate.dit_activations.cache_info()
    assert info.misses == 2 and info.hits > 20  # one trace per dtype


@pytest.mark.parametrize(
    "guidance, cache",
    [
        (4.5, "teacache"),
        (1.0, "fbcache"),
        (4.5, "fbcache:3x"),  # extrapolate: the residual before the last one too
        ([4.5, 4.5, 1.0, 1.0, 4.5, 4.5], "teacache"),  # cond-only steps: a batch-1 stream of their own
    ],
)
def test_the_planned_step_cache_is_what_the_cache_keeps(monkeypatch, guidance, cache):
    """The plan's step-cache bytes against the tensors a real run's cache holds at its end (a guidance
    schedule's cond-only steps were not counted: their stream keeps its own probe and residual)."""
    from mochi.accel.cache import StepCache
    from mochi.memory.auto import job_of
    from mochi.memory.estimate import cache_bytes
    from mochi.pipeline import MochiPipeline
    from mochi.request import GenerationRequest

    from .test_pipeline import tiny_components

    caches, init = [], StepCache.__init__

    def keep(self, *args, **kwargs):  # noqa: ANN001, ANN202
        init(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(StepCache, "__init__", keep)
    c = tiny_components()
    request = GenerationRequest("a red circle", seed=1, steps=6, guidance=guidance, cache=cache)
    request = request.resolved(c.defaults)
    MochiPipeline(c, device="cpu").generate(request)
    streams = [s for cache in caches for s in cache.streams.values()]
    held = [t for s in streams for t in (s.probe, s.residual, s.previous) if t is not None]
    job = job_of(request)
    planned = cache_bytes(c.dit.config, job.latent, job.cache_rows, torch.float32, job.cache_tensors)
    assert sum(t.numel() * t.element_size() for t in held) == planned


def test_nothing_fits_names_the_closest_and_the_gap():
    job = Job.from_request(163, 480, 848)
    options = plan(Models(), job, 6 * GB, quants=("none",), reserve=GB)
    # Rounded up (9.149 GB): a budget of the figure named is never short by the rounding.
    closest = r"the closest, bf16, offload blocks:0, needs about 9\.2 GB in its denoise stage, 3\.2 GB more"
    with pytest.raises(ValueError, match=r"no setting fits 6\.0 GB: " + closest):
        choose(options, 6 * GB)


def test_the_closest_miss_counts_what_its_decode_split_needs(capsys):
    """The closest setting was the one of the lowest stage peak, whose decode no split fit: "needs about
    2.7 GB in its decode stage, 0.1 GB more" at 2.6 GB, where 2.7 GB did not fit either (2.8 GB does); and
    a gap under 0.05 GB read "0.0 GB more"."""
    args = ["plan", "--frames", "163", "--width", "256", "--height", "256", "--quantize", "q4_0"]
    assert main([*args, "--gpu-memory", "2.6GB"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "no setting fits 2.6 GB: the closest, bf16 q4_0, offload blocks:0, peaks at about 2.7 GB, and no "
        "decode split fits 80% of the 149.9MB left beside the decoder (the pipeline's rule); the smallest "
        "needs about 210.6MB, so about 2.8GB free"
    )
    assert main([*args, "--gpu-memory", "2.8GB"]) == 0
    assert "fastest that fits: bf16 q4_0, offload blocks:1" in capsys.readouterr().out
    job = Job.from_request(163, 480, 848)
    peak = plan(Models(), job, 6 * GB, quants=("none",), reserve=GB)[-1].peak
    with pytest.raises(ValueError, match=r", 0\.1 GB more$"):  # 0.01 GB short
        choose(plan(Models(), job, peak - 10**7, quants=("none",), reserve=GB), peak - 10**7)


def test_a_miss_only_at_the_decode_names_the_split_and_a_value_that_fits(capsys):
    """Where every option failed only because no decode split fit, the error named the lowest peak and a
    negative gap ("-18.2 GB more", "-0.0 GB more") instead of the decode split and what would let it fit."""
    job = Job.from_request(85, 480, 848)
    options = plan(Models(), job, 24 * GB, quants=("none",), reserve=GB, max_memory=1000)
    with pytest.raises(ValueError) as e:
        choose(options, 24 * GB)
    assert " more" not in str(e.value) and str(e.value).endswith(
        "is within it at every stage, but no decode split fits --max-memory 1KB: the smallest needs about "
        "499MB; nearest valid: --max-memory 499MB"
    )
    assert choose(plan(Models(), job, 24 * GB, quants=("none",), reserve=GB, max_memory=499 * 10**6), 24 * GB)
    bundle = str(ROOT / "src" / "mochi" / "assets" / "mochi-tiny.safetensors")
    args = ["plan", "--model", bundle, *TINY_SIZE, "--quantize", "none"]
    assert main([*args, "--gpu-memory", "1020MB"]) == 0
    out = capsys.readouterr().out
    assert " more" not in out
    expected = (
        "no setting fits 1.0 GB: bf16, offload model is within it at every stage, but no decode split "
        "fits 80% of the 9.3MB left beside the decoder (the pipeline's rule); the smallest needs about "
        "9MB, so about 1.1GB free"
    )
    assert expected in out
    assert main([*args, "--gpu-memory", "1.1GB"]) == 0
    assert "fastest that fits: bf16, offload" in capsys.readouterr().out


def test_plan_command(capsys):
    assert main(["plan", "--gpu-memory", "16GB", "--frames", "31", "--quantize", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "31 frames at 848x480, DiT batch 2; budget 16.0 GB" in out
    assert "bf16 fp8, offload model" in out and "fastest that fits: bf16 fp8, offload model" in out
    bundle = str(ROOT / "src" / "mochi" / "assets" / "mochi-tiny.safetensors")  # every architecture inside
    assert main(["plan", "--gpu-memory", "8GB", "--model", bundle, *TINY_SIZE]) == 0
    by_file = capsys.readouterr().out
    assert "fastest that fits: bf16, offload none (peak 1.0 GB)" in by_file
    # The sidecar's name for the embedded model plans it, not the released one plan sizes without --model.
    assert main(["plan", "--gpu-memory", "8GB", "--model", "embedded:mochi-tiny", *TINY_SIZE]) == 0
    assert capsys.readouterr().out == by_file
    assert main(["plan", "--gpu-memory", "16GB", "--frames", "30"]) == 2
    assert "frames" in capsys.readouterr().err
    # The request's rules hold here as in generate: guidance's range, and a size whose token count would
    # overflow the planner's tensor sizes.
    # A decode no split fits reads as such, not as "untiled".
    assert main(["plan", "--gpu-memory", "1MB"]) == 0
    assert " none fits " in capsys.readouterr().out
    assert main(["plan", "--gpu-memory", "16GB", "--guidance", "-3"]) == 2
    assert "guidance=-3.0 must be in [0, 100]" in capsys.readouterr().err
    assert main(["plan", "--gpu-memory", "16GB", "--frames", "999999999999999997"]) == 2
    assert "at most 1,048,576 are allowed" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["plan"]) == 2
        assert "give the budget, e.g. --gpu-memory 24GB" in capsys.readouterr().err
    # --device was not read with --gpu-memory (even a bogus one passed), and a 0 budget was planned.
    assert main(["plan", "--gpu-memory", "24GB", "--device", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["plan", "--gpu-memory", "24GB", "--device", "cuda:1"]) == 2
    assert (
        "--device cuda:1 is whose free memory is the budget, and --gpu-memory 24GB" in capsys.readouterr().err
    )
    assert main(["plan", "--gpu-memory", "0"]) == 2
    assert "--gpu-memory '0' must be a positive size" in capsys.readouterr().err
    # A plain 24 was planned as 24 bytes ("no setting fits 0.0 GB"); 24G was "not understood".
    for text, said in (
        ("24", "--gpu-memory '24' would be 24 bytes (a size without a unit counts bytes); did you mean "
         "24GB?"),
        ("24G", "--gpu-memory '24G' is not understood: units end in B (powers of 1000); nearest valid: 24GB"),
    ):  # fmt: skip
        assert main(["plan", "--gpu-memory", text]) == 2
        assert capsys.readouterr().err == f"mochi: error: {said}\n"
    assert main(["plan", "--gpu-memory", "2000000"]) == 0  # a plain count of a megabyte and up: bytes
    capsys.readouterr()
    assert main(["convert", "x", "y", "--to", "diffusers", "--max-shard-size", "10"]) == 2  # a tensor a shard
    assert (
        "--max-shard-size '10' would be 10 bytes (a size without a unit counts bytes); did you mean 10GB?"
        in (capsys.readouterr().err)
    )
    if not torch.cuda.is_available():  # it said "use --device cpu", which plan then refused
        assert main(["plan", "--device", "cuda:1"]) == 2
        assert capsys.readouterr().err == (
            "mochi: error: --device cuda:1: this machine has no CUDA device to read the free memory of; give "
            "the budget instead, e.g. --gpu-memory 24GB\n"
        )


def test_generate_memory_auto_on_cpu_says_so(tmp_path, capsys, monkeypatch):
    from .test_pipeline import tiny_components

    monkeypatch.setattr("mochi.weights.components.load_components", lambda *a, **k: tiny_components())
    out = tmp_path / "a.mp4"
    assert main(["generate", "a red circle", "--steps", "1", "--memory", "auto", "--out", str(out)]) == 0
    assert (
        "--memory auto: running on cpu, where there is no accelerator memory to plan"
        in capsys.readouterr().out
    )
    assert out.exists()


def test_memory_auto_chooses_for_a_cuda_budget(monkeypatch):
    """The choice itself, with the CUDA device and its free memory faked (this test runs on the CPU)."""
    import mochi.memory.auto as auto
    from mochi.request import GenerationRequest

    from .test_pipeline import tiny_components

    c = tiny_components()
    request = GenerationRequest("a red circle", seed=1).resolved(c.defaults)
    monkeypatch.setattr(auto, "parse_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(auto, "available_memory", lambda d: 8 * GB)
    chosen, note = auto.choose_setting(c, request, "cuda")
    assert chosen.offload == Offload() and note.startswith(
        "--memory auto: bf16, offload none (estimated peak"
    )
    assert "8.0 GB free on cuda" in note
    monkeypatch.setattr(auto, "available_memory", lambda d: 10**6)
    with pytest.raises(
        ValueError, match=r"--memory auto: no setting fits 0\.0 GB: the closest, bf16, offload"
    ):
        auto.choose_setting(c, request, "cuda")


def _planning_on_a_gpu(monkeypatch, components):  # noqa: ANN001, ANN202
    """``components`` and a request as ``--memory auto`` plans them on an 8 GB GPU; ``seen`` collects the
    (quants, t5_quant) of every plan it asks for."""
    import mochi.memory.auto as auto
    from mochi.request import GenerationRequest

    request = GenerationRequest("a red circle", seed=1).resolved(components.defaults)
    monkeypatch.setattr(auto, "parse_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(auto, "available_memory", lambda d: 8 * GB)
    seen = []
    real_plan = auto.plan
    monkeypatch.setattr(
        auto, "plan", lambda *a, **k: seen.append((k["quants"], k["t5_quant"])) or real_plan(*a, **k)
    )
    return request, seen, real_plan


def _fp8_blocks(dit) -> None:  # noqa: ANN001
    """The blocks' Linear layers as a checkpoint's kept fp8 layers load."""
    from mochi.weights.fp8 import swap_in_fp8

    layers = [n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    swap_in_fp8(dit, layers, dict.fromkeys(layers, torch.float8_e4m3fn))


def test_memory_auto_plans_the_weights_as_they_will_be(monkeypatch):
    """--quantize was left out of the plan (it planned full-width weights), and a DiT that kept fp8 had its
    full-width T5 planned as fp8 too (about 11 GB short for the released T5)."""
    import mochi.memory.auto as auto
    from mochi.weights.quantize import quantize_model

    from .test_pipeline import tiny_components

    c = tiny_components()
    request, seen, real_plan = _planning_on_a_gpu(monkeypatch, c)
    chosen, note = auto.choose_setting(c, request, "cuda", quantize="int8")
    assert seen == [(("int8",), "int8")] and chosen.quant == "int8" and "bf16 int8, offload none" in note
    # As loaded: the DiT's kept fp8 Linears are fp8, the T5 beside it is full width.
    _fp8_blocks(c.dit)
    seen.clear()
    auto.choose_setting(c, request, "cuda")
    assert seen == [(("fp8",), "none")]
    assert (auto.quantization_of(c.dit), auto.quantization_of(c.text_encoder)) == ("fp8", "none")
    t5 = tiny_components().text_encoder
    quantize_model(t5, "q4_0")
    assert auto.quantization_of(t5) == "q4_0"
    # The T5 of a kept-fp8 DiT weighs what a full-width T5 weighs in the text stage.
    models, job = auto.models_of(c), auto.job_of(request)
    both = stage_peaks(models, job, torch.bfloat16, "fp8", Offload(), 8 * GB)[0]
    apart = stage_peaks(models, job, torch.bfloat16, "fp8", Offload(), 8 * GB, t5_quant="none")[0]
    assert apart["text"] > both["text"]
    # The decode as the pipeline will split it: within --max-memory when given.
    seen.clear()
    monkeypatch.setattr(auto, "plan", lambda *a, **k: seen.append(k["max_memory"]) or real_plan(*a, **k))
    auto.choose_setting(c, request, "cuda", max_memory=10**8)
    assert seen == [10**8]
    from mochi.memory.estimate import decoder_weights
    from mochi.models.vae import Decoder
    from mochi.models.vae_memory import estimate_decode_memory
    from mochi.models.vae_plan import choose_plan

    released, big = Models(), Job.from_request(163, 480, 848)
    with torch.device("meta"):
        decoder = Decoder(released.decoder)
    split, _ = choose_plan(decoder, (1, *big.latent), 4 * 10**9)
    peaks, tile = stage_peaks(
        released, big, torch.bfloat16, "none", Offload("model"), 80 * GB, max_memory=4 * 10**9
    )
    assert tile == split.tile and peaks["decode"] == decoder_weights(
        released.decoder
    ) + estimate_decode_memory(released.decoder, (1, *big.latent), split.tile, split.chunk, torch.float32)
    assert (
        peaks["decode"]
        < stage_peaks(released, big, torch.bfloat16, "none", Offload("model"), 80 * GB)[0]["decode"]
    )


def test_memory_auto_plans_a_dit_stored_quantized_as_stored_under_quantize(monkeypatch):
    """--quantize q4_0 keeps a checkpoint's fp8 Linears as stored, but --memory auto planned that DiT as q4_0
    (5.8 GB where 10.1 GB is held for the released DiT) and could pick a setting that runs out of memory."""
    import mochi.memory.auto as auto

    from .test_pipeline import tiny_components

    c = tiny_components()
    _fp8_blocks(c.dit)
    request, seen, _ = _planning_on_a_gpu(monkeypatch, c)
    chosen, note = auto.choose_setting(c, request, "cuda", quantize="q4_0")
    assert (
        seen == [(("fp8",), "q4_0")] and chosen.quant == "fp8" and "bf16 fp8, T5 q4_0, offload none" in note
    )
    assert auto.held(("fp8", "none"), "q4_0") == ("fp8", "q4_0")
    assert auto.held(("q8_0", "q4_0"), "int8") == ("q8_0", "q4_0")
    assert auto.held(("none", "none"), None) == ("none", "none")


@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_plan_plans_a_checkpoint_stored_quantized_as_stored(tmp_path, capsys, layout):
    """plan --model <fp8 or GGUF checkpoint> planned its DiT full width (or as --quantize) where loading keeps
    it as stored, so plan and generate --memory auto disagreed for the same budget."""
    from mochi.memory.auto import quantization_of
    from mochi.memory.report import _models
    from mochi.weights.dit import load_dit

    from .dit_checkpoints import state_dict, tiny_model, write_fp8_scaled
    from .gguf_files import block_layers, write_gguf, write_kijai

    m = tiny_model()
    sd = state_dict(m)
    fp8 = write_fp8_scaled(tmp_path / "fp8.safetensors", m, layout=layout, all_in_one=False)
    q4 = write_kijai(tmp_path / "q4.safetensors", sd, "Q4_0")
    q8 = tmp_path / "q8.gguf"
    write_gguf(q8, sd, {k + ".weight": "Q8_0" for k in block_layers(sd)})
    base = ["plan", "--gpu-memory", "24GB", "--frames", "25", "--width", "64", "--height", "64"]
    assert main([*base, "--model", str(fp8), "--quantize", "q4_0"]) == 0
    out = capsys.readouterr().out
    assert "bf16 fp8, T5 q4_0, offload none" in out and "bf16 q4_0" not in out
    assert main([*base, "--model", str(fp8), "--quantize", "none"]) == 0
    assert "fastest that fits: bf16 fp8, T5 unquantized, offload none" in capsys.readouterr().out
    for path, stored in ((fp8, "fp8"), (q4, "q4_0"), (q8, "q8_0")):
        assert _models(str(path))[1] == (stored, "none") == (quantization_of(load_dit(path)), "none")


def test_the_plans_decode_is_the_split_the_pipeline_decodes_with():
    """The plan decoded within 80% of the card's free memory (61.7 GB on an 80 GB card) where the pipeline
    decodes with its default budget's split (about 12 GB) whatever the card."""
    from mochi.memory.estimate import decoder_weights
    from mochi.models.vae import Decoder
    from mochi.models.vae_memory import estimate_decode_memory
    from mochi.models.vae_plan import choose_plan

    models, job = Models(), Job.from_request(163, 480, 848)
    with torch.device("meta"):
        decoder = Decoder(models.decoder)
    latent = (1, *job.latent)
    split, _ = choose_plan(decoder, latent)  # the pipeline's own choice, with memory to spare
    expected = decoder_weights(models.decoder) + estimate_decode_memory(
        models.decoder, latent, split.tile, split.chunk, torch.float32
    )
    for card in (48, 80):
        peaks, tile = stage_peaks(models, job, torch.bfloat16, "none", Offload("model"), card * GB)
        assert tile == split.tile and peaks["decode"] == expected
    assert expected < 14 * GB


def test_a_checkpoint_kept_as_stored_is_planned_layer_by_layer(tmp_path, capsys):
    """A GGUF mixing Q4_0 and Q8_0 layers was planned as q8_0 throughout while `quantization_of` named its
    first layer's type; each kept layer (ggml blocks, fp8 weights and their scales) now counts its own
    stored bytes, which are the loaded model's bytes block by block."""
    from mochi.memory.auto import kept_of, quantization_of
    from mochi.memory.report import _models
    from mochi.weights.dit import load_dit

    from .dit_checkpoints import state_dict, tiny_model, write_fp8_scaled
    from .gguf_files import block_layers, write_gguf, write_kijai

    m = tiny_model()
    sd = state_dict(m)
    layers = block_layers(sd)
    mixed = tmp_path / "mixed.gguf"
    write_gguf(mixed, sd, {k + ".weight": ("Q4_0", "Q8_0")[i % 2] for i, k in enumerate(layers)})
    q4 = write_kijai(tmp_path / "q4.safetensors", sd, "Q4_0")
    fp8 = write_fp8_scaled(tmp_path / "fp8.safetensors", m, layout="new", all_in_one=False)

    def size(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    for path, mode in ((mixed, "q4_0+q8_0"), (q4, "q4_0"), (fp8, "fp8")):
        models, (stored, _) = _models(str(path))
        loaded = load_dit(path, dtype=torch.bfloat16)
        assert stored == mode == quantization_of(loaded), path.name
        planned = dit_weights(models.dit, torch.bfloat16, "none", models.dit_kept)
        assert planned.blocks == tuple(size(b) for b in loaded.blocks), path.name
        assert planned.total == size(loaded), path.name
        assert kept_of(loaded) == models.dit_kept, path.name  # generate --memory auto's (models_of)
    q8 = dit_weights(models.dit, torch.bfloat16, "q8_0")  # models: the fp8 file's (the same architecture)
    mixed_models = _models(str(mixed))[0]
    assert sum(dit_weights(mixed_models.dit, torch.bfloat16, "none", mixed_models.dit_kept).blocks) < sum(
        q8.blocks
    )
    base = ["plan", "--gpu-memory", "24GB", *TINY_SIZE, "--model", str(mixed), "--quantize", "none"]
    assert main(base) == 0
    assert "fastest that fits: bf16 q4_0+q8_0, T5 unquantized, offload none" in capsys.readouterr().out


def test_quantize_plans_the_layers_a_stored_quantized_file_left_wide(tmp_path, capsys):
    """A GGUF that stores half its block Linears as Q4_0 and the rest wide: --quantize quantizes the rest as
    generate does (`quantize_model` keeps the stored layers), but plan counted them full width."""
    from mochi.memory.report import _models
    from mochi.weights.dit import load_dit
    from mochi.weights.quantize import quantize_model

    from .dit_checkpoints import state_dict, tiny_model
    from .gguf_files import block_layers, write_gguf

    sd = state_dict(tiny_model())
    layers = block_layers(sd)
    half = write_gguf(tmp_path / "half.gguf", sd, {k + ".weight": "Q4_0" for k in layers[::2]})
    models = _models(str(half))[0]

    def size(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    for mode in ("q8_0", "fp8"):
        loaded = load_dit(half, dtype=torch.bfloat16)
        quantize_model(loaded, mode)  # what generate --quantize does after loading
        [option] = plan(
            models, Job.from_request(7, 32, 32), 24 * GB, quants=("q4_0",), dit_rest=mode, all_blocks=False,
            t5_quant=mode,
        )[:1]  # fmt: skip
        assert option.describe() == f"bf16 q4_0 (other layers {mode}), T5 {mode}, offload none"
        assert dit_weights(models.dit, torch.bfloat16, mode, models.dit_kept).total == size(loaded), mode
    assert dit_weights(models.dit, torch.bfloat16, "q8_0", models.dit_kept).total < size(
        load_dit(half, dtype=torch.bfloat16)
    )
    base = ["plan", "--gpu-memory", "24GB", *TINY_SIZE, "--model", str(half)]
    assert main([*base, "--quantize", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "fastest that fits: bf16 q4_0 (other layers q8_0), T5 q8_0, offload none" in out
    assert main([*base, "--quantize", "none"]) == 0
    assert "fastest that fits: bf16 q4_0, T5 unquantized, offload none" in capsys.readouterr().out
    # A file whose every block Linear is stored quantized names no other layers.
    full = write_gguf(tmp_path / "full.gguf", sd, {k + ".weight": "Q4_0" for k in layers})
    assert main(["plan", "--gpu-memory", "24GB", *TINY_SIZE, "--model", str(full), "--quantize", "q8_0"]) == 0
    assert "fastest that fits: bf16 q4_0, T5 q8_0, offload none" in capsys.readouterr().out


def test_plan_fp8_dequantize_plans_the_widened_dit_as_generate_loads_it(tmp_path, capsys):
    """generate --fp8 dequantize widens an fp8 or GGUF DiT at load (then --quantize applies to it); plan had
    no such choice and always planned the DiT as stored."""
    from .dit_checkpoints import state_dict, tiny_model, write_fp8_scaled
    from .gguf_files import write_kijai

    m = tiny_model()
    fp8 = write_fp8_scaled(tmp_path / "fp8.safetensors", m, layout="new", all_in_one=False)
    q4 = write_kijai(tmp_path / "q4.safetensors", state_dict(m), "Q4_0")
    base = ["plan", "--gpu-memory", "24GB", *TINY_SIZE]
    # The Q4_0 file leaves its 16-wide layers unquantized (ggml needs multiples of 32); int8 takes them.
    for path, stored in ((fp8, "fp8"), (q4, "q4_0 (other layers int8)")):
        assert main([*base, "--model", str(path), "--quantize", "int8"]) == 0
        assert f"fastest that fits: bf16 {stored}, T5 int8, offload none" in capsys.readouterr().out
        assert main([*base, "--model", str(path), "--quantize", "int8", "--fp8", "dequantize"]) == 0
        assert "fastest that fits: bf16 int8, offload none" in capsys.readouterr().out
        assert main([*base, "--model", str(path), "--quantize", "none", "--fp8", "dequantize"]) == 0
        assert "fastest that fits: bf16, offload none" in capsys.readouterr().out


@pytest.mark.parametrize("cache", ["teacache", "fbcache:fast", "teacache,extrapolate", "none"])
def test_the_denoise_stage_counts_what_the_step_cache_keeps(monkeypatch, cache):
    """The step cache keeps its probe and residuals (0.55 GB each for the released model at 163 frames)
    between steps; plan and --memory auto left them out of the denoise stage."""
    import mochi.accel.cache as step_cache
    from mochi.memory.auto import job_of
    from mochi.memory.estimate import cache_bytes
    from mochi.offload import Offload
    from mochi.pipeline import MochiPipeline
    from mochi.request import GenerationRequest

    from .test_pipeline import tiny_components

    caches = []
    real_init = step_cache.StepCache.__init__

    def keep(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        real_init(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(step_cache.StepCache, "__init__", keep)
    c = tiny_components()
    request = GenerationRequest("a red circle", seed=1, steps=6, cache=cache).resolved(c.defaults)
    MochiPipeline(c, device="cpu").generate(request)
    held = [
        t
        for cache_ in caches
        for stream in cache_.streams.values()
        for t in (stream.probe, stream.residual, stream.previous)
        if t is not None
    ]
    job = job_of(request)
    assert job.cache_tensors == len(held)
    kept = sum(t.numel() * t.element_size() for t in held)
    assert cache_bytes(c.dit.config, job.latent, job.batch, torch.float32, job.cache_tensors) == kept
    models = Models(dit=c.dit.config, t5=c.text_encoder.config, decoder=c.decoder.cfg)
    uncached = dataclasses.replace(job, cache_tensors=0)
    plain = stage_peaks(models, uncached, torch.float32, "none", Offload(), GB)
    cached = stage_peaks(models, job, torch.float32, "none", Offload(), GB)
    assert cached[0]["denoise"] - plain[0]["denoise"] == kept
