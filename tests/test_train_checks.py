"""Issue 18 for train-lora: junk settings fail before loading, a non-finite loss stops the run honestly."""

import math
import re

import pytest
import torch

import mochi.cli.lora
import mochi.pipeline
import mochi.train.lora_train as lora_train
import mochi.weights.components
from mochi.cli import main
from mochi.train.lora_state import list_states
from mochi.weights.io import save_state_dict

from .test_pipeline import tiny_components


@pytest.fixture
def data(tmp_path):
    """Three prepared clips of the tiny model's shapes (7 frames of 32x32), written directly."""
    folder = tmp_path / "data"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(["a red star moving left", "a blue star moving right", "a red star"]):
        tensors = {
            "mean": torch.randn(12, 2, 4, 4, generator=g),
            "logvar": torch.full((12, 2, 4, 4), -4.0),
            "text": torch.randn(len(caption) + 1, 32, generator=g),
        }
        meta = {"frames": "7", "width": "32", "height": "32", "caption": caption, "source": f"{i}.mp4"}
        save_state_dict(tensors, folder / f"clip{i}.safetensors", meta)
    return folder


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", math.inf, "lr=inf must be in (0, 1]"),
        ("lr", math.nan, "lr=nan must be in (0, 1]"),
        ("alpha", math.nan, "alpha=nan must be in (0, 64·rank] = (0, 1024]"),
        ("weight_decay", math.nan, "weight_decay=nan must be a finite number ≥ 0"),
        ("sigma_shift", math.inf, "sigma_shift=inf must lie in [0.001, 1000] (1 = uniform; Genmo's shifted "),
        ("sigma_shift", 1e39, "sigma_shift=1e+39 must lie in [0.001, 1000] (1 = uniform; Genmo's shifted "),
    ],
)
def test_non_finite_training_settings_are_refused_by_the_library(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lora_train.LoraTrainConfig(**{field: value}).validate()


def test_junk_train_lora_arguments_fail_before_loading(data, tmp_path, monkeypatch, capsys):
    def load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(mochi.cli.lora, "pipeline_from_args", load)
    size = ["--frames", "7", "--width", "32", "--height", "32"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    run = ["train-lora", str(data), "--out", str(tmp_path / "run")]
    for argv in (["--lr", "inf"], ["--lr", "nan"], ["--alpha", "nan"], ["--sigma-shift", "inf"]):
        with pytest.raises(SystemExit) as stop:  # argparse refuses non-finite floats (mochi.cli.finite_float)
            main([*run, *argv])
        assert stop.value.code == 2 and "is not a finite number" in capsys.readouterr().err, argv
    cases = [
        (["--lr", "1e10"], "lr=10000000000.0 must be in (0, 1]"),
        (["--alpha", "0"], "alpha=0.0 must be in (0, 64·rank]"),
        (["--alpha", "1e10", "--rank", "4"], "alpha=10000000000.0 must be in (0, 64·rank] = (0, 256]"),
        (["--sample-steps", "0"], "sample_steps=0 must be at least 1"),
        (
            ["--sample-steps", "10001"],
            "sample_steps=10001 is more than 10,000, the most a video is sampled with",
        ),
        (
            ["--sample-every", "0", "--sample-prompt", "a cat"],
            "sample_prompts applies only to samples, and sample_every=0 renders none",
        ),
        (["--sample-every", "0", "--sample-steps", "5"], "sample_steps applies only to samples"),
        (["--sample-prompt", ""], "sample prompt: is empty; describe what the video shows"),
        (["--steps", "99999999999999999999"], "steps=99999999999999999999 is more than 10,000,000"),
        (["--batch-size", "99999999999999999999"], "clips per step is more than 4096"),
        (["--weight-decay", "-1"], "weight_decay=-1.0 must be a finite number ≥ 0"),
        (["--vae", str(tmp_path / "file")], "--vae cannot be used with the embedded model"),
        (["--t5", str(tmp_path / "nope")], f"--t5 {str(tmp_path / 'nope')!r} does not exist"),
    ]
    for argv, message in cases:
        assert main([*run, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mochi: error: ") and message in err and err.count("\n") == 1, (argv, err)
    for argv, message in [
        (["prepare-data", str(tmp_path / "nope"), "d", *size], "videos folder"),
        (["prepare-data", str(tmp_path), "d", *size, "--tokenizer", str(data)], "--tokenizer cannot be used"),
        (["train-lora", str(tmp_path / "nope"), "--out", "r"], "data folder"),
        (["train-lora", str(tmp_path / "empty"), "--out", "r"], "holds no clips"),
        (["train-lora", str(data), "--out", str(tmp_path / "file")], "is a file; give a folder"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    monkeypatch.setattr(mochi.weights.components, "load_components", lambda *a, **k: tiny_components())
    real, calls = lora_train.flow_matching_loss, []

    def diverges_in_step_three(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(lora_train, "flow_matching_loss", diverges_in_step_three)
    out = tmp_path / "run"
    argv = ["train-lora", str(data), "--out", str(out), "--rank", "2", "--steps", "4", "--warmup", "1"]
    assert main([*argv, "--checkpoint-every", "2", "--sample-every", "0"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (
        "mochi: error: training diverged: the loss at step 3 is nan (or its gradients are not finite); "
        "stopped without saving it, the last good checkpoint, step-000002.pt (and its "
        "lora-step-*.safetensors), is kept. Lower --lr or --alpha and train into a new --out (or this one "
        "with --restart)"
    )
    assert [p.name for p in list_states(out)] == ["step-000002.pt"]
    assert not (out / "lora.safetensors").exists() and (out / "lora-step-000002.safetensors").is_file()


def test_targets_have_one_order_and_each_appears_once(tmp_path):
    """A reordered --targets (the same LoRA) refused a resume, and a repeated one was stored as given."""
    from mochi.train.lora_train import _check_resumable

    cfg = lora_train.LoraTrainConfig(targets=("proj_x", "qkv_x", "qkv_x"))
    assert (
        cfg.targets == ("qkv_x", "proj_x") == lora_train.LoraTrainConfig(targets=("qkv_x", "proj_x")).targets
    )
    saved = {**cfg.as_json(), "targets": ["proj_x", "qkv_x"]}  # as a run saved before wrote them
    _check_resumable(saved, cfg, tmp_path)
    with pytest.raises(ValueError, match=r"holds a run with targets=\['qkv_x', 'proj_y'\]"):
        _check_resumable({**saved, "targets": ["proj_y", "qkv_x"]}, cfg, tmp_path)
    with pytest.raises(ValueError, match="unknown LoRA target 'bogus'"):
        lora_train.LoraTrainConfig(targets=("bogus", "qkv_x")).validate()


def _latents(sd, f):
    return {**sd, "mean": f(sd["mean"]), "logvar": f(sd["logvar"])}


@pytest.mark.parametrize(
    "edit, message, every",
    [
        (
            lambda sd: {**sd, "mean": sd["mean"] * math.nan},
            "NaN or infinite values in 1 of 3 tensors (mean)",
            0,
        ),
        (
            lambda sd: {**sd, "mean": sd["mean"].int()},
            "mean is int32; a prepared clip holds floating point",
            0,
        ),
        (lambda sd: {**sd, "text": sd["text"][0]}, "text (32,); a prepared clip holds mean and logvar", 0),
        (lambda sd: _latents(sd, lambda t: t[:, :0]), "holds mean (12, 0, 4, 4), logvar (12, 0, 4, 4)", 0),
        (
            lambda sd: {**sd, "logvar": sd["logvar"][:, :1]},
            "holds mean (12, 2, 4, 4), logvar (12, 1, 4, 4)",
            0,
        ),
        (lambda sd: {**sd, "text": torch.randn(3, 17)}, "mixes text features of widths [17, 32]", 0),
        (lambda sd: _latents(sd, lambda t: t[:, :, :3, :3]), "latents are 3x3 (height x width)", 1),
    ],
    ids=["nan", "int", "text-1d", "no-frames", "logvar-shape", "text-width", "odd-size"],
)
def test_a_malformed_prepared_clip_is_refused_before_the_run_writes(
    data, tmp_path, monkeypatch, capsys, edit, message, every
):
    """Such clips failed inside the first step (IndexError, ZeroDivisionError: a traceback) after config.json
    was written, or trained: NaN latents as a "diverged" run, a logvar broadcast, a width met steps later.
    ``every``: edit every clip (a mix of latent sizes is refused as such), not only the last."""
    from mochi.weights.io import read_metadata, read_state_dict

    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    monkeypatch.setattr(mochi.weights.components, "load_components", lambda *a, **k: tiny_components())
    for clip in sorted(data.iterdir())[0 if every else -1 :]:
        sd = {k: v.contiguous() for k, v in edit(read_state_dict(clip)).items()}
        save_state_dict(sd, clip, read_metadata(clip))
    out = tmp_path / "run"
    argv = ["train-lora", str(data), "--out", str(out), "--rank", "2", "--steps", "4", "--sample-every", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.split("\r")[-1]
    assert err.startswith("mochi: error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []


def test_a_prepared_clip_whose_settings_are_not_numbers_is_named(data, tmp_path, monkeypatch, capsys):
    """int()'s "invalid literal for int() with base 10: 'abc'" named neither the clip nor the field."""
    from mochi.weights.io import read_metadata, read_state_dict

    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    monkeypatch.setattr(mochi.weights.components, "load_components", lambda *a, **k: tiny_components())
    clip = data / "clip0.safetensors"
    save_state_dict(read_state_dict(clip), clip, {**read_metadata(clip), "frames": "abc"})
    out = tmp_path / "run"
    assert main(["train-lora", str(data), "--out", str(out), "--rank", "2", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "clip0.safetensors': metadata 'frames' is 'abc'; a prepared clip" in err
    ), err
    assert not out.exists()
