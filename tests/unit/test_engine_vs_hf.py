"""The engine's greedy output is token-exact against HF transformers on the same weights (float32).

HF is run without its KV cache (full recompute each step), so the oracle shares nothing with our
paged cache, chunking or prefix reuse.
"""

from __future__ import annotations

import pytest
import torch
from oracles import hf_greedy

from engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

NUM_NEW = 40


def load_hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    # lengths around page (4) and chunk (16) boundaries, one longer than several chunks
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 3, 4, 9, 16, 17, 45)]


@pytest.mark.parametrize(
    ("arch", "mixed"), [("qwen3", False), ("qwen2", False), ("llama", False), ("qwen3", True)]
)
def test_greedy_matches_hf_with_chunking_and_prefix_hits(model_dirs, arch, mixed):
    path = model_dirs[arch]
    hf = load_hf(path)
    vocab = hf.config.vocab_size
    prompts = prompts_for(vocab)
    # second wave: extends first-wave prompts, so admission hits the prefix cache
    shared = [p + q[:5] for p, q in zip(prompts[3:], prompts[:4], strict=False)]
    llm = LLM(str(path), page_size=4, max_num_batched_tokens=16, max_num_seqs=4, mixed_batches=mixed)
    greedy = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=3)

    first = llm.generate(prompts, greedy)
    second = llm.generate(shared, greedy)

    assert any(o.num_cached_tokens > 0 for o in second), "second wave should reuse cached prefixes"
    for prompt, out in zip(prompts + shared, first + second, strict=True):
        expected, hf_logprobs = hf_greedy(hf, prompt, NUM_NEW)
        assert out.token_ids == expected
        assert out.finish_reason == "length"
        for lp, ref in zip(out.logprobs, hf_logprobs, strict=True):
            assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=1e-4)
            top_ids = [t for t, _ in lp.top]
            assert top_ids == ref.topk(3).indices.tolist()
    # every page is back: free + cached == all pages
    engine = llm.engine
    assert engine.allocator.num_free + engine.prefix_cache.num_cached_pages == engine.allocator.num_total


@pytest.mark.parametrize("mixed", [False, True], ids=["prefill-first", "mixed"])
def test_preemption_under_a_tiny_pool_keeps_outputs_exact(model_dirs, mixed):
    path = model_dirs["qwen3"]
    hf = load_hf(path)
    prompts = prompts_for(hf.config.vocab_size)[2:6]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    small = LLM(
        str(path), page_size=4, kv_cache_bytes=20 * 4096, max_num_batched_tokens=16, mixed_batches=mixed
    )
    assert small.engine.allocator.num_total < sum(len(p) + 24 for p in prompts) // 4, (
        "pool must be oversubscribed"
    )
    for prompt, out in zip(prompts, small.generate(prompts, params), strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 24)[0]
