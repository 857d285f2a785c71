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

from mochi.errors import MochiError, one_line
from mochi.files import remove_stale_partials
from mochi.train.checkpoint import save_checkpoint
from mochi.weights.io import WeightsError, torch_load

_STATE = re.compile(r"^step-(\d{6,})\.pt$")


def state_dir(out: Path) -> Path:
    return out / "state"


def save_state(out: Path, step: int, lora: dict[str, torch.Tensor], optimizer: dict, config: dict,
               keep: int = 2, data: str = "", model: str = "") -> Path:  # fmt: skip
    """Write the state after ``step`` completed steps; keep only the newest ``keep`` state files.

    data: the fingerprint of the training data (``LatentDataset.fingerprint``); model: the base model's
    (``train.data.model_fingerprint``); both compared on resume."""
    folder = state_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.pt"
    state = {
        "step": step,
        "lora": {k: v.detach().cpu().clone() for k, v in lora.items()},
        "optimizer": optimizer,
        "config": json.dumps(config, sort_keys=True),
        "data": data,
        "model": model,
    }
    save_checkpoint(state, path)  # byte-identical for identical runs
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


class ResumeError(MochiError):
    """A run folder's training states cannot be resumed (all unreadable, or made from other data)."""


def read_state(path: Path) -> dict:
    """One state file as ``save_state`` wrote it, ``config`` parsed back to a dict; ``WeightsError`` naming
    the file and what is wrong when it is not one."""
    try:
        state = torch_load(path, mmap=False)
        if not isinstance(state, dict) or not {"step", "lora", "optimizer", "config"} <= state.keys():
            raise ValueError("it needs step, lora, optimizer and config")
        state["config"] = json.loads(state["config"])
        if not isinstance(state["step"], int) or isinstance(state["step"], bool):
            raise ValueError(f"step is {state['step']!r}")
    except WeightsError:
        raise
    except (TypeError, ValueError) as e:  # keys are checked first; a non-text config is a TypeError
        raise WeightsError(
            f"{os.fspath(path)!r} is not a train-lora state: {one_line(str(e))[:200]}"
        ) from None
    return state


def load_latest_state(out: Path, *, tidy: bool = True) -> dict | None:
    """The newest readable state of a run (``config`` parsed back to a dict), or None for a fresh run.

    Besides the saved entries the state holds ``path`` (the file read) and ``unreadable``: (file name,
    reason) of each newer state that could not be read, which the caller must report. When states exist
    but none is readable, raises ResumeError naming them. With ``tidy`` (training resumes), temporary files
    that a killed write left behind (``.step-….partial.pt``) are removed; without it (``mochi info``) the
    folder is only read.
    """
    folder = state_dir(out)
    if tidy and folder.is_dir():  # only gone processes' leftovers: a live run may be writing one
        remove_stale_partials(folder)
    unreadable: list[tuple[str, str]] = []
    for path in reversed(list_states(out)):
        try:
            state = read_state(path)
        except WeightsError as e:
            # Atomic writes rule out half-written files, but not a failing disk or a hand-copied folder.
            unreadable.append((path.name, one_line(str(e))[:200]))
            continue
        state["path"] = os.fspath(path)
        state["unreadable"] = unreadable
        return state
    if unreadable:
        names = "; ".join(f"{name}: {why}" for name, why in unreadable)
        raise ResumeError(
            f"{str(out)!r} holds training states but none is readable ({names}); pass --restart to discard "
            "them and train from step 0, or restore them from a backup"
        )
    return None


def clear_states(out: Path) -> list[Path]:
    """Remove what a run wrote (``--restart``): its states, its per-checkpoint and final LoRAs and its sample
    videos, so that nothing of the earlier run sits beside the new one's files. Returns the files removed."""
    removed = [
        *list_states(out),
        *sorted(out.glob("lora-step-*.safetensors")),
        *[p for p in [out / "lora.safetensors"] if p.is_file()],
        *sorted((out / "samples").glob("step-*.mp4")),
    ]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
