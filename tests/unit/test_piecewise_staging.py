"""Piecewise extend graphs on the CPU: buckets, config, the forward cut at attention, padding.

Real graphs need CUDA (tests/gpu/test_piecewise_graphs.py). Here each "graph" is a stand-in whose
replay runs the captured piece eagerly on the static buffers, so the cut into pieces, the buffers
between them, padding to a bucket and the runner's dispatch are exercised. The oracle is the eager
forward of the same model on the same KV.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from decode_batches import StandInGraph, extend_batch, release, row_rel_err

from engine import LLM
from engine.config import EAGER_LAYER_LAUNCH_FLOPS, EngineConfig, ModelConfig, RopeConfig
from engine.graphs import PiecewiseGraphRunner, piecewise_buckets


@pytest.fixture(scope="module")
def engine(tiny_model):
    llm = LLM(str(tiny_model), page_size=4, max_num_batched_tokens=200, kv_cache_bytes=16 << 20)
    runner = llm.engine.runner
    assert runner.piecewise is None, "piecewise graphs are CUDA-only"
    pw = PiecewiseGraphRunner(
        runner.model, runner.kv_pool, runner.attn_backend, max_tokens=200, device=torch.device("cpu")
    )
    pw._graphs = {
        t: [StandInGraph(functools.partial(pw.run_piece, i, t)) for i in range(pw.num_pieces)]
        for t in pw.buckets
    }
    runner.piecewise = pw
    return llm.engine


def test_buckets():
    assert piecewise_buckets(16) == [16]
    assert piecewise_buckets(10) == [10]
    assert piecewise_buckets(200) == [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 200]
    sizes = piecewise_buckets(8192)
    assert sizes[-5:] == [4096, 5120, 6144, 7168, 8192] and len(sizes) == 32
    # at most 25 % padding above 64 tokens
    assert all(b / a <= 1.25 for a, b in itertools.pairwise(sizes[3:]))


QWEN3_06B = dict(
    architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
    num_heads=16, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960,
    tie_word_embeddings=True, attention_bias=False, rope=RopeConfig(theta=1e6), dtype="bfloat16",
)  # fmt: skip


def test_token_limit_config():
    # by model size: the Qwen3 shapes' projection weights per layer (q/k/v, o, gate/up, down)
    small = ModelConfig(**QWEN3_06B)  # 15.7M weights a layer: host-bound up to 14k tokens
    large = ModelConfig(
        **QWEN3_06B | dict(hidden_size=4096, intermediate_size=12288, num_heads=32)
    )  # 8B: 193M
    assert small.layer_params() == 1024 * 48 * 128 + 3 * 1024 * 3072
    assert large.layer_params(2) == large.layer_params() // 2
    default = EngineConfig(model="m", max_num_batched_tokens=8192)
    assert default.piecewise_token_limit(small.layer_params()) == 8192  # the whole chunk
    assert default.piecewise_token_limit(large.layer_params()) == 2048
    assert default.piecewise_token_limit(large.layer_params(4)) == 4608  # a quarter of the work per rank
    assert default.piecewise_token_limit() == 2048  # weights unknown
    assert EngineConfig(model="m", max_num_batched_tokens=512).piecewise_token_limit() == 512
    assert (
        EngineConfig(model="m", max_piecewise_tokens=1024).piecewise_token_limit(small.layer_params()) == 1024
    )
    assert EngineConfig(model="m", max_piecewise_tokens=8192).piecewise_token_limit() == 4096
    assert EngineConfig(model="m", max_piecewise_tokens=0).piecewise_token_limit() == 0
    with pytest.raises(ValueError, match="max_piecewise_tokens"):
        EngineConfig(model="m", max_piecewise_tokens=-1)


def test_attention_heavy_steps_run_eagerly():
    """Above 2048 tokens a step takes the graphs only while its layer's work stays under what the
    host's eager launch hides: an 8k chunk of short prompts (host-bound eagerly) yes, a lone 8k
    prompt (attention-bound: slower from graphs on an H100) no."""
    small = ModelConfig(**QWEN3_06B)
    assert small.extend_layer_flops([3], [5]) == 2 * small.layer_params() * 3 + 4 * 16 * 128 * (3 * 2 + 6)
    assert small.extend_layer_flops([4], [4], tp_size=2) == 2 * small.layer_params(2) * 4 + 4 * 8 * 128 * 10
    chunk = small.extend_layer_flops([512] * 16, [512] * 16)
    lone = small.extend_layer_flops([8192], [8192])
    assert chunk < EAGER_LAYER_LAUNCH_FLOPS < lone


def run_both(engine, shapes, seed):
    """Logits and the KV written, eager then piecewise, from the same pool contents."""
    runner = engine.runner
    batch = extend_batch(engine, shapes, seed)
    pool = runner.kv_pool.kv_gpu
    pool.normal_(generator=torch.Generator().manual_seed(seed))
    before = pool.clone()
    eager_fb = runner.prepare(batch, use_graphs=False)
    assert not runner.piecewise.is_staged(eager_fb)
    eager = runner.forward(eager_fb).clone()
    eager_pool = pool.clone()
    pool.copy_(before)
    fb = runner.prepare(batch)
    assert runner.piecewise.is_staged(fb)
    got = runner.forward(fb).clone()
    release(engine, batch)
    return got, eager, pool.clone(), eager_pool, before


@pytest.mark.parametrize(
    "shapes",
    [
        [(0, 16)],  # one fresh prompt filling a bucket exactly
        [(0, 13)],  # padded to 16
        [(0, 5), (0, 40), (0, 1)],  # packed prompts, padded to 48
        [(9, 30), (16, 7), (0, 50)],  # cached prefixes, one page-aligned
        [(3, 200)],  # the largest bucket, a chunk after a prefix
    ],
)
def test_piecewise_logits_and_kv_equal_eager(engine, shapes):
    got, eager, pool, eager_pool, before = run_both(engine, shapes, seed=len(shapes) + shapes[0][1])
    assert got.shape == eager.shape == (len(shapes), engine.model_config.vocab_size)
    assert row_rel_err(got, eager) < 1e-5
    # [layers, 2 (k, v), pages, page_size, kv_heads, head_dim]; page 0 is the dummy page padded rows
    # write to: everything else equals the eager forward's KV
    assert torch.allclose(pool[:, :, 1:], eager_pool[:, :, 1:], atol=1e-6), "the KV written differs"
    changed = (
        (pool[:, :, 1:] != before[:, :, 1:]).any(dim=-1).any(dim=-1)
    )  # [layers, 2, pages - 1, page_size]
    assert changed.sum().item() <= sum(e for _, e in shapes) * engine.model_config.num_layers * 2


def test_stale_rows_from_a_larger_batch_do_not_leak(engine):
    run_both(engine, [(0, 190)], seed=1)  # fills the buffers' rows with live values
    got, eager, *_ = run_both(engine, [(4, 9)], seed=2)
    assert row_rel_err(got, eager) < 1e-5


def test_batches_above_the_limit_and_decode_stay_off_the_pieces(engine):
    runner = engine.runner
    big = extend_batch(engine, [(0, 201)], seed=3)
    assert not runner.piecewise.is_staged(runner.prepare(big))
    release(engine, big)


def test_steps_above_the_always_size_take_the_pieces_only_while_host_bound(engine, monkeypatch):
    """Above ``PIECEWISE_MIN_TOKENS`` a step takes the pieces only while its per-layer FLOPs stay
    under ``EAGER_LAYER_LAUNCH_FLOPS``: here the always-size is lowered to 16 tokens and the launch
    budget set between a batch of short prompts and one long prompt of the same token count."""
    from engine import model_runner

    cfg = engine.model_config
    monkeypatch.setattr(model_runner, "PIECEWISE_MIN_TOKENS", 16)
    short, lone = cfg.extend_layer_flops([20] * 8, [20] * 8), cfg.extend_layer_flops([160], [160])
    monkeypatch.setattr(model_runner, "EAGER_LAYER_LAUNCH_FLOPS", (short + lone) / 2)
    runner = engine.runner
    for shapes, staged in (([(0, 20)] * 8, True), ([(0, 160)], False), ([(0, 16)], True)):
        batch = extend_batch(engine, shapes, seed=4)
        assert runner.piecewise.is_staged(runner.prepare(batch)) is staged, shapes
        release(engine, batch)


def test_generation_through_pieces_equals_eager(engine, tiny_model):
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [list(range(5, 5 + n)) for n in (3, 60, 130)]
    want = LLM(str(tiny_model), page_size=4, max_num_batched_tokens=200).generate(prompts, params)
    got = LLM.from_engine(engine).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
