"""Fine-tuning data: videos with captions → cached VAE latents and T5 features (genmo-mochi.md §6.2).

``prepare_data`` takes every video in a folder that has a same-stem ``.txt`` caption, keeps its first N
frames, centre-crops them to the target aspect, resizes them (never up: a clip whose crop is smaller than
the target is skipped), and encodes them with the VAE encoder (mean and log-variance, raw VAE space, as
Genmo caches them) and the caption with T5. Each clip becomes one safetensors file, written atomically, so
an interrupted run leaves only whole files, and a re-run skips clips already cached at the same settings.

A bad input never stops the run: it is listed, with the reason, in the report returned (and written as
``prepare_report.json``). ``LatentDataset`` reads the cache back for training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mochi.files import atomic_write_text
from mochi.request import SPATIAL_MULTIPLE, check_frames, check_multiple
from mochi.weights.io import WeightsError, read_metadata, read_state_dict, save_state_dict

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
REPORT_NAME = "prepare_report.json"


@dataclass
class PrepareReport:
    """What a run did: clips encoded now, clips found already cached, and (file, reason) for each skip."""

    encoded: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{len(self.encoded)} encoded, {len(self.cached)} already cached, {len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _settings(frames: int, width: int, height: int) -> dict[str, str]:
    return {"frames": str(frames), "width": str(width), "height": str(height)}


def _is_cached(path: Path, settings: dict[str, str]) -> bool:
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except Exception:  # noqa: BLE001 - a foreign or damaged file is simply redone
        return False
    return all(meta.get(k) == v for k, v in settings.items())


def _clip(video: Path, frames: int, width: int, height: int) -> torch.Tensor:
    """The first ``frames`` frames, cropped and resized: uint8 (T, H, W, 3). Raises ValueError why not."""
    from mochi.video import fit_frames, read_video

    pixels, _ = read_video(video, max_frames=frames)
    if pixels.shape[0] < frames:
        raise ValueError(f"too short: {pixels.shape[0]} frames, need {frames}")
    h, w = pixels.shape[1:3]
    crop_h, crop_w = (
        (h, round(h * width / height)) if h * width <= w * height else (round(w * height / width), w)
    )
    if crop_h < height or crop_w < width:
        raise ValueError(f"too small: {w}x{h} crops to {crop_w}x{crop_h}, need at least {width}x{height}")
    return torch.from_numpy(fit_frames(pixels, frames, height, width))


def prepare_data(
    videos_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    components,  # noqa: ANN001 - mochi.weights.components.Components
    frames: int,
    width: int,
    height: int,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> PrepareReport:
    """Encode every captioned video of ``videos_dir`` into ``out_dir/<stem>.safetensors``.

    Each file holds ``mean`` and ``logvar`` (12, t, h/8, w/8) float32 in raw VAE space and ``text``
    (n, D) float32, the caption's n valid T5 tokens (an empty caption has none); its metadata holds the
    caption, source name and settings. ``progress(done, total, name)`` is called once before the first
    video (done = 0) and after each. Frames are taken as decoded, without resampling the frame rate.
    """
    from mochi.models.prompts import encode_prompts
    from mochi.models.vae_tiling import encode

    check_frames(frames)
    check_multiple(width, SPATIAL_MULTIPLE, "width")
    check_multiple(height, SPATIAL_MULTIPLE, "height")
    src, out = Path(videos_dir), Path(out_dir)
    if not src.is_dir():
        raise ValueError(f"videos folder {str(src)!r} does not exist")
    if components.encoder is None:
        raise ValueError("this model has no VAE encoder; prepare-data needs one (pass --vae PATH)")
    out.mkdir(parents=True, exist_ok=True)
    videos = sorted(p for p in src.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    settings = _settings(frames, width, height)
    report = PrepareReport()
    encoder, text_encoder = components.encoder, components.text_encoder
    if progress is not None:
        progress(0, len(videos), "")
    for done, video in enumerate(videos, 1):
        target = out / f"{video.stem}.safetensors"
        try:
            if _is_cached(target, settings):
                report.cached.append(video.name)
                continue
            caption_file = video.with_suffix(".txt")
            if not caption_file.is_file():
                raise ValueError(f"no caption: {caption_file.name} is missing")
            caption = caption_file.read_text(encoding="utf-8").strip()
            clip = _clip(video, frames, width, height)
            x = clip.permute(3, 0, 1, 2)[None].to(device, torch.float32) / 127.5 - 1.0  # (1, 3, T, H, W)
            with torch.no_grad():
                mean, logvar = encode(encoder.to(device), x)
            feats, mask = encode_prompts([caption], components.tokenizer, text_encoder.to(device))
            tensors = {
                "mean": mean[0].float().cpu(),
                "logvar": logvar[0].float().cpu(),
                "text": feats[0][mask[0]].float().cpu(),
            }
            save_state_dict(tensors, target, {**settings, "caption": caption, "source": video.name})
            report.encoded.append(video.name)
        except (ValueError, OSError) as e:  # VideoError and UnicodeDecodeError are ValueErrors
            report.skipped.append((video.name, str(e)))
        except Exception as e:  # noqa: BLE001 - one clip must never stop the run; the report names it
            report.skipped.append((video.name, f"{type(e).__name__}: {e}"))
        finally:
            if progress is not None:
                progress(done, len(videos), video.name)
    atomic_write_text(out / REPORT_NAME, json.dumps(asdict(report), indent=2) + "\n")
    return report


@dataclass
class Example:
    """One cached clip: raw VAE mean/logvar (12, t, h, w), T5 tokens (n, D), its caption and name."""

    mean: torch.Tensor
    logvar: torch.Tensor
    text: torch.Tensor
    caption: str
    name: str


class LatentDataset:
    """The cached clips of a ``prepare_data`` folder, in file-name order, all held in memory."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"data folder {str(folder)!r} does not exist; make it with `mochi prepare-data`")
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"data folder {str(folder)!r} holds no clips; run `mochi prepare-data` first")
        self.examples: list[Example] = []
        for f in files:
            sd, meta = read_state_dict(f), read_metadata(f)
            if not {"mean", "logvar", "text"} <= sd.keys():
                raise WeightsError(f"{str(f)!r} is not a prepared clip (needs mean, logvar and text)")
            self.examples.append(
                Example(sd["mean"], sd["logvar"], sd["text"], meta.get("caption", ""), f.stem)
            )
        shapes = {tuple(e.mean.shape) for e in self.examples}
        if len(shapes) != 1:
            raise ValueError(
                f"data folder {str(folder)!r} mixes latent shapes {sorted(shapes)}; prepare every clip "
                "with the same --frames/--width/--height"
            )
        self.settings = {
            k: int(v) for k, v in read_metadata(files[0]).items() if k in ("frames", "width", "height")
        }

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]
