import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mochi.cli.options
import mochi.pipeline
import mochi.weights.components
from mochi.cli import build_parser, main
from mochi.request import GenerationRequest
from mochi.video import read_video, write_video
from mochi.weights.bundle import load_embedded

from .test_pipeline import tiny_components


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    # The checks made before loading read the (stand-in) model's request defaults.
    monkeypatch.setattr(mochi.weights.components, "model_defaults", lambda model: tiny_components().defaults)


def test_generate_writes_video_and_sidecar(tiny, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code = main(["generate", "a red circle moving right", "--seed", "9", "--steps", "2", "--out", str(out)])
    assert code == 0
    frames, fps = read_video(out)
    assert frames.shape == (7, 32, 32, 3) and fps == 30
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["seed"] == 9 and meta["steps"] == 2 and meta["prompt"] == "a red circle moving right"
    assert meta["frames"] == 7 and meta["guidance"] == 4.0 and meta["model"] == "embedded:test-tiny"
    assert set(meta["seconds"]) == {"load", "text", "denoise", "decode"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.json", "clip.mp4"]
    assert f"wrote {out}" in capsys.readouterr().out


def test_ancestral_sampling_is_recorded(tiny, tmp_path):
    paths = [tmp_path / f"{name}.mp4" for name in ("euler", "ancestral")]
    base = ["generate", "a red circle moving right", "--seed", "9", "--steps", "3", "--out"]
    assert main([*base, str(paths[0])]) == 0
    assert main([*base, str(paths[1]), "--eta", "1", "--eta-above", "0.3"]) == 0
    metas = [json.loads(p.with_suffix(".json").read_text()) for p in paths]
    assert (metas[0]["eta"], metas[0]["eta_above"]) == (0.0, 0.0)
    assert (metas[1]["eta"], metas[1]["eta_above"]) == (1.0, 0.3)
    assert not np.array_equal(read_video(paths[0])[0], read_video(paths[1])[0])


def test_the_models_sampler_is_the_default_and_eta_0_is_euler(monkeypatch, tmp_path):
    """A model whose defaults name the ancestral sampler (the embedded one) runs it unless --eta says
    otherwise; --eta 0 is then the Euler run of a model without such defaults, frame for frame."""
    ancestral = tiny_components()
    ancestral.defaults = {**ancestral.defaults, "eta": 1.0, "eta_above": 0.3}
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: ancestral)
    monkeypatch.setattr(mochi.weights.components, "model_defaults", lambda model: ancestral.defaults)
    base = ["generate", "a red circle moving right", "--seed", "9", "--steps", "3", "--out"]
    runs = {name: tmp_path / f"{name}.mp4" for name in ("default", "eta0", "cached")}
    assert main([*base, str(runs["default"])]) == 0
    assert main([*base, str(runs["eta0"]), "--eta", "0"]) == 0
    assert main([*base, str(runs["cached"]), "--cache", "teacache"]) == 0
    meta = {k: json.loads(v.with_suffix(".json").read_text()) for k, v in runs.items()}
    assert (meta["default"]["eta"], meta["default"]["eta_above"]) == (1.0, 0.3)
    assert (meta["eta0"]["eta"], meta["cached"]["eta"], meta["cached"]["eta_above"]) == (0.0, 0.0, 0.0)
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    euler = tmp_path / "euler.mp4"
    assert main([*base, str(euler)]) == 0
    assert np.array_equal(read_video(runs["eta0"])[0], read_video(euler)[0])
    assert not np.array_equal(read_video(runs["default"])[0], read_video(euler)[0])


def test_generate_draws_and_records_a_seed(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "A Blue Square!", "--steps", "1"]) == 0
    (video,) = tmp_path.glob("*.mp4")
    meta = json.loads(video.with_suffix(".json").read_text())
    assert video.name == f"a-blue-square-{meta['seed']}.mp4"


def test_out_may_name_a_folder_for_the_default_name(tiny, tmp_path, monkeypatch, capsys):
    """`--out videos/` (or an existing folder, with or without the slash) writes PROMPT-SEED.mp4 in it;
    a missing folder is refused before the model loads, and a name without a suffix says both ways."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "videos").mkdir()
    for given in ("videos", "videos/", str(tmp_path / "videos")):
        assert main(["generate", "A Blue Square!", "--steps", "1", "--seed", "5", "--out", given]) == 0
        assert f"wrote {Path(given) / 'a-blue-square-5.mp4'} (" in capsys.readouterr().out
        assert (tmp_path / "videos" / "a-blue-square-5.json").is_file()
        (tmp_path / "videos" / "a-blue-square-5.json").unlink()
        (tmp_path / "videos" / "a-blue-square-5.mp4").unlink()
    assert main(["generate", "x", "--out", "missing/"]) == 2
    assert "folder 'missing' does not exist" in capsys.readouterr().err
    assert main(["generate", "x", "--out", "clip"]) == 2
    err = capsys.readouterr().err
    assert "output 'clip' must end in one of .mp4, .mov, .mkv; e.g. clip.mp4, or clip/ for a folder" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["videos"]


def test_video_to_video(tiny, tmp_path):
    src = tmp_path / "in.mp4"
    write_video(np.full((13, 48, 64, 3), 128, np.uint8), src)
    out = tmp_path / "out.mp4"
    assert (
        main(
            [
                "generate",
                "x",
                "--init-video",
                str(src),
                "--strength",
                "0.5",
                "--steps",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert read_video(out)[0].shape == (7, 32, 32, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--frames", "30"],
            "frames=30 is not of the form 6k+1 (the VAE's causal 6× time compression); "
            "nearest valid: 25 or 31",
        ),
        (["--width", "100"], "width=100 must be a positive multiple of 16; nearest valid: 96 or 112"),
        (
            ["--out", "/nonexistent/dir/a.mp4"],
            "cannot write '/nonexistent/dir/a.mp4': folder '/nonexistent/dir' does not exist",
        ),
        (["--out", "a.gif"], "output 'a.gif' must end in one of .mp4, .mov, .mkv; e.g. a.mp4"),
        (["--init-video", "/nonexistent.mp4"], "video file '/nonexistent.mp4' does not exist"),
        (["--strength", "0"], "strength=0.0 must be in (0, 1]; nearest valid: 0.01"),
        (
            ["--eta", "2"],
            "eta=2.0 must lie in [0, 1] (the share of fresh noise per step; 0 is the Euler sampler); "
            "nearest valid: 1",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny, argv, message, capsys):
    assert main(["generate", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == f"mochi: error: {message}\n"


@pytest.mark.parametrize(("prompt", "state"), [("", "empty"), (" \t\n", "blank (only whitespace)")])
def test_an_empty_prompt_is_refused_as_the_server_refuses_it(tiny, prompt, state, tmp_path, capsys):
    assert main(["generate", prompt, "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == f"mochi: error: PROMPT: is {state}; describe what the video shows\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda(tiny, capsys):
    assert main(["generate", "x", "--device", "cuda"]) == 2
    assert (
        capsys.readouterr().err
        == "mochi: error: device 'cuda' asked for, but this machine has no CUDA; use --device cpu\n"
    )


def test_empty_init_video(tiny, tmp_path, capsys):
    bad = tmp_path / "empty.mp4"
    bad.write_bytes(b"")
    assert main(["generate", "x", "--init-video", str(bad)]) == 2
    # It was "cannot read video ...: Invalid data ... (frames above 33,177,600 pixels ... are not decoded)".
    assert capsys.readouterr().err == f"mochi: error: video file {str(bad)!r} is empty (0 bytes)\n"


def test_the_output_cannot_be_the_init_video(tiny, tmp_path, capsys, monkeypatch):
    """--out naming the --init-video file replaced the user's clip with the result (and its sidecar named
    the result as its own init video)."""
    src = tmp_path / "clip.mp4"
    write_video(np.full((13, 48, 64, 3), 128, np.uint8), src)
    before = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    for out in (str(src), "clip.mp4", f"../{tmp_path.name}/clip.mp4"):
        assert main(["generate", "x", "--init-video", str(src), "--steps", "2", "--out", out]) == 2
        assert capsys.readouterr().err == (
            f"mochi: error: output {out!r} is the --init-video file: it would be overwritten by the result; "
            f"choose another --out, e.g. {out[: -len('clip.mp4')] + 'clip-v2v.mp4'!r}\n"
        )
    (tmp_path / "link.mp4").symlink_to(src)
    assert main(["generate", "x", "--init-video", "link.mp4", "--steps", "2", "--out", str(src)]) == 2
    assert "is the --init-video file" in capsys.readouterr().err
    assert src.read_bytes() == before and not (tmp_path / "clip.json").exists()


def test_interrupt_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mochi.pipeline.MochiPipeline, "generate", boom)
    out = tmp_path / "x.mp4"
    assert main(["generate", "x", "--out", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_the_arguments_are_parsed_is_one_line(monkeypatch, capsys):
    # Parsing imports torch (mochi.offload): Ctrl-C in the first seconds of `mochi generate` came there.
    def boom(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(mochi.cli.options, "bare_offload", boom)
    try:
        code = main(["generate", "x"])
    except KeyboardInterrupt:  # not pytest's own: it would end the session
        pytest.fail("KeyboardInterrupt escaped main")
    assert code == 130
    assert capsys.readouterr().err == "mochi: interrupted\n"


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in [
        "--negative-prompt",
        "--frames",
        "--width",
        "--height",
        "--steps",
        "--guidance",
        "--seed",
        "--model",
        "--device",
        "--dtype",
        "--offload",
        "--out",
        "--init-video",
        "--strength",
        "--eta",
        "--eta-above",
    ]:
        assert flag in text
    # The η defaults the help names are the shipped asset's (written out: the parser must not import torch).
    shipped = load_embedded().defaults
    flat = " ".join(text.split())
    assert f"{shipped['eta']:g} for the embedded model, 0 for Mochi 1" in flat
    assert f"{shipped['eta_above']:g} for the embedded model" in flat


def test_bare_offload_before_the_prompt_leaves_the_prompt(tiny, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--offload", "a red circle", "--steps", "1", "--out", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["prompt"] == "a red circle"
    assert (sidecar["offload"], sidecar["parallel"]) == (
        "none",
        None,
    )  # what acted: offload is a no-op on CPU
    parse = build_parser().parse_args
    for argv, prompt, mode in [
        (["--offload", "a red circle"], "a red circle", "model"),
        (["--offload", "cat", "--seed", "1"], "cat", "model"),
        (["x", "--offload"], "x", "model"),
        (["--offload", "--seed", "1", "x"], "x", "model"),
        (["--offload", "blocks:3", "x"], "x", "blocks:3"),
        (["--offload", "none", "x"], "x", "none"),
        (["--offload=a red circle", "x"], "x", "a red circle"),  # explicit: a bad mode, reported below
    ]:
        args = parse(["generate", *argv])
        assert (args.prompt, args.offload) == (prompt, mode), argv
    assert parse(["serve", "--offload"]).offload == "model"
    assert parse(["serve", "--offload", "blocks:2"]).offload == "blocks:2"
    # A word close to a mode is a typo of the mode: its own one-line error, not a second prompt.
    capsys.readouterr()
    assert main(["generate", "--offload", "blokcs", "x", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offload 'blokcs' is not understood; choose none, model, blocks" in err
    # A word far from any mode, with the prompt given, is a bad mode too (was "unrecognized arguments").
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--offload", "bogus", "--steps", "1"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "mochi: error: --offload 'bogus' is not understood; choose none, model, blocks or blocks:N (N DiT "
        "blocks kept on the GPU, e.g. blocks:8) (a bare --offload means model)\n"
    )


def test_a_truncated_prompt_is_one_warning_line_and_kept_in_the_sidecar(tiny, tmp_path, capsys):
    """It was Python's raw warning (file, line and source line) glued to the progress bar, and not kept."""
    out = tmp_path / "long.mp4"
    assert main(["generate", "a red circle moving right " * 20, "--steps", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "tokens long" in line]
    assert len(lines) == 1 and lines[0].endswith(")") and "mochi: warning: prompt 0 is" in lines[0]
    assert "PromptTruncatedWarning" not in err and "prompts.py" not in err
    (kept,) = json.loads(out.with_suffix(".json").read_text())["warnings"]
    assert "but the text encoder takes 256: the last" in kept and kept in lines[0]


def test_a_cache_with_an_ancestral_sampler_says_it_will_skip_little(tiny, tmp_path, capsys):
    out = tmp_path / "c.mp4"
    assert (
        main(["generate", "x", "--steps", "2", "--cache", "teacache", "--eta", "1", "--out", str(out)]) == 0
    )
    assert (
        "mochi: note: --eta 1 re-noises every step above sigma 0, so --cache skips few"
        in capsys.readouterr().err
    )
    assert main(["generate", "x", "--steps", "2", "--cache", "teacache", "--out", str(out)]) == 0
    assert "re-noises" not in capsys.readouterr().err  # the cached request takes Euler by itself


def test_the_sidecar_records_what_shapes_the_pixels_and_is_not_shared(tiny, tmp_path, capsys):
    """--vae-dtype and the attention backend were not recorded (re-running a sidecar could not reproduce
    the video); a .mkv beside a .mp4 of one stem overwrote the .mp4's sidecar."""
    out = tmp_path / "same.mp4"
    assert main(["generate", "x", "--steps", "1", "--vae-dtype", "bf16", "--out", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert (sidecar["vae_dtype"], sidecar["attention"]) == ("bfloat16", "sdpa")
    capsys.readouterr()
    assert main(["generate", "y", "--steps", "1", "--out", str(tmp_path / "same.mkv")]) == 2
    assert "would share the sidecar same.json with same.mp4" in capsys.readouterr().err
    assert (
        not (tmp_path / "same.mkv").exists()
        and json.loads(out.with_suffix(".json").read_text())["prompt"] == "x"
    )


def test_a_long_output_name_the_folder_takes_is_written(tiny, tmp_path):
    """The temporary's name (.<stem>.<pid>.<random>.partial.mp4) went past 255 bytes: the run failed at the
    end with "does not take new files"."""
    out = tmp_path / ("a" * 240 + ".mp4")
    assert main(["generate", "x", "--steps", "1", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()


def test_an_init_video_too_small_to_crop_is_refused_before_the_model_loads(
    tiny, tmp_path, monkeypatch, capsys
):
    """A 2x2 clip fitted to a 128x16 output would keep round(0.25) = 0 rows: refused in one line naming both
    sizes, before the model loads (the check at 8x8 still crops to 2x2)."""
    clip = tmp_path / "tiny.mp4"
    write_video(np.zeros((13, 2, 2, 3), np.uint8), clip)

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mochi.pipeline, "load_components", never)
    argv = ["generate", "x", "--init-video", str(clip), "--width", "128", "--height", "16"]
    assert main([*argv, "--frames", "7", "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "2x2 frames are too small to crop to the shape of the 128x16 output" in err


@pytest.mark.parametrize("second", ["clip.MP4", "clip.MKV", "clip.Mov"])
def test_an_output_whose_suffix_differs_only_in_case_would_share_the_sidecar(tiny, tmp_path, capsys, second):
    """clip.mp4 then clip.MP4 (or clip.MKV) pair one sidecar, clip.json: refused, on any file system."""
    assert main(["generate", "x", "--steps", "1", "--out", str(tmp_path / "clip.mp4")]) == 0
    capsys.readouterr()
    assert main(["generate", "y", "--steps", "1", "--out", str(tmp_path / second)]) == 2
    assert "would share the sidecar clip.json with clip.mp4" in capsys.readouterr().err
    assert json.loads((tmp_path / "clip.json").read_text())["prompt"] == "x"
    # The output itself, written again, is no other video (nor is it on a case-insensitive file system).
    assert main(["generate", "z", "--steps", "1", "--out", str(tmp_path / "clip.mp4")]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frames", "6000001"], "frames=6000001 at 32x32 make 4,000,004 visual tokens"),
        (["--linear-steps", "30"], "linear_steps=30 must be in [1, 2] (below steps=3); nearest valid: 2"),
    ],
)
def test_a_request_that_breaks_a_rule_at_the_models_defaults_is_refused_before_the_model_loads(
    tiny, tmp_path, monkeypatch, capsys, argv, message
):
    """Left out, the size and steps come from the model: the token limit and the schedule were checked only
    once the model had loaded (minutes for the released one)."""

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mochi.pipeline, "load_components", never)
    assert main(["generate", "x", *argv, "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_prompt_of_bytes_that_are_not_utf8_is_one_line_before_the_model_loads(
    tiny, tmp_path, monkeypatch, capsys
):
    """Python reads such argv bytes as lone surrogates; the tokenizer failed on them after loading."""

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mochi.pipeline, "load_components", never)
    assert main(["generate", "caf\udce9", "--out", str(tmp_path / "o.mp4")]) == 2
    assert capsys.readouterr().err == (
        "mochi: error: PROMPT: character '\\udce9' at position 3 is a lone surrogate, not text "
        "(bytes that are not UTF-8?); write the prompt in UTF-8 or remove it\n"
    )


def test_a_truncated_negative_prompt_is_named_so(tiny, tmp_path, capsys):
    """The negative prompt is encoded as the row after the prompts: its warning said "prompt 1" of a request
    with one prompt."""
    out = tmp_path / "neg.mp4"
    argv = ["generate", "x", "--negative-prompt", "blurry " * 50, "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "tokens long" in line]
    assert line.startswith("mochi: warning: negative prompt is 351 tokens long (with the end token)")


def test_option_help_states_the_defaults_and_ranges_the_code_uses():
    # Each help text against what the command does: serve's --out-dir default and --fps range
    # (server.check_options), generate's --eta-above range (sampler.check_eta: [0, 1)), and what plan's
    # --dtype all and --quantize mean.
    commands = build_parser()._subparsers._group_actions[0].choices

    def help_of(command: str, option: str) -> str:
        (action,) = [a for a in commands[command]._actions if option in a.option_strings]
        return action.help

    assert "default: mochi-serve-out" in help_of("serve", "--out-dir")
    assert commands["serve"].get_default("out_dir") == "mochi-serve-out"
    assert "0.1-240" in help_of("serve", "--fps")
    assert "[0, 1)" in help_of("generate", "--eta-above")
    # A cached request runs the Euler sampler unless it names eta (GenerationRequest.resolved); the help
    # named only the model's η defaults, which --cache does not take.
    shipped = load_embedded().defaults
    cached = GenerationRequest("a red circle", cache="teacache").resolved(shipped)
    assert shipped["eta"] > 0 and (cached.eta, cached.eta_above) == (0.0, 0.0)
    for option in ("--eta", "--eta-above"):
        assert "0 with --cache" in help_of("generate", option)
    assert "all: bf16 and fp32" in help_of("plan", "--dtype")
    assert "as generate --quantize" in help_of("plan", "--quantize")


def test_an_uncalibrated_teacache_is_a_mochi_warning_and_in_the_sidecar(monkeypatch, tmp_path, capsys):
    """The warning for a model with no TeaCache calibration came out as Python's raw warning lines
    ('.../pipeline.py:485: UserWarning: ...') and was missing from the sidecar's warnings."""
    components = tiny_components()
    components.source = str(tmp_path / "finetune.safetensors")  # no finetune.teacache.json beside it
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: components)
    monkeypatch.setattr(mochi.weights.components, "model_defaults", lambda model: components.defaults)
    out = tmp_path / "clip.mp4"
    args = ["generate", "a red circle", "--seed", "1", "--steps", "4", "--cache", "teacache"]
    assert main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    expected = f"no TeaCache calibration for this model ({tmp_path / 'finetune.teacache.json'} is absent)"
    assert f"mochi: warning: {expected}" in err and "UserWarning" not in err
    assert any(w.startswith(expected) for w in json.loads(out.with_suffix(".json").read_text())["warnings"])


def test_the_sidecars_model_name_for_the_embedded_model_can_be_passed_back(monkeypatch, tmp_path, capsys):
    loaded = []
    load = lambda m, **k: loaded.append(m) or tiny_components()  # noqa: E731
    monkeypatch.setattr(mochi.pipeline, "load_components", load)
    monkeypatch.setattr(mochi.weights.components, "model_defaults", lambda model: tiny_components().defaults)
    out = tmp_path / "clip.mp4"
    argv = ["generate", "a red circle", "--steps", "2", "--model", "embedded:mochi-tiny", "--out", str(out)]
    assert main(argv) == 0 and loaded == [None]
    assert main([*argv[:5], "embedded:mochi-big", *argv[6:]]) == 2
    assert capsys.readouterr().err.endswith(
        "mochi: error: --model 'embedded:mochi-big' names no embedded model; the one packaged is "
        "'embedded:mochi-tiny' (or leave --model out)\n"
    )
    with pytest.raises(ValueError, match="model 'embedded:x' names no embedded model"):
        mochi.pipeline.MochiPipeline.from_pretrained("embedded:x")
    from mochi.weights.bundle import model_alias

    # What a source checkout without the asset records (its random-weight stand-in) passes back too.
    assert model_alias("embedded:mochi-tiny (random weights)") is None
