"""Context-parallel prefill on the CPU: 2 gloo ranks compute what one process computes.

Each rank is a real process with the whole model and its own KV pool (``cp_ranks``). The oracle is
the single-process runner on the same checkpoint and steps: rank 0's float32 logits within 1e-5,
the same sampled tokens on every rank, both split and unsplit steps taken, and every rank's pool
holding the whole KV (what the prefill service ships from rank 0).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cp_ranks import SCHEDULE, SPLIT, cp_rank_main, cp_run
from tp_ranks import run_ranks

TOL = 1e-5
CASES = ["qwen3", "llama"]  # q/k norm; llama3 rope, tied embeddings, 4 q heads per kv head


@pytest.fixture(scope="module")
def cases(model_dirs: dict[str, Path]) -> dict[str, tuple[str, bool]]:
    return {name: (str(model_dirs[name]), False) for name in CASES}


@pytest.fixture(scope="module")
def cp1(cases) -> dict[str, dict]:
    return {name: cp_run(path, None) for name, (path, _) in cases.items()}


@pytest.fixture(scope="module")
def cp2(cases, tmp_path_factory) -> list[dict[str, dict]]:
    return run_ranks(2, cases, tmp_path_factory.mktemp("cp2"), target=cp_rank_main)


@pytest.mark.parametrize("piecewise", [False, True], ids=["eager", "piecewise"])
@pytest.mark.parametrize("case", CASES)
def test_cp2_equals_one_process(case, piecewise, cp1, cp2):
    """``piecewise``: the ranks run EXTEND steps through piecewise graphs (stand-ins on the CPU)."""
    want = cp1[case]
    rank0, rank1 = (rank[f"{case}-piecewise" if piecewise else case] for rank in cp2)
    assert rank0["split"] == SPLIT and want["split"] == [False] * len(SPLIT)
    extend = [not all(n == 1 for n in lens) for lens in SCHEDULE]
    assert rank0["piecewise"] == rank1["piecewise"] == (extend if piecewise else [False] * len(SPLIT))
    for step, (got, ref) in enumerate(zip(rank0["logits"], want["logits"], strict=True)):
        torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL, msg=lambda m, s=step: f"step {s}: {m}")
    assert all(logits.shape[0] == 0 for logits, split in zip(rank1["logits"], SPLIT, strict=True) if split), (
        "rank 1 holds no last token of a split step"
    )
    assert rank0["tokens"] == want["tokens"] == rank1["tokens"]
    for rank, got in enumerate((rank0, rank1)):
        torch.testing.assert_close(
            got["kv"], want["kv"], rtol=TOL, atol=TOL, msg=lambda m, r=rank: f"rank {r}: {m}"
        )
