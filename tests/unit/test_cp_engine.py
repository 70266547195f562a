"""Context-parallel prefill: ``LLM(model, cp=2)`` generates what one process generates.

Rank 0 runs the engine in the test process and starts rank 1 as a real process (gloo over
loopback). The oracle is the single-process engine on the same checkpoint and requests, token for
token and in cached-token counts: a long prompt chunked over several steps (a small step budget),
each chunk split; short prompts packed with it; a seeded random-sampling request; a prompt that
extends a cached one (a prefix-cache hit whose new tokens are split); and a call with short
prompts only, whose steps do not split. With and without overlap scheduling, and through
``pdserve generate --cp 2``. After ``close`` no rank process remains; a killed rank is an error.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest
from test_tp_engine import REPO, TIMEOUT_S, assert_gone, processes_with

from engine import LLM, SamplingParams

# A step splits when each of the 2 ranks gets 4 new tokens: a full 16-token chunk does (8 | 8).
OPTS = dict(page_size=4, max_num_batched_tokens=16, kv_cache_bytes=4 << 20, cp_min_tokens=4)
LONG = "the keeper of the lighthouse counted every ship that passed in the night " * 2
FIRST = [LONG, "hello", "a short one about the sea and the wind", "red green blue " * 3]
SECOND = [LONG + " and wrote down the name of each one in a book that nobody ever read"]  # cache hit
THIRD = ["hello", "hi"]  # short: no step splits
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, top_k=40, top_p=0.9, seed=7)


def run(llm: LLM) -> tuple[list[list[int]], list[int], list[int]]:
    """Token ids and cached-token counts of every request of three ``generate`` calls, and the
    steps each call split."""
    outs, splits = [], []
    for prompts, params in ((FIRST, [GREEDY, GREEDY, SEEDED, GREEDY]), (SECOND, GREEDY), (THIRD, GREEDY)):
        before = llm.engine.runner.num_split_steps
        outs += llm.generate(prompts, params)
        splits.append(llm.engine.runner.num_split_steps - before)
    return [o.token_ids for o in outs], [o.num_cached_tokens for o in outs], splits


@pytest.fixture(scope="module")
def reference(tiny_model) -> tuple[list[list[int]], list[int]]:
    tokens, cached, splits = run(LLM(str(tiny_model), **OPTS))
    assert cached[len(FIRST)] >= 48, "the extended prompt should hit the prefix cache"
    assert all(len(t) == GREEDY.max_tokens for t in tokens)
    assert splits == [0, 0, 0]
    return tokens, cached


@pytest.mark.parametrize("overlap", [False, True], ids=["no-overlap", "overlap"])
def test_cp2_generates_what_one_rank_generates(tiny_model, reference, overlap):
    with LLM(str(tiny_model), cp=2, overlap=overlap, **OPTS) as llm:
        assert llm.engine.workers is not None
        pids = [p.pid for p in llm.engine.workers.procs]
        tokens, cached, splits = run(llm)
    assert_gone(pids)
    assert tokens == reference[0]
    assert cached == reference[1]
    first, second, third = splits
    assert first >= 4 and second >= 1, "the long prompt's chunks and the prefix-hit extension split"
    assert third == 0, "short prompts run whole on every rank"


def test_dead_cp_worker_is_an_error_not_a_hang(tiny_model):
    llm = LLM(str(tiny_model), cp=2, **OPTS)
    assert llm.engine.workers is not None
    proc = llm.engine.workers.procs[0]
    proc.kill()
    proc.join(TIMEOUT_S)
    with pytest.raises(RuntimeError, match="cp: worker rank 1 exited with code -9"):
        llm.generate([LONG], GREEDY)
    with pytest.raises(RuntimeError, match="cp: the ranks were stopped"):
        llm.generate(["hello"], GREEDY)
    llm.close()
    assert_gone([proc.pid])


def pdserve_generate(model, cp: int, marker: str) -> tuple[str, str]:
    env = os.environ | {
        "PYTHONIOENCODING": "utf-8",
        "PDSERVE_TEST_MARKER": marker,
        "PDSERVE_LOG_LEVEL": "INFO",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve", "generate", "--model", str(model), "--cp", str(cp),
         "--cp-min-tokens", "4", "--prompt", LONG, "--max-tokens", "12", "--ignore-eos",
         "--max-num-batched-tokens", "16"],
        cwd=REPO, env=env, capture_output=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


def test_cli_generate_cp2_prints_what_cp1_prints(tiny_model, tmp_path):
    marker = str(tmp_path)
    one, _ = pdserve_generate(tiny_model, 1, marker)
    two, log = pdserve_generate(tiny_model, 2, marker)
    assert two == one and one.strip()
    # 52 prompt tokens: 3 full chunks split (8 | 8), the last 4 (2 | 2) do not
    assert "context parallel: 3 steps split over 2 ranks" in log
    assert processes_with(marker) == []


def test_cp_config_is_checked(tiny_model):
    from decode_svc.server import DecodeConfig
    from engine.config import EngineConfig

    for bad, field in [
        (dict(cp=0), "cp: must be >= 1"),
        (dict(cp_min_tokens=0), "cp_min_tokens: must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=field):
            EngineConfig(model=str(tiny_model), **bad)
    with pytest.raises(ValueError, match=r"cp: context parallelism does not combine with tensor parallelism"):
        EngineConfig(model=str(tiny_model), cp=2, tp=2)
    with pytest.raises(ValueError, match="cp: decode runs one rank"):
        DecodeConfig(EngineConfig(model=str(tiny_model), cp=2))
    assert multiprocessing.active_children() == []
