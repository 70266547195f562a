"""Decode CUDA graphs on the `triton` backend (GPU box only): graph replays against the eager
Triton path on the same weights and KV, the engine against HF transformers, no host sync inside a
replayed step, and padded rows that never touch live KV. Errors are printed (-s) to tighten bounds.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from decode_batches import (  # noqa: E402
    check_padding_keeps_live_kv,
    decode_batch,
    graph_vs_eager,
    mixed_lens,
    release,
)

from engine import LLM, SamplingParams  # noqa: E402
from engine.make_model import make_model  # noqa: E402

SHAPE = dict(arch="qwen3", num_layers=2, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2,
             head_dim=64, max_position_embeddings=4096)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("graphs") / "qwen3", seed=11, **SHAPE)


def _llm(path, dtype="float32", **kw) -> LLM:
    options = dict(device="cuda", dtype=dtype, attention_backend="triton", kv_cache_bytes=512 << 20)
    return LLM(str(path), **(options | kw))


@pytest.fixture(scope="module")
def engines(model_dir):
    return {dtype: _llm(model_dir, dtype, max_num_seqs=64).engine for dtype in ("float32", "bfloat16")}


def test_graphs_are_captured_only_where_they_apply(model_dir, engines):
    graphs = engines["float32"].runner.graphs
    assert graphs is not None
    assert graphs.batch_sizes == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    print(f"capture {graphs.capture_seconds:.2f} s, graph memory {graphs.graph_memory_bytes / 2**20:.1f} MiB")
    assert _llm(model_dir, kv_cache_bytes=64 << 20, cuda_graphs=False).engine.runner.graphs is None
    native = _llm(model_dir, kv_cache_bytes=64 << 20, attention_backend="torch_native")
    assert native.engine.runner.graphs is None


# float32: IEEE dots in the kernel, so only GEMM shapes (padded rows) and split counts differ.
@pytest.mark.parametrize("dtype,bound", [("float32", 1e-4), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("bs", [1, 3, 8, 13, 64])
def test_graph_logits_match_eager_triton(engines, dtype, bound, bs):
    engine = engines[dtype]
    engine.runner.kv_pool.kv_gpu.normal_()
    err = graph_vs_eager(engine, mixed_lens(bs, engine.cfg.page_size, seed=bs), seed=bs)
    print(f"{dtype} bs {bs}: graph vs eager max row rel err {err:.2e}")
    assert err < bound


def test_engine_with_graphs_matches_hf_greedy(model_dir, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from oracles import hf_greedy

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    llm = _llm(model_dir, max_num_seqs=8)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.batch_sizes == [1, 2, 4, 8]
    sizes: list[int] = []
    replay = graphs.replay
    monkeypatch.setattr(graphs, "replay", lambda fb: sizes.append(fb.batch_size) or replay(fb))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 17, 40, 64, 100)]
    lengths = [16, 24, 28, 32, 32]  # the batch shrinks 5 -> 4 -> 3 -> 2: padded and exact sizes
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompts, params)
    assert {5, 4, 3, 2} <= set(sizes), f"decode steps did not replay graphs: {sorted(set(sizes))}"
    for prompt, n, out in zip(prompts, lengths, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, n)[0]


def test_replayed_step_does_not_sync(engines):
    engine = engines["bfloat16"]
    runner = engine.runner
    batch = decode_batch(engine, mixed_lens(13, engine.cfg.page_size, seed=3), seed=3)
    runner.sample(runner.forward(runner.prepare(batch)), batch)  # this size's first replay, outside
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fb = runner.prepare(batch)
        logits = runner.forward(fb)
        assert runner.graphs is not None and runner.graphs.is_staged(fb)
        with pytest.raises(RuntimeError, match="synchroniz"):
            logits.sum().item()  # the mode is live: a read-back is refused
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape[0] == 13 and torch.isfinite(logits).all()
    release(engine, batch)


def test_padded_rows_keep_live_kv(engines):
    check_padding_keeps_live_kv(engines["float32"], tol=1e-4)


def test_overlap_scheduling_changes_no_token(model_dir):
    """Overlap (the CUDA default) against finishing every step first, on the same weights: greedy and
    seeded rows, stop tokens that end requests while their next step is already launched."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 33, 70, 12, 90, 47)]
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=4, max_tokens=30, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=5, max_tokens=18, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    ]
    sync = _llm(model_dir, max_num_seqs=8, overlap=False).generate(prompts, params)
    # Stop each greedy request on a token it produces mid-way, so it ends with a step in flight.
    stops = [p if p.temperature > 0 else SamplingParams(temperature=0, max_tokens=p.max_tokens, ignore_eos=True,
             stop_token_ids=(o.token_ids[len(o.token_ids) // 2],)) for p, o in zip(params, sync, strict=True)]  # fmt: skip
    overlap_llm = _llm(model_dir, max_num_seqs=8)
    assert overlap_llm.engine.overlap, "overlap scheduling is the CUDA default"
    overlap = overlap_llm.generate(prompts, params)
    for a, b in zip(sync, overlap, strict=True):
        assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
        assert [lp.token_id for lp in b.logprobs] == [lp.token_id for lp in a.logprobs]
    stopped = overlap_llm.generate(prompts, stops)
    for a, b, p in zip(sync, stopped, stops, strict=True):
        if p.stop_token_ids:
            cut = a.token_ids.index(p.stop_token_ids[0]) + 1
            assert (b.token_ids, b.finish_reason) == (a.token_ids[:cut], "stop")
    engine = overlap_llm.engine
    engine.prefix_cache.evict(10**9)
    assert engine.allocator.num_free == engine.allocator.num_total


def test_overlapped_engine_steps_do_not_sync(model_dir):
    """Steady-state decode through ``Engine.step`` with overlap (penalised rows too): the only wait is on the previous
    step's read-back event, which the sync debug mode does not count; any other sync raises."""
    engine = _llm(model_dir, max_num_seqs=16).engine
    for i in range(12):
        # a third of the rows with penalties, a bias, min_tokens and min_p: their history is
        # scattered on the device, and the newest token read there
        controls = dict(repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={7: 3.0}, min_tokens=70,
                        min_p=0.05) if i % 3 == 0 else {}  # fmt: skip
        engine.add_request(f"r{i}", list(range(3 + i, 40 + 3 * i)), SamplingParams(
            temperature=0 if i % 2 else 0.9, seed=i, max_tokens=64, ignore_eos=True, **controls))  # fmt: skip
    for _ in range(6):  # prefill, then decode at every batch size this run will use
        engine.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = [out for _ in range(20) for out in engine.step()]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(outputs) == 20 * 12 and not any(o.finished for o in outputs)
    for i in range(12):
        engine.abort(f"r{i}")


def test_mixed_batches_change_no_token(model_dir):
    """Mixed batches on CUDA (decode rows through the extend path: piecewise graphs, varlen
    attention over their gathered keys, in-flight inputs under overlap) against prefill first:
    greedy and seeded rows, prompts arriving while others decode (a small step budget)."""
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 300, 40, 700, 90, 12)]
    params = [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=25, ignore_eos=True, logprobs=2),
    ] * 3
    first = _llm(model_dir, max_num_seqs=8, max_num_batched_tokens=128).generate(prompts, params)
    mixed_llm = _llm(model_dir, max_num_seqs=8, max_num_batched_tokens=128, mixed_batches=True)
    mixed = mixed_llm.generate(prompts, params)
    for a, b in zip(first, mixed, strict=True):
        assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
        assert [lp.token_id for lp in b.logprobs] == [lp.token_id for lp in a.logprobs]
