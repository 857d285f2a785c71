"""Reading and writing video files through PyAV, which brings its own FFmpeg (no system ffmpeg needed).

Written files are H.264 in yuv420p, playable everywhere, and appear atomically: a temporary file beside the
target is renamed onto it only once complete, so an interrupted run leaves no partial video.
"""

from __future__ import annotations

import contextlib
import errno
import math
import numbers
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mochi.files import atomic_path

if TYPE_CHECKING:
    import av

CONTAINERS = (".mp4", ".mov", ".mkv")
# Frame rates a written file may have; the rate is stored as a fraction with a denominator ≤ 1001.
MIN_FPS, MAX_FPS = 0.1, 1000.0
# x264 settings beyond the CRF. mb-tree rate control made repeated encodes of the same frames differ
# (10 distinct files in 12 encodes on a many-core machine, decoded pixels up to 38/255 apart); without it
# x264 is reproducible. At CRF 18 the file grows and PSNR rises slightly (docs/pipeline.md, "Output files").
X264_PARAMS = "no-mbtree=1"
# The widest and tallest frame x264 encodes (its encoder refuses to open beyond it).
MAX_SIDE = 16384
# The largest frame decoded (8K UHD): ffmpeg's decoder refuses larger ones before allocating them, so a
# small file claiming 16000x16000 frames (a PNG sequence is one) costs no gigabytes. Mochi's inputs are
# resized to at most 1280 pixels a side.
MAX_FRAME_PIXELS = 7680 * 4320
# Streams given the decoder options while a container is probed (the list is per stream index; an audio
# stream may come first).
_PROBED_STREAMS = 16
# Containers that declare their streams only as the file is probed, by their first bytes: PyAV cannot give
# their decoders the frame-size cap before the probe decodes a first frame, so ``open_video`` refuses them.
_MPEG_PS, _FLV = "an MPEG program stream (.mpg, .mpeg, .vob)", "a Flash video (.flv)"
_UNCAPPED = ((b"\x00\x00\x01\xba", _MPEG_PS, ".mpg"), (b"FLV", _FLV, ".flv"))
# The suffixes of those containers, and what each is: prepare-data lists such files as not read.
UNCAPPED_SUFFIXES = {".mpg": _MPEG_PS, ".mpeg": _MPEG_PS, ".vob": _MPEG_PS, ".flv": _FLV}
_LATE_STREAMS = "a container that declares its streams only as it is probed"


class VideoError(ValueError):
    """A video file cannot be read, or frames cannot be written as asked."""


class UncappedContainer(VideoError):
    """A container whose streams appear only once probed (``kind`` names it): ``open_video`` refuses it."""

    def __init__(self, path: str | os.PathLike, kind: str, suffix: str = "") -> None:
        name, stem = Path(path).name, Path(path).stem
        super().__init__(
            f"{name!r} is {kind}, which is not read: its decoder cannot be given the frame-size cap before "
            f"it is probed; convert it, e.g. ffmpeg -i {name} {stem}.mp4"
        )
        self.kind, self.suffix = kind, suffix  # suffix: the container's usual one ("" when not known)


def to_uint8(frames: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Frames (T, H, W, 3) → uint8 array (T, H, W, 3), contiguous.

    uint8 input is returned unchanged. Float input is mapped from ``value_range`` ((0, 1) for pipeline
    frames, (−1, 1) for raw VAE output) to [0, 255], clipped, and *rounded* to nearest (ties to even), not
    truncated: truncation darkens every pixel by half a level on average.
    """
    if isinstance(frames, torch.Tensor) and frames.dtype in (torch.bfloat16, torch.float16):
        frames = frames.float()  # numpy has no bfloat16: .numpy() raised "unsupported ScalarType"
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise VideoError(f"frames must have shape (T, H, W, 3), got {tuple(array.shape)}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise VideoError(f"frames must be uint8 or floating point, got {array.dtype}")
    finite = np.isfinite(array)
    if not finite.all():  # NaN would be written as black and inf as white: a broken run, not a video
        bad = array[~finite]
        kinds = ", ".join(k for k, n in (("NaN", np.isnan(bad).sum()), ("inf", np.isinf(bad).sum())) if n)
        raise VideoError(
            f"frames hold {bad.size} non-finite values ({kinds}) of {array.size}; every value must be finite "
            "(a NaN or inf frame comes from a failed run, never a video to write)"
        )
    # A range of strings failed in numpy; one ending at inf scaled every pixel to 0 and wrote a black video.
    pair = isinstance(value_range, tuple | list) and len(value_range) == 2
    if not pair or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) and math.isfinite(v)
        for v in value_range
    ):
        raise VideoError(
            f"value_range={value_range!r} must be two finite numbers (low, high), e.g. (0.0, 1.0)"
        )
    low, high = value_range
    if not high > low:
        raise VideoError(f"value_range must be (low, high) with high > low, got {value_range}")
    scaled = (array.astype(np.float64) - low) * (255.0 / (high - low))
    return np.ascontiguousarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def video_rate(fps: float) -> Fraction:
    """The frame rate a video written at ``fps`` really has; ValueError names the valid range.

    fps: any real number (int, float, a numpy scalar, a one-element torch tensor), not a bool.
    """
    if isinstance(fps, torch.Tensor) and fps.numel() == 1 and fps.dtype != torch.bool:
        fps = fps.item()
    if isinstance(fps, bool | np.bool_) or not isinstance(fps, numbers.Real):
        raise VideoError(
            f"fps={fps!r} must be a number from {MIN_FPS:g} to {MAX_FPS:g}, not a {type(fps).__name__}; "
            "e.g. 30"
        )
    value = float(fps)
    if not (math.isfinite(value) and MIN_FPS <= value <= MAX_FPS):
        nearest = 30.0 if math.isnan(value) else min(max(value, MIN_FPS), MAX_FPS)
        raise VideoError(
            f"fps={fps} must be a number from {MIN_FPS:g} to {MAX_FPS:g}; nearest valid: {nearest:g}"
        )
    return Fraction(value).limit_denominator(1001)


def write_video(
    frames: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    fps: float = 30,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    crf: int = 18,
    lossless: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write frames (T, H, W, 3) as H.264/yuv420p at ``fps`` (Genmo writes 30). Returns the path written.

    frames: uint8, or float in ``value_range`` (see ``to_uint8``). H and W must be even (yuv420p halves the
    colour planes). crf: x264 constant rate factor, 0 = lossless luma … 51; 18 is visually near-lossless.
    ``lossless``: H.264 in RGB (libx264rgb, crf 0) instead, read back bit for bit — for training clips:
    the embedded model's tiny VAE encodes yuv420p's colour fringes into visibly different latents.
    ``metadata``: container tags (e.g. ``comment``), stored in the file itself. The same frames, rate and
    metadata give the same bytes on every run. ``fps`` must lie within [MIN_FPS, MAX_FPS] (``video_rate``).
    """
    path = Path(path)
    rate = video_rate(fps)
    pixels = check_writable(frames, path, value_range, crf, lossless, metadata)
    with atomic_path(path) as tmp:
        encode_video(pixels, tmp, rate, crf=crf, lossless=lossless, metadata=metadata)
    return path


def check_writable(
    frames: torch.Tensor | np.ndarray,
    path: Path,
    value_range: tuple[float, float] = (0.0, 1.0),
    crf: int = 18,
    lossless: bool = False,
    metadata: dict[str, str] | None = None,
) -> np.ndarray:
    """``frames`` as uint8 (``to_uint8``), once ``path`` and every setting is one ``encode_video`` can write:
    VideoError naming the first that is not (checked before any file is opened)."""
    if path.suffix.lower() not in CONTAINERS:
        raise VideoError(f"video path {str(path)!r} must end in one of {', '.join(CONTAINERS)} (e.g. .mp4)")
    if not isinstance(lossless, bool | np.bool_):  # "no" is truthy: it wrote a lossless RGB file
        raise VideoError(f"lossless={lossless!r} must be True or False")
    if isinstance(crf, bool | np.bool_) or not isinstance(crf, numbers.Integral):
        raise VideoError(
            f"crf={crf!r} must be a whole number from 0 to 51, not {type(crf).__name__}; e.g. 18"
        )
    if not 0 <= crf <= 51:
        raise VideoError(f"crf must be between 0 and 51, got {crf}; 18 is near-lossless, 23 x264's default")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise VideoError(f"metadata={metadata!r:.60} must be a dict of strings to strings (container tags)")
    pixels = to_uint8(frames, value_range)
    t, h, w, _ = pixels.shape
    if t == 0:
        raise VideoError("cannot write a video with no frames")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise VideoError(
            f"frame size {w}x{h} is beyond the H.264 encoder's limit of {MAX_SIDE} pixels a side; scale it "
            f"to at most {min(w, MAX_SIDE)}x{min(h, MAX_SIDE)}"
        )
    if (h % 2 or w % 2) and not lossless:
        raise VideoError(
            f"frame size {w}x{h} must be even in both dimensions for yuv420p; crop to {w - w % 2}x{h - h % 2}"
        )
    return pixels


def encode_video(
    pixels: np.ndarray,
    path: str | os.PathLike,
    rate: Fraction,
    *,
    crf: int = 18,
    lossless: bool = False,
    metadata: dict[str, str] | None = None,
) -> None:
    """Encode uint8 frames (T, H, W, 3) to ``path`` directly (no temporary; see ``write_video``)."""
    import av

    _, h, w, _ = pixels.shape
    # bitexact: no random ids or dates in the container (Matroska wrote both, so two encodes of one video
    # differed), nor the muxer's version string.
    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as container:
        container.metadata.update(metadata or {})
        codec, pix_fmt = ("libx264rgb", "rgb24") if lossless else ("libx264", "yuv420p")
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = {"crf": "0" if lossless else str(crf), "x264-params": X264_PARAMS}
        for image in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@contextlib.contextmanager
def open_video(
    path: str | os.PathLike, max_pixels: int | None = None
) -> Iterator[av.container.InputContainer]:
    """``av.open`` for reading, with every video stream's decoder refusing frames above ``max_pixels``: while
    the container probes its streams (which decodes a first frame) and while frames are decoded.

    Raises UncappedContainer for a container whose streams appear only as it is probed (an MPEG program
    stream, FLV): its decoder cannot be given the cap in time."""
    import av

    with contextlib.suppress(OSError):  # a missing file: av.open's own error
        if os.path.getsize(path) == 0:  # a failed download or copy; FFmpeg says "invalid data"
            raise VideoError(f"video file {str(path)!r} is empty (0 bytes)")
    options = {"max_pixels": str(int(max_pixels or MAX_FRAME_PIXELS))}
    try:
        opened = av.open(str(path), stream_options=[dict(options) for _ in range(_PROBED_STREAMS)])
    except ValueError as e:
        if isinstance(e, av.error.FFmpegError):  # FFmpeg's own errors (invalid data, ...) are ValueErrors too
            raise
        # PyAV's refusal to open with stream options a container that has no streams before it is probed.
        with open(path, "rb") as f:
            head = f.read(4)
        kind, suffix = next(
            ((k, x) for magic, k, x in _UNCAPPED if head.startswith(magic)), (_LATE_STREAMS, "")
        )
        raise UncappedContainer(path, kind, suffix) from None
    with opened as container:
        for stream in container.streams.video:
            stream.codec_context.options = dict(options)
        yield container


def read_video(
    path: str | os.PathLike, max_frames: int | None = None, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, float]:
    """Decode a video's first stream to (frames uint8 (T, H, W, 3) RGB, fps); at most ``max_frames`` frames.

    size: (height, width) to centre-crop and resize each frame to as it is decoded (``fit_frames``, one
    frame at a time: the same pixels as fitting the whole clip), so that a large source never lies in memory
    whole (25 frames of 4096×4096 are 1.2 GB as uint8). Raises VideoError for a missing, unreadable or empty
    file.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file {str(path)!r} {_not_a_file(path)}")
    if max_frames is not None and (
        isinstance(max_frames, bool | np.bool_)
        or not isinstance(max_frames, numbers.Integral)
        or max_frames < 1
    ):
        raise VideoError(
            f"max_frames must be at least 1 or None (all frames), a whole number; got {max_frames!r}"
        )
    if size is not None:  # checked before decoding: (0, 0) divided by zero at the first frame
        if not isinstance(size, tuple | list) or len(size) != 2:
            raise VideoError(f"size={size!r} must be (height, width), e.g. (480, 848), or None")
        _check_fit(1, *size)
    import av

    images: list[np.ndarray] = []
    try:
        with open_video(path) as container:
            if not container.streams.video:
                raise VideoError(f"{str(path)!r} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            sar = sample_aspect(stream)
            for frame in container.decode(stream):
                image = upright(frame)
                if size is not None:
                    aspect = sar if _quarter_turns(frame) % 2 == 0 else 1 / sar
                    image = fit_frames(image[None], 1, *size, pixel_aspect=aspect)[0]
                images.append(image)
                if max_frames is not None and len(images) >= max_frames:
                    break
    except av.error.FFmpegError as e:
        # The decoder refuses a frame above the cap with EINVAL; damaged, cut or foreign data says otherwise.
        big = (
            f" (frames above {MAX_FRAME_PIXELS:,} pixels, 7680x4320, are not decoded)"
            if e.errno == errno.EINVAL
            else ""
        )
        raise VideoError(f"cannot read video {str(path)!r} at frame {len(images) + 1}: {e}{big}") from None
    if not images:
        raise VideoError(f"video {str(path)!r} has no frames")
    return np.stack(images), float(rate) if rate else 0.0


def _not_a_file(path: Path) -> str:
    """Why ``path``, which is not a regular file (after links), cannot be read as a video."""
    if path.is_dir():
        return "is a folder"
    if path.exists():
        return "is not a regular file"
    if path.is_symlink():  # exists() is False for a link to nowhere: not a missing file
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "is a symbolic link that cannot be resolved: its links form a loop"
        return f"is a symbolic link that cannot be resolved: its target {os.readlink(path)!r} does not exist"
    return "does not exist"


def _quarter_turns(frame) -> int:  # noqa: ANN001 - av.VideoFrame
    """Counterclockwise quarter turns that show ``frame`` as players do (its display matrix: phones record
    portrait video as landscape frames with a -90° rotation)."""
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def upright(frame) -> np.ndarray:  # noqa: ANN001 - av.VideoFrame
    """A decoded frame as uint8 RGB (H, W, 3), turned as its container says it is shown."""
    image = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame)
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def sample_aspect(stream) -> Fraction:  # noqa: ANN001 - av.VideoStream
    """The width of a stored pixel as shown, over its height (the stream's sample aspect ratio: 2 for a
    64x64 anamorphic clip shown at 128x64; DV, DVD and HDV sources have them). 1 where the file gives none
    or an implausible one (outside 1/8 to 8)."""
    for sar in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if sar and Fraction(1, 8) <= sar <= 8:
            return Fraction(sar)
    return Fraction(1)


def display_size(frame, sar: Fraction = Fraction(1)) -> tuple[int, int]:  # noqa: ANN001 - av.VideoFrame
    """(height, width) of a decoded frame as it is shown: stored pixels of sample aspect ``sar`` widened
    (or narrowed) to square ones, then a quarter turn swaps them."""
    h, w = frame.height, max(1, round(frame.width * sar))
    return (w, h) if _quarter_turns(frame) % 2 else (h, w)


def video_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of a video's first frame as shown (decodes that frame only). Raises VideoError."""
    import av

    try:
        with open_video(path) as container:
            if not container.streams.video:  # an audio-only file said "tuple index out of range"
                raise VideoError(f"{str(path)!r} has no video stream")
            return display_size(next(container.decode(video=0)), sample_aspect(container.streams.video[0]))
    except (av.error.FFmpegError, IndexError, StopIteration) as e:
        raise VideoError(f"cannot read video {str(path)!r}: {e or 'no frames'}") from None


def crop_box(h: int, w: int, height: int, width: int, pixel_aspect: float = 1.0) -> tuple[int, int, int, int]:
    """(top, left, rows, columns) of the centred crop of an h×w frame to the aspect of a ``width``×``height``
    output (``fit_frames``), whose pixels are ``pixel_aspect`` times as wide as high as shown (a sample
    aspect ratio: the crop is taken to the shown aspect, in stored pixels). VideoError when the crop would
    keep no row or no column: a clip a few pixels high, fitted to a wide output (2x2 to 128x16 keeps
    round(0.25) = 0 rows), cannot be resized."""
    if h * width > w * pixel_aspect * height:  # too tall: crop rows
        rows, cols = round(w * pixel_aspect * height / width), w
    else:  # too wide: crop columns
        rows, cols = h, min(w, round(h * width / (height * pixel_aspect)))
    if rows < 1 or cols < 1:
        raise VideoError(
            f"the video's {w}x{h} frames are too small to crop to the shape of the {width}x{height} output "
            f"(the crop would keep {cols}x{rows} pixels); give a larger clip, or an output size nearer the "
            f"clip's {w}:{h}"
        )
    return (h - rows) // 2, (w - cols) // 2, rows, cols


def _check_fit(frames: int, height: int, width: int, pixel_aspect: float = 1.0) -> None:
    """VideoError unless ``frames``, ``height`` and ``width`` are whole numbers ≥ 1 and ``pixel_aspect`` a
    finite number > 0 (a float frame count sliced deep in numpy, a negative one kept all but the last frames,
    and a size of 0 divided by zero)."""
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral) or value < 1:
            real = isinstance(value, numbers.Real) and math.isfinite(value)
            nearest = max(1, round(value)) if real else 1
            raise VideoError(f"{name}={value!r} must be a whole number ≥ 1; nearest valid: {nearest}")
    if (
        isinstance(pixel_aspect, bool | np.bool_)
        or not isinstance(pixel_aspect, numbers.Real)
        or not (math.isfinite(pixel_aspect) and pixel_aspect > 0)
    ):
        raise VideoError(f"pixel_aspect={pixel_aspect!r} must be a finite number > 0 (1 for square pixels)")


def fit_frames(
    video: np.ndarray, frames: int, height: int, width: int, pixel_aspect: float = 1.0
) -> np.ndarray:
    """The first ``frames`` frames of ``video`` (T, H, W, 3) uint8, centre-cropped to the aspect of
    ``width``×``height`` and resized to it (antialiased area resampling); ``pixel_aspect``: the shown width
    of a stored pixel over its height (``sample_aspect``), so that shapes come out as players show them.
    Raises VideoError if too short, or too small or thin to crop to that aspect (``crop_box``).
    """
    _check_fit(frames, height, width, pixel_aspect)
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if (
        not isinstance(video, np.ndarray)
        or video.ndim != 4
        or video.shape[-1] != 3
        or video.dtype != np.uint8
    ):
        shape = tuple(getattr(video, "shape", ()))
        kind = getattr(video, "dtype", type(video).__name__)
        raise VideoError(
            f"video must be a uint8 array (T, H, W, 3), got {kind} of shape {shape} (frame[None] is one "
            "frame's clip; mochi.video.to_uint8 converts floats in [0, 1])"
        )
    if video.shape[0] < frames:
        raise VideoError(f"video has {video.shape[0]} frames, fewer than the {frames} asked for")
    clip = torch.from_numpy(np.ascontiguousarray(video[:frames])).permute(0, 3, 1, 2).float()  # T C H W
    top, left, rows, cols = crop_box(clip.shape[-2], clip.shape[-1], height, width, pixel_aspect)
    clip = clip[:, :, top : top + rows, left : left + cols]
    if clip.shape[-2:] != (height, width):
        clip = torch.nn.functional.interpolate(
            clip, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
    return clip.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
