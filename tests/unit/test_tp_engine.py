"""Tensor parallelism: ``LLM(model, tp=2)`` generates what one process generates.

Rank 0 runs the engine in the test process and starts rank 1 as a real process (gloo over
loopback). The oracle is the single-process engine on the same checkpoint and requests: chunked
prefills (a small step budget), prompts of mixed lengths, a prefix-cache hit (a prompt repeated in
a second ``generate``), a seeded random-sampling request; token for token, with and without overlap
scheduling, and through ``pdserve generate --tp 2``. After ``close`` no rank process remains.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
OPTS = dict(page_size=4, max_num_batched_tokens=16, kv_cache_bytes=4 << 20)
LONG = "the keeper of the lighthouse counted every ship that passed in the night " * 2
FIRST = [LONG, "hello", "a short one about the sea and the wind", "red green blue " * 3]
SECOND = [LONG, "the wind"]  # LONG again: served from the prefix cache
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, top_k=40, top_p=0.9, seed=7)
# A worker rank's mirror lacks what it never computed (a prompt from the prefix cache, a token in
# flight): penalties must still give every rank rank 0's tokens. LONG's second run is a cache hit.
PENALISED = SamplingParams(
    max_tokens=10,
    ignore_eos=True,
    temperature=0,
    repetition_penalty=1.5,
    presence_penalty=0.5,
    logit_bias={3: 2.0},
)


def run(llm: LLM) -> tuple[list[list[int]], list[int]]:
    """Token ids of every request of two ``generate`` calls, and the cached-token counts."""
    first = llm.generate(FIRST, [GREEDY, GREEDY, SEEDED, PENALISED])
    second = llm.generate(SECOND, [PENALISED, SEEDED])
    outs = first + second
    return [o.token_ids for o in outs], [o.num_cached_tokens for o in outs]


def assert_gone(pids: list[int]) -> None:
    """Neither running nor a zombie (a zombie keeps its /proc entry until reaped)."""
    assert multiprocessing.active_children() == []
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> tuple[list[list[int]], list[int]]:
    tokens, cached = run(LLM(str(tiny_model), **OPTS))
    assert cached[len(FIRST)] > 0, "the repeated prompt should hit the prefix cache"
    assert all(len(t) == GREEDY.max_tokens for t in tokens)
    return tokens, cached


@pytest.mark.parametrize("overlap", [False, True], ids=["no-overlap", "overlap"])
def test_tp2_generates_what_one_rank_generates(tiny_model, reference, overlap):
    with LLM(str(tiny_model), tp=2, overlap=overlap, **OPTS) as llm:
        assert llm.engine.workers is not None
        pids = [p.pid for p in llm.engine.workers.procs]
        assert llm.engine.runner.kv_pool.num_kv_heads == 1  # this rank's half of the 2 kv heads
        tokens, cached = run(llm)
    assert_gone(pids)
    assert tokens == reference[0]
    assert cached == reference[1]


def test_dead_worker_is_an_error_not_a_hang(tiny_model):
    llm = LLM(str(tiny_model), tp=2, **OPTS)
    assert llm.engine.workers is not None
    proc = llm.engine.workers.procs[0]
    proc.kill()
    proc.join(TIMEOUT_S)
    with pytest.raises(RuntimeError, match="worker rank 1 exited with code -9"):
        llm.generate(["hello"], GREEDY)
    with pytest.raises(RuntimeError, match="the ranks were stopped"):
        llm.generate(["hello"], GREEDY)  # the failed step stopped the ranks: no mismatched collectives
    llm.close()
    assert_gone([proc.pid])


def test_a_failed_start_leaves_no_rank(tiny_model):
    with pytest.raises(
        ValueError, match="num_attention_heads: 4 heads cannot be split evenly over tp_size=3"
    ):
        LLM(str(tiny_model), tp=3, **OPTS)
    assert multiprocessing.active_children() == []


def pdserve_generate(model: Path, tp: int, marker: str) -> str:
    env = os.environ | {"PYTHONIOENCODING": "utf-8", "PDSERVE_TEST_MARKER": marker}
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve", "generate", "--model", str(model), "--tp", str(tp),
         "--prompt", LONG, "--max-tokens", "12", "--ignore-eos", "--max-num-batched-tokens", "16"],
        cwd=REPO, env=env, capture_output=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode("utf-8")


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker`` (the CLI's ranks inherit it)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PDSERVE_TEST_MARKER={marker}".encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue  # exited meanwhile, or not ours to read
    return found


def test_cli_generate_tp2_prints_what_tp1_prints(tiny_model, tmp_path):
    marker = str(tmp_path)
    one = pdserve_generate(tiny_model, 1, marker)
    two = pdserve_generate(tiny_model, 2, marker)
    assert two == one and one.strip()
    assert processes_with(marker) == []


def test_tp_config_is_checked(tiny_model):
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="tp: must be >= 1"):
        EngineConfig(model=str(tiny_model), tp=0)


def test_a_rank_dying_while_a_step_hangs_fails_requests_not_the_caller(tiny_model, monkeypatch):
    """On CUDA a rank dying inside a collective captured in a graph leaves rank 0's step waiting
    with no timeout. Simulated here: rank 0's step blocks (as on the dead collective) while rank 1
    is killed. The serving loop must still end the request with an error naming the rank within
    seconds, and ``stop`` must give up on the stuck step instead of hanging."""
    import asyncio
    import threading

    from engine import async_engine
    from engine.async_engine import AsyncEngine

    monkeypatch.setattr(async_engine, "STOP_TIMEOUT_S", 2.0)
    llm = LLM(str(tiny_model), tp=2, **OPTS)
    engine = llm.engine
    assert engine.workers is not None
    proc = engine.workers.procs[0]
    release = threading.Event()
    real_step = engine.step

    def stuck_step():
        proc.kill()
        release.wait(TIMEOUT_S)  # the collective the dead rank never joins
        return real_step()

    engine.step = stuck_step  # type: ignore[method-assign]

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        stream = await ae.generate("r", [5, 6, 7], GREEDY)
        outs = await asyncio.wait_for(_drain(stream), 20)
        closed = await asyncio.wait_for(ae.stop(), 20)
        return outs[-1], ae.failure, closed

    try:
        last, failure, closed = asyncio.run(main())
    finally:
        release.set()
    assert last.finish_reason == "error"
    assert "worker rank 1 exited with code -9" in str(failure)
    assert closed is False  # the step never returned: the engine was left, not waited for
    engine.step = real_step  # type: ignore[method-assign]
    llm.close()
    assert_gone([proc.pid])


async def _drain(stream):
    return [out async for out in stream]
