"""The mochi bundle: one safetensors file with every component and its configs; the embedded model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mochi.models.dit import AsymmDiT
from mochi.models.t5 import T5Encoder
from mochi.models.tokenizer import ByteTokenizer
from mochi.models.vae import Decoder, Encoder
from mochi.presets import model_preset
from mochi.weights import bundle
from mochi.weights.bundle import is_bundle, load_bundle, load_embedded, save_bundle
from mochi.weights.io import WeightsError, read_keys, read_metadata, read_state_dict, save_state_dict


def _parts(name: str = "test-micro", seed: int = 0) -> dict:
    preset = model_preset(name)
    torch.manual_seed(seed)
    t5 = T5Encoder(preset.text_encoder)
    t5.initialize_weights(torch.Generator().manual_seed(seed))
    return {
        "dit": AsymmDiT(preset.dit),
        "decoder": Decoder(preset.decoder),
        "encoder": Encoder(preset.encoder),
        "text_encoder": t5,
        "defaults": dict(preset.defaults),
        "latent_mean": [0.1 * i for i in range(12)],
        "latent_std": [1.0 + 0.01 * i for i in range(12)],
        "name": "micro",
    }


def test_round_trip_is_bit_exact_with_configs_in_metadata(tmp_path):
    parts = _parts()
    path = tmp_path / "micro.safetensors"
    save_bundle(parts, path)
    meta = read_metadata(path)
    assert meta["format"] == "mochi-bundle"
    config = json.loads(meta["config"])
    assert set(config) == {
        *("dit", "decoder", "encoder", "text_encoder", "tokenizer"),
        *("defaults", "latent_mean", "latent_std", "name"),
    }
    assert config["tokenizer"] == "byte" and config["defaults"] == parts["defaults"]
    assert config["dit"]["hidden_size_x"] == 32 and config["encoder"]["has_attentions"] == [False] * 5
    prefixes = {k.split(".")[0] for k in read_keys(path)}
    assert prefixes == {"dit", "decoder", "encoder", "text_encoder"}
    assert is_bundle(path)

    loaded = load_bundle(path)
    assert isinstance(loaded.tokenizer, ByteTokenizer) and loaded.name == "micro"
    assert loaded.latent_mean == tuple(parts["latent_mean"]) and loaded.latent_std == tuple(
        parts["latent_std"]
    )
    assert loaded.dit.config == parts["dit"].config and loaded.encoder.cfg == parts["encoder"].cfg
    for name in ("dit", "decoder", "encoder", "text_encoder"):
        expected, got = parts[name].state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}.{key}"
            assert got[key].device.type == "cpu"

    # Saving what was loaded gives the same tensors again.
    again = tmp_path / "again.safetensors"
    save_bundle(loaded, again)
    assert read_keys(again) == read_keys(path)


def test_half_storage_keeps_fp32_islands_and_loads_as_fp32(tmp_path):
    path = tmp_path / "half.safetensors"
    save_bundle(_parts(), path, dtype=torch.float16)
    keys = read_keys(path)
    assert keys["dit.pos_frequencies"][0] == "F32" and keys["dit.blocks.0.attn.q_norm_x.weight"][0] == "F32"
    assert (
        keys["dit.blocks.0.attn.qkv_x.weight"][0] == "F16" and keys["decoder.output_proj.weight"][0] == "F16"
    )
    loaded = load_bundle(path)
    assert loaded.dit.blocks[0].attn.qkv_x.weight.dtype == torch.float32


def test_tied_tensors_are_saved_as_copies(tmp_path):
    """safetensors refuses tensors that share memory (API users with tied weights got its RuntimeError)."""
    w = torch.arange(6.0).reshape(2, 3)
    path = tmp_path / "tied.safetensors"
    save_state_dict({"a": w, "b": w, "c": w.t(), "d": w[1]}, path)
    got = read_state_dict(path)
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w)
    assert torch.equal(got["c"], w.t()) and torch.equal(got["d"], w[1])


def test_not_a_bundle(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_state_dict({"x": torch.zeros(2)}, plain)
    assert (
        not is_bundle(plain) and not is_bundle(tmp_path / "missing.safetensors") and not is_bundle(tmp_path)
    )
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert not is_bundle(junk)
    with pytest.raises(WeightsError, match="not a mochi bundle"):
        load_bundle(plain)


def test_strict_loading_names_the_missing_key(tmp_path):
    path = tmp_path / "micro.safetensors"
    save_bundle(_parts(), path)
    sd = read_state_dict(path)
    del sd["decoder.output_proj.weight"]
    broken = tmp_path / "broken.safetensors"
    save_state_dict(sd, broken, read_metadata(path))
    with pytest.raises(WeightsError, match="output_proj.weight"):
        load_bundle(broken)


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"eta": 1.5}, r"config\['defaults'\]\['eta'\]=1.5 must be a number in \[0, 1\]"),
        ({"eta": "1"}, r"config\['defaults'\]\['eta'\]='1' must be a number in \[0, 1\]"),
        ({"eta_above": 1.0}, r"config\['defaults'\]\['eta_above'\]=1.0 must be a number in \[0, 1\)"),
    ],
)
def test_a_bundles_sampler_defaults_are_checked_on_load(tmp_path, defaults, message):
    path = tmp_path / "micro.safetensors"
    save_bundle(
        {**_parts(), "defaults": {**model_preset("test-micro").defaults, "eta": 1.0, "eta_above": 0.3}}, path
    )
    assert (load_bundle(path).defaults["eta"], load_bundle(path).defaults["eta_above"]) == (1.0, 0.3)
    metadata = read_metadata(path)
    config = json.loads(metadata["config"])
    config["defaults"].update(defaults)
    from mochi.weights.io import read_state_dict

    broken = tmp_path / "broken.safetensors"
    save_state_dict(read_state_dict(path), broken, {**metadata, "config": json.dumps(config)})
    with pytest.raises(WeightsError, match=message):
        load_bundle(broken)


def test_save_needs_every_component_and_stats(tmp_path):
    parts = _parts()
    with pytest.raises(ValueError, match="latent_std must be 12 floats"):
        save_bundle({**parts, "latent_std": [1.0] * 3}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="'encoder' is missing"):
        save_bundle({**parts, "encoder": None}, tmp_path / "x.safetensors")


def test_save_refuses_what_no_loader_reads(tmp_path):
    """A name without the .safetensors suffix was written and then read as "not a mochi bundle"; a folder
    failed naming a temporary file."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for path, message in (
        (
            tmp_path / "b.bin",
            f"a bundle is a .safetensors file, got {str(tmp_path / 'b.bin')!r}: name it "
            f"{str(tmp_path / 'b.safetensors')!r}",
        ),
        (tmp_path / "b", f"name it {str(tmp_path / 'b.safetensors')!r}"),
        (
            folder,
            f"{str(folder)!r} is a folder; give the bundle's file name, e.g. "
            f"{str(folder / 'NAME.safetensors')!r}",
        ),
    ):
        with pytest.raises(ValueError) as e:
            save_bundle(_parts(), path)
        assert message in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"] and not any(folder.iterdir())


@pytest.mark.parametrize("mode", ["int8", "fp8", "q8_0", "q4_0"])
def test_save_refuses_quantized_components(tmp_path, mode):
    """The pipeline quantizes its components in place; saved, int8 crashed inside torch and q8_0/q4_0 wrote
    bundles that could not load."""
    from mochi.weights.quantize import quantize_model

    parts = _parts("mochi-tiny")
    assert quantize_model(parts["dit"], mode).layers
    path = tmp_path / "q.safetensors"
    with pytest.raises(
        ValueError,
        match=r"^the dit is quantized \(\d+ layers, e.g. 'blocks.0.\w+'\): .* save the "
        "unquantized model",
    ):
        save_bundle(parts, path)
    assert not path.exists()


def test_load_embedded_gives_the_tiny_preset():
    preset = model_preset("mochi-tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        components = load_embedded()
    if not bundle.embedded_path().is_file():
        assert any(issubclass(w.category, bundle.EmbeddedWeightsMissingWarning) for w in caught)
    assert isinstance(components.tokenizer, ByteTokenizer)
    assert isinstance(components.dit, AsymmDiT) and components.dit.config == preset.dit
    assert isinstance(components.decoder, Decoder) and components.decoder.cfg == preset.decoder
    assert isinstance(components.encoder, Encoder) and components.encoder.cfg == preset.encoder
    assert (
        isinstance(components.text_encoder, T5Encoder)
        and components.text_encoder.config == preset.text_encoder
    )
    assert components.defaults == preset.defaults
    assert len(components.latent_mean) == len(components.latent_std) == 12


def test_missing_embedded_file_warns_and_builds_random_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(bundle, "embedded_path", lambda: tmp_path / "absent.safetensors")
    with pytest.warns(bundle.EmbeddedWeightsMissingWarning, match="RANDOM"):
        components = load_embedded()
    assert components.dit.config == model_preset("mochi-tiny").dit
    # Seeded: two fallbacks are the same model.
    with pytest.warns(bundle.EmbeddedWeightsMissingWarning):
        again = load_embedded()
    assert torch.equal(components.dit.final_layer.linear.weight, again.dit.final_layer.linear.weight)
