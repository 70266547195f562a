"""Triton paged decode attention vs a float64 reference, and the engine on it vs HF (GPU box only)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def reference(q, k_pages, v_pages, page_table, seq_lens, scale):
    """Per sequence, float64, heads expanded for GQA: softmax(q k^T * scale) v."""
    page_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = q.shape[1] // num_kv_heads
    outs = []
    for b, n in enumerate(seq_lens.tolist()):
        pages = page_table[b, : -(-n // page_size)]
        k = (
            k_pages[pages]
            .reshape(-1, num_kv_heads, k_pages.shape[3])[:n]
            .double()
            .repeat_interleave(group, 1)
        )
        v = (
            v_pages[pages]
            .reshape(-1, num_kv_heads, v_pages.shape[3])[:n]
            .double()
            .repeat_interleave(group, 1)
        )
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(outs)


@pytest.mark.parametrize(
    "dtype,bound", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)]
)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,page_size",
    [(32, 8, 128, 16), (16, 8, 128, 16), (12, 4, 128, 32), (8, 2, 64, 16), (4, 4, 32, 4)],
)
@pytest.mark.parametrize("batch", [1, 5, 33])
def test_matches_float64_reference(dtype, bound, num_heads, num_kv_heads, head_dim, page_size, batch):
    from engine.attention.triton_decode import paged_decode_attention

    g = torch.Generator(device="cuda").manual_seed(batch * 1000 + num_heads + head_dim)
    lens = torch.randint(1, 3000, (batch,), device="cuda", generator=g)
    lens[0] = 1
    if batch > 2:
        lens[1] = page_size * 7  # exactly full pages
        lens[2] = page_size * 7 + 1
    max_pages = int(-(-lens.max() // page_size))
    num_pages = batch * max_pages + 1
    perm = torch.randperm(num_pages - 1, device="cuda", generator=g) + 1  # shuffled, page 0 unused
    page_table = perm[: batch * max_pages].view(batch, max_pages)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_pages = torch.randn(shape, device="cuda", generator=g).to(dtype)
    v_pages = torch.randn(shape, device="cuda", generator=g).to(dtype)
    q = torch.randn(batch, num_heads, head_dim, device="cuda", generator=g).to(dtype)
    scale = head_dim**-0.5
    ref = reference(q, k_pages, v_pages, page_table, lens, scale)
    for splits in (1, 4, 16):
        out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
        paged_decode_attention(q, k_pages, v_pages, page_table, lens, scale, splits, out=out)
        assert not out.isnan().any(), f"unwritten or NaN output with {splits} splits"
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < bound, f"rel err {err:.2e} with {splits} splits"


def test_engine_on_triton_backend_matches_hf_greedy(tmp_path):
    transformers = pytest.importorskip("transformers")
    from oracles import hf_greedy

    from engine import LLM, SamplingParams
    from engine.make_model import make_model

    path = make_model(
        tmp_path / "m",
        arch="qwen3",
        num_layers=2,
        hidden_size=128,
        intermediate_size=256,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        seed=5,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    llm = LLM(
        str(path), device="cuda", dtype="float32", attention_backend="triton", gpu_memory_utilization=0.3
    )
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 17, 40)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 32)[0]
