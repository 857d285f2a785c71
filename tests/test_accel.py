"""Step caching (TeaCache, first-block cache), its calibration, and regional compile (mochi.accel)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from mochi.accel.cache import PRESETS, RELEASED_COEFFICIENTS, CacheSetting, StepCache
from mochi.accel.calibrate import (
    calibrate,
    coefficients_path,
    find_coefficients,
    fit,
    load_coefficients,
    save_coefficients,
)
from mochi.models.dit import DIT_PRESETS, AsymmDiT, DiTConfig
from mochi.models.lora import apply_lora
from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.sampling.sampler import sample
from mochi.sampling.schedules import linear_quadratic_schedule, truncate_schedule
from mochi.weights.lora import LoraLayer

from .test_lora import random_lora
from .test_pipeline import tiny_components

PROMPT = "a red circle moving right"
# On the tiny random DiT at 8 steps (seed 3) these skip some steps and compute others, each decision far
# from its threshold (TeaCache sums 0.40 before a compute at 0.72; FBCache changes 0.37-1.03).
TEA, FB = ("teacache", 0.5), ("fbcache", 0.6)


def _dit(seed: int = 0) -> AsymmDiT:
    torch.manual_seed(seed)
    return AsymmDiT(DIT_PRESETS["tiny"]).eval().requires_grad_(False)


def _inputs(batch: int = 1):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(batch, 12, 3, 4, 4, generator=g)
    text = torch.randn(batch, 6, 32, generator=g), torch.tensor([[1, 1, 1, 1, 0, 0]] * batch).bool()
    null = torch.zeros(1, 6, 32), torch.zeros(1, 6, dtype=torch.bool)
    return z, text, null


def _run(model, sigmas, guidance=3.0, batch_cfg=True, batch=1) -> torch.Tensor:
    z, text, null = _inputs(batch)
    return sample(model, z * sigmas[0], sigmas, text, null, guidance=guidance, batch_cfg=batch_cfg)


SIGMAS = linear_quadratic_schedule(8)
CASES = {
    "batched cfg": {},
    "separate cfg": {"batch_cfg": False},
    "guidance schedule": {"guidance": [3.0, 3.0, 1.0, 1.0, 2.0, 3.0, 1.0, 3.0]},
    "batch of 2": {"batch": 2},
}


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_threshold_zero_is_exact(kind, case):
    dit = _dit()
    want = _run(dit, SIGMAS, **CASES[case])
    cache = StepCache(dit, CacheSetting(kind, 0.0), sigmas=SIGMAS)
    assert torch.equal(_run(cache, SIGMAS, **CASES[case]), want)
    assert cache.stats.skipped == 0 and dit.block_runner is None


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_truncated_schedule_exact_at_zero_and_last_step_computed(kind):
    dit = _dit()
    sigmas = truncate_schedule(SIGMAS, 0.6)
    assert torch.equal(
        _run(StepCache(dit, CacheSetting(kind, 0.0), sigmas=sigmas), sigmas), _run(dit, sigmas)
    )
    cache = StepCache(dit, CacheSetting(kind, 1e9), sigmas=sigmas)  # skips whatever may be skipped
    _run(cache, sigmas)
    steps = len(sigmas) - 1
    assert cache.stats.skipped_steps == list(range(1, steps - 1)) and cache.stats.forwards == 2


def test_skipping_reuses_the_residual_and_counts():
    dit = _dit()
    cache = StepCache(dit, CacheSetting("teacache", 1e9), sigmas=SIGMAS)
    out = _run(cache, SIGMAS)
    assert cache.stats.forwards == 2 and cache.stats.skipped_steps == [1, 2, 3, 4, 5, 6]
    exact = _run(dit, SIGMAS)
    err = ((out - exact).norm() / exact.norm()).item()
    assert 1e-4 < err < 0.5  # an approximation: neither exact nor unrelated
    # A second trajectory through the same wrapper starts over (σ rose): the same decisions again.
    assert torch.equal(_run(cache, SIGMAS), out) and cache.stats.forwards == 4


def test_teacache_follows_the_rescaled_metric():
    """The metric is the relative L1 of block 0's modulated input, rescaled and accumulated."""
    dit = _dit()
    seen = []
    cache = StepCache(dit, CacheSetting("teacache", 1e9), coefficients=[2.0, 0.0], sigmas=SIGMAS)
    original = cache._relative_l1
    cache._relative_l1 = lambda a, b, local=True: seen.append(original(a, b, local)) or seen[-1]
    _run(cache, SIGMAS)
    changes = [v for v in seen[1:]]
    # Steps 1..6 accumulate 2·change (the last step is forced and resets the sum).
    assert cache.streams and math.isclose(
        next(iter(cache.streams.values())).accumulated, 0.0
    )  # reset by the forced last step
    threshold = 2 * sum(changes[:3]) * 1.0001
    cache = StepCache(dit, CacheSetting("teacache", threshold), coefficients=[2.0, 0.0], sigmas=SIGMAS)
    _run(cache, SIGMAS)
    assert cache.stats.skipped_steps[:3] == [1, 2, 3] and 4 not in cache.stats.skipped_steps


def _lora_layers(dit: AsymmDiT) -> dict[str, LoraLayer]:
    g = torch.Generator().manual_seed(9)
    layers = {}
    for name, module in dit.named_modules():
        if name.endswith(("qkv_x", "proj_x", "mod_x")) and isinstance(module, torch.nn.Linear):
            a = torch.randn(2, module.in_features, generator=g) * 0.1
            b = torch.randn(module.out_features, 2, generator=g) * 0.1
            layers[name] = LoraLayer(a, b, alpha=2.0)
    return layers


@pytest.mark.parametrize("setting", [TEA, FB])
def test_lora_hooked_and_merged_take_the_same_decisions(setting):
    results = {}
    for merge in (False, True):
        dit = _dit()
        apply_lora(dit, _lora_layers(dit), 1.0, merge)
        exact = _run(dit, SIGMAS)
        assert torch.equal(_run(StepCache(dit, CacheSetting(setting[0], 0.0), sigmas=SIGMAS), SIGMAS), exact)
        cache = StepCache(dit, CacheSetting(*setting), sigmas=SIGMAS)
        results[merge] = _run(cache, SIGMAS), cache.stats.skipped_steps
    assert results[False][1] == results[True][1]
    torch.testing.assert_close(results[False][0], results[True][0], rtol=1e-4, atol=1e-4)


# -- the pipeline, the request and the sidecar ---------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return MochiPipeline(tiny_components(), device="cpu")


def test_pipeline_cache_stats_and_exactness(pipe):
    plain = pipe.generate(GenerationRequest(PROMPT, seed=3, steps=8))
    assert plain.stats == {"cache": "none", "dit_forwards": 8, "skipped_steps": [], "compile": False}
    tea = pipe.generate(GenerationRequest(PROMPT, seed=3, steps=8, cache="teacache", cache_threshold=TEA[1]))
    assert tea.stats["cache"] == "teacache:0.5" and tea.stats["cache_coefficients"].startswith("identity")
    assert tea.stats["dit_forwards"] == 8 - len(tea.stats["skipped_steps"]) < 8
    assert tea.request.cache == "teacache" and tea.request.cache_threshold == 0.5
    fast = pipe.generate(GenerationRequest(PROMPT, seed=3, steps=8, cache="fbcache:fast"))
    assert fast.request.cache_threshold == PRESETS["fbcache:fast"][1]
    assert not torch.equal(tea.latents, plain.latents)


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_steps_whose_sigmas_float32_cannot_tell_apart_are_counted_as_steps(pipe, kind):
    """threshold_noise=1e-9 gives 4 linear steps at σ 1 − k·2.5e-10, all 1.0 in float32 as the DiT sees them:
    each started a new trajectory (a forced full pass) reported as step 0, so the sidecar's dit_forwards and
    skipped_steps summed to 4 of 8 steps. A full pass after one at the same float32 σ must not make the
    extrapolated line divide by zero."""
    request = GenerationRequest(
        PROMPT,
        seed=3,
        steps=8,
        threshold_noise=1e-9,
        cache=f"{kind},max-skips=1,extrapolate",
        cache_threshold=1e9,
    )
    stats = pipe.generate(request).stats
    assert stats["dit_forwards"] + len(stats["skipped_steps"]) == 8
    assert stats["skipped_steps"] == [1, 3, 5]  # every other step, the last one forced


def test_the_step_cache_is_freed_before_the_decode(monkeypatch):
    """The cache's probe and residuals (B, N, dx each: about 0.5 GB apiece for the released model's batched
    CFG in bf16) stayed referenced through the VAE decode, the stage whose split is sized by free memory."""
    import gc
    import weakref

    import mochi.accel.cache

    caches = []
    original = mochi.accel.cache.StepCache.__init__

    def init(self, *args, **kwargs):  # noqa: ANN002, ANN003
        original(self, *args, **kwargs)
        caches.append(weakref.ref(self))

    monkeypatch.setattr(mochi.accel.cache.StepCache, "__init__", init)
    pipe = MochiPipeline(tiny_components(), device="cpu")
    decode = pipe.decode_latents
    alive = []

    def decode_latents(latents: torch.Tensor) -> torch.Tensor:
        gc.collect()
        alive.append([ref() is not None for ref in caches])
        return decode(latents)

    monkeypatch.setattr(pipe, "decode_latents", decode_latents)
    out = pipe.generate(GenerationRequest(PROMPT, seed=3, steps=4, cache="teacache:2x"))
    assert out.stats["dit_forwards"] >= 1 and alive == [[False]]


@pytest.mark.parametrize("setting", [("none", None), TEA, FB])
def test_separate_cfg_reports_per_step_as_batched_cfg(pipe, setting):
    """The sidecar's counts are per step: separate cond and uncond forwards listed each skipped step twice
    and summed both passes into dit_forwards, so a batch_cfg=False run disagreed with a batched one."""
    stats = {}
    for batch_cfg in (True, False):
        cache, threshold = setting
        request = GenerationRequest(
            PROMPT, seed=3, steps=8, cache=cache, cache_threshold=threshold, batch_cfg=batch_cfg
        )
        stats[batch_cfg] = pipe.generate(request).stats
    for s in stats.values():
        skipped = s["skipped_steps"]
        assert s["dit_forwards"] + len(skipped) == 8 and len(set(skipped)) == len(skipped)
        assert not set(skipped) & set(s.get("partly_skipped_steps", []))
    if setting[0] != "fbcache":  # TeaCache's two streams take the same decisions here, as one batched
        assert stats[False] == stats[True]
    else:  # first-block caches of cond and uncond disagree at some steps: those ran, and are named
        assert stats[False]["partly_skipped_steps"] and not stats[True]["partly_skipped_steps"]


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_separate_cfg_passes_keep_their_own_cache(kind):
    """Separate forwards: one cache serving cond and uncond computes what two caches, one per pass, do
    (the uncond pass never reuses the cond pass's residual, nor the other way round)."""
    dit, setting = _dit(), CacheSetting(kind, dict([TEA, FB])[kind])
    shared = StepCache(dit, setting, sigmas=SIGMAS)
    got = _run(shared, SIGMAS, batch_cfg=False)
    own = {True: StepCache(dit, setting, sigmas=SIGMAS), False: StepCache(dit, setting, sigmas=SIGMAS)}

    def per_pass(x, sigma, text, mask):  # the uncond pass carries the null text (no tokens)
        return own[bool(mask.any())](x, sigma, text, mask)

    assert torch.equal(_run(per_pass, SIGMAS, batch_cfg=False), got)
    assert sorted(shared.stats.calls) == sorted(own[True].stats.calls + own[False].stats.calls)
    assert own[True].stats.skipped  # some calls reused a residual: the comparison is not vacuous


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_separate_cfg_passes_keep_their_own_cache_when_the_negative_prompt_is_the_prompt(kind):
    """The prompt as negative prompt gives cond and uncond the same inputs: told apart by those alone, they
    shared one stream, each call at a σ not below the other's started a new trajectory, and the uncond pass
    ran every step. The sampler names the pass: the same as two caches, one per pass."""
    dit, setting = _dit(), CacheSetting(kind, dict([TEA, FB])[kind])
    z, text, _ = _inputs()
    shared = StepCache(dit, setting, sigmas=SIGMAS)
    got = sample(shared, z * SIGMAS[0], SIGMAS, text, text, guidance=3.0, batch_cfg=False)
    own = [StepCache(dit, setting, sigmas=SIGMAS), StepCache(dit, setting, sigmas=SIGMAS)]
    calls = []

    def per_pass(x, sigma, text, mask):  # every step is guided: cond, then uncond
        calls.append(len(calls) % 2)
        return own[calls[-1]](x, sigma, text, mask)

    want = sample(per_pass, z * SIGMAS[0], SIGMAS, text, text, guidance=3.0, batch_cfg=False)
    assert torch.equal(got, want)
    assert shared.stats.calls == [c for pair in zip(*(o.stats.calls for o in own)) for c in pair]
    assert own[1].stats.skipped  # the uncond pass reuses residuals too: the comparison is not vacuous


@pytest.mark.parametrize("setting", [TEA, FB])
def test_separate_cfg_skips_as_batched_cfg_when_the_negative_prompt_is_the_prompt(pipe, setting):
    """Its sidecar counts: every step ran (the uncond pass's), the skips of the cond pass listed as partly."""
    stats = {}
    for batch_cfg in (True, False):
        request = GenerationRequest(
            PROMPT, negative_prompt=PROMPT, seed=3, steps=8, cache=setting[0], cache_threshold=setting[1],
            batch_cfg=batch_cfg,
        )  # fmt: skip
        stats[batch_cfg] = pipe.generate(request).stats
    assert stats[True]["skipped_steps"]
    assert stats[False] == stats[True]


@pytest.mark.parametrize(
    ("cache", "threshold", "message"),
    [
        ("tea", None, "cache 'tea' is unknown; choose one of none, teacache, fbcache, teacache:quality"),
        ("teacache", 0.0, "cache threshold 0.0 must be a finite number > 0"),
        ("fbcache", -1.0, "cache threshold -1.0 must be a finite number > 0"),
        ("teacache", float("nan"), "cache threshold nan must be a finite number > 0"),
        ("fbcache", float("inf"), "cache threshold inf must be a finite number > 0"),
        ("none", 0.1, "cache threshold 0.1 given without a cache"),
    ],
)
def test_bad_cache_settings(cache, threshold, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        GenerationRequest(PROMPT, cache=cache, cache_threshold=threshold).validate()


def test_cli_generate_records_the_cache_in_the_sidecar(tmp_path, capsys):
    from mochi.cli import main

    out = tmp_path / "v.mp4"
    assert main(["generate", PROMPT, "--seed", "1", "--cache", "teacache:fast", "--out", str(out)]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["cache"] == "teacache:0.09" and side["cache_threshold"] == 0.09
    # The embedded model's file by name (its install path made one request's bytes differ between installs),
    # and the polynomial used (a file fitted again under one name changed the video under one record).
    assert side["cache_coefficients"] == "embedded:mochi-tiny.teacache.json"
    from mochi.weights.bundle import embedded_path

    shipped = json.loads(embedded_path().with_suffix(".teacache.json").read_text())
    assert side["cache_polynomial"] == shipped["coefficients"] and side["compile"] is False
    assert side["dit_forwards"] + len(side["skipped_steps"]) == side["steps"] and side["skipped_steps"]
    assert side["lora_merge"] is None  # no LoRA
    # Coefficients given by file: the sidecar names that file (absolute), so the run can be repeated from it.
    coefficients = tmp_path / "own.json"
    coefficients.write_text(embedded_path().with_suffix(".teacache.json").read_text())
    args = ["generate", PROMPT, "--seed", "1", "--cache", "teacache:fast", "--out", str(out)]
    assert main([*args, "--cache-coefficients", str(coefficients)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["cache_coefficients"] == str(
        coefficients.resolve()
    )
    bad = tmp_path / "w.mp4"
    assert main(["generate", PROMPT, "--cache", "fbcache", "--cache-threshold", "0", "--out", str(bad)]) == 2
    assert "cache threshold 0.0 must be a finite number > 0" in capsys.readouterr().err
    assert not bad.exists()


# -- calibration -------------------------------------------------------------------------------------


def test_fit_recovers_a_polynomial_and_needs_points():
    xs = [0.01 * i for i in range(1, 20)]
    coefficients, r2 = fit([(x, 3 * x**2 + 0.5 * x + 0.01) for x in xs])
    assert r2 > 0.999999
    torch.testing.assert_close(
        torch.tensor(coefficients), torch.tensor([0.0, 0.0, 3.0, 0.5, 0.01]), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="calibration has 5 .input, output. pairs; a degree-4 fit needs"):
        fit([(x, x) for x in xs[:5]])


def test_calibrate_and_the_coefficient_file(pipe, tmp_path):
    with pytest.raises(
        ValueError, match="calibration needs at least 2 uncached runs .* got 1; nearest valid: 2"
    ):
        calibrate(pipe, [PROMPT], runs=1)
    result = calibrate(pipe, [PROMPT, "a blue square moving up", "unused"], runs=2, steps=6)
    assert result["points"] == 2 * 5 and len(result["coefficients"]) == 5
    assert result["prompts"] == [PROMPT, "a blue square moving up"] and result["steps"] == 6
    assert all(x > 0 and y > 0 for x, y in result["trace"])
    cfg = pipe.components.dit.config
    path = coefficients_path(tmp_path / "model.safetensors")
    assert path.name == "model.teacache.json" and coefficients_path(tmp_path) == tmp_path / "teacache.json"
    save_coefficients(path, result["coefficients"], cfg, "test", {"runs": 2})
    assert load_coefficients(path, cfg) == result["coefficients"]
    assert find_coefficients(tmp_path / "model.safetensors", cfg) == (result["coefficients"], str(path))
    other = DiTConfig(depth=3)
    with pytest.raises(ValueError, match=r"were fitted for another model \(depth=2 \(model: 3\)"):
        load_coefficients(path, other)
    assert find_coefficients(None, DiTConfig()) == (list(RELEASED_COEFFICIENTS), "published (TeaCache4Mochi)")


def test_calibrate_streams_the_dits_blocks_under_block_offload(monkeypatch):
    """calibrate moved the whole DiT onto the device under --offload blocks (a 10B DiT in bf16 is 20 GB),
    where generate streams its blocks: it now runs the DiT as the pipeline's offload mode says, same fit."""
    import mochi.offload
    from mochi.offload import Offload

    pipe = MochiPipeline(tiny_components(), device="cpu")
    expected = calibrate(pipe, [PROMPT], runs=2, steps=6)["coefficients"]
    seen, real = [], mochi.offload.offloaded

    def spy(module, device, mode, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append((module, mode))
        return real(module, device, mode, *args, **kwargs)

    monkeypatch.setattr(mochi.offload, "offloaded", spy)
    pipe.offload_mode, pipe.offload = Offload("blocks", 1), True  # forced: on the CPU the pipeline ignores it
    assert calibrate(pipe, [PROMPT], runs=2, steps=6)["coefficients"] == expected
    assert seen == [(pipe.components.dit, Offload("blocks", 1))] * 2


def test_calibrate_names_a_truncated_negative_prompt(pipe):
    """Calibration encodes the negative prompt as the row after the run's prompt: its truncation warning
    said "prompt 1", and a truncated calibration prompt was named by its row, not by its place in the list."""
    from mochi.models.tokenizer import PromptTruncatedWarning

    long = "blurry " * 50
    with pytest.warns(PromptTruncatedWarning) as record:
        calibrate(pipe, [PROMPT, long], runs=2, steps=4, negative_prompt=long)
    names = [str(w.message).split(" is ")[0] for w in record]
    assert names == ["negative prompt", "prompt 1", "negative prompt"]


def test_cli_calibrate_rejects_too_few_runs_and_writes_nothing(tmp_path, capsys):
    from mochi.cli import main

    out = tmp_path / "c.json"
    assert main(["calibrate-cache", "--runs", "1", "--out", str(out)]) == 2
    assert "--runs 1: calibration needs at least 2 uncached runs; nearest valid: 2" in capsys.readouterr().err
    assert not out.exists()
    # Refused before any run (which would take minutes at full size): a seed whose runs pass the largest,
    # an --out in a missing folder or naming a folder.
    assert main(["calibrate-cache", "--runs", "3", "--seed", str(2**63 - 2), "--out", str(out)]) == 2
    assert f"so with --runs 3 it must be in [0, {2**63 - 3}]" in capsys.readouterr().err
    # More runs than seeds: "--seed 0 ... must be in [0, -99990776627963145224191]"; a huge count ran on.
    for runs in ("99999999999999999999999", "10001"):
        assert main(["calibrate-cache", "--runs", runs, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        want = (
            f"--runs {runs}: more than 10,000 uncached runs (the packaged fit used 8); nearest valid: 10000"
        )
        assert err == f"mochi: error: {want}\n"
    assert not out.exists()
    with pytest.raises(ValueError, match=r"calibration runs 10,001 uncached runs, more than 10,000"):
        calibrate(None, ["a red circle"], runs=10_001)  # the library refuses before it reads the pipeline
    assert main(["calibrate-cache", "--out", str(tmp_path / "nodir" / "c.json")]) == 2
    assert "folder" in (err := capsys.readouterr().err) and "nodir' does not exist" in err
    (tmp_path / "d.json").mkdir()
    assert main(["calibrate-cache", "--out", str(tmp_path / "d.json")]) == 2
    assert "d.json' is a folder" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()  # a folder named without .json was told to end in .json
    assert main(["calibrate-cache", "--out", str(tmp_path / "plain")]) == 2
    assert "plain' is a folder; give a file name such as" in capsys.readouterr().err
    # A dot-file ".json" has no suffix to Path; its suggestion was ".json.json".
    for name, nearest in ((".json", "teacache.json"), ("fit.txt", "fit.json"), ("fit", "fit.json")):
        assert main(["calibrate-cache", "--out", str(tmp_path / name)]) == 2
        want = f"{str(tmp_path / name)!r} must be a name ending in .json, e.g. {tmp_path / nearest}\n"
        assert capsys.readouterr().err.endswith(want)
    # A LoRA-merged fit without --out replaced the model's own coefficient file (the embedded model's too).
    assert main(["calibrate-cache", "--lora", str(tmp_path / "any.safetensors")]) == 2
    assert "without --out it would replace the model's own coefficient file" in capsys.readouterr().err
    # So did a fit of the quantized DiT, read after by unquantized runs too: refused, --out names the file.
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert main(["calibrate-cache", "--model", str(tmp_path / "m.safetensors"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--quantize int8: the fit is of the quantized DiT, and without --out it would replace" in err
    assert f"or --out {tmp_path / 'm.teacache.json'} to make it the model's fit" in err
    (tmp_path / "m.safetensors").unlink()
    assert main(["calibrate-cache", "--prompt", "a cat", "--prompt", " ", "--out", str(out)]) == 2
    assert "--prompt: is blank (only whitespace); describe what the video shows" in capsys.readouterr().err
    # Without --out the embedded model's packaged fit was replaced (by name, or by its file's path).
    from mochi.weights.bundle import embedded_path

    packaged = embedded_path().with_suffix(".teacache.json").read_bytes()
    for model in ([], ["--model", "embedded:mochi-tiny"], ["--model", str(embedded_path())]):
        assert main(["calibrate-cache", "--runs", "2", "--steps", "4", *model]) == 2
        assert "without --out the fit would replace the embedded model's packaged" in capsys.readouterr().err
    assert embedded_path().with_suffix(".teacache.json").read_bytes() == packaged
    # An --out, or the file beside a model, that is another JSON (a sidecar, a config.json) was replaced.
    sidecar = tmp_path / "clip.json"
    sidecar.write_text('{"prompt": "a cat"}')
    assert main(["calibrate-cache", "--runs", "2", "--out", str(sidecar)]) == 2
    assert f"--out {str(sidecar)!r} exists and is not a mochi-teacache coefficient file" in (
        capsys.readouterr().err
    )
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "teacache.json").write_text("[]")
    assert main(["calibrate-cache", "--runs", "2", "--model", str(tmp_path / "m")]) == 2
    assert "the coefficient file beside the model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.json", "d.json", "m", "plain"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frames", "10"], "frames=10 is not of the form 6k+1"),
        (
            ["--steps", "2"],
            "2 runs of 2 steps give 2 (input, output) pairs; a degree-4 fit needs at least 6: "
            "use at least 6 runs at 2 steps",
        ),
        (["--lora", "/nonexistent.safetensors"], "--lora '/nonexistent.safetensors' does not exist"),
        (["--offload", "blocks:9"], "blocks:9"),
        (
            [
                "--quantize",
                "q4_0",
                "--fp8",
                "keep",
                "--dtype",
                "bf16",
                "--attention",
                "flash",
                "--device",
                "cpu",
            ],
            "flash",
        ),
    ],
)
def test_cli_calibrate_checks_the_request_before_loading(tmp_path, capsys, monkeypatch, argv, message):
    """These were found after the model had loaded (and the too-small fit after every run)."""
    import mochi.pipeline
    from mochi.cli import main

    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: pytest.fail("loaded first"))
    assert main(["calibrate-cache", "--runs", "2", *argv, "--out", str(tmp_path / "c.json")]) == 2
    assert message in capsys.readouterr().err


def test_cli_calibrate_records_the_runs_it_made(tmp_path, capsys):
    """The record listed every --prompt though 2 runs used 2 of 3, and named neither the steps nor the
    guidance nor the size the runs used (the model's defaults when not given)."""
    from mochi.cli import main
    from mochi.weights.bundle import load_embedded

    out, prompts = tmp_path / "c.json", ["a red circle", "a blue square", "a green triangle"]
    argv = ["calibrate-cache", "--out", str(out), "--prompt", prompts[0], "--prompt", prompts[1]]
    assert main([*argv, "--runs", "3", "--steps", "3"]) == 0
    assert json.loads(out.read_text())["fit"]["prompts"] == [prompts[0], prompts[1], prompts[0]]
    assert main([*argv, "--prompt", prompts[2], "--runs", "2", "--steps", "4", "--guidance", "3"]) == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    defaults = load_embedded().defaults
    assert data["fit"]["prompts"] == prompts[:2] and data["fit"]["runs"] == 2
    assert {k: data["fit"][k] for k in ("steps", "guidance", "frames", "width", "height")} == {
        "steps": 4,
        "guidance": 3.0,
        **{k: defaults[k] for k in ("frames", "width", "height")},
    }
    config = load_embedded().dit.config
    assert load_coefficients(out, config) == data["coefficients"]
    # A file written before the fit named steps, guidance and size still loads.
    for k in ("steps", "guidance", "frames", "width", "height"):
        del data["fit"][k]
    out.write_text(json.dumps(data))
    assert load_coefficients(out, config) == data["coefficients"]


def test_cli_calibrate_fits_the_dit_as_generate_will_run_it(tmp_path, capsys):
    """calibrate-cache had no --dtype, --quantize, --offload or --attention: the released DiT could only be
    calibrated full width and resident (over 24 GB of GPU), and a quantized model's fit came from the
    full-width one. A LoRA is applied unmerged into quantized weights (merging is refused there)."""
    from mochi.cli import main
    from mochi.weights.bundle import load_embedded
    from mochi.weights.lora import save_lora

    lora = tmp_path / "style.safetensors"
    save_lora(random_lora(load_embedded().dit, seed=1), lora)
    argv = ["calibrate-cache", "--runs", "2", "--steps", "6", "--lora", str(lora)]
    plain, quantized = tmp_path / "plain.json", tmp_path / "q8.json"
    assert main([*argv, "--out", str(plain)]) == 0
    assert "mochi: note" not in capsys.readouterr().out
    assert main([*argv, "--quantize", "q8_0", "--offload", "blocks", "--out", str(quantized)]) == 0
    assert "mochi: note: dit: 37 Linear layers quantized to q8_0; t5: 14" in capsys.readouterr().out
    fits = [json.loads(p.read_text()) for p in (plain, quantized)]
    assert fits[0]["fit"]["quantize"] is None and fits[1]["fit"]["quantize"] == "q8_0"
    assert fits[0]["fit"]["dtype"] == fits[1]["fit"]["dtype"] == "float32"  # the CPU's default
    assert fits[0]["coefficients"] != fits[1]["coefficients"]  # the quantized DiT's own fit


def test_cli_calibrate_hooks_a_lora_into_a_dit_kept_quantized_as_stored(tmp_path, capsys, monkeypatch):
    """A DiT kept in its stored fp8 or GGUF form is quantized though no --quantize was given (the pipeline's
    ``quantization`` note is None): calibrate-cache --lora merged into it and failed after loading."""
    import mochi.pipeline
    import mochi.weights.components
    from mochi.cli import main
    from mochi.weights.lora import save_lora
    from mochi.weights.quantize import quantize_model

    c = tiny_components()
    lora = tmp_path / "style.safetensors"
    save_lora(random_lora(c.dit, seed=1), lora)
    quantize_model(c.dit, "fp8")  # as a kept fp8 checkpoint loads: Linears stored quantized, no note
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: c)
    monkeypatch.setattr(mochi.weights.components, "model_defaults", lambda model: c.defaults)
    out = tmp_path / "fit.json"
    argv = ["calibrate-cache", "--runs", "2", "--steps", "6", "--lora", str(lora), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    fit = json.loads(out.read_text())["fit"]
    assert fit["lora"] == str(lora) and fit["quantize"] == "fp8"  # what the DiT held, asked for or not


def test_embedded_model_ships_calibrated():
    from mochi.weights.bundle import embedded_path, load_embedded

    c = load_embedded()
    coefficients, source = find_coefficients(c.source, c.dit.config)
    assert source == str(embedded_path().with_suffix(".teacache.json")) and len(coefficients) == 5
    data = json.loads(embedded_path().with_suffix(".teacache.json").read_text())
    assert data["fit"]["runs"] >= 2 and data["dit_config"]["depth"] == c.dit.config.depth


# -- compile ----------------------------------------------------------------------------------------


def test_compile_falls_back_with_one_line_where_no_compiler(monkeypatch, capsys):
    from mochi.accel import compile as accel_compile

    monkeypatch.setattr(accel_compile, "compiler_problem", lambda device: "no C++ compiler")
    dit = _dit()
    assert accel_compile.compile_dit(dit) is False and not accel_compile.is_compiled(dit)
    assert (
        capsys.readouterr().err == "mochi: --compile unavailable here (no C++ compiler); running uncompiled\n"
    )


@pytest.fixture
def fake_inductor(monkeypatch):
    """torch.compile's default backend replaced: ``fake_inductor(fail)`` makes compiling raise ``fail``, or
    (None) returns the traced graph uncompiled; returns the list of graphs it was handed. Dynamo's caches are
    cleared before and after, so no graph compiled here or elsewhere is reused."""
    import torch._inductor.compile_fx as compile_fx

    from mochi.accel import compile as accel_compile

    graphs = []

    def install(fail: Exception | None = None) -> list:
        def compile_graph(gm, example_inputs, **kwargs):  # noqa: ANN001, ANN202 - compile_fx's signature
            graphs.append(gm)
            if fail is not None:
                raise fail
            return gm.forward

        monkeypatch.setattr(compile_fx, "compile_fx", compile_graph)
        monkeypatch.setattr(accel_compile, "compiler_problem", lambda device="cpu": None)
        return graphs

    torch._dynamo.reset()
    yield install
    torch._dynamo.reset()


def test_compile_failure_at_first_call_runs_eager_and_says_why(fake_inductor, capsys):
    """The pipeline stops claiming compilation (no compile_seconds, ``compiled`` False) once it fell back,
    for that request and the next; the line names the compiler's error, not BackendCompilerFailed's header."""
    fake_inductor(RuntimeError("simulated C++ build error\ncc1plus: details"))
    req = GenerationRequest(PROMPT, seed=1, steps=3)
    want = MochiPipeline(tiny_components(), device="cpu").generate(req).latents
    pipe = MochiPipeline(tiny_components(), device="cpu", compile=True)
    assert pipe.compiled
    for _ in range(2):
        out = pipe.generate(req)
        assert not pipe.compiled and "compile_seconds" not in out.stats
        torch.testing.assert_close(out.latents, want)
    err = capsys.readouterr().err
    assert err.count("mochi: compiling failed") == 1
    assert "mochi: compiling failed (RuntimeError: simulated C++ build error); running uncompiled\n" in err


def test_error_at_first_compiled_call_keeps_compilation(fake_inductor, capsys):
    """A job cancelled in its first DiT call (or any error that is not the compiler's) propagates and leaves
    the DiT compiled: the next request compiles and reports compile_seconds."""
    from mochi.accel.compile import CallTimer, is_compiled
    from mochi.interrupt import Interrupted, stop_checks

    graphs = fake_inductor()
    pipe = MochiPipeline(tiny_components(), device="cpu", compile=True)
    stop = False

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal stop
        stop = stop or stage == "denoise"  # cancelled as the first denoising step starts

    req = GenerationRequest(PROMPT, seed=1, steps=2)
    with pytest.raises(Interrupted), stop_checks(pipe.components.modules(), lambda: stop):
        pipe.generate(req, progress=progress)
    assert pipe.compiled and not graphs
    out = pipe.generate(req)
    assert pipe.compiled and graphs and out.stats["compile_seconds"] is not None

    def broken(*args: torch.Tensor) -> torch.Tensor:
        raise ValueError("not a compiler error")

    timer = CallTimer(broken, pipe.components.dit)
    with pytest.raises(ValueError, match="not a compiler error"):
        timer(torch.zeros(1))
    assert is_compiled(pipe.components.dit) and timer.fell_back is None
    assert "compiling failed" not in capsys.readouterr().err


def test_compiled_dit_follows_loras_hooked_after_its_first_call(fake_inductor, monkeypatch):
    """A LoRA hooked in after the first compiled call (a later request's), taken off again or applied at
    another scale ran the graph traced before: dynamo skipped guarding on the traced layers' hooks. (The fix
    then set that for the whole process.)"""
    from mochi.accel.compile import compile_dit

    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)  # torch's default
    fake_inductor()
    sigmas = SIGMAS[:3] + [0.0]
    dit = _dit()
    layers = _lora_layers(dit)
    base = _run(dit, sigmas)
    want = {}
    for scale in (1.0, 0.5):
        handle = apply_lora(dit, layers, scale)
        want[scale] = _run(dit, sigmas)
        handle.remove()
    assert compile_dit(dit)
    torch.testing.assert_close(_run(dit, sigmas), base)
    for scale in (1.0, 0.5):
        handle = apply_lora(dit, layers, scale)
        torch.testing.assert_close(_run(dit, sigmas), want[scale])
        handle.remove()
    torch.testing.assert_close(_run(dit, sigmas), base)
    # Set around the DiT's compiled calls only: a user's own compiled models keep torch's default.
    assert torch._dynamo.config.skip_nnmodule_hook_guards is True


@pytest.mark.slow
def test_compiled_equals_eager_with_caching():
    """Regional compile: outputs equal eager within fp32 tolerance, cached or not (a few minutes on CPU)."""
    from mochi.accel.compile import compile_dit, is_compiled

    dit = _dit()
    want = _run(dit, SIGMAS)
    cached_want = _run(StepCache(dit, CacheSetting(*TEA), sigmas=SIGMAS), SIGMAS)
    assert compile_dit(dit) and is_compiled(dit)
    torch.testing.assert_close(_run(dit, SIGMAS), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        _run(StepCache(dit, CacheSetting(*TEA), sigmas=SIGMAS), SIGMAS), cached_want, rtol=1e-4, atol=1e-5
    )


# -- the HTTP API -------------------------------------------------------------------------------------


def test_api_forwards_the_cache_and_rejects_bad_ones(pipe, tmp_path):
    pytest.importorskip("fastapi", reason="needs the serve extra (fastapi, uvicorn)")
    from .serve_harness import LiveServer, call_json, wait_for

    with LiveServer(pipe, tmp_path) as server:
        body = {"prompt": PROMPT, "seed": 2, "steps": 8, "cache": "teacache", "cache_threshold": TEA[1]}
        status, job = call_json("POST", f"{server.url}/api/jobs", body)
        assert status == 202, job
        done = wait_for(server.url, job["id"], ("done", "failed"), timeout=120)
        assert done["status"] == "done", done
        assert done["parameters"]["cache"] == "teacache" and done["parameters"]["cache_threshold"] == 0.5
        sidecar = json.loads((tmp_path / f"{job['id']}.json").read_text())
        assert sidecar["cache"] == "teacache" and sidecar["cache_threshold"] == 0.5
        for bad, message in [
            ({"cache": "magcache"}, "cache 'magcache' is unknown; choose one of none, teacache, fbcache"),
            ({"cache": "fbcache", "cache_threshold": 0}, "cache_threshold: Input should be greater than 0"),
            ({"cache": "teacache,max-skips=0"}, "cache option max-skips=0 must be a whole number ≥ 1"),
        ]:
            status, reply = call_json("POST", f"{server.url}/api/jobs", {"prompt": PROMPT, **bad})
            assert status == 422 and message in reply["detail"], reply


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flash", "sage"])
@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_threshold_zero_is_exact_on_every_cuda_backend(backend, kind):
    from mochi.ops.attention import available_backends

    if backend not in available_backends():
        pytest.skip(f"attention backend {backend!r} is not installed")
    dit = _dit().to("cuda", torch.bfloat16)
    dit.attention_backend = backend
    z, text, null = _inputs()
    move = lambda t: (t[0].cuda(), t[1].cuda())  # noqa: E731
    args = (z.cuda(), SIGMAS, move(text), move(null))
    want = sample(dit, *args, guidance=3.0)
    assert torch.equal(
        sample(StepCache(dit, CacheSetting(kind, 0.0), sigmas=SIGMAS), *args, guidance=3.0), want
    )
    cache = StepCache(dit, CacheSetting(kind, 1e9), sigmas=SIGMAS)
    sample(cache, *args, guidance=3.0)
    assert cache.stats.forwards == 2


def test_a_fit_negative_inside_its_range_is_warned_of(tmp_path, capsys, monkeypatch):
    """Six points for five coefficients fitted a polynomial below zero inside the measured range (a LoRA's
    fit: −2.57 around 0.7), saved without a word; TeaCache adds it, so big changes brought skips nearer."""
    import mochi.accel.calibrate as calibrate
    from mochi.accel.calibrate import negative_span
    from mochi.cli import main

    assert negative_span([1.0, 0.0], 0.1, 0.7) is None  # y = x
    lo, hi = negative_span([1.0, -1.0, 0.16], 0.0, 1.0)  # (x − 0.2)(x − 0.8)
    assert abs(lo - 0.2) < 2e-3 and abs(hi - 0.8) < 2e-3
    trace = [(0.1, 0.5), (0.5, 0.1), (0.9, 0.5)]
    fit = {"coefficients": [1.0, -1.0, 0.16], "r2": 0.9, "points": 3, "trace": trace, "prompts": ["x"]}
    fit |= {"steps": 4, "guidance": 2.0, "frames": 25, "width": 64, "height": 64}
    monkeypatch.setattr(calibrate, "calibrate", lambda *a, **k: fit)
    assert main(["calibrate-cache", "--runs", "2", "--out", str(tmp_path / "c.json")]) == 0
    err = capsys.readouterr().err
    assert re.search(
        r"mochi: warning: the fitted polynomial is negative for input changes 0\.2\d* to 0\.(8|79)", err
    )
    assert "inside the range it was fitted on" in err


@pytest.mark.parametrize("coefficients", [[float("nan")] * 5, "abc", []])
def test_coefficients_set_on_the_pipeline_are_checked_before_any_work(coefficients):
    """NaN coefficients skipped every step but the first and last without a word, a string failed in numpy
    after the text stage; an array (np.polyfit's) and the cache's own kind in capitals are as a list is."""
    pipe = MochiPipeline(tiny_components(), device="cpu")
    stages = []
    pipe.cache_coefficients = coefficients
    with pytest.raises(ValueError) as e:
        pipe.generate(
            GenerationRequest(PROMPT, seed=3, steps=8, cache="TeaCache"),
            progress=lambda stage, done, total: stages.append(stage),
        )
    assert str(e.value) == (
        f"cache_coefficients={coefficients!r:.60} must be a list of finite numbers (TeaCache's polynomial, "
        "highest power first, as mochi.accel.calibrate.load_coefficients reads it), or None for the model's "
        "own"
    )
    assert stages == ["text"]  # the bar's start only: nothing was encoded
    pipe.cache_coefficients = np.array([1.0, 0.0])
    out = pipe.generate(GenerationRequest(PROMPT, seed=3, steps=8, cache="teacache", cache_threshold=0.5))
    assert out.stats["cache_polynomial"] == [1.0, 0.0] and out.stats["skipped_steps"]
