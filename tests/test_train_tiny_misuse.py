"""The tiny trainer refuses what it cannot honour: a resume with other settings, junk arguments."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace

import pytest
import torch

from mochi.presets import MODEL_PRESETS
from mochi.train.checkpoint import load_checkpoint, save_checkpoint
from mochi.train.train_decoder import DECODER_CHECKPOINT, train_decoder
from mochi.train.train_vae import VAE_CHECKPOINT, train_vae

from .test_train_tiny import DECODER, PRESET, VAE


def _quiet(line: str) -> None:
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished vae stage and a finished one-step decoder stage of the micro preset."""
    out = tmp_path_factory.mktemp("run")
    train_vae(out, PRESET, VAE, log=_quiet)
    train_decoder(out, PRESET, replace(DECODER, steps=1), log=_quiet)
    return out


def _forget(path, keys) -> None:
    """Rewrite the checkpoint at ``path`` as one written before ``keys`` were recorded."""
    state = load_checkpoint(path)
    save_checkpoint({k: v for k, v in state.items() if k not in keys}, path)


def test_the_vae_stage_resumes_only_with_its_seed_batch_and_preset(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    state = load_checkpoint(out / VAE_CHECKPOINT)
    assert (state["seed"], state["batch"]) == (VAE.seed, VAE.batch)
    wrong = [
        (
            replace(VAE, seed=7),
            PRESET,
            "was trained with seed 1, but this run asks for seed 7: give --seed 1",
        ),
        (
            replace(VAE, batch=2),
            PRESET,
            "was trained with batch 1, but this run asks for batch 2: give --batch 1",
        ),
        (
            VAE,
            MODEL_PRESETS["mochi-tiny-v1"],
            "was trained with another encoder and decoder than this preset's (that of --preset test-micro): "
            "give --preset test-micro to resume it",
        ),
    ]
    for recipe, preset, message in wrong:
        with pytest.raises(ValueError, match=re.escape(message)):
            train_vae(out, preset, recipe, log=_quiet)
    # A preset of the same VAE resumes (mochi-tiny-d8 differs from mochi-tiny in its DiT only); a VAE of no
    # preset is named as such.
    assert train_vae(out, replace(PRESET, dit=MODEL_PRESETS["mochi-tiny"].dit), VAE, log=_quiet)["step"] == 4
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    save_checkpoint({**state, "configs": {"encoder": {}, "decoder": {}}}, unknown / VAE_CHECKPOINT)
    with pytest.raises(ValueError, match=r"\(that of the preset it was trained with\): give the preset"):
        train_vae(unknown, PRESET, VAE, log=_quiet)
    # A checkpoint written before these were recorded resumes as it always did; another preset's weights
    # are one line, not torch's list of every mismatched tensor.
    _forget(out / VAE_CHECKPOINT, ("seed", "batch", "configs"))
    lines = []
    assert train_vae(out, PRESET, replace(VAE, seed=7, batch=2), log=lines.append)["step"] == 4
    assert lines == [f"vae: resumed at step 4 from {out / VAE_CHECKPOINT}"]
    with pytest.raises(ValueError, match=r"^the encoder of '.*vae.ckpt' does not fit this preset's") as e:
        train_vae(out, MODEL_PRESETS["mochi-tiny-v1"], VAE, log=_quiet)
    assert "\n" not in str(e.value)


def test_the_decoder_stage_resumes_only_with_its_batch_source_and_preset(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    recipe = replace(DECODER, steps=1)
    state = load_checkpoint(out / DECODER_CHECKPOINT)
    assert (state["seed"], state["batch"], state["source"]) == (DECODER.seed, 1, "OUT/vae.ckpt")
    other = tmp_path / "other.ckpt"
    shutil.copy(out / VAE_CHECKPOINT, other)
    wrong = [
        (
            {"recipe": replace(recipe, batch=2)},
            "trained with batch 1, but this run asks for batch 2: give --batch 1",
        ),
        (
            {"source": other},
            f"trained with source OUT/vae.ckpt, but this run asks for source {other.resolve()}: give no "
            "--source",
        ),
        (
            {"preset": MODEL_PRESETS["mochi-tiny-v1"]},
            "trained with another decoder than this preset's (that of --preset test-micro)",
        ),
    ]
    for change, message in wrong:
        args = {"preset": PRESET, "recipe": recipe, **change}
        with pytest.raises(ValueError, match=re.escape(message)):
            train_decoder(out, args["preset"], args["recipe"], source=args.get("source"), log=_quiet)
    # The run folder's own vae.ckpt named as --source is no other source; a run folder that moved keeps it.
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    assert train_decoder(moved, PRESET, recipe, source=moved / VAE_CHECKPOINT, log=_quiet)["step"] == 1
    # A source named is recorded resolved, and asked for again.
    from_other = tmp_path / "from_other"
    from_other.mkdir()
    train_decoder(from_other, PRESET, recipe, source=other, log=_quiet)
    with pytest.raises(ValueError, match=re.escape(f"give --source {other.resolve()} to resume it")):
        train_decoder(from_other, PRESET, recipe, log=_quiet)
    # A checkpoint written before these were recorded resumes as it always did.
    _forget(moved / DECODER_CHECKPOINT, ("seed", "batch", "source", "configs"))
    lines = []
    state = train_decoder(moved, PRESET, replace(recipe, batch=2), source=other, log=lines.append)
    assert state["step"] == 1 and lines == [f"decoder: resumed at step 1 from {moved / DECODER_CHECKPOINT}"]
    assert torch.equal(
        state["decoder"]["output_proj.weight"],
        load_checkpoint(run / DECODER_CHECKPOINT)["decoder"]["output_proj.weight"],
    )


def test_steps_is_the_first_phase_and_at_least_what_the_recipe_needs(tmp_path, monkeypatch, capsys):
    """--steps sets the vae stage's joint phase (1800 more steps follow), which must reach encoder_steps;
    `vae --steps 2` trained 1802 steps and `--steps -5` 1795."""
    import mochi.train.train_vae as train_vae_module
    from mochi.train.tiny import main

    seen = {}
    monkeypatch.setattr(train_vae_module, "train_vae", lambda out, preset, recipe, log: seen.update(r=recipe))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    out = tmp_path / "run"
    for argv, message in (
        (
            ["vae", "--steps", "2"],
            "--steps of the vae stage is its joint phase, which trains the encoder until "
            "step 1000 (encoder_steps): it must be 1000 or more, got 2",
        ),
        (["vae", "--steps", "-5"], "--steps must be 1 or more, got -5"),
        (["dit", "--steps", "0"], "--steps must be 1 or more, got 0"),
        (["decoder", "--steps", "-1"], "--steps must be 1 or more, got -1"),
    ):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"error: {message}" in err, (argv, err)
    assert not out.exists()
    main(["vae", "--out", str(out), "--steps", "1000"])
    assert seen["r"].steps == 1000
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps its help at hyphens too
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "total optimizer steps" not in text
    assert (
        "vae: the joint phase, whose encoder is frozen from step 1000 (so N >= 1000); 1200 decoder-only and "
        "600 tuning steps follow (the stage ends at step N + 1800); decoder: the whole stage" in text
    )


def test_junk_arguments_fail_in_one_line_before_the_run_folder_is_made(run, tmp_path, monkeypatch, capsys):
    """A file as --out, --threads 0, --batch 0 and export before training ended in tracebacks, after the
    run folder was made (export's too)."""
    from mochi.train.tiny import main

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    afile, new = tmp_path / "afile", tmp_path / "new"
    afile.write_text("x")
    for argv, message in (
        (["vae", "--out", str(afile)], f"--out {str(afile)!r} is a file; give a folder for the run"),
        (
            ["dit", "--out", str(afile / "run")],
            f"--out {str(afile / 'run')!r} cannot be made: {str(afile)!r} is a file",
        ),
        (["vae", "--out", str(new), "--threads", "0"], "--threads must be 1 or more, got 0"),
        (["decoder", "--out", str(new), "--threads", "-1"], "--threads must be 1 or more, got -1"),
        (["vae", "--out", str(new), "--batch", "0"], "--batch must be 1 or more, got 0"),
        (
            ["dit", "--out", str(new), "--checkpoint-every", "0"],
            "--checkpoint-every must be 1 or more, got 0",
        ),
        (["vae", "--out", str(new), "--preset", "nope"], "--preset 'nope' is unknown; choose one of "),
        (["export", "--out", str(new), "--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"error: {message}" in err.splitlines()[-1], (argv, err)
    assert not new.exists() and threads == []
    # What the stages refuse is one line too, and export makes no run folder.
    bundle = tmp_path / "x.safetensors"
    assert main(["export", "--out", str(new), "--bundle", str(bundle)]) == 2
    assert (
        capsys.readouterr().err
        == f"tiny: error: no vae.ckpt in {str(new)!r}: run the vae and dit stages first\n"
    )
    assert not new.exists() and not bundle.exists()
    assert main(["vae", "--out", str(run), "--preset", "test-micro", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"tiny: error: {str(run / VAE_CHECKPOINT)!r} was trained with seed 1, but this run asks "
    )
    assert err.count("\n") == 1
    assert main(["decoder", "--out", str(new), "--source", str(tmp_path / "none.ckpt")]) == 2
    assert capsys.readouterr().err.startswith("tiny: error: no VAE source at ")


def test_export_refuses_a_bundle_name_no_loader_reads_before_reading_the_run(
    run, tmp_path, monkeypatch, capsys
):
    from mochi.train.tiny import main

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)

    for bundle, message in (
        (tmp_path / "x.bin", f"a bundle is a .safetensors file, got {str(tmp_path / 'x.bin')!r}"),
        (tmp_path, f"{str(tmp_path)!r} is a folder; give the bundle's file name"),
    ):
        # The run holds no dit.ckpt: the name is checked first.
        assert main(["export", "--out", str(run), "--preset", "test-micro", "--bundle", str(bundle)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tiny: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "x.bin").exists()


def test_ctrl_c_is_one_line_naming_the_step_a_rerun_resumes_from(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a stage printed KeyboardInterrupt's traceback; it is one line saying where a rerun
    resumes (the checkpoint is left as it was)."""
    import mochi.train.train_dit as train_dit_mod
    import mochi.train.train_vae as train_vae_mod
    from mochi.train.tiny import main

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    out = tmp_path / "run"

    def interrupted(out, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(train_vae_mod, "train_vae", interrupted)
    assert main(["vae", "--out", str(out)]) == 130
    assert capsys.readouterr().err == (
        "tiny: vae interrupted before its first checkpoint; rerun the same command to resume\n"
    )
    save_checkpoint({"step": 37, "seed": 2, "model": {"w": torch.ones(2)}}, out / "dit.ckpt")
    before = (out / "dit.ckpt").read_bytes()
    monkeypatch.setattr(train_dit_mod, "train_dit", interrupted)
    assert main(["dit", "--out", str(out)]) == 130
    assert capsys.readouterr().err == (
        f"tiny: dit interrupted; its last checkpoint, {str(out / 'dit.ckpt')!r}, is at step 37: rerun the "
        "same command to resume from there\n"
    )
    assert (out / "dit.ckpt").read_bytes() == before


def test_the_decoder_stage_refuses_a_missing_source_before_making_the_run_folder(tmp_path, capsys):
    """A missing --source (or OUT/vae.ckpt) was found after --out had been made: an empty run folder."""
    from mochi.train.tiny import main

    for source in ([], ["--source", str(tmp_path / "none.ckpt")]):
        new = tmp_path / "new"
        assert main(["decoder", "--out", str(new), "--threads", "1", *source]) == 2
        missing = str(tmp_path / "none.ckpt") if source else str(new / VAE_CHECKPOINT)
        assert capsys.readouterr().err == (
            f"tiny: error: no VAE source at {missing!r}: run the vae stage first, or pass a bundle\n"
        )
        assert not new.exists()


def test_train_decoder_refuses_a_missing_source_before_making_the_run_folder(tmp_path):
    """The library function, as the CLI: a missing source (or OUT/vae.ckpt) left an empty ``out`` behind."""
    for source in (None, tmp_path / "none.ckpt"):
        new = tmp_path / "new" / "run"
        missing = str(source if source is not None else new / VAE_CHECKPOINT)
        with pytest.raises(ValueError, match=f"^no VAE source at {re.escape(repr(missing))}: run the vae"):
            train_decoder(new, PRESET, DECODER, source=source, log=_quiet)
        assert not (tmp_path / "new").exists()


def test_a_decoder_resume_without_its_source_names_the_source_to_give(tmp_path, capsys):
    """A run started from --source X, resumed without it: the CLI's check for OUT/vae.ckpt came before the
    resume check, and said to run the vae stage rather than to give --source X."""
    from mochi.train.tiny import main

    out, other = tmp_path / "run", tmp_path / "other.ckpt"
    out.mkdir()
    save_checkpoint({"step": 1, "source": str(other)}, out / DECODER_CHECKPOINT)
    assert main(["decoder", "--out", str(out), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tiny: error: ") and f"give --source {other} to resume it" in err


def test_the_decoder_stage_names_a_source_that_is_a_folder(tmp_path, capsys):
    """A folder as --source passed the existence check and failed inside torch.load."""
    from mochi.train.tiny import main

    folder = tmp_path / "run"
    folder.mkdir()
    assert main(["decoder", "--out", str(tmp_path / "new"), "--threads", "1", "--source", str(folder)]) == 2
    assert capsys.readouterr().err == (
        f"tiny: error: VAE source {str(folder)!r} is a folder: give its vae stage's checkpoint "
        f"({str(folder / 'vae.ckpt')!r}) or a bundle file\n"
    )
    assert not (tmp_path / "new").exists()


def test_the_decoder_stage_can_focus_on_one_composition(run, tmp_path, capsys):
    """--focus COLOR:SHAPE --focus-share S draws that share of the decoder stage's clips as the composition
    (each clip keeping its place, size, motion and background), replayed on resume and recorded."""
    from mochi.train.tiny import main
    from mochi.train.train_decoder import DecoderRecipe, focused_specs
    from mochi.train.train_vae import batch_specs

    recipe = DecoderRecipe(focus="green:triangle", focus_share=0.25)
    specs = [s for step in range(300) for s in focused_specs(recipe, step)]
    plain = [s for step in range(300) for s in batch_specs(recipe, step)]
    focused = [(s, p) for s, p in zip(specs, plain) if s != p]
    assert 0.2 < len(focused) / len(specs) < 0.3
    assert all((s.color, s.shape) == ("green", "triangle") and s.start == p.start for s, p in focused)
    assert focused_specs(recipe, 7) == focused_specs(recipe, 7)  # a resume replays it
    assert focused_specs(DecoderRecipe(), 7) == batch_specs(DecoderRecipe(), 7)
    for argv, message in (
        (["--focus", "green:triangle"], "--focus COLOR:SHAPE and --focus-share S go together"),
        (["--focus", "blue:star", "--focus-share", "0.2"], "--focus 'blue:star' must be COLOR:SHAPE of"),
        (["--focus", "red:circle", "--focus-share", "0"], "--focus-share must lie in (0, 1], got 0.0"),
    ):
        with pytest.raises(SystemExit):
            main(["decoder", "--out", str(tmp_path / "new"), *argv])
        assert message in capsys.readouterr().err
    out = tmp_path / "run"
    shutil.copytree(run, out)
    state = train_decoder(out, PRESET, replace(DECODER, steps=1), log=_quiet)  # a run without focus resumes
    focus = replace(DECODER, steps=2, focus="red:circle", focus_share=0.5)
    new = tmp_path / "focused"
    shutil.copytree(run, new)
    (new / DECODER_CHECKPOINT).unlink()
    state = train_decoder(new, PRESET, replace(focus, steps=1), log=_quiet)
    assert (state["focus"], state["focus_share"]) == ("red:circle", 0.5)
    with pytest.raises(
        ValueError, match=re.escape("trained with focus red:circle, but this run asks for focus")
    ):
        train_decoder(new, PRESET, replace(focus, focus="green:square"), log=_quiet)
