"""The latent-space diagnostics of issue 20 (mochi.train.latent_probe; benchmarks/latent_probe.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mochi.train import shapes
from mochi.train.latent_probe import ceiling, gain, probe, separation
from mochi.weights.bundle import load_embedded

ROOT = Path(__file__).resolve().parent.parent
GRAY = shapes.Vocab(("green", "red"), ("circle", "square", "triangle"), ("right",), ("gray",))


@pytest.fixture(scope="module")
def v3():
    torch.set_num_threads(1)
    return load_embedded()


def test_separation_and_gain_give_the_documented_figures_of_the_embedded_model(v3):
    """docs/embedded-model.md (v5, v6): v3's green circle and square on gray lie 1.06 apart (red's closest
    pair 5.83), and a green square on gray moves the first latent frame 4.0 per 100 levels (red 26.5)."""
    sep = separation(v3, GRAY)
    rows = {r["color"]: r for r in sep["rows"]}
    assert rows["green"]["pair"] == ["circle", "square"]
    assert rows["green"]["distance"] == pytest.approx(1.06, abs=0.005)
    assert rows["red"]["distance"] == pytest.approx(5.83, abs=0.005)
    assert sep["worst"] == rows["green"] and sep["min"] == rows["green"]["distance"]
    assert sep["min_over_median"] == pytest.approx(sep["min"] / sep["median"])
    g = gain(v3, GRAY)
    per_100 = {r["color"]: r["per_100_levels"] for r in g["rows"]}
    assert per_100["green"] == pytest.approx(4.0, abs=0.05)
    assert per_100["red"] == pytest.approx(26.5, abs=0.05)
    assert g["worst"]["color"] == "green"


def test_probe_from_sigma_zero_is_the_ceiling_and_noise_changes_videos(v3):
    """σ = 0 decodes the normalised code itself, so it judges as the reconstructions do; the rates are
    split by background and, on gray, by colour."""
    prompts = ["a green square moving left on a gray background", "a red triangle moving up"]
    ceil = ceiling(v3, seeds=[1000], prompts=prompts)
    assert ceil["all"]["clips"] == 2 and ceil["black"]["clips"] == 1 and ceil["gray"]["clips"] == 1
    assert set(ceil["gray_by_color"]) == {"green"}
    probed = probe(v3, sigmas=(0.0, 0.3), seeds=[1000], prompts=prompts)
    assert set(probed) == {"0", "0.3"}
    assert probed["0"] == ceil
    assert probed["0.3"]["all"]["clips"] == 2


def test_the_benchmark_refuses_probe_without_a_dit_and_bad_sigmas(tmp_path):
    from mochi.presets import model_preset
    from mochi.train.checkpoint import save_checkpoint
    from mochi.train.train_vae import build_vae

    encoder, decoder = build_vae(model_preset("mochi-tiny"), 0)
    save_checkpoint({"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}, tmp_path / "vae.ckpt")
    script = [sys.executable, str(ROOT / "benchmarks" / "latent_probe.py")]
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([*script, "--sigmas", "1"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "--sigmas must lie in [0, 1), got 1.0" in out.stderr
    ckpt = str(tmp_path / "vae.ckpt")
    out = subprocess.run([*script, ckpt, "--only", "probe"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and f"probe needs a DiT: {ckpt!r} is not a bundle" in out.stderr
