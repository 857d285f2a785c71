import numpy as np
import pytest
import torch

from mochi.video import UncappedContainer, VideoError, read_video, to_uint8, video_size, write_video


def smooth_frames(t=13, h=48, w=64):
    """Soft moving colour gradients in [0, 1]: easy for H.264, so the round trip should be close."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    frames = [
        np.stack([0.3 + 0.4 * x, 0.3 + 0.4 * y, 0.5 + 0.2 * np.sin(2 * np.pi * (x + i / t))], -1)
        for i in range(t)
    ]
    return np.stack(frames).astype(np.float32)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def test_to_uint8_rounds_exactly():
    values = np.array([0.4, 0.6, 0.9, 1.5, 2.5, 254.49, 254.5, 254.51, 300.0, -3.0])
    frames = np.broadcast_to(values[:, None, None, None], (10, 2, 2, 3))
    got = to_uint8(frames, value_range=(0.0, 255.0))[:, 0, 0, 0]
    # Round to nearest, ties to even; clipped. Truncation would give 0 for 0.6 and 0.9.
    assert got.tolist() == [0, 1, 1, 2, 2, 254, 254, 255, 255, 0]
    unit = torch.tensor([0.0, 0.49 / 255, 0.7 / 255, 1.0, 128.4 / 255]).view(5, 1, 1, 1).expand(5, 2, 2, 3)
    assert to_uint8(unit)[:, 0, 0, 0].tolist() == [0, 0, 1, 255, 128]
    signed = torch.tensor([-1.0, 1.0, 0.0]).view(3, 1, 1, 1).expand(3, 2, 2, 3)
    assert to_uint8(signed, value_range=(-1.0, 1.0))[:, 0, 0, 0].tolist() == [0, 255, 128]
    raw = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    assert np.array_equal(to_uint8(raw), raw)


def test_round_trip(tmp_path):
    frames = smooth_frames()
    path = write_video(torch.from_numpy(frames), tmp_path / "clip.mp4")
    assert path == tmp_path / "clip.mp4"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left behind
    back, fps = read_video(path)
    assert back.shape == (13, 48, 64, 3) and back.dtype == np.uint8
    assert fps == 30.0
    assert psnr(back, to_uint8(frames)) > 35.0

    signed = write_video(frames * 2 - 1, tmp_path / "signed.mp4", fps=24, value_range=(-1.0, 1.0))
    back, fps = read_video(signed, max_frames=5)
    assert back.shape == (5, 48, 64, 3) and fps == 24.0
    assert psnr(back, to_uint8(frames[:5])) > 35.0


def test_lossless_round_trip_is_bit_exact(tmp_path):
    import av

    frames = np.random.default_rng(0).integers(0, 256, (7, 15, 33, 3), dtype=np.uint8)  # odd sizes too
    path = write_video(frames, tmp_path / "clip.mp4", lossless=True)
    back, fps = read_video(path)
    assert np.array_equal(back, frames) and fps == 30.0
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt in ("rgb24", "bgr24", "gbrp")
    with pytest.raises(VideoError, match="must be even in both dimensions for yuv420p"):
        write_video(frames, tmp_path / "lossy.mp4")


def test_stream_is_h264_yuv420p(tmp_path):
    import av

    write_video(np.zeros((7, 16, 32, 3), np.uint8), tmp_path / "a.mp4")
    with av.open(str(tmp_path / "a.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.frames == 7


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import av

    calls = []
    original = av.VideoFrame.from_ndarray

    def flaky(array, format):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(array, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_video(smooth_frames(), tmp_path / "out.mp4")
    assert list(tmp_path.iterdir()) == []


def test_write_errors(tmp_path):
    with pytest.raises(VideoError, match="must be even in both dimensions for yuv420p; crop to 62x48"):
        write_video(np.zeros((2, 48, 63, 3), np.uint8), tmp_path / "a.mp4")
    with pytest.raises(VideoError, match=r"must end in one of .mp4, .mov, .mkv"):
        write_video(np.zeros((2, 48, 64, 3), np.uint8), tmp_path / "a.gif")
    with pytest.raises(VideoError, match="no frames"):
        write_video(np.zeros((0, 48, 64, 3), np.uint8), tmp_path / "a.mp4")
    with pytest.raises(VideoError, match=r"shape \(T, H, W, 3\)"):
        write_video(np.zeros((48, 64, 3), np.uint8), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="does not exist"):
        write_video(np.zeros((2, 48, 64, 3), np.uint8), tmp_path / "missing" / "a.mp4")
    assert list(tmp_path.iterdir()) == []


def test_read_errors(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        read_video(tmp_path / "none.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"is empty \(0 bytes\)"):
        read_video(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("not a video at all " * 20)
    with pytest.raises(VideoError, match="cannot read video"):
        read_video(tmp_path / "text.mp4")
    with pytest.raises(VideoError, match="max_frames must be at least 1"):
        read_video(tmp_path / "text.mp4", max_frames=0)


def test_fit_frames_crops_centre_and_resizes():
    from mochi.video import fit_frames

    video = np.zeros((9, 40, 100, 3), np.uint8)
    video[:, :, 30:70] = 200  # a centre band 40 wide: the 40×40 centre crop is all 200
    out = fit_frames(video, 7, 16, 16)
    assert out.shape == (7, 16, 16, 3) and out.dtype == np.uint8
    assert (out == 200).all()
    tall = np.zeros((7, 64, 32, 3), np.uint8)
    assert fit_frames(tall, 7, 32, 32).shape == (7, 32, 32, 3)
    with pytest.raises(VideoError, match="has 7 frames, fewer than the 13 asked for"):
        fit_frames(tall, 13, 32, 32)


@pytest.mark.parametrize("size", [(16, 24), (40, 40), (24, 96)], ids=["down", "up", "wide"])
def test_reading_fitted_frame_by_frame_equals_fitting_the_clip(tmp_path, size):
    """``read_video(size=…)`` fits each frame as it is decoded (a large source never lies in memory whole)
    and gives exactly the pixels of reading the whole clip, then ``fit_frames``."""
    from mochi.video import fit_frames, video_size

    g = torch.Generator().manual_seed(0)
    clip = torch.randint(0, 256, (5, 36, 52, 3), generator=g, dtype=torch.uint8).numpy()
    path = write_video(clip, tmp_path / "c.mp4", lossless=True)
    whole, rate = read_video(path, max_frames=4)
    fitted, same_rate = read_video(path, max_frames=4, size=size)
    assert fitted.shape == (4, *size, 3) and rate == same_rate == 30
    np.testing.assert_array_equal(fitted, fit_frames(whole, 4, *size))
    assert video_size(path) == (36, 52)
    with pytest.raises(VideoError, match="cannot read video"):
        video_size(tmp_path / "missing.mp4")


def _turned(path, out):
    """``path`` with its track's display matrix set to a -90° rotation, as phones write portrait video."""
    import struct

    data = bytearray(path.read_bytes())
    matrix = data.index(b"tkhd") + 4 + 4 + 4 * 5 + 8 + 8  # version-0 tkhd: the 3x3 matrix after these fields
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    out.write_bytes(bytes(data))
    return out


def test_a_rotated_video_is_read_as_players_show_it(tmp_path):
    """The display matrix was ignored: a phone's portrait clip came out sideways (prepare-data, v2v)."""
    import av

    from mochi.video import video_size

    frames = np.zeros((3, 48, 64, 3), np.uint8)
    frames[:, :24] = 255  # the stored frame's top half
    turned = _turned(write_video(frames, tmp_path / "plain.mp4", lossless=True), tmp_path / "turned.mp4")
    with av.open(str(turned)) as container:
        assert next(container.decode(video=0)).rotation == -90  # the container says: turn a quarter clockwise
    shown, _ = read_video(turned)
    assert shown.shape == (3, 64, 48, 3) and video_size(turned) == (64, 48)
    np.testing.assert_array_equal(
        shown, np.rot90(frames, -1, axes=(1, 2))
    )  # the top half is now on the right
    assert shown[:, :, 24:].min() == 255 and shown[:, :, :24].max() == 0
    fitted, _ = read_video(turned, size=(32, 24))
    assert fitted.shape == (3, 32, 24, 3)


@pytest.mark.parametrize("container", [".mp4", ".mkv", ".mov"])
def test_every_container_is_byte_identical_for_identical_frames(tmp_path, container):
    """Matroska wrote a random segment id and the date: two encodes of one video differed in 44 bytes."""
    frames = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    a = write_video(frames, tmp_path / f"a{container}").read_bytes()
    assert a == write_video(frames, tmp_path / f"b{container}").read_bytes()


def test_a_clip_too_small_to_crop_to_the_output_shape_is_refused():
    """2x2 frames fitted to 128x16 would keep round(2 * 16 / 128) = 0 rows: a VideoError naming both sizes,
    not torch's "Input and output sizes should be greater than 0"."""
    from mochi.video import crop_box, fit_frames

    with pytest.raises(
        VideoError, match="2x2 frames are too small to crop to the shape of the 128x16 output"
    ):
        fit_frames(np.zeros((7, 2, 2, 3), np.uint8), 7, 16, 128)
    with pytest.raises(
        VideoError, match="40x1 frames are too small to crop to the shape of the 16x64 output"
    ):
        crop_box(1, 40, 64, 16)  # too thin the other way: no column is kept
    assert crop_box(2, 2, 16, 16) == (0, 0, 2, 2)
    assert crop_box(40, 100, 16, 16) == (0, 30, 40, 40)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_frames_are_refused_not_written_black_or_white(tmp_path, value):
    frames = np.full((3, 16, 16, 3), 0.5, np.float32)
    frames[1, 4, 4, 0] = value
    with pytest.raises(VideoError, match="frames hold 1 non-finite values"):
        write_video(frames, tmp_path / "bad.mp4")
    with pytest.raises(VideoError, match="non-finite"):
        to_uint8(torch.from_numpy(frames))
    assert list(tmp_path.iterdir()) == []


def test_frames_beyond_the_encoders_limit_are_refused_naming_it(tmp_path):
    with pytest.raises(VideoError, match="frame size 16386x2 is beyond the H.264 encoder's limit of 16384"):
        write_video(np.zeros((1, 2, 16386, 3), np.uint8), tmp_path / "wide.mp4")
    with pytest.raises(VideoError, match="frame size 2x16386 is beyond .* limit of 16384 pixels a side"):
        write_video(np.zeros((1, 16386, 2, 3), np.uint8), tmp_path / "tall.mp4", lossless=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fps", [np.float32(24), np.int64(24), torch.tensor(24.0), 24.0], ids=str)
def test_video_rate_takes_any_real_number(fps):
    from fractions import Fraction

    from mochi.video import video_rate

    assert video_rate(fps) == Fraction(24)


def test_video_rate_refuses_bools_and_names_the_nearest_rate():
    from mochi.video import video_rate

    with pytest.raises(VideoError, match="fps=True must be a number from 0.1 to 1000, not a bool"):
        video_rate(True)
    with pytest.raises(VideoError, match="fps=2000 must be .*; nearest valid: 1000"):
        video_rate(np.int64(2000))
    with pytest.raises(VideoError, match="nearest valid: 0.1"):
        video_rate(np.float32(0.01))


def test_a_link_that_cannot_be_resolved_is_not_called_missing(tmp_path):
    (tmp_path / "a.mp4").symlink_to(tmp_path / "b.mp4")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "a.mp4")
    with pytest.raises(VideoError, match="is a symbolic link that cannot be resolved: its links form a loop"):
        read_video(tmp_path / "a.mp4")
    (tmp_path / "c.mp4").symlink_to("gone.mp4")
    with pytest.raises(VideoError, match="cannot be resolved: its target 'gone.mp4' does not exist"):
        read_video(tmp_path / "c.mp4")


def _png(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\x00" + b"\x00" * (3 * w)) * h
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def test_frames_above_the_pixel_cap_are_not_decoded(tmp_path, monkeypatch):
    """A few-MB file of 12000x12000 frames (PNGs one after another read as a video; only the first, 16x16,
    was checked at upload) decoded each at 430 MB. ffmpeg's decoder now refuses a frame above the cap
    before allocating it, while probing and while decoding."""
    from mochi import video

    path = tmp_path / "clip.mp4"
    path.write_bytes(_png(16, 16) + _png(64, 64) * 2)  # the first frame small, the later ones large
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", 32 * 32)
    with pytest.raises(
        VideoError, match=r"at frame 2: .*frames above 1,024 pixels, 7680x4320, are not decoded"
    ):
        read_video(path)
    assert video_size(path) == (16, 16)  # the first frame alone is within the cap
    path.write_bytes(_png(64, 64))
    with pytest.raises(VideoError):
        video_size(path)
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", 64 * 64)
    assert read_video(path)[0].shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    ("name", "fmt", "codec", "kind"),
    [
        ("old.mpg", "mpeg", "mpeg1video", "an MPEG program stream (.mpg, .mpeg, .vob)"),
        ("old.flv", "flv", "flv", "a Flash video (.flv)"),
    ],
)
def test_a_container_without_streams_before_its_probe_is_refused_naming_the_conversion(
    tmp_path, name, fmt, codec, kind
):
    """PyAV's own "stream_options were provided, but this format does not expose its streams ..." came out of
    read_video as a bare ValueError; it is now a VideoError naming the format and the conversion."""
    import av

    path = tmp_path / name
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8))))
        container.mux(stream.encode())
    with pytest.raises(UncappedContainer) as caught:
        read_video(path)
    assert str(caught.value) == (
        f"{name!r} is {kind}, which is not read: its decoder cannot be given the frame-size cap before it is "
        f"probed; convert it, e.g. ffmpeg -i {name} old.mp4"
    )


def test_non_square_pixels_are_taken_as_players_show_them(tmp_path):
    """A 32x32 clip of sample aspect 2:1 is shown 64x32: fitted to 64x32 it keeps its whole frame (it was
    cropped to its middle rows as if square, stretching every shape up), and video_size says (32, 64)."""
    from fractions import Fraction

    import av

    image = np.full((32, 32, 3), 128, np.uint8)
    image[:6] = (255, 0, 0)  # a red band at the top and a blue one at the bottom
    image[-6:] = (0, 0, 255)
    path = tmp_path / "anamorphic.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv444p"
        stream.codec_context.sample_aspect_ratio = Fraction(2, 1)
        stream.options = {"crf": "0"}
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    assert video_size(path) == (32, 64)
    frames, _ = read_video(path, size=(32, 64))
    assert frames.shape == (3, 32, 64, 3)
    top, bottom = frames[0, 1].astype(int).mean(0), frames[0, -2].astype(int).mean(0)
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50, (top, bottom)
    assert read_video(path)[0].shape == (3, 32, 32, 3)  # unfitted: the stored pixels


def test_only_a_frame_over_the_cap_is_said_to_be_over_it(tmp_path):
    """Every FFmpeg error (an empty download, a cut or foreign file) ended "(frames above 33,177,600
    pixels, 7680x4320, are not decoded)"."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoError, match=r"^video file .*clip.mp4' is empty \(0 bytes\)$"):
        read_video(path)
    with pytest.raises(VideoError, match="is empty"):
        video_size(path)
    write_video(np.zeros((7, 32, 32, 3), np.uint8), path)
    whole = path.read_bytes()
    for damaged in (whole[: len(whole) // 3], b"print('not a video')\n" * 10):
        path.write_bytes(damaged)
        with pytest.raises(VideoError) as e:
            read_video(path)
        assert str(e.value).startswith(f"cannot read video {str(path)!r} at frame 1: ")
        assert "pixels" not in str(e.value)


def test_write_settings_are_checked_before_writing(tmp_path):
    """lossless="no" wrote a lossless RGB file; crf="18", crf=True and metadata={"comment": 5} failed inside
    PyAV; bf16 frames failed in .numpy(); write_video_and_sidecar wrote a 0-byte video for no frames and
    failed in the encoder for an odd size or a .gif path."""
    from mochi.outputs import write_video_and_sidecar

    frames = np.zeros((2, 32, 32, 3), np.uint8)
    for kwargs, message in (
        ({"lossless": "no"}, "lossless='no' must be True or False"),
        ({"crf": "18"}, "crf='18' must be a whole number from 0 to 51, not str"),
        ({"crf": True}, "crf=True must be a whole number from 0 to 51, not bool"),
        ({"metadata": {"comment": 5}}, "metadata={'comment': 5} must be a dict of strings to strings"),
    ):
        with pytest.raises(VideoError) as e:
            write_video(frames, tmp_path / "a.mp4", **kwargs)
        assert str(e.value).startswith(message)
    write_video(torch.full((2, 32, 32, 3), 0.5, dtype=torch.bfloat16), tmp_path / "b.mp4")
    assert read_video(tmp_path / "b.mp4")[0].shape == (2, 32, 32, 3)
    for pixels, name, message in (
        (frames[:0], "c.mp4", "cannot write a video with no frames"),
        (np.zeros((2, 31, 32, 3), np.uint8), "c.mp4", "frame size 32x31 must be even"),
        (frames, "c.gif", "must end in one of .mp4"),
    ):
        with pytest.raises(VideoError, match=message):
            write_video_and_sidecar(pixels, tmp_path / name, 30, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.mp4"]


def test_fit_frames_refuses_what_it_would_fit_wrongly_or_fail_on_deep_inside(tmp_path):
    """Float frames in [0, 1] came out black (cast to uint8 after resizing), frames=-1 kept all but the
    last frame, and a float count, a 3-D frame or read_video's size=(0, 0) failed in numpy, torch or
    Fraction: each is one VideoError naming the value."""
    from mochi.video import fit_frames

    clip = np.full((7, 32, 32, 3), 200, np.uint8)
    refused = {
        "video must be a uint8 array (T, H, W, 3), got float32 of shape (7, 32, 32, 3) (frame[None] is one "
        "frame's clip; mochi.video.to_uint8 converts floats in [0, 1])": (clip / 255.0).astype(np.float32),
        "video must be a uint8 array (T, H, W, 3), got uint8 of shape (32, 32, 3) (frame[None] is one "
        "frame's clip; mochi.video.to_uint8 converts floats in [0, 1])": clip[0],
    }
    for message, video in refused.items():
        with pytest.raises(VideoError) as e:
            fit_frames(video, 7, 16, 16)
        assert str(e.value) == message
    for args, message in (
        ((-1, 16, 16), "frames=-1 must be a whole number ≥ 1; nearest valid: 1"),
        ((2.0, 16, 16), "frames=2.0 must be a whole number ≥ 1; nearest valid: 2"),
        ((7, 0, 16), "height=0 must be a whole number ≥ 1; nearest valid: 1"),
        ((7, 16, 16.5), "width=16.5 must be a whole number ≥ 1; nearest valid: 16"),
    ):
        with pytest.raises(VideoError) as e:
            fit_frames(clip, *args)
        assert str(e.value) == message
    with pytest.raises(VideoError) as e:
        fit_frames(clip, 7, 16, 16, pixel_aspect=0)
    assert str(e.value) == "pixel_aspect=0 must be a finite number > 0 (1 for square pixels)"
    assert fit_frames(torch.from_numpy(clip), 7, 16, 16).shape == (7, 16, 16, 3)  # as it read before
    path = write_video(clip, tmp_path / "a.mp4")
    with pytest.raises(VideoError) as e:
        read_video(path, size=(0, 0))
    assert str(e.value) == "height=0 must be a whole number ≥ 1; nearest valid: 1"
    with pytest.raises(VideoError) as e:
        read_video(path, size=(16,))
    assert str(e.value) == "size=(16,) must be (height, width), e.g. (480, 848), or None"
    with pytest.raises(VideoError) as e:
        read_video(path, max_frames=2.5)  # read 3 frames
    assert str(e.value) == "max_frames must be at least 1 or None (all frames), a whole number; got 2.5"


@pytest.mark.parametrize("value_range", [(0.0, float("inf")), ("0", "1"), (0, 1, 2), None])
def test_a_value_range_that_is_not_two_finite_numbers_is_refused(tmp_path, value_range):
    """(0, inf) scaled every pixel to 0 and wrote a black video; strings, three values or None failed in
    numpy or in unpacking. Nothing is written."""
    with pytest.raises(VideoError) as e:
        write_video(smooth_frames(t=2), tmp_path / "a.mp4", value_range=value_range)
    assert str(e.value) == (
        f"value_range={value_range!r} must be two finite numbers (low, high), e.g. (0.0, 1.0)"
    )
    assert list(tmp_path.iterdir()) == []
