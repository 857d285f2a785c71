"""Whole pipelines load from each released layout and give the same video as the in-memory components."""

import json

import pytest
import torch

from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.weights.components import load_components
from mochi.weights.io import save_state_dict

from .test_pipeline import DEFAULTS, tiny_components


def _write_tokenizer(folder, words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))


def _write_t5(folder, t5, max_shard_size="5GB"):
    from transformers import T5Config, T5EncoderModel

    theirs = T5EncoderModel(T5Config(**t5.config.to_hf()))
    theirs.load_state_dict(t5.state_dict(), strict=False)
    theirs.save_pretrained(folder, max_shard_size=max_shard_size)


def _write_diffusers(root, c):
    from diffusers import AutoencoderKLMochi

    from mochi.weights.keymaps.vae_diffusers import decoder_pairs, encoder_pairs, to_diffusers

    from .dit_checkpoints import write_diffusers

    write_diffusers(root, c.dit)
    ch = c.decoder.cfg.channels
    vae = AutoencoderKLMochi(
        encoder_block_out_channels=tuple(c.encoder.cfg.channels),
        decoder_block_out_channels=tuple(ch),
        layers_per_block=tuple(c.decoder.cfg.num_res_blocks),
    )
    sd = to_diffusers(c.decoder.state_dict(), decoder_pairs(c.decoder.cfg))
    sd |= to_diffusers(c.encoder.state_dict(), encoder_pairs(c.encoder.cfg))
    vae.load_state_dict(sd, strict=True)
    # Sharded, as the released text encoder is (two files and an index): every shard must be read.
    vae.save_pretrained(root / "vae", max_shard_size="100KB")
    _write_t5(root / "text_encoder", c.text_encoder, max_shard_size="20KB")
    assert len(list((root / "text_encoder").glob("*.safetensors"))) > 1
    assert len(list((root / "vae").glob("*.safetensors"))) > 1


WORDS = ["a", "red", "circle", "moving", "right"]


def _same_video(pipe):
    """The loaded pipeline renders exactly what the in-memory components render with its tokenizer."""
    c = tiny_components(seed=1)
    c.tokenizer = pipe.components.tokenizer  # a word-level tokenizer: other ids than the byte tokenizer
    request = GenerationRequest("a red circle", seed=2, steps=2)
    expected = MochiPipeline(c, device="cpu").generate(request)
    pipe.components.defaults = dict(DEFAULTS)
    assert torch.equal(pipe.generate(request).frames, expected.frames)


def test_diffusers_pipeline_folder(tmp_path):
    _write_diffusers(tmp_path, tiny_components(seed=1))
    _write_tokenizer(tmp_path / "tokenizer", WORDS)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MochiPipeline"}))
    pipe = MochiPipeline.from_pretrained(str(tmp_path), device="cpu")
    assert pipe.components.encoder is not None
    _same_video(pipe)


def test_genmo_folder_with_separate_t5(tmp_path, capsys):
    c = tiny_components(seed=1)
    weights = tmp_path / "weights"
    weights.mkdir()
    save_state_dict(c.dit.state_dict(), weights / "dit.safetensors")
    save_state_dict(c.decoder.state_dict(), weights / "decoder.safetensors")
    save_state_dict(c.encoder.state_dict(), weights / "encoder.safetensors")
    _write_t5(tmp_path / "t5", c.text_encoder)
    _write_tokenizer(tmp_path / "t5", WORDS)
    with pytest.raises(ValueError, match=r"holds no T5 text encoder .* pass t5=PATH \("):
        MochiPipeline.from_pretrained(str(weights), device="cpu")  # named as the call's argument
    from mochi.cli import main

    assert main(["generate", "x", "--model", str(weights), "--out", str(tmp_path / "x.mp4")]) == 2
    assert "pass --t5 PATH (" in capsys.readouterr().err  # the CLI names its flag
    with pytest.raises(ValueError, match=r"holds no T5 text encoder .* pass t5=PATH \("):
        load_components(str(weights))
    _same_video(MochiPipeline.from_pretrained(str(weights), t5=str(tmp_path / "t5"), device="cpu"))


def test_the_tokenizer_named_is_used_and_the_text_parts_must_pair(tmp_path):
    c = tiny_components(seed=1)
    weights = tmp_path / "weights"
    weights.mkdir()
    for name, module in (("dit", c.dit), ("decoder", c.decoder), ("encoder", c.encoder)):
        save_state_dict(module.state_dict(), weights / f"{name}.safetensors")
    _write_t5(tmp_path / "t5", c.text_encoder)
    _write_tokenizer(tmp_path / "t5", WORDS)
    _write_tokenizer(tmp_path / "other", list(reversed(WORDS)))  # same size, other ids
    t5 = str(tmp_path / "t5")
    # A tokenizer *file* given with --tokenizer is the one used (it was skipped for not being a folder).
    pipe = MochiPipeline.from_pretrained(
        str(weights), t5=t5, tokenizer=str(tmp_path / "other" / "tokenizer.json"), device="cpu"
    )
    assert pipe.components.tokenizer.encode("red") == [6]
    with pytest.raises(ValueError, match="is neither a tokenizer.json nor a spiece.model"):
        MochiPipeline.from_pretrained(str(weights), t5=t5, tokenizer=str(weights / "dit.safetensors"))
    # More ids than the T5 embeds: refused at load, naming both (it was an IndexError at the first prompt).
    vocab = c.text_encoder.config.vocab_size
    _write_tokenizer(tmp_path / "big", [f"w{i}" for i in range(vocab)])
    with pytest.raises(
        ValueError,
        match=rf"big' has {vocab + 3} ids but the T5 of '.*t5' embeds {vocab}.*\(tokenizer=PATH\)$",
    ):
        MochiPipeline.from_pretrained(str(weights), t5=t5, tokenizer=str(tmp_path / "big"), device="cpu")
    # A T5 of another width than the DiT reads: refused at load (it failed at the first denoising step).
    wide = tiny_components(seed=1)
    from mochi.models.t5 import T5Encoder

    cfg = wide.text_encoder.config
    other = T5Encoder(type(cfg)(**{**cfg.__dict__, "d_model": cfg.d_model * 2, "d_kv": cfg.d_kv * 2}))
    _write_t5(tmp_path / "t5wide", other)
    _write_tokenizer(tmp_path / "t5wide", WORDS)
    with pytest.raises(
        ValueError,
        match=rf"gives {cfg.d_model * 2}-wide features but the DiT reads {cfg.d_model}.*\(t5=PATH\)$",
    ):
        MochiPipeline.from_pretrained(str(weights), t5=str(tmp_path / "t5wide"), device="cpu")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        MochiPipeline.from_pretrained(str(tmp_path / "nope"))


def test_comfyui_all_in_one_file(tmp_path):
    c = tiny_components(seed=1)
    parts = {
        "model.diffusion_model.": c.dit,
        "vae.decoder.": c.decoder,
        "vae.encoder.": c.encoder,
        "text_encoders.t5xxl.transformer.": c.text_encoder,
    }
    sd = {prefix + k: v for prefix, m in parts.items() for k, v in m.state_dict().items()}
    save_state_dict(sd, tmp_path / "mochi_aio.safetensors")
    _write_tokenizer(tmp_path / "tok", WORDS)
    with pytest.raises(ValueError, match="no T5 tokenizer found"):
        MochiPipeline.from_pretrained(str(tmp_path / "mochi_aio.safetensors"), device="cpu")
    pipe = MochiPipeline.from_pretrained(
        str(tmp_path / "mochi_aio.safetensors"), tokenizer=str(tmp_path / "tok"), device="cpu"
    )
    assert pipe.components.encoder is not None
    _same_video(pipe)


def test_comfyui_dit_file_names_what_is_missing(tmp_path):
    c = tiny_components(seed=1)
    sd = {"model.diffusion_model." + k: v for k, v in c.dit.state_dict().items()}
    save_state_dict(sd, tmp_path / "mochi_dit.safetensors")
    with pytest.raises(ValueError, match=r"holds no VAE decoder .*pass vae=PATH \("):
        MochiPipeline.from_pretrained(str(tmp_path / "mochi_dit.safetensors"), device="cpu")


def test_a_bundle_file_loads_by_path(tmp_path):
    from mochi.weights.bundle import save_bundle

    c = tiny_components(seed=1)
    save_bundle(c, tmp_path / "mine.safetensors")
    pipe = MochiPipeline.from_pretrained(str(tmp_path / "mine.safetensors"), device="cpu")
    pipe.components.defaults = dict(DEFAULTS)
    request = GenerationRequest("a red circle", seed=2, steps=2)
    expected = MochiPipeline(tiny_components(seed=1), device="cpu").generate(request)
    assert torch.equal(pipe.generate(request).frames, expected.frames)


def test_a_vae_of_another_model_or_a_bundle_as_a_part_is_named(tmp_path):
    from mochi.weights.bundle import embedded_path, load_embedded

    c = tiny_components(seed=1)
    weights = tmp_path / "weights"
    weights.mkdir()
    save_state_dict(c.dit.state_dict(), weights / "dit.safetensors")
    _write_t5(tmp_path / "t5", c.text_encoder)
    _write_tokenizer(tmp_path / "t5", WORDS)
    t5 = str(tmp_path / "t5")
    for flag in ("vae", "t5"):
        parts = {"t5": t5, flag: str(embedded_path())}
        with pytest.raises(  # named as from_pretrained's arguments (the CLI names its flags)
            ValueError, match=rf"^{flag} '.*mochi-tiny.safetensors' is a mochi bundle, .* pass it as model "
        ):
            MochiPipeline.from_pretrained(str(weights), device="cpu", **parts)
    save_state_dict(load_embedded().decoder.state_dict(), tmp_path / "other-decoder.safetensors")
    with pytest.raises(ValueError, match=r"^vae '.*other-decoder\.safetensors': .*does not fit the model"):
        MochiPipeline.from_pretrained(str(weights), vae=str(tmp_path / "other-decoder.safetensors"), t5=t5)


def test_t5_size_of_an_all_in_one_file_counts_the_t5_alone(tmp_path):
    """The fit check of a sharded load reads the T5's fp32 size from the headers; in an all-in-one file the
    DiT and the VAE encoder share the file and must not be counted (they were)."""
    from mochi.parallel.sharded_load import t5_fp32_bytes
    from mochi.weights.formats import detect

    c = tiny_components(seed=1)
    t5 = {"text_encoders.t5xxl.transformer." + k: v for k, v in c.text_encoder.state_dict().items()}
    rest = {
        "model.diffusion_model.": c.dit,
        "vae.decoder.": c.decoder,
        "vae.encoder.": c.encoder,
    }
    sd = {prefix + k: v for prefix, m in rest.items() for k, v in m.state_dict().items()}
    save_state_dict({**sd, **t5}, tmp_path / "aio.safetensors")
    det = detect(str(tmp_path / "aio.safetensors"))
    expected = 4 * sum(p.numel() for p in c.text_encoder.parameters())
    assert t5_fp32_bytes(None, det) == expected


@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_fp8_kept_or_dequantized_gives_one_video(tmp_path, layout):
    """An fp8 file in bf16 (as ComfyUI's are) gives the same latents whether its weights stay fp8 or are
    widened at load: widened straight to the compute dtype (fp32 on the CPU), not through bf16 first."""
    from .dit_checkpoints import write_fp8_scaled

    c = tiny_components(seed=1)
    weights = tmp_path / "weights"
    weights.mkdir()
    write_fp8_scaled(weights / "dit.safetensors", c.dit, layout=layout)
    save_state_dict(c.decoder.state_dict(), weights / "decoder.safetensors")
    _write_t5(tmp_path / "t5", c.text_encoder)
    _write_tokenizer(tmp_path / "t5", WORDS)
    request = GenerationRequest("a red circle", seed=2, steps=3, frames=7, height=32, width=32)
    out = {}
    for fp8 in ("keep", "dequantize"):
        pipe = MochiPipeline.from_pretrained(str(weights), t5=str(tmp_path / "t5"), fp8=fp8, device="cpu")
        assert pipe.components.dit.x_embedder.proj.weight.dtype == torch.float32
        out[fp8] = pipe.generate(request).latents
    assert torch.equal(out["keep"], out["dequantize"])
