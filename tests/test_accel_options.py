"""Step-cache options (mochi.accel.cache): a cap on consecutive skips, a σ window that always runs, and the
residual extrapolated in σ; their parsing, presets and errors."""

from __future__ import annotations

import re

import pytest
import torch

from mochi.accel.cache import PRESETS, CacheSetting, StepCache, _Stream
from mochi.request import GenerationRequest
from mochi.sampling.schedules import linear_quadratic_schedule

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


def test_the_sidecars_cache_entry_reads_back_and_options_are_given_once():
    """The sidecar's "cache" (str(setting), "teacache:0.15,...") was refused by --cache; a repeated option
    silently kept the last; "max-skips=²" failed in int()."""
    for name in PRESETS:
        setting = CacheSetting.parse(name)
        assert CacheSetting.parse(str(setting)) == setting
    assert CacheSetting.parse("teacache:0.2", 0.2).threshold == 0.2
    with pytest.raises(
        ValueError, match=r"cache 'teacache:0.2' names threshold 0.2 and the cache threshold is 0.3"
    ):
        CacheSetting.parse("teacache:0.2", 0.3)
    # After a preset, an option overrides the preset's own; the same option twice is refused.
    assert CacheSetting.parse("teacache:2x,max-skips=9").max_skips == 9
    for name in ("teacache,max-skips=3,max-skips=1", "fbcache,extrapolate=0.5,extrapolate"):
        with pytest.raises(ValueError, match=r"cache option [a-z-]+ is given twice"):
            CacheSetting.parse(name)
    with pytest.raises(ValueError, match=r"max-skips=² must be a whole number ≥ 1"):
        CacheSetting.parse("teacache,max-skips=²")


def test_cache_values_read_back_exactly():
    """spec and str() wrote values with :g, 6 significant digits: the run used keep 0.123457 when asked for
    0.1234567, and the sidecar's "cache" named another threshold than its "cache_threshold"."""
    asked = "teacache,keep=0.1234567-0.5,extrapolate=0.33333333"
    req = GenerationRequest(PROMPT, cache=asked, cache_threshold=0.1234567).resolved(
        {"frames": 7, "height": 32, "width": 32, "steps": 8, "guidance": 2.0}
    )
    assert req.cache == asked and req.cache_threshold == 0.1234567
    setting = CacheSetting.parse(req.cache, req.cache_threshold)
    assert setting == CacheSetting("teacache", 0.1234567, keep=(0.1234567, 0.5), extrapolate=0.33333333)
    assert str(setting) == "teacache:0.1234567,keep=0.1234567-0.5,extrapolate=0.33333333"
    assert CacheSetting.parse(str(setting)) == setting  # the sidecar's "cache" alone
    GenerationRequest(PROMPT, cache=str(setting), cache_threshold=req.cache_threshold).validate()  # and both
    for x in (1 / 3, 0.1 + 0.2, 1e-5, 2.0**-40, 0.975):
        setting = CacheSetting("fbcache", x, keep=(x, 1.0), extrapolate=x)
        assert CacheSetting.parse(str(setting)) == setting
        assert "e" not in str(setting).removeprefix("fbcache").replace("keep", "").replace("extrapolate", "")
    assert str(CacheSetting("fbcache", 1.0, keep=(0.0, 1.0))) == "fbcache:1,keep=0-1"


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        (
            "teacache:0_1",
            "cache 'teacache:0_1': threshold '0_1' must be a plain decimal number (ASCII digits and at most "
            "one '.', no '_'); nearest: 1, the value it reads as",
        ),
        ("teacache:٠.١", "cache 'teacache:٠.١': threshold '٠.١' must be a plain decimal number"),
        ("fbcache,keep=0.1-0_5", "cache option keep=0.1-0_5: σ '0_5' must be a plain decimal number"),
        ("teacache,extrapolate=0_5", "cache option extrapolate=0_5: factor '0_5' must be a plain decimal"),
        (" ", "cache ' ' is unknown; choose one of none, teacache"),
        (",teacache", "cache ',teacache' is unknown; choose one of none, teacache"),
    ],
)
def test_numbers_are_plain_decimals_and_errors_name_the_value_given(cache, message):
    """Python's float reads "0_1" as 1.0 and Arabic-Indic digits as digits, so "teacache:0_1" silently ran
    at threshold 1; --cache " " was refused as ''."""
    with pytest.raises(ValueError, match="^" + re.escape(message)) as e:
        GenerationRequest(PROMPT, cache=cache).validate()
    assert "\n" not in str(e.value)
    assert CacheSetting.parse("teacache:1e-2,keep=.5-1.").threshold == 0.01  # exponent and bare points read


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
        # A threshold that is not finite is named as one (it was "cache 'teacache:inf' is unknown").
        ("teacache:inf", "cache threshold inf must be a finite number > 0"),
        ("fbcache:nan,extrapolate", "cache threshold nan must be a finite number > 0"),
        ("teacache:1e400", "cache threshold 1e400 must be a finite number > 0"),
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


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_keep_takes_the_schedules_sigmas_at_its_bounds(kind):
    """σ 0.7 of a schedule is 0.69999999 in float32, as the sampler hands it over: keep=0.7-0.9 skipped that
    step, and `teacache:2x`'s keep=0.85-0.975 left out the σ 0.97499999 of a 50-step schedule."""
    sigmas = [1.0, 0.9, 0.7, 0.5, 0.3, 0.2, 0.0]
    kept = StepCache(_dit(), CacheSetting(kind, 1e9, keep=(0.7, 0.9)), sigmas=sigmas)
    _run(kept, sigmas)
    assert kept.stats.skipped_steps == [3, 4]
    sigmas = linear_quadratic_schedule(50)
    assert 0.85 <= sigmas[25] <= 0.975 < torch.tensor(sigmas[25]).item()
    kept = StepCache(_dit(), CacheSetting(kind, 1e9, keep=(0.85, 0.975)), sigmas=sigmas)
    _run(kept, sigmas)
    assert [i for i in range(50) if i not in kept.stats.skipped_steps] == [0, *range(25, 34), 49]
    # ... and the 0.9750000000000001 that ends the linear part of most schedules (20, 24, 64 steps).
    sigmas = linear_quadratic_schedule(20)
    assert sigmas[10] == 0.9750000000000001
    kept = StepCache(_dit(), CacheSetting(kind, 1e9, keep=(0.85, 0.975)), sigmas=sigmas)
    _run(kept, sigmas)
    assert [i for i in range(20) if i not in kept.stats.skipped_steps] == [0, *range(10, 14), 19]


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


# -- the TeaCache coefficient file and --cache-coefficients --------------------------------------------


def _coefficient_file(tmp_path, **changes):  # noqa: ANN001, ANN202
    """A coefficient file as `mochi calibrate-cache` writes it for the tiny DiT, with ``changes`` applied."""
    import json

    from mochi.accel.calibrate import save_coefficients
    from mochi.models.dit import DIT_PRESETS

    path = tmp_path / "c.teacache.json"
    save_coefficients(path, [1.0, -2.0, 3.0, 0.5, 0.01], DIT_PRESETS["tiny"], "test", {"runs": 2})
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "[1, 2, 3, 4, 5]",
            r"is not a mochi-teacache coefficient file \(its top level is a list, not an object",
        ),
        ("3", r"is not a mochi-teacache coefficient file \(its top level is a number"),
        ('"x"', r"is not a mochi-teacache coefficient file \(its top level is a string"),
        (
            "not json",
            r"is not a mochi-teacache coefficient file \(not JSON: Expecting value at line 1 column 1\)",
        ),
        (b"\xff\xfe\x00\x81", r"is not a mochi-teacache coefficient file \(not UTF-8 JSON text\)"),
        ({"dit_config": None}, r"'dit_config' must be an object of the DiT's settings, got null"),
        ({"dit_config": [1, 2]}, r"'dit_config' must be an object of the DiT's settings, got a list"),
        ({"coefficients": [1, 2, None, 4, 5]}, r"coefficient 2 is null; all 5 must be finite numbers"),
        ({"coefficients": [1, 2, [3], 4, 5]}, r"coefficient 2 is \[3\]; all 5 must be finite numbers"),
        ({"coefficients": [1, 2, 3, True, 5]}, r"coefficient 3 is true; all 5 must be finite numbers"),
        ({"coefficients": [float("nan")] * 5}, r"coefficient 0 is NaN; all 5 must be finite numbers"),
        ({"coefficients": [1, 2, 3, 4, float("inf")]}, r"coefficient 4 is Infinity; all 5 must be finite"),
        (
            {"coefficients": []},
            r"'coefficients' must be a list of 5 numbers \(the degree-4 polynomial, .*got 0",
        ),
        ({"coefficients": list(range(7))}, r"'coefficients' must be a list of 5 numbers .*, got 7"),
        ({"coefficients": 5}, r"'coefficients' must be a list of 5 numbers .*, got a number"),
    ],
)
def test_bad_coefficient_files_are_one_line_errors_naming_the_file(tmp_path, content, message):
    from mochi.accel.calibrate import load_coefficients
    from mochi.models.dit import DIT_PRESETS

    path = _coefficient_file(tmp_path)
    if isinstance(content, dict):
        path = _coefficient_file(tmp_path, **content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*" + message) as e:
        load_coefficients(path, DIT_PRESETS["tiny"])
    assert "\n" not in str(e.value) and "mochi calibrate-cache" in str(e.value)


def test_a_good_coefficient_file_loads(tmp_path):
    from mochi.accel.calibrate import load_coefficients
    from mochi.models.dit import DIT_PRESETS

    assert load_coefficients(_coefficient_file(tmp_path), DIT_PRESETS["tiny"]) == [1.0, -2.0, 3.0, 0.5, 0.01]


@pytest.mark.parametrize(
    ("cache", "ok"),
    [
        ("none", False),
        ("fbcache", False),
        ("fbcache:fast", False),
        ("teacache", True),
        ("teacache:2x", True),
        ("teacache,keep=0-0.5", True),
    ],
)
def test_cache_coefficients_need_a_teacache(cache, ok, tmp_path, monkeypatch):
    import argparse

    from mochi.cli.accel import check_cache_options

    monkeypatch.chdir(tmp_path)
    _coefficient_file(tmp_path).rename(tmp_path / "c.json")  # read before the model loads, when it applies
    args = argparse.Namespace(cache=cache, cache_coefficients="c.json")
    if ok:
        check_cache_options(args)
        # The file is looked for before the model loads (it was read after, the error naming no option).
        (tmp_path / "d.json").mkdir()
        for path, why in [("none.json", "does not exist"), ("d.json", "is a folder"), ("", "is empty")]:
            with pytest.raises(
                ValueError, match=rf"^--cache-coefficients '{path}' {why}; give a file written"
            ):
                check_cache_options(argparse.Namespace(cache=cache, cache_coefficients=path))
        return
    with pytest.raises(
        ValueError,
        match=rf"^--cache-coefficients 'c.json' applies only to TeaCache, not --cache "
        rf"{re.escape(cache)}; add --cache teacache",
    ):
        check_cache_options(args)
    check_cache_options(argparse.Namespace(cache=cache, cache_coefficients=None))


def test_cli_refuses_cache_coefficients_without_teacache(tmp_path, capsys):
    from mochi.cli import main

    good = _coefficient_file(tmp_path)
    for extra in ([], ["--cache", "fbcache"]):
        out = tmp_path / "v.mp4"
        argv = [
            "generate",
            PROMPT,
            "--frames",
            "7",
            "--steps",
            "2",
            *extra,
            "--cache-coefficients",
            str(good),
        ]
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mochi: error: --cache-coefficients") and "applies only to TeaCache" in err
        assert err.count("\n") == 1 and not out.exists()
    bad = _coefficient_file(tmp_path, coefficients=[])
    out = tmp_path / "w.mp4"
    argv = ["generate", PROMPT, "--frames", "7", "--steps", "2", "--cache", "teacache"]
    assert main([*argv, "--cache-coefficients", str(bad), "--out", str(out)]) == 2
    assert "'coefficients' must be a list of 5 numbers" in capsys.readouterr().err and not out.exists()


def test_cli_refuses_a_malformed_coefficient_file_before_loading(tmp_path, capsys, monkeypatch):
    """A file that is no coefficient file was refused only once the model (minutes for the released one)
    and its T5 had loaded; whether a good file fits the model is still checked after the load."""
    import mochi.pipeline
    from mochi.cli import main

    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: pytest.fail("loaded first"))
    argv = ["generate", PROMPT, "--frames", "7", "--steps", "2", "--cache", "teacache:fast"]
    notes = tmp_path / "notes.json"
    notes.write_text("fit me\n")
    for bad, message in [
        (_coefficient_file(tmp_path, coefficients=[1.0, "x", 0, 0, 0]), 'coefficient 1 is "x"'),
        (notes, "is not a mochi-teacache coefficient file (not JSON"),
    ]:
        out = tmp_path / "w.mp4"
        assert main([*argv, "--cache-coefficients", str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mochi: error: ") and message in err and err.count("\n") == 1
        assert not out.exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: CacheSetting.parse("teacache,max-skips=3.0"),
            "cache option max-skips=3.0 must be a whole number ≥ 1; nearest: 3",
        ),
        (
            lambda: CacheSetting.parse("teacache,max-skips=x"),
            "cache option max-skips=x must be a whole number ≥ 1; nearest: 1",
        ),
        (lambda: CacheSetting.parse("teacache:1e-400"), "cache threshold 1e-400 must be a finite number > 0"),
        (
            lambda: GenerationRequest(PROMPT, cache="teacache", cache_threshold=10**400).validate(),
            "cache threshold an integer of about 401 digits must be a finite number > 0",
        ),
    ],
)
def test_option_values_are_named_as_written_with_the_nearest_valid(make, message):
    """max-skips=3.0 was told "nearest: 1", 1e-400 was named "0.0", and 10**400 raised OverflowError."""
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        make()
