"""Hand-built batches over random prefix KV, and the graph-vs-eager checks that the CPU (stand-in
graphs) and GPU (real CUDA graphs) graph tests share.

A decode sequence of length L here has L - 1 tokens of KV already in its pages (random values written
into the pool, no prefill) and decodes token L - 1 at position L - 1. An extend sequence has a
prefix of P tokens in its pages the same way and computes its next E tokens.
"""

from __future__ import annotations

import torch

from engine.engine import Engine
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence


class StandInGraph:
    """A CPU stand-in for a captured CUDA graph: ``replay`` runs the captured function eagerly."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


def decode_batch(engine: Engine, lens: list[int], seed: int) -> ScheduledBatch:
    ps = engine.cfg.page_size
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, n in enumerate(lens):
        tokens = torch.randint(0, 1000, (n,), generator=g).tolist()
        seq = Sequence(f"d{seed}-{i}", tokens, SamplingParams(temperature=0), seed=0, max_len=n + 256)
        pages = engine.allocator.alloc(-(-n // ps))
        assert pages is not None, "KV pool too small for the test batch"
        seq.pages, seq.num_computed = pages, n - 1
        seqs.append(seq)
    return ScheduledBatch(seqs, [1] * len(seqs), is_decode=True)


def extend_batch(engine: Engine, shapes: list[tuple[int, int]], seed: int) -> ScheduledBatch:
    """One sequence per (prefix P, extend E): P tokens of KV in its pages, E tokens to compute."""
    ps = engine.cfg.page_size
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, (prefix, ext) in enumerate(shapes):
        tokens = torch.randint(0, 1000, (prefix + ext,), generator=g).tolist()
        seq = Sequence(
            f"e{seed}-{i}", tokens, SamplingParams(temperature=0), seed=0, max_len=prefix + ext + 1
        )
        pages = engine.allocator.alloc(-(-(prefix + ext) // ps))
        assert pages is not None, "KV pool too small for the test batch"
        seq.pages, seq.num_computed = pages, prefix
        seqs.append(seq)
    return ScheduledBatch(seqs, [ext for _, ext in shapes], is_decode=False)


def mixed_lens(num: int, page_size: int, seed: int, longest: int = 1500) -> list[int]:
    """Lengths 1..longest, including 1, a whole number of pages and one token past it."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, longest, (num,), generator=g).tolist()
    for i, n in enumerate((1, page_size * 7, page_size * 7 + 1)[:num]):
        lens[i] = n
    return lens


def advance(engine: Engine, batch: ScheduledBatch, tokens: list[int]) -> None:
    """What the scheduler does after a decode step: append the token, grow pages for the next one."""
    ps = engine.cfg.page_size
    for seq, token in zip(batch.seqs, tokens, strict=True):
        seq.token_ids.append(token)
        seq.num_computed += 1
        if seq.num_computed + 1 > len(seq.pages) * ps:
            page = engine.allocator.alloc(1)
            assert page is not None, "KV pool too small for the test batch"
            seq.pages += page


def release(engine: Engine, batch: ScheduledBatch) -> None:
    for seq in batch.seqs:
        engine.allocator.free(seq.pages)


def row_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest per-row relative error: [rows, vocab] each."""
    got, want = got.double(), want.double()
    return ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()


def graph_vs_eager(engine: Engine, lens: list[int], seed: int) -> float:
    """One decode step of the same batch eagerly and from its graph; the logits' row_rel_err."""
    runner = engine.runner
    assert runner.graphs is not None
    batch = decode_batch(engine, lens, seed)
    eager = runner.forward(runner.prepare(batch, use_graphs=False)).clone()
    fb = runner.prepare(batch)
    assert runner.graphs.is_staged(fb), "a decode batch of a graph-sized batch must take the graph"
    graph = runner.forward(fb).clone()
    release(engine, batch)
    assert not graph.isnan().any()
    return row_rel_err(graph, eager)


def written_slots(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    """Slots whose K or V changed in any layer: pools ``[layers, 2, pages, page_size, heads, dim]``."""
    layers, _, pages, page_size = before.shape[:4]
    changed = (before != after).reshape(layers, 2, pages * page_size, -1).any(-1).any(0).any(0)
    return set(changed.nonzero().flatten().tolist())


def _slots(engine: Engine, batch: ScheduledBatch) -> set[int]:
    ps = engine.cfg.page_size
    return {s.pages[s.num_computed // ps] * ps + s.num_computed % ps for s in batch.seqs}


def _steps(engine: Engine, batch: ScheduledBatch, steps: int, graphs: bool, tokens=None):
    """Greedy (or teacher-forced) decode steps; returns (per-step logits, tokens, written slots)."""
    runner, out, chosen, slots = engine.runner, [], [], set()
    for i in range(steps):
        fb = runner.prepare(batch, use_graphs=graphs)
        assert runner.graphs is not None and runner.graphs.is_staged(fb) == graphs
        logits = runner.forward(fb).clone()
        step_tokens = logits.argmax(-1).tolist() if tokens is None else tokens[i]
        slots |= _slots(engine, batch)
        out.append(logits)
        chosen.append(step_tokens)
        advance(engine, batch, step_tokens)
    return out, chosen, slots


def check_padding_keeps_live_kv(engine: Engine, tol: float, steps: int = 6) -> None:
    """Three sequences decode in the size-4 graph right after four others filled all four rows; then
    they continue eagerly. Checks that the graph steps wrote exactly the live tokens' slots plus
    slots of the dummy page 0, and that every step's logits match an all-eager run of the same
    tokens from the same KV (a corrupted live page would show in the eager continuation)."""
    runner = engine.runner
    assert runner.graphs is not None and runner.graphs.padded_size(3) == 4
    pool = runner.kv_pool.kv_gpu
    pool.normal_()
    stale = decode_batch(engine, [30, 50, 70, 90], seed=99)
    runner.forward(runner.prepare(stale))  # leaves live values in rows 0..3 of the static buffers
    release(engine, stale)
    before = pool.clone()
    lens = [5, 40, 100]
    batch = decode_batch(engine, lens, seed=7)
    start = [(list(s.token_ids), list(s.pages)) for s in batch.seqs]

    graph_logits, tokens, live = _steps(engine, batch, steps, graphs=True)
    page0 = set(range(engine.cfg.page_size))
    assert written_slots(before, pool) - page0 == live, "graph steps wrote outside the live slots"
    more_logits, more_tokens, _ = _steps(engine, batch, steps, graphs=False)

    pool.copy_(before)
    replay = ScheduledBatch([], [], is_decode=True)
    for (token_ids, pages), seq, n in zip(start, batch.seqs, lens, strict=True):
        fresh = Sequence(seq.request_id, token_ids, seq.params, seed=0, max_len=seq.max_len)
        fresh.pages, fresh.num_computed = list(pages), n - 1  # same prefix pages; new ones come fresh
        replay.seqs.append(fresh)
        replay.extend_lens.append(1)
    eager_logits, _, _ = _steps(engine, replay, 2 * steps, graphs=False, tokens=tokens + more_tokens)
    for step, (got, want) in enumerate(zip(graph_logits + more_logits, eager_logits, strict=True)):
        err = row_rel_err(got, want)
        assert err < tol, f"step {step}: logits differ from the all-eager run (rel err {err:.2e})"
    release(engine, batch)
    for seq, (_, pages) in zip(replay.seqs, start, strict=True):
        engine.allocator.free(seq.pages[len(pages) :])  # the prefix pages went back with `batch`
