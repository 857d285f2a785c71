"""A generated video and its JSON sidecar, published as a pair that never disagrees.

Both are written to temporaries first; the sidecar is renamed into place before the video, and an older
video of the same name is removed before either rename, so at no moment does a video stand beside a
sidecar of another run or none at all (a run killed between the renames leaves a sidecar without a
video). The video also carries the parameters itself, as JSON in its ``comment`` tag: everything in the
sidecar except the timings, which differ from run to run and would make the same request's bytes differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mochi.files import atomic_paths
from mochi.video import check_writable, encode_video, video_rate

# Sidecar entries that vary between identical runs, kept out of the video's own copy: the timings, and the
# server's job id and clock times (so that the same request and seed give the same bytes there too).
VOLATILE = ("seconds", "compile_seconds", "id", "created", "started", "finished")


def sidecar_path(video: str | os.PathLike) -> Path:
    return Path(video).with_suffix(".json")


def embedded_parameters(sidecar: dict) -> str:
    """The sidecar as stored in the video's ``comment`` tag: sorted JSON without the ``VOLATILE`` entries."""
    return json.dumps({k: v for k, v in sidecar.items() if k not in VOLATILE}, sort_keys=True)


def write_video_and_sidecar(
    frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: float, sidecar: dict
) -> Path:
    """Write frames (T, H, W, 3) uint8 to ``path`` and ``sidecar`` to ``path`` with ``.json``.

    ``sidecar["fps"]`` is set to the rate really written (``video_rate``). Returns the video path.
    """
    path = Path(path)
    rate = video_rate(fps)
    sidecar = {**sidecar, "fps": float(rate)}
    pixels = check_writable(frames, path)  # as write_video checks (an empty video was written, 0 bytes)
    with atomic_paths([sidecar_path(path), path]) as (tmp_json, tmp_video):
        encode_video(pixels, tmp_video, rate, metadata={"comment": embedded_parameters(sidecar)})
        tmp_json.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return path
