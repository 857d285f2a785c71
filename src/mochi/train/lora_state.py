"""Training checkpoints of a LoRA run: written atomically, found again on resume.

A run folder holds ``state/step-NNNNNN.pt`` (LoRA tensors, optimizer state, step, the run's config), the LoRA
of each checkpoint as ``lora-step-NNNNNN.safetensors`` (Genmo's format) and ``config.json``. A state file
appears only complete (temporary file, then rename), so a process killed at any moment leaves the previous
checkpoints intact. Everything random in a step is derived from (seed, step) and the data order from (seed,
epoch), so the step number restores the RNG and the data order; nothing else needs saving.

State files hold only tensors, numbers and strings and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from mochi.files import atomic_path

_STATE = re.compile(r"^step-(\d{6,})\.pt$")


def state_dir(out: Path) -> Path:
    return out / "state"


def save_state(out: Path, step: int, lora: dict[str, torch.Tensor], optimizer: dict, config: dict,
               keep: int = 2) -> Path:  # fmt: skip
    """Write the state after ``step`` completed steps; keep only the newest ``keep`` state files."""
    folder = state_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.pt"
    state = {
        "step": step,
        "lora": {k: v.detach().cpu().clone() for k, v in lora.items()},
        "optimizer": optimizer,
        "config": json.dumps(config, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in list_states(out)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_states(out: Path) -> list[Path]:
    """State files of a run, oldest first."""
    folder = state_dir(out)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STATE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_latest_state(out: Path) -> dict | None:
    """The newest readable state of a run (``config`` parsed back to a dict), or None for a fresh run.

    Temporary files that a killed write left behind (``.step-….partial.pt``) are removed.
    """
    folder = state_dir(out)
    for leftover in folder.glob(".step-*.partial.pt") if folder.is_dir() else []:
        leftover.unlink(missing_ok=True)
    for path in reversed(list_states(out)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError):
            continue  # cannot happen with atomic writes, unless the disk itself failed: try an older one
        state["config"] = json.loads(state["config"])
        state["path"] = os.fspath(path)
        return state
    return None
