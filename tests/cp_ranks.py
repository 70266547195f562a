"""Context-parallel ranks as real processes for the CPU tests, on ``tp_ranks.run_ranks``.

Each rank builds its own ``ModelRunner`` (the whole model, its own KV pool) with a ``CPGroup`` over
gloo and runs ``cp_run``: the same packed steps the single-process runner runs — split steps
(fresh prompts; a chunk over a cached prefix packed with another sequence's decode token), an
EXTEND step too small to split, and DECODE steps — sampling through the runner (rank 0 samples,
the others receive its tokens). Results travel through files, as in ``tp_ranks``.
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import itertools
import traceback
from pathlib import Path
from typing import Any

import torch
from decode_batches import StandInGraph
from tp_ranks import scheduled

from engine.config import EngineConfig, ModelConfig
from engine.distributed import destroy_tp, init_tp
from engine.distributed.context_parallel import CPGroup
from engine.graphs import PiecewiseGraphRunner
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

PAGE_SIZE = 4
MIN_TOKENS = 2  # cp_min_tokens: a step splits when each of the 2 ranks gets 2 tokens
PROMPT_LENS = (22, 9)
# (new tokens of A, of B): split (fresh prompts: 12 | 10 tokens a rank); split (A over a
# 13-token prefix, B's first decode token: 4 | 4); not split (A's last 2 and B's decode: 2 | 1);
# then DECODE steps (never split).
SCHEDULE = [(13, 9), (7, 1), (2, 1)] + [(1, 1)] * 3
SPLIT = [True, True, False] + [False] * 3


def cp_run(model_dir: str, cp: CPGroup | None, piecewise: bool = False) -> dict[str, Any]:
    """Runs ``SCHEDULE``; returns each step's last-token logits (rank 0; other ranks compute none),
    the tokens ``sample`` returns at each step (every row: mid-prompt rows sample too), which steps
    were split, which ran piecewise, and the KV pool's pages in use. ``piecewise``: EXTEND steps go
    through the piecewise runner with stand-in graphs (``test_piecewise_staging``), which on a
    split step stages this rank's tokens only and attends through the CP attention wrapper."""
    cfg = EngineConfig(
        model=model_dir,
        page_size=PAGE_SIZE,
        max_num_batched_tokens=64,
        kv_cache_bytes=1 << 20,
        cp=1 if cp is None else cp.world_size,
        cp_min_tokens=MIN_TOKENS,
    )
    runner = ModelRunner(cfg, ModelConfig.from_dir(model_dir), cp=cp)
    if piecewise:
        pw = PiecewiseGraphRunner(
            runner.model, runner.kv_pool, runner.attn_backend, max_tokens=64, device=torch.device("cpu")
        )
        pw._graphs = {
            t: [StandInGraph(functools.partial(pw.run_piece, i, t)) for i in range(pw.num_pieces)]
            for t in pw.buckets
        }
        runner.piecewise = pw
    g = torch.Generator().manual_seed(0)
    seqs = [
        Sequence(name, torch.randint(3, 1000, (n,), generator=g).tolist(), SamplingParams(), 0, 64)
        for name, n in zip("AB", PROMPT_LENS, strict=True)
    ]
    pages = itertools.count(1)
    logits_per_step, tokens_per_step, split, staged = [], [], [], []
    for extend_lens in SCHEDULE:
        batch = scheduled(seqs, extend_lens, pages)
        before = runner.num_split_steps
        fb = runner.prepare(batch)
        staged.append(runner.piecewise is not None and runner.piecewise.is_staged(fb))
        logits = runner.forward(fb).clone()  # [2, vocab] on rank 0
        tokens = runner.sample(logits, batch).token_ids
        split.append(runner.num_split_steps > before)
        for seq, n, token in zip(seqs, extend_lens, tokens, strict=True):
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(token)
        logits_per_step.append(logits)
        tokens_per_step.append(tokens)
    return {
        "logits": logits_per_step,
        "tokens": tokens_per_step,
        "split": split,
        "piecewise": staged,
        "kv": runner.kv_pool.kv_gpu[:, :, 1 : next(pages)].clone(),  # [layers, 2, used pages, ...]
    }


def cp_rank_main(
    rank: int, world_size: int, init_method: str, cases: dict[str, tuple[str, bool]], out_dir: str
) -> None:
    """A ``run_ranks`` target: ``cp_run`` per case, results to ``rank{rank}.pt``."""
    torch.set_num_threads(1)  # ranks share the CPU cores
    out = Path(out_dir)
    fault = (out / f"rank{rank}.fault").open("w")
    faulthandler.enable(fault)
    try:
        group = init_tp(rank, world_size, init_method, timeout_s=60)
        cp = CPGroup.of(group)
        results = {name: cp_run(path, cp) for name, (path, _) in cases.items()}
        results |= {
            f"{name}-piecewise": cp_run(path, cp, piecewise=True) for name, (path, _) in cases.items()
        }
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    del group, cp
    gc.collect()
    destroy_tp()
