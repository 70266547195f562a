"""A context-parallel prefill service (``pdserve prefill --cp 2``) feeding a one-rank decode.

The prefill's rank 0 holds the whole KV of every prompt after each split step (every CP rank
writes the all-gathered K/V into its pool), so the tcp transfer ships it unchanged. Oracle: the
single-process engine, token for token, for prompts that split (chunked, with prefix-cache hits)
and prompts too short to. Stopping the service stops its CP rank.
"""

from __future__ import annotations

import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services import start_all
from test_disaggregated import collect, generate_request, run_stream

from engine import LLM, SamplingParams

ENGINE_ARGS = ("--page-size", "4", "--max-num-batched-tokens", "32", "--kv-cache-mib", "16")
STOP_TIMEOUT_S = 30


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:  # the parent pid
            found.append(int(stat.parent.name))
    return found


def test_cp_prefill_serves_what_one_process_computes(tiny_model, tmp_path):
    prefill, decode = start_all(
        [
            ("prefill", tiny_model, (*ENGINE_ARGS, "--cp", "2", "--cp-min-tokens", "4")),
            ("decode", tiny_model, ENGINE_ARGS),
        ],
        tmp_path,
    )
    try:
        ranks = children_of(prefill.proc.pid)
        assert ranks, "the prefill should have started its CP rank"
        reference = LLM(str(tiny_model), page_size=4, max_num_batched_tokens=32, kv_cache_bytes=16 << 20)
        rng = random.Random(1)
        vocab = reference.engine.model_config.vocab_size
        first = [[rng.randrange(vocab) for _ in range(n)] for n in (90, 3, 40, 17, 1, 64)]
        second = [first[0][:80] + [rng.randrange(vocab) for _ in range(20)], first[2] + [5, 6, 7]]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        results = []
        for wave in (first, second):
            requests = [generate_request(p, params, prefill) for p in wave]
            with ThreadPoolExecutor(len(requests)) as pool:
                results += [collect(r)[0] for r in pool.map(lambda r: run_stream(decode, r), requests)]
        expected = [o.token_ids for o in reference.generate(first + second, params)]
        assert results == expected
        prefill.wait_idle()
        decode.wait_idle()
    finally:
        prefill.stop()
        decode.stop()
    split = re.search(r"context parallel: (\d+) steps split over 2 ranks", prefill.log())
    assert split is not None and int(split[1]) >= 5, "the long prompts' chunks should have split"
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (left := [pid for pid in ranks if Path(f"/proc/{pid}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], "the CP rank outlived its prefill service"
