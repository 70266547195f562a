"""Context-parallel prefill on two GPUs (GPU box with >= 2 GPUs only): ``LLM(cp=2)`` on CUDA —
NCCL group, per-layer K/V all-gather (symmetric memory or NCCL), piecewise graphs over each rank's
local tokens, FA2 varlen attention over the gathered keys — generates what one GPU generates, token
for token (float32), with prompts long enough to split, chunked prefill and a prefix-cache hit.
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
             head_dim=64, max_position_embeddings=8192)  # fmt: skip
OPTS = dict(device="cuda", attention_backend="triton", kv_cache_bytes=512 << 20, max_num_batched_tokens=1024)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "nccl"])
def test_cp2_on_two_gpus_generates_what_one_gpu_generates(tmp_path, symmetric):
    path = str(make_model(tmp_path / "qwen3", seed=23, **SHAPE))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3000, 700, 40, 1500)]
    prompts.append([*prompts[0][:2500], 5, 6, 7, *prompts[3][:600]])  # a prefix hit, then a split tail
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    one = LLM(path, **OPTS)
    want = one.generate(prompts[:4], params) + one.generate(prompts[4:], params)
    with LLM(path, cp=2, cp_min_tokens=128, symmetric_memory=symmetric, **OPTS) as llm:
        runner = llm.engine.runner
        assert runner.piecewise is not None, "piecewise graphs over each rank's local tokens"
        assert (runner.cp._symm is not None) == symmetric
        got = llm.generate(prompts[:4], params) + llm.generate(prompts[4:], params)
        assert runner.num_split_steps > 0, "long prompts were split over the ranks"
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert got[4].num_cached_tokens > 0
    assert multiprocessing.active_children() == []
