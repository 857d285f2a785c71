"""The set of models a pipeline needs, loaded from a checkpoint in any supported layout.

A checkpoint may hold every component (a diffusers pipeline folder, a ComfyUI all-in-one file, the embedded
bundle) or only the DiT (a Genmo folder has no T5; a ComfyUI DiT file has neither VAE nor T5). What the
checkpoint lacks comes from the ``vae``/``t5``/``tokenizer`` paths, and a missing piece is a one-line error
that says which option supplies it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mochi.errors import ARG_PREFIX
from mochi.models.dit import AsymmDiT
from mochi.models.t5 import T5Encoder
from mochi.models.tokenizer import Tokenizer, load_tokenizer
from mochi.models.vae import Decoder, Encoder
from mochi.weights.dit import load_dit, load_dit_quantized
from mochi.weights.formats import Detected, detect
from mochi.weights.io import WeightsError
from mochi.weights.t5 import load_t5, load_t5_quantized
from mochi.weights.vae import load_vae_decoder, load_vae_encoder

# Genmo's CLI defaults for the released model (genmo-mochi.md §7).
RELEASED_DEFAULTS = {"frames": 163, "height": 480, "width": 848, "steps": 64, "guidance": 6.0}


@dataclass
class Components:
    """Everything a pipeline runs. ``defaults`` fill a request's unset frames/height/width/steps/guidance.

    ``latent_mean``/``latent_std`` (12 values each) map VAE latents to the DiT's normalised space; None means
    the released AsymmVAE's statistics.
    """

    tokenizer: Tokenizer
    text_encoder: T5Encoder
    dit: AsymmDiT | None  # None only where loaded to encode (``load_components(with_dit=False)``)
    decoder: Decoder
    encoder: Encoder | None = None
    defaults: dict = field(default_factory=lambda: dict(RELEASED_DEFAULTS))
    name: str = "custom"
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None
    source: str | None = None  # the checkpoint path loaded (None: the embedded model)
    # What quantizing did, per component ("dit", "t5"), at load (``load_components(quantize=…)``) or by a
    # pipeline (``MochiPipeline(quantize=…)``), and the mode: a weight is quantized once.
    quantized: dict[str, str] = field(default_factory=dict)
    quantize_mode: str | None = None

    def modules(self) -> list[nn.Module]:
        found = [self.text_encoder, self.dit, self.decoder, self.encoder]
        return [m for m in found if m is not None]


def _pass(prefix: str, name: str) -> str:
    """How a message asks for a part: "--vae PATH" to the CLI (``prefix`` "--"), "vae=PATH" to Python ("")."""
    return f"{prefix}{name} PATH" if prefix else f"{name}=PATH"


def _tokenizer_for(det: Detected | None, t5: str | None, tokenizer: str | None, prefix: str) -> Tokenizer:
    if tokenizer is not None:  # named by the user: this one (a folder or a file), or its own error
        return load_tokenizer(tokenizer)
    candidates = [t5]
    if det is not None:
        candidates += [det.extras.get("tokenizer"), det.path]
    for candidate in candidates:
        if candidate is None or not Path(candidate).is_dir():
            continue
        try:
            return load_tokenizer(candidate)
        except (ValueError, FileNotFoundError):
            continue
    raise ValueError(
        f"no T5 tokenizer found (spiece.model or tokenizer.json); pass {_pass(prefix, 'tokenizer')}, or as "
        f"{_pass(prefix, 't5')} a folder that holds one (e.g. google/t5-v1_1-xxl)"
    )


def _check_text_pair(  # noqa: ANN001
    tok: Tokenizer, text_encoder: T5Encoder, dit: AsymmDiT | None, tok_source, t5_source, prefix: str
) -> None:
    """The tokenizer's ids must index the T5's embedding, and the T5's width must be the DiT's text width:
    parts from different models are named here, at load, not by an index error at the first prompt."""
    embeds = text_encoder.config.vocab_size
    if tok.vocab_size > embeds:
        raise ValueError(
            f"the tokenizer of {str(tok_source)!r} has {tok.vocab_size} ids but the T5 of {str(t5_source)!r} "
            f"embeds {embeds}: they belong to different models; pass the T5's own tokenizer "
            f"({_pass(prefix, 'tokenizer')})"
        )
    if dit is None:
        return
    width, wanted = text_encoder.config.d_model, dit.config.t5_feat_dim
    if width != wanted:
        raise ValueError(
            f"the T5 of {str(t5_source)!r} gives {width}-wide features but the DiT reads {wanted}-wide "
            f"ones (t5_feat_dim): pass the T5 this DiT was trained with ({_pass(prefix, 't5')})"
        )


def model_defaults(model: str | os.PathLike | None) -> dict:
    """The request defaults of ``model`` without loading it: a bundle's own (the embedded model's when
    None), else the released model's."""
    from mochi.weights.bundle import bundle_config, embedded_path, is_bundle

    if model is None:
        model = embedded_path()
        if not model.is_file():
            from mochi.presets import model_preset

            return dict(model_preset("mochi-tiny").defaults)
    if is_bundle(model):
        return dict(bundle_config(model)["defaults"])
    return dict(RELEASED_DEFAULTS)


def decoder_config(model: str | os.PathLike | None, vae: str | os.PathLike | None = None):  # noqa: ANN201
    """The VAE decoder's ``DecoderConfig`` without loading it: a bundle's (the embedded model's when None)
    unless ``vae`` (``--vae``) names another, else the released decoder's."""
    from mochi.models.vae import DecoderConfig
    from mochi.weights.bundle import PARTS, bundle_config, embedded_path, is_bundle
    from mochi.weights.bundle_config import part_config

    if model is None:
        model = embedded_path()
    if vae is None and Path(model).is_file() and is_bundle(model):
        where = f"bundle {os.fspath(model)!r}"
        return part_config(PARTS["decoder"][1], bundle_config(model)["decoder"], where, 10**9)
    return DecoderConfig()


def dit_depth(model: str | os.PathLike | None, variant: str | None = None) -> int | None:
    """The DiT's block count without loading it: a bundle's config (the embedded model's when None), else
    the checkpoint's headers; None when they do not tell (the load then checks)."""
    from mochi.weights.bundle import bundle_config, embedded_path, is_bundle

    if model is None:
        model = embedded_path()
        if not model.is_file():
            return None
    try:
        if is_bundle(model):
            return int(bundle_config(model)["dit"]["depth"])
        from mochi.weights.dit import genmo_shapes, infer_config
        from mochi.weights.formats import detect

        return infer_config(genmo_shapes(detect(model, variant=variant))).depth
    except (ValueError, KeyError, TypeError, OSError):  # unreadable here: the load says why
        return None


def check_model_paths(
    model: str | os.PathLike | None,
    vae: str | os.PathLike | None = None,
    t5: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    prefix: str | None = None,
) -> None:
    """Every path given must exist, and the embedded model or a bundle (which carry all their parts)
    takes no ``vae``/``t5``/``tokenizer``: ValueError rather than silently not using them. ``prefix``: how
    the messages name the values ("--" for the CLI's flags, "" for the Python API's arguments; None:
    `mochi.errors.ARG_PREFIX`, which the CLI sets)."""
    prefix = ARG_PREFIX.get() if prefix is None else prefix
    m, v, t, k = (f"{prefix}{name}" for name in ("model", "vae", "t5", "tokenizer"))
    for flag, value in ((m, model), (v, vae), (t, t5), (k, tokenizer)):
        if value is None:
            continue
        if not isinstance(value, str | os.PathLike):  # pathlib's TypeError named no argument
            raise ValueError(f"{flag} {value!r} must be a path (a string), not {type(value).__name__}")
        if not os.fspath(value).strip():  # Path("") is ".": the current folder was loaded as the checkpoint
            leave = f"leave {flag} out" if prefix else "give None"
            what = "the embedded model" if flag == m else "none"
            raise ValueError(f"{flag} {os.fspath(value)!r} is empty; give a path, or {leave} for {what}")
        if not Path(value).exists():
            raise ValueError(f"{flag} {str(value)!r} does not exist")
    extras = ((v, vae), (t, t5), (k, tokenizer))
    given = [flag for flag, value in extras if value is not None]
    if given:
        from mochi.weights.bundle import is_bundle

        if model is None or is_bundle(model):
            what = "the embedded model" if model is None else f"the mochi bundle {str(model)!r}"
            raise ValueError(
                f"{' and '.join(given)} cannot be used with {what}, which carries its own VAE, T5 and "
                f"tokenizer; leave {'them' if len(given) > 1 else 'it'} out, or use a {m} that lacks them"
            )
        for flag, value in extras:
            if value is not None and Path(value).is_file() and is_bundle(value):
                raise ValueError(
                    f"{flag} {str(value)!r} is a mochi bundle, a whole model whose parts fit only each "
                    f"other; pass it as {m} (without {flag})"
                )


def load_components(
    model: str | os.PathLike | None = None,
    *,
    vae: str | os.PathLike | None = None,
    t5: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    fp8: str = "keep",
    encoder: bool = True,
    dit: AsymmDiT | None = None,
    text_encoder: T5Encoder | None = None,
    quantize: str | None = None,
    dit_dtype: torch.dtype | None = None,
    with_dit: bool = True,
    prefix: str | None = None,
) -> Components:
    """Load every component from ``model`` (or the embedded default when None), filling gaps from the others.

    fp8: "keep" leaves fp8 DiT weights fp8 in memory (scaled per layer at matmul time), "dequantize" widens
    them at load. encoder: also load the VAE encoder when the checkpoint has one (video-to-video needs it).
    dit, text_encoder: models loaded already (e.g. in shards under torchrun), used instead of reading them.
    dit_dtype: the DiT's compute dtype, read straight into (fp8 and GGUF weights that are widened at load
    too; fp8 block Linears kept fp8 stay so). None: the file's dtype.
    quantize: quantize the DiT's and T5's block Linears while reading them, the DiT in ``dit_dtype`` (its
    compute dtype), T5 in fp32, so that neither exists at full width at once
    (`mochi.weights.dit.load_dit_quantized`, `mochi.weights.t5.load_t5_quantized`); the components'
    ``quantized`` says what was done. The embedded model and bundles are not quantized here.
    with_dit: False leaves a checkpoint's DiT unread (``dit`` None), for what only encodes (prepare-data):
    the released DiT is 40 GB in fp32. Bundles, a few MB, are read whole.
    prefix: how messages name the parts to pass ("--" the CLI's flags, "" the Python API's arguments; None:
    `mochi.errors.ARG_PREFIX`, which the CLI sets).
    """
    prefix = ARG_PREFIX.get() if prefix is None else prefix
    check_model_paths(model, vae, t5, tokenizer, prefix)
    if model is None:
        from mochi.weights.bundle import load_embedded

        return load_embedded()
    from mochi.weights.bundle import is_bundle, load_bundle

    if is_bundle(model):
        bundle = load_bundle(model)
        bundle.source = str(model)
        return bundle
    det = detect(model)
    if with_dit and "dit" not in det.files:
        raise ValueError(f"{str(model)!r} holds no DiT weights (found: {det.describe()})")
    quantized = {}
    if dit is None and quantize is not None:
        dit, done = load_dit_quantized(det, quantize, dtype=dit_dtype, fp8=fp8)
        quantized["dit"] = done.note("dit")
    elif dit is None and with_dit:
        # Read straight into the compute dtype: fp8 (and GGUF) weights widened at load are rounded once, as
        # Fp8Linear computes with "keep" (through the file's bf16 first, the CPU's fp32 model differed).
        dit = load_dit(det, fp8=fp8, dtype=dit_dtype)

    # The VAE comes from --vae when given, else from what detection found in the model checkpoint (read
    # there, shards and all, without detecting it again).
    vae_source = vae if vae is not None else (det if "vae_decoder" in det.files else None)
    if vae_source is None:
        raise ValueError(
            f"{str(model)!r} holds no VAE decoder ({det.describe()}); pass {_pass(prefix, 'vae')} (Genmo "
            "decoder.safetensors, a diffusers vae/ folder or a ComfyUI VAE file)"
        )
    try:
        decoder = load_vae_decoder(vae_source)
    except WeightsError as e:
        if vae is None:
            raise
        raise WeightsError(f"{prefix}vae {str(vae)!r}: {e}") from None
    vae_encoder = None
    enc_source = vae if vae is not None else (det if "vae_encoder" in det.files else None)
    if encoder and enc_source is not None:
        try:
            vae_encoder = load_vae_encoder(enc_source)
        except WeightsError as e:  # e.g. a decoder-only VAE file: only video-to-video needs the encoder
            warnings.warn(f"VAE encoder not loaded, so video-to-video is unavailable: {e}", stacklevel=2)

    t5_source = t5 if t5 is not None else (det if "t5" in det.files else None)
    if t5_source is None and text_encoder is None:
        raise ValueError(
            f"{str(model)!r} holds no T5 text encoder ({det.describe()}); pass {_pass(prefix, 't5')} (a "
            "google/t5-v1_1-xxl folder or a ComfyUI t5xxl file)"
        )
    if text_encoder is None and quantize is not None:
        text_encoder, done = load_t5_quantized(t5_source, quantize, dtype=torch.float32)
        quantized["t5"] = done.note("t5")
    elif text_encoder is None:
        text_encoder = load_t5(t5_source, dtype=torch.float32)
    tok = _tokenizer_for(det, str(t5) if t5 else None, str(tokenizer) if tokenizer else None, prefix)
    _check_text_pair(tok, text_encoder, dit, tokenizer or t5 or model, t5 or model, prefix)
    return Components(
        tok,
        text_encoder,
        dit,
        decoder,
        vae_encoder,
        name=Path(model).name,
        source=str(model),
        quantized=quantized,
        quantize_mode=quantize if quantized else None,
    )
