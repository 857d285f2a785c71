"""Parity with diffusers.MochiTransformer3DModel (test-only reference) through the DiT key map."""

import pytest
import torch

from mochi.models.dit import DIT_PRESETS, AsymmDiT, AsymmetricJointBlock, DiTConfig, PackedText
from mochi.ops.rope import rope_positions, rope_table
from mochi.weights.io import WeightsError
from mochi.weights.keymaps.dit_diffusers import diffusers_to_genmo, genmo_to_diffusers, rules

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")

TINY = DIT_PRESETS["tiny"]


def diffusers_model(cfg: DiTConfig, device: str = "cpu"):
    with torch.device(device):
        return diffusers.MochiTransformer3DModel(
            patch_size=cfg.patch_size,
            num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim,
            num_layers=cfg.depth,
            pooled_projection_dim=cfg.hidden_size_y,
            in_channels=cfg.in_channels,
            text_embed_dim=cfg.t5_feat_dim,
            time_embed_dim=cfg.timestep_embed_dim,
        ).eval()


def assert_close_to_scale(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} × output scale {scale:.3g}"


def test_key_map_matches_diffusers_keys_and_round_trips_bit_exactly():
    sd = AsymmDiT(
        DiTConfig(depth=3, num_heads=2, hidden_size_x=32, hidden_size_y=16, t5_feat_dim=32)
    ).state_dict()
    cfg = DiTConfig(
        depth=3, num_heads=2, hidden_size_x=32, hidden_size_y=16, t5_feat_dim=32, mlp_multiple_of=1
    )
    ref = diffusers_model(cfg, "meta").state_dict()
    ours = AsymmDiT(cfg).state_dict()
    mapped = genmo_to_diffusers(ours)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ref.items()}
    back = diffusers_to_genmo(mapped)
    assert back.keys() == ours.keys()
    for k, v in ours.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert len(rules(3)) == len(sd)  # one rule per Genmo key, whatever the SwiGLU width
    # Bit-exact in the other direction too, and outputs never share storage (safetensors refuses that).
    again = genmo_to_diffusers(back)
    assert all(torch.equal(again[k], v) for k, v in mapped.items())
    ptrs = [t.untyped_storage().data_ptr() for t in again.values()]
    assert len(set(ptrs)) == len(ptrs)


def test_key_map_transforms():
    ours = AsymmDiT(TINY).state_dict()
    mapped = genmo_to_diffusers(ours)
    qkv = ours["blocks.0.attn.qkv_x.weight"]
    d = TINY.hidden_size_x
    assert torch.equal(mapped["transformer_blocks.0.attn1.to_k.weight"], qkv[d : 2 * d])
    w1 = ours["blocks.1.mlp_x.w1.weight"]
    h = w1.shape[0] // 2
    assert torch.equal(mapped["transformer_blocks.1.ff.net.0.proj.weight"][:h], w1[h:])
    mod = ours["final_layer.mod.bias"]
    assert torch.equal(
        mapped["norm_out.linear.bias"], torch.cat([mod[d:], mod[:d]])
    )  # (shift, scale) → (scale, shift)
    assert torch.equal(
        mapped["transformer_blocks.1.norm1_context.linear_1.weight"], ours["blocks.1.mod_y.weight"]
    )


def test_key_map_rejects_foreign_keys():
    sd = AsymmDiT(TINY).state_dict()
    with pytest.raises(WeightsError, match=r"1 unexpected keys \['extra.weight'\]"):
        genmo_to_diffusers(sd | {"extra.weight": torch.zeros(1)})
    sd.pop("blocks.0.mlp_x.w2.weight")
    with pytest.raises(
        WeightsError, match=r"not a genmo-format.*1 missing keys \['blocks.0.mlp_x.w2.weight'\]"
    ):
        genmo_to_diffusers(sd)


@pytest.mark.parametrize("lengths", [[0], [1], [6], [11], [3, 11, 0]])
@torch.no_grad()
def test_small_model_matches_diffusers_end_to_end(lengths):
    cfg = DiTConfig(
        depth=3, num_heads=2, hidden_size_x=64, hidden_size_y=32, t5_feat_dim=64, mlp_multiple_of=1
    )
    ours = AsymmDiT(cfg).eval()
    ref = diffusers_model(cfg, "meta")
    ref.load_state_dict(genmo_to_diffusers(ours.state_dict()), strict=True, assign=True)
    b = len(lengths)
    x = torch.randn(b, 12, 3, 6, 8)
    sigma = torch.rand(b)
    text = torch.randn(b, 11, cfg.t5_feat_dim)
    mask = torch.arange(11)[None] < torch.tensor(lengths)[:, None]
    expected = ref(x, text, (1 - sigma) * 1000, mask, return_dict=False)[0]
    assert_close_to_scale(ours(x, sigma, text, mask), expected)


@torch.no_grad()
def test_one_full_width_block_matches_diffusers():
    """Block 0 of the released widths (3072/1536, 24 heads): ours vs diffusers' MochiTransformerBlock."""
    cfg = DIT_PRESETS["mochi-1-preview"]
    ours = AsymmetricJointBlock(cfg, update_y=True).eval()
    # The key map works on whole state dicts: wrap block 0 in stand-ins for every other key.
    sd = {f"blocks.0.{k}": v for k, v in ours.state_dict().items()}
    sd |= {r.genmo: torch.zeros(6) for r in rules(2) if not r.genmo.startswith("blocks.0.")}
    prefix = "transformer_blocks.0."
    block_sd = {k[len(prefix) :]: v for k, v in genmo_to_diffusers(sd).items() if k.startswith(prefix)}
    with torch.device("meta"):
        ref = diffusers.models.transformers.transformer_mochi.MochiTransformerBlock(
            dim=3072, num_attention_heads=24, attention_head_dim=128, pooled_projection_dim=1536
        )
    ref.load_state_dict(block_sd, strict=True, assign=True)

    T, pH, pW, L = 2, 4, 4, 7
    x = torch.randn(1, T * pH * pW, 3072)
    y = torch.randn(1, L, 1536)
    mask = torch.arange(L)[None] < 5
    c = torch.randn(1, 3072)
    rope = rope_table(torch.randn(3, 24, 64) * 0.05, rope_positions(T, pH, pW))  # (N, 24, 64) complex
    packed = PackedText.from_mask(mask)
    x_ours, y_ours = ours(x, y[mask], torch.nn.functional.silu(c), rope, packed, "sdpa")
    x_ref, y_ref = ref(x, y, c, mask, image_rotary_emb=(rope.real, rope.imag))
    assert_close_to_scale(x_ours, x_ref)
    assert_close_to_scale(y_ours, y_ref[mask])
