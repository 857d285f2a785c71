"""VAE weights in every layout, the diffusers key map, and numerical parity with diffusers."""

import pytest
import torch
from diffusers import AutoencoderKLMochi

from mochi.models.vae import DECODER_PRESETS, ENCODER_PRESETS, Decoder, Encoder
from mochi.models.vae_tiling import decode, encode
from mochi.weights.formats import detect
from mochi.weights.io import WeightsError, save_state_dict
from mochi.weights.keymaps.vae_diffusers import decoder_pairs, encoder_pairs, from_diffusers, to_diffusers
from mochi.weights.vae import load_vae_decoder, load_vae_encoder

TINY = {
    "encoder_block_out_channels": (32, 32, 32, 32),
    "decoder_block_out_channels": (32, 32, 32, 32),
    "layers_per_block": (1, 1, 1, 1, 1),
}


@pytest.fixture(scope="module")
def reference():
    """A tiny diffusers VAE with every weight perturbed, and ours loaded from its state dict."""
    torch.manual_seed(0)
    ref = AutoencoderKLMochi(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = ref.state_dict()
    dec, enc = Decoder(DECODER_PRESETS["tiny"]).eval(), Encoder(ENCODER_PRESETS["tiny"]).eval()
    dec.load_state_dict(
        from_diffusers({k: v for k, v in sd.items() if k.startswith("decoder.")}, decoder_pairs(dec.cfg))
    )
    enc.load_state_dict(
        from_diffusers({k: v for k, v in sd.items() if k.startswith("encoder.")}, encoder_pairs(enc.cfg))
    )
    return ref, dec, enc


def test_keymap_matches_diffusers_names_for_the_released_model():
    with torch.device("meta"):
        ref = AutoencoderKLMochi()
        dec, enc = Decoder(DECODER_PRESETS["mochi-1-preview"]), Encoder(ENCODER_PRESETS["mochi-1-preview"])
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(theirs) == 437
    ours = to_diffusers(dec.state_dict(), decoder_pairs(dec.cfg)) | to_diffusers(
        enc.state_dict(), encoder_pairs(enc.cfg)
    )
    assert {k: tuple(v.shape) for k, v in ours.items()} == theirs
    # Reversible: back to Genmo names, with qkv fused again.
    back = from_diffusers({k: v for k, v in ours.items() if k.startswith("encoder.")}, encoder_pairs(enc.cfg))
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k: tuple(v.shape) for k, v in enc.state_dict().items()
    }


def test_qkv_split_order():
    _, enc = Decoder(DECODER_PRESETS["tiny"]), Encoder(ENCODER_PRESETS["tiny"])
    sd = enc.state_dict()
    key = "layers.2.layers.1.attn_block.attn.qkv.weight"
    sd[key] = torch.arange(96 * 32, dtype=torch.float32).view(96, 32)
    out = to_diffusers(sd, encoder_pairs(enc.cfg))
    q = out["encoder.down_blocks.0.attentions.0.to_q.weight"]
    v = out["encoder.down_blocks.0.attentions.0.to_v.weight"]
    assert q[0, 0] == 0 and v[0, 0] == 64 * 32
    torch.testing.assert_close(from_diffusers(out, encoder_pairs(enc.cfg))[key], sd[key])
    with pytest.raises(WeightsError, match="1 keys have no diffusers name.*bogus"):
        to_diffusers({**sd, "bogus.weight": torch.zeros(1)}, encoder_pairs(enc.cfg))


def test_encoder_matches_diffusers(reference):
    ref, _, enc = reference
    x = torch.rand(1, 3, 13, 32, 48) * 2 - 1
    mean, logvar = encode(enc, x)
    with torch.no_grad():
        h, _ = ref.encoder(x)
    torch.testing.assert_close(mean, h[:, :12], rtol=0, atol=1e-5)
    torch.testing.assert_close(logvar, h[:, 12:], rtol=0, atol=1e-5)


def test_decoder_matches_diffusers_outside_the_frame_drop_window(reference):
    """Genmo drops te−1 leading frames inside each upsampling block; diffusers keeps them as causal
    context and drops 5 frames at the end. Frame f agrees once no conv that saw the kept frames reaches
    it: f ≥ 8·n₂ − 1 + 4·(n₃ + n₄), with n₂, n₃, n₄ the ResBlocks of the te=2 block, the te=1 block and
    the last block (15 for this 1-ResBlock decoder; 55 for the released one)."""
    ref, dec, _ = reference
    z = torch.randn(1, 12, 5, 4, 6)
    ours = decode(dec, z)
    with torch.no_grad():
        theirs = ref.decode(z).sample
    assert ours.shape == theirs.shape == (1, 3, 25, 32, 48)
    diff = (ours - theirs).abs().amax(dim=(0, 1, 3, 4))
    assert diff[15:].max() <= 1e-5
    assert diff[14] > 1e-3 and diff[0] > 1e-1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, reference):
    ref, dec, enc = reference
    root = tmp_path_factory.mktemp("vae")
    genmo = root / "genmo"
    genmo.mkdir()
    save_state_dict(dec.state_dict(), genmo / "decoder.safetensors")
    save_state_dict(enc.state_dict(), genmo / "encoder.safetensors")
    both = {f"decoder.{k}": v for k, v in dec.state_dict().items()} | {
        f"encoder.{k}": v for k, v in enc.state_dict().items()
    }
    save_state_dict({k: v.bfloat16() for k, v in both.items()}, root / "mochi_vae.safetensors")
    aio = {f"vae.{k}": v for k, v in both.items()} | {
        "model.diffusion_model.t5_yproj.weight": torch.zeros(2, 2)
    }
    save_state_dict(aio, root / "all_in_one.safetensors")
    ref.save_pretrained(root / "hub" / "vae")
    return root


@pytest.mark.parametrize(
    ("rel", "fmt"),
    [
        ("genmo", "genmo"),
        ("genmo/decoder.safetensors", "genmo"),
        ("mochi_vae.safetensors", "comfy"),
        ("all_in_one.safetensors", "comfy-all-in-one"),
        ("hub", "diffusers"),
        ("hub/vae", "diffusers"),
    ],
)
def test_decoder_loads_from_every_layout(checkpoints, reference, rel, fmt):
    _, dec, _ = reference
    loaded = load_vae_decoder(checkpoints / rel)
    assert loaded.cfg == dec.cfg and not loaded.training
    tol = 1e-2 if fmt == "comfy" else 0  # the ComfyUI file was written in bf16
    for k, v in dec.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "rel", ["genmo", "genmo/encoder.safetensors", "mochi_vae.safetensors", "all_in_one.safetensors", "hub"]
)
def test_encoder_loads_from_every_layout(checkpoints, reference, rel):
    _, _, enc = reference
    loaded = load_vae_encoder(checkpoints / rel, dtype=torch.bfloat16)
    assert loaded.output_proj.weight.dtype == torch.bfloat16
    key = "layers.4.layers.1.attn_block.attn.qkv.weight"
    torch.testing.assert_close(loaded.state_dict()[key].float(), enc.state_dict()[key], rtol=1e-2, atol=1e-2)


def test_load_errors_name_the_problem(checkpoints, tmp_path, reference):
    _, dec, _ = reference
    with pytest.raises(WeightsError, match="holds no VAE decoder; it looks like a VAE encoder only"):
        load_vae_decoder(checkpoints / "genmo" / "encoder.safetensors")
    sd = dec.state_dict()
    sd.pop("blocks.2.proj.bias")
    save_state_dict(sd, tmp_path / "decoder.safetensors")
    with pytest.raises(WeightsError, match="detected format: genmo.*1 missing: blocks.2.proj.bias"):
        load_vae_decoder(tmp_path / "decoder.safetensors", config=DECODER_PRESETS["tiny"])
    save_state_dict({"foo.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="no Mochi component recognised in .*other.safetensors"):
        load_vae_decoder(tmp_path / "other.safetensors")
    save_state_dict({"t5_yproj.weight": torch.zeros(1)}, tmp_path / "dit.safetensors")
    with pytest.raises(
        WeightsError,
        match=r"dit.safetensors' \(detected format: genmo \(dit \[genmo\]\)\) "
        "holds no VAE decoder; it is not a Mochi VAE",
    ):
        load_vae_decoder(tmp_path / "dit.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        load_vae_decoder(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("rel", "fmt", "prefixes"),
    [
        ("genmo", "genmo", {"vae_decoder": "", "vae_encoder": ""}),
        ("genmo/encoder.safetensors", "genmo", {"vae_encoder": ""}),
        ("mochi_vae.safetensors", "genmo", {"vae_decoder": "decoder.", "vae_encoder": "encoder."}),
        ("all_in_one.safetensors", "comfyui", {"dit": "model.diffusion_model.", "vae_decoder": "vae.decoder.",
                                               "vae_encoder": "vae.encoder."}),
        ("hub", "diffusers", {"vae_decoder": "decoder.", "vae_encoder": "encoder."}),
        ("hub/vae", "diffusers", {"vae_decoder": "decoder.", "vae_encoder": "encoder."}),
    ],
)  # fmt: skip
def test_vae_layouts_are_detected_once_for_every_loader(checkpoints, rel, fmt, prefixes):
    det = detect(checkpoints / rel)
    assert (det.format, det.prefixes) == (fmt, prefixes)
    diffusers = fmt == "diffusers"
    assert {det.layouts[c] for c in prefixes if c != "dit"} == {"diffusers" if diffusers else "genmo"}


def test_vae_from_sharded_files_and_older_prefixes(checkpoints, reference, tmp_path):
    ref, dec, enc = reference
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    loaded = load_vae_decoder(tmp_path / "sharded")
    for k, v in dec.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # Older single-file checkpoints keep the VAE under first_stage_model.
    old = {f"first_stage_model.encoder.{k}": v for k, v in enc.state_dict().items()}
    save_state_dict(old, tmp_path / "old.safetensors")
    key = "layers.4.layers.1.attn_block.attn.qkv.weight"
    assert torch.equal(
        load_vae_encoder(tmp_path / "old.safetensors").state_dict()[key], enc.state_dict()[key]
    )
    with pytest.raises(WeightsError, match="holds no VAE decoder; it looks like a VAE encoder only"):
        load_vae_decoder(tmp_path / "old.safetensors")
