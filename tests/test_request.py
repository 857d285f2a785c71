import re

import pytest

from mochi.request import (
    MAX_VISUAL_TOKENS,
    GenerationRequest,
    check_frames,
    check_multiple,
    check_seed,
    check_size,
    nearest_frame_counts,
    visual_tokens,
)

DEFAULTS = {"frames": 25, "height": 64, "width": 64, "steps": 8, "guidance": 4.0}


@pytest.mark.parametrize(("frames", "latents"), [(1, 1), (7, 2), (25, 5), (163, 28)])
def test_valid_frame_counts(frames, latents):
    assert check_frames(frames) == latents


@pytest.mark.parametrize(("frames", "nearest"), [(30, "25 or 31"), (26, "25 or 31"), (2, "1 or 7"), (0, "1")])
def test_invalid_frame_counts_name_the_nearest(frames, nearest):
    with pytest.raises(
        ValueError, match=rf"frames={frames} is not of the form 6k\+1.*nearest valid: {nearest}$"
    ):
        check_frames(frames)


def test_nearest_frame_counts():
    assert nearest_frame_counts(162) == (157, 163)


@pytest.mark.parametrize(
    ("value", "nearest"), [(100, "96 or 112"), (8, "16"), (0, "16"), (481, "480 or 496")]
)
def test_multiple_of_16(value, nearest):
    with pytest.raises(
        ValueError, match=rf"height={value} must be a positive multiple of 16; nearest valid: {nearest}"
    ):
        check_multiple(value, 16, "height")
    assert check_multiple(480, 16, "height") == 480


def test_resolved_fills_defaults_and_draws_a_seed():
    r = GenerationRequest("a red circle moving right", steps=4).resolved(DEFAULTS)
    assert (r.frames, r.height, r.width, r.steps, r.guidance) == (25, 64, 64, 4, 4.0)
    assert isinstance(r.seed, int) and 0 <= r.seed < 2**32
    assert GenerationRequest("x", seed=7).resolved(DEFAULTS).seed == 7


def test_resolved_takes_the_models_sampler_unless_the_request_names_one():
    ancestral = {**DEFAULTS, "eta": 1.0, "eta_above": 0.3}
    r = GenerationRequest("x", seed=1).resolved(ancestral)
    assert (r.eta, r.eta_above) == (1.0, 0.3)
    euler = GenerationRequest("x", seed=1).resolved(DEFAULTS)  # defaults that name no sampler: Euler
    assert (euler.eta, euler.eta_above) == (0.0, 0.0)
    explicit = GenerationRequest("x", seed=1, eta=0.0).resolved(ancestral)  # 0 is kept, not read as "unset"
    assert (explicit.eta, explicit.eta_above) == (0.0, 0.3)
    assert GenerationRequest("x", seed=1, eta=0.5, eta_above=0.1).resolved(ancestral).eta_above == 0.1
    # A step cache skips no ancestral step: a cached request runs Euler unless it names eta itself.
    cached = GenerationRequest("x", seed=1, cache="teacache").resolved(ancestral)
    assert (cached.eta, cached.eta_above, cached.cache) == (0.0, 0.0, "teacache")
    kept = GenerationRequest("x", seed=1, cache="teacache", eta_above=0.5).resolved(ancestral)
    assert (kept.eta, kept.eta_above) == (0.0, 0.5)  # what the request named is recorded as named
    named = GenerationRequest("x", seed=1, cache="teacache", eta=1.0).resolved(ancestral)
    assert (named.eta, named.eta_above) == (1.0, 0.3)
    with pytest.raises(ValueError, match=r"eta_above=1.0 must lie in \[0, 1\)"):
        GenerationRequest("x", seed=1).resolved({**DEFAULTS, "eta": 1.0, "eta_above": 1.0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": []}, "prompt list is empty"),
        ({"steps": 0}, r"steps=0 must be in \[1, 10000\] \(Mochi uses 64\); nearest valid: 1"),
        ({"steps": 10**20}, r"steps=100000000000000000000 must be in \[1, 10000\] .*; nearest valid: 10000"),
        ({"seed": -1}, r"seed=-1 must be in"),
        # Found here, not as a negative sigma deep in sampling (or a 'start_sigma' the request has not).
        # One sentence naming the nearest valid settings (it ended "; the default threshold_noise is 0.025").
        (
            {"threshold_noise": 0.7, "steps": 64},
            r"^threshold_noise=0.7 with steps=64 and linear_steps=32 \(the default, steps // 2\) make no "
            r"schedule falling steadily from 1 to 0; nearest valid: threshold_noise=0.67 or linear_steps=35$",
        ),
        (
            {"threshold_noise": 0.3, "steps": 10, "linear_steps": 1},
            r"^threshold_noise=0.3 with steps=10 and linear_steps=1 make no schedule falling steadily from 1 "
            r"to 0; nearest valid: threshold_noise=0.191 or linear_steps=2$",
        ),
        (
            {"steps": 4, "linear_steps": 4},
            r"^linear_steps=4 must be in \[1, 3\] \(below steps=4\); nearest valid: 3$",
        ),
        (
            {"steps": 5, "linear_steps": 0},
            r"^linear_steps=0 must be in \[1, 4\] \(below steps=5\); nearest valid: 1$",
        ),
        (
            {"steps": 1, "linear_steps": 2},
            r"^linear_steps=2 must be left out with steps=1 .*; nearest valid: None$",
        ),
        (
            {"sigmas": [0.5, 0.2, 0.0], "init_video": "c.mp4"},
            r"strength=0.7 must lie in \(0.0, 0.5\] for this",
        ),
        ({"guidance": -2.0}, r"guidance=-2.0 must be in \[0, 100\] .*; nearest valid: 0"),
        ({"guidance": 1e30}, r"guidance=1e\+30 must be in \[0, 100\] .*; nearest valid: 100"),
        ({"guidance": float("nan")}, r"guidance=nan must be in \[0, 100\]"),
        ({"guidance": [4.0, float("inf")], "steps": 2}, r"guidance=inf must be in \[0, 100\]"),
        ({"guidance": [1.0, 2.0], "steps": 3}, "has 2 values for steps=3"),
        ({"strength": 1.5}, r"strength=1.5 must be in \(0, 1\]; nearest valid: 1.0"),
        ({"width": 850}, r"width=850 must be a positive multiple of 16; nearest valid: 848 or 864"),
        ({"threshold_noise": 0.0}, r"threshold_noise=0.0 must be in \(0, 1\)"),
        ({"eta": 1.5}, r"eta=1.5 must lie in \[0, 1\] .*; nearest valid: 1"),
        ({"eta": -0.1}, r"eta=-0.1 must lie in \[0, 1\] .*; nearest valid: 0"),
        ({"eta": float("nan")}, r"eta=nan must lie in \[0, 1\] .*; nearest valid: 0"),
        ({"eta_above": 1.0}, r"eta_above=1.0 must lie in \[0, 1\) .*; nearest valid: 0.99"),
        ({"strength": float("nan")}, r"strength=nan must be in \(0, 1\]; nearest valid: 0.7"),
        # Types: a count or seed that is not a whole number, a scale that is not a number.
        ({"frames": 7.0}, "frames=7.0 must be a whole number, not float"),
        ({"seed": 1.5}, "seed=1.5 must be a whole number, not float"),
        ({"seed": "1"}, "seed='1' must be a whole number, not str"),
        ({"steps": True}, "steps=True must be a whole number, not bool"),
        ({"guidance": True}, "guidance=True must be a number, not bool"),
        ({"guidance": {"a": 2.0}}, r"guidance=\{'a': 2.0\} must be a number, not dict"),
        ({"guidance": [2.0, "3"], "steps": 2}, "guidance.1.='3' must be a number, not str"),
        # A one-value schedule is named as such, not as steps=0.
        ({"sigmas": [1.0]}, r"a sigma schedule needs at least 2 values \(one step\), got \[1.0\]"),
        ({"sigmas": [0.5, 0.0]}, r"sigmas start at 0.5, but text-to-video starts from pure noise"),
    ],
)
def test_bad_requests(kwargs, message):
    kwargs = {"prompt": "p", **kwargs}
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**kwargs).resolved(DEFAULTS)


def test_a_schedule_below_one_needs_a_clip():
    low = GenerationRequest("p", sigmas=[0.5, 0.0], init_video="clip.mp4", strength=0.5)
    assert low.resolved(DEFAULTS).sigmas == [0.5, 0.0]
    with pytest.raises(ValueError, match="start the schedule at 1.0, or give init_video"):
        low.resolved(DEFAULTS, video_to_video=False)


def test_numpy_numbers_are_numbers():
    import numpy as np

    request = GenerationRequest("p", frames=np.int64(7), seed=np.uint32(3), guidance=np.float32(2.0))
    request.validate()
    # Resolved, they are Python numbers (the sampler's checks and the output's JSON record want those).
    out = GenerationRequest(
        "p",
        steps=np.int64(2),
        guidance=[np.float32(2.0), 1.5],
        strength=np.float64(0.5),
        loras=[("a", np.int8(2))],
    ).resolved(DEFAULTS)
    assert (type(out.steps), type(out.guidance[0]), type(out.strength)) == (int, float, float)
    assert out.loras == [("a", 2.0)] and type(out.loras[0][1]) is float


@pytest.mark.parametrize(
    "loras, message",
    [
        (["style.safetensors"], r"loras entry 'style.safetensors' must be a \(path, scale\) pair"),
        ([("a", 1.0, 2)], r"must be a \(path, scale\) pair"),
        ([(3, 1.0)], r"the path must be a string, not int"),
        ([("a", "1")], r"LoRA 'a': scale '1' must be a number, not str"),
        ([("a", float("nan"))], r"LoRA 'a': scale nan must be finite"),
    ],
)
def test_loras_must_be_path_and_finite_scale_pairs(loras, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest("p", loras=loras).validate()


def test_size_is_capped_in_visual_tokens_and_the_error_names_what_fits():
    assert visual_tokens(163, 480, 848) == 28 * 30 * 53 == 44520  # Mochi's own size
    check_size(163, 480, 848)
    check_size(3949, 480, 848)  # 659 latent frames × 1590 = 1,047,810 tokens, the most frames that fit
    with pytest.raises(
        ValueError,
        match=r"frames=3955 at 848x480 make 1,049,400 visual tokens.* nearest valid: frames=3949 at this",
    ):
        check_size(3955, 480, 848)
    with pytest.raises(
        ValueError,
        match=r"78,125,000 visual tokens.* nearest valid: width=2672 at this height, with frames=1",
    ):
        check_size(7, 100000, 100000)
    assert visual_tokens(1, 100000, 2672) <= MAX_VISUAL_TOKENS < visual_tokens(1, 100000, 2688)
    with pytest.raises(ValueError, match=r"nearest valid: height=16777216 at width=16, with frames=1"):
        check_size(7, 100000000, 64)
    # validate applies it once the three are known (resolved fills the model's defaults first).
    GenerationRequest("x", height=100000, width=100000).validate()
    with pytest.raises(ValueError, match="visual tokens"):
        GenerationRequest("x", frames=7, height=100000, width=100000).validate()
    with pytest.raises(ValueError, match="visual tokens"):
        GenerationRequest("x", height=100000).resolved(
            {"frames": 7, "height": 64, "width": 100000, "steps": 2, "guidance": 1.0}
        )


def test_prompts_list():
    assert GenerationRequest(["a", "b"]).prompts == ["a", "b"]
    assert GenerationRequest("a").prompts == ["a"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": None}, "prompt=None must be a string, or a list of strings for a batch, not NoneType"),
        ({"prompt": b"a red circle"}, "must be a string, or a list of strings for a batch, not bytes"),
        ({"loras": None}, "loras=None must be a list of (path, scale) pairs"),
        ({"batch_cfg": "no"}, "batch_cfg='no' must be True or False"),  # truthy: it ran batched
        ({"init_video": 5}, "init_video=5 must be a video file's path"),
        ({"init_video": ""}, "init_video='' is empty; give a video file's path, or None"),  # read as "."
        ({"sigmas": "1,0"}, "sigmas='1,0' must be a list of numbers falling to 0.0"),
        # Each value as strictly as guidance's: float() read "1" and True as numbers.
        ({"sigmas": ["1", "0"]}, "sigmas[0]='1' must be a number, not str"),
        ({"sigmas": [True, False]}, "sigmas[0]=True must be a number, not bool"),
        ({"sigmas": [1.0, "0.5", 0.0]}, "sigmas[1]='0.5' must be a number, not str"),
    ],
)
def test_fields_of_the_wrong_type_are_named(fields, message):
    """They failed deep inside (list(None), a str's len, os.fspath(5)) or ran silently (batch_cfg="no")."""
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerationRequest(**{"prompt": "x", **fields}).validate()


def test_a_request_rebuilt_from_a_sidecar_without_a_clip_takes_the_default_strength():
    """A sidecar records strength null without a clip: GenerationRequest(strength=None) failed at "<"."""
    req = GenerationRequest("x", strength=None)
    req.validate()
    assert req.strength == 0.7


def test_generate_takes_a_request_and_one_at_a_time():
    import threading

    from mochi.pipeline import MochiPipeline

    from .test_pipeline import tiny_components

    pipe = MochiPipeline(tiny_components(), device="cpu")
    for wrong, hint in (
        ("a red circle", "GenerationRequest(prompt, ...)"),
        ([GenerationRequest("x")], "a batch"),
    ):
        with pytest.raises(TypeError, match=re.escape(hint)):
            pipe.generate(wrong)
    # Two threads: the second waits for the first (they shared the DiT's LoRA state mid-run).
    inside, overlap = [], []
    real = pipe._generate

    def traced(*args):  # noqa: ANN002, ANN202
        overlap.append(len(inside))
        inside.append(1)
        try:
            return real(*args)
        finally:
            inside.pop()

    pipe._generate = traced
    threads = [
        threading.Thread(target=pipe.generate, args=(GenerationRequest("x", seed=i, steps=2),))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [0, 0]


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"prompt": "a \udcff cat"}, "prompt: character '\\udcff' at position 2"),
        ({"prompt": ["a", "\ud800"]}, "prompt[1]: character '\\ud800' at position 0"),
        (
            {"prompt": "a", "negative_prompt": "blur\udce9"},
            "negative_prompt: character '\\udce9' at position 4",
        ),
    ],
)
def test_a_prompt_that_is_not_text_is_refused_naming_the_character(fields, name):
    """A lone surrogate (a shell argument's bytes that are not UTF-8) failed in the tokenizer's encode,
    after the model had loaded, as "'utf-8' codec can't encode characters"."""
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} is a lone surrogate, not text"):
        GenerationRequest(**fields, seed=1).validate()


@pytest.mark.parametrize(("seed", "nearest"), [(-1, 0), (2**63, 2**63 - 1), (2**64, 2**63 - 1)])
def test_a_seed_out_of_range_names_the_nearest(seed, nearest):
    with pytest.raises(
        ValueError, match=rf"^seed={seed} must be in \[0, 2\*\*63-1\]; nearest valid: {nearest}$"
    ):
        check_seed(seed)
    assert check_seed(0) == 0 and check_seed(2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize("negative", [" ", "\t\n"])
def test_a_whitespace_negative_prompt_with_guidance_one_is_refused_as_other_text(negative):
    """The pipeline encodes a negative prompt of only whitespace as text (tokens; Genmo zeroes only ""), but
    the guidance-1 rule read it as empty and let it be ignored silently. One rule: any text but "" counts."""
    blank = f"negative_prompt={negative!r} (only whitespace, which is still encoded as text) needs guidance"
    with pytest.raises(ValueError, match="^" + re.escape(blank + " other than 1.0 (1.0 runs no")):
        GenerationRequest("x", negative_prompt=negative, guidance=1.0).validate()
    steps = [5.0] * 6 + [1.0, 1.0]  # a clip's strength leaves only unguided steps
    with pytest.raises(ValueError, match="^" + re.escape(blank + " other than 1.0, and the 1 steps")):
        GenerationRequest("x", negative_prompt=negative, steps=8, strength=0.3, guidance=steps).validate(True)
    GenerationRequest("x", negative_prompt="", guidance=1.0).validate()  # "" is no negative prompt
    GenerationRequest("x", negative_prompt=negative, guidance=4.0).validate()


def test_diffusers_style_values_are_read_or_named():
    """negative_prompt=None (diffusers' default) was "prompts must be strings, got NoneType"; a tuple or
    array of per-step guidance was "must be a number"; sigmas stopping above 0 (diffusers' scheduler appends
    the 0) ran a step short and decoded a noisy latent; the caller's prompt list, edited later, changed the
    returned record."""
    import numpy as np

    assert GenerationRequest("x", negative_prompt=None).negative_prompt == ""
    assert GenerationRequest("x", guidance=(4.0, 2.0)).guidance == [4.0, 2.0]
    assert GenerationRequest("x", guidance=np.linspace(4, 2, 3)).guidance == [4.0, 3.0, 2.0]
    prompts = ["a", "b"]
    request = GenerationRequest(prompts)
    prompts.append("c")
    assert request.prompts == ["a", "b"]
    for kwargs, message in (
        ({"prompt": ["a", 3]}, "prompt[1]=3 must be a string, not int"),
        (
            {"prompt": "a", "negative_prompt": ["b"]},
            "negative_prompt=['b'] must be a string (one for the whole batch; \"\" or None for none), "
            "not list",
        ),
        (
            {"prompt": "a", "sigmas": [1.0, 0.5, 0.25]},
            "sigmas end at 0.25, but a schedule falls to 0.0 (its last step lands on the clean latent); "
            "append 0.0 (diffusers' scheduler appends it to the sigmas it is given)",
        ),
    ):
        with pytest.raises(ValueError) as e:
            GenerationRequest(**kwargs).validate()
        assert str(e.value) == message
