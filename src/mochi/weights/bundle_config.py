"""The ``config`` metadata of a mochi bundle, parsed and checked before any model is built from it.

A bundle's config is data from a file, so it is checked like user input: JSON of the right shape, every
field of the right type, numbers finite and within bounds, and the counts that make a model deep (DiT
``depth``, T5 ``num_layers``, VAE ``num_res_blocks``, the number of VAE stages) no larger than the number of
tensors the bundle holds for that part: a model with more layers than tensors cannot fit the weights, and
building one with a huge depth would run for hours before the strict load could say so. Every failure is a
WeightsError naming the bundle and the field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import MISSING, fields

from mochi.weights.io import WeightsError

LATENT_CHANNELS = 12
MAX_INT = 2**20  # far above any width, vocabulary or count of a Mochi component
# Fields whose value (or sum, for tuples) counts layers; each layer holds at least one tensor.
DEPTH_FIELDS = ("depth", "num_layers", "num_res_blocks")
DEFAULT_TYPES = {"frames": int, "height": int, "width": int, "steps": int, "guidance": float}
LATENTS = ("sample", "mean")


def parse_config(text: str | None, path: str | os.PathLike, parts: Mapping[str, tuple[type, type]]) -> dict:
    """The decoded config of the bundle at ``path``; ``parts`` maps each part to (module, config class)."""
    where = f"bundle {os.fspath(path)!r}"
    if text is None:
        raise WeightsError(f"{where} has no 'config' metadata; it was not written by mochi's save_bundle")
    try:
        config = json.loads(text)
    except ValueError as e:
        raise WeightsError(f"{where}: its 'config' metadata is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise WeightsError(f"{where}: its 'config' metadata must be a JSON object, not {kind}")
    for part in parts:
        if not isinstance(config.get(part), dict):
            raise WeightsError(f"{where}: config[{part!r}] must be a JSON object of {part} settings")
    _check_defaults(config.get("defaults"), where)
    for key in ("latent_mean", "latent_std"):
        values = config.get(key)
        if not (isinstance(values, list) and len(values) == LATENT_CHANNELS and all(map(_finite, values))):
            raise WeightsError(f"{where}: config[{key!r}] must be {LATENT_CHANNELS} finite numbers")
    if not all(v > 0 for v in config["latent_std"]):
        raise WeightsError(f"{where}: config['latent_std'] must be positive")
    if not isinstance(config.get("name", ""), str):
        raise WeightsError(f"{where}: config['name'] must be a string")
    return config


def part_config(cls: type, values: Mapping, where: str, tensors: int):  # noqa: ANN201 - a config dataclass
    """The config dataclass ``cls`` from its JSON form (lists back to tuples), every field checked.

    tensors: how many tensors the bundle holds for this part, the bound of every depth field.
    """
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise WeightsError(f"{where}: config for {cls.__name__} has unknown fields {sorted(unknown)}")
    out = {}
    for name, value in values.items():
        kind = _type_name(known[name].type)
        label = f"{where}: {cls.__name__}.{name}={value!r}"
        if kind.startswith("tuple"):
            item = kind.removeprefix("tuple[").split(",")[0].strip()
            if not isinstance(value, list) or not all(_of_type(v, item) for v in value):
                raise WeightsError(f"{label} must be a list of {item} values")
            if len(value) > MAX_INT:
                raise WeightsError(f"{label} is too long")
            value = tuple(value)
        elif not _of_type(value, kind) or (kind == "int" and value < 1):
            # Every scalar count or width is at least 1; only list items (res blocks per stage) may be 0.
            raise WeightsError(f"{label} must be {'a positive int' if kind == 'int' else 'a ' + kind}")
        if name in DEPTH_FIELDS:
            count = sum(value) if isinstance(value, tuple) else value
            if count > tensors:
                raise WeightsError(
                    f"{label} asks for more layers than the bundle holds tensors for this part ({tensors})"
                )
        out[name] = value
    for name, f in known.items():  # a missing depth field takes the default, which must fit as well
        if name in DEPTH_FIELDS and name not in out and f.default is not MISSING:
            default = f.default
            if (sum(default) if isinstance(default, tuple) else default) > tensors:
                raise WeightsError(f"{where}: config for {cls.__name__} lacks {name!r}")
    if "channel_multipliers" in out and len(out["channel_multipliers"]) > tensors:
        raise WeightsError(f"{where}: {cls.__name__}.channel_multipliers has more stages than tensors")
    try:
        return cls(**out)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{where}: config for {cls.__name__} is not valid ({e})") from None


def _check_defaults(defaults: object, where: str) -> None:
    if not isinstance(defaults, dict):
        raise WeightsError(f"{where}: config['defaults'] must be a JSON object (frames, height, width, ...)")
    for key, kind in DEFAULT_TYPES.items():
        value = defaults.get(key)
        if not _of_type(value, kind.__name__) or not value > 0:
            raise WeightsError(
                f"{where}: config['defaults'][{key!r}]={value!r} must be a positive {kind.__name__}"
            )
    for key, rule in (("eta", "[0, 1]"), ("eta_above", "[0, 1)")):  # optional (the ancestral sampler)
        value = defaults.get(key, 0.0)
        if not _of_type(value, "float") or not (0.0 <= value <= 1.0 if key == "eta" else 0.0 <= value < 1.0):
            raise WeightsError(f"{where}: config['defaults'][{key!r}]={value!r} must be a number in {rule}")
    if defaults.get("latents", "sample") not in LATENTS:
        raise WeightsError(f"{where}: config['defaults']['latents'] must be one of {list(LATENTS)}")


def _type_name(annotation: object) -> str:
    """ "int", "tuple[int, ...]": the annotation as written, whether or not annotations are postponed."""
    if isinstance(annotation, str) or hasattr(annotation, "__origin__"):
        return str(annotation)
    return getattr(annotation, "__name__", str(annotation))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _of_type(value: object, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT
    if kind == "float":
        return _finite(value) and abs(value) <= MAX_INT
    if kind == "str":
        return isinstance(value, str)
    return False
