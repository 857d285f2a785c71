"""Training the tiny model: every stage runs on a micro config, and an interrupted run resumes exactly."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mochi.models.vae import Decoder, Encoder
from mochi.presets import MODEL_PRESETS, model_preset
from mochi.train import shapes
from mochi.train.checkpoint import load_checkpoint
from mochi.train.export import export_bundle
from mochi.train.train_decoder import (
    DECODER_CHECKPOINT,
    DecoderRecipe,
    Refiner,
    batch_specs,
    contrast_weight,
    decoder_batch,
    grow_decoder,
    refines,
    source_vae,
    train_decoder,
)
from mochi.train.train_dit import (
    DIT_CHECKPOINT,
    TUNE_CACHE_DIR,
    DiTRecipe,
    allowed_caption,
    cache_specs,
    drop_words,
    latent_object_mask,
    latent_stats,
    load_latent_cache,
    load_latent_cache_with_objects,
    partner_caption,
    sample_sigmas,
    train_dit,
    word_consistency_loss,
)
from mochi.train.train_vae import (
    VAE_CHECKPOINT,
    VAERecipe,
    contrast,
    foreground_weights,
    lr_at,
    separation_loss,
    to_pixels,
    train_vae,
    twin_specs,
    vae_batch,
    vae_twins,
)
from mochi.weights.bundle import bundle_config, load_bundle
from mochi.weights.io import read_state_dict

PRESET = model_preset("test-micro")
VAE = VAERecipe(
    steps=2,
    batch=1,
    frames=7,
    clip_frames=13,
    height=16,
    width=16,
    log_every=1,
    checkpoint_every=1,
    encoder_steps=1,
    decoder_steps=1,
    decoder_frames=7,
    tune_steps=1,
)
DIT = DiTRecipe(
    steps=2,
    batch=2,
    cache_clips=3,
    cache_chunk=2,
    frames=7,
    height=16,
    width=16,
    log_every=1,
    checkpoint_every=1,
    tune_steps=1,
    word_dropout=0.5,
    tune_clips=2,
    word_consistency=0.5,
)


class Interrupted(Exception):
    pass


def _interrupt_at(prefix: str):
    """A log callback that kills the run when it logs ``prefix``: the step before is saved, this not."""

    def log(line: str) -> None:
        if line.startswith(prefix):
            raise Interrupted(line)

    return log


def _assert_same(a, b, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path  # NaN == NaN for an unset loss


def _with_vae(folder: Path, vae_out: Path) -> Path:
    """``folder``, created, holding a copy of the module's trained VAE checkpoint (a DiT stage's start)."""
    folder.mkdir()
    shutil.copy(vae_out / VAE_CHECKPOINT, folder / VAE_CHECKPOINT)
    return folder


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    state = train_vae(out, PRESET, VAE, log=lambda line: None)
    return out, state


def test_presets_name_every_component():
    tiny = MODEL_PRESETS["mochi-tiny"]
    assert tiny.tokenizer == "byte" and tiny.text_encoder.vocab_size == 259
    assert tiny.dit.t5_feat_dim == tiny.text_encoder.d_model
    assert tiny.defaults == {
        "frames": 25,
        "height": 64,
        "width": 64,
        "steps": 24,
        "guidance": 2.0,
        "latents": "mean",
        "eta": 1.0,
        "eta_above": 0.3,
    }
    # v2 and the v9 runs (d8) were measured with the Euler sampler: their defaults name no eta.
    euler = {k: v for k, v in tiny.defaults.items() if k not in ("eta", "eta_above")}
    assert MODEL_PRESETS["mochi-tiny-v2"].defaults == {**euler, "guidance": 4.0}
    assert MODEL_PRESETS["mochi-tiny-d8"].defaults == euler
    released = MODEL_PRESETS["mochi-1-preview"]
    assert (released.dit.depth, released.dit.hidden_size_x, released.text_encoder.d_model) == (48, 3072, 4096)
    with pytest.raises(ValueError, match="mochi-tiny"):
        model_preset("mochi-tiyn")


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_sigmas_lie_in_the_open_interval():
    s = sample_sigmas(1000, DiTRecipe(), torch.Generator().manual_seed(0))
    assert s.shape == (1000,) and s.min() > 0 and s.max() < 1
    assert 0.5 < float(s.mean()) < 0.7  # shifted towards high noise (logit mean 0.5)


def test_foreground_weights_mark_the_object_and_its_rim():
    def px(rgb):
        return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1, 1) / 127.5 - 1.0

    pixels = [(15, 15, 15), (17, 14, 15), (100, 100, 100), (21, 15, 15), (220, 40, 40), (60, 60, 60)]
    w = foreground_weights(torch.cat([px(p) for p in pixels], dim=2), 10.0)
    assert w.shape == (1, 1, 6, 1, 1)
    # Within 4/255 of a background colour (black, gray) → 1; the object and blended rim pixels → 11.
    assert w.flatten().tolist() == [1.0, 1.0, 1.0, 11.0, 11.0, 11.0]


def test_decoder_tuning_batches_are_whole_clips():
    recipe = VAERecipe()
    tune = recipe.steps + recipe.decoder_steps
    assert vae_batch(recipe, 0).shape[2] == recipe.frames
    assert vae_batch(recipe, tune - 1).shape[2] == recipe.decoder_frames
    assert vae_batch(recipe, tune).shape[2] == recipe.clip_frames


def test_latent_stats_of_means_or_samples():
    mean = torch.randn(6, 12, 2, 3, 3) * 2 + 1
    logvar = torch.full_like(mean, 2.0)
    m, s = latent_stats(mean, logvar, seed=0, sample=False)
    flat = mean.double().transpose(0, 1).flatten(1)
    torch.testing.assert_close(m, flat.mean(1))
    torch.testing.assert_close(s, flat.std(1))
    _, s_sampled = latent_stats(mean, logvar, seed=0)
    assert bool((s_sampled > s).all())  # the posterior's own noise (std e) adds to the spread


def test_vae_resumes_exactly(vae_run, tmp_path):
    out, uninterrupted = vae_run
    assert uninterrupted["step"] == 4 and uninterrupted["loss"] == uninterrupted["loss"]  # finite, set
    with pytest.raises(Interrupted):
        train_vae(tmp_path, PRESET, VAE, log=_interrupt_at("vae step 2/"))
    at_freeze = load_checkpoint(tmp_path / VAE_CHECKPOINT)
    assert at_freeze["step"] == 1
    resumed = train_vae(tmp_path, PRESET, VAE, log=lambda line: None)
    _assert_same(uninterrupted, resumed)
    # After encoder_steps only the decoder trains: the latent space is final.
    _assert_same(at_freeze["encoder"], resumed["encoder"])
    assert not torch.equal(
        at_freeze["decoder"]["output_proj.weight"], resumed["decoder"]["output_proj.weight"]
    )


def test_drop_words_leaves_out_the_chosen_attributes():
    text = "a red circle moving up on a gray background"
    assert drop_words(text, (False, False, False)) == text
    assert drop_words(text, (True, False, False)) == "a circle moving up on a gray background"
    assert drop_words(text, (False, True, False)) == "a red moving up on a gray background"
    assert drop_words("a red circle moving up", (False, False, True)) == "a red circle"
    assert drop_words("a red circle moving up", (True, True, True)) == "a"
    assert drop_words("", (True, True, True)) == ""


def test_allowed_caption_leaves_out_a_held_out_word():
    keep = (False, False, False)
    assert allowed_caption("a red circle moving up", keep, 0.0) == "a red circle moving up"
    # Two held-out lines (green triangle, triangle moving up): only leaving the shape out breaks both.
    assert allowed_caption("a green triangle moving up", keep, 0.9) == "a green moving up"
    # One line (triangle moving up): the shape or the direction goes, as ``pick`` says.
    assert allowed_caption("a cyan triangle moving up", keep, 0.0) == "a cyan moving up"
    assert allowed_caption("a cyan triangle moving up", keep, 0.6) == "a cyan triangle"
    # Word dropout first; a still held-out rest loses one more word.
    text = "a green triangle moving left on a gray background"
    assert allowed_caption(text, (False, False, True), 0.0) == "a triangle on a gray background"
    assert allowed_caption(text, (False, False, True), 0.7) == "a green on a gray background"
    assert allowed_caption("", (True, True, True), 0.5) == ""


def test_tuning_clips_cover_every_composition():
    recipe = replace(DiTRecipe(), tune_steps=10, tune_clips=50)
    main, tune = cache_specs(recipe)
    assert (main.clips, main.seed, main.allow_heldout) == (recipe.cache_clips, recipe.seed, False)
    assert (tune.folder, tune.clips, tune.seed, tune.allow_heldout) == (
        TUNE_CACHE_DIR,
        50,
        recipe.seed + 1,
        True,
    )
    assert cache_specs(replace(recipe, tune_steps=0)) == (main,)  # no tuning phase, no extra clips
    specs = [shapes.spec_at(tune.seed, i, allow_heldout=True) for i in range(200)]
    held = sum(shapes.is_heldout(shapes.caption(s)) for s in specs)
    assert 40 <= held <= 100  # about 36% of all compositions hold a held-out line
    assert not any(shapes.is_heldout(shapes.caption(shapes.spec_at(tune.seed, i))) for i in range(200))


def test_dit_waits_for_the_final_encoder(tmp_path):
    with pytest.raises(Interrupted):
        train_vae(tmp_path, PRESET, replace(VAE, encoder_steps=2), log=_interrupt_at("vae step 2/"))
    with pytest.raises(ValueError, match="at step 1, but its encoder trains until step 2"):
        train_dit(tmp_path, PRESET, DIT, log=lambda line: None)


def test_dit_resumes_exactly_and_exports(vae_run, tmp_path):
    vae_out, _ = vae_run
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        shutil.copy(vae_out / VAE_CHECKPOINT, d / VAE_CHECKPOINT)
    uninterrupted = train_dit(a, PRESET, DIT, log=lambda line: None)
    mean, logvar, captions = load_latent_cache(a, DIT)
    assert mean.shape == logvar.shape == (3, 12, 2, 2, 2) and len(captions) == 3
    mean, _, captions = load_latent_cache(a, DIT, cache_specs(DIT)[1])
    assert mean.shape == (2, 12, 2, 2, 2) and len(captions) == 2
    assert uninterrupted["step"] == 3
    # The last step is the tuning phase's first: its own warm-up from tune_lr, not the first phase's lr.
    assert uninterrupted["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        lr_at(0, DIT.tune_steps, DIT.tune_lr, DIT.warmup)
    )
    with pytest.raises(Interrupted):
        train_dit(b, PRESET, DIT, log=_interrupt_at("dit step 3/"))
    before_tuning = load_checkpoint(b / DIT_CHECKPOINT)
    assert before_tuning["step"] == 2
    # The tuning phase leaves the first phase as it was: a run without one stops in the same state.
    c = tmp_path / "c"
    c.mkdir()
    shutil.copy(vae_out / VAE_CHECKPOINT, c / VAE_CHECKPOINT)
    _assert_same(before_tuning, train_dit(c, PRESET, replace(DIT, tune_steps=0), log=lambda line: None))
    resumed = train_dit(b, PRESET, DIT, log=lambda line: None)
    _assert_same(uninterrupted, resumed)
    assert not torch.equal(uninterrupted["ema"]["dit.final_layer.linear.weight"], torch.zeros(1))

    path = export_bundle(a, PRESET, tmp_path / "micro.safetensors", dtype=torch.float32)
    components = load_bundle(path)
    assert components.latent_mean == pytest.approx(uninterrupted["latent_mean"])
    assert torch.equal(
        components.dit.final_layer.linear.weight, uninterrupted["ema"]["dit.final_layer.linear.weight"]
    )


def test_another_dit_seed_draws_another_dit_and_a_run_folder_keeps_its_seed(vae_run, tmp_path):
    """`dit --seed N` trains another DiT on the same encoder (another cache, other weights); a run folder
    refuses a seed other than the one its cache and checkpoint were written with."""
    a = _with_vae(tmp_path / "a", vae_run[0])
    b = _with_vae(tmp_path / "b", vae_run[0])
    seeded = replace(DIT, seed=DIT.seed + 3)
    first = train_dit(a, PRESET, DIT, log=lambda line: None)
    other = train_dit(b, PRESET, seeded, log=lambda line: None)
    assert first["seed"] == DIT.seed and other["seed"] == seeded.seed
    assert not torch.equal(load_latent_cache(a, DIT)[0], load_latent_cache(b, seeded)[0])
    key = "dit.final_layer.linear.weight"
    assert not torch.equal(first["ema"][key], other["ema"][key])
    with pytest.raises(
        ValueError, match=f"holds clips of dataset seed {DIT.seed}, but this run asks for seed {seeded.seed}"
    ):
        train_dit(a, PRESET, seeded, log=lambda line: None)
    for spec in cache_specs(DIT):
        shutil.rmtree(a / spec.folder)
    with pytest.raises(
        ValueError,
        match=f"was trained with seed {DIT.seed}, but this run asks for seed {seeded.seed}: give --seed "
        f"{DIT.seed}",
    ):
        train_dit(a, PRESET, seeded, log=lambda line: None)


def test_a_dit_run_resumes_and_exports_only_with_its_preset(vae_run, tmp_path):
    """Another preset's DiT was torch's list of every mismatched tensor, at resume and at export."""
    from mochi.train.checkpoint import load_checkpoint, save_checkpoint
    from mochi.train.train_dit import DIT_CHECKPOINT

    a = _with_vae(tmp_path / "a", vae_run[0])
    train_dit(a, PRESET, DIT, log=lambda line: None)
    deeper = replace(PRESET, dit=replace(PRESET.dit, depth=PRESET.dit.depth + 1))
    named = (
        "was trained with another text_encoder and dit than this preset's (that of --preset test-micro): "
        "give --preset test-micro to "
    )
    with pytest.raises(ValueError, match=re.escape(named + "resume it, or start this preset in another")):
        train_dit(a, deeper, DIT, log=lambda line: None)
    with pytest.raises(ValueError, match=re.escape(named + "export it") + "$"):
        export_bundle(a, deeper, tmp_path / "x.safetensors")
    # A checkpoint written before the configs were recorded: its weights tell, in one line.
    state = load_checkpoint(a / DIT_CHECKPOINT)
    save_checkpoint({k: v for k, v in state.items() if k != "configs"}, a / DIT_CHECKPOINT)
    shape = r"^the DiT of '.*dit\.ckpt' does not fit this preset's \(its weights have other shapes or keys\)"
    with pytest.raises(ValueError, match=shape + ": give the --preset it was trained with, or start"):
        train_dit(a, deeper, DIT, log=lambda line: None)
    with pytest.raises(ValueError, match=shape + ": give the --preset it was trained with$"):
        export_bundle(a, deeper, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_tiny_cli_passes_the_tuning_phase_to_the_dit_recipe(tmp_path, monkeypatch, capsys):
    import mochi.train.train_dit as train_dit_module
    from mochi.train.tiny import main

    seen = {}
    monkeypatch.setattr(train_dit_module, "train_dit", lambda out, preset, recipe, log: seen.update(r=recipe))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the rest of the suite keeps its threads
    argv = ["dit", "--out", str(tmp_path), "--threads", "1", "--steps", "5"]
    main(argv + ["--tune-steps", "7", "--tune-lr", "1e-4", "--word-dropout", "0.1", "--tune-clips", "9"])
    assert seen["r"] == replace(
        DiTRecipe(), steps=5, tune_steps=7, tune_lr=1e-4, word_dropout=0.1, tune_clips=9
    )
    main(argv + ["--no-pooled-caption"])
    assert seen["r"] == replace(DiTRecipe(), steps=5, pooled_caption=False)
    main(argv + ["--pooled-caption", "--word-consistency", "0.5"])
    assert seen["r"] == replace(DiTRecipe(), steps=5, pooled_caption=True, word_consistency=0.5)
    main(argv + ["--object-weight", "3"])
    assert seen["r"] == replace(DiTRecipe(), steps=5, object_weight=3.0)
    main(argv + ["--seed", "5"])  # another DiT on the same encoder
    assert seen["r"] == replace(DiTRecipe(), steps=5, seed=5)
    main(argv + ["--contrast-power", "1"])
    assert seen["r"] == replace(DiTRecipe(), steps=5, contrast_power=1.0)
    main(argv + ["--finish-steps", "4", "--finish-lr", "3e-5", "--finish-logit-mean", "-2"])
    assert seen["r"] == replace(DiTRecipe(), steps=5, finish_steps=4, finish_lr=3e-5, finish_logit_mean=-2.0)
    for extra, message in (
        (["--finish-steps", "-1"], "--finish-steps must be 0 or more, got -1"),
        (["--finish-lr", "0"], "--finish-lr must be above 0, got 0.0"),
        (["--finish-logit-mean", "nan"], "--finish-logit-mean must be a finite number, got nan"),
        (["--init", str(tmp_path / "none.safetensors")], "none.safetensors': no such file"),
    ):
        with pytest.raises(SystemExit):
            main(argv + extra)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["decoder", "--out", str(tmp_path), "--finish-steps", "3"])
    assert "--finish-steps, --finish-lr, --finish-logit-mean and --init are options of the dit stage" in (
        capsys.readouterr().err
    )
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit):
            main(argv + ["--object-weight", bad])
        assert f"--object-weight must be 0 or more, got {float(bad)}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--word-consistency", "-1"])
    assert "--word-consistency must be 0 or more, got -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--out", str(tmp_path), "--no-pooled-caption"])
    assert "--pooled-caption/--no-pooled-caption is an option of the dit stage" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--word-dropout", "0.1"])
    assert "--word-dropout needs --tune-steps N (N > 0): it acts in that phase" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--tune-steps", "3", "--tune-lr", "0"])
    assert "--tune-lr must be above 0, got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--tune-steps", "3", "--word-dropout", "1.5"])
    assert "--word-dropout must lie in [0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["vae", "--out", str(tmp_path), "--tune-steps", "3"])
    assert "--tune-steps is an option of the dit stage" in capsys.readouterr().err
    # Word consistency with the tuning options would act on the first phase's steps too: refused until
    # the first phase has ended (stage 2b is a second command), then taken.
    stage_2b = argv + ["--tune-steps", "3", "--word-consistency", "1"]
    with pytest.raises(SystemExit):
        main(stage_2b)
    assert (
        f"--word-consistency with --tune-steps would act on the first phase too ({tmp_path / 'dit.ckpt'} is "
        "at step 0 of --steps 5): run `dit` without the tuning options first"
    ) in capsys.readouterr().err
    torch.save({"step": 5}, tmp_path / "dit.ckpt")
    main(stage_2b)
    assert seen["r"] == replace(DiTRecipe(), steps=5, tune_steps=3, word_consistency=1.0)


def test_a_run_starts_from_a_bundle_and_finishes_at_low_sigma(vae_run, tmp_path, monkeypatch):
    """--init seeds a run folder from an exported bundle at the end of its tuning phase; the finishing phase
    then trains on (and only it draws) σ centred at finish_logit_mean, with its own learning rate, and an
    interrupted finishing phase resumes exactly."""
    import mochi.train.train_dit as module
    from mochi.train.train_dit import init_from_bundle

    source = _with_vae(tmp_path / "source", vae_run[0])
    train_dit(source, PRESET, DIT, log=lambda line: None)
    bundle = export_bundle(source, PRESET, tmp_path / "b.safetensors", dtype=torch.float32)
    components = load_bundle(bundle)
    recipe = replace(DIT, finish_steps=2, finish_lr=3e-4, finish_logit_mean=-3.0)
    lines = []
    init_from_bundle(tmp_path / "a", PRESET, bundle, recipe, log=lines.append)
    state = load_checkpoint(tmp_path / "a" / DIT_CHECKPOINT)
    assert state["step"] == DIT.steps + DIT.tune_steps == 3 and lines == [
        f"dit: {tmp_path / 'a'} starts from bundle {bundle} at step 3"
    ]
    assert torch.equal(
        state["model"]["dit.final_layer.linear.weight"], components.dit.final_layer.linear.weight
    )
    assert torch.equal(state["ema"]["text_encoder.shared.weight"], components.text_encoder.shared.weight)
    assert state["latent_mean"] == [float(v) for v in components.latent_mean]
    assert torch.equal(
        load_checkpoint(tmp_path / "a" / VAE_CHECKPOINT)["encoder"]["output_proj.weight"],
        components.encoder.output_proj.weight,
    )
    with pytest.raises(ValueError, match=r"holds the VAE of bundle .* run the vae stage in another --out"):
        train_vae(tmp_path / "a", PRESET, VAE, log=lambda line: None)
    centres = []
    real = module.sample_sigmas
    monkeypatch.setattr(
        module, "sample_sigmas", lambda n, r, g: centres.append(r.logit_mean) or real(n, r, g)
    )
    log = []
    finished = train_dit(tmp_path / "a", PRESET, recipe, log=log.append)
    assert centres == [-3.0, -3.0] and finished["step"] == 5
    log = [line for line in log if not line.startswith("latent cache")]
    assert log[0] == f"dit: resumed at step 3 from {tmp_path / 'a' / DIT_CHECKPOINT}"
    assert log[1].startswith("dit step 4/5") and f"lr {lr_at(0, 2, 3e-4, recipe.warmup):.2e}" in log[1]
    assert finished["latent_mean"] == state["latent_mean"]  # the bundle's statistics, kept
    assert not torch.equal(
        finished["ema"]["dit.final_layer.linear.weight"], state["ema"]["dit.final_layer.linear.weight"]
    )
    # Interrupted and resumed, the finishing phase gives the same weights bit for bit.
    init_from_bundle(tmp_path / "b", PRESET, bundle, recipe, log=lambda line: None)
    with pytest.raises(Interrupted):
        train_dit(tmp_path / "b", PRESET, recipe, log=_interrupt_at("dit step 5/"))
    lines.clear()
    init_from_bundle(tmp_path / "b", PRESET, bundle, recipe, log=lines.append)  # a rerun of the command
    assert lines[0].endswith("exists; --init " + str(bundle) + " ignored, resuming")
    _assert_same(finished, train_dit(tmp_path / "b", PRESET, recipe, log=lambda line: None))
    # The first phases never draw the finishing phase's σ.
    centres.clear()
    train_dit(
        _with_vae(tmp_path / "plain", vae_run[0]), PRESET, replace(DIT, tune_steps=0), log=lambda line: None
    )
    assert centres == [DIT.logit_mean] * DIT.steps
    with pytest.raises(
        ValueError, match="does not hold the dit, text_encoder, encoder, decoder of the preset"
    ):
        init_from_bundle(tmp_path / "c", MODEL_PRESETS["mochi-tiny"], bundle, recipe)


def test_a_grown_dit_computes_as_its_source_until_trained(vae_run, tmp_path):
    """--init into a deeper preset inserts blocks with closed gates before the source's last block: the grown
    DiT gives the source's output exactly, and a shallower preset is refused."""
    from mochi.models.dit import AsymmDiT
    from mochi.train.train_dit import grow_dit, init_from_bundle

    torch.manual_seed(1)
    source = AsymmDiT(PRESET.dit).eval()
    for p in source.parameters():  # the zero-initialised output layer would hide any difference
        p.data.normal_(0, 0.2)
    deeper = replace(PRESET.dit, depth=PRESET.dit.depth + 2)
    grown = grow_dit(source, deeper, seed=0).eval()
    assert len(grown.blocks) == len(source.blocks) + 2
    assert not grown.blocks[-1].update_y and all(b.update_y for b in grown.blocks[:-1])
    x, sigma = torch.randn(2, 12, 2, 2, 2), torch.tensor([0.2, 0.9])
    features, mask = torch.randn(2, 5, PRESET.dit.t5_feat_dim), torch.tensor([[True] * 3 + [False] * 2] * 2)
    with torch.no_grad():
        assert torch.equal(grown(x, sigma, features, mask), source(x, sigma, features, mask))
    # Through --init: the grown DiT is the checkpoint's weights and EMA; its new gates then open.
    run = _with_vae(tmp_path / "source", vae_run[0])
    train_dit(run, PRESET, DIT, log=lambda line: None)
    bundle = export_bundle(run, PRESET, tmp_path / "b.safetensors", dtype=torch.float32)
    deep = replace(PRESET, dit=deeper)
    lines = []
    recipe = replace(DIT, finish_steps=1)
    init_from_bundle(tmp_path / "deep", deep, bundle, recipe, log=lines.append)
    assert lines[0] == f"dit: grew the bundle's DiT from depth {PRESET.dit.depth} to {deeper.depth}"
    state = load_checkpoint(tmp_path / "deep" / DIT_CHECKPOINT)
    gate = f"dit.blocks.{PRESET.dit.depth - 1}.mod_x.bias"
    assert (
        state["model"][gate].abs().sum() > 0
        and not state["model"][gate][PRESET.dit.hidden_size_x : 2 * PRESET.dit.hidden_size_x].any()
    )
    finished = train_dit(tmp_path / "deep", deep, recipe, log=lambda line: None)
    assert finished["model"][gate][PRESET.dit.hidden_size_x : 2 * PRESET.dit.hidden_size_x].any()
    with pytest.raises(ValueError, match="has a DiT of depth 2; preset depth 1 cannot hold it"):
        init_from_bundle(
            tmp_path / "shallow", replace(PRESET, dit=replace(PRESET.dit, depth=1)), bundle, recipe
        )


def test_pooled_caption_held_at_zero(vae_run, tmp_path):
    """Without the pooled caption vector its weights are zero in the model and the EMA, from a fresh start
    and when a run that trained them resumes, while everything else trains."""
    vae_out, _ = vae_run
    fresh = tmp_path / "fresh"
    for d in (tmp_path, fresh):
        d.mkdir(exist_ok=True)
        shutil.copy(vae_out / VAE_CHECKPOINT, d / VAE_CHECKPOINT)
    on = replace(DIT, tune_steps=0, steps=1)
    first = train_dit(tmp_path, PRESET, on, log=lambda line: None)
    pool = [k for k in first["model"] if k.startswith("dit.t5_y_embedder.")]
    assert len(pool) == 6 and all(torch.count_nonzero(first["model"][k]) > 0 for k in pool)
    off = train_dit(tmp_path, PRESET, replace(on, steps=2, pooled_caption=False), log=lambda line: None)
    assert off["step"] == 2
    for k in pool:
        assert torch.count_nonzero(off["model"][k]) == 0 and torch.count_nonzero(off["ema"][k]) == 0, k
    moved = "dit.final_layer.linear.weight"
    assert not torch.equal(off["model"][moved], first["model"][moved])
    state = train_dit(fresh, PRESET, replace(on, pooled_caption=False), log=lambda line: None)
    assert all(torch.count_nonzero(state["ema"][k]) == 0 for k in pool)


def test_partner_captions_share_words_and_obey_the_held_out_rule():
    gen = torch.Generator().manual_seed(0)
    texts = ["a blue triangle moving left", "a green circle moving down on a gray background"]
    changed = set()
    for _ in range(200):
        for text in texts:
            partner, shared = partner_caption(text, gen)
            assert partner != text and not shapes.is_heldout(partner)
            assert shapes.parse_caption(partner)["named_background"] == text.endswith("background")
            words, other = text.split(), partner.split()
            same = [k for k in range(len(words)) if words[k] == other[k]]
            assert [text[a : a + n] for a, _, n in shared] == [words[k] for k in same]
            assert [partner[b : b + n] for _, b, n in shared] == [words[k] for k in same]
            changed |= {(text, k) for k in (1, 2, 4) if k not in same}
    assert changed == {(t, k) for t in texts for k in (1, 2, 4)}  # every attribute gets redrawn
    assert partner_caption("", gen) is None and partner_caption("a red moving up", gen) is None


def test_word_consistency_loss():
    f = torch.randn(2, 6, 4)
    g = f.clone()
    pairs = [(0, 1, 2, 3), (1, 0, 0, 2)]  # row 0: tokens 1-3 against 2-4; row 1: tokens 0-1 against 0-1
    g[0, 2:5] = f[0, 1:4]
    assert word_consistency_loss(f, g, pairs) == 0
    g[1, 0] = -f[1, 0]  # |f − g|² = 4|f|² against |f|² + |g|² = 2|f|²: 2 on one of the 5 tokens
    assert word_consistency_loss(f, g, pairs) == pytest.approx(2 / 5)


def test_word_consistency_trains_the_text_encoder(vae_run, tmp_path):
    vae_out, _ = vae_run
    runs = {}
    for weight in (0.0, 1.0):
        out = _with_vae(tmp_path / str(weight), vae_out)
        lines = []
        recipe = replace(DIT, steps=1, tune_steps=0, word_consistency=weight)
        runs[weight] = train_dit(out, PRESET, recipe, log=lines.append)
        assert ("word consistency" in lines[-1]) == bool(weight), lines[-1]
    key = "text_encoder.shared.weight"
    assert not torch.equal(runs[0.0]["model"][key], runs[1.0]["model"][key])
    assert runs[0.0]["loss"] == runs[1.0]["loss"]  # the logged loss is the flow loss alone


def test_training_refuses_a_held_out_partner_caption(vae_run, tmp_path, monkeypatch):
    import mochi.train.train_dit as train_dit_module

    vae_out, _ = vae_run
    shutil.copy(vae_out / VAE_CHECKPOINT, tmp_path / VAE_CHECKPOINT)
    held_out = "a green triangle moving left"
    monkeypatch.setattr(train_dit_module, "partner_caption", lambda text, gen: (held_out, [(0, 0, 1)]))
    with pytest.raises(AssertionError, match=f"training caption '{held_out}' holds a held-out composition"):
        train_dit(
            tmp_path, PRESET, replace(DIT, steps=1, tune_steps=0, caption_dropout=0.0), log=lambda line: None
        )


def test_early_foreground_weight_changes_the_joint_phase_only_when_set(vae_run, tmp_path):
    """Weight 0 is the shipped recipe bit for bit (vae_run); weight 3 trains a different encoder from the
    first step, and resumes exactly all the same."""
    out, plain = vae_run
    recipe = replace(VAE, early_foreground_weight=3.0)
    weighted = train_vae(tmp_path / "a", PRESET, recipe, log=lambda line: None)
    assert not torch.equal(plain["encoder"]["layers.0.weight"], weighted["encoder"]["layers.0.weight"])
    with pytest.raises(Interrupted):
        train_vae(tmp_path / "b", PRESET, recipe, log=_interrupt_at("vae step 2/"))
    _assert_same(weighted, train_vae(tmp_path / "b", PRESET, recipe, log=lambda line: None))


def test_vae_heldout_pixels_draw_held_out_compositions_only_when_set():
    """The v2 recipe's VAE never saw a held-out composition; ``heldout_pixels`` renders them too."""
    plain, held = VAERecipe(batch=1), VAERecipe(batch=1, heldout_pixels=True)
    captions = [shapes.caption(shapes.spec_at(held.seed, i, allow_heldout=True)) for i in range(60)]
    k = next(i for i, c in enumerate(captions) if shapes.is_heldout(c))
    spec = shapes.spec_at(held.seed, k, allow_heldout=True)
    window = vae_batch(held, k)[0]
    start = int(np.random.default_rng([held.seed, k, 7]).integers(0, held.clip_frames - held.frames + 1))
    assert torch.equal(window, to_pixels(shapes.render(spec)[start : start + held.frames]))
    assert not torch.equal(vae_batch(plain, k)[0], window)
    assert not any(shapes.is_heldout(shapes.caption(shapes.spec_at(plain.seed, i))) for i in range(60))


def test_twins_change_the_shape_only_and_keep_held_out_compositions_out():
    """A twin is its clip with another shape (colour, place, motion, background kept), rendered in the
    clip's window; without ``heldout_pixels`` no twin is a held-out composition, and a clip whose every
    other shape would be one has none."""
    recipe = replace(VAE, batch=4, steps=50)
    clips = twins = 0
    for step in range(40):
        specs = batch_specs(recipe, step)
        for spec, twin in zip(specs, twin_specs(recipe, step), strict=True):
            clips += 1
            if twin is None:
                assert all(
                    shapes.is_heldout(shapes.caption(replace(spec, shape=s)))
                    for s in shapes.DEFAULT_VOCAB.shapes
                    if s != spec.shape
                )
                continue
            twins += 1
            assert twin.shape != spec.shape and replace(twin, shape=spec.shape) == spec
            assert not shapes.is_heldout(shapes.caption(twin))
    assert twins > 0.7 * clips
    held = replace(recipe, heldout_pixels=True)
    assert all(t is not None for step in range(10) for t in twin_specs(held, step))
    step = next(s for s in range(40) if None not in twin_specs(recipe, s))
    pixels, empty, keep = vae_twins(recipe, step)
    frames, batch = recipe.frames, vae_batch(recipe, step)
    assert keep == [0, 1, 2, 3] and pixels.shape == batch.shape == empty.shape
    start = int(np.random.default_rng([recipe.seed, step, 7]).integers(0, recipe.clip_frames - frames + 1))
    twin = twin_specs(recipe, step)[0]
    video = shapes.render(twin, recipe.clip_frames, recipe.height, recipe.width)[start : start + frames]
    assert torch.equal(pixels[0], to_pixels(video))
    background = torch.tensor(shapes.BACKGROUNDS[twin.background]) / 127.5 - 1.0
    assert torch.equal(empty[0], background.view(3, 1, 1, 1).expand_as(empty[0]))


def test_separation_loss_is_the_margin_on_the_ratio_to_the_empty_background():
    mean = torch.zeros(2, 1, 1, 1, 2)
    empty = torch.tensor([3.0, 4.0]).view(1, 1, 1, 1, 2).expand(2, 1, 1, 1, 2)  # 5 from each clip
    twin = torch.tensor([[0.0, 1.0], [0.0, 4.0]]).view(2, 1, 1, 1, 2)  # ratios 0.2 and 0.8
    twin.requires_grad_(True)
    loss, ratio = separation_loss(mean, twin, empty, 0.5)
    assert ratio.tolist() == pytest.approx([0.2, 0.8])
    assert float(loss.detach()) == pytest.approx((0.5 - 0.2) / 2)
    loss.backward()
    # Only the clip under the margin is pushed, away from its clip (the gradient of −‖twin‖/5 / 2).
    assert twin.grad.flatten().tolist() == pytest.approx([0.0, -0.1, 0.0, 0.0])


def test_separation_weight_trains_the_encoder_differently_and_resumes_exactly(vae_run, tmp_path):
    """Weight 0 is the plain recipe (vae_run); a weight changes the encoder's first update (the term runs
    in the encoder phase only) and its log line, and a run resumes bit for bit."""
    _, plain = vae_run
    recipe = replace(VAE, separation_weight=1.0, separation_margin=10.0, heldout_pixels=True)
    lines = []
    separated = train_vae(tmp_path / "a", PRESET, recipe, log=lines.append)
    assert not torch.equal(plain["encoder"]["layers.0.weight"], separated["encoder"]["layers.0.weight"])
    assert " sep " in lines[0] and " sep " not in lines[-1]
    with pytest.raises(Interrupted):
        train_vae(tmp_path / "b", PRESET, recipe, log=_interrupt_at("vae step 2/"))
    _assert_same(separated, train_vae(tmp_path / "b", PRESET, recipe, log=lambda line: None))


def test_the_separation_term_encodes_each_empty_background_once(tmp_path, monkeypatch):
    """The empty backgrounds (the ratio's denominator, no gradient) are encoded once each, two at most, not
    once per clip."""
    recipe = replace(
        VAE, batch=6, encoder_steps=2, separation_weight=1.0, separation_margin=10.0, heldout_pixels=True
    )
    unweighed, forward = [], Encoder.forward

    def counted(self, x):
        if not torch.is_grad_enabled():
            unweighed.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(Encoder, "forward", counted)
    train_vae(tmp_path, PRESET, recipe, log=lambda line: None)
    # One encoding of the backgrounds per encoder step, each of its clips' backgrounds once; then the frozen
    # encoder's steps (the decoder phase), one encoding of the batch each.
    seen = [len({twin.background for twin in twin_specs(recipe, step)}) for step in range(2)]
    assert unweighed[:2] == seen and max(seen) <= len(shapes.BACKGROUNDS)
    assert unweighed[2:] == [recipe.batch] * (recipe.steps + recipe.decoder_steps + recipe.tune_steps - 2)


def test_latent_object_mask_marks_the_object_per_latent_frame_and_block():
    video = np.full((13, 16, 16, 3), shapes.BACKGROUNDS["black"], np.uint8)
    video[0, 0:2, 8:10] = 255  # frame 0: latent frame 0, block (0, 1)
    video[5, 9, 1] = 255  # frame 5: latent frame 1 (frames 1-6), block (1, 0)
    video[7, 15, 15] += 3  # within 4/255 of the background: not the object
    mask = latent_object_mask(to_pixels(video[None]), (3, 2, 2))
    assert mask.shape == (1, 1, 3, 2, 2)
    expected = torch.zeros(3, 2, 2)
    expected[0, 0, 1] = expected[1, 1, 0] = 1
    assert torch.equal(mask[0, 0], expected)
    with pytest.raises(ValueError, match=r"do not compress to a latent of 3×3×2"):
        latent_object_mask(to_pixels(video[None]), (3, 3, 2))


def test_contrast_power_weighs_each_clip_of_the_flow_loss(vae_run, tmp_path):
    """contrast^-p per clip: p = 2 changes the update; p → 0 is the plain loss."""
    runs = {}
    for power in (0.0, 1e-9, 2.0):
        out = _with_vae(tmp_path / str(power), vae_run[0])
        recipe = replace(DIT, steps=1, tune_steps=0, contrast_power=power)
        runs[power] = train_dit(out, PRESET, recipe, log=lambda line: None)["model"]
    key = "dit.final_layer.linear.weight"
    assert not torch.allclose(runs[0.0][key], runs[2.0][key], atol=1e-6)
    assert torch.allclose(runs[0.0][key], runs[1e-9][key], atol=1e-6)


def test_vae_contrast_power_weighs_each_clip(tmp_path):
    """The VAE stage's clip weights are the decoder stage's contrast weights of the step's clips; p = 2 trains
    differently, p → 0 as the plain loss."""
    from mochi.train.train_vae import vae_clip_weights

    recipe = replace(VAE, batch=3, contrast_power=2.0)
    specs = [shapes.spec_at(recipe.seed, 5 * 3 + i) for i in range(3)]
    assert vae_clip_weights(recipe, 5).tolist() == pytest.approx(
        [contrast_weight(s.color, s.background, 2.0) for s in specs]
    )
    runs = {}
    for power in (0.0, 1e-9, 2.0):
        state = train_vae(
            tmp_path / str(power), PRESET, replace(recipe, contrast_power=power), log=lambda x: None
        )
        runs[power] = state["decoder"]["output_proj.weight"]
    assert not torch.allclose(runs[0.0], runs[2.0], atol=1e-6) and torch.allclose(
        runs[0.0], runs[1e-9], atol=1e-6
    )


def test_vae_contrast_steps_ends_the_weighting(tmp_path):
    """With ``contrast_steps`` the clip weights are the contrast weights before that step and ones from it;
    a run weighted only for its first step differs from the plain run and from one weighted throughout."""
    from mochi.train.train_vae import vae_clip_weights

    recipe = replace(VAE, batch=3, contrast_power=2.0, contrast_steps=5)
    specs = [shapes.spec_at(recipe.seed, 4 * 3 + i) for i in range(3)]
    assert vae_clip_weights(recipe, 4).tolist() == pytest.approx(
        [contrast_weight(s.color, s.background, 2.0) for s in specs]
    )
    assert vae_clip_weights(recipe, 4).tolist() != [1.0, 1.0, 1.0]
    assert vae_clip_weights(recipe, 5).tolist() == [1.0, 1.0, 1.0]
    runs = {}
    for name, r in {
        "plain": replace(recipe, contrast_power=0.0, contrast_steps=None),
        "first": replace(recipe, contrast_steps=1),
        "all": replace(recipe, contrast_steps=None),
    }.items():
        state = train_vae(tmp_path / name, PRESET, r, log=lambda x: None)
        runs[name] = state["decoder"]["output_proj.weight"]
    assert not torch.allclose(runs["first"], runs["plain"], atol=1e-6)
    assert not torch.allclose(runs["first"], runs["all"], atol=1e-6)


def test_object_weight_trains_differently_and_needs_masks(vae_run, tmp_path):
    """The cache stores each clip's object mask; weight 0 is the plain loss (the other tests), a weight
    changes the update but not the logged flow loss of the first step, and an old cache without masks is
    refused by name."""
    vae_out, _ = vae_run
    runs = {}
    for weight in (0.0, 3.0):
        out = _with_vae(tmp_path / str(weight), vae_out)
        runs[weight] = train_dit(
            out, PRESET, replace(DIT, steps=1, tune_steps=0, object_weight=weight), log=lambda line: None
        )
    _, _, _, masks = load_latent_cache_with_objects(tmp_path / "3.0", DIT)
    assert masks.shape == (3, 1, 2, 2, 2) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks.sum() > 0
    key = "dit.final_layer.linear.weight"
    assert not torch.equal(runs[0.0]["model"][key], runs[3.0]["model"][key])
    assert runs[0.0]["loss"] == runs[3.0]["loss"]  # the logged loss is the unweighted flow loss
    from mochi.weights.io import save_state_dict

    chunk = tmp_path / "3.0" / "latents" / "chunk-0000.safetensors"
    from mochi.weights.io import read_metadata

    sd, meta = read_state_dict(chunk), read_metadata(chunk)
    del sd["object"]
    save_state_dict(sd, chunk, meta)
    (tmp_path / "3.0" / DIT_CHECKPOINT).unlink()
    with pytest.raises(ValueError, match="holds no object masks .* but object_weight is 3.0"):
        train_dit(
            tmp_path / "3.0",
            PRESET,
            replace(DIT, steps=1, tune_steps=0, object_weight=3.0),
            log=lambda line: None,
        )


def test_tiny_cli_passes_the_early_foreground_weight_to_the_vae_recipe(tmp_path, monkeypatch, capsys):
    import mochi.train.train_vae as train_vae_module
    from mochi.train.tiny import main

    seen = {}
    monkeypatch.setattr(
        train_vae_module, "train_vae", lambda out, preset, recipe, log: seen.update(r=recipe, p=preset)
    )
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    main(["vae", "--out", str(tmp_path), "--early-foreground-weight", "3", "--preset", "mochi-tiny-wide-vae"])
    assert seen["r"] == replace(VAERecipe(), early_foreground_weight=3.0)
    assert (
        seen["p"].encoder.channels == [32, 64, 96, 128] and seen["p"].dit == MODEL_PRESETS["mochi-tiny"].dit
    )
    main(["vae", "--out", str(tmp_path), "--checkpoint-every", "25"])
    assert seen["r"] == replace(VAERecipe(), checkpoint_every=25)
    main(["vae", "--out", str(tmp_path), "--heldout-pixels"])
    assert seen["r"] == replace(VAERecipe(), heldout_pixels=True)
    main(["vae", "--out", str(tmp_path), "--contrast-power", "1", "--contrast-steps", "1000"])
    assert seen["r"] == replace(VAERecipe(), contrast_power=1.0, contrast_steps=1000)
    main(["vae", "--out", str(tmp_path), "--seed", "4"])
    assert seen["r"] == replace(VAERecipe(), seed=4)
    main(["vae", "--out", str(tmp_path), "--separation-weight", "0.5", "--separation-margin", "0.4"])
    assert seen["r"] == replace(VAERecipe(), separation_weight=0.5, separation_margin=0.4)
    for argv, message in (
        (["vae", "--seed", "-2"], "--seed must be 0 or more, got -2"),
        (["decoder", "--seed", "4"], "--seed is an option of the vae and dit stages"),
        (["vae", "--contrast-steps", "-1"], "--contrast-steps must be 0 or more, got -1"),
        (["dit", "--contrast-steps", "5"], "--contrast-steps is an option of the vae stage"),
        (["vae", "--contrast-steps", "5"], "--contrast-steps needs --contrast-power P (P > 0)"),
        (
            ["vae", "--contrast-steps", "5", "--contrast-power", "0"],
            "--contrast-steps needs --contrast-power P (P > 0)",
        ),
        (["vae", "--checkpoint-every", "0"], "--checkpoint-every must be 1 or more, got 0"),
        (["vae", "--separation-margin", "0.4"], "--separation-margin needs --separation-weight W (W > 0)"),
        (
            ["vae", "--separation-weight", "1", "--separation-margin", "0"],
            "--separation-margin must be above 0",
        ),
        (["dit", "--separation-weight", "1"], "--separation-weight is an option of the vae stage"),
        (["vae", "--early-foreground-weight", "-1"], "--early-foreground-weight must be 0 or more, got -1.0"),
        (["vae", "--early-foreground-weight", "nan"], "--early-foreground-weight must be 0 or more, got nan"),
        (["vae", "--object-weight", "3"], "--object-weight is an option of the dit stage"),
        (
            ["dit", "--early-foreground-weight", "3"],
            "--early-foreground-weight is an option of the vae stage",
        ),
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err


DECODER = DecoderRecipe(
    steps=2, batch=1, frames=7, clip_frames=13, height=16, width=16, log_every=1, checkpoint_every=1
)


def test_contrast_weights_favour_the_faint_pairs_and_average_one():
    pairs = [(c, b) for c in shapes.COLORS for b in shapes.BACKGROUNDS]
    assert contrast("green", "gray") == pytest.approx(107.70, abs=0.01)
    weights = {pair: contrast_weight(*pair, 2.0) for pair in pairs}
    assert sum(weights.values()) / len(pairs) == pytest.approx(1.0)
    assert max(weights, key=weights.get) == ("green", "gray")
    assert min(weights, key=weights.get) == ("white", "black")
    assert weights["green", "gray"] / weights["white", "black"] == pytest.approx(
        (contrast("white", "black") / contrast("green", "gray")) ** 2
    )
    assert {contrast_weight(*pair, 0.0) for pair in pairs} == {1.0}


def test_decoder_batches_hold_held_out_compositions_unless_told_not_to():
    """The decoder reads no caption, so it trains on the held-out compositions' pixels (the VAE stage's
    decoder never saw a green triangle); --no-heldout-pixels draws as the VAE stage does."""
    recipe = replace(DecoderRecipe(), batch=1)

    def drawn(r):
        return [shapes.spec_at(r.seed, i, allow_heldout=r.heldout_pixels) for i in range(200)]

    with_heldout = drawn(recipe)
    assert any(shapes.is_heldout(shapes.caption(spec)) for spec in with_heldout)
    assert not any(
        shapes.is_heldout(shapes.caption(spec)) for spec in drawn(replace(recipe, heldout_pixels=False))
    )
    # decoder_batch renders exactly those clips.
    spec = with_heldout[3]
    window = decoder_batch(recipe, 3)[0][0]
    start = int(
        np.random.default_rng([recipe.seed, 3, 7]).integers(0, recipe.clip_frames - recipe.frames + 1)
    )
    assert torch.equal(window, to_pixels(shapes.render(spec)[start : start + recipe.frames]))


def test_grown_decoder_decodes_exactly_as_its_source():
    """A full-resolution ResBlock grown onto a decoder without one starts as the identity, bit for bit."""
    cfg = PRESET.decoder
    assert cfg.num_res_blocks[0] == 1
    torch.manual_seed(0)
    source = Decoder(replace(cfg, num_res_blocks=(0, *cfg.num_res_blocks[1:]))).eval()
    grown = grow_decoder(cfg, source.state_dict()).eval()
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in source.parameters())
    z = torch.randn(1, 12, 2, 2, 2)
    with torch.no_grad():
        assert torch.equal(grown(z), source(z))
    # A decoder of another shape is refused with the keys that do not fit.
    other = Decoder(replace(cfg, num_res_blocks=(0, 1, 1, 1, 0))).state_dict()
    with pytest.raises(ValueError, match=r"missing \['blocks.0.1.stack.0.bias', 'blocks.0.1.stack.0.weight'"):
        grow_decoder(cfg, other)


def test_decoder_stage_resumes_exactly_keeps_the_encoder_and_exports(vae_run, tmp_path):
    vae_out, vae_state = vae_run
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        shutil.copy(vae_out / VAE_CHECKPOINT, d / VAE_CHECKPOINT)
    uninterrupted = train_decoder(a, PRESET, DECODER, log=lambda line: None)
    assert uninterrupted["step"] == 2 and "encoder" not in uninterrupted
    assert not torch.equal(
        uninterrupted["decoder"]["output_proj.weight"], vae_state["decoder"]["output_proj.weight"]
    )
    with pytest.raises(Interrupted):
        train_decoder(b, PRESET, DECODER, log=_interrupt_at("decoder step 2/"))
    assert load_checkpoint(b / DECODER_CHECKPOINT)["step"] == 1
    _assert_same(uninterrupted, train_decoder(b, PRESET, DECODER, log=lambda line: None))
    # The first batches are the VAE stage's windows of another dataset seed, held-out compositions excluded.
    (x0, w0), (x1, _) = decoder_batch(DECODER, 0), decoder_batch(DECODER, 1)
    assert x0.shape == (1, 3, 7, 16, 16) and not torch.equal(x0, x1) and w0.tolist() == [1.0]

    # Export takes the sharpened decoder and the VAE stage's encoder.
    shutil.copy(vae_out / VAE_CHECKPOINT, a / VAE_CHECKPOINT)
    train_dit(a, PRESET, replace(DIT, tune_steps=0), log=lambda line: None)
    components = load_bundle(export_bundle(a, PRESET, tmp_path / "micro.safetensors", dtype=torch.float32))
    assert torch.equal(components.decoder.output_proj.weight, uninterrupted["decoder"]["output_proj.weight"])
    assert torch.equal(components.encoder.output_proj.weight, vae_state["encoder"]["output_proj.weight"])


def test_decoder_stage_starts_from_a_bundle(tmp_path):
    """--source may be a mochi bundle: its encoder is frozen, its decoder is where training starts."""
    from mochi.weights.bundle import random_tiny, save_bundle

    components = random_tiny()
    bundle = tmp_path / "b.safetensors"
    save_bundle(components, bundle, dtype=torch.float16)
    preset = MODEL_PRESETS["mochi-tiny-v2"]
    encoder, decoder = source_vae(bundle)
    assert encoder.keys() == components.encoder.state_dict().keys()
    assert decoder["output_proj.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="no VAE source at"):
        train_decoder(tmp_path / "run", preset, DECODER, log=lambda line: None)
    assert preset.encoder == components.encoder.cfg
    state = train_decoder(
        tmp_path / "run", preset, replace(DECODER, steps=1), source=bundle, log=lambda line: None
    )
    assert state["step"] == 1 and state["decoder"].keys() == decoder.keys()
    # Export: the source bundle with the trained decoder; every other tensor as stored (fp16 round trips).
    path = export_bundle(tmp_path / "run", preset, tmp_path / "v.safetensors", source=bundle)
    before, after = read_state_dict(bundle), read_state_dict(path)
    assert before.keys() == after.keys()
    assert bundle_config(path) == {**bundle_config(bundle), "defaults": preset.defaults}
    assert bundle_config(bundle)["defaults"]["guidance"] == 2.0 and preset.defaults["guidance"] == 4.0
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    assert torch.equal(after["decoder.output_proj.weight"], state["decoder"]["output_proj.weight"].half())
    with pytest.raises(ValueError, match="no decoder.ckpt in"):
        export_bundle(tmp_path / "elsewhere", preset, tmp_path / "w.safetensors", source=bundle)
    with pytest.raises(ValueError, match="does not hold the encoder of the preset"):
        export_bundle(
            tmp_path / "run", MODEL_PRESETS["mochi-tiny-v1"], tmp_path / "w.safetensors", source=bundle
        )


def test_refined_steps_are_a_replayable_share():
    recipe = replace(DecoderRecipe(), refine_share=0.5)
    drawn = [refines(recipe, step) for step in range(400)]
    assert 0.4 < sum(drawn) / len(drawn) < 0.6 and drawn == [refines(recipe, s) for s in range(400)]
    assert not any(refines(replace(recipe, refine_share=0.0), s) for s in range(100))
    assert all(refines(replace(recipe, refine_share=1.0), s) for s in range(100))


@pytest.fixture(scope="module")
def dit_run(vae_run, tmp_path_factory):
    """A run folder holding the module's VAE and a DiT trained on it (what a refined decoder stage needs)."""
    out = _with_vae(tmp_path_factory.mktemp("dit") / "run", vae_run[0])
    train_dit(out, PRESET, replace(DIT, tune_steps=0), log=lambda line: None)
    return out


def test_refiner_denoises_as_the_sampler_and_reads_no_held_out_line(dit_run, monkeypatch):
    """A refined latent is the DiT's from the noised code; at σ → 0 it is the code itself. The captions of
    held-out compositions lose a word before the T5 reads them."""
    import mochi.train.train_decoder as module

    recipe = replace(DECODER, refine_share=1.0, heldout_pixels=True)
    step = next(s for s in range(500) if shapes.is_heldout(shapes.caption(batch_specs(recipe, s)[0])))
    specs = batch_specs(recipe, step)
    read = []
    encode = module.encode_prompts
    monkeypatch.setattr(
        module, "encode_prompts", lambda prompts, *a: read.extend(prompts) or encode(prompts, *a)
    )
    refiner = Refiner(dit_run, PRESET, None, recipe)
    x, _ = decoder_batch(recipe, step, whole=True)
    assert x.shape[2] == recipe.clip_frames
    with torch.no_grad():
        code, _ = Encoder(PRESET.encoder).eval()(x)
    refined = refiner.refine(code, specs, step)
    assert refined.shape == code.shape and (refined - code).abs().max() > 1e-2
    assert torch.equal(refined, refiner.refine(code, specs, step))  # seeded by the step
    caption = shapes.caption(specs[0])
    assert read[0] == "" and len(read[1].split()) < len(caption.split())  # the null prompt, then the clip's
    assert not any(shapes.is_heldout(c) for c in read)
    near = Refiner(dit_run, PRESET, None, replace(recipe, refine_sigma=1e-6)).refine(code, specs, step)
    assert torch.allclose(near, code, atol=1e-4)


def test_refined_decoder_stage_trains_differently_and_resumes_exactly(vae_run, dit_run, tmp_path):
    recipe = replace(DECODER, refine_share=0.5, steps=3)
    assert [refines(recipe, s) for s in range(3)] == [True, False, False]
    with pytest.raises(ValueError, match="refine_share 0.5 needs a trained DiT: no dit.ckpt in"):
        train_decoder(_with_vae(tmp_path / "bare", vae_run[0]), PRESET, recipe, log=lambda line: None)
    a, b, plain = (tmp_path / n for n in ("a", "b", "plain"))
    for d in (a, b, plain):
        shutil.copytree(dit_run, d)
    uninterrupted = train_decoder(a, PRESET, recipe, log=lambda line: None)
    with pytest.raises(Interrupted):
        train_decoder(b, PRESET, recipe, log=_interrupt_at("decoder step 2/"))
    _assert_same(uninterrupted, train_decoder(b, PRESET, recipe, log=lambda line: None))
    unrefined = train_decoder(plain, PRESET, replace(recipe, refine_share=0.0), log=lambda line: None)
    assert not torch.equal(
        uninterrupted["decoder"]["output_proj.weight"], unrefined["decoder"]["output_proj.weight"]
    )


def test_tiny_cli_passes_the_decoder_stage_its_source(tmp_path, monkeypatch, capsys):
    import mochi.train.train_decoder as train_decoder_module
    from mochi.train.tiny import main

    seen = {}
    monkeypatch.setattr(
        train_decoder_module,
        "train_decoder",
        lambda out, preset, recipe, source, log: seen.update(r=recipe, s=source),
    )
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    for name in ("x.safetensors", "vae.ckpt"):  # the sources must exist before the stage starts
        (tmp_path / name).touch()
    main(["decoder", "--out", str(tmp_path), "--steps", "9", "--source", str(tmp_path / "x.safetensors")])
    assert seen == {"r": replace(DecoderRecipe(), steps=9), "s": tmp_path / "x.safetensors"}
    main(["decoder", "--out", str(tmp_path), "--contrast-power", "2"])
    assert seen == {"r": replace(DecoderRecipe(), contrast_power=2.0), "s": None}
    main(["decoder", "--out", str(tmp_path), "--no-heldout-pixels"])
    assert seen["r"] == replace(DecoderRecipe(), heldout_pixels=False)
    main(["decoder", "--out", str(tmp_path), "--refine-share", "0.5", "--refine-sigma", "0.3"])
    assert seen["r"] == replace(DecoderRecipe(), refine_share=0.5, refine_sigma=0.3)
    for argv, message in (
        (["decoder", "--contrast-power", "-1"], "--contrast-power must be 0 or more, got -1.0"),
        (["decoder", "--contrast-power", "nan"], "--contrast-power must be 0 or more, got nan"),
        (
            ["export", "--contrast-power", "2"],
            "--contrast-power is an option of the vae, decoder and dit stages",
        ),
        (["decoder", "--refine-share", "1.5"], "--refine-share must lie in [0, 1], got 1.5"),
        (["decoder", "--refine-sigma", "0"], "--refine-sigma must lie in (0, 1], got 0.0"),
        (["dit", "--refine-share", "0.5"], "--refine-share is an option of the decoder stage"),
        (
            ["dit", "--heldout-pixels"],
            "--heldout-pixels/--no-heldout-pixels is an option of the vae and decoder stages",
        ),
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["vae", "--out", str(tmp_path), "--source", "x.safetensors"])
    assert "--source is an option of the decoder and export stages" in capsys.readouterr().err
