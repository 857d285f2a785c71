"""Fine-tuning data: videos with captions → cached VAE latents and T5 features (genmo-mochi.md §6.2).

``prepare_data`` takes every video in a folder that has a same-stem ``.txt`` caption, keeps its first N
frames, centre-crops them to the target aspect, resizes them (never up: a clip whose crop is smaller than
the target is skipped), and encodes them with the VAE encoder (mean and log-variance, raw VAE space, as
Genmo caches them) and the caption with T5. Each clip becomes one safetensors file, written atomically, so
an interrupted run leaves only whole files. A cached clip is reused only when its content key matches: a
hash of the video's bytes, the caption, the settings and the model's weights (a changed caption or video is
encoded again); cache files of videos that are gone or now skipped are removed, so training never sees
stale data.

A bad clip never stops the run: it is listed, with the reason, in the report returned (and written as
``prepare_report.json``); so are videos whose names differ only in the suffix (``dup.mp4``, ``dup.mkv``:
one cache file each cannot hold both). A full or read-only disk stops the run at once, and a folder without
videos is an error naming what it holds. ``LatentDataset`` reads the cache back for training.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mochi.errors import DISK_ERRNOS, OutputError
from mochi.files import atomic_write_text, safetensors_in
from mochi.finite import check_finite
from mochi.models.tokenizer import truncations
from mochi.request import SPATIAL_MULTIPLE, check_frames, check_multiple
from mochi.video import UNCAPPED_SUFFIXES, UncappedContainer
from mochi.weights.io import WeightsError, read_metadata, read_state_dict, save_state_dict

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
# MPEG program streams and FLV: PyAV cannot give their decoders options before it probes them, so they
# cannot be opened with the frame-size cap every video is decoded under (mochi.video.open_video).
NOT_READ = tuple(UNCAPPED_SUFFIXES)
REPORT_NAME = "prepare_report.json"
# The tensors of a prepared clip (``prepare_data`` writes them; the dataset and `mochi info` look for them).
CLIP_TENSORS = frozenset({"mean", "logvar", "text"})


@dataclass
class PrepareReport:
    """What a run did: clips encoded now, clips found already cached, and (file, reason) for each skip."""

    encoded: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # stale cache files of videos now gone or skipped
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (file, what): e.g. a caption cut short

    def summary(self) -> str:
        lines = [
            f"{len(self.encoded)} encoded, {len(self.cached)} already cached, {len(self.skipped)} skipped"
            + (f", {len(self.removed)} stale cache file(s) removed" if self.removed else "")
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        lines += [f"  removed {name}: its video is gone or was skipped" for name in self.removed]
        lines += [f"  warning {name}: {what}" for name, what in self.warnings]
        return "\n".join(lines)


def _settings(frames: int, width: int, height: int) -> dict[str, str]:
    return {"frames": str(frames), "width": str(width), "height": str(height)}


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(components) -> str:  # noqa: ANN001 - Components
    """A short hash of the VAE encoder's and T5's weights (their shapes and first values): latents cached
    with another model are not reused."""
    digest = hashlib.sha256()
    for module in (components.encoder, components.text_encoder):
        for name, t in sorted(module.state_dict().items()):
            head = t.detach().flatten()[:64].float().cpu().numpy().tobytes()
            digest.update(f"{name}{tuple(t.shape)}".encode() + head)
    return digest.hexdigest()[:16]


def content_key(video: Path, caption: str, settings: dict[str, str], model: str) -> str:
    """What a cached clip depends on: the video's bytes, the caption, the settings and the model."""
    parts = [_file_hash(video), caption, json.dumps(settings, sort_keys=True), model]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _cached_key(path: Path) -> str | None:
    """The content key a cache file was written for; None when there is no readable one."""
    if not path.is_file():
        return None
    try:
        return read_metadata(path).get("key")
    except (WeightsError, OSError):  # a foreign or damaged file is simply redone
        return None


def _remove_stale(path: Path) -> bool:
    """Remove a cache file a previous run wrote (its metadata names a source); True when one was removed."""
    try:
        ours = path.is_file() and "source" in read_metadata(path)
    except (WeightsError, OSError):
        ours = False
    if ours:
        path.unlink()
    return ours


def _odd_entries(src: Path) -> list[tuple[str, str]]:
    """(name, why) of what looks like input but is not read: entries named like videos that are no files
    (a broken link, a folder), and subfolders holding videos (only the folder's own files are read)."""
    odd = []
    for p in sorted(src.iterdir()):
        if p.suffix.lower() in VIDEO_SUFFIXES and not p.is_file():
            odd.append((p.name, "a broken link" if p.is_symlink() and not p.exists() else "not a file"))
        elif p.is_dir() and any(q.suffix.lower() in VIDEO_SUFFIXES for q in p.iterdir()):
            odd.append((p.name + "/", "a subfolder: only the videos directly in the folder are read"))
    odd += [(p.name, _not_read(p)) for p in _mpeg(src)]
    # A caption whose clip is in a container not read here (clip.ogv): listed, not dropped unseen.
    names = {p.name for p in src.iterdir()}
    stems = {Path(n).stem for n in names if Path(n).suffix.lower() in (*VIDEO_SUFFIXES, *NOT_READ)}
    for caption in sorted(n for n in names if Path(n).suffix.lower() == ".txt" and Path(n).stem not in stems):
        stem = Path(caption).stem
        for other in sorted(n for n in names if Path(n).stem == stem and Path(n).suffix.lower() != ".txt"):
            odd.append(
                (
                    other,
                    f"captioned by {caption}, but {Path(other).suffix or 'no suffix'} is not a video suffix "
                    f"prepare-data reads ({', '.join(VIDEO_SUFFIXES)}); convert it to .mp4",
                )
            )
    return odd


def _mpeg(src: Path) -> list[Path]:
    """The files of ``src`` in containers not read (``NOT_READ``), listed as skipped, captioned or not."""
    return sorted(p for p in src.iterdir() if p.suffix.lower() in NOT_READ and p.is_file())


def _not_read(video: Path) -> str:
    """Why ``video`` is not read: reading it would raise this (``mochi.video.open_video``)."""
    return str(UncappedContainer(video, UNCAPPED_SUFFIXES[video.suffix.lower()]))


def _inputs(src: Path) -> tuple[list[Path], dict[Path, str]]:
    """The videos of ``src`` and, for each video sharing its stem with another, why it is skipped.

    Raises ValueError when there is no video at all, naming what the folder holds instead.
    """
    videos = sorted(p for p in src.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not videos:
        captions = sorted(p.name for p in src.glob("*.txt"))
        mpeg = [p.name for p in _mpeg(src)]
        held = (
            f"it holds {len(mpeg)} MPEG program stream or FLV file(s) ({', '.join(mpeg[:5])}), which are "
            "not read: convert them to .mp4"
            if mpeg
            else f"it holds {len(captions)} caption(s) ({', '.join(captions[:5])}) but not their videos"
            if captions
            else "it is empty of videos"
        )
        raise ValueError(
            f"videos folder {str(src)!r} holds no video ({', '.join(VIDEO_SUFFIXES)}): {held}; put each "
            "video beside a same-stem .txt caption"
        )
    by_stem: dict[str, list[Path]] = {}
    for v in videos:
        by_stem.setdefault(v.stem, []).append(v)
    clashes = {}
    for group in by_stem.values():
        for v in group if len(group) > 1 else ():
            others = ", ".join(o.name for o in group if o != v)
            clashes[v] = f"same name as {others}: both would be cached as {v.stem}.safetensors; rename one"
    return videos, clashes


def _no_caption(caption_file: Path) -> str:
    """Why ``caption_file``, which is no file, is not a caption: missing (naming a caption of another case
    of its suffix that is there), a folder, or a broken link."""
    name = caption_file.name
    if caption_file.is_symlink() and not caption_file.exists():
        return f"{name} is a broken link"
    if caption_file.exists():
        return f"{name} is a folder, not a text file"
    near = sorted(
        p.name
        for p in caption_file.parent.glob(f"{glob.escape(caption_file.stem)}.*")
        if p.suffix.lower() == ".txt" and p.name != name and p.is_file()
    )
    return f"{name} is missing" + (f" ({near[0]} is there: name it {name})" if near else "")


def _clip(video: Path, frames: int, width: int, height: int) -> torch.Tensor:
    """The first ``frames`` frames, cropped and resized: uint8 (T, H, W, 3). Raises ValueError why not."""
    from mochi.video import read_video, video_size

    h, w = video_size(video)
    crop_h, crop_w = (
        (h, round(h * width / height)) if h * width <= w * height else (round(w * height / width), w)
    )
    if crop_h < height or crop_w < width:
        raise ValueError(f"too small: {w}x{h} crops to {crop_w}x{crop_h}, need at least {width}x{height}")
    pixels, _ = read_video(video, max_frames=frames, size=(height, width))  # fitted frame by frame
    if pixels.shape[0] < frames:
        raise ValueError(f"too short: {pixels.shape[0]} frames, need {frames}")
    return torch.from_numpy(pixels)


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
    videos, clashes = _inputs(src)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(frames, width, height)
    model = model_fingerprint(components)
    report = PrepareReport()
    report.skipped += [(v.name, why) for v, why in clashes.items()] + _odd_entries(src)
    encoder, text_encoder = components.encoder, components.text_encoder
    if progress is not None:
        progress(0, len(videos), "")
    for done, video in enumerate(videos, 1):
        target = out / f"{video.stem}.safetensors"
        try:
            if video in clashes:
                continue
            caption_file = video.with_suffix(".txt")
            if not caption_file.is_file():
                raise ValueError(f"no caption: {_no_caption(caption_file)}")
            try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the caption
                caption = caption_file.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"caption {caption_file.name} is not UTF-8 text ({e.reason} at byte {e.start})"
                ) from None
            key = content_key(video, caption, settings, model)
            if _cached_key(target) == key:
                report.cached.append(video.name)
                continue
            clip = _clip(video, frames, width, height)
            x = clip.permute(3, 0, 1, 2)[None].to(device, torch.float32) / 127.5 - 1.0  # (1, 3, T, H, W)
            with torch.no_grad():
                mean, logvar = encode(encoder.to(device), x)
            with truncations() as said:  # a caption cut short goes in the report
                feats, mask = encode_prompts([caption], components.tokenizer, text_encoder.to(device))
            report.warnings += [(caption_file.name, m.replace("prompt 0", "the caption", 1)) for m in said]
            tensors = {
                "mean": mean[0].float().cpu(),
                "logvar": logvar[0].float().cpu(),
                "text": feats[0][mask[0]].float().cpu(),
            }
            meta = {**settings, "caption": caption, "source": video.name, "key": key, "model": model}
            save_state_dict(tensors, target, meta)
            report.encoded.append(video.name)
        except OutputError:
            raise  # a full or read-only disk fails every clip alike: stop now, not at the end
        except OSError as e:
            if e.errno in DISK_ERRNOS:
                raise
            report.skipped.append((video.name, str(e)))
        except ValueError as e:  # VideoError and UnicodeDecodeError are ValueErrors
            report.skipped.append((video.name, str(e)))
        except Exception as e:  # noqa: BLE001 - one clip must never stop the run; the report names it
            report.skipped.append((video.name, f"{type(e).__name__}: {e}"))
        finally:
            if progress is not None:
                progress(done, len(videos), video.name)
    # A clip cached by an earlier run whose video is now skipped, gone or renamed must not be trained on.
    # A run that prepared nothing removes nothing: it fails (a mistyped --frames or size skips every video
    # alike), and the clips an earlier run cached, hours of encoding with the released VAE, stay.
    current = {out / f"{v.stem}.safetensors" for v in videos if v.name not in dict(report.skipped)}
    for old in safetensors_in(out) if report.encoded or report.cached else ():
        if old not in current and _remove_stale(old):
            report.removed.append(old.name)
    atomic_write_text(out / REPORT_NAME, json.dumps(asdict(report), indent=2) + "\n")
    return report


def _check_clip(file: Path, sd: dict[str, torch.Tensor]) -> None:
    """``sd`` holds what ``prepare_data`` writes: float ``mean`` and ``logvar`` of one shape (channels, t, h,
    w), none of them empty, and float ``text`` (tokens, width), all finite; WeightsError naming ``file``
    otherwise (such a clip failed inside the first step, or trained on NaN as a "diverged" run)."""
    for name in sorted(CLIP_TENSORS):
        if not sd[name].is_floating_point():
            raise WeightsError(
                f"{str(file)!r}: {name} is {str(sd[name].dtype).removeprefix('torch.')}; a prepared clip "
                "holds floating point tensors (prepare it again)"
            )
    mean, logvar, text = sd["mean"], sd["logvar"], sd["text"]
    if mean.ndim != 4 or mean.numel() == 0 or logvar.shape != mean.shape or text.ndim != 2:
        raise WeightsError(
            f"{str(file)!r} holds mean {tuple(mean.shape)}, logvar {tuple(logvar.shape)} and text "
            f"{tuple(text.shape)}; a prepared clip holds mean and logvar of one shape (channels, t, h, w), "
            "none of them 0, and text (tokens, width) (prepare it again)"
        )
    check_finite({k: sd[k] for k in sorted(CLIP_TENSORS)}, f"prepared clip {str(file)!r}")


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
        files = safetensors_in(folder)
        if not files:
            raise ValueError(f"data folder {str(folder)!r} holds no clips; run `mochi prepare-data` first")
        self.examples: list[Example] = []
        digest = hashlib.sha256()
        models: set[str] = set()
        for f in files:
            sd, meta = read_state_dict(f), read_metadata(f)
            if meta.get("model"):
                models.add(meta["model"])
            digest.update(f"{f.name}\0{meta.get('key') or _file_hash(f)}\0".encode())
            if not sd.keys() >= CLIP_TENSORS:
                raise WeightsError(f"{str(f)!r} is not a prepared clip (needs mean, logvar and text)")
            _check_clip(f, sd)
            self.examples.append(
                Example(sd["mean"], sd["logvar"], sd["text"], meta.get("caption", ""), f.stem)
            )
        if len(models) > 1:  # their T5 features may not even have one width (it failed deep in torch)
            raise ValueError(
                f"data folder {str(folder)!r} mixes clips prepared with {len(models)} models "
                f"({', '.join(sorted(models))}); prepare every clip with the model you train"
            )
        self.model = next(iter(models), None)  # ``model_fingerprint`` of the model that prepared them
        shapes = {tuple(e.mean.shape) for e in self.examples}
        if len(shapes) != 1:
            raise ValueError(
                f"data folder {str(folder)!r} mixes latent shapes {sorted(shapes)}; prepare every clip "
                "with the same --frames/--width/--height"
            )
        widths = {e.text.shape[1] for e in self.examples}
        if len(widths) != 1:  # other T5s: the batch failed in the DiT at the first step drawing both
            raise ValueError(
                f"data folder {str(folder)!r} mixes text features of widths {sorted(widths)}; prepare every "
                "clip with the model you train"
            )
        # Which clips, with which content: a resumed run checks that its data did not change under it.
        self.fingerprint = f"{len(files)} clips, sha256 {digest.hexdigest()[:16]}"
        self.names = [f.name for f in files]
        self.settings = {}
        for k, v in read_metadata(files[0]).items():
            if k in ("frames", "width", "height"):
                if not v.isdecimal():  # int() named neither the file nor the field
                    raise WeightsError(
                        f"{str(files[0])!r}: metadata {k!r} is {v!r}; a prepared clip records it as a whole "
                        "number (prepare it again)"
                    )
                self.settings[k] = int(v)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]
