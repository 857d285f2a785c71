"""GGUF Q8_0/Q4_0: blocks bit-exact against the gguf package, Kijai's safetensors files, .gguf files,
`mochi convert --quantize`, `mochi info`, and the errors for block types mochi cannot run."""

import contextlib
import gc
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mochi.cli import main
from mochi.weights import ggml
from mochi.weights.bundle import load_embedded
from mochi.weights.dit import load_dit
from mochi.weights.formats import detect
from mochi.weights.io import WeightsError

from .gguf_files import block_layers, write_gguf, write_kijai

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402


@pytest.fixture(scope="module")
def embedded():
    return load_embedded()


@pytest.fixture(scope="module")
def sd(embedded):
    return {k: v.detach().clone().contiguous() for k, v in embedded.dit.state_dict().items()}


def _weights() -> torch.Tensor:
    """(48, 256) bf16-representable values with the edge cases: a zero block, a tie for the largest
    magnitude (+m and −m), a block whose largest value is positive, tiny and huge scales."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g) * 0.05
    w[0, :32] = 0
    w[1, 3], w[1, 7] = -0.5, 0.5
    w[2, :32] = torch.linspace(-0.1, 0.3, 32)
    w[3] *= 1e-4
    w[4] *= 1e3
    return w.to(torch.bfloat16).float()


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_blocks_are_bit_exact_against_gguf(kind):
    w = _weights()
    ours = ggml.quantize(w, kind)
    theirs = quants.quantize(w.numpy(), T[kind])
    assert ours.dtype == torch.uint8 and ours.shape == (48, 256 // 32 * ggml.BLOCK_BYTES[kind])
    assert np.array_equal(ours.numpy(), theirs)
    deq = ggml.dequantize(ours, kind)
    assert deq.dtype == torch.float32 and deq.shape == (48, 256)
    assert np.array_equal(deq.numpy(), quants.dequantize(theirs, T[kind]))
    # In a compute dtype: the fp32 value rounded once.
    assert torch.equal(ggml.dequantize(ours, kind, torch.bfloat16), deq.to(torch.bfloat16))
    # Error bound: Q8_0 rounds to the nearest step d = max/127, Q4_0 (d = max/8) within a step (the top
    # value is clamped from +8 to +7); storing d in fp16 moves each value by at most |q|·|d − fp16(d)|.
    step, top = (127, 0.5) if kind == "Q8_0" else (8, 1.0)
    d = w.reshape(-1, 32).abs().amax(1, keepdim=True) / step
    d16 = d.half().float()
    err = (deq - w).reshape(-1, 32).abs()
    assert (err <= top * d + step * (d - d16).abs() + 1e-7 * d).all()


def test_q4_0_nibble_order():
    # Weights 0-15 in the low nibbles of bytes 2..17, weights 16-31 in the high nibbles.
    w = torch.cat([torch.full((16,), -8.0), torch.full((16,), 7.0)]).reshape(1, 32)  # d = 1 exactly
    q = ggml.quantize(w, "Q4_0")[0]
    assert q[:2].view(torch.float16).item() == 1.0
    assert q[2:].tolist() == [0x00 | (15 << 4)] * 16
    assert ggml.dequantize(q.reshape(1, 18), "Q4_0").tolist() == w.tolist()


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_kijai_file_loads_quantized_and_equals_its_dequantization(tmp_path, embedded, sd, kind):
    path = write_kijai(tmp_path / f"mochi_preview_dit_GGUF_{kind}.safetensors", sd, kind, torch.float32)
    det = detect(path)
    assert det.quant["dit"] == f"gguf {kind}" and det.describe() == f"genmo (dit [genmo] gguf {kind})"
    stored = load_file(path)
    kept = load_dit(path, config=embedded.dit.config)
    widened = load_dit(path, config=embedded.dit.config, fp8="dequantize")
    layers = block_layers(sd)
    for name in layers:
        m = kept.get_submodule(name)
        assert isinstance(m, ggml.GgufLinear) and m.kind == kind
        assert torch.equal(m.qweight, stored[f"{name}.{kind}_qweight"])  # kept as stored, no copy in fp32
        w = widened.get_submodule(name).weight
        assert type(widened.get_submodule(name)) is torch.nn.Linear and w.dtype == torch.float32
        assert torch.equal(w, ggml.dequantize(m.qweight, kind))
    assert kept.final_layer.linear.weight.dtype == torch.float32  # not quantized in the file
    x = (
        torch.randn(1, 12, 3, 8, 8),
        torch.tensor([0.4]),
        torch.randn(1, 6, 64),
        torch.ones(1, 6, dtype=torch.bool),
    )
    assert torch.equal(kept(*x), widened(*x))
    ref = embedded.dit(*x)
    err = ((kept(*x) - ref).norm() / ref.norm()).item()
    assert 0 < err < (0.02 if kind == "Q8_0" else 0.15)


def test_gguf_files_with_genmo_and_diffusers_names(tmp_path, embedded, sd, monkeypatch):
    from mochi.weights import gguf_file
    from mochi.weights.keymaps.dit_diffusers import genmo_to_diffusers

    cfg = embedded.dit.config
    kijai = load_dit(write_kijai(tmp_path / "k.safetensors", sd, "Q8_0", torch.float32), config=cfg)
    genmo = write_gguf(tmp_path / "g.gguf", sd, {f"{n}.weight": "Q8_0" for n in block_layers(sd)})
    diff_sd = genmo_to_diffusers(sd)
    quantized = {
        k: "Q8_0"
        for k, t in diff_sd.items()
        if k.startswith("transformer_blocks.")
        and k.endswith(".weight")
        and t.ndim == 2
        and t.shape[1] % 32 == 0
    }
    diffusers = write_gguf(tmp_path / "d.gguf", diff_sd, quantized)
    assert detect(genmo).describe() == "gguf (dit [genmo] gguf Q8_0)"
    assert detect(diffusers).describe() == "gguf (dit [diffusers] gguf Q8_0)"
    x = (
        torch.randn(1, 12, 3, 8, 8),
        torch.tensor([0.6]),
        torch.randn(1, 5, 64),
        torch.ones(1, 5, dtype=torch.bool),
    )
    want = kijai(*x)
    parses = []
    original = gguf.GGUFReader.__init__
    monkeypatch.setattr(
        gguf.GGUFReader, "__init__", lambda self, *a, **k: parses.append(a[0]) or original(self, *a, **k)
    )
    for path in (genmo, diffusers):
        gguf_file._parsed.cache_clear()
        model = load_dit(path, config=cfg)
        assert parses.count(path) == 1  # the header is parsed once per load, not per reader call
        # q/k/v fused from three quantized diffusers tensors: the blocks' rows, concatenated as bytes.
        assert isinstance(model.blocks[0].attn.qkv_x, ggml.GgufLinear)
        assert torch.equal(model.blocks[0].attn.qkv_x.qweight, kijai.blocks[0].attn.qkv_x.qweight)
        assert torch.equal(model(*x), want)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self (Linux)")
def test_a_loaded_gguf_file_is_neither_mapped_nor_held_open(tmp_path, embedded, sd):
    # The parsed header is cached for the next load; the gguf reader was, with its memory map of the whole
    # file and an open descriptor: the pages a load read through the map stayed resident after the model
    # was deleted (a 602 MB file: VmRSS +602 MB), and a deleted file kept its disk space.
    path = write_gguf(tmp_path / "g.gguf", sd, {f"{n}.weight": "Q8_0" for n in block_layers(sd)})
    want = load_dit(
        write_kijai(tmp_path / "k.safetensors", sd, "Q8_0", torch.float32), config=embedded.dit.config
    )
    model = load_dit(path, config=embedded.dit.config)
    gc.collect()
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(path))]
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the listing's own descriptor is closed by now
            held += [fd.name] if os.readlink(fd) == str(path) else []
    assert mapped == [] and held == []
    assert torch.equal(model.blocks[0].attn.qkv_x.qweight, want.blocks[0].attn.qkv_x.qweight)


def test_unknown_block_type_is_one_line(tmp_path, sd):
    bad = dict(sd)
    w = bad.pop("blocks.0.attn.qkv_x.weight")
    bad["blocks.0.attn.qkv_x.Q5_K_qweight"] = torch.zeros(w.shape[0], 176, dtype=torch.uint8)
    save_file(bad, tmp_path / "q5k.safetensors")
    with pytest.raises(
        WeightsError,
        match=r"^GGUF block type 'Q5_K' \(blocks.0.attn.qkv_x.Q5_K_qweight\) is not "
        r"supported; mochi reads Q8_0, Q4_0",
    ) as e:
        load_dit(tmp_path / "q5k.safetensors")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_a_block_with_an_infinite_scale_is_refused_at_load(tmp_path, sd, kind):
    """The blocks stay quantized, so before, the damaged scale was only met in sampling (NaN video)."""
    from mochi.finite import NonFiniteError

    path = write_kijai(tmp_path / "q.safetensors", sd, kind)
    assert load_dit(path) is not None
    t = load_file(path)
    key = next(k for k in t if k.endswith(f"proj_x.{kind}_qweight"))
    assert torch.isfinite(ggml.block_scales(t[key], kind).float()).all()
    t[key] = t[key].clone()
    t[key][0, :2] = torch.tensor([float("inf")], dtype=torch.float16).view(torch.uint8)
    assert ggml.block_scales(t[key], kind)[0, 0].item() == float("inf")
    save_file(t, path)
    with pytest.raises(NonFiniteError, match=f"NaN or infinite values in 1 of .*{key}"):
        load_dit(path)


def test_blocks_stored_wider_than_bytes_are_refused(tmp_path, sd):
    t = load_file(write_kijai(tmp_path / "q.safetensors", sd, "Q8_0"))
    key = next(k for k in t if k.endswith("proj_x.Q8_0_qweight"))
    save_file({**t, key: t[key].to(torch.int16)}, tmp_path / "q16.safetensors")
    with pytest.raises(WeightsError, match=rf"1 not bytes: {key} is int16 \(quantized blocks are uint8\)"):
        load_dit(tmp_path / "q16.safetensors")


def test_unknown_block_type_in_cli(tmp_path, sd, capsys):
    g = write_gguf(tmp_path / "q41.gguf", sd, {"blocks.1.mlp_x.w1.weight": "Q4_1"})
    assert main(["info", str(g)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mochi: error: GGUF block type 'Q4_1'") and "\n" not in err


@pytest.mark.parametrize("mode", ["q8_0", "q4_0"])
def test_convert_writes_kijai_layout_and_it_generates(tmp_path, embedded, sd, mode, capsys):
    from mochi.pipeline import MochiPipeline
    from mochi.request import GenerationRequest

    kind = mode.upper()
    save_file(sd, tmp_path / "dit.safetensors")
    dst = tmp_path / f"dit_{mode}.safetensors"
    assert (
        main(["convert", str(tmp_path / "dit.safetensors"), str(dst), "--to", "genmo", "--quantize", mode])
        == 0
    )
    assert capsys.readouterr().out.strip() == f"wrote {dst}"
    written = load_file(dst)
    layers = block_layers(sd)
    assert {k for k in written if k.endswith("_qweight")} == {f"{n}.{kind}_qweight" for n in layers}
    for n in layers:  # the gguf package's quantizer, byte for byte
        assert np.array_equal(
            written[f"{n}.{kind}_qweight"].numpy(), quants.quantize(sd[f"{n}.weight"].numpy(), T[kind])
        )
    assert all(torch.equal(written[k], sd[k]) for k in written if not k.endswith("_qweight"))
    info = json.loads(_info_json(capsys, dst))["components"]["dit"]
    assert info["quant"] == f"gguf {kind}" and info["parameters"] == sum(t.numel() for t in sd.values())

    import copy

    c = copy.copy(embedded)
    c.dit = load_dit(dst, config=embedded.dit.config)
    req = GenerationRequest("a red circle moving right", seed=2, steps=3)
    got = MochiPipeline(c, device="cpu").generate(req)
    want = MochiPipeline(copy.copy(embedded), device="cpu").generate(req)
    assert got.frames.shape == want.frames.shape == (1, 25, 64, 64, 3)
    err = ((got.latents - want.latents).norm() / want.latents.norm()).item()
    assert 0 < err < (0.05 if mode == "q8_0" else 0.3)


def _info_json(capsys, path) -> str:
    assert main(["info", str(path), "--json"]) == 0
    return capsys.readouterr().out


def test_convert_quantize_bad_input(tmp_path, sd, capsys):
    save_file(sd, tmp_path / "dit.safetensors")
    src = str(tmp_path / "dit.safetensors")
    assert main(["convert", src, str(tmp_path / "d"), "--to", "diffusers", "--quantize", "q8_0"]) == 2
    assert "uses Genmo's names; use --to genmo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", src, str(tmp_path / "x.safetensors"), "--to", "genmo", "--quantize", "int8"])
    # An already quantized source: said, dequantized, quantized again.
    q8 = write_kijai(tmp_path / "q8.safetensors", sd, "Q8_0", torch.float32)
    out = tmp_path / "q4.safetensors"
    assert main(["convert", str(q8), str(out), "--to", "genmo", "--quantize", "q4_0"]) == 0
    text = capsys.readouterr().out
    assert (
        "is already quantized (gguf Q8_0); its weights are dequantized (in fp32) and quantized again to q4_0"
        in text
    )
    assert detect(out).quant["dit"] == "gguf Q4_0"


@pytest.mark.parametrize("rest", [torch.bfloat16, torch.float16])
def test_requantizing_keeps_blocks_of_the_asked_type_and_widens_others_to_fp32(tmp_path, sd, capsys, rest):
    """A Q8_0 file (its other tensors bf16, as Kijai's are) converted with --quantize q8_0 was dequantized
    to bf16 and rounded again, changing about 3% of its bytes; to q4_0, its weights were rounded to bf16
    before the second quantization. Now blocks of the asked type are kept byte for byte and the others are
    dequantized in fp32."""
    src = write_kijai(tmp_path / "q8.safetensors", sd, "Q8_0", rest)
    stored = load_file(src)
    layers = block_layers(sd)
    same, other = tmp_path / "same.safetensors", tmp_path / "q4.safetensors"
    assert main(["convert", str(src), str(same), "--to", "genmo", "--quantize", "q8_0"]) == 0
    assert main(["convert", str(src), str(other), "--to", "genmo", "--quantize", "q4_0"]) == 0
    text = capsys.readouterr().out
    assert "its Q8_0 blocks are kept as they are" in text
    assert "its weights are dequantized (in fp32) and quantized again to q4_0" in text
    assert load_file(same).keys() == stored.keys()
    assert all(torch.equal(t, stored[k]) for k, t in load_file(same).items())  # the same file's tensors
    q4 = load_file(other)
    for n in layers:
        wide = ggml.dequantize(stored[f"{n}.Q8_0_qweight"], "Q8_0", torch.float32)
        assert torch.equal(q4[f"{n}.Q4_0_qweight"], ggml.quantize(wide, "Q4_0"))
    assert all(torch.equal(q4[k], t) for k, t in stored.items() if not k.endswith("_qweight"))
    # A kept block's scale is still read: a NaN one is refused as the dequantized weight was.
    key = f"{layers[0]}.Q8_0_qweight"
    stored[key][0, :2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # fp16 NaN (0x7E00)
    save_file(stored, tmp_path / "bad.safetensors")
    out = tmp_path / "bad_q8.safetensors"
    assert (
        main(["convert", str(tmp_path / "bad.safetensors"), str(out), "--to", "genmo", "--quantize", "q8_0"])
        == 2
    )
    assert f"holds NaN or infinite values in 1 of {len(stored)} tensors ({key})" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("tensors", "entries", "message"),
    [
        (2**60, b"", "it claims 1152921504606846976 tensors and 0 metadata entries: more than"),
        # One entry: key "a", an array (type 9) of uint8 (type 0) claiming 2**62 elements.
        (
            0,
            struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 0, 2**62),
            "an array of 4611686018427387904",
        ),
        (0, struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 8, 2**40), "claims 1099511627776 entries"),
        (0, struct.pack("<Q", 2**50) + b"a", "a key needs 1125899906842624 bytes"),
        (0, struct.pack("<Q", 1) + b"a" + struct.pack("<I", 77), "metadata value type 77"),
    ],
)
def test_a_gguf_header_claiming_more_than_the_file_holds_is_refused(tmp_path, tensors, entries, message):
    """gguf's reader loops over a claimed count even past the end of the file: 113 bytes claiming an array
    of 2**62 elements grew without bound (1 GB in 10 s)."""
    from mochi.weights.gguf_file import gguf_header
    from mochi.weights.io import WeightsError

    path = tmp_path / "hostile.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, tensors, 1 if entries else 0) + entries + bytes(64))
    with pytest.raises(WeightsError, match=f"'{path}' is not a readable .gguf file \\(.*{message}"):
        gguf_header(path)


def test_a_gguf_cut_short_in_its_data_says_so(tmp_path, sd):
    """A .gguf whose download stopped inside the tensor data failed in the reader with numpy's "cannot
    reshape array of size 1328 into shape (32,85)"; a whole file (and one naming its own alignment) reads."""
    from mochi.weights.gguf_file import gguf_header
    from mochi.weights.io import WeightsError

    from .gguf_files import block_layers, write_gguf

    whole = write_gguf(tmp_path / "whole.gguf", sd, {k + ".weight": "Q8_0" for k in block_layers(sd)})
    assert gguf_header(whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(WeightsError, match=r"past the file's \d+: the file is cut short \(a download"):
        gguf_header(cut)


@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_requantizing_an_fp8_file_widens_its_weights_to_fp32_first(tmp_path, capsys, layout):
    """An fp8 file's weights were dequantized to the file's bf16 before the blocks were formed: the
    product of an fp8 value and its fp32 scale was rounded to 8 bits first, moving some blocks a step."""
    from mochi.weights import fp8

    from .dit_checkpoints import tiny_model, write_fp8_scaled

    src = write_fp8_scaled(tmp_path / "f8.safetensors", tiny_model(), layout=layout, all_in_one=False)
    stored = {k.removeprefix("model.diffusion_model."): t for k, t in load_file(src).items()}
    scale = "scale_weight" if layout == "legacy" else "weight_scale"
    out = tmp_path / "q8.safetensors"
    assert main(["convert", str(src), str(out), "--to", "genmo", "--quantize", "q8_0"]) == 0
    assert "its weights are dequantized (in fp32) and quantized again to q8_0" in capsys.readouterr().out
    q8 = load_file(out)
    layers = [k.removesuffix(".Q8_0_qweight") for k in q8 if k.endswith("_qweight")]
    assert layers
    moved = 0
    for n in layers:
        wide = fp8.dequantize(stored[f"{n}.weight"], stored[f"{n}.{scale}"], torch.float32)
        assert torch.equal(q8[f"{n}.Q8_0_qweight"], ggml.quantize(wide, "Q8_0"))
        moved += not torch.equal(q8[f"{n}.Q8_0_qweight"], ggml.quantize(wide.bfloat16(), "Q8_0"))
    assert moved  # the bf16 detour gives other blocks: the test tells the two apart
