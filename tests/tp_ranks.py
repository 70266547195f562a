"""Tensor-parallel ranks as real processes for the CPU tests.

``run_ranks`` spawns ``world_size`` processes joined by gloo; each builds its own ``ModelRunner``
(its shard of the weights, a KV pool of its share of the kv heads) and runs ``greedy_run``: the
same packed steps the single-process runner runs, each rank sampling greedily from the full logits
it gets back (or ``kv_move_run``: a request's KV exported from and imported into the ranks' pools).
Results travel through files; every wait is bounded and a rank that fails or hangs fails the run
with its traceback.
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import itertools
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from engine.config import EngineConfig, ModelConfig
from engine.distributed import TPGroup, destroy_tp, init_tp
from engine.distributed.kv_shards import KVExportPlan, KVImportPlan
from engine.graphs.two_batch import run_overlapped, split_batch, tbo_split
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

PAGE_SIZE = 4
# Two prompts: A is prefilled in two chunks (the second over a cached prefix, packed with B's first
# decode token), then both decode. Each entry: (new tokens of A, of B), DECODE when all are 1.
PROMPT_LENS = (12, 6)
SCHEDULE = [(7, 6), (5, 1)] + [(1, 1)] * 4


def scheduled(seqs: list[Sequence], extend_lens: tuple[int, ...], pages: Iterator[int]) -> ScheduledBatch:
    """The step computing ``extend_lens`` new tokens of ``seqs``, pages taken from ``pages`` as the
    sequences grow; DECODE when every count is 1."""
    for seq, n in zip(seqs, extend_lens, strict=True):
        while len(seq.pages) * PAGE_SIZE < seq.num_computed + n:
            seq.pages.append(next(pages))
    return ScheduledBatch(seqs, list(extend_lens), is_decode=all(n == 1 for n in extend_lens))


def greedy_run(
    model_dir: str, tp: TPGroup | None = None, dummy: bool = False, tbo: bool = False
) -> dict[str, Any]:
    """Runs ``SCHEDULE``; returns each step's last-token logits [steps, 2, vocab] (float32), the
    greedy tokens sampled at each step (None where a sequence is mid-prompt) and the number of kv
    heads in this rank's KV pool. ``tbo``: DECODE steps run as two micro-batches whose stages and
    all-reduces interleave (``engine.graphs.two_batch``, here without streams)."""
    cfg = EngineConfig(
        model=model_dir,
        page_size=PAGE_SIZE,
        max_num_batched_tokens=64,
        kv_cache_bytes=1 << 20,
        load_format="dummy" if dummy else "safetensors",
    )
    runner = ModelRunner(cfg, ModelConfig.from_dir(model_dir), tp=tp)
    g = torch.Generator().manual_seed(0)
    seqs = [
        Sequence(name, torch.randint(3, 1000, (n,), generator=g).tolist(), SamplingParams(), 0, 64)
        for name, n in zip("AB", PROMPT_LENS, strict=True)
    ]
    pages = itertools.count(1)
    logits_per_step, tokens_per_step = [], []
    for extend_lens in SCHEDULE:
        batch = scheduled(seqs, extend_lens, pages)
        fb = runner.prepare(batch)
        if tbo and batch.is_decode:
            halves = split_batch(fb, tbo_split(fb.batch_size))
            for half in halves:
                runner.attn_backend.prepare(half)
            run = functools.partial(run_overlapped, reduce=runner.tp.all_reduce, side_stream=None)
            with torch.inference_mode():
                logits = runner.model.forward_two_batch(fb, halves, run).clone()  # [2, vocab]
        else:
            logits = runner.forward(fb).clone()  # [2, vocab]
        tokens: list[int | None] = []
        for seq, n, token in zip(seqs, extend_lens, logits.argmax(-1).tolist(), strict=True):
            seq.num_computed += n
            done = seq.num_computed == seq.num_tokens
            if done:
                seq.token_ids.append(token)
            tokens.append(token if done else None)
        logits_per_step.append(logits)
        tokens_per_step.append(tokens)
    return {
        "logits": torch.stack(logits_per_step),
        "tokens": tokens_per_step,
        "kv_heads": runner.kv_pool.num_kv_heads,
    }


EXPORT_PAGES = [3, 5, 2]  # a 10-token prompt's pages, out of order
IMPORT_PAGES = [9, 11, 12]


def kv_move_run(model_dir: str, tp: TPGroup | None = None, dummy: bool = False) -> dict[str, Any]:
    """Prefill a 10-token prompt into ``EXPORT_PAGES`` and export them (rank 0: whole heads, plus
    the same pages of a one-rank runner after the same prefill); import that one-rank KV into
    ``IMPORT_PAGES`` in two plans (layer 0, then the rest), then export it again. Every rank returns
    its pool's ``IMPORT_PAGES`` [layers, 2, pages, page_size, local heads, head_dim]."""
    cfg = EngineConfig(
        model=model_dir, page_size=PAGE_SIZE, max_num_batched_tokens=64, kv_cache_bytes=1 << 20
    )
    model_cfg = ModelConfig.from_dir(model_dir)
    layers = range(model_cfg.num_layers)
    prompt = torch.randint(3, 1000, (10,), generator=torch.Generator().manual_seed(0)).tolist()

    def prefill(runner: ModelRunner) -> None:
        seq = Sequence("A", prompt, SamplingParams(), 0, 64)
        seq.pages = list(EXPORT_PAGES)
        runner.forward(runner.prepare(ScheduledBatch([seq], [len(prompt)], is_decode=False)))

    runner = ModelRunner(cfg, model_cfg, tp=tp)
    prefill(runner)
    exported = KVExportPlan(EXPORT_PAGES, layers).run(runner)
    one_rank = None
    if exported is not None:  # rank 0: the oracle, one rank with every head
        single = ModelRunner(cfg, model_cfg)
        prefill(single)
        one_rank = single.kv_pool.kv_gpu[:, :, EXPORT_PAGES].clone()
    KVImportPlan(IMPORT_PAGES, range(1)).run(runner, None if one_rank is None else one_rank[:1])
    KVImportPlan(IMPORT_PAGES, range(1, layers.stop)).run(runner, None if one_rank is None else one_rank[1:])
    return {
        "exported": exported,
        "one_rank": one_rank,
        "imported": runner.kv_pool.kv_gpu[:, :, IMPORT_PAGES].clone(),
        "reexported": KVExportPlan(IMPORT_PAGES, layers).run(runner),
    }


def _rank_main(
    rank: int,
    world_size: int,
    init_method: str,
    cases: dict[str, tuple],
    out_dir: str,
    fn: Any = greedy_run,
) -> None:
    torch.set_num_threads(1)  # ranks share the CPU cores
    out = Path(out_dir)
    fault = (out / f"rank{rank}.fault").open("w")
    faulthandler.enable(fault)  # a native abort still leaves a stack behind
    try:
        tp = init_tp(rank, world_size, init_method, timeout_s=60)
        results = {name: fn(case[0], tp, *case[1:]) for name, case in cases.items()}
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        # No destroy_tp: it waits for every rank, and the others are about to be killed.
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # Drop every reference to the process group so that it is torn down here, by destroy_tp,
    # rather than during interpreter shutdown.
    del tp
    gc.collect()
    destroy_tp()


def run_ranks(
    world_size: int,
    cases: dict[str, tuple],
    out_dir: Path,
    timeout_s: float = 120.0,
    target: Callable[..., None] | None = None,
    fn: Any = greedy_run,
) -> list[dict[str, dict[str, Any]]]:
    """``cases``: name -> ``fn``'s arguments but ``tp`` (model dir, dummy weights[, tbo]). Returns
    each rank's ``fn`` (``greedy_run``, ``kv_move_run``) results; ``target``: another rank body with
    ``_rank_main``'s arguments and output files (``cp_ranks``; ``fn`` is then unused)."""
    ctx = mp.get_context("spawn")
    init_method = f"file://{out_dir / 'rendezvous'}"
    main = _rank_main if target is None else target
    extra = (fn,) if target is None else ()
    procs = [
        ctx.Process(target=main, args=(r, world_size, init_method, cases, str(out_dir), *extra), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    pending = {p.sentinel: p for p in procs}
    failed = False  # once one rank failed, the others would only wait for it
    try:
        while pending and not failed and (left := deadline - time.monotonic()) > 0:
            for sentinel in wait(list(pending), timeout=left):
                p = pending.pop(sentinel)
                p.join()
                failed = failed or p.exitcode != 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    codes = [p.exitcode for p in procs]
    errors = [f.read_text() for f in sorted(out_dir.glob("rank*.err")) + sorted(out_dir.glob("rank*.fault"))]
    errors = [e for e in errors if e]
    assert codes == [0] * world_size, (
        f"TP ranks' exit codes {codes} (negative: killed, at the {timeout_s:.0f} s timeout or after "
        f"another rank failed); tracebacks: {errors}"
    )
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]
