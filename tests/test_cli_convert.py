import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mochi.cli import build_parser, main
from mochi.models.dit import AsymmDiT
from mochi.weights.dit import load_dit

from .dit_checkpoints import (
    inputs,
    tiny_model,
    write_comfyui,
    write_fp8_scaled,
    write_genmo,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_genmo_diffusers_genmo_round_trip_is_bit_exact(tmp_path, model, capsys):
    write_genmo(tmp_path / "g", model)
    code, out, _ = _run(
        capsys, "convert", tmp_path / "g", tmp_path / "d", "--to", "diffusers", "--max-shard-size", "20KB"
    )
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'd' / 'transformer'}"
    folder = tmp_path / "d" / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert not list(tmp_path.glob("d/.*"))  # no temporary leftovers

    code, _, _ = _run(capsys, "convert", tmp_path / "d", tmp_path / "back", "--to", "genmo")
    assert code == 0
    a, b = load_file(tmp_path / "g" / "dit.safetensors"), load_file(tmp_path / "back" / "dit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_diffusers_output_loads_in_diffusers(tmp_path, model, capsys):
    from diffusers import MochiTransformer3DModel

    write_genmo(tmp_path / "g", model)
    assert _run(capsys, "convert", tmp_path / "g", tmp_path / "d", "--to", "diffusers")[0] == 0
    assert [p.name for p in sorted((tmp_path / "d" / "transformer").iterdir())] == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    theirs = MochiTransformer3DModel.from_pretrained(tmp_path / "d" / "transformer")
    assert theirs.config.num_layers == model.config.depth
    assert theirs.config.pooled_projection_dim == model.config.hidden_size_y
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in model.parameters())


def test_dtype_option(tmp_path, model, capsys):
    write_genmo(tmp_path / "g", model)
    assert (
        _run(
            capsys, "convert", tmp_path / "g", tmp_path / "o.safetensors", "--to", "genmo", "--dtype", "bf16"
        )[0]
        == 0
    )
    sd = load_file(tmp_path / "o.safetensors")
    for k, v in sd.items():
        assert v.dtype == (torch.float32 if AsymmDiT.is_fp32_param(k) else torch.bfloat16), k
    assert torch.equal(sd["pos_frequencies"], model.pos_frequencies)


def test_fp8_and_all_in_one_to_genmo(tmp_path, model, capsys):
    src = write_fp8_scaled(tmp_path / "aio.safetensors", model, layout="new", rest=torch.float32)
    code, _, _ = _run(capsys, "convert", src, tmp_path / "out", "--to", "genmo")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "decoder.safetensors",
        "dit.safetensors",
        "encoder.safetensors",
    ]
    assert set(load_file(tmp_path / "out" / "decoder.safetensors")) == {
        "blocks.0.0.weight",
        "output_proj.weight",
    }
    x = inputs(model)
    converted = load_dit(tmp_path / "out")
    assert converted.dtype == torch.float32  # fp8 became the dtype of the file's other tensors
    assert torch.equal(converted(*x), load_dit(src, fp8="dequantize")(*x))


def test_existing_output_needs_overwrite(tmp_path, model, capsys):
    src = write_comfyui(tmp_path / "c.safetensors", model)
    assert _run(capsys, "convert", src, tmp_path / "o", "--to", "diffusers")[0] == 0
    code, _, err = _run(capsys, "convert", src, tmp_path / "o", "--to", "diffusers")
    assert code == 2
    target = str(tmp_path / "o" / "transformer")
    assert err == f"mochi: error: {target!r} already exists; remove it or pass --overwrite\n"
    assert _run(capsys, "convert", src, tmp_path / "o", "--to", "diffusers", "--overwrite")[0] == 0


def test_a_full_disk_names_the_output_not_its_temporary_folder(tmp_path, model, capsys, monkeypatch):
    import errno

    import mochi.weights.io

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(mochi.weights.io, "save_file", full)
    src = write_comfyui(tmp_path / "c.safetensors", model)
    code, _, err = _run(capsys, "convert", src, tmp_path / "o", "--to", "diffusers")
    target = tmp_path / "o" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert (code, err) == (2, f"mochi: error: cannot write {str(target)!r}: no space left on the device\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]  # nothing half-made is left


def test_bad_input_is_one_line(tmp_path, capsys):
    code, out, err = _run(capsys, "convert", tmp_path / "nope", tmp_path / "o", "--to", "genmo")
    assert code == 2 and out == ""
    assert err.startswith(
        f"mochi: error: checkpoint {str(tmp_path / 'nope')!r} does not exist; looked for: a Genmo"
    )
    assert err.count("\n") == 1
    code, _, err = _run(capsys, "info", tmp_path)
    assert code == 2 and err.startswith(
        f"mochi: error: folder {str(tmp_path)!r} holds no recognised checkpoint"
    )
    assert err.count("\n") == 1
    code, _, err = _run(
        capsys, "convert", tmp_path, tmp_path / "o", "--to", "diffusers", "--max-shard-size", "big"
    )
    assert (
        code == 2
        and err
        == "mochi: error: --max-shard-size 'big' is not understood; write it like 10GB, 500MB or 20000\n"
    )
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path), str(tmp_path / "o"), "--to", "onnx"])
    assert e.value.code == 2
    assert "argument --to: invalid choice: 'onnx'" in capsys.readouterr().err


def test_options_that_would_do_nothing_and_file_names_for_folders_are_refused(tmp_path, model, capsys):
    src = write_genmo(tmp_path / "g", model)
    cases = [
        # Genmo's layout is one file: the shard size was ignored.
        (["--to", "genmo", "--max-shard-size", "1KB"], "--max-shard-size 1KB applies only to --to diffusers"),
        # A variant of a Genmo folder was ignored.
        (["--to", "genmo", "--variant", "bf16"], "variant 'bf16' applies to diffusers model folders"),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, "convert", src, tmp_path / "o", *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err
    # A .pt DST became a folder named cv.pt.
    code, _, err = _run(capsys, "convert", src, tmp_path / "cv.pt", "--to", "genmo")
    assert code == 2 and "names a .pt file, but convert writes safetensors" in err and "cv.safetensors" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "cv.pt").exists()
    code, _, err = _run(capsys, "info", src, "--variant", "bf16")
    assert code == 2 and "variant 'bf16' applies to diffusers model folders" in err
    # An empty path named the current folder (or the default) silently.
    for argv in (["convert", str(src), "", "--to", "genmo"], ["generate", "x", "--out", ""], ["info", " "]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "is empty; give a value" in capsys.readouterr().err


def test_info(tmp_path, model, capsys):
    path = write_fp8_scaled(tmp_path / "aio.safetensors", model, layout="legacy")
    code, out, _ = _run(capsys, "info", path)
    assert code == 0
    lines = out.splitlines()
    assert lines[1] == (
        "format      comfyui (dit [genmo] fp8 scaled_fp8, vae_decoder [genmo], vae_encoder [genmo], "
        "t5 [transformers])"
    )
    n = sum(p.numel() for p in model.parameters())
    assert lines[2].startswith(f"dit         {n:,} parameters in {len(model.state_dict())} tensors")
    assert "F8_E4M3" in lines[2] and "prefix 'model.diffusion_model.'" in lines[2]
    assert lines[-1].startswith(
        "dit config  (tiny, inferred from shapes) depth=2, patch_size=2, num_heads=2, hidden_size_x=32"
    )
    code, out, _ = _run(capsys, "info", path, "--json")
    info = json.loads(out)
    assert info["format"] == "comfyui" and info["dit_preset"] == "tiny"
    assert info["components"]["dit"]["parameters"] == n
    assert info["components"]["t5"]["prefix"] == "text_encoders.t5xxl.transformer."


def test_info_describes_a_lora_file_as_one(tmp_path, capsys):
    from .test_lora_train import _lora_file

    lora = _lora_file(tmp_path / "style.safetensors")  # Genmo's format, rank 2, alpha 2
    code, out, _ = _run(capsys, "info", lora)
    assert code == 0 and "format      lora (genmo)" in out and "ranks       [2]" in out
    assert f"use         mochi generate PROMPT --lora {lora}" in out
    diffusers = tmp_path / "style_peft.safetensors"
    assert _run(capsys, "convert-lora", lora, diffusers, "--to", "diffusers")[0] == 0
    code, out, _ = _run(capsys, "info", diffusers, "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "lora (diffusers)" and info["alphas"] == [2.0]
    # A layer Mochi's DiT does not have: generate and convert-lora refuse the file, so info does not
    # suggest using it but names the layer.
    tensors = load_file(str(lora)) | {
        "blocks.0.attn.bogus.lora_A": torch.zeros(2, 8),
        "blocks.0.attn.bogus.lora_B": torch.zeros(8, 2),
    }
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    code, out, _ = _run(capsys, "info", tmp_path / "odd.safetensors", "--json")
    info = json.loads(out)
    assert code == 0 and "use" not in info
    assert info["unusable"] == "1 layer(s) that Mochi's DiT does not have: blocks.0.attn.bogus"
    # Anything else keeps the model error.
    (tmp_path / "junk.safetensors").write_bytes(b"{}")
    code, _, err = _run(capsys, "info", tmp_path / "junk.safetensors")
    assert code == 2 and "not a readable safetensors file" in err


def test_info_of_a_peft_lora_counts_the_file_s_own_layers(tmp_path, capsys):
    """8 PEFT layers (to_q/k/v/out.0 of 2 blocks) of rank 4, lora_alpha 8: info says so, not the 4 fused
    Genmo layers of ranks 4 and 12 it once reported (those are shown apart, as applied)."""
    g = torch.Generator().manual_seed(0)
    sd = {
        f"transformer.transformer_blocks.{i}.attn1.{m}.lora_{ab}.weight": torch.randn(shape, generator=g)
        for i in range(2)
        for m in ("to_q", "to_k", "to_v", "to_out.0")
        for ab, shape in (("A", (4, 32)), ("B", (32, 4)))
    }
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8}), "format": "pt"}
    save_file(sd, tmp_path / "peft.safetensors", metadata=meta)
    code, out, _ = _run(capsys, "info", tmp_path / "peft.safetensors", "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "lora (diffusers)"
    assert (info["layers"], info["ranks"], info["alphas"]) == (8, [4], [8.0])
    assert info["applied as"] == "4 Genmo layers (q, k, v fused), ranks [4, 12], alphas [8.0, 12.0]"
    assert info["targets"] == ["qkv_x", "proj_x"]


def test_convert_lora_refuses_to_replace_its_source(tmp_path, capsys):
    """SRC as DST (directly, through a symlink, or as a folder DST whose file is SRC) is refused even with
    --overwrite, as `mochi convert` refuses it; the source is left as it was."""
    from .test_lora_train import _lora_file

    lora = _lora_file(tmp_path / "l.safetensors")
    before = lora.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(lora)
    peft = tmp_path / "peft"
    peft.mkdir()
    assert _run(capsys, "convert-lora", lora, peft, "--to", "diffusers")[0] == 0
    peft_file = peft / "pytorch_lora_weights.safetensors"
    peft_before = peft_file.read_bytes()
    for src, dst, to in (
        (lora, lora, "diffusers"),
        (lora, lora, "genmo"),
        (tmp_path / "link.safetensors", lora, "diffusers"),
        (lora, tmp_path / "link.safetensors", "diffusers"),
        (peft, peft, "diffusers"),
        (peft_file, peft, "diffusers"),
    ):
        code, _, err = _run(capsys, "convert-lora", src, dst, "--to", to, "--overwrite")
        assert code == 2 and "is the source" in err and "--overwrite does not allow this" in err, (src, dst)
    assert lora.read_bytes() == before and peft_file.read_bytes() == peft_before
    # Another file, or a folder DST whose file is not SRC, is written.
    assert _run(capsys, "convert-lora", peft, peft, "--to", "genmo")[0] == 0
    assert (peft / "lora.safetensors").is_file()


def test_convert_lora_of_a_lora_without_the_last_block(tmp_path, capsys):
    """What train-lora --targets proj_y writes (no layer in the last block) converts to diffusers' names;
    --depth, when given, must fit the layers, and applies only to --to diffusers."""
    from mochi.models.lora import LoraLayer
    from mochi.weights.lora import save_lora

    src = save_lora(
        {"blocks.0.attn.proj_y": LoraLayer(torch.randn(4, 32), torch.randn(16, 4), 4.0)},
        tmp_path / "p.safetensors",
    )
    code, out, err = _run(capsys, "convert-lora", src, tmp_path / "d.safetensors", "--to", "diffusers")
    assert code == 0, err
    keys = set(load_file(tmp_path / "d.safetensors"))
    assert keys == {f"transformer.transformer_blocks.0.attn1.to_add_out.lora_{ab}.weight" for ab in "AB"}
    argv = ("convert-lora", src, tmp_path / "e.safetensors", "--to", "diffusers", "--depth", "1")
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "last block of a DiT of depth 1, which has no attn.proj_y" in err
    assert _run(capsys, *argv[:-1], "2")[0] == 0
    code, _, err = _run(
        capsys, "convert-lora", src, tmp_path / "g.safetensors", "--to", "genmo", "--depth", "2"
    )
    assert code == 2 and "--depth 2 applies only to --to diffusers" in err


def test_help_texts(capsys):
    for cmd in ("convert", "info"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--to {genmo,diffusers}",
        "--dtype {fp32,bf16,fp16}",
        "--max-shard-size SIZE",
        "--overwrite",
        "--json",
    ):
        assert flag in out


def test_convert_help_says_the_vae_is_converted_too(capsys):
    # convert writes the VAE as well (decoder/encoder.safetensors, or diffusers' vae/ folder), from any
    # source that holds one; the help said it converted the DiT and only copied all-in-one files' VAE.
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "DiT and the VAE" in out and "DST/vae/" in out and "VAE-only" in out
    assert "convert a checkpoint's DiT and VAE" in " ".join(build_parser().format_help().split())


def test_info_help_names_everything_it_describes(capsys):
    # info describes LoRA files, prepared clips and data folders, train-lora states and run folders too
    # (README); its help named checkpoints only.
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for what in ("LoRA file", "prepare-data", "train-lora", "state file", "run folder"):
        assert what in out


def test_the_default_shard_size_is_diffusers_10gb_in_the_cli_and_the_api():
    """diffusers' max_shard_size "10GB" is decimal (huggingface_hub's parse); the API said 10 GiB."""
    from mochi.cli.weights import _shard_bytes
    from mochi.weights.convert import DEFAULT_SHARD_BYTES

    assert DEFAULT_SHARD_BYTES == _shard_bytes(None) == 10 * 10**9


def test_convert_lora_to_genmo_refuses_layers_the_dit_does_not_have(tmp_path, capsys):
    """Genmo → Genmo copied any layer name (a typo, another model's LoRA) into a file that no DiT takes;
    the diffusers output already failed on such names."""
    from mochi.models.lora import LoraLayer
    from mochi.weights.lora import save_lora

    names = ("blocks.0.attn.proj_y", "blocks.3.attn.qkv_z", "t5_y_embedder.to_kv")
    layers = {name: LoraLayer(torch.randn(4, 32), torch.randn(16, 4), 4.0) for name in names}
    src = save_lora(layers, tmp_path / "p.safetensors")
    code, out, err = _run(capsys, "convert-lora", src, tmp_path / "g.safetensors", "--to", "genmo")
    assert code == 2 and out == "" and not (tmp_path / "g.safetensors").exists()
    assert err == (
        f"mochi: error: {str(src)!r} holds 1 layer that Mochi's DiT does not have (blocks.3.attn.qkv_z); a "
        "Genmo LoRA names Linear layers such as blocks.0.attn.qkv_x or t5_y_embedder.to_kv (nothing was "
        "written)\n"
    )
    del layers["blocks.3.attn.qkv_z"]
    save_lora(layers, src)
    assert _run(capsys, "convert-lora", src, tmp_path / "g.safetensors", "--to", "genmo")[0] == 0
