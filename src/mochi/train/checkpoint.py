"""Training checkpoints: model, EMA and optimizer state with the step reached, written atomically.

A checkpoint is a plain dict of tensors, numbers and strings saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so reading one never runs code. The data position is the step itself:
every batch is a pure function of (seed, step), so resuming from step s replays exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mochi.files import atomic_path


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename): a crash leaves the old one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict | None:
    """The state saved at ``path``, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·θ for every parameter of ``model`` (keys as in ``named_parameters``)."""
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach(), 1.0 - decay)
