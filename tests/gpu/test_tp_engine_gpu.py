"""The tensor-parallel engine on two GPUs (GPU box with >= 2 GPUs only): ``LLM(tp=2)`` on CUDA —
NCCL, the all-reduces and logits all-gather captured inside the decode and piecewise CUDA graphs,
overlap scheduling — generates what one GPU generates, token for token (float32, so reduction
order cannot flip a greedy token), with chunked prefill and a prefix-cache hit.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

from engine import LLM, SamplingParams  # noqa: E402
from engine.make_model import make_model  # noqa: E402

SHAPE = dict(arch="qwen3", num_layers=3, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2,
             head_dim=64, max_position_embeddings=4096)  # fmt: skip
OPTS = dict(device="cuda", attention_backend="triton", kv_cache_bytes=256 << 20, max_num_batched_tokens=256)


# Symmetric-memory all-reduce (the default), plain NCCL, and two-batch overlap from 4 rows up.
VARIANTS = {"symmetric": {}, "nccl": {"symmetric_memory": False}, "tbo": {"tbo_min_batch": 4}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_on_two_gpus_generates_what_one_gpu_generates(tmp_path, variant):
    path = str(make_model(tmp_path / "qwen3", seed=21, **SHAPE))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 300, 40, 700, 90)]
    prompts.append([*prompts[3][:650], 7, 8, 9])  # a prefix-cache hit on the long prompt
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 5 + [
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=24, ignore_eos=True)
    ]
    one = LLM(path, **OPTS)
    want = one.generate(prompts[:5], params[:5]) + one.generate(prompts[5:], params[5:])
    with LLM(path, tp=2, **OPTS, **VARIANTS[variant]) as llm:
        runner = llm.engine.runner
        assert runner.graphs is not None and runner.piecewise is not None, "graphs with collectives inside"
        assert (runner.tp.symmetric is None) == (variant == "nccl")
        assert runner.graphs.uses_tbo(8) == (variant == "tbo")
        assert llm.engine.overlap and runner.kv_pool.num_kv_heads == 1
        got = llm.generate(prompts[:5], params[:5]) + llm.generate(prompts[5:], params[5:])
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert got[5].num_cached_tokens > 0
    assert multiprocessing.active_children() == []
