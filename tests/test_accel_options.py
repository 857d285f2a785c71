"""Step-cache options (mochi.accel.cache): a cap on consecutive skips, a σ window that always runs, and the
residual extrapolated in σ; their parsing, presets and errors."""

from __future__ import annotations

import re

import pytest
import torch

from mochi.accel.cache import PRESETS, CacheSetting, StepCache, _Stream
from mochi.request import GenerationRequest

from .test_accel import PROMPT, SIGMAS, _dit, _run, pipe  # noqa: F401 - pipe is a fixture

# σ of the 8-step schedule: 1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875 (then 0).


def test_parse_presets_options_and_the_spec_round_trip():
    two = CacheSetting.parse("teacache:2x")
    assert two == CacheSetting("teacache", 0.15, max_skips=3, keep=(0.85, 0.975), extrapolate=0.5)
    assert two.spec == "teacache,max-skips=3,keep=0.85-0.975,extrapolate=0.5"
    assert str(two) == "teacache:0.15,max-skips=3,keep=0.85-0.975,extrapolate=0.5"
    assert CacheSetting.parse(two.spec, two.threshold) == two
    three = CacheSetting.parse("fbcache:3x", 0.3)  # a threshold overrides the preset's, options stay
    assert three == CacheSetting("fbcache", 0.3, extrapolate=True) and str(three) == "fbcache:0.3,extrapolate"
    assert CacheSetting.parse(" FBCache , keep=0-0.5 ") == CacheSetting("fbcache", 0.15, keep=(0.0, 0.5))
    assert CacheSetting.parse("teacache").spec == "teacache" and PRESETS["teacache:2x"][1] == 0.15
    damped = CacheSetting.parse("fbcache,extrapolate=0.5", 0.2)
    assert damped == CacheSetting("fbcache", 0.2, extrapolate=0.5)
    assert str(damped) == "fbcache:0.2,extrapolate=0.5"
    assert CacheSetting.parse(damped.spec, 0.2) == damped
    assert CacheSetting.parse("fbcache,extrapolate=1").spec == "fbcache,extrapolate"


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ("teacache,max-skips=0", "cache option max-skips=0 must be a whole number ≥ 1; nearest: 1"),
        ("teacache,max-skips=1.5", "cache option max-skips=1.5 must be a whole number ≥ 1"),
        ("fbcache,keep=0.9-0.5", "cache option keep=0.9-0.5 must be two σ values LO-HI with 0 ≤ LO ≤ HI ≤ 1"),
        ("fbcache,keep=high", "cache option keep=high must be two σ values LO-HI"),
        ("teacache,keep=0.5-1.5", "cache option keep=0.5-1.5 must be two σ values"),
        ("teacache,extrapolate=yes", "cache option extrapolate=yes must be a factor F with 0 < F ≤ 1"),
        (
            "teacache,extrapolate=0",
            "cache option extrapolate=0 must be a factor F with 0 < F ≤ 1 (plain 'extrapolate' is 1); "
            "nearest: no extrapolate option (off)",
        ),
        ("fbcache,extrapolate=1.5", "cache option extrapolate=1.5 must be a factor F with 0 < F ≤ 1 (plain"),
        (
            "fbcache,extrapolate=7",
            "cache option extrapolate=7 must be a factor F with 0 < F ≤ 1 (plain "
            "'extrapolate' is 1); nearest: extrapolate=1",
        ),
        ("fbcache,extrapolate=nan", "cache option extrapolate=nan must be a factor F"),
        (
            "teacache,skip",
            "cache option 'skip' is unknown; choose from max-skips=N, keep=LO-HI, extrapolate[=F]",
        ),
        ("none,extrapolate", "cache options 'extrapolate' given without a cache"),
        ("tea,extrapolate", "cache 'tea' is unknown; choose one of none, teacache, fbcache"),
    ],
)
def test_bad_options_are_one_line_errors(cache, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)) as e:
        GenerationRequest(PROMPT, cache=cache).validate()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_threshold_zero_with_every_option_is_exact(kind):
    dit = _dit()
    want = _run(dit, SIGMAS)
    setting = CacheSetting(kind, 0.0, max_skips=1, keep=(0.9, 0.98), extrapolate=True)
    cache = StepCache(dit, setting, sigmas=SIGMAS)
    assert torch.equal(_run(cache, SIGMAS), want) and cache.stats.skipped == 0


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_max_skips_and_keep_force_full_passes(kind):
    dit = _dit()
    capped = StepCache(dit, CacheSetting(kind, 1e9, max_skips=2), sigmas=SIGMAS)  # would skip all it may
    _run(capped, SIGMAS)
    assert capped.stats.skipped_steps == [1, 2, 4, 5] and capped.stats.forwards == 4
    kept = StepCache(dit, CacheSetting(kind, 1e9, keep=(0.9, 0.98)), sigmas=SIGMAS)  # σ 0.975, 0.909
    _run(kept, SIGMAS)
    assert kept.stats.skipped_steps == [1, 2, 3, 6] and kept.stats.forwards == 4


def test_extrapolation_is_the_line_through_the_last_two_residuals():
    cache = StepCache(_dit(), CacheSetting("fbcache", 0.1, extrapolate=True), sigmas=SIGMAS)
    r0, r1 = torch.full((1, 2, 3), 1.0), torch.full((1, 2, 3), 3.0)
    stream = _Stream()
    cache._sigma = 0.9
    cache._store(stream, r0)
    assert cache._reuse(stream) is r0  # one full pass: nothing to extrapolate from yet
    cache._sigma = 0.8
    cache._store(stream, r1)
    cache._sigma = 0.7  # one more σ step of the same size: one more step of the residual's change (+2)
    torch.testing.assert_close(cache._reuse(stream), torch.full((1, 2, 3), 5.0))
    cache.setting = CacheSetting("fbcache", 0.1, extrapolate=0.25)  # a damped line: a quarter of the +2
    torch.testing.assert_close(cache._reuse(stream), torch.full((1, 2, 3), 3.5))
    plain = StepCache(_dit(), CacheSetting("fbcache", 0.1), sigmas=SIGMAS)
    plain._sigma = 0.9
    plain._store(stream := _Stream(), r0)
    plain._sigma = 0.8
    plain._store(stream, r1)
    assert plain._reuse(stream) is r1 and stream.previous is None


def test_extrapolated_skips_differ_from_plain_ones_after_two_full_passes():
    """max-skips=1 alternates full and skipped steps: the first skip (after one full pass) is the plain
    reuse; later skips extrapolate, so the outputs part from then on."""
    outputs = {}
    for extrapolate in (False, True):
        dit, seen = _dit(), []
        cache = StepCache(
            dit, CacheSetting("teacache", 1e9, max_skips=1, extrapolate=extrapolate), sigmas=SIGMAS
        )
        _run(lambda *a, cache=cache, seen=seen: seen.append(cache(*a)) or seen[-1], SIGMAS)
        assert cache.stats.skipped_steps == [1, 3, 5]
        outputs[extrapolate] = seen
    assert all(torch.equal(a, b) for a, b in zip(outputs[False][:3], outputs[True][:3]))
    assert not torch.equal(outputs[False][3], outputs[True][3])


def test_pipeline_request_keeps_the_options_and_the_sidecar_names_them(pipe):  # noqa: F811
    req = GenerationRequest(PROMPT, seed=3, steps=8, cache="teacache:2x").resolved(pipe.components.defaults)
    assert (req.cache, req.cache_threshold) == ("teacache,max-skips=3,keep=0.85-0.975,extrapolate=0.5", 0.15)
    out = pipe.generate(GenerationRequest(PROMPT, seed=3, steps=8, cache="fbcache:3x", cache_threshold=0.6))
    assert out.stats["cache"] == "fbcache:0.6,extrapolate"
    assert out.request.cache == "fbcache,extrapolate" and out.stats["skipped_steps"]
