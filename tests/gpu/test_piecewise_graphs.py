"""Piecewise CUDA graphs for extend batches (GPU box only): logits from the pieces against the eager
forward for every captured bucket, exact and padded, with and without a cached prefix; no host sync
inside a piecewise step; startup logging of capture time and memory. Errors are printed (-s).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from decode_batches import extend_batch, release, row_rel_err  # noqa: E402

from engine import LLM  # noqa: E402
from engine.make_model import make_model  # noqa: E402

SHAPE = dict(arch="qwen3", num_layers=3, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2,
             head_dim=64, max_position_embeddings=4096)  # fmt: skip
LIMIT = 512


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = make_model(tmp_path_factory.mktemp("piecewise") / "qwen3", seed=12, **SHAPE)
    return {
        dtype: LLM(str(path), device="cuda", dtype=dtype, attention_backend="triton", kv_cache_bytes=256 << 20,
                   max_num_batched_tokens=LIMIT).engine
        for dtype in ("float32", "bfloat16")
    }  # fmt: skip


def graph_vs_eager(engine, shapes, seed) -> float:
    runner = engine.runner
    batch = extend_batch(engine, shapes, seed)
    pool = runner.kv_pool.kv_gpu
    pool.normal_(generator=torch.Generator(device="cuda").manual_seed(seed))
    before = pool.clone()
    eager = runner.forward(runner.prepare(batch, use_graphs=False)).clone()
    pool.copy_(before)
    fb = runner.prepare(batch)
    assert runner.piecewise is not None and runner.piecewise.is_staged(fb)
    got = runner.forward(fb).clone()
    release(engine, batch)
    return row_rel_err(got, eager)


def test_captured_buckets_and_memory(engines):
    pw = engines["bfloat16"].runner.piecewise
    assert pw is not None and pw.buckets[0] == 16 and pw.max_tokens == LIMIT
    print(f"piecewise: {len(pw.buckets)} buckets x {pw.num_pieces} pieces, capture {pw.capture_seconds:.2f} s, "
          f"pool {pw.graph_memory_bytes / 2**20:.1f} MiB, static {pw.static_bytes / 2**20:.1f} MiB")  # fmt: skip


# float32: only GEMM shapes (padded rows) differ; bf16 rounds differently across GEMM shapes.
@pytest.mark.parametrize("dtype,bound", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_every_bucket_exact_and_padded_with_and_without_prefix(engines, dtype, bound):
    engine = engines[dtype]
    worst = 0.0
    for i, bucket in enumerate(engine.runner.piecewise.buckets):
        for shapes in (
            [(0, bucket)],
            [(0, bucket - 3)] if bucket > 3 else [(0, 1)],
            [(45, bucket // 2), (0, bucket // 2 - 1)],
        ):
            err = graph_vs_eager(engine, shapes, seed=i)
            worst = max(worst, err)
            assert err < bound, f"{dtype} bucket {bucket} {shapes}: rel err {err:.2e}"
    print(f"{dtype}: piecewise vs eager, worst row rel err over all buckets {worst:.2e}")


def test_piecewise_step_does_not_sync(engines):
    engine = engines["bfloat16"]
    runner = engine.runner
    batch = extend_batch(engine, [(30, 100), (0, 57)], seed=99)
    runner.forward(runner.prepare(batch))  # first use of this bucket outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fb = runner.prepare(batch)
        logits = runner.forward(fb)
        assert runner.piecewise.is_staged(fb)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits).all()
    release(engine, batch)


def test_chunked_prefill_through_pieces_matches_eager_generation(engines):
    from engine import SamplingParams

    engine = engines["float32"]
    # chunks of LIMIT tokens, then a remainder
    prompts = [[(7 * i + n) % 1000 for i in range(n)] for n in (700, 1300, 40)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = LLM.from_engine(engine).generate(prompts, params)
    model = engine.cfg.model
    eager = LLM(model, device="cuda", dtype="float32", attention_backend="triton", kv_cache_bytes=256 << 20,
                max_num_batched_tokens=LIMIT, cuda_graphs=False).generate(prompts, params)  # fmt: skip
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
