"""The decode-graph runner's logic on the CPU: captured sizes, config, staging, padding, wiring.

Real graphs need CUDA (tests/gpu/test_decode_graphs.py runs the same checks with them). Here each
"graph" is a stand-in whose replay runs the captured function eagerly on the static buffers, with a
CPU attention backend that, like a graph-capable one, takes sequence lengths only from the device
tensors. So everything around the capture is exercised: what ``prepare`` stages, that padded rows
only touch the dummy page whatever a larger batch left in the buffers, and the runner's dispatch.
The oracle is the eager ``torch_native`` path on the same weights and KV.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from decode_batches import (
    StandInGraph,
    check_padding_keeps_live_kv,
    decode_batch,
    graph_vs_eager,
    mixed_lens,
    release,
)

from engine import LLM
from engine.attention.torch_native import TorchNativeBackend, paged_decode
from engine.config import EngineConfig
from engine.graphs import DecodeGraphRunner, graph_batch_sizes
from engine.graphs.decode_graphs import stage_decode
from engine.scheduler import ScheduledBatch


class StaticDecodeBackend(TorchNativeBackend):
    """torch_native decode over the whole static-width page table, masked by device ``seq_lens``."""

    supports_graphs = True

    def prepare_graph(self, batch, max_seq_len):
        pass

    def decode(self, q, k_pages, v_pages, batch, scale):
        return paged_decode(q, k_pages, v_pages, batch.page_table, batch.seq_lens, scale)


def with_stand_in_graphs(engine, tbo_min_batch: int = 0):
    runner = engine.runner
    graphs = DecodeGraphRunner(
        runner.model,
        runner.kv_pool,
        StaticDecodeBackend(max_gather_tokens=4096),
        runner.last_tokens,
        max_batch_size=engine.cfg.graph_batch_limit,
        max_model_len=runner.max_model_len,
        vocab_size=engine.model_config.vocab_size,
        device=torch.device("cpu"),
        tbo_min_batch=tbo_min_batch,
    )
    graphs._graphs = {bs: StandInGraph(functools.partial(graphs.run_static, bs)) for bs in graphs.batch_sizes}
    runner.graphs = graphs
    return engine


@pytest.fixture(scope="module")
def engine(tiny_model):
    llm = LLM(str(tiny_model), page_size=4, max_num_seqs=16, max_model_len=512)
    assert llm.engine.runner.graphs is None, "cuda_graphs is ignored on the CPU"
    return with_stand_in_graphs(llm.engine)


@pytest.fixture(scope="module")
def tbo_engine(tiny_model):
    """Graphs of 4 rows and more run as two micro-batches (two-batch overlap, one rank)."""
    llm = LLM(str(tiny_model), page_size=4, max_num_seqs=16, max_model_len=512)
    return with_stand_in_graphs(llm.engine, tbo_min_batch=4)


def test_captured_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]
    sizes = graph_batch_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-3:] == [224, 240, 256]


def test_graph_batch_limit_config():
    assert EngineConfig(model="m").graph_batch_limit == 256
    assert EngineConfig(model="m", max_num_seqs=48).graph_batch_limit == 48
    assert EngineConfig(model="m", max_num_seqs=512).graph_batch_limit == 256
    assert EngineConfig(model="m", max_num_seqs=512, max_graph_batch_size=384).graph_batch_limit == 384
    assert EngineConfig(model="m", max_num_batched_tokens=64).graph_batch_limit == 64
    with pytest.raises(ValueError, match="max_graph_batch_size"):
        EngineConfig(model="m", max_graph_batch_size=0)


def test_staging_matches_the_eager_prepare_and_pads_onto_page_zero(engine):
    runner = engine.runner
    batch = decode_batch(engine, mixed_lens(5, 4, seed=1, longest=300), seed=1)
    fb = runner.prepare(batch, use_graphs=False)
    ids, rows, pos, slots, lens = (np.full(8, -1, dtype=np.int64) for _ in range(5))
    flat = np.full(8 * 128, -1, dtype=np.int64)
    width = stage_decode(batch.seqs, 4, 8, ids, rows, pos, slots, lens, flat)
    assert width == max(len(seq.pages) for seq in batch.seqs), "the batch's most pages, no more"
    table = flat[: 8 * width].reshape(8, width)
    assert ids[:5].tolist() == fb.input_ids.tolist()
    assert (rows == -1).all(), "every input token is known on the host"
    assert pos[:5].tolist() == fb.positions.tolist()
    assert slots[:5].tolist() == fb.out_cache_loc.tolist()
    assert lens[:5].tolist() == fb.seq_lens.tolist()
    for row, seq in enumerate(batch.seqs):
        assert table[row, : len(seq.pages)].tolist() == seq.pages
    # padding: token 0 at position 0 into slot 0, a length-1 sequence on page 0
    assert (ids[5:] == 0).all() and (pos[5:] == 0).all() and (slots[5:] == 0).all() and (lens[5:] == 1).all()
    assert (table[5:, 0] == 0).all()
    release(engine, batch)


@pytest.mark.parametrize("bs", [1, 3, 8, 13, 16])
def test_replayed_logits_equal_eager(engine, bs):
    engine.runner.kv_pool.kv_gpu.normal_()
    assert graph_vs_eager(engine, mixed_lens(bs, 4, seed=bs, longest=400), seed=bs) < 1e-5


def test_eager_decode_ignores_the_dummy_page(engine):
    """Padded writes land on page 0 (graph padding rows, a context-parallel step's padding rows)
    with any values, NaN included; a short row's gather reads page 0 through its page-table padding
    and must come out exactly as if page 0 held zeros."""
    runner = engine.runner
    pool = runner.kv_pool.kv_gpu
    pool.normal_()
    pool[:, :, 0] = 0
    batch = decode_batch(engine, [5, 40, 100], seed=3)
    clean = runner.forward(runner.prepare(batch, use_graphs=False)).clone()
    pool[:, :, 0] = float("nan")
    try:
        poisoned = runner.forward(runner.prepare(batch, use_graphs=False)).clone()
    finally:
        pool[:, :, 0] = 0  # the module's engine is shared
        release(engine, batch)
    assert not poisoned.isnan().any()
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


def test_padded_rows_keep_live_kv(engine):
    check_padding_keeps_live_kv(engine, tol=1e-5)


@pytest.mark.parametrize("bs", [3, 8, 13, 16])  # padded to 4, 8, 16, 16: split in halves
def test_two_micro_batches_equal_eager(tbo_engine, bs):
    assert tbo_engine.runner.graphs.uses_tbo(tbo_engine.runner.graphs.padded_size(bs))
    tbo_engine.runner.kv_pool.kv_gpu.normal_()
    assert graph_vs_eager(tbo_engine, mixed_lens(bs, 4, seed=bs, longest=400), seed=bs) < 1e-5


def test_two_micro_batches_keep_live_kv(tbo_engine):
    check_padding_keeps_live_kv(tbo_engine, tol=1e-5)


def test_tbo_threshold_config():
    assert EngineConfig(model="m").tbo_threshold == 0, "one rank: nothing to overlap"
    assert EngineConfig(model="m", tp=2).tbo_threshold == 0, "off until measured on GPUs"
    assert EngineConfig(model="m", tp=2, tbo_min_batch=0).tbo_threshold == 0
    assert EngineConfig(model="m", tp=2, tbo_min_batch=64).tbo_threshold == 64
    with pytest.raises(ValueError, match="tbo_min_batch"):
        EngineConfig(model="m", tbo_min_batch=-1)


def test_larger_batches_and_extend_stay_eager(engine):
    runner = engine.runner
    batch = decode_batch(engine, [3] * 17, seed=5)  # more than the largest captured size (16)
    fb = runner.prepare(batch)
    assert not runner.graphs.is_staged(fb) and fb.batch_size == 17
    release(engine, batch)
    prompt = decode_batch(engine, [9], seed=6)
    prompt.seqs[0].num_computed = 0
    extend = runner.prepare(ScheduledBatch(prompt.seqs, [9], is_decode=False))
    assert not runner.graphs.is_staged(extend) and extend.num_tokens == 9
    release(engine, prompt)


def test_cli_flag_turns_graphs_off(tiny_model, tmp_path):
    from engine.env import Env
    from pdserve.cli import build_parser
    from pdserve.engine_args import engine_config_from_args

    env = Env(cache_dir=tmp_path, log_level="INFO")
    base = ["generate", "--prompt", "x", "--model", str(tiny_model)]
    assert engine_config_from_args(build_parser().parse_args(base), env).cuda_graphs
    assert not engine_config_from_args(
        build_parser().parse_args([*base, "--no-cuda-graphs"]), env
    ).cuda_graphs
