"""prepare-data, LoRA training (resume bit-exactness, atomic checkpoints), LoRA inference in the pipeline."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mochi.pipeline
import mochi.train.lora_state
import mochi.train.lora_train as lora_train
import mochi.weights.components
from mochi.cli import main
from mochi.models.lora import LoraLayer, target_modules
from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.train import shapes
from mochi.train.data import LatentDataset, prepare_data
from mochi.train.lora_state import list_states, load_latest_state
from mochi.train.lora_train import (
    LoraTrainConfig,
    lr_factor,
    micro_batches,
    sample_sigmas,
    stream_seed,
    train_lora,
)
from mochi.video import write_video
from mochi.weights.io import WeightsError, read_metadata, read_state_dict
from mochi.weights.lora import read_lora, save_lora

from .test_pipeline import tiny_components

STAR = shapes.Vocab(
    colors=("red", "blue"), shapes=("star",), directions=("left", "right"), backgrounds=("black",)
)


def pipe() -> MochiPipeline:
    return MochiPipeline(tiny_components(), device="cpu")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three good clips and one of each kind of bad file."""
    folder = tmp_path_factory.mktemp("videos")
    for i, (cap, video) in enumerate(shapes.clips(seed=0, n=3, frames=9, height=40, width=48, vocab=STAR)):
        write_video(video, folder / f"good{i}.mp4")
        (folder / f"good{i}.txt").write_text(cap + "\n")
    write_video(np.zeros((4, 32, 32, 3), np.uint8), folder / "short.mp4")
    (folder / "short.txt").write_text("a red star moving left")
    write_video(np.zeros((9, 16, 48, 3), np.uint8), folder / "small.mp4")
    (folder / "small.txt").write_text("a red star moving left")
    write_video(np.zeros((9, 32, 32, 3), np.uint8), folder / "nocaption.mp4")
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    (folder / "broken.txt").write_text("a red star moving left")
    (folder / "notes.md").write_text("ignored: not a video")
    return folder


@pytest.fixture(scope="module")
def data(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    report = prepare_data(videos, out, tiny_components(), frames=7, width=32, height=32)
    return out, report


def test_prepare_data_encodes_good_clips_and_lists_bad_ones(data):
    out, report = data
    assert report.encoded == ["good0.mp4", "good1.mp4", "good2.mp4"]
    reasons = dict(report.skipped)
    assert set(reasons) == {"short.mp4", "small.mp4", "nocaption.mp4", "broken.mp4"}
    assert reasons["short.mp4"].startswith("too short: 4 frames, need 7")
    assert reasons["small.mp4"].startswith("too small: 48x16")
    assert reasons["nocaption.mp4"] == "no caption: nocaption.txt is missing"
    assert "cannot read video" in reasons["broken.mp4"]
    sd, meta = read_state_dict(out / "good0.safetensors"), read_metadata(out / "good0.safetensors")
    assert sd["mean"].shape == sd["logvar"].shape == (12, 2, 4, 4)
    assert sd["text"].shape == (len(meta["caption"].encode()) + 1, 32)  # byte tokens + end token
    assert meta["caption"].startswith("a ") and meta["frames"] == "7" and meta["source"] == "good0.mp4"
    saved = json.loads((out / "prepare_report.json").read_text())
    assert [s[0] for s in saved["skipped"]] == [s[0] for s in report.skipped]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary files


def test_prepare_data_rerun_skips_done_work(data, videos):
    out, _ = data
    before = (out / "good1.safetensors").stat().st_mtime_ns
    again = prepare_data(videos, out, tiny_components(), frames=7, width=32, height=32)
    assert again.encoded == [] and again.cached == ["good0.mp4", "good1.mp4", "good2.mp4"]
    assert len(again.skipped) == 4 and (out / "good1.safetensors").stat().st_mtime_ns == before


def test_prepare_data_validates_settings(videos, tmp_path):
    with pytest.raises(ValueError, match="frames=8 is not of the form 6k"):
        prepare_data(videos, tmp_path, tiny_components(), frames=8, width=32, height=32)
    with pytest.raises(ValueError, match="width=30 must be a positive multiple of 16"):
        prepare_data(videos, tmp_path, tiny_components(), frames=7, width=30, height=32)


def test_schedule_sigmas_and_data_order():
    assert lr_factor(0, 4, 10) == 0.25 and lr_factor(3, 4, 10) == 1.0
    assert lr_factor(7, 4, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_factor(10, 4, 10) == 0.0
    g = torch.Generator().manual_seed(0)
    u = sample_sigmas(1000, "uniform", 3.0, g)
    s = sample_sigmas(1000, "shifted", 3.0, g)
    assert u.min() >= 0 and u.max() < 1 and s.min() >= 0 and s.max() < 1
    assert 0.45 < u.mean() < 0.55 and s.mean() > 0.6
    cfg = LoraTrainConfig(batch_size=2, grad_accum=2, seed=5)
    seen = [i for step in range(5) for mb in micro_batches(step, 5, cfg) for i in mb]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5))
    assert micro_batches(3, 5, cfg) == micro_batches(3, 5, cfg) and len(micro_batches(3, 5, cfg)) == 2


def test_seeds_that_python_hash_folds_together_draw_different_batches():
    # hash(2**61 - 1) == hash(0): the batch order and the noise were drawn from Python's hash of the seed
    orders = {
        seed: [micro_batches(step, 50, LoraTrainConfig(batch_size=4, seed=seed)) for step in range(3)]
        for seed in (0, 2**61 - 1)
    }
    assert orders[0] != orders[2**61 - 1]
    assert stream_seed(0, 2, 7) != stream_seed(2**61 - 1, 2, 7) and 0 <= stream_seed(2**63 - 1, 3, 1) < 2**63


CFG = LoraTrainConfig(rank=2, alpha=4, lr=1e-2, steps=4, warmup=1, checkpoint_every=2, sample_every=0, seed=3)


def test_gradient_checkpointing_gives_the_same_gradients(data):
    examples = list(LatentDataset(data[0]).examples)
    grads = []
    for checkpointing in (False, True):
        dit = tiny_components().dit
        torch.manual_seed(0)
        lora_train.add_trainable_lora(dit, rank=2)
        with torch.no_grad():
            for name, p in dit.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_()
        calls = []
        inner = dit.blocks[0].attn.forward
        dit.blocks[0].attn.forward = lambda *a, _f=inner, _c=calls: _c.append(1) or _f(*a)
        if checkpointing:
            lora_train.checkpoint_blocks(dit)
        loss = lora_train.flow_matching_loss(dit, examples[:2], None, CFG, torch.Generator().manual_seed(1))
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        grads.append({n: p.grad for n, p in dit.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 14
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_latents_mean_trains_on_posterior_means(data):
    import dataclasses

    examples = list(LatentDataset(data[0]).examples)[:2]
    louder = [dataclasses.replace(e, logvar=e.logvar + 3.0) for e in examples]
    dit = tiny_components().dit

    def loss(cfg, batch):
        return float(lora_train.flow_matching_loss(dit, batch, None, cfg, torch.Generator().manual_seed(1)))

    mean_cfg = dataclasses.replace(CFG, latents="mean")
    # Means ignore the posterior's variance; samples depend on it.
    assert loss(mean_cfg, examples) == loss(mean_cfg, louder)
    assert loss(CFG, examples) != loss(CFG, louder)
    with pytest.raises(ValueError, match=r"latents='median' must be one of \['sample', 'mean'\]"):
        dataclasses.replace(CFG, latents="median").validate()


def test_latents_default_to_what_the_base_model_learnt(data, tmp_path):
    out, _ = data
    one_step = LoraTrainConfig(**{**CFG.__dict__, "steps": 1})
    train_lora(pipe(), out, tmp_path / "a", one_step, progress=False)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["latents"] == "sample"
    on_means = pipe()
    on_means.components.defaults["latents"] = "mean"  # as the embedded model's bundle says
    train_lora(on_means, out, tmp_path / "b", one_step, progress=False)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["latents"] == "mean"


def test_resumed_run_is_bit_identical_to_uninterrupted(data, tmp_path, monkeypatch):
    out, _ = data
    whole = read_lora(train_lora(pipe(), out, tmp_path / "whole", CFG, progress=False))
    b = whole.layers["blocks.0.attn.qkv_x"].B
    assert b.abs().max() > 0  # it trained

    calls = {"n": 0}
    real = lora_train.flow_matching_loss

    def dies_in_step_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_train, "flow_matching_loss", dies_in_step_three)
    with pytest.raises(RuntimeError, match="killed"):
        train_lora(pipe(), out, tmp_path / "cut", CFG, progress=False)
    assert [p.name for p in list_states(tmp_path / "cut")] == ["step-000002.pt"]
    monkeypatch.setattr(lora_train, "flow_matching_loss", real)
    resumed = read_lora(train_lora(pipe(), out, tmp_path / "cut", CFG, progress=False))
    for name, layer in whole.layers.items():
        assert resumed.layers[name].A.equal(layer.A) and resumed.layers[name].B.equal(layer.B), name
    # keep=2: steps 2 and 4 remain; every checkpoint left its LoRA file.
    assert [p.name for p in list_states(tmp_path / "cut")] == ["step-000002.pt", "step-000004.pt"]
    assert (tmp_path / "cut" / "lora-step-000004.safetensors").is_file()


@pytest.fixture
def python_sigint():
    """SIGINT as Python sets it up in a process started in the foreground (a job started in the background
    by a non-interactive shell, CI's for one, inherits it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_checkpoints_the_finished_step_and_resumes_exactly(data, tmp_path, monkeypatch, python_sigint):
    out, _ = data
    cfg = LoraTrainConfig(**{**CFG.__dict__, "checkpoint_every": 0})  # only the final and Ctrl-C ones
    whole = read_lora(train_lora(pipe(), out, tmp_path / "whole", cfg, progress=False))
    calls = {"n": 0}
    real = lora_train.flow_matching_loss

    def ctrl_c_in_step_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)  # arrives mid-step: the step still completes
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_train, "flow_matching_loss", ctrl_c_in_step_two)
    with pytest.raises(KeyboardInterrupt, match="stopped after step 2"):
        train_lora(pipe(), out, tmp_path / "cut", cfg, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert [p.name for p in list_states(tmp_path / "cut")] == ["step-000002.pt"]
    monkeypatch.setattr(lora_train, "flow_matching_loss", real)
    resumed = read_lora(train_lora(pipe(), out, tmp_path / "cut", cfg, progress=False))
    for name, layer in whole.layers.items():
        assert resumed.layers[name].B.equal(layer.B), name


TRAIN_FOREVER = """
import sys
from tests.test_lora_train import CFG, LoraTrainConfig, pipe, train_lora
cfg = LoraTrainConfig(**{**CFG.__dict__, "steps": 10_000, "checkpoint_every": 1})
train_lora(pipe(), sys.argv[1], sys.argv[2], cfg, progress=False)
"""


def test_sigkill_at_any_moment_loses_nothing_saved(data, tmp_path):
    """A real kill -9 during training: every checkpoint left is whole and the run resumes from the last."""
    out, _ = data
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
    cmd = [sys.executable, "-c", TRAIN_FOREVER, str(out), str(tmp_path / "run")]
    child = subprocess.Popen(cmd, env=env, cwd=root)
    deadline = time.monotonic() + 120
    while len(list_states(tmp_path / "run")) < 2 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    states = list_states(tmp_path / "run")
    assert len(states) >= 2
    state = load_latest_state(tmp_path / "run")  # loads: never half-written
    assert state["path"] == str(states[-1]) and state["step"] >= 2
    cfg = LoraTrainConfig(**{**CFG.__dict__, "steps": state["step"] + 1, "checkpoint_every": 1})
    train_lora(pipe(), out, tmp_path / "run", cfg, progress=False)
    assert load_latest_state(tmp_path / "run")["step"] == state["step"] + 1
    assert all(p.name.startswith("step-") for p in (tmp_path / "run" / "state").iterdir())


def test_resume_refuses_other_settings(data, tmp_path):
    out, _ = data
    train_lora(pipe(), out, tmp_path / "run", CFG, progress=False)
    other = LoraTrainConfig(**{**CFG.__dict__, "rank": 3})
    with pytest.raises(ValueError, match="holds a run with rank=2, not 3"):
        train_lora(pipe(), out, tmp_path / "run", other, progress=False)


def test_a_rank_wider_than_the_layers_is_refused_before_anything_is_written(data, tmp_path):
    """rank 100000 on the tiny model wrote 2 GB LoRA files and a 6.5 GB state for nothing: a rank above the
    narrowest targeted layer's features adds no capacity. The folders the call made are taken away again
    (an empty --out was left behind); one that was there stays."""
    out, _ = data
    wide = LoraTrainConfig(**{**CFG.__dict__, "rank": 100000, "alpha": 1.0})
    (tmp_path / "there").mkdir()
    for run in (tmp_path / "new" / "run", tmp_path / "there"):
        with pytest.raises(
            ValueError, match=r"rank=100000 is more than the (\d+) features .*; choose at most \1"
        ):
            train_lora(pipe(), out, run, wide, progress=False)
    assert not (tmp_path / "new").exists()
    assert not list((tmp_path / "there").iterdir())


def test_a_folder_named_config_json_in_out_is_refused_with_the_rule(data, tmp_path):
    out, _ = data
    (tmp_path / "run" / "config.json").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"config.json': a folder has that name; move it away"):
        train_lora(pipe(), out, tmp_path / "run", CFG, progress=False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    lora = {"blocks.0.attn.qkv_x.lora_A": torch.ones(2, 3)}
    mochi.train.lora_state.save_state(tmp_path, 1, lora, {}, {"rank": 2})

    def dies_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        mochi.train.lora_state.save_state(tmp_path, 2, lora, {}, {"rank": 2})
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["step-000001.pt"]
    state = load_latest_state(tmp_path)
    assert state["step"] == 1 and state["config"] == {"rank": 2}


def test_training_writes_samples(data, tmp_path):
    out, _ = data
    cfg = LoraTrainConfig(rank=2, steps=1, checkpoint_every=1, sample_every=1, sample_steps=2, warmup=0)
    train_lora(pipe(), out, tmp_path / "run", cfg, progress=False)
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["step-000001-0.mp4", "step-000001-1.mp4"]


def _lora_file(path, seed: int = 0, b_scale: float = 1.0):
    dit = tiny_components().dit
    g = torch.Generator().manual_seed(seed)
    layers = {
        n: LoraLayer(
            torch.randn(2, m.in_features, generator=g),
            torch.randn(m.out_features, 2, generator=g) * b_scale,
            2.0,
        )
        for n, m in target_modules(dit).items()
    }
    return save_lora(layers, path)


def test_pipeline_applies_request_loras_merged_or_not(tmp_path):
    first, second = _lora_file(tmp_path / "a.safetensors"), _lora_file(tmp_path / "b.safetensors", 1)
    p = pipe()
    req = GenerationRequest("a red star moving left", seed=1, steps=2)
    base = p.generate(req).latents
    loras = [(str(first), 0.5), (str(second), -0.25)]
    unmerged = p.generate(GenerationRequest(**{**req.__dict__, "loras": loras})).latents
    assert (unmerged - base).abs().max() > 1e-3 and len(p.loras) == 2
    p.unload_loras()
    assert p.generate(req).latents.equal(base)
    p.lora_merge = True
    merged = p.generate(GenerationRequest(**{**req.__dict__, "loras": loras})).latents
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    p.unload_loras()
    torch.testing.assert_close(p.generate(req).latents, base, rtol=1e-5, atol=1e-5)


def test_merged_loras_give_the_bf16_base_back_bit_exactly_after_scale_changes(tmp_path):
    # A Δ small beside the weights: subtracting it again from bf16 weights would move small elements by
    # many of their units, and every scale change (taken off, merged again) would start from moved weights.
    # The pipeline merges keeping the originals, so the base comes back exactly, whatever the removal order.
    first = str(_lora_file(tmp_path / "a.safetensors", b_scale=0.02))
    second = str(_lora_file(tmp_path / "b.safetensors", 1, b_scale=0.02))
    p = MochiPipeline(tiny_components(), device="cpu", dit_dtype="bf16")
    p.lora_merge = True
    dit = p.components.dit
    w0 = {k: v.clone() for k, v in dit.state_dict().items()}
    req = GenerationRequest("a red star moving left", seed=1, steps=1)
    base = p.generate(req).latents
    for n in range(4):
        p.generate(GenerationRequest(**{**req.__dict__, "loras": [(first, 0.5 + 0.37 * n)]}))
    assert not all(v.equal(w0[k]) for k, v in dit.state_dict().items())
    p.unload_loras()
    assert all(v.equal(w0[k]) for k, v in dit.state_dict().items())
    assert p.generate(req).latents.equal(base)
    handles = p.load_lora(first, 1.0), p.load_lora(second, 2.0)
    assert all(h.originals for h in handles)
    for h in handles:  # oldest first
        h.remove()
    assert all(v.equal(w0[k]) for k, v in dit.state_dict().items())
    # A caller that never takes its LoRA off (mochi generate) keeps no copies: 5.4 GB at full size.
    p.lora_keep_originals = False
    assert not p.load_lora(first, 1.0).originals


def test_request_loras_after_a_handle_removal_or_a_failed_load(tmp_path):
    lora = str(_lora_file(tmp_path / "a.safetensors"))
    p = pipe()
    req = GenerationRequest("a red star moving left", seed=1, steps=2)
    base = p.generate(req).latents
    styled = p.generate(GenerationRequest(**{**req.__dict__, "loras": [(lora, 1.0)]})).latents
    p.unload_loras()
    # A handle taken off by itself: the next request naming the LoRA applies it again.
    p.load_lora(lora, 1.0).remove()
    again = p.generate(GenerationRequest(**{**req.__dict__, "loras": [(lora, 1.0)]})).latents
    assert again.equal(styled) and [e[:2] for e in p.loras] == [(lora, 1.0)]
    # A list that fails half-way leaves none applied, so a later plain request is the base model.
    bad = GenerationRequest(
        **{**req.__dict__, "loras": [(lora, 0.5), (str(tmp_path / "missing.safetensors"), 1)]}
    )
    with pytest.raises(WeightsError, match="missing.safetensors' does not exist"):
        p.generate(bad)
    assert p.loras == [] and p.generate(req).latents.equal(base)


def test_a_lora_file_replaced_between_requests_is_read_again(tmp_path):
    """A retrained LoRA saved under the same name (train-lora writes a temporary, then renames it): the
    pipeline kept the old one applied, so the same request gave another video than in a fresh process."""
    lora = tmp_path / "style.safetensors"
    _lora_file(lora, seed=0)
    p = pipe()
    req = GenerationRequest("a red star moving left", seed=1, steps=2, loras=[(str(lora), 1.0)])
    old = p.generate(req).latents
    _lora_file(tmp_path / "new.safetensors", seed=1)
    os.replace(tmp_path / "new.safetensors", lora)
    fresh = pipe().generate(req).latents
    assert not fresh.equal(old) and p.generate(req).latents.equal(fresh)
    handle = p.loras[0][2]
    assert p.generate(req).latents.equal(fresh) and p.loras[0][2] is handle  # unchanged: not read again


def test_cli_generate_with_lora_and_convert_lora(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    monkeypatch.setattr(mochi.weights.components, "load_components", lambda *a, **k: tiny_components())
    lora = _lora_file(tmp_path / "l.safetensors")
    out = tmp_path / "v.mp4"
    args = ["generate", "x", "--seed", "1", "--steps", "1", "--out", str(out), "--lora", str(lora)]
    import mochi.models.lora as models_lora

    kept = []
    real_apply = models_lora.apply_lora

    def apply(*a, keep_original=False, **k):  # noqa: ANN002, ANN003, ANN202
        kept.append(keep_original)
        return real_apply(*a, keep_original=keep_original, **k)

    monkeypatch.setattr(models_lora, "apply_lora", apply)
    assert main([*args, "--lora-scale", "0.5", "--lora-merge"]) == 0
    assert kept == [False]  # one request, then exit: no CPU copy of the merged weights (5.4 GB at full size)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["loras"] == [[str(lora), 0.5]] and side["lora_merge"] is True
    assert main([*args, "--lora-scale", "0.5"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["lora_merge"] is False
    assert main([*args, "--lora-scale", "1", "--lora-scale", "2"]) == 2
    assert "2 --lora-scale values for 1 --lora files" in capsys.readouterr().err
    assert main(["convert-lora", str(lora), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert "genmo → diffusers, 7 layers, ranks [2]" in capsys.readouterr().out
    assert read_lora(tmp_path / "d.safetensors").format == "diffusers"


def test_cli_prepare_data_and_train_lora(videos, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    monkeypatch.setattr(mochi.weights.components, "load_components", lambda *a, **k: tiny_components())
    data = tmp_path / "data"
    assert (
        main(["prepare-data", str(videos), str(data), "--frames", "7", "--width", "32", "--height", "32"])
        == 0
    )
    assert "3 encoded, 0 already cached, 4 skipped" in capsys.readouterr().out
    assert len(LatentDataset(data)) == 3
    run = ["train-lora", str(data), "--out", str(tmp_path / "run"), "--rank", "2", "--steps", "2"]
    assert main([*run, "--sample-every", "0", "--targets", "qkv_x,proj_x"]) == 0
    lora = read_lora(tmp_path / "run" / "lora.safetensors")
    assert lora.targets == ("qkv_x", "proj_x") and lora.ranks == {2}
    assert main([*run, "--targets", "qkv_x,bogus"]) == 2
    assert "unknown LoRA target 'bogus'" in capsys.readouterr().err


@pytest.mark.gpu
def test_training_on_cuda_uses_bf16_base_and_fp32_lora(data, tmp_path):
    out, _ = data
    p = MochiPipeline(tiny_components(), device="cuda")
    assert p.components.dit.dtype == torch.bfloat16
    lora = read_lora(train_lora(p, out, tmp_path / "run", CFG, progress=False))
    assert {layer.A.dtype for layer in lora.layers.values()} == {torch.float32}
    assert all(torch.isfinite(layer.B).all() for layer in lora.layers.values())
    assert p.components.dit.blocks[0].attn.qkv_x.lora_A.device.type == "cuda"


def test_training_lowers_the_loss(data, tmp_path):
    """The LoRA learns: a few steps on three clips lower the loss at fixed draws (σ, ε, posterior sample)."""
    out, _ = data
    p = pipe()
    examples = LatentDataset(out).examples
    targets = ("qkv_x", "qkv_y", "proj_x", "mod_x", "mlp_x.w1", "mlp_x.w2")
    cfg = LoraTrainConfig(
        rank=8, alpha=8, lr=2e-2, steps=25, warmup=2, caption_dropout=0.0, targets=targets, sample_every=0
    )

    def loss() -> float:
        dit, draws = p.components.dit, torch.Generator().manual_seed(7)
        with torch.no_grad():
            return sum(
                lora_train.flow_matching_loss(dit, examples, None, cfg, draws).item() for _ in range(3)
            )

    before = loss()
    train_lora(p, out, tmp_path / "run", cfg, progress=False)
    after = loss()
    assert after < 0.95 * before  # 9.84 → 8.93 here


def test_cli_parser_stays_light_and_matches_default_targets():
    code = "import sys; from mochi.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
    from mochi.cli import build_parser
    from mochi.models.lora import DEFAULT_TARGETS

    args = build_parser().parse_args(["train-lora", "d", "--out", "o"])
    assert tuple(args.targets.split(",")) == DEFAULT_TARGETS


def test_a_lora_for_another_model_is_named_by_its_file(tmp_path):
    lora = _lora_file(tmp_path / "for-the-test-dit.safetensors")  # the test DiT's widths, not the embedded's
    embedded = MochiPipeline.from_pretrained()
    with pytest.raises(
        ValueError, match=r"LoRA '.*for-the-test-dit\.safetensors' layer .* trained for another"
    ):
        embedded.load_lora(str(lora))
    assert embedded.loras == []


def test_one_run_folder_takes_one_train_lora_at_a_time(data, tmp_path):
    """A second run on the same --out resumed the first's states, overwrote its files and deleted the
    temporary the first was writing, which then failed."""
    from mochi.train.lora_train import _run_lock

    out, _ = data
    run = tmp_path / "run"
    run.mkdir()
    with _run_lock(run):
        with pytest.raises(
            ValueError, match=rf"'{run}' is in use by another train-lora \(pid {os.getpid()}\)"
        ):
            train_lora(pipe(), out, run, CFG, progress=False)
        # A live process's temporary is left alone by a resume; a dead one's is removed.
        (run / "state").mkdir()
        live = run / "state" / f".step-000009.{os.getpid()}.abcd.partial.pt"
        dead = run / "state" / ".step-000009.999999999.abcd.partial.pt"
        live.write_bytes(b"x"), dead.write_bytes(b"x")
        assert load_latest_state(run) is None and live.exists() and not dead.exists()
    live.unlink()
    train_lora(pipe(), out, run, CFG, progress=False)  # free again once the holder has gone
    assert not (run / ".lock").exists()  # removed at the end


def test_a_lock_taken_on_a_removed_lock_file_is_not_held(tmp_path, monkeypatch):
    """A run opening .lock just before the holder ended (and removed it) locked the removed file, while a
    third run locked the new one: two runs on one folder."""
    import builtins

    import mochi.train.lora_train as T

    with T._run_lock(tmp_path):
        stale = open(tmp_path / ".lock", "a+")  # noqa: SIM115 (opened while the first run held the file)
    third = T._run_lock(tmp_path)  # the first has ended and removed it; a third run takes the new file
    third.__enter__()
    opened = []

    def opening(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        opened.append(path)
        return stale if len(opened) == 1 else builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(T, "open", opening, raising=False)
    with (
        pytest.raises(ValueError, match=rf"in use by another train-lora \(pid {os.getpid()}\)"),
        T._run_lock(tmp_path),
    ):
        pass
    assert len(opened) == 2 and stale.closed  # the removed file was let go and the current one tried
    third.__exit__(None, None, None)
    assert not (tmp_path / ".lock").exists()


def test_sigterm_checkpoints_exits_143_and_a_second_signal_of_either_kind_stops_at_once(
    data, tmp_path, monkeypatch, python_sigint
):
    """SIGTERM during train-lora exited 130 ("interrupted"), and after it a Ctrl-C only set the stop flag
    again instead of interrupting at once."""
    import mochi.cli as cli
    from mochi.errors import Terminated

    out, _ = data
    cfg = LoraTrainConfig(**{**CFG.__dict__, "checkpoint_every": 0})
    real = lora_train.flow_matching_loss
    calls = {"n": 0}

    def sigterm_in_step_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGTERM)  # the step still completes, then the checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_train, "flow_matching_loss", sigterm_in_step_two)
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        with pytest.raises(Terminated, match="stopped after step 2"):
            train_lora(pipe(), out, tmp_path / "cut", cfg, progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.name for p in list_states(tmp_path / "cut")] == ["step-000002.pt"]

    def then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)  # the second signal: Python's handler is back
        return real(*args, **kwargs)

    calls["n"] = 0
    monkeypatch.setattr(lora_train, "flow_matching_loss", then_ctrl_c)
    with pytest.raises(KeyboardInterrupt) as caught:
        train_lora(pipe(), out, tmp_path / "cut2", cfg, progress=False)
    assert not isinstance(caught.value, Terminated) and "stopped after" not in str(caught.value)
    assert list_states(tmp_path / "cut2") == []  # interrupted at once, inside step 2
    assert cli.Terminated is Terminated  # what the CLI turns into "mochi: terminated", exit 143


def test_signals_ignored_by_the_parent_stay_ignored(data, tmp_path, monkeypatch):
    """Started with SIGINT and SIGTERM ignored (nohup, `mochi train-lora ... &` in a script), train-lora
    put its own handlers in: a Ctrl-C meant for the shell's foreground job stopped the run."""
    out, _ = data
    cfg = LoraTrainConfig(**{**CFG.__dict__, "checkpoint_every": 0})
    real = lora_train.flow_matching_loss

    def signals_in_every_step(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_train, "flow_matching_loss", signals_in_every_step)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train_lora(pipe(), out, tmp_path / "run", cfg, progress=False)  # runs to its end
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert (tmp_path / "run" / "lora.safetensors").is_file()


def test_resuming_past_the_asked_steps_is_refused(data, tmp_path):
    """It handed back the later step's LoRA as the run's result, with config.json saying the fewer steps."""
    out, _ = data
    train_lora(pipe(), out, tmp_path / "run", CFG, progress=False)
    fewer = LoraTrainConfig(**{**CFG.__dict__, "steps": CFG.steps - 1})
    from mochi.train.lora_state import ResumeError

    with pytest.raises(ResumeError, match=rf"holds a run at step {CFG.steps}, past --steps {CFG.steps - 1}"):
        train_lora(pipe(), out, tmp_path / "run", fewer, progress=False)


def test_identical_runs_write_identical_state_files(data, tmp_path):
    """torch.save named the zip's entries after the random temporary: the states differed run to run."""
    out, _ = data
    for name in ("a", "b"):
        train_lora(pipe(), out, tmp_path / name, CFG, progress=False)
    states = [sorted((tmp_path / name / "state").glob("step-*.pt")) for name in ("a", "b")]
    assert states[0] and [p.read_bytes() for p in states[0]] == [p.read_bytes() for p in states[1]]


def test_a_kill_between_a_checkpoints_files_or_during_its_samples_loses_neither(data, tmp_path, monkeypatch):
    """The state was written before its lora-step file: a kill between the two left a state whose LoRA file
    never came (a resume continued past it). Samples cut short by a stop or a kill were never rendered: the
    resume started after their step."""
    out, _ = data
    cfg = LoraTrainConfig(**{**CFG.__dict__, "sample_every": 2, "sample_steps": 2})
    whole = tmp_path / "whole"
    train_lora(pipe(), out, whole, cfg, progress=False)
    real = lora_train.save_state

    def killed_at_step_two(out_dir, step, *args, **kwargs):
        if step == 2:
            raise SystemExit("killed")
        return real(out_dir, step, *args, **kwargs)

    monkeypatch.setattr(lora_train, "save_state", killed_at_step_two)
    with pytest.raises(SystemExit):
        train_lora(pipe(), out, tmp_path / "cut", cfg, progress=False)
    monkeypatch.setattr(lora_train, "save_state", real)
    assert (tmp_path / "cut" / "lora-step-000002.safetensors").is_file() and not list_states(tmp_path / "cut")
    cut_short = LoraTrainConfig(**{**cfg.__dict__, "steps": 2})
    train_lora(pipe(), out, tmp_path / "cut", cut_short, progress=False)
    (tmp_path / "cut" / "samples" / "step-000002-1.mp4").unlink()  # as a kill while rendering leaves it
    train_lora(pipe(), out, tmp_path / "cut", cfg, progress=False)
    for name in (
        "lora-step-000002.safetensors",
        "lora.safetensors",
        *(f"samples/step-00000{s}-{i}.mp4" for s in (2, 4) for i in (0, 1)),
    ):
        assert (tmp_path / "cut" / name).read_bytes() == (whole / name).read_bytes(), name


def test_a_stop_during_samples_ends_them_and_the_largest_seed_samples(data, tmp_path):
    """Ctrl-C during sampling waited for every sample; --seed 2**63-1 failed at its second sample (the seed
    plus one was refused), and again at every resume."""
    out, _ = data

    class StopAfterOne:
        calls = 0

        @property
        def requested(self) -> bool:
            StopAfterOne.calls += 1
            return StopAfterOne.calls > 1

    cfg = LoraTrainConfig(**{**CFG.__dict__, "sample_every": 2, "sample_steps": 2, "seed": 2**63 - 1})
    folder = tmp_path / "samples"
    lora_train._write_samples(
        pipe(), ["a", "b"], cfg, {"frames": 7, "width": 32, "height": 32}, folder, 2, True, StopAfterOne()
    )
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002-0.mp4"]
    lora_train._write_samples(pipe(), ["a", "b"], cfg, {"frames": 7, "width": 32, "height": 32}, folder, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002-0.mp4", "step-000002-1.mp4"]


def test_resume_allows_what_changes_no_result_and_says_what_does(data, tmp_path, capsys):
    """--gradient-checkpointing (memory only: the same bytes) could not be turned on to resume a run out of
    memory; a --sigma-shift change was refused under uniform sampling, which never reads it; a changed
    --steps re-spanned the cosine silently; a --warmup not below --steps trained at a fraction of --lr."""
    out, _ = data
    train_lora(pipe(), out, tmp_path / "run", CFG, progress=False)
    more = LoraTrainConfig(
        **{**CFG.__dict__, "steps": CFG.steps + 2, "gradient_checkpointing": True, "sigma_shift": 5.0}
    )
    train_lora(pipe(), out, tmp_path / "run", more, progress=True)
    err = capsys.readouterr().err
    assert (
        f"--steps {CFG.steps + 2} where the run was started with {CFG.steps}: the learning rate's cosine"
        in err
    )
    short = LoraTrainConfig(**{**CFG.__dict__, "warmup": 10, "steps": 4})
    train_lora(pipe(), out, tmp_path / "short", short, progress=True)
    assert "warning: --warmup 10 is not below --steps 4: the learning rate rises for the whole run" in (
        capsys.readouterr().err
    )
    shifted = LoraTrainConfig(**{**CFG.__dict__, "sigma_sampling": "shifted"})
    train_lora(pipe(), out, tmp_path / "shifted", shifted, progress=False)
    other = LoraTrainConfig(**{**shifted.__dict__, "steps": CFG.steps + 2, "sigma_shift": 5.0})
    with pytest.raises(ValueError, match="holds a run with sigma_shift=3.0, not 5.0"):
        train_lora(pipe(), out, tmp_path / "shifted", other, progress=False)
    sigmas = lora_train.sample_sigmas(10000, "shifted", 1000.0, torch.Generator().manual_seed(0))
    assert sigmas.isfinite().all() and sigmas.max() < 1.0


def test_a_run_folder_with_one_checkpoint_is_described_as_a_run(data, tmp_path, capsys):
    """With one lora-step file (after the first checkpoint of a run cut short) `mochi info RUN` called the
    folder a plain LoRA ("use mochi generate PROMPT --lora RUN"), and --lora RUN used that checkpoint."""
    from mochi.weights.lora import read_lora as read

    out, _ = data
    cfg = LoraTrainConfig(**{**CFG.__dict__, "steps": 2, "checkpoint_every": 2, "keep": 1})
    train_lora(pipe(), out, tmp_path / "run", cfg, progress=False)
    (tmp_path / "run" / "lora.safetensors").unlink()  # as a run stopped after its first checkpoint
    assert main(["info", str(tmp_path / "run")]) == 0
    said = capsys.readouterr().out
    assert "train-lora run" in said and "--lora" not in said.split("use")[-1], said
    with pytest.raises(Exception, match="is a train-lora run that has not finished .*lora-step-000002"):
        read(tmp_path / "run")
