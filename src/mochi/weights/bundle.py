"""The mochi bundle: one safetensors file holding a whole text-to-video model.

Keys are each component's own state-dict keys under a prefix (``dit.``, ``decoder.``, ``encoder.``,
``text_encoder.``); the file metadata holds ``format = "mochi-bundle"`` and ``config``, a JSON object with
every component config (``dit``, ``decoder``, ``encoder``, ``text_encoder``), the ``tokenizer`` ("byte"),
the request ``defaults`` (frames, height, width, steps, guidance), the ``latent_mean``/``latent_std`` that map
this VAE's latents to the DiT's normalised space, and the model ``name``. The embedded default model
(``mochi/assets/mochi-tiny.safetensors``) is a bundle.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from mochi.models.dit import AsymmDiT, DiTConfig
from mochi.models.latents import LATENT_MEAN, LATENT_STD
from mochi.models.t5 import T5Config, T5Encoder
from mochi.models.tokenizer import ByteTokenizer
from mochi.models.vae import Decoder, DecoderConfig, Encoder, EncoderConfig
from mochi.weights.bundle_config import parse_config, part_config
from mochi.weights.io import WeightsError, load_strict, read_metadata, read_state_dict, save_state_dict
from mochi.weights.quantize import is_quantized

FORMAT = "mochi-bundle"
EMBEDDED = "mochi-tiny.safetensors"
PARTS: dict[str, tuple[type, type]] = {
    "dit": (AsymmDiT, DiTConfig),
    "decoder": (Decoder, DecoderConfig),
    "encoder": (Encoder, EncoderConfig),
    "text_encoder": (T5Encoder, T5Config),
}
TOKENIZERS = {"byte": ByteTokenizer}


class EmbeddedWeightsMissingWarning(UserWarning):
    """The package was installed without its trained tiny model; random weights stand in."""


@dataclass
class _Components:
    """Stand-in with the fields of ``mochi.weights.components.Components``, used only where that module is
    not present (a branch that predates it)."""

    tokenizer: object
    text_encoder: T5Encoder
    dit: AsymmDiT
    decoder: Decoder
    encoder: Encoder | None = None
    defaults: dict = field(default_factory=dict)
    name: str = "custom"
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None


def _components_class() -> type:
    # mochi.weights.components imports this module lazily (load_components(None) → load_embedded), so this
    # module imports it lazily too: no import cycle.
    try:
        from mochi.weights.components import Components
    except ImportError:
        return _Components
    return Components


def _config_of(module: torch.nn.Module):
    return module.config if hasattr(module, "config") else module.cfg


def _parts_of(components) -> dict:
    if isinstance(components, Mapping):
        return dict(components)
    return {
        "dit": components.dit,
        "decoder": components.decoder,
        "encoder": components.encoder,
        "text_encoder": components.text_encoder,
        "defaults": components.defaults,
        "name": components.name,
        "latent_mean": components.latent_mean,
        "latent_std": components.latent_std,
        "tokenizer": components.tokenizer,
    }


def save_bundle(components, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write every component to one safetensors file at ``path`` (atomically).

    components: a ``Components`` or a mapping with the keys ``dit``, ``decoder``, ``encoder``,
    ``text_encoder`` (modules), ``defaults`` (dict), ``latent_mean``, ``latent_std`` (12 floats each) and
    optionally ``name``. dtype: store floating tensors in this dtype (e.g. float16), except the DiT's fp32
    islands (``AsymmDiT.FP32_PARAMS``), which stay float32.
    """
    check_bundle_path(path)
    parts = _parts_of(components)
    for prefix in PARTS:
        module = parts.get(prefix)
        quantized = [name for name, m in module.named_modules() if is_quantized(m)] if module else []
        if quantized:
            # Their weights are int8, fp8 or ggml blocks under other keys: no bundle loader reads them back.
            raise ValueError(
                f"the {prefix} is quantized ({len(quantized)} layers, e.g. {quantized[0]!r}): a bundle "
                "stores unquantized weights; save the unquantized model (load it again without quantize) "
                "and quantize when loading the bundle"
            )
    tokenizer = parts.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str) and not isinstance(tokenizer, ByteTokenizer):
        raise ValueError(f"a bundle stores the byte tokenizer only, got {type(tokenizer).__name__}")
    released = {"latent_mean": LATENT_MEAN, "latent_std": LATENT_STD}
    for key in ("latent_mean", "latent_std"):
        if parts.get(key) is None:  # Components' None: the released AsymmVAE's statistics
            parts[key] = released[key]
        if len(parts[key]) != 12:
            raise ValueError(f"{key} must be 12 floats (one per latent channel), got {parts.get(key)!r}")
    tensors, config = {}, {}
    for prefix in PARTS:
        module = parts.get(prefix)
        if module is None:
            raise ValueError(f"a bundle needs every component; {prefix!r} is missing")
        config[prefix] = asdict(_config_of(module))
        for key, value in module.state_dict().items():
            keep = prefix == "dit" and AsymmDiT.is_fp32_param(key)
            if dtype is not None and value.is_floating_point() and not keep:
                value = value.to(dtype)
            tensors[f"{prefix}.{key}"] = value
    config.update(
        tokenizer="byte",
        defaults=dict(parts["defaults"]),
        latent_mean=[float(v) for v in parts["latent_mean"]],
        latent_std=[float(v) for v in parts["latent_std"]],
        name=parts.get("name") or "custom",
    )
    save_state_dict(tensors, path, {"format": FORMAT, "config": json.dumps(config)})


def check_bundle_path(path: str | os.PathLike) -> None:
    """ValueError unless ``path`` can name a bundle file: a ``.safetensors`` name that is not a folder (the
    loaders recognise a bundle by that suffix)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a folder; give the bundle's file name, e.g. {str(path / 'NAME.safetensors')!r}"
        )
    if path.suffix != ".safetensors":
        name = path.with_suffix(".safetensors") if path.suffix else path.with_name(path.name + ".safetensors")
        raise ValueError(f"a bundle is a .safetensors file, got {str(path)!r}: name it {str(name)!r}")


def is_bundle(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file whose metadata marks a mochi bundle (header only)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - any unreadable header means "not a bundle"
        return False


def bundle_config(path: str | os.PathLike) -> dict:
    """The decoded ``config`` metadata of a bundle, checked (`bundle_config.parse_config`); WeightsError when
    ``path`` is not a bundle or its config is malformed."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{str(path)!r} is not a mochi bundle (metadata format={meta.get('format')!r})")
    return parse_config(meta.get("config"), path, PARTS)


def part_configs(path: str | os.PathLike, config: dict, keys: Iterable[str]) -> dict:
    """Part → its config dataclass, checked against the bundle's tensor ``keys`` (names with prefixes)."""
    keys = list(keys)
    where = f"bundle {os.fspath(path)!r}"
    return {
        prefix: part_config(config_cls, config[prefix], where, sum(k.startswith(prefix + ".") for k in keys))
        for prefix, (_, config_cls) in PARTS.items()
    }


def load_bundle(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Every component of the bundle at ``path``, built on the meta device and loaded strictly.

    Weights are cast to ``dtype`` (float32 by default: the tiny model computes in fp32 on any CPU).
    Returns ``mochi.weights.components.Components``.
    """
    config = bundle_config(path)
    if config.get("tokenizer") not in TOKENIZERS:
        raise WeightsError(f"bundle {str(path)!r} names tokenizer {config.get('tokenizer')!r}; known: byte")
    state = read_state_dict(path)
    configs = part_configs(path, config, state)
    modules = {}
    for prefix, (model_cls, _) in PARTS.items():
        cfg = configs[prefix]
        try:
            with torch.device("meta"):
                module = model_cls(cfg)
        except (ArithmeticError, AssertionError, IndexError, RuntimeError, TypeError, ValueError) as e:
            # The config came from the file: a combination the model cannot take is the file's fault.
            raise WeightsError(f"bundle {str(path)!r}: its {prefix} config builds no model ({e})") from None
        sd = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        load_strict(module, sd, f"{FORMAT} {str(path)!r} ({prefix})")
        modules[prefix] = module.to(dtype).eval()
    return _components_class()(
        tokenizer=TOKENIZERS[config["tokenizer"]](),
        text_encoder=modules["text_encoder"],
        dit=modules["dit"],
        decoder=modules["decoder"],
        encoder=modules["encoder"],
        defaults=dict(config["defaults"]),
        name=config.get("name", "custom"),
        latent_mean=tuple(config["latent_mean"]),
        latent_std=tuple(config["latent_std"]),
    )


EMBEDDED_ALIAS = "embedded:" + EMBEDDED.removesuffix(".safetensors")


def model_alias(model: str | os.PathLike | None, flag: str = "--model") -> str | os.PathLike | None:
    """None (the embedded model) for its name as records write it ("embedded:mochi-tiny"), so that a
    sidecar's "model" can be passed back; any other value as given. A path that exists wins."""
    if not isinstance(model, str) or not model.startswith("embedded:") or Path(model).exists():
        return model
    # "embedded:mochi-tiny (random weights)": the record of a source checkout without the asset.
    if model != EMBEDDED_ALIAS and not model.startswith(EMBEDDED_ALIAS + " ("):
        raise ValueError(
            f"{flag} {model!r} names no embedded model; the one packaged is {EMBEDDED_ALIAS!r}"
            + (f" (or leave {flag} out)" if flag.startswith("--") else "")
        )
    return None


def embedded_path() -> Path:
    """Where the packaged tiny model lives (it may be absent in a source checkout without the asset)."""
    return Path(str(resources.files("mochi") / "assets" / EMBEDDED))


def random_tiny(seed: int = 0):
    """The ``mochi-tiny`` preset with seeded random weights (what ``load_embedded`` falls back to)."""
    from mochi.presets import model_preset

    preset = model_preset("mochi-tiny")
    torch.manual_seed(seed)
    text_encoder = T5Encoder(preset.text_encoder)
    text_encoder.initialize_weights(torch.Generator().manual_seed(seed))
    return _components_class()(
        tokenizer=ByteTokenizer(),
        text_encoder=text_encoder.eval(),
        dit=AsymmDiT(preset.dit).eval(),
        decoder=Decoder(preset.decoder).eval(),
        encoder=Encoder(preset.encoder).eval(),
        defaults=dict(preset.defaults),
        name="mochi-tiny (random weights)",
        latent_mean=(0.0,) * 12,
        latent_std=(1.0,) * 12,
    )


def load_embedded():
    """The embedded default model, ``mochi/assets/mochi-tiny.safetensors``, as ``Components``.

    When the file is absent (a source checkout without the asset), the ``mochi-tiny`` preset is built with
    seeded random weights and an ``EmbeddedWeightsMissingWarning`` says so: the videos will be noise.
    """
    path = embedded_path()
    if path.is_file():
        components = load_bundle(path)
        components.source = str(path)  # where mochi.accel finds its cache calibration
        return components
    warnings.warn(
        f"the embedded model weights {str(path)!r} are not present: using the mochi-tiny preset with RANDOM "
        "weights, so videos will be noise. Reinstall mochi-video, or train them with "
        "`python -m mochi.train.tiny vae|dit|export` (docs/embedded-model.md)",
        EmbeddedWeightsMissingWarning,
        stacklevel=2,
    )
    return random_tiny()
