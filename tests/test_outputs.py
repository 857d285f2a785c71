"""Issue 18: no input breaks `mochi generate`, no output lies.

Same request → same bytes; the VAE split depends on the request, not on free memory; NaN/inf are errors;
a video never stands beside a wrong sidecar; nothing asked for is ignored; everything is checked before the
model loads; the init video is decoded only as far as used; written files follow the umask.
"""

import json
import os
import signal
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

import mochi.models.vae_plan
import mochi.outputs
import mochi.pipeline
import mochi.video
import mochi.weights.components
from mochi.cli import main
from mochi.files import atomic_path, remove_stale_partials
from mochi.finite import NonFiniteError, all_finite, check_finite
from mochi.models.vae_memory import estimate_decode_memory
from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.video import read_video, write_video
from mochi.weights.bundle import save_bundle
from mochi.weights.convert import save_diffusers
from mochi.weights.io import save_state_dict

from .test_lora_train import _lora_file
from .test_pipeline import tiny_components

PROMPT = "a red circle moving right"


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    monkeypatch.setattr(mochi.weights.components, "model_defaults", lambda model: tiny_components().defaults)


def _run(tmp_path, *argv, name="o.mp4"):
    return main(["generate", PROMPT, "--seed", "5", "--steps", "2", "--out", str(tmp_path / name), *argv])


def _comment(path) -> dict:
    with av.open(str(path)) as container:
        return json.loads(container.metadata["comment"])


# -- 1. same request and seed → same bytes ---------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(64, 64), (480, 848)])
def test_repeated_encodes_are_byte_identical_without_mbtree(tmp_path, height, width):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    # Smooth moving content with grain, like decoded video: what mb-tree's lookahead reacts to.
    frames = np.stack([np.roll(base, t, axis=1) for t in range(7)]).repeat(8, 1).repeat(8, 2)
    frames = np.clip(frames + rng.normal(0, 4, frames.shape), 0, 255).astype(np.uint8)
    files = [write_video(frames, tmp_path / f"{i}.mp4").read_bytes() for i in range(3)]
    assert files[0] == files[1] == files[2]
    assert b"mbtree=0" in files[0]  # x264 writes its settings into the stream
    decoded, _ = read_video(tmp_path / "0.mp4")
    psnr = 10 * np.log10(255**2 / np.mean((decoded.astype(float) - frames) ** 2))
    assert psnr > 25  # grain at this level costs x264 at CRF 18 about 29 dB


def test_same_request_same_video_bytes_and_parameters_inside(tiny, tmp_path):
    assert _run(tmp_path, name="a.mp4") == 0 and _run(tmp_path, name="b.mp4") == 0
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    sidecar = json.loads((tmp_path / "a.json").read_text())
    inside = _comment(tmp_path / "a.mp4")
    assert inside == {k: v for k, v in sidecar.items() if k != "seconds"}
    assert inside["seed"] == 5 and inside["vae_plans"]["decode"]["tile"] == [4, 4]


def test_vae_split_comes_from_the_request_not_free_memory(monkeypatch):
    pipe = MochiPipeline(tiny_components(), device="cpu")
    shape = (1, 3, 8, 8)  # latent (B, t, h, w): 13 frames of 64x64
    # Whole frame, whole video: on the CPU the cheapest split of the 8x8 tile (its chunk 1 and 2 take
    # PyTorch's column-buffer conv kernel, `mochi.models.vae_memory`), so the only one this budget allows.
    need = estimate_decode_memory(pipe.components.decoder.cfg, shape, (8, 8), 3, cpu=True)
    monkeypatch.setattr(mochi.models.vae_plan, "DEFAULT_VAE_BUDGET", need + 1)
    latents = torch.randn(1, 12, *shape[1:], generator=torch.Generator().manual_seed(0))
    frames, plans = [], []
    for free in (10**12, 2 * need):  # plenty, or enough for the default split
        monkeypatch.setattr(mochi.pipeline, "available_memory", lambda device, free=free: free)
        frames.append(pipe.decode_latents(latents))
        plans.append(pipe.vae_plans["decode"])
    assert torch.equal(frames[0], frames[1])
    assert plans[0] == plans[1] == {"tile": [8, 8], "overlap": 6, "chunk": 3, "budget": need + 1}
    # Less free memory than the default split needs: a smaller one, said out loud and recorded.
    monkeypatch.setattr(mochi.pipeline, "available_memory", lambda device: need)  # 80%: too little
    with pytest.warns(UserWarning, match=r"the default split \(tile \(8, 8\), chunk 3\) needs about"):
        pipe.decode_latents(latents)
    fallback = pipe.vae_plans["decode"]
    assert fallback["default"] == plans[0] and fallback["tile"] == [7, 7]
    assert fallback["budget"] == int(0.8 * need)


def test_decode_latents_names_what_it_was_given():
    """A numpy array was numpy's AttributeError; NaN latents were blamed on the VAE decoder."""
    from mochi.finite import NonFiniteError

    pipe = MochiPipeline(tiny_components(), device="cpu")
    latents = torch.zeros(1, 12, 2, 4, 4)
    with pytest.raises(
        TypeError, match=r"^latents must be a torch.Tensor \(B, 12, t, h, w\), not numpy.ndarray \(torch.from"
    ):
        pipe.decode_latents(latents.numpy())
    latents[0, 3, 1, 2, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="^the latents to decode hold NaN or infinite values"):
        pipe.decode_latents(latents)


def test_default_vae_budget_doubles_for_videos_larger_than_it(monkeypatch):
    decoder = tiny_components().decoder
    monkeypatch.setattr(mochi.models.vae_plan, "DEFAULT_VAE_BUDGET", 4 * 10**6)  # below any split of 8x8
    plan, record = mochi.models.vae_plan.choose_plan(decoder, (1, 3, 8, 8))
    # 4 → 8 → … → 64 MB, the first that fits on the CPU (its cheapest split, tile 7x7, needs 42 MB)
    assert record["budget"] == 64 * 10**6 and plan.chunk == 3
    with pytest.raises(ValueError, match="max_memory 4000000 bytes is too small"):
        mochi.models.vae_plan.choose_plan(decoder, (1, 3, 8, 8), max_memory=4 * 10**6)  # the user's: kept


# -- 2. non-finite values are errors ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_nan_and_inf(dtype, bad):
    t = torch.linspace(-3, 3, 1000).to(dtype)
    big = torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).min, 0.0], dtype=dtype)
    assert all_finite(t) and all_finite(big) and all_finite(torch.zeros(0, dtype=dtype))
    assert all_finite(torch.full((1000,), torch.finfo(dtype).max / 2, dtype=dtype))  # its sum overflows
    t[517] = bad
    assert not all_finite(t) and not all_finite(t[1::3][172:173])  # strided views too


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_all_finite_fp8(dtype):
    t = torch.tensor([448.0 if dtype == torch.float8_e4m3fn else 57344.0, -1.0, 0.0]).to(dtype)
    assert all_finite(t)
    t[1] = float("nan")
    assert not all_finite(t)
    with pytest.raises(NonFiniteError, match=r"weights holds NaN or infinite values in 1 of 2 tensors \(w\)"):
        check_finite({"ok": torch.ones(2), "w": t}, "weights")


def test_nan_lora_and_nan_checkpoint_are_refused(tmp_path, capsys):
    lora = tmp_path / "nan.safetensors"
    _lora_file(lora)
    from mochi.weights.io import read_metadata, read_state_dict

    sd, meta = read_state_dict(lora), read_metadata(lora)
    sd[next(k for k in sd if k.endswith(".lora_A"))][0, 0] = float("nan")
    save_state_dict(sd, lora, meta)
    bundle = tmp_path / "bad.safetensors"
    parts = tiny_components()
    parts.latent_mean, parts.latent_std = (0.0,) * 12, (1.0,) * 12
    save_bundle(parts, bundle)
    sd, meta = read_state_dict(bundle), read_metadata(bundle)
    sd["decoder.output_proj.weight"].view(-1)[3] = float("inf")
    save_state_dict(sd, bundle, meta)
    for argv, message in [
        (["--lora", str(lora)], f"LoRA {str(lora)!r} holds NaN or infinite values in 1 of"),
        (["--model", str(bundle)], "(decoder)) holds NaN or infinite values in 1 of"),
    ]:
        assert _run(tmp_path, *argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "nan.safetensors"]


def test_nan_latents_write_no_video(monkeypatch, tmp_path, capsys):
    parts = tiny_components()
    parts.dit.final_layer.linear.weight.data[0, 0] = float("nan")  # as a diverged model would hold
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: parts)
    monkeypatch.setattr(mochi.weights.components, "model_defaults", lambda model: parts.defaults)
    assert _run(tmp_path) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "mochi: error: sampling produced NaN or infinite latents (the model, a LoRA or the guidance scale "
        "4.0 made them diverge); no video written"
    )
    assert list(tmp_path.iterdir()) == []


# -- 4. a video never stands beside a wrong or missing sidecar --------------------------------------------


def _old_pair(tmp_path):
    write_video(np.zeros((1, 16, 16, 3), np.uint8), tmp_path / "o.mp4")
    (tmp_path / "o.json").write_text('{"old": true}\n')
    return (tmp_path / "o.mp4").read_bytes()


def test_failed_sidecar_write_keeps_the_old_pair(tiny, tmp_path, monkeypatch):
    old = _old_pair(tmp_path)

    def fail(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mochi.outputs.Path, "write_text", fail)
    assert _run(tmp_path) == 2  # the CLI's error boundary: one line (tests/test_cli_errors.py)
    assert (tmp_path / "o.mp4").read_bytes() == old and json.loads((tmp_path / "o.json").read_text())["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json", "o.mp4"]


def test_killed_between_renames_leaves_no_mismatched_pair(tiny, tmp_path, monkeypatch):
    _old_pair(tmp_path)
    real, calls = os.replace, []

    def dies_on_the_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_the_second)
    assert _run(tmp_path) == 130
    assert [os.path.basename(c) for c in calls] == ["o.json", "o.mp4"]  # sidecar first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json"]  # the new one, alone
    assert json.loads((tmp_path / "o.json").read_text())["seed"] == 5


def test_sigterm_cleans_up_like_ctrl_c(tiny, tmp_path, monkeypatch, capsys):
    real = mochi.outputs.encode_video

    def terminated_mid_write(pixels, path, *a, **k):
        real(pixels, path, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(mochi.outputs, "encode_video", terminated_mid_write)
    assert _run(tmp_path) == 143
    assert capsys.readouterr().err.endswith("mochi: terminated\n")
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_leftovers_of_killed_runs_are_removed_on_the_next_run(tiny, tmp_path):
    dead = tmp_path / ".o.4194399.k2j3h4g5.partial.mp4"  # above Linux's largest pid: no such process
    live = tmp_path / f".o.{os.getppid()}.a1b2c3d4.partial.mp4"
    foreign = tmp_path / ".notes.partial.mp4"  # not a name atomic_path makes
    for f in (dead, live, foreign):
        f.write_bytes(b"x")
    assert _run(tmp_path) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o.mp4", "o.json", live.name, foreign.name])
    assert remove_stale_partials(tmp_path) == []


# -- 6. nothing asked for is ignored; 7. checked before the model loads; 8. init video read as far as used --


@pytest.fixture
def never_load(monkeypatch):
    def load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(mochi.pipeline, "load_components", load)
    monkeypatch.setattr(mochi.weights.components, "model_defaults", lambda model: tiny_components().defaults)


def test_junk_generate_arguments_fail_before_loading(never_load, tmp_path, capsys):
    short = tmp_path / "short.mp4"
    write_video(np.zeros((4, 32, 32, 3), np.uint8), short)
    not_lora = tmp_path / "weights.safetensors"
    save_state_dict({"x": torch.ones(2)}, not_lora)
    bundle = tmp_path / "b.safetensors"
    parts = tiny_components()
    parts.latent_mean, parts.latent_std = (0.0,) * 12, (1.0,) * 12
    save_bundle(parts, bundle)
    missing = str(tmp_path / "missing")
    cases = [
        (["--vae", missing], f"--vae {missing!r} does not exist"),
        (["--t5", missing, "--model", str(bundle)], f"--t5 {missing!r} does not exist"),
        (["--vae", str(short)], "--vae cannot be used with the embedded model, which carries its own VAE"),
        (
            ["--model", str(bundle), "--t5", str(short), "--tokenizer", str(tmp_path)],
            f"--t5 and --tokenizer cannot be used with the mochi bundle {str(bundle)!r}",
        ),  # fmt: skip
        (["--strength", "0.5"], "--strength applies only to video-to-video; give --init-video FILE"),
        (["--max-memory", "0"], "--max-memory '0' must be a positive size such as 8GB"),
        (["--fps", "0.0001"], "fps=0.0001 must be a number from 0.1 to 1000; nearest valid: 0.1"),
        (["--fps", "2000"], "fps=2000.0 must be a number from 0.1 to 1000; nearest valid: 1000"),
        (["--guidance", "1e30"], "guidance=1e+30 must be in [0, 100]"),
        (["--lora", missing], f"--lora {missing!r} does not exist"),
        (["--lora", str(not_lora)], "is not a Mochi DiT LoRA"),
        (["--init-video", str(short)], f"--init-video {str(short)!r} has 4 frames, fewer than the 7"),
        (["--init-video", str(short), "--frames", "13"], "has 4 frames, fewer than the 13 to generate"),
    ]
    for argv, message in cases:
        assert _run(tmp_path, *argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mochi: error: ") and message in err and err.count("\n") == 1, (argv, err)
    (tmp_path / "o.json").mkdir()
    assert _run(tmp_path) == 2
    assert "cannot write the sidecar" in capsys.readouterr().err


def test_a_folder_that_takes_no_files_is_named_before_loading(never_load, tmp_path, capsys, monkeypatch):
    """A folder access() calls writable may still refuse new files (/proc, a read-only mount seen by root):
    named before the model loads, not as a temporary file's name after the run."""
    import errno
    import tempfile

    import mochi.files

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    mkstemp = tempfile.mkstemp
    monkeypatch.setattr(mochi.files.tempfile, "mkstemp", refuse)
    refused = r"cannot write '.*x\.bin': folder .* does not take new files"
    with pytest.raises(ValueError, match=refused), atomic_path(tmp_path / "x.bin"):
        pass
    assert _run(tmp_path) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mochi: error: cannot write {str(tmp_path / 'o.mp4')!r}: folder {str(tmp_path)!r} does not take new "
        "files (Read-only file system)\n"
    )
    monkeypatch.setattr(mochi.files.tempfile, "mkstemp", mkstemp)
    assert mochi.files.check_folder(tmp_path / "o.mp4") == tmp_path
    assert list(tmp_path.iterdir()) == []  # the probe is gone


def test_sidecar_records_what_was_done(tiny, tmp_path):
    assert _run(tmp_path, "--fps", "29.97") == 0
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert sidecar["fps"] == 29.97 and sidecar["strength"] is None and sidecar["init_video"] is None
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert c.streams.video[0].average_rate == Fraction(2997, 100)
    assert _run(tmp_path, "--fps", "7.3333333") == 0
    assert json.loads((tmp_path / "o.json").read_text())["fps"] == 22 / 3  # the rate x264 was given


def test_init_video_decodes_only_the_frames_used(tiny, tmp_path, monkeypatch):
    src = tmp_path / "long.mp4"
    write_video(np.full((61, 32, 32, 3), 99, np.uint8), src)
    real, decoded = mochi.video.read_video, []

    def spy(path, max_frames=None, size=None):
        frames, fps = real(path, max_frames, size)
        decoded.append(frames.shape[:3])
        return frames, fps

    monkeypatch.setattr(mochi.video, "read_video", spy)
    assert _run(tmp_path, "--init-video", str(src), "--strength", "0.5") == 0
    # Counted before the model loads (as thumbnails), then read at the output size: never whole frames.
    assert decoded == [(7, 8, 8), (7, 32, 32)]
    assert json.loads((tmp_path / "o.json").read_text())["strength"] == 0.5


def test_progress_starts_before_the_first_step():
    pipe = MochiPipeline(tiny_components(), device="cpu")
    seen = []
    pipe.generate(GenerationRequest(PROMPT, seed=0, steps=2), progress=lambda *a: seen.append(a))
    denoise = [s for s in seen if s[0] == "denoise"]
    assert denoise == [("denoise", 0, 2), ("denoise", 1, 2), ("denoise", 2, 2)]


# -- 9. written files follow the umask --------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_state_dict({"x": torch.ones(2)}, tmp_path / "w.safetensors")
        write_video(np.zeros((1, 16, 16, 3), np.uint8), tmp_path / "v.mp4")
        with atomic_path(tmp_path / "t.txt") as tmp:
            tmp.write_text("x")
        save_diffusers(tiny_components().dit.state_dict(), tmp_path / "transformer")
    finally:
        os.umask(old)
    for name in ("w.safetensors", "v.mp4", "t.txt", "transformer/config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "transformer").stat().st_mode & 0o777 == 0o777 & ~umask


def test_run_to_run_entries_stay_out_of_the_videos_copy():
    """compile_seconds (3.6 or 17.2 s for one request) made --compile runs' mp4 bytes differ."""
    from mochi.outputs import embedded_parameters

    sidecar = {
        "prompt": "p",
        "seed": 1,
        "seconds": {"denoise": 1.0},
        "compile_seconds": 3.6,
        "id": "j",
        "created": 1.0,
    }
    assert json.loads(embedded_parameters(sidecar)) == {"prompt": "p", "seed": 1}
