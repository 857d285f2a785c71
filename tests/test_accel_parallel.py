"""Step caching under torchrun parallelism: 2 gloo ranks must take the single process's decisions and match
its output (sequence split with a padded token, and guidance split), as tests/test_parallel.py does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mochi.pipeline import MochiPipeline
from mochi.request import GenerationRequest

from .test_accel import FB, PROMPT, TEA
from .test_parallel import _free_port, _wait
from .test_pipeline import tiny_components

ROOT = Path(__file__).resolve().parents[1]
# 13 frames at 16×48: 3·1·3 = 9 visual tokens, so one of the 2 ranks holds a padding row.
SIZE = {"frames": 13, "height": 16, "width": 48, "steps": 8, "seed": 3}


def _requests() -> dict[str, GenerationRequest]:
    return {kind: GenerationRequest(PROMPT, cache=kind, cache_threshold=th, **SIZE) for kind, th in (TEA, FB)}


def _cache_job(out: str) -> None:
    torch.set_num_threads(1)
    from mochi.parallel.apply import parallelize
    from mochi.parallel.context import close_world, init_world

    world = init_world("cpu")
    res = {}
    for mode in ("sequence", "guidance", "sharded"):
        pipe = MochiPipeline(tiny_components(), device="cpu")
        weights = "shard" if mode == "sharded" else "replicate"
        parallelize(pipe, world, weights=weights, guidance=mode == "guidance")
        for kind, request in _requests().items():
            gen = pipe.generate(request)
            res[mode, kind] = gen.latents, gen.stats
    torch.save(res, Path(out) / f"rank{world.rank}.pt")
    close_world()


def _run_ranks(job: str, out: Path) -> list[dict]:
    """Run ``job`` (a function of this module) on 2 gloo ranks as torchrun would start them; each saves
    its results as ``out/rank{r}.pt``, returned in rank order."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            **{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"},
            **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
            "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
            "MOCHI_DIST_TIMEOUT": "30",
        }
        code = f"from tests.test_accel_parallel import {job}; {job}({str(out)!r})"
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stderr=subprocess.PIPE)
        )
    for code, err in _wait(procs, timeout=600):  # minutes only on a host far busier than its cores
        assert code == 0, err[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def test_cached_parallel_equals_cached_single_process(tmp_path):
    results = _run_ranks("_cache_job", tmp_path)

    pipe = MochiPipeline(tiny_components(), device="cpu")
    single = {kind: pipe.generate(request) for kind, request in _requests().items()}
    for kind, gen in single.items():
        skipped = gen.stats["skipped_steps"]
        assert 0 < len(skipped) < SIZE["steps"] - 2, (kind, skipped)  # some steps skipped, some computed
    for rank, res in enumerate(results):
        for (mode, kind), (latents, stats) in res.items():
            assert stats == single[kind].stats, (rank, mode, kind)
            torch.testing.assert_close(latents, single[kind].latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_sequence_split_leaves_padding_rows_out_of_the_metric(kind, monkeypatch):
    """The metric of a padded local shard counts only its real tokens (one process, split emulated)."""
    from mochi.accel import cache as accel_cache
    from mochi.parallel import sequence

    split = sequence._Split(group=None, size=2, rank=1, tokens=9, local=5)  # rank 1: 4 real rows + 1 pad
    monkeypatch.setattr(sequence, "_active", split)
    c = accel_cache.StepCache(torch.nn.Identity(), accel_cache.CacheSetting(kind, 0.1))
    a, b = torch.ones(1, 5, 3), torch.full((1, 5, 3), 2.0)
    a[:, 4], b[:, 4] = 100.0, -100.0  # the padding row differs wildly: it must not count
    assert c._relative_l1(a, b) == 0.5


def _compile_job(out: str) -> None:
    """Two identical requests on a compiled, sequence-split pipeline; the backend (inductor) is replaced by
    one returning each traced graph uncompiled and counting them (dynamo's guards are what is tested)."""
    torch.set_num_threads(1)
    import torch._inductor.compile_fx as compile_fx

    from mochi.accel import compile as accel_compile
    from mochi.parallel.apply import parallelize
    from mochi.parallel.context import close_world, init_world

    graphs = []
    compile_fx.compile_fx = lambda gm, example_inputs, **kwargs: graphs.append(gm) or gm.forward
    accel_compile.compiler_problem = lambda device="cpu": None
    world = init_world("cpu")
    pipe = MochiPipeline(tiny_components(), device="cpu", compile=True)
    parallelize(pipe, world, weights="replicate")
    counts = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "denoise" and done == 1:
            counts.append(len(graphs))  # compiled by the first DiT call

    res = {"latents": [pipe.generate(COMPILE_REQUEST, progress=progress).latents for _ in range(2)]}
    res.update(counts=counts, total=len(graphs), compiled=pipe.compiled)
    torch.save(res, Path(out) / f"rank{world.rank}.pt")
    close_world()


COMPILE_REQUEST = GenerationRequest(PROMPT, **{**SIZE, "steps": 3})  # with a padded token, as above


def test_compiled_sequence_split_compiles_in_the_first_call_only(tmp_path):
    """--compile under torchrun: the first DiT call compiles, no later call of that request or of the next
    identical one recompiles (the split's per-forward state and collectives stay out of the graphs), and the
    output is the single process's."""
    results = _run_ranks("_compile_job", tmp_path)
    want = MochiPipeline(tiny_components(), device="cpu").generate(COMPILE_REQUEST).latents
    for rank, res in enumerate(results):
        assert res["compiled"] and res["counts"][0] > 0, (rank, res)
        assert res["counts"] == [res["total"]] * 2, (rank, res)  # nothing compiled after the first call
        for latents in res["latents"]:
            torch.testing.assert_close(latents, want, rtol=1e-5, atol=1e-5)
