"""Multi-process parity on CPU: two gloo ranks started here must match one process (fp32, ≤ 1e-5).

One 2-rank job (``_job``) runs every parallel case and saves its results; the tests compare them with the
same computations run in this process. The ranks are plain subprocesses given torchrun's environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free 127.0.0.1 port), one thread each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mochi.models.dit import DIT_PRESETS, AsymmDiT
from mochi.models.lora import add_trainable_lora
from mochi.models.vae_tiling import decode
from mochi.parallel.fsdp import parameter_bytes
from mochi.parallel.sequence import check_heads
from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest
from mochi.train import shapes
from mochi.train.data import prepare_data
from mochi.train.lora_train import LoraTrainConfig, train_lora
from mochi.video import write_video
from mochi.weights.io import read_state_dict

from .test_pipeline import tiny_components

ROOT = Path(__file__).resolve().parents[1]
# 4 heads: 2 per rank over 2 ranks; 18 and 3 visual tokens test an even and a padded split.
DIT4 = dataclasses.replace(DIT_PRESETS["tiny"], num_heads=4)
REQUEST = {"prompt": "a red circle moving right", "seed": 3}
TRAIN = LoraTrainConfig(rank=2, steps=2, warmup=1, sample_every=2, checkpoint_every=1, caption_dropout=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(job: str, out: Path, nproc: int = 2, timeout: float = 120.0) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
            "MOCHI_DIST_TIMEOUT": "20",
        }
        code = f"from tests.test_parallel import {job}; {job}({str(out)!r})"
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stderr=subprocess.PIPE)
        )
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int | None, str]]:
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            results.append((None, err.decode(errors="replace")))
            continue
        results.append((p.returncode, err.decode(errors="replace")))
    return results


def _dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 3, 4, 6, generator=g)  # 3·2·3 = 18 tokens
    x_odd = torch.randn(1, 12, 1, 2, 6, generator=g)  # 3 tokens: padded to 4 over 2 ranks
    sigma = torch.tensor([0.3, 0.7])
    text = torch.randn(2, 5, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()  # second sample: the empty prompt
    return x, x_odd, sigma, text, mask


def _dit4(lora: bool = False, before_lora=None) -> AsymmDiT:  # noqa: ANN001 - fn(dit)
    torch.manual_seed(0)
    dit = AsymmDiT(DIT4)
    if before_lora is not None:
        before_lora(dit)
    if lora:
        dit.requires_grad_(False)
        add_trainable_lora(dit, 2, 2.0, ("qkv_x", "qkv_y", "proj_x", "proj_y"), 0.0)
        with torch.no_grad():  # live B matrices, so every LoRA path has a gradient
            for n, p in dit.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(std=0.1)
    return dit


def _lora_grads(dit: AsymmDiT) -> dict[str, torch.Tensor]:
    x, _, sigma, text, mask = _dit_inputs()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    torch.nn.functional.mse_loss(dit(x, sigma, text, mask), target).backward()
    return {n: p.grad.clone() for n, p in dit.named_parameters() if p.requires_grad}


def _tiles(decoder, z):
    return decode(decoder, z, tile=(2, 3), overlap=1)


def _job(out: str) -> None:
    """Every parallel case on this rank; rank 0 saves the results to ``out``/results.pt."""
    torch.set_num_threads(1)
    from mochi.parallel import comm
    from mochi.parallel.apply import parallelize
    from mochi.parallel.context import close_world, init_world
    from mochi.parallel.fsdp import shard_dit
    from mochi.parallel.sequence import enable_sequence_parallel
    from mochi.parallel.vae import parallel_decode

    world = init_world("cpu")
    res: dict = {}
    for mode in ("replicate", "shard"):
        pipe = MochiPipeline(tiny_components(), device="cpu")
        before = parameter_bytes(pipe.components.dit), parameter_bytes(pipe.components.text_encoder)
        parallelize(pipe, world, weights=mode)
        comm.reset_traffic()
        gen = pipe.generate(GenerationRequest(**REQUEST))
        res[mode] = {
            "latents": gen.latents,
            "frames": gen.frames,
            "traffic": dict(comm.traffic),
            "bytes_before": before,
            "bytes_after": (
                parameter_bytes(pipe.components.dit),
                parameter_bytes(pipe.components.text_encoder),
            ),
        }
    pipe = MochiPipeline(tiny_components(), device="cpu")
    parallelize(pipe, world, weights="replicate", guidance=True)
    res["guidance"] = pipe.generate(GenerationRequest(**REQUEST)).latents

    x, x_odd, sigma, text, mask = _dit_inputs()
    dit = _dit4()
    enable_sequence_parallel(dit)
    with torch.no_grad():
        res["dit"] = dit(x, sigma, text, mask)
        res["dit_odd"] = dit(x_odd, sigma[:1], text[:1], mask[:1])
    # bf16 (the GPU default) with its fp32 islands: sharding failed FSDP's one-dtype assertion at the forward.
    dit = _dit4().to(torch.bfloat16)
    enable_sequence_parallel(dit)
    half = (x.bfloat16(), sigma, text.bfloat16(), mask)
    with torch.no_grad():
        res["dit_bf16"] = dit(*half)
        shard_dit(dit, world)
        res["dit_bf16_shard"] = dit(*half)
    res["dit_bf16_fp32"] = sorted(n for n, p in dit.named_parameters() if p.dtype == torch.float32)
    # ... and read rank by rank into a meta model (--parallel-weights shard from a checkpoint).
    from mochi.parallel.sharded_load import load_dit_sharded
    from mochi.weights.formats import detect
    from mochi.weights.io import save_state_dict

    path = Path(out) / f"dit-rank{world.rank}.safetensors"  # each rank its own file: no race
    save_state_dict(_dit4().state_dict(), path)
    loaded, _ = load_dit_sharded(detect(path), world, torch.bfloat16)
    enable_sequence_parallel(loaded)
    with torch.no_grad():
        res["dit_bf16_read_sharded"] = loaded(*half)
    dit = _dit4(lora=True)
    enable_sequence_parallel(dit)
    grads = _lora_grads(dit)
    comm.average_grads([p for p in dit.parameters() if p.requires_grad])
    res["grads"] = {n: p.grad for n, p in dit.named_parameters() if p.requires_grad}
    dit = _dit4(lora=True)  # the same step with FSDP2-sharded weights: FSDP averages the LoRA gradients
    enable_sequence_parallel(dit)
    shard_dit(dit, world)
    _lora_grads(dit)
    comm.average_grads([p for p in dit.parameters() if p.requires_grad])  # skips FSDP's DTensor gradients
    res["grads_sharded"] = {n: p.grad.full_tensor() for n, p in dit.named_parameters() if p.requires_grad}
    dit = _dit4(lora=True, before_lora=lambda d: shard_dit(d, world))  # as train-lora: LoRA added after
    enable_sequence_parallel(dit)
    assert enable_sequence_parallel(dit) is enable_sequence_parallel(dit)  # enabling twice changes nothing
    _lora_grads(dit)
    comm.average_grads([p for p in dit.parameters() if p.requires_grad])  # plain tensors: averaged here
    res["grads_lora_after_shard"] = {n: p.grad for n, p in dit.named_parameters() if p.requires_grad}

    decoder = tiny_components().decoder
    z = torch.randn(1, 12, 2, 4, 6, generator=torch.Generator().manual_seed(4))
    res["vae_tiles"] = parallel_decode(decoder, z, tile=(2, 3), overlap=1)
    res["vae_whole"] = parallel_decode(decoder, z)
    del grads

    from mochi.parallel.context import broadcast_int
    from mochi.parallel.train import parallelize_training
    from mochi.train.lora_train import train_lora

    res["seed"] = broadcast_int(100 + world.rank, world)
    pipe = MochiPipeline(tiny_components(), device="cpu")
    run = Path(out) / f"run{world.rank}"
    cfg = dataclasses.replace(TRAIN, gradient_checkpointing=True)  # recomputation under the split too
    train_lora(pipe, Path(out) / "data", run, cfg, progress=False, parallel=parallelize_training(pipe, world))
    if world.is_main:
        torch.save(res, Path(out) / "results.pt")
    close_world()


def _job_dies(out: str) -> None:
    """Rank 1 is killed mid-job; rank 0, inside a collective, must fail instead of hanging."""
    import torch.distributed as dist

    from mochi.parallel.context import init_world

    world = init_world("cpu")
    dist.barrier()
    if world.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(4)
    for _ in range(10_000):
        dist.all_reduce(t)
        time.sleep(0.01)


def _prepare(out: Path, components=None) -> Path:  # noqa: ANN001 - Components (default: the tiny test ones)
    videos = out / "videos"
    videos.mkdir()
    vocab = shapes.Vocab(
        colors=("red", "blue"), shapes=("star",), directions=("left",), backgrounds=("black",)
    )
    for i, (cap, video) in enumerate(shapes.clips(seed=0, n=2, frames=7, height=32, width=32, vocab=vocab)):
        write_video(video, videos / f"clip{i}.mp4")
        (videos / f"clip{i}.txt").write_text(cap + "\n")
    prepare_data(videos, out / "data", components or tiny_components(), frames=7, width=32, height=32)
    return out


def _job_flags(out: str) -> None:
    """A stop request seen by one rank reaches all; rank 0's text (or None) reaches all."""
    from mochi.parallel.context import broadcast_text, close_world, init_world
    from mochi.parallel.train import TrainParallel

    world = init_world("cpu")
    flags = TrainParallel(world)
    results = {
        "any": flags.any_rank(world.rank == 1),
        "none": flags.any_rank(False),
        "text": broadcast_text("rank 0 says ✓" if world.is_main else "ignored", world),
        "no_text": broadcast_text(None if world.is_main else "ignored", world),
    }
    Path(out, f"flags{world.rank}.json").write_text(json.dumps(results))
    # Leave the group as the CLI does (atexit): a process that exits inside it can abort in gloo's teardown
    # ("terminate called without an active exception", seen once in CI).
    close_world()


def _job_locked(out: str) -> None:
    """Both ranks try to train into ``out``/run with --restart while another run holds its lock."""
    from mochi.parallel.context import close_world, init_world
    from mochi.parallel.train import parallelize_training

    world = init_world("cpu")
    pipe = MochiPipeline(tiny_components(), device="cpu")
    parallel = parallelize_training(pipe, world)
    try:
        train_lora(pipe, Path(out) / "data", Path(out) / "run", TRAIN, False, parallel, restart=True)
    except ValueError as e:
        Path(out, f"refused{world.rank}.txt").write_text(str(e))
    close_world()


def _job_cli(out: str) -> None:
    """``mochi`` as a rank runs it under torchrun, with the arguments in ``out``/args.json."""
    from mochi.cli import main

    raise SystemExit(main(json.loads(Path(out, "args.json").read_text())))


def _job_hangs(out: str) -> None:
    """Rank 1 stays alive but never joins the next collective; rank 0 must time out instead of hanging."""
    import torch.distributed as dist

    from mochi.parallel.context import init_world

    world = init_world("cpu", timeout_s=4)
    dist.barrier()
    if world.rank == 1:
        time.sleep(120)
    dist.all_reduce(torch.ones(4))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = _prepare(tmp_path_factory.mktemp("parallel"))
    outcome = _wait(_launch("_job", out), timeout=150)
    for rank, (code, err) in enumerate(outcome):
        assert code == 0, f"rank {rank} exited {code}:\n{err[-3000:]}"
    res = torch.load(out / "results.pt", weights_only=True)
    res["out"] = out
    return res


@pytest.fixture(scope="module")
def single():
    pipe = MochiPipeline(tiny_components(), device="cpu")
    return pipe.generate(GenerationRequest(**REQUEST))


@pytest.mark.parametrize("mode", ["replicate", "shard"])
def test_sampled_latents_and_frames_match_one_process(results, single, mode):
    got = results[mode]
    torch.testing.assert_close(got["latents"], single.latents, atol=1e-5, rtol=0)
    assert (got["frames"].int() - single.frames.int()).abs().max() <= 1  # uint8 rounding of ≤1e-5 floats
    assert got["traffic"]["all_to_all"] > 0 and got["traffic"]["all_gather"] > 0


def test_guidance_parallel_matches_one_process(results, single):
    torch.testing.assert_close(results["guidance"], single.latents, atol=1e-5, rtol=0)


def test_sequence_split_dit_output_even_and_padded(results):
    x, x_odd, sigma, text, mask = _dit_inputs()
    dit = _dit4()
    with torch.no_grad():
        torch.testing.assert_close(results["dit"], dit(x, sigma, text, mask), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            results["dit_odd"], dit(x_odd, sigma[:1], text[:1], mask[:1]), atol=1e-5, rtol=0
        )


def test_a_bf16_dit_shards_with_its_fp32_islands_kept_whole(results):
    assert torch.equal(results["dit_bf16_shard"], results["dit_bf16"])
    assert torch.equal(results["dit_bf16_read_sharded"], results["dit_bf16"])
    assert results["dit_bf16"].dtype == torch.bfloat16
    assert results["dit_bf16_fp32"] == sorted(n for n in _dit4().state_dict() if AsymmDiT.is_fp32_param(n))
    assert len(results["dit_bf16_fp32"]) == 1 + 4 * DIT4.depth  # RoPE frequencies, q/k norms of x and y


@pytest.mark.parametrize("weights", ["grads", "grads_sharded", "grads_lora_after_shard"])
def test_lora_training_step_gradients_match(results, weights):
    want = _lora_grads(_dit4(lora=True))
    assert set(results[weights]) == set(want) and len(want) == 4 * 2 * 2 - 2  # last block: no proj_y
    for name, g in want.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(results[weights][name], g, atol=1e-5, rtol=0, msg=name)


def test_sharded_parameter_memory_per_rank(results):
    for i in range(2):  # DiT, T5
        before, after = results["shard"]["bytes_before"][i], results["shard"]["bytes_after"][i]
        assert after <= 0.55 * before, (i, before, after)
        assert results["replicate"]["bytes_after"][i] == before


def test_parallel_vae_decode_matches_one_process(results):
    decoder = tiny_components().decoder
    z = torch.randn(1, 12, 2, 4, 6, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(results["vae_tiles"], _tiles(decoder, z), atol=1e-5, rtol=0)
    torch.testing.assert_close(results["vae_whole"], decode(decoder, z), atol=1e-5, rtol=0)


def test_heads_that_do_not_split_are_a_clear_error():
    with pytest.raises(
        ValueError, match=r"size 3 cannot split the DiT's 4 attention heads.*valid sizes: \[1, 2, 4\]"
    ):
        check_heads(4, 3)
    check_heads(24, 8)


def test_a_dead_rank_makes_the_other_exit_in_bounded_time(tmp_path):
    # The bound is _wait's deadline: a rank 0 still waiting then is killed and reads as None (a hang). No
    # wall-clock assertion beyond it: on a loaded machine start-up alone can take tens of seconds.
    outcome = _wait(_launch("_job_dies", tmp_path), timeout=60)
    assert outcome[1][0] == -signal.SIGKILL
    assert outcome[0][0] not in (None, 0), outcome[0][1][-2000:]


def test_train_lora_over_two_ranks_equals_one_process(results, tmp_path):
    out = results["out"]
    assert results["seed"] == 100  # every rank took rank 0's seed
    assert not (out / "run1").exists()  # only rank 0 writes
    written = sorted(p.name for p in (out / "run0").iterdir())
    assert (
        "lora.safetensors" in written and "samples" in written and "lora-step-000001.safetensors" in written
    )
    single = train_lora(MochiPipeline(tiny_components(), device="cpu"), out / "data", tmp_path, TRAIN, False)
    want, got = read_state_dict(single), read_state_dict(out / "run0" / "lora.safetensors")
    assert want.keys() == got.keys() and len(want) > 0
    assert all(t.abs().max() > 0 for t in want.values())  # B moved off its zero init: training happened
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, atol=1e-5, rtol=0, msg=name)


def test_parallelize_refuses_a_world_that_cannot_split_the_heads_before_any_work():
    from mochi.parallel.apply import parallelize
    from mochi.parallel.context import World

    pipe = MochiPipeline(tiny_components(), device="cpu")  # the tiny DiT has 2 heads
    world = World(rank=0, size=3, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ValueError, match=r"size 3 cannot split the DiT's 2 attention heads: .*\[1, 2\]"):
        parallelize(pipe, world)  # no process group exists: it must fail before any collective
    with pytest.raises(ValueError, match="needs an even number of ranks, got world size 3"):
        parallelize(pipe, world, guidance=True)
    assert pipe.parallel is None


def _torchrun_generate(folder: Path, *options: str) -> subprocess.CompletedProcess:
    """``mochi generate`` of a 7-frame video by torchrun's real launcher on 2 CPU ranks, in ``folder``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(_free_port()), "-m", "mochi", "generate", "a red ball", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "MOCHI_DIST_TIMEOUT": "20"}
    return subprocess.run(
        [*cmd, "--frames", "7", *options], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )


def test_torchrun_generate_writes_once_on_rank_0(tmp_path):
    """The real launcher: 2 ranks, sharded weights, guidance split, no --seed (rank 0 draws it)."""
    done = _torchrun_generate(tmp_path, "--steps", "2", "--parallel-weights", "shard", "--guidance-parallel")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 1 prints and writes nothing
    videos = sorted(tmp_path.glob("*.mp4"))
    assert len(videos) == 1
    assert {p.name for p in tmp_path.iterdir()} == {videos[0].name, videos[0].with_suffix(".json").name}
    sidecar = json.loads(videos[0].with_suffix(".json").read_text())
    assert videos[0].name == f"a-red-ball-{sidecar['seed']}.mp4" and sidecar["device"] == "2 x cpu"
    # The layout that ran (it recorded only the device): one sequence split over both ranks' halves.
    assert sidecar["parallel"] == {"ranks": 2, "sequence": 1, "guidance": True, "weights": "shard"}


def test_a_hung_rank_makes_the_other_fail_at_the_timeout(tmp_path):
    procs = _launch("_job_hangs", tmp_path)
    # Rank 1 sleeps 120 s: a rank 0 without the 4 s collective timeout would still be waiting at _wait's
    # deadline (killed: None) and could only succeed after it. What it failed of must be the timeout.
    code, err = _wait(procs[:1], timeout=60)[0]
    procs[1].kill()
    procs[1].communicate()
    assert code not in (None, 0), err[-2000:]
    assert "timed out" in err.lower() or "timeout" in err.lower(), err[-2000:]


def test_stop_requests_and_rank_0_verdicts_reach_every_rank(tmp_path):
    outcome = _wait(_launch("_job_flags", tmp_path), timeout=90)
    assert [code for code, _ in outcome] == [0, 0], outcome
    want = {"any": True, "none": False, "text": "rank 0 says ✓", "no_text": None}
    assert [json.loads((tmp_path / f"flags{r}.json").read_text()) for r in (0, 1)] == [want, want]


def test_a_run_folder_in_use_stops_every_rank_and_none_clears_it(tmp_path):
    """Rank 0 found the folder locked by another train-lora, while rank 1 went on: with --restart it removed
    that run's checkpoints, then met rank 0 gone in a collective (a gloo traceback)."""
    import fcntl

    _prepare(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    kept = [run / "lora-step-000002.safetensors", run / "lora.safetensors"]
    for path in kept:
        path.write_bytes(b"another run's")
    with open(run / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242")
        lock.flush()
        outcome = _wait(_launch("_job_locked", tmp_path), timeout=90)
    assert [code for code, _ in outcome] == [0, 0], outcome
    said = [(tmp_path / f"refused{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == said[1] and "is in use by another train-lora (pid 4242)" in said[0]
    assert all(path.read_bytes() == b"another run's" for path in kept)


def test_a_rank_whose_peer_stopped_says_so_in_one_line(tmp_path):
    """Rank 0 alone meets an error (train-lora's samples folder is a file: only rank 0 writes); rank 1 then
    met the closed socket in its next collective and printed gloo's traceback instead of one line."""
    _prepare(tmp_path, MochiPipeline.from_pretrained(None, device="cpu").components)  # the CLI's model
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "samples").write_text("not a folder")
    args = ["train-lora", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--device", "cpu"]
    args += ["--rank", "2", "--steps", "2", "--sample-every", "1", "--warmup", "1"]
    (tmp_path / "args.json").write_text(json.dumps(args))
    (code0, err0), (code1, err1) = _wait(_launch("_job_cli", tmp_path), timeout=90)
    assert code0 == 2 and "mochi: error: " in err0 and "Traceback" not in err0, err0[-2000:]
    assert code1 == 2 and "Traceback" not in err1, err1[-3000:]
    assert err1.count("mochi: error: ") == 1
    assert "mochi: error: another rank of this job stopped or hangs, so rank 1 stops too (" in err1


def test_torchrun_generate_refuses_a_bad_output_on_every_rank_in_one_line(tmp_path):
    done = _torchrun_generate(tmp_path, "--steps", "1", "--out", str(tmp_path / "nodir" / "x.mp4"))
    # torchrun's own launcher prints a ChildFailedError traceback for any rank that exits non-zero; no rank
    # may show one through mochi's code, nor meet a peer gone (rank 1 used to reach the first collective).
    ours = re.search(
        r"[/\\]mochi[/\\](cli|parallel|pipeline|request|weights|models|train)[/\\.]", done.stderr
    )
    assert done.returncode != 0 and ours is None, done.stderr[-3000:]
    assert "Connection closed" not in done.stderr and "terminated" not in done.stderr
    # One line per rank (the ranks' writes may interleave on the shared stderr: counted, not split).
    assert done.stderr.count("mochi: error: cannot write") == 2
    assert done.stderr.count("nodir' does not exist") == 2
    assert list(tmp_path.iterdir()) == []


def test_dist_timeout_is_checked(monkeypatch):
    from mochi.parallel.context import _env_timeout

    monkeypatch.setenv("MOCHI_DIST_TIMEOUT", "7.5")
    assert _env_timeout() == 7.5
    for bad in ("abc", "-5", "0", "inf"):
        monkeypatch.setenv("MOCHI_DIST_TIMEOUT", bad)
        with pytest.raises(
            ValueError, match=f"MOCHI_DIST_TIMEOUT='{bad}' must be a number of seconds from 1"
        ):
            _env_timeout()


@pytest.mark.parametrize(
    ("text", "nearest"),
    [("1e300", "2147483"), ("1e10", "2147483"), ("0.0001", "1"), ("nan", "60 (the default)")],
)
def test_dist_timeout_is_one_torch_can_take(monkeypatch, text, nearest):
    """1e300 s overflowed timedelta (a traceback), 1e10 s overflowed torch's nanosecond deadlines and 0.0001 s
    timed the store's connect out after 0 ms (C++ traces from every rank)."""
    from mochi.parallel.context import _env_timeout, init_world

    monkeypatch.setenv("MOCHI_DIST_TIMEOUT", text)
    with pytest.raises(ValueError) as e:
        _env_timeout()
    assert str(e.value) == (
        f"MOCHI_DIST_TIMEOUT={text!r} must be a number of seconds from 1 to 2147483 (24.8 days; default 60); "
        f"nearest valid: {nearest}"
    )
    for edge in ("1", "2147483"):
        monkeypatch.setenv("MOCHI_DIST_TIMEOUT", edge)
        assert _env_timeout() == float(edge)
    for k, v in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=r"^timeout_s must be a number of seconds from 1 to 2147483"):
        init_world("cpu", timeout_s=1e10)  # refused before any process group is made


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of cuda on machines without CUDA")
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bogus", "device 'bogus' is not a device name; use cpu, cuda or cuda:N"),
        ("cuda", "device 'cuda' asked for, but this machine has no CUDA; use --device cpu"),
        ("mps", "device 'mps' is not supported"),
    ],
)
def test_under_torchrun_the_device_is_checked_as_in_one_process(monkeypatch, device, message):
    """Under torchrun a bad name was torch's traceback, and cuda without CUDA ran on the CPU unsaid."""
    import torch.distributed as dist

    from mochi.parallel.context import init_world

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined a group"))
    with pytest.raises(ValueError, match=re.escape(message)):
        init_world(device)
