"""`mochi convert` misuse is refused before anything is written; VAE-only checkpoints convert both ways."""

import json

import pytest
import torch
from diffusers import AutoencoderKLMochi
from safetensors.torch import load_file, save_file

from mochi.cli import main
from mochi.weights.bundle import embedded_path
from mochi.weights.vae import load_vae_decoder, load_vae_encoder

from .dit_checkpoints import tiny_model, write_fp8_scaled, write_genmo
from .test_vae_weights import TINY


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _contents(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _refused(tmp_path, model, capsys, argv):
    """A Genmo folder g, an all-in-one file aio.safetensors and g converted to diffusers in d; then
    ``argv`` (paths relative to tmp_path) run, and refused in one line: its output and the files before."""
    write_genmo(tmp_path / "g", model)
    write_fp8_scaled(tmp_path / "aio.safetensors", model, layout="new")
    assert _run(capsys, "convert", tmp_path / "g", tmp_path / "d", "--to", "diffusers")[0] == 0
    before = _contents(tmp_path)
    paths = {1, 2}  # SRC and DST
    code, out, err = _run(capsys, *[tmp_path / a if i in paths else a for i, a in enumerate(argv)])
    assert code == 2 and out == "" and err.count("\n") == 1
    return code, out, err, before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize(
    ("src", "dst", "to"),
    [
        ("g", "g", "genmo"),  # the folder onto itself: dit.safetensors would replace itself
        ("g/dit.safetensors", "g/dit.safetensors", "genmo"),
        ("aio.safetensors", "aio.safetensors", "genmo"),  # an all-in-one file replaced by its DiT alone
        ("d", "d", "diffusers"),  # d/transformer would be replaced while being read
        ("d/transformer", "d", "diffusers"),
    ],
)
def test_dst_equal_to_src_is_refused_even_with_overwrite(tmp_path, model, capsys, src, dst, to, overwrite):
    code, out, err, before = _refused(tmp_path, model, capsys, ["convert", src, dst, "--to", to, *overwrite])
    assert "would replace the source" in err and "--overwrite does not allow this" in err
    assert _contents(tmp_path) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize(
    ("src", "dst", "to", "there"),
    [
        ("g", "g", "diffusers", "genmo"),  # a folder into itself, as the other layout
        ("d", "d", "genmo", "diffusers"),
        ("aio.safetensors", "d", "genmo", "diffusers"),  # into a folder that holds another checkpoint
    ],
)
def test_a_folder_is_never_given_a_second_layout(tmp_path, model, capsys, src, dst, to, there, overwrite):
    """A folder converted into itself as the other layout (or into a folder holding another checkpoint)
    held two layouts without a word, of which a load reads one."""
    code, out, err, before = _refused(tmp_path, model, capsys, ["convert", src, dst, "--to", to, *overwrite])
    assert f"DST {str(tmp_path / dst)!r} already holds a checkpoint ({there}" in err
    assert f"choose a new or empty folder, e.g. {str(tmp_path / (dst + '-' + to))!r}" in err
    assert _contents(tmp_path) == before
    # The same layout again is what --overwrite is for.
    assert _run(capsys, "convert", tmp_path / "g", tmp_path / "d", "--to", "diffusers", "--overwrite")[0] == 0


def test_every_output_is_checked_before_the_first_is_written(tmp_path, model, capsys):
    src = write_fp8_scaled(tmp_path / "aio.safetensors", model, layout="new")
    out = tmp_path / "out"
    out.mkdir()
    (out / "decoder.safetensors").write_bytes(b"mine")  # the second output of three
    code, _, err = _run(capsys, "convert", src, out, "--to", "genmo")
    assert code == 2
    existing = str(out / "decoder.safetensors")
    assert err == f"mochi: error: {existing!r} already exists; remove it or pass --overwrite\n"
    assert _files(out) == ["decoder.safetensors"]  # no dit.safetensors written before the refusal
    assert (out / "decoder.safetensors").read_bytes() == b"mine"


def test_diffusers_into_a_safetensors_name_is_refused(tmp_path, model, capsys):
    write_genmo(tmp_path / "g", model)
    code, _, err = _run(capsys, "convert", tmp_path / "g", tmp_path / "x.safetensors", "--to", "diffusers")
    assert code == 2 and "--to diffusers writes a folder" in err and "names a .safetensors file" in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("to", ["genmo", "diffusers"])
def test_the_embedded_bundle_is_refused_with_the_reason(tmp_path, capsys, to):
    code, _, err = _run(capsys, "convert", embedded_path(), tmp_path / "o", "--to", to)
    assert code == 2 and err.count("\n") == 1
    assert "is a mochi-bundle ('mochi-tiny')" in err and "pool_heads=4" in err
    assert f"mochi generate --model {str(embedded_path())!r}" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """A tiny diffusers VAE saved as diffusers' vae/ folder alone (no transformer/)."""
    torch.manual_seed(0)
    ref = AutoencoderKLMochi(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(root / "hub" / "vae")
    return ref, root


@pytest.mark.parametrize("src", ["hub", "hub/vae"])
def test_a_vae_only_folder_converts_both_ways_bit_exact(vae, tmp_path, capsys, src):
    ref, root = vae
    code, out, _ = _run(capsys, "convert", root / src, tmp_path / "genmo", "--to", "genmo")
    assert code == 0 and out == f"wrote {tmp_path / 'genmo'}\n"
    assert _files(tmp_path / "genmo") == ["decoder.safetensors", "encoder.safetensors"]
    dec, enc = load_vae_decoder(tmp_path / "genmo"), load_vae_encoder(tmp_path / "genmo")
    assert dec.state_dict()["blocks.0.0.weight"].equal(ref.decoder.conv_in.weight)
    # Genmo decoder + encoder files → diffusers vae/ that diffusers itself loads, equal to the original.
    code, out, _ = _run(capsys, "convert", tmp_path / "genmo", tmp_path / "back", "--to", "diffusers")
    assert code == 0 and out == f"wrote {tmp_path / 'back' / 'vae'}\n"
    assert _files(tmp_path / "back") == ["vae", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    theirs = AutoencoderKLMochi.from_pretrained(tmp_path / "back" / "vae")
    a, b = ref.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    written = load_file(tmp_path / "back" / "vae" / "diffusion_pytorch_model.safetensors")
    assert written.keys() == load_file(root / "hub" / "vae" / "diffusion_pytorch_model.safetensors").keys()
    assert enc.state_dict().keys() == load_vae_encoder(tmp_path / "back").state_dict().keys()


def test_a_vae_only_source_into_one_file(vae, tmp_path, capsys):
    _, root = vae
    code, _, _ = _run(capsys, "convert", root / "hub", tmp_path / "vae.safetensors", "--to", "genmo")
    assert code == 0
    keys = load_file(tmp_path / "vae.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"decoder", "encoder"} and "decoder.blocks.0.0.weight" in keys
    ref = load_vae_decoder(root / "hub")
    loaded = load_vae_decoder(tmp_path / "vae.safetensors")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ref.state_dict().items())


def test_nothing_to_convert_is_one_line(tmp_path, capsys):
    from mochi.weights.io import save_state_dict

    save_state_dict(
        {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, tmp_path / "t5.safetensors"
    )
    code, _, err = _run(capsys, "convert", tmp_path / "t5.safetensors", tmp_path / "o", "--to", "genmo")
    assert code == 2 and "holds no DiT and no VAE: nothing to convert" in err


def test_info_reports_the_embedded_bundle_with_its_own_config(capsys):
    from mochi.weights.bundle import bundle_config

    config = bundle_config(embedded_path())
    code, out, _ = _run(capsys, "info", embedded_path())
    lines = out.splitlines()
    assert (
        code == 0 and lines[1] == "format      mochi-bundle 'mochi-tiny' (dit, vae_decoder, vae_encoder, t5)"
    )
    fields = ", ".join(f"{k}={v}" for k, v in config["dit"].items())
    assert f"dit config  (no preset) {fields}" in lines  # before: "comfyui" and pool_heads=8 from shapes
    assert "pool_heads=4" in fields and "mlp_multiple_of=32" in fields
    assert lines[-1].startswith("bundle      tokenizer byte; defaults frames=25, height=64, width=64")
    code, out, _ = _run(capsys, "info", embedded_path(), "--json")
    info = json.loads(out)
    assert info["format"] == "mochi-bundle" and info["dit_config"] == config["dit"]
    parts = {
        k: {f: list(v) if isinstance(v, tuple) else v for f, v in c.items()}
        for k, c in info["bundle"]["parts"].items()
    }
    assert parts == {k: config[k] for k in ("dit", "decoder", "encoder", "text_encoder")}
    assert info["bundle"]["defaults"] == config["defaults"] and info["bundle"]["name"] == "mochi-tiny"


@pytest.mark.parametrize("existing", [False, True])
def test_a_part_that_fails_takes_the_parts_written_before_it_away(tmp_path, model, capsys, existing):
    # The test file's VAE is not the released size, so diffusers' VAE config cannot describe it: the
    # conversion fails at the VAE, after the DiT's folder was written.
    src = write_fp8_scaled(tmp_path / "aio.safetensors", model, layout="new")
    dst = tmp_path / "d"
    if existing:
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    code, out, err = _run(capsys, "convert", src, dst, "--to", "diffusers")
    assert code == 2 and "does not fit the model" in err and "vae_decoder" in err
    # The transformer folder written first is gone again; a folder the user had keeps what it held.
    assert _files(tmp_path) == (["aio.safetensors", "d", "d/notes.txt"] if existing else ["aio.safetensors"])


def _damaged(tmp_path, model, change):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    change(sd)
    (tmp_path / "src").mkdir()
    save_file(sd, tmp_path / "src" / "dit.safetensors")
    return tmp_path / "src"


def _drop(key):
    return lambda sd: sd.pop(key)


def _retype(key, dtype):
    return lambda sd: sd.update({key: sd[key].to(dtype)})


DAMAGE = {
    "missing": (_drop("blocks.1.attn.qkv_x.weight"), "1 missing: blocks.1.attn.qkv_x.weight"),
    "unexpected": (lambda sd: sd.update({"foo.bar": torch.zeros(3)}), "1 unexpected: foo.bar"),
    "mis-shaped": (
        lambda sd: sd.update(
            {"blocks.0.attn.qkv_x.weight": sd["blocks.0.attn.qkv_x.weight"][:, :10].clone()}
        ),
        "1 mis-shaped: blocks.0.attn.qkv_x.weight: checkpoint (96, 10) vs model (96, 32)",
    ),
    "integer": (_retype("blocks.0.attn.qkv_x.weight", torch.int32), "blocks.0.attn.qkv_x.weight is int32"),
}


@pytest.mark.parametrize("to", ["genmo", "diffusers"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_dit_that_would_not_load_is_not_converted(tmp_path, model, capsys, damage, to):
    """convert wrote every one of these (exit 0), and each output then failed to load."""
    change, message = DAMAGE[damage]
    src = _damaged(tmp_path, model, change)
    code, out, err = _run(capsys, "convert", src, tmp_path / "out", "--to", to)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "does not fit the model" in err and message in err
    assert not (tmp_path / "out").exists()
    if damage != "integer":  # headers only: info reads no tensor, so it says what would not load
        assert _run(capsys, "info", src)[0] == 0
        info = json.loads(_run(capsys, "info", src, "--json")[1])
        assert info["dit_preset"] is None and message in info["dit_problem"]
        assert f"{message}; it would not load" in _run(capsys, "info", src)[1]


def test_a_dit_holding_nan_or_overflowing_the_dtype_asked_for_is_not_converted(tmp_path, model, capsys):
    """A NaN in the source, or a value beyond fp16's range with --dtype fp16, was written (exit 0) into a
    DiT that load then refused as non-finite."""
    key = "blocks.0.attn.proj_x.bias"
    src = _damaged(tmp_path, model, lambda sd: sd[key].view(-1)[0].fill_(float("nan")))
    code, out, err = _run(capsys, "convert", src, tmp_path / "out", "--to", "diffusers")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "holds NaN or infinite values in 1 of" in err and f"({key}) read (it is damaged" in err
    assert not (tmp_path / "out").exists()
    big = tmp_path / "big"
    big.mkdir()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[key].view(-1)[0] = 1e6
    save_file(sd, big / "dit.safetensors")
    code, out, err = _run(
        capsys, "convert", big, tmp_path / "big16.safetensors", "--to", "genmo", "--dtype", "fp16"
    )
    assert code == 2 and f"({key}) read as float16 (values beyond its range overflow: use --dtype bf16" in err
    assert not (tmp_path / "big16.safetensors").exists()
    assert (
        _run(capsys, "convert", big, tmp_path / "big_bf16.safetensors", "--to", "genmo", "--dtype", "bf16")[0]
        == 0
    )


def test_heads_that_disagree_with_the_widths_are_named(tmp_path, model, capsys):
    """info and convert accepted 3 heads of 16 on a 32-wide DiT; plan failed inside einops."""
    src = _damaged(tmp_path, model, lambda sd: sd.update({"pos_frequencies": torch.zeros(3, 3, 8)}))
    for argv in (
        ["info", src],
        ["convert", src, tmp_path / "out", "--to", "diffusers"],
        ["plan", "--gpu-memory", "24GB", "--model", src, "--frames", "7", "--width", "64", "--height", "64"],
    ):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1, argv
        assert "'pos_frequencies' (3, 3, 8) gives 3 heads of 16 (48 wide)" in err
        assert "a visual width of 32" in err and "they disagree" in err


def test_plan_on_a_checkpoint_without_a_dit_is_one_line(vae, tmp_path, capsys):
    """It was a KeyError traceback from formats.component_keys."""
    code, _, err = _run(capsys, "plan", "--gpu-memory", "24GB", "--model", vae[1] / "hub")
    assert code == 2 and err.count("\n") == 1 and "holds no DiT; it holds: vae_decoder" in err


def test_a_bf16_round_trip_keeps_every_dtype(tmp_path, model, capsys):
    """The fp32 islands (pos_frequencies, the q/k norms) came back fp32 from bf16 files: the help says the
    dtype is kept as stored and a round trip is bit-exact."""
    from .dit_checkpoints import write_comfyui, write_diffusers

    write_diffusers(tmp_path / "d", model, variant="bf16")
    assert _run(capsys, "convert", tmp_path / "d", tmp_path / "g", "--to", "genmo")[0] == 0
    assert _run(capsys, "convert", tmp_path / "g", tmp_path / "back", "--to", "diffusers")[0] == 0
    original = {}
    for f in sorted((tmp_path / "d" / "transformer").glob("*.safetensors")):
        original.update(load_file(f))
    back = {}
    for f in sorted((tmp_path / "back" / "transformer").glob("*.safetensors")):
        back.update(load_file(f))
    assert original.keys() == back.keys()
    assert all(original[k].dtype == back[k].dtype == torch.bfloat16 for k in original)
    assert all(torch.equal(original[k], back[k]) for k in original)
    comfy = write_comfyui(tmp_path / "c.safetensors", model)
    assert _run(capsys, "convert", comfy, tmp_path / "cg.safetensors", "--to", "genmo")[0] == 0
    written = load_file(tmp_path / "cg.safetensors")
    assert {v.dtype for v in written.values()} == {torch.bfloat16}
    # A dtype asked for still keeps the islands fp32 (what the model computes with).
    assert (
        _run(capsys, "convert", comfy, tmp_path / "c16.safetensors", "--to", "genmo", "--dtype", "fp16")[0]
        == 0
    )
    written = load_file(tmp_path / "c16.safetensors")
    assert (
        written["pos_frequencies"].dtype == torch.float32
        and written["x_embedder.proj.weight"].dtype == torch.float16
    )


def test_destination_mistakes_are_named(tmp_path, model, capsys):
    src = write_genmo(tmp_path / "g", model)
    (tmp_path / "afile").write_text("hi")
    for to in ("genmo", "diffusers"):
        code, _, err = _run(capsys, "convert", src, tmp_path / "afile", "--to", to, "--overwrite")
        assert code == 2 and f"DST '{tmp_path / 'afile'}' is an existing file that is not .safetensors" in err
    assert (tmp_path / "afile").read_text() == "hi"
    # An upper-case suffix names a file as a lower-case one does (it made a folder named Y.SAFETENSORS).
    assert _run(capsys, "convert", src, tmp_path / "Y.SAFETENSORS", "--to", "genmo")[0] == 0
    assert (tmp_path / "Y.SAFETENSORS").is_file()
    assert (
        "names a .safetensors file"
        in _run(capsys, "convert", src, tmp_path / "Z.SafeTensors", "--to", "diffusers")[2]
    )


def test_an_all_in_one_file_into_one_file_says_the_vae_is_left_out(tmp_path, model, capsys):
    src = write_fp8_scaled(tmp_path / "aio.safetensors", model, layout="new")
    code, out, _ = _run(capsys, "convert", src, tmp_path / "dit.safetensors", "--to", "genmo")
    assert code == 0 and "holds a VAE too (vae_decoder, vae_encoder), which a single .safetensors DST" in out


def test_a_lora_given_to_convert_points_to_convert_lora(tmp_path, capsys):
    from mochi.weights.lora import save_lora

    from .test_lora import random_lora

    save_lora(random_lora(tiny_model()), tmp_path / "l.safetensors")
    code, _, err = _run(capsys, "convert", tmp_path / "l.safetensors", tmp_path / "out", "--to", "diffusers")
    assert code == 2 and err == (
        f"mochi: error: '{tmp_path / 'l.safetensors'}' is a LoRA, which convert does not take; use: "
        f"mochi convert-lora {tmp_path / 'l.safetensors'} {tmp_path / 'out'} --to diffusers\n"
    )


def test_info_counts_the_bytes_of_every_dtype(tmp_path, model, capsys):
    """Float64 (and every dtype missing from a table) was counted as 4 bytes per value."""
    (tmp_path / "f64").mkdir()
    save_file({k: v.double() for k, v in model.state_dict().items()}, tmp_path / "f64" / "dit.safetensors")
    info = json.loads(_run(capsys, "info", tmp_path / "f64", "--json")[1])
    n = sum(v.numel() for v in model.state_dict().values())
    assert info["components"]["dit"]["bytes"] == 8 * n


def test_info_takes_the_embedded_models_name_as_records_write_it(capsys):
    names = (embedded_path(), "embedded:mochi-tiny")
    by_path, by_name = (_run(capsys, "info", m, "--json")[1] for m in names)
    assert json.loads(by_name) == json.loads(by_path)
    code, _, err = _run(capsys, "info", "embedded:tiny")
    assert code == 2 and err.endswith(
        "info 'embedded:tiny' names no embedded model; the one packaged is 'embedded:mochi-tiny'\n"
    )


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_one_vae_part_into_diffusers_says_the_other_is_missing(vae, tmp_path, capsys, part):
    """diffusers' AutoencoderKLMochi builds the part a vae/ folder lacks at random (with a warning only)."""
    _, root = vae
    assert _run(capsys, "convert", root / "hub", tmp_path / "genmo", "--to", "genmo")[0] == 0
    other = "encoder" if part == "decoder" else "decoder"
    (tmp_path / "genmo" / f"{other}.safetensors").unlink()
    code, out, _ = _run(capsys, "convert", tmp_path / "genmo", tmp_path / "back", "--to", "diffusers")
    assert code == 0 and out.splitlines() == [
        f"mochi: note: {tmp_path / 'genmo'} holds no VAE {other}, so vae/ holds the {part} alone: diffusers' "
        f"AutoencoderKLMochi would make up a random {other} for it (with a warning); mochi loads vae/ as the "
        f"{part} only",
        f"wrote {tmp_path / 'back' / 'vae'}",
    ]
    keys = load_file(tmp_path / "back" / "vae" / "diffusion_pytorch_model.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {part}
