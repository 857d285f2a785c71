"""One line, never a traceback: junk inputs, malformed bundles, impossible options, full disks, closed pipes.

Table-driven over junk files for every command that reads weights, and over malformed bundle configs. A full
disk is simulated for real: a child process runs each command under a file-size limit (RLIMIT_FSIZE), so
the actual writers (safetensors' Rust code, torch.save's C++ code, PyAV) meet a real EFBIG from the kernel.
"""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mochi.errors
import mochi.pipeline
from mochi.cli import build_parser, main
from mochi.errors import OutputError, write_errors
from mochi.files import atomic_write_bytes
from mochi.train import shapes
from mochi.train.data import prepare_data
from mochi.video import write_video
from mochi.weights.bundle import embedded_path

from .dit_checkpoints import tiny_model, write_genmo
from .test_lora_train import _lora_file
from .test_pipeline import tiny_components

ROOT = Path(__file__).resolve().parents[1]


class _Obj:
    """A class torch's weights-only unpickler refuses."""


def _junk(folder: Path, lora: Path) -> dict[str, Path]:
    """Every kind of unreadable weights file, by name."""
    folder.mkdir(exist_ok=True)
    good = lora.read_bytes()
    files = {
        "truncated.safetensors": good[: len(good) // 2],
        "header-cut.safetensors": good[:20],
        "text.safetensors": b"this is not a safetensors file\n",
        "empty.safetensors": b"",
        "junk.pt": b"junk",
    }
    out = {name: folder / name for name in files}
    for name, data in files.items():
        out[name].write_bytes(data)
    torch.save({"a": torch.zeros(2)}, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"a": _Obj()}, folder / "pickle.bin")
    torch.save({"a": torch.zeros(1000)}, folder / "full.ckpt")
    (folder / "cut.ckpt").write_bytes((folder / "full.ckpt").read_bytes()[:400])
    return out | {n: folder / n for n in ("legacy.pt", "pickle.bin", "cut.ckpt")}


@pytest.fixture(scope="module")
def junk(tmp_path_factory):
    root = tmp_path_factory.mktemp("junk")
    return _junk(root / "junk", _lora_file(root / "good.safetensors"))


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: tiny_components())
    monkeypatch.setattr(mochi.weights.components, "load_components", lambda *a, **k: tiny_components())


def _one_line(capsys, code, *names):
    out, err = capsys.readouterr()
    assert code == 2, err
    # Progress bars (lines ending in carriage returns) may come first; the error is one whole last line.
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("mochi: error: ") and err.count("mochi: error:") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "weights_only=False" not in err
    err = last
    for name in names:
        assert name in err
    return err


JUNK = [
    "truncated.safetensors",
    "header-cut.safetensors",
    "text.safetensors",
    "empty.safetensors",
    "junk.pt",
    "legacy.pt",
    "pickle.bin",
    "cut.ckpt",
]


@pytest.mark.parametrize("name", JUNK)
@pytest.mark.parametrize(
    "argv",
    [
        ["info", "{f}"],
        ["convert", "{f}", "{tmp}/out", "--to", "genmo"],
        ["convert", "{f}", "{tmp}/out", "--to", "diffusers"],
        ["convert-lora", "{f}", "{tmp}/out.safetensors", "--to", "diffusers"],
        ["generate", "x", "--model", "{f}", "--out", "{tmp}/v.mp4"],
        ["generate", "x", "--lora", "{f}", "--steps", "1", "--out", "{tmp}/v.mp4"],
    ],
    ids=["info", "convert-genmo", "convert-diffusers", "convert-lora", "generate-model", "generate-lora"],
)
def test_junk_weights_are_one_line_for_every_command(junk, request, tmp_path, capsys, argv, name):
    if "--lora" in argv:  # the LoRA is the junk: a tiny random model stands in for the embedded one
        request.getfixturevalue("tiny")
    args = [a.format(f=junk[name], tmp=tmp_path) for a in argv]
    err = _one_line(capsys, main(args), name)
    if name in ("legacy.pt", "junk.pt", "cut.ckpt"):
        assert "not a zip-format PyTorch file" in err and "weights_only=True" in err
    if name == "pickle.bin":
        assert "never arbitrary pickles" in err and "_Obj" in err
    if name.endswith(".safetensors"):
        assert "not a readable safetensors file" in err or "holds no" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("name", [n for n in JUNK if n.endswith(".safetensors")])
def test_junk_prepared_clip_is_one_line_in_train_lora(junk, tiny, tmp_path, capsys, name):
    data = tmp_path / "data"
    data.mkdir()
    (data / "clip.safetensors").write_bytes(junk[name].read_bytes())
    code = main(["train-lora", str(data), "--out", str(tmp_path / "run"), "--steps", "1"])
    _one_line(capsys, code, "clip.safetensors")


# -- malformed bundles ------------------------------------------------------------------------------------


def _bundle_with(path: Path, edit) -> Path:
    """The embedded bundle with its config (a dict) or its whole metadata edited by ``edit``."""
    with safe_open(str(embedded_path()), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    result = edit(config)
    if isinstance(result, dict) and "format" in result:  # edits the metadata itself
        meta = result
    else:
        meta["config"] = result if isinstance(result, str) else json.dumps(config)
    save_file(tensors, str(path), metadata=meta)
    return path


def _set(path: list, value):
    def edit(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return edit


_DELETE = object()

BAD_BUNDLES = {
    "config not json": lambda c: "{not json",
    "config a list": lambda c: "[]",
    "config null": lambda c: "null",
    "no config": lambda c: {"format": "mochi-bundle"},
    "no dit": _set(["dit"], _DELETE),
    "dit a list": _set(["dit"], [1, 2]),
    "depth a string": _set(["dit", "depth"], "4"),
    "huge depth": _set(["dit", "depth"], 10**9),  # built as is, this ran for hours
    "huge depth within bounds": _set(["dit", "depth"], 1000),
    "negative depth": _set(["dit", "depth"], -1),
    "zero heads": _set(["dit", "num_heads"], 0),
    "float width": _set(["dit", "hidden_size_x"], 128.5),
    "unknown field": _set(["dit", "wings"], 2),
    "huge t5": _set(["text_encoder", "num_layers"], 10**6),
    "huge res blocks": _set(["decoder", "num_res_blocks"], [0, 1, 1, 1, 10**8]),
    "res blocks not a list": _set(["decoder", "num_res_blocks"], 3),
    "nan epsilon": lambda c: json.dumps(c).replace(
        '"layer_norm_epsilon": 1e-06', '"layer_norm_epsilon": NaN'
    ),
    "short latent mean": _set(["latent_mean"], [0.0] * 3),
    "zero latent std": _set(["latent_std"], [0.0] * 12),
    "no defaults": _set(["defaults"], _DELETE),
    "frames a string": _set(["defaults", "frames"], "25"),
    "bad latents": _set(["defaults", "latents"], "both"),
    "name a number": _set(["name"], 3),
    "other tokenizer": _set(["tokenizer"], "sentencepiece"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
@pytest.mark.parametrize("command", ["info", "generate"])
def test_malformed_bundle_metadata_is_one_line(tmp_path, capsys, case, command):
    bundle = _bundle_with(tmp_path / "bad.safetensors", BAD_BUNDLES[case])
    argv = ["info", str(bundle)] if command == "info" else ["generate", "x", "--model", str(bundle)]
    code = main([*argv, "--out", str(tmp_path / "v.mp4")] if command == "generate" else argv)
    if command == "info" and case == "other tokenizer":
        assert code == 0  # info reports what the bundle says; generate refuses to run it
        capsys.readouterr()
        return
    _one_line(capsys, code, "bad.safetensors")
    assert not (tmp_path / "v.mp4").exists()


# -- options no command can honour --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        (["generate", "x"], "--fps", "inf"),
        (["generate", "x"], "--fps", "nan"),
        (["generate", "x"], "--guidance", "-inf"),
        (["generate", "x"], "--strength", "nan"),
        (["train-lora", "d", "--out", "r"], "--lr", "inf"),
        (["train-lora", "d", "--out", "r"], "--alpha", "nan"),
    ],
)
def test_non_finite_float_options_are_refused_by_the_parser(capsys, command, flag, value):
    with pytest.raises(SystemExit) as e:
        main([*command, f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {value!r} is not a finite number" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flag", "value"), [("--guidance", "0_1"), ("--fps", "3_0"), ("--cache-threshold", "1_0")]
)
def test_float_options_written_with_underscores_are_refused(capsys, flag, value):
    """Python's float() reads "0_1" as 1.0: a typo of 0.1 ran at ten times the value asked for."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {value!r} is not a plain decimal number: '_' is not allowed" in err


@pytest.mark.parametrize("device", ["meta", "mps", "xla", "cuda:99", "cpu:7"])
def test_unsupported_devices_are_one_line(tiny, tmp_path, capsys, device):
    code = main(["generate", "x", "--device", device, "--out", str(tmp_path / "v.mp4")])
    err = _one_line(capsys, code, repr(device))
    assert "cpu" in err


@pytest.mark.parametrize(("backend", "package"), [("flash", "flash_attn"), ("sage", "sageattention")])
def test_an_attention_kernel_that_cannot_run_is_one_line(tiny, tmp_path, capsys, backend, package):
    # On the CPU (these tests' device) the kernel could not run even installed: that is said, not "pip
    # install" (tests/test_dit.py checks the missing-package message where the kernel could run).
    code = main(["generate", "x", "--attention", backend, "--steps", "1", "--out", str(tmp_path / "v.mp4")])
    _one_line(capsys, code, f"attention backend {backend!r} runs on CUDA in fp16 or bf16", "--attention sdpa")


def test_existing_paths_in_the_way_are_one_line(tiny, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("in the way")
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(np.zeros((7, 32, 32, 3), np.uint8), videos / "a.mp4")
    (videos / "a.txt").write_text("a clip")
    size = ["--frames", "7", "--width", "32", "--height", "32"]
    _one_line(capsys, main(["prepare-data", str(videos), str(blocker), *size]), "afile' is a file")
    lora = _lora_file(tmp_path / "l.safetensors")
    _one_line(capsys, main(["convert-lora", str(lora), str(blocker / "x.safetensors"), "--to", "genmo"]))
    write_genmo(tmp_path / "g", tiny_model())
    _one_line(capsys, main(["convert", str(tmp_path / "g"), str(blocker / "o"), "--to", "genmo"]), "afile")
    data = tmp_path / "data"
    prepare_data(videos, data, tiny_components(), frames=7, width=32, height=32)
    code = main(["train-lora", str(data), "--out", str(blocker), "--steps", "1", "--sample-every", "0"])
    _one_line(capsys, code, "afile")
    assert blocker.read_text() == "in the way"
    (tmp_path / "v.json").mkdir()  # the sidecar's name is taken by a folder
    code = main(["generate", "x", "--steps", "1", "--out", str(tmp_path / "v.mp4")])
    _one_line(capsys, code, "v.json")


@pytest.mark.parametrize("under", [False, True], ids=["a file", "under a file"])
def test_prepare_data_refuses_an_out_dir_it_cannot_make_before_loading(
    tiny, tmp_path, capsys, monkeypatch, under
):
    import mochi.cli.lora

    def never(args):  # noqa: ANN001
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mochi.cli.lora, "pipeline_from_args", never)
    videos, blocker = tmp_path / "videos", tmp_path / "afile"
    videos.mkdir()
    blocker.write_text("in the way")
    out = blocker / "data" if under else blocker
    code = main(["prepare-data", str(videos), str(out), "--frames", "7", "--width", "32", "--height", "32"])
    _one_line(capsys, code, f"OUT_DIR {str(out)!r}", f"{str(blocker)!r} is a file")
    assert blocker.read_text() == "in the way"


def test_misnamed_paths_and_options_that_need_another_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    afile, folder = tmp_path / "afile", tmp_path / "adir"
    afile.write_text("x")
    folder.mkdir()
    gen = ["generate", "x", "--steps", "1"]
    out = ["--out", str(tmp_path / "v.mp4")]
    _one_line(capsys, main([*gen, "--init-video", str(folder), *out]), "video file", "is a folder")
    _one_line(capsys, main([*gen, "--out", str(afile / "v.mp4")]), "afile' is a file, not a folder")
    size = ["--frames", "7", "--width", "32", "--height", "32"]
    code = main(["prepare-data", str(afile), str(tmp_path / "o"), *size])
    _one_line(capsys, code, "videos folder", "is a file, not a folder")
    _one_line(capsys, main([*gen, "--lora-merge", *out]), "--lora-merge applies only with --lora")
    # Found before loading (it was after the load and the quantization).
    code = main([*gen, "--lora", str(afile), "--lora-merge", "--quantize", "int8", *out])
    _one_line(capsys, code, "--lora-merge cannot merge into --quantize int8 weights")
    code = main([*gen, "--offload", "blocks:999", *out])  # clamped silently before
    _one_line(capsys, code, "offload blocks:999 keeps more blocks on the device than the DiT's", "blocks:")
    # ... and found from the headers, before any weight is read (it came after the whole load).
    import mochi.weights.components as components

    def no_load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the options were checked")

    write_genmo(tmp_path / "deep", tiny_model())
    with monkeypatch.context() as patch:
        patch.setattr(components, "load_components", no_load)
        patch.setattr(mochi.pipeline, "load_components", no_load)
        patch.setattr(mochi.weights.components, "load_components", no_load)
        for model in ([], ["--model", str(tmp_path / "deep")]):
            code = main([*gen, *model, "--offload", "blocks:99", *out])
            _one_line(capsys, code, "offload blocks:99 keeps more blocks on the device than the DiT's")
        with pytest.raises(ValueError, match="blocks:99 keeps more blocks on the device than the DiT's"):
            mochi.pipeline.MochiPipeline.from_pretrained(offload="blocks:99")
    _one_line(capsys, main([*gen, "--devices", ",", *out]), "names no device")
    code = main([*gen, "--devices", "cpu,cpu", "--device", "cuda", *out])  # --device was ignored
    _one_line(capsys, code, "--device cuda and --devices cpu,cpu both say where to run; give one of them")
    with pytest.raises(SystemExit) as stop:  # an empty value is refused by the parser, for every path too
        main([*gen, "--devices", "", *out])
    assert stop.value.code == 2 and "argument --devices: '' is empty; give a value" in capsys.readouterr().err
    for flags in (["--guidance-parallel"], ["--parallel-weights", "shard"]):
        _one_line(capsys, main([*gen, *flags, *out]), " ".join(flags), "applies only to several processes")
    both = ["--parallel-weights", "shard", "--guidance-parallel"]
    _one_line(capsys, main([*gen, *both, *out]), "and --guidance-parallel apply only to several processes")
    # ... and, under torchrun (its variables set), the options of one process are refused, not ignored.
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    for flags in (["--devices", "cpu,cpu"], ["--memory", "auto"]):
        code = main([*gen, *flags, *out])
        err = capsys.readouterr().err
        assert code == 2 and "apply only to one process" in err and "--offload" not in err  # refused below
    code = main([*gen, "--offload", "blocks:2", *out])  # refused after loading, on a GPU; ignored on a CPU
    _one_line(capsys, code, "--offload blocks:2 cannot be combined with a torchrun launch")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    write_genmo(tmp_path / "g", tiny_model())
    code = main(
        ["convert", str(tmp_path / "g"), str(tmp_path / "d"), "--to", "diffusers", "--max-shard-size", "0"]
    )
    _one_line(capsys, code, "--max-shard-size '0' must be a positive size")
    code = main(
        ["convert", str(tmp_path / "g"), str(tmp_path / "d"), "--to", "diffusers", "--max-shard-size", "²"]
    )
    _one_line(capsys, code, "--max-shard-size '²' is not understood; write it like 10GB, 500MB or 20000")
    for seed in ("-1", str(2**64)):
        code = main(["train-lora", str(tmp_path), "--out", str(tmp_path / "run"), "--seed", seed])
        _one_line(capsys, code, f"seed={seed} must be in [0, 2**63-1]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "deep", "g"]  # nothing written


@pytest.mark.parametrize(
    ("offload", "more"), [("blocks:9", []), ("blocks:2", ["--max-memory", "1MB"]), ("model", []), (None, [])]
)
def test_devices_with_offload_is_refused_first(tiny, tmp_path, capsys, monkeypatch, offload, more):
    """--devices with --offload, which spread_pipeline refuses, came out of the checks as --offload
    blocks:9's depth ("nearest valid: blocks:4") or --max-memory's budget ("give it at least 4.7MB"): fixed,
    the run met the refusal next. The checks now refuse the combination first, with spread_pipeline's
    message, and nothing is loaded. So is an --attention kernel the first device cannot run."""
    import mochi.memory.placement as placement
    import mochi.weights.components as components

    def no_load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(components, "load_components", no_load)
    monkeypatch.setattr(mochi.pipeline, "load_components", no_load)
    monkeypatch.setattr(mochi.weights.components, "load_components", no_load)
    flags = ["--offload"] if offload is None else ["--offload", offload]  # a bare --offload means model
    out = ["--out", str(tmp_path / "v.mp4")]
    code = main(["generate", "x", "--steps", "1", "--devices", "cpu,cpu", *flags, *more, *out])
    expected = f"--devices places the DiT itself; drop --offload {offload or 'model'}"
    assert _one_line(capsys, code) == f"mochi: error: {expected}"
    with pytest.raises(ValueError) as caught:  # the same rule and words as after the checks
        placement.spread_pipeline(None, "cpu,cpu", None, None, {"offload": offload or "model"})
    assert str(caught.value) == expected
    # An attention kernel the first device cannot run was refused by the pipeline, after the whole load.
    code = main(["generate", "x", "--steps", "1", "--devices", "cpu,cpu", "--attention", "flash", *out])
    _one_line(capsys, code, "attention backend 'flash' runs on CUDA in fp16 or bf16", "float32 on cpu")
    assert not list(tmp_path.iterdir())


def test_running_out_of_memory_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, monkeypatch):
    def greedy(self, request, **kwargs):
        torch.empty(10**15, dtype=torch.uint8)  # the real CPU allocator's failure, at once and harmless

    monkeypatch.setattr(mochi.pipeline.MochiPipeline, "generate", greedy)
    code = main(["generate", "x", "--out", str(tmp_path / "v.mp4")])
    _one_line(
        capsys, code, "out of memory: the CPU could not allocate 1000000.0 GB", "fewer frames", "--offload"
    )
    assert list(tmp_path.iterdir()) == []
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has 23.65 GiB")
    assert mochi.errors.user_message(cuda).startswith(
        "out of memory: the accelerator could not allocate 20.00 GiB"
    )
    assert mochi.errors.user_message(RuntimeError("a genuine bug")) is None


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a genuine bug")

    import mochi.cli.weights

    monkeypatch.setattr(mochi.cli.weights, "_run_info", broken)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        main(["info", "x"])


# -- closed pipes and full disks (real, in a child process) -------------------------------------------------


def test_a_closed_stdout_pipe_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line, as `mochi info X | head -0` would be
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mochi", "info", str(embedded_path())],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 141


LIMIT = 512  # bytes: smaller than every output below


def _under_file_size_limit(cases: list[list[str]], state_dir: Path) -> list[tuple[object, str]]:
    """Run each argv through ``mochi.cli.main`` in one child process whose file-size limit is ``LIMIT``,
    then ``save_state`` into ``state_dir`` (torch.save's C++ writer reports a failed write as a bare
    RuntimeError, so its cause must be found on the disk); one (exit code, stderr) per case and the state."""
    driver = f"""
import contextlib, io, json, resource, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
import torch
import mochi.pipeline
from tests.test_pipeline import tiny_components
mochi.pipeline.load_components = lambda *a, **k: tiny_components()
from mochi.cli import build_parser, main
from mochi.train.lora_state import save_state
resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException as e:
            code = f"raised {{type(e).__name__}}"
            err.write(repr(e))
    results.append((code, err.getvalue()))
try:
    save_state(Path({str(state_dir)!r}), 1, {{"a": torch.zeros(1000)}}, {{}}, {{}})
    results.append(("saved", ""))
except Exception as e:
    results.append((type(e).__name__, str(e)))
print(json.dumps(results))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_full_disk_is_one_line_for_every_command_and_leaves_no_partial_files(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, (cap, video) in enumerate(shapes.clips(seed=0, n=2, frames=7, height=32, width=32)):
        write_video(video, videos / f"c{i}.mp4")
        (videos / f"c{i}.txt").write_text(cap)
    data = tmp_path / "data"
    prepare_data(videos, data, tiny_components(), frames=7, width=32, height=32)
    write_genmo(tmp_path / "g", tiny_model())
    lora = _lora_file(tmp_path / "l.safetensors")
    outs = tmp_path / "outs"
    outs.mkdir()
    size = ["--frames", "7", "--width", "32", "--height", "32"]
    cases = {
        "generate": ["generate", "x", "--steps", "1", "--out", str(outs / "v.mp4")],
        "convert": ["convert", str(tmp_path / "g"), str(outs / "g"), "--to", "genmo"],
        "convert-diffusers": ["convert", str(tmp_path / "g"), str(outs / "d"), "--to", "diffusers"],
        "convert-lora": ["convert-lora", str(lora), str(outs / "l.safetensors"), "--to", "diffusers"],
        "prepare-data": ["prepare-data", str(videos), str(outs / "data"), *size],
        "train-lora": ["train-lora", str(data), "--out", str(outs / "run"), "--steps", "1", "--rank", "2"],
    }
    *results, state = _under_file_size_limit(list(cases.values()), outs / "state-run")
    results = dict(zip(cases, results))
    for name, (code, err) in results.items():
        errors = [line for line in err.splitlines() if "mochi: error:" in line]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (name, code, err)
        assert "cannot write" in errors[0] and "file-size limit" in errors[0], (name, errors)
    assert "0 encoded" not in results["prepare-data"][1]  # stopped at the first clip, not "skipped"
    assert (
        state[0] == "OutputError" and state[1].startswith("cannot write ") and "file-size limit" in state[1]
    )
    leftovers = [
        p for p in outs.rglob("*") if p.is_file() and (p.name.startswith(".") or "partial" in p.name)
    ]
    assert leftovers == []
    assert not list(outs.rglob("*.mp4")) and not list(outs.rglob("*.safetensors"))
    assert not list(outs.rglob("*.pt"))


@pytest.mark.parametrize(
    ("flag", "free", "reason"),
    [
        (os.ST_RDONLY, 10**9, "the file system is read-only"),
        (0, 4096, "no space left on the device (4,096 bytes free)"),
    ],
)
def test_a_failed_write_on_a_full_or_read_only_disk_is_named(tmp_path, monkeypatch, flag, free, reason):
    class Stat:
        f_flag, f_bavail, f_frsize = flag, free, 1

    def writer_fails(path):
        raise RuntimeError("file write failed")  # as torch.save reports it, with no errno

    monkeypatch.setattr(mochi.errors.os, "statvfs", lambda p: Stat())
    with pytest.raises(OutputError) as e, write_errors(tmp_path / "x.pt"):
        writer_fails(tmp_path / "x.pt")
    assert str(e.value) == f"cannot write {str(tmp_path / 'x.pt')!r}: {reason}"


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
        (RuntimeError("Error while serializing: IoError(No space left on device (os error 28))"), "no space"),
    ],
)
def test_disk_errnos_are_named_whatever_the_writer(tmp_path, exc, reason):
    with (
        pytest.raises(OutputError, match=f"cannot write .*x.bin.*: {reason}"),
        write_errors(tmp_path / "x.bin"),
    ):
        raise exc


def test_other_write_failures_pass_unchanged(tmp_path):
    with pytest.raises(KeyError), write_errors(tmp_path / "x"):
        raise KeyError("a bug in the writer")
    with pytest.raises(OSError) as e, write_errors(tmp_path / "x"):
        raise OSError(errno.EIO, "Input/output error")
    assert not isinstance(e.value, OutputError)


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "o.json"
    target.write_text("old")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputError, match="no space left"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["o.json"]


def test_main_reports_output_errors_in_one_line(monkeypatch, capsys):
    import mochi.cli.weights

    def full(args):
        with write_errors("/x/y.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mochi.cli.weights, "_run_info", full)
    assert main(["info", "x"]) == 2
    assert (
        capsys.readouterr().err
        == "mochi: error: cannot write '/x/y.safetensors': no space left on the device\n"
    )


def test_lora_merge_into_a_checkpoint_kept_quantized_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """It was refused only after the whole load (minutes for the released model)."""
    from .dit_checkpoints import state_dict, tiny_model, write_fp8_scaled
    from .gguf_files import write_kijai

    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: pytest.fail("loaded first"))
    monkeypatch.setattr(
        mochi.weights.components, "load_components", lambda *a, **k: pytest.fail("loaded first")
    )
    fp8 = write_fp8_scaled(tmp_path / "fp8.safetensors", tiny_model(), layout="legacy", all_in_one=False)
    q8 = write_kijai(tmp_path / "q8.safetensors", state_dict(tiny_model()), "Q8_0")
    lora = ["--lora", str(tmp_path / "l.safetensors"), "--lora-merge", "--out", str(tmp_path / "o.mp4")]
    for model, words in ((fp8, "fp8 scaled_fp8 weights"), (q8, "gguf Q8_0 weights")):
        code = main(["generate", "x", "--model", str(model), "--vae", str(fp8), "--t5", str(fp8), *lora])
        _one_line(capsys, code, f"--lora-merge cannot merge into this checkpoint's {words}")
    # Widened at load (fp8 and GGUF alike), they merge: the check lets them through (to the missing LoRA).
    for model in (fp8, q8):
        argv = [
            "generate",
            "x",
            "--model",
            str(model),
            "--vae",
            str(fp8),
            "--t5",
            str(fp8),
            "--fp8",
            "dequantize",
        ]
        _one_line(capsys, main([*argv, *lora]), "l.safetensors' does not exist")


def test_lora_merge_into_weights_sharded_over_ranks_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """Under torchrun, --parallel-weights shard with --lora-merge was refused only once every rank had loaded
    the weights and the request began."""
    import mochi.cli.generate
    import mochi.parallel.apply
    from mochi.parallel.context import World

    world = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")  # torchrun's
    monkeypatch.setattr(mochi.cli.generate, "start_parallel", lambda args: world)
    monkeypatch.setattr(mochi.parallel.apply, "load_pipeline", lambda *a, **k: pytest.fail("loaded first"))
    argv = ["generate", "x", "--lora", str(tmp_path / "l.safetensors"), "--lora-merge"]
    code = main([*argv, "--parallel-weights", "shard", "--out", str(tmp_path / "o.mp4")])
    _one_line(capsys, code, "--lora-merge cannot merge into weights sharded over ranks", "replicate")


def test_a_max_memory_no_decode_split_fits_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """It was refused only after the model loaded and the text stage began, in the pipeline's words
    ("max_memory 1000 bytes is too small ... nearest: 8986624")."""
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: pytest.fail("loaded first"))
    monkeypatch.setattr(
        mochi.weights.components, "load_components", lambda *a, **k: pytest.fail("loaded first")
    )
    argv = ["generate", "a red circle", "--steps", "1", "--out", str(tmp_path / "o.mp4"), "--device", "cpu"]
    # The embedded model at its 25 frames, 64x64 on the CPU, where its small fp32 convs take PyTorch's own
    # kernel and column buffer: the smallest split (tile 7x7, chunk 5) is 23721984 B.
    for size in ("1KB", "23MB"):
        _one_line(
            capsys,
            main([*argv, "--max-memory", size]),
            f"--max-memory '{size}' is too small to decode a 25-frame 64x64 video: the smallest split needs "
            "about 23.8MB; nearest valid: 23.8MB",
        )


def test_guidance_parallel_without_a_negative_pass_is_refused_before_loading(
    tiny, tmp_path, capsys, monkeypatch
):
    """With guidance 1.0 both halves of the ranks ran the same pass; the sidecar said the split ran."""
    import torch

    import mochi.parallel.context
    from mochi.parallel.context import World

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    world = World(rank=0, size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    monkeypatch.setattr(mochi.parallel.context, "init_world", lambda device: world)
    monkeypatch.setattr(mochi.parallel.context, "broadcast_int", lambda value, world: value)  # a world of
    monkeypatch.setattr(mochi.parallel.context, "broadcast_text", lambda value, world: value)  # one here
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: pytest.fail("loaded"))
    argv = ["generate", "x", "--guidance-parallel", "--out", str(tmp_path / "v.mp4")]
    code = main([*argv, "--guidance", "1"])
    _one_line(capsys, code, "--guidance-parallel runs the prompt's and the negative prompt's passes")
    assert not any(tmp_path.iterdir())


def test_an_empty_cache_is_refused_not_run_uncached(tmp_path, capsys):
    """`--cache "$CACHE"` with the variable unset ran without a cache and said nothing."""
    with pytest.raises(SystemExit) as stop:
        main(["generate", "x", "--cache", "", "--out", str(tmp_path / "v.mp4")])
    assert stop.value.code == 2 and "argument --cache: '' is empty; give a value" in capsys.readouterr().err


def test_a_broken_coefficient_file_beside_the_model_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """--cache-coefficients was checked before the load (minutes for the released model), the file that
    generate finds beside the model only after it and the text encoding."""
    monkeypatch.setattr(mochi.pipeline, "load_components", lambda *a, **k: pytest.fail("loaded"))
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    (tmp_path / "m.teacache.json").write_text("garbage")
    code = main(
        ["generate", "x", "--model", str(model), "--cache", "teacache", "--out", str(tmp_path / "v.mp4")]
    )
    _one_line(capsys, code, "m.teacache.json' is not a mochi-teacache coefficient file")


def test_the_python_api_names_its_arguments_and_the_cli_its_flags(tmp_path, capsys):
    """from_pretrained's errors named CLI flags (--model, --vae) a Python caller never wrote."""
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"^model {re.escape(repr(missing))} does not exist$"):
        mochi.pipeline.MochiPipeline.from_pretrained(missing)
    with pytest.raises(
        ValueError, match="^vae cannot be used with the embedded model.*use a model that lacks"
    ):
        mochi.pipeline.MochiPipeline.from_pretrained(vae=str(tmp_path))
    _one_line(capsys, main(["serve", "--model", missing]), f"--model {missing!r} does not exist")


def test_from_pretrained_refuses_an_empty_path_and_one_that_is_not_a_path(tmp_path, monkeypatch):
    """model="" was Path(""), the current folder, loaded as the checkpoint (a folder holding one loaded it
    silently); model=3 or t5=3 failed in pathlib with a TypeError that named no argument."""
    monkeypatch.chdir(tmp_path)
    load = mochi.pipeline.MochiPipeline.from_pretrained
    for kwargs, message in (
        ({"model": ""}, "model '' is empty; give a path, or give None for the embedded model"),
        ({"model": str(tmp_path), "t5": " "}, "t5 ' ' is empty; give a path, or give None for none"),
        ({"model": 3}, "model 3 must be a path (a string), not int"),
        ({"model": str(tmp_path), "t5": 3}, "t5 3 must be a path (a string), not int"),
    ):
        with pytest.raises(ValueError) as e:
            load(**kwargs)
        assert str(e.value) == message


def test_a_value_that_starts_with_a_minus_and_a_digit_reaches_its_options_own_check(capsys):
    """argparse takes only a plain negative number as a value: `--gpu-memory -5GB` was "expected one
    argument" (the value read as an unknown option) instead of the size's own message."""
    from mochi.cli.options import dashed_values

    code = main(["plan", "--gpu-memory", "-5GB"])
    _one_line(capsys, code, "--gpu-memory '-5GB' is negative: a size counts up from 0 (5GB?)")
    code = main(["plan", "--gpu-memory=-x"])
    _one_line(capsys, code, "--gpu-memory '-x' is not understood; write it like 10GB, 500MB or 20000")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a prompt", "--guidance", "-1.5x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --guidance: invalid finite_float value: '-1.5x'" in err, err
    options = build_parser()._subparsers._group_actions[0].choices["plan"]._option_string_actions
    # Only a value-taking option's next word, only '-' then a digit or a point, never past '--'.
    assert dashed_values(["--gpu-memory", "-.5GB", "--all-blocks", "-1"], options) == [
        "--gpu-memory=-.5GB",
        "--all-blocks",
        "-1",
    ]
    assert dashed_values(["--gpu-memory", "--device", "-1"], options) == ["--gpu-memory", "--device=-1"]
    assert dashed_values(["--", "--gpu-memory", "-5GB"], options) == ["--", "--gpu-memory", "-5GB"]


@pytest.mark.parametrize(
    "argv",
    [
        ["convert-lora", "/dev/null", "{tmp}/out.safetensors", "--to", "genmo"],
        ["generate", "x", "--lora", "/dev/null", "--out", "{tmp}/v.mp4"],
        ["convert-lora", "{tmp}/pipe.safetensors", "{tmp}/out.safetensors", "--to", "diffusers"],
        ["info", "{tmp}/pipe.safetensors"],
        ["info", "{tmp}/pipe.pt"],
        ["plan", "--model", "{tmp}/pipe.safetensors", "--gpu-memory", "24GB"],
    ],
    ids=["convert-lora-device", "generate-lora-device", "convert-lora-pipe", "info", "info-pt", "plan"],
)
def test_a_device_or_pipe_given_as_weights_is_one_line(tmp_path, capsys, argv):
    """safetensors said "No such device (os error 19)", naming nothing; a named pipe (a shell's <(…) is one)
    waited for a writer, deaf to Ctrl-C and SIGTERM (here a writer is at hand, so that the old code ends)."""
    import threading

    done = threading.Event()

    def writer(path: Path) -> None:  # an empty write for every open of the pipe, until the test is done
        while not done.is_set():
            open(path, "wb").close()

    for name in ("pipe.safetensors", "pipe.pt"):
        os.mkfifo(tmp_path / name)
        threading.Thread(target=writer, args=(tmp_path / name,), daemon=True).start()
    try:
        args = [a.format(tmp=tmp_path) for a in argv]
        named = next(a for a in args if a.startswith("/dev/") or "pipe" in a)
        err = _one_line(capsys, main(args), f"{named!r} is not a regular file (a device, pipe or socket)")
    finally:
        done.set()
        for name in ("pipe.safetensors", "pipe.pt"):  # the writers waiting for a reader: let them end
            os.close(os.open(tmp_path / name, os.O_RDONLY | os.O_NONBLOCK))
    assert "os error" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.pt", "pipe.safetensors"]  # nothing written
