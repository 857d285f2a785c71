"""Training checkpoints: model, EMA and optimizer state with the step reached, written atomically.

A checkpoint is a plain dict of tensors, numbers and strings saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so reading one never runs code. The data position is the step itself:
every batch is a pure function of (seed, step), so resuming from step s replays exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from mochi.files import atomic_path
from mochi.presets import MODEL_PRESETS, ModelPreset


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename): a crash leaves the old one.
    Saved through a file object: torch names the zip's entries after a path it is given, and the temporary's
    random name made the same state's files differ."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike) -> dict | None:
    """The state saved at ``path``, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resumable(state: dict, path: str | os.PathLike, settings: Mapping[str, tuple[object, str]]) -> None:
    """Refuse to resume ``state`` (the checkpoint at ``path``) with settings other than those it recorded.

    settings: the checkpoint's key → (this run's value, the option that asks for a value, ``{}`` standing for
    it: "--seed {}"). A key the checkpoint lacks (written before it was recorded) is accepted. ValueError
    names the stored value.
    """
    for key, (value, option) in settings.items():
        if key in state and state[key] != value:
            stored = state[key]
            raise ValueError(
                f"{str(path)!r} was trained with {key} {stored}, but this run asks for {key} {value}: give "
                f"{option.format(stored)} to resume it, or start the other {key} in another run folder"
            )


def preset_configs(preset: ModelPreset, parts: Iterable[str]) -> dict[str, dict]:
    """The configs of ``preset``'s ``parts`` ("encoder", "decoder") as a checkpoint records them (plain
    dicts): what the shapes of those parts' weights follow."""
    return {part: asdict(getattr(preset, part)) for part in parts}


def check_preset(state: dict, path: str | os.PathLike, preset: ModelPreset, export: bool = False) -> None:
    """Refuse to resume (or ``export``) ``state`` with a preset whose parts differ from the configs it
    recorded (``preset_configs``, key "configs"); presets that share those parts are all accepted. A
    checkpoint without them (written before they were recorded) is accepted. ValueError names the presets
    that fit."""
    stored = state.get("configs")
    if stored is None or stored == preset_configs(preset, stored):
        return
    names = [name for name, p in MODEL_PRESETS.items() if preset_configs(p, stored) == stored]
    which = f"--preset {' or '.join(names)}" if names else "the preset it was trained with"
    remedy = "export it" if export else "resume it, or start this preset in another run folder"
    raise ValueError(
        f"{str(path)!r} was trained with another {' and '.join(stored)} than this preset's (that of "
        f"{which}): give {which} to {remedy}"
    )


def load_parts(
    path: str | os.PathLike, modules: Mapping[str, torch.nn.Module], state: dict, export: bool = False
) -> None:
    """Load ``state[name]`` into each of ``modules``; weights of other shapes (a checkpoint of another preset,
    written before presets were recorded) are a one-line ValueError rather than torch's list of them."""
    for name, module in modules.items():
        try:
            module.load_state_dict(state[name])
        except RuntimeError:
            remedy = "" if export else ", or start this preset in another run folder"
            raise ValueError(
                f"the {name} of {str(path)!r} does not fit this preset's (its weights have other shapes or "
                f"keys): give the --preset it was trained with{remedy}"
            ) from None


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·θ for every parameter of ``model`` (keys as in ``named_parameters``)."""
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach(), 1.0 - decay)
