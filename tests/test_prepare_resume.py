"""prepare-data never trains on stale data; train-lora says every resume decision out loud."""

import errno
import json
import re
import shutil

import numpy as np
import pytest
import torch

import mochi.pipeline
import mochi.train.data as data_module
import mochi.weights.components
from mochi.cli import main
from mochi.errors import OutputError
from mochi.pipeline import MochiPipeline
from mochi.train import shapes
from mochi.train.data import LatentDataset, prepare_data
from mochi.train.lora_state import ResumeError, list_states
from mochi.train.lora_train import LoraTrainConfig, train_lora
from mochi.video import write_video
from mochi.weights.io import read_metadata, read_state_dict

from .test_pipeline import tiny_components

SIZE = {"frames": 7, "width": 32, "height": 32}


def _videos(folder, n=2, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (cap, video) in enumerate(shapes.clips(seed=seed, n=n, frames=7, height=32, width=32)):
        write_video(video, folder / f"c{i}.mp4")
        (folder / f"c{i}.txt").write_text(cap)
    return folder


@pytest.fixture(scope="module")
def comps():
    return tiny_components()


def test_a_changed_caption_or_video_is_encoded_again(tmp_path, comps):
    videos, out = _videos(tmp_path / "v"), tmp_path / "d"
    first = prepare_data(videos, out, comps, **SIZE)
    assert first.encoded == ["c0.mp4", "c1.mp4"]
    assert prepare_data(videos, out, comps, **SIZE).cached == ["c0.mp4", "c1.mp4"]
    (videos / "c0.txt").write_text("a blue star moving right")
    other = next(shapes.clips(seed=5, n=1, frames=7, height=32, width=32))[1]
    write_video(other, videos / "c1.mp4")
    again = prepare_data(videos, out, comps, **SIZE)
    assert again.encoded == ["c0.mp4", "c1.mp4"] and again.cached == []  # before: both "already cached"
    assert read_metadata(out / "c0.safetensors")["caption"] == "a blue star moving right"
    # Another model's latents are not reused either.
    assert prepare_data(videos, out, tiny_components(seed=1), **SIZE).encoded == ["c0.mp4", "c1.mp4"]


def test_two_videos_of_one_stem_are_reported_not_mixed(tmp_path, comps):
    videos = _videos(tmp_path / "v", n=1)
    shutil.copy(videos / "c0.mp4", videos / "c0.mkv")
    report = prepare_data(videos, tmp_path / "d", comps, **SIZE)
    assert report.encoded == [] and dict(report.skipped) == {
        "c0.mkv": "same name as c0.mp4: both would be cached as c0.safetensors; rename one",
        "c0.mp4": "same name as c0.mkv: both would be cached as c0.safetensors; rename one",
    }
    assert not (tmp_path / "d" / "c0.safetensors").exists()


def test_cache_of_a_video_gone_or_now_skipped_is_removed(tmp_path, comps):
    videos, out = _videos(tmp_path / "v", n=3), tmp_path / "d"
    prepare_data(videos, out, comps, **SIZE)
    (videos / "c0.mp4").unlink()
    write_video(np.zeros((4, 32, 32, 3), np.uint8), videos / "c1.mp4")  # now too short
    (out / "notes.safetensors").write_bytes(b"not ours: kept")
    report = prepare_data(videos, out, comps, **SIZE)
    assert report.removed == ["c0.safetensors", "c1.safetensors"] and report.cached == ["c2.mp4"]
    assert "2 stale cache file(s) removed" in report.summary()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["c2.safetensors", "notes.safetensors"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, "holds no video (.mp4, .mov, .mkv, .webm, .avi, .m4v, .gif): it is empty of videos"),
        ({"a.txt": "x", "b.txt": "y"}, "it holds 2 caption(s) (a.txt, b.txt) but not their videos"),
        ({"a.ogv": "x"}, "it is empty of videos"),
        (
            {"a.mpg": "x", "a.txt": "y"},
            "it holds 1 MPEG program stream or FLV file(s) (a.mpg), which are not read",
        ),
    ],
)
def test_a_folder_without_videos_is_an_error_naming_what_it_holds(tmp_path, comps, files, expected):
    (tmp_path / "v").mkdir()
    for name, text in files.items():
        (tmp_path / "v" / name).write_text(text)
    with pytest.raises(ValueError, match="videos folder .* holds no video") as e:
        prepare_data(tmp_path / "v", tmp_path / "d", comps, **SIZE)
    assert expected in str(e.value)


def test_cli_fails_when_no_clip_could_be_prepared(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mochi.weights.components, "load_components", lambda *a, **k: tiny_components())
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"not a video")
    (tmp_path / "v" / "a.txt").write_text("a clip")
    args = ["prepare-data", str(tmp_path / "v"), str(tmp_path / "d"), "--frames", "7", "--width", "32"]
    assert main([*args, "--height", "32"]) == 2
    out, err = capsys.readouterr()
    assert "0 encoded, 0 already cached, 1 skipped" in out
    assert err.endswith(
        f"mochi: error: no clip of {str(tmp_path / 'v')!r} could be prepared (reasons above); the clips "
        f"already in {str(tmp_path / 'd')!r} were left as they were\n"
    )


def test_a_run_that_prepares_nothing_keeps_the_clips_cached_before(tmp_path, comps):
    """A mistyped --frames (or size) skipped every video alike, and the run then removed every clip an
    earlier run had cached (hours of encoding with the released VAE) before failing."""
    videos, out = _videos(tmp_path / "v", n=2), tmp_path / "d"
    prepare_data(videos, out, comps, **SIZE)
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    report = prepare_data(videos, out, comps, **{**SIZE, "frames": 73})  # the clips have 7 frames
    assert report.encoded == report.cached == report.removed == []
    assert [why for _, why in report.skipped] == ["too short: 7 frames, need 73"] * 2
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == before
    # A run that prepares some clips still removes the ones it cannot make any more.
    write_video(np.zeros((4, 32, 32, 3), np.uint8), videos / "c1.mp4")
    assert prepare_data(videos, out, comps, **SIZE).removed == ["c1.safetensors"]


def test_temporaries_left_by_a_killed_write_are_not_clips(tmp_path, comps):
    """A prepare-data killed while writing a clip (SIGKILL, the OOM killer) leaves .<stem>.<pid>.<rand>
    .partial.safetensors: pathlib's glob matches dot-names, and train-lora read it as a clip (a truncated
    one: "not a readable safetensors file"); a folder holding only one passed as holding clips."""
    from argparse import Namespace

    from mochi.cli.checks import check_train_lora

    videos, out = _videos(tmp_path / "v", n=2), tmp_path / "d"
    prepare_data(videos, out, comps, **SIZE)
    partial = out / ".c0.999999.x1y2.partial.safetensors"
    partial.write_bytes((out / "c0.safetensors").read_bytes()[:100])  # cut short, as a kill leaves it
    assert [e.name for e in LatentDataset(out).examples] == ["c0", "c1"]
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(partial, only / partial.name)
    args = Namespace(data=str(only), out=str(tmp_path / "run"), model=None, vae=None, t5=None, tokenizer=None)
    with pytest.raises(ValueError, match="holds no clips; run `mochi prepare-data` first"):
        check_train_lora(args)


def test_a_caption_that_is_a_folder_or_a_broken_link_is_named_as_such(tmp_path, comps):
    """Both were reported as "capdir.txt is missing (capdir.txt is there: name it capdir.txt)"."""
    videos = _videos(tmp_path / "v", n=3)
    (videos / "c0.txt").unlink()
    (videos / "c0.txt").mkdir()
    (videos / "c1.txt").unlink()
    (videos / "c1.txt").symlink_to(tmp_path / "gone.txt")
    skipped = dict(prepare_data(videos, tmp_path / "d", comps, **SIZE).skipped)
    assert skipped == {
        "c0.mp4": "no caption: c0.txt is a folder, not a text file",
        "c1.mp4": "no caption: c1.txt is a broken link",
    }


def test_cli_reads_no_dit_and_refuses_a_folder_without_videos_before_loading(tmp_path, monkeypatch, capsys):
    """prepare-data loaded the whole pipeline, DiT included (40 GB in fp32 for the released model), to use
    the VAE encoder and T5; and a folder holding no video was said only after that load."""
    import mochi.weights.components as components_module

    from .test_components import WORDS, _write_diffusers, _write_tokenizer

    model = tmp_path / "model"
    _write_diffusers(model, tiny_components(seed=1))
    _write_tokenizer(model / "tokenizer", WORDS)
    (model / "model_index.json").write_text('{"_class_name": "MochiPipeline"}')
    full = components_module.load_components(str(model))
    videos = _videos(tmp_path / "v", n=2)
    for name in ("c0", "c1"):
        (videos / f"{name}.txt").write_text("a red circle")  # the test tokenizer's words
    prepare_data(videos, tmp_path / "full", full, **SIZE)

    def no_dit(*args, **kwargs):
        raise AssertionError("prepare-data read the DiT")

    monkeypatch.setattr(components_module, "load_dit", no_dit)
    size = ["--frames", "7", "--width", "32", "--height", "32", "--model", str(model), "--device", "cpu"]
    assert main(["prepare-data", str(videos), str(tmp_path / "d"), *size]) == 0
    for name in ("c0", "c1"):
        got, want = (
            read_state_dict(tmp_path / "d" / f"{name}.safetensors"),
            read_state_dict(tmp_path / "full" / f"{name}.safetensors"),
        )
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    capsys.readouterr()

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was looked at")

    monkeypatch.setattr(components_module, "load_components", no_load)
    (tmp_path / "empty").mkdir()
    assert main(["prepare-data", str(tmp_path / "empty"), str(tmp_path / "d2"), *size]) == 2
    assert "holds no video (.mp4" in capsys.readouterr().err


def test_a_disk_error_stops_the_run_at_once(tmp_path, comps, monkeypatch):
    videos = _videos(tmp_path / "v", n=3)
    calls = []

    def full(tensors, path, metadata=None):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(data_module, "save_state_dict", full)
    with pytest.raises(OSError, match="No space left"):  # before: three "skipped" clips and exit 0
        prepare_data(videos, tmp_path / "d", comps, **SIZE)
    assert len(calls) == 1

    def full_atomic(tensors, path, metadata=None):
        calls.append(path)
        raise OutputError(f"cannot write {str(path)!r}: no space left on the device")

    monkeypatch.setattr(data_module, "save_state_dict", full_atomic)
    with pytest.raises(OutputError):
        prepare_data(videos, tmp_path / "d", comps, **SIZE)
    assert len(calls) == 2


# -- resume decisions -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory, comps):
    root = tmp_path_factory.mktemp("resume")
    prepare_data(_videos(root / "v"), root / "d", comps, **SIZE)
    return root / "d"


CFG = LoraTrainConfig(rank=2, steps=2, warmup=0, checkpoint_every=1, sample_every=0, targets=("qkv_x",))


def _train(data, out, steps=2, **kwargs):
    pipe = MochiPipeline(tiny_components(), device="cpu")
    return train_lora(pipe, data, out, LoraTrainConfig(**{**CFG.__dict__, "steps": steps}), **kwargs)


def test_an_unreadable_latest_state_is_named_and_an_older_one_resumed(data, tmp_path, capsys):
    _train(data, tmp_path / "run")
    newest = list_states(tmp_path / "run")[-1]
    assert newest.name == "step-000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a failing disk
    capsys.readouterr()
    _train(data, tmp_path / "run", steps=3)
    err = capsys.readouterr().err
    assert "mochi: warning: training state step-000002.pt is unreadable (" in err  # before: silent
    assert "mochi: resuming from step-000001.pt (step 1 of 3)" in err


def test_info_describes_a_prepared_clip_and_a_training_state(data, tmp_path, capsys):
    clip = sorted(data.glob("*.safetensors"))[0]
    assert main(["info", str(clip)]) == 0
    out = capsys.readouterr().out
    caption = read_metadata(clip)["caption"]
    assert "format      prepared clip (mochi prepare-data)" in out and f"caption     {caption}\n" in out
    assert "size        7 frames, 32x32" in out and f"use         mochi train-lora {data} --out RUN" in out
    _train(data, tmp_path / "run")
    state = list_states(tmp_path / "run")[-1]
    assert main(["info", str(state), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "train-lora state" and info["step"] == "2 of 2"
    assert info["lora"].endswith("rank 2") and info["data"].startswith(
        f"{len(list(data.glob('*.safetensors')))} clips, sha256 "
    )
    assert info["use"] == f"mochi train-lora DATA --out {(tmp_path / 'run').resolve()} (resumes after step 2)"
    # The folders themselves: the data folder (it was described as its first clip, with the wrong folder in
    # its train-lora command) and the run folder (it was "no Mochi component recognised").
    assert main(["info", str(data), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n = len(list(data.glob("*.safetensors")))
    assert info["format"] == "prepared data (mochi prepare-data)" and info["clips"].startswith(f"{n} (")
    assert info["size"] == "7 frames, 32x32" and info["use"] == f"mochi train-lora {data} --out RUN"
    assert main(["info", str(data), "--variant", "bf16"]) == 2  # a variant names a diffusers folder
    assert "holds no recognised checkpoint" in capsys.readouterr().err  # it was described as data anyway
    dead = tmp_path / "run" / "state" / ".step-000009.999999999.abcd.partial.pt"  # a killed write's
    dead.write_bytes(b"x")
    assert main(["info", str(tmp_path / "run"), "--json"]) == 0
    assert dead.exists()  # a reading command removed it (training removes it when it resumes)
    info = json.loads(capsys.readouterr().out)
    assert (
        info["format"] == "train-lora run"
        and info["step"] == "2 of 2"
        and info["settings"].startswith("rank 2")
    )
    assert info["use"] == f"mochi generate PROMPT --lora {tmp_path / 'run' / 'lora.safetensors'}"
    # A truncated state is no state: the model error stays (and names the file).
    state.write_bytes(state.read_bytes()[:100])
    assert main(["info", str(state)]) == 2
    assert str(state) in capsys.readouterr().err


def test_info_on_a_run_resumed_with_more_steps_names_its_newest_lora(data, tmp_path, capsys, monkeypatch):
    """A finished run resumed with more --steps and stopped half-way: `mochi info` named the earlier run's
    lora.safetensors as the result ("use: mochi generate --lora …/lora.safetensors") at step 3 of 4."""
    import mochi.train.lora_train as lora_train

    run = tmp_path / "run"
    _train(data, run)  # finished: lora.safetensors of step 2
    real = lora_train.flow_matching_loss
    calls = {"n": 0}

    def dies_in_step_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_train, "flow_matching_loss", dies_in_step_four)
    with pytest.raises(RuntimeError, match="killed"):
        _train(data, run, steps=4, progress=False)
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == "3 of 4" and info["lora"] == str(run / "lora-step-000003.safetensors")
    assert info["use"] == f"mochi train-lora DATA --out {run} (resumes)"
    monkeypatch.setattr(lora_train, "flow_matching_loss", real)
    _train(data, run, steps=4, progress=False)
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lora"] == str(run / "lora.safetensors") and info["use"].startswith("mochi generate")


def test_info_on_a_finished_run_whose_states_were_deleted_names_its_lora(data, tmp_path, capsys):
    """The step-*.pt states hold the optimizer (the run's largest files): deleted after a finished run,
    `mochi info` read step 0 and said "lora: none yet ... (resumes)" beside the run's lora.safetensors."""
    run = tmp_path / "run"
    _train(data, run)
    for state in list_states(run):
        state.unlink()
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == "2 of 2" and info["lora"] == str(run / "lora.safetensors")
    assert info["use"] == f"mochi generate PROMPT --lora {run / 'lora.safetensors'}"
    (run / "lora.safetensors").unlink()  # only the periodic LoRAs left: the newest names the step
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == "2 of 2" and info["lora"] == str(run / "lora-step-000002.safetensors")
    newest = run / "lora-step-000002.safetensors"  # nothing resumes without a state
    gone = "(the training states are gone: train-lora would start over from step 0)"
    assert info["use"] == f"mochi generate PROMPT --lora {newest} {gone}"


def test_all_states_unreadable_is_refused_without_restart(data, tmp_path, capsys, monkeypatch):
    _train(data, tmp_path / "run")
    for state in list_states(tmp_path / "run"):
        state.write_bytes(b"garbage")
    with pytest.raises(ResumeError, match="none is readable .*step-000002.pt.*step-000001.pt.*--restart"):
        _train(data, tmp_path / "run")  # before: silently trained from step 0
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    monkeypatch.setattr(mochi.weights.components, "load_components", lambda *a, **k: tiny_components())
    run = ["train-lora", str(data), "--out", str(tmp_path / "run"), "--rank", "2", "--steps", "2"]
    run += ["--warmup", "0", "--checkpoint-every", "1", "--sample-every", "0", "--targets", "qkv_x"]
    capsys.readouterr()
    assert main(run) == 2
    assert "none is readable" in capsys.readouterr().err
    # The earlier run's final LoRA and sample videos go too (a stale lora.safetensors of another rank sat
    # beside the new run's files).
    (tmp_path / "run" / "samples").mkdir()
    (tmp_path / "run" / "samples" / "step-000002-0.mp4").write_bytes(b"old sample")
    (tmp_path / "run" / "samples" / "mine.txt").write_text("kept")
    assert main([*run, "--steps", "1", "--restart"]) == 0
    err = capsys.readouterr().err
    assert "--restart: removed 6 file(s) of the earlier run" in err  # 2 states, 2 step LoRAs, final, sample
    assert [p.name for p in list_states(tmp_path / "run")] == ["step-000001.pt"]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["mine.txt"]
    assert (tmp_path / "run" / "lora.safetensors").is_file()  # the new run's
    # A run folder inside the data folder is refused before training: its files would be read as clips.
    run[3] = str(data / "run")
    assert main(run) == 2
    assert "is inside the data folder" in capsys.readouterr().err and not (data / "run").exists()


def test_changed_data_is_refused_without_restart(data, tmp_path, capsys):
    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    _train(mine, tmp_path / "run")
    before = LatentDataset(mine).fingerprint
    clip = read_state_dict(mine / "c0.safetensors")
    meta = read_metadata(mine / "c0.safetensors")
    from mochi.weights.io import save_state_dict

    save_state_dict({**clip, "mean": clip["mean"] + 1}, mine / "c0.safetensors", {**meta, "key": "other"})
    assert LatentDataset(mine).fingerprint != before
    with pytest.raises(ResumeError, match="trained on other data .*--restart"):  # before: resumed silently
        _train(mine, tmp_path / "run", steps=3)
    capsys.readouterr()
    _train(mine, tmp_path / "run", steps=1, restart=True)
    assert "--restart: removed" in capsys.readouterr().err
    assert (
        torch.load(list_states(tmp_path / "run")[-1], weights_only=True)["data"]
        == LatentDataset(mine).fingerprint
    )


def test_default_sample_prompts_skip_empty_captions(tmp_path, comps, monkeypatch):
    import mochi.train.lora_train as lora_train_module

    videos = _videos(tmp_path / "v", n=3, seed=4)
    (videos / "c0.txt").write_text("")  # an empty caption: sampling it would show the unconditional model
    prepare_data(videos, tmp_path / "d", comps, **SIZE)
    seen = []
    monkeypatch.setattr(
        lora_train_module, "_write_samples", lambda pipe, prompts, *a, **k: seen.append(prompts)
    )
    cfg = LoraTrainConfig(**{**CFG.__dict__, "steps": 1, "sample_every": 1})
    train_lora(MochiPipeline(tiny_components(), device="cpu"), tmp_path / "d", tmp_path / "run", cfg)
    captions = [(videos / f"c{i}.txt").read_text() for i in (1, 2)]
    assert seen and all(prompts == captions for prompts in seen)


def test_captions_lose_their_byte_order_mark_and_odd_ones_are_reported(tmp_path, comps):
    """A BOM became part of the caption (3 tokens more); a non-UTF-8 caption's error named no file; a
    caption cut at the text encoder's length was a raw Python warning glued to the bar, not in the report."""
    videos, out = _videos(tmp_path / "v", n=3), tmp_path / "d"
    (videos / "c0.txt").write_bytes(b"\xef\xbb\xbfa red star moving left")
    (videos / "c1.txt").write_bytes("une étoile".encode("latin-1"))
    (videos / "c2.txt").write_text("a red star moving left " * 40)
    report = prepare_data(videos, out, comps, **SIZE)
    assert read_metadata(out / "c0.safetensors")["caption"] == "a red star moving left"
    assert report.skipped == [
        ("c1.mp4", "caption c1.txt is not UTF-8 text (invalid continuation byte at byte 4)")
    ]
    ((name, what),) = report.warnings
    assert name == "c2.txt" and what.startswith("the caption is") and "tokens were dropped" in what
    assert "warning c2.txt: the caption is" in report.summary()
    assert json.loads((out / "prepare_report.json").read_text())["warnings"] == [[name, what]]


def test_samples_with_no_prompt_to_render_are_refused(tmp_path, comps):
    videos, out = _videos(tmp_path / "v"), tmp_path / "d"
    for caption in videos.glob("*.txt"):
        caption.write_text("  ")
    prepare_data(videos, out, comps, **SIZE)
    cfg = LoraTrainConfig(rank=2, alpha=2, steps=2, warmup=0, sample_every=1, sample_steps=1)
    with pytest.raises(ValueError, match="no clip of .* has a caption with text; pass --sample-prompt TEXT"):
        train_lora(MochiPipeline(comps, device="cpu"), out, tmp_path / "run", cfg, progress=False)


def test_data_of_another_model_is_named(tmp_path, comps, capsys):
    """Another model's clips trained silently; a folder mixing two models failed deep in torch."""
    videos, out = _videos(tmp_path / "v"), tmp_path / "d"
    prepare_data(videos, out, comps, **SIZE)
    cfg = LoraTrainConfig(rank=2, alpha=2, steps=1, warmup=0, sample_every=0)
    train_lora(MochiPipeline(tiny_components(seed=1), device="cpu"), out, tmp_path / "run", cfg)
    assert "warning: the clips were prepared with model" in capsys.readouterr().err
    other = tmp_path / "other"
    prepare_data(_videos(tmp_path / "w", n=1, seed=3), other, tiny_components(seed=1), **SIZE)
    shutil.copy(next(other.glob("*.safetensors")), out / "zz.safetensors")
    with pytest.raises(ValueError, match=r"mixes clips prepared with 2 models"):
        LatentDataset(out)


def test_entries_that_are_not_read_are_named_in_the_report(tmp_path, comps):
    """A broken link or a folder named like a video, and a subfolder of videos, were left out silently; an
    audio-only file's reason was "tuple index out of range"."""
    import av

    videos, out = _videos(tmp_path / "v", n=1), tmp_path / "d"
    (videos / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (videos / "gone.txt").write_text("a red star moving left")
    (videos / "folder.mp4").mkdir()
    (videos / "sub").mkdir()
    write_video(np.zeros((7, 32, 32, 3), np.uint8), videos / "sub" / "nested.mp4")
    with av.open(str(videos / "audio.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    (videos / "audio.txt").write_text("a sound")
    report = prepare_data(videos, out, comps, **SIZE)
    skipped = dict(report.skipped)
    assert report.encoded == ["c0.mp4"]
    assert skipped["gone.mp4"] == "a broken link" and skipped["folder.mp4"] == "not a file"
    assert skipped["sub/"] == "a subfolder: only the videos directly in the folder are read"
    assert skipped["audio.mp4"].endswith("has no video stream")


def test_a_run_resumes_only_on_its_own_model(tmp_path, comps):
    videos, out = _videos(tmp_path / "v"), tmp_path / "d"
    prepare_data(videos, out, comps, **SIZE)
    run = tmp_path / "run"
    train_lora(
        MochiPipeline(comps, device="cpu"),
        out,
        run,
        LoraTrainConfig(rank=2, alpha=2, steps=1, warmup=0, sample_every=0, checkpoint_every=1),
        progress=False,
    )
    more = LoraTrainConfig(rank=2, alpha=2, steps=2, warmup=0, sample_every=0, checkpoint_every=1)
    with pytest.raises(ResumeError, match=r"holds a run trained on model \w+, and this model is \w+"):
        train_lora(MochiPipeline(tiny_components(seed=1), device="cpu"), out, run, more, progress=False)
    train_lora(MochiPipeline(tiny_components(), device="cpu"), out, run, more, progress=False)  # its own


def test_captioned_clips_in_other_containers_and_near_miss_captions_are_named(tmp_path, comps):
    """clip.ogv + clip.txt vanished from the run and its report, and c0.mp4 beside c0.TXT was said to lack
    c0.txt without naming the file that is there."""
    videos, out = _videos(tmp_path / "v", n=2), tmp_path / "d"
    (videos / "c0.txt").rename(videos / "c0.TXT")
    shutil.copy(videos / "c1.mp4", videos / "clip.ogv")
    (videos / "clip.txt").write_text("an ogv")
    report = prepare_data(videos, out, comps, **SIZE)
    skipped = dict(report.skipped)
    assert report.encoded == ["c1.mp4"]
    assert skipped["c0.mp4"] == "no caption: c0.txt is missing (c0.TXT is there: name it c0.txt)"
    assert skipped["clip.ogv"].startswith("captioned by clip.txt, but .ogv is not a video suffix")
    assert ".mp4, .mov, .mkv" in skipped["clip.ogv"]
    assert "clip.ogv" in (out / "prepare_report.json").read_text()


def _write(path, video, codec, pix_fmt):  # noqa: ANN001, ANN202 - a container write_video does not make
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], pix_fmt
        for image in np.asarray(video):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def test_gif_clips_are_read_and_mpeg_program_streams_are_named_as_not_read(tmp_path, comps):
    """prepare-data listed a captioned .gif or .mpg as "not a video suffix" and never read it; a gif is now
    read like any clip, and an .mpg (which PyAV cannot open under mochi's frame-size cap) is named, with
    the conversion, whether or not it is captioned."""
    videos, out = tmp_path / "v", tmp_path / "d"
    videos.mkdir()
    (cap, clip), (_, other) = shapes.clips(seed=0, n=2, frames=7, height=32, width=32)
    _write(videos / "clip.gif", clip, "gif", "rgb8")
    (videos / "clip.txt").write_text(cap)
    _write(videos / "old.mpg", other, "mpeg1video", "yuv420p")
    (videos / "old.txt").write_text("an mpeg")
    _write(videos / "bare.mpeg", other, "mpeg1video", "yuv420p")
    (videos / "web.flv").write_bytes(b"FLV\x01")  # listed by its suffix, never opened
    report = prepare_data(videos, out, comps, **SIZE)
    assert report.encoded == ["clip.gif"]
    assert read_metadata(out / "clip.safetensors")["source"] == "clip.gif"
    skipped = dict(report.skipped)
    assert set(skipped) == {"old.mpg", "bare.mpeg", "web.flv"}
    assert skipped["web.flv"].startswith("'web.flv' is a Flash video (.flv), which is not read: ")
    assert skipped["old.mpg"] == (
        "'old.mpg' is an MPEG program stream (.mpg, .mpeg, .vob), which is not read: its decoder cannot be "
        "given the frame-size cap before it is probed; convert it, e.g. ffmpeg -i old.mpg old.mp4"
    )


def test_clips_this_dit_cannot_take_are_refused_before_the_run_folder(tmp_path, comps):
    """Another model family's clips (a T5 of another width) only warned, then failed inside the first step
    with the run's config.json already written."""
    import dataclasses

    from mochi.models.dit import AsymmDiT

    videos, out = _videos(tmp_path / "v"), tmp_path / "d"
    prepare_data(videos, out, comps, **SIZE)
    other = tiny_components(seed=1)
    width = other.dit.config.t5_feat_dim
    other.dit = AsymmDiT(dataclasses.replace(other.dit.config, t5_feat_dim=2 * width)).eval()
    cfg = LoraTrainConfig(rank=2, alpha=2, steps=1, warmup=0, sample_every=0)
    run = tmp_path / "run"
    message = f"the clips' text features are {width} wide and this model's DiT takes {2 * width}"
    with pytest.raises(ValueError, match=re.escape(message) + ".*run prepare-data again with this model"):
        train_lora(MochiPipeline(other, device="cpu"), out, run, cfg, progress=False)
    assert not run.exists() or not any(run.iterdir())


def test_info_names_what_a_damaged_data_or_run_folder_cannot_read(data, tmp_path, capsys):
    """One truncated clip, or an unreadable config.json of a run, and info said the folder held no
    recognised checkpoint (or no Mochi component), never naming the file at fault."""
    damaged = tmp_path / "d"
    shutil.copytree(data, damaged)
    clip = sorted(damaged.glob("*.safetensors"))[-1]
    clip.write_bytes(clip.read_bytes()[:200])
    assert main(["info", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert f"{str(damaged)!r} is a prepare-data folder that cannot be read: " in err and clip.name in err
    _train(data, tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text("{broken")
    assert main(["info", str(tmp_path / "run")]) == 2
    assert "train-lora run folder that cannot be read: its config.json is not JSON" in capsys.readouterr().err
