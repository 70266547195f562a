"""The triton backend's FA2 varlen EXTEND path vs torch_native's per-sequence extend in float64, on
the same pool, and with no host sync in prepare or forward (GPU box only)."""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch

from engine.attention.base import ForwardBatch, ForwardMode
from engine.attention.torch_native import TorchNativeBackend
from engine.attention.varlen_extend import SDPA_MIN_TOKENS
from engine.kvcache.page_pool import KVPagePool

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def batch_lens(case: str, page_size: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(prefix_lens, extend_lens) of a named batch shape."""
    if case == "fresh":
        return [0], [rng.randint(1, 700)]
    if case == "fresh-long":  # SDPA's dense causal path (cuDNN) instead of FA2
        return [0], [SDPA_MIN_TOKENS + rng.randint(0, 700)]
    if case == "prefix":
        return [37], [300]  # the prefix ends inside a page (page_size 16)
    if case == "fresh-many":
        return [0] * 7, [1, 700, 64, 3, 129, 17, 256]
    assert case == "mixed"
    prefix = [0, 0, 1, 3 * page_size, 3 * page_size + 5, 1500] + [
        rng.choice([0, rng.randint(1, 1500)]) for _ in range(10)
    ]
    ext = [700, 1, 1, 200, 64, 1] + [rng.randint(1, 700) for _ in range(10)]
    return prefix, ext


def make_batch(prefix, ext, page_size, num_kv_heads, head_dim, dtype, rng, backend):
    """A one-layer pool poisoned with NaN outside the batch's KV (page 0, unused pages, the tails of
    last pages), the prefixes stored, and an EXTEND batch whose new K/V the forward stores."""
    seq_lens = [p + e for p, e in zip(prefix, ext, strict=True)]
    counts = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(counts) + 8
    pages = list(range(1, num_pages))
    rng.shuffle(pages)  # page 0 and some others never used
    rows, i = [], 0
    for c in counts:
        rows.append(pages[i : i + c])
        i += c
    width = max(counts) + 2
    table = [r + [0] * (width - len(r)) for r in rows]  # padding on page 0, as ModelRunner.prepare does
    slots = [
        [row[p // page_size] * page_size + p % page_size for p in range(n)]
        for row, n in zip(rows, seq_lens, strict=True)
    ]
    pool = KVPagePool(1, num_pages, page_size, num_kv_heads, head_dim, dtype, "cuda")
    pool.kv_gpu.fill_(float("nan"))
    prefix_slots = torch.tensor(
        [s for row, p in zip(slots, prefix, strict=True) for s in row[:p]], device="cuda"
    )
    if prefix_slots.numel():
        shape = (prefix_slots.numel(), num_kv_heads, head_dim)
        pool.store(
            0,
            prefix_slots,
            torch.randn(shape, device="cuda").to(dtype),
            torch.randn(shape, device="cuda").to(dtype),
        )
    new_slots = [s for row, p in zip(slots, prefix, strict=True) for s in row[p:]]
    num_tokens = sum(ext)
    zeros = torch.zeros(num_tokens, dtype=torch.int64, device="cuda")
    return ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=zeros,
        positions=zeros,
        out_cache_loc=torch.tensor(new_slots, device="cuda"),
        page_table=torch.tensor(table, device="cuda"),
        seq_lens=torch.tensor(seq_lens, device="cuda"),
        logits_indices=torch.zeros(len(ext), dtype=torch.int64, device="cuda"),
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=list(ext),
        kv_pool=pool,
        attn_backend=backend,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (16, 8), (16, 4), (32, 4)])  # GQA 1, 2, 4, 8
@pytest.mark.parametrize("page_size", [16, 1])
@pytest.mark.parametrize("case", ["fresh", "fresh-long", "prefix", "fresh-many", "mixed"])
def test_matches_torch_native_float64(dtype, bound, head_dim, num_heads, num_kv_heads, page_size, case):
    from engine.attention.triton_backend import TritonBackend
    from engine.attention.varlen_extend import ExtendMetadata, paged_extend_attention

    rng = random.Random(f"{case}-{page_size}-{head_dim}-{num_heads}")
    torch.manual_seed(rng.randint(0, 1 << 30))
    prefix, ext = batch_lens(case, page_size, rng)
    num_tokens, scale = sum(ext), head_dim**-0.5
    layer = SimpleNamespace(layer_id=0, scaling=scale)
    # strided views of one packed projection, as the attention layer passes them
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda").to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)

    for budget in (1 << 20, 300):  # one group; groups of at most 300 gathered keys
        backend = TritonBackend(max_gather_tokens=budget, device=torch.device("cuda"))
        batch = make_batch(prefix, ext, page_size, num_kv_heads, head_dim, dtype, rng, backend)
        # float64 oracle: torch_native's extend on a float64 copy of the same pool
        pool64 = KVPagePool(
            1, batch.kv_pool.num_pages, page_size, num_kv_heads, head_dim, torch.float64, "cuda"
        )
        pool64.kv_gpu.copy_(batch.kv_pool.kv_gpu)
        native = TorchNativeBackend(max_gather_tokens=budget)
        batch64 = dataclasses.replace(batch, kv_pool=pool64, attn_backend=native)
        # the layer stores the new K/V before attention (LayerOps.qk_norm_rope_store)
        batch.kv_pool.store(0, batch.out_cache_loc, k, v)
        pool64.store(0, batch.out_cache_loc, k.double(), v.double())
        ref = native.forward(layer, q.double(), k.double(), v.double(), batch64).view(
            num_tokens, num_heads, head_dim
        )
        assert not ref.isnan().any(), "the reference read outside the batch's KV"

        backend.prepare(batch)
        meta = batch.attn_metadata
        assert isinstance(meta, ExtendMetadata), "the varlen path is not in use"
        if not any(prefix):
            assert len(meta.groups) == 1 and meta.groups[0].key_slots is None, "fresh prompts gathered"
        if budget == 300 and any(prefix) and len(prefix) > 1:
            assert len(meta.groups) > 1, "the gather budget did not split the batch"
        backend.forward(layer, q, k, v, batch)  # warm-up: first-call initialisation may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            backend.prepare(batch)
            out = backend.forward(layer, q, k, v, batch).view(num_tokens, num_heads, head_dim)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out.dtype == dtype
        assert not out.isnan().any(), "read KV outside the batch's sequences (NaN-poisoned)"
        err = rel_err(out, ref)
        assert err < bound, f"rel err {err:.2e} (budget {budget}, {len(meta.groups)} groups)"

        poisoned = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")  # every row must be written
        k_pages, v_pages = batch.kv_pool.k_pages(0), batch.kv_pool.v_pages(0)
        paged_extend_attention(q, k, v, k_pages, v_pages, batch.attn_metadata, scale, out=poisoned)
        assert not poisoned.isnan().any(), "unwritten output rows"
        assert rel_err(poisoned, ref) < bound


def test_float32_falls_back_to_torch_native():
    from engine.attention.triton_backend import TritonBackend

    backend = TritonBackend(max_gather_tokens=4096, device=torch.device("cuda"))
    batch = make_batch([5], [20], 16, 2, 64, torch.float32, random.Random(0), backend)
    backend.prepare(batch)
    assert batch.attn_metadata is None
    q = torch.randn(20, 4, 64, device="cuda")
    k, v = torch.randn(20, 2, 64, device="cuda"), torch.randn(20, 2, 64, device="cuda")
    batch.kv_pool.store(0, batch.out_cache_loc, k, v)
    out = backend.forward(SimpleNamespace(layer_id=0, scaling=0.125), q, k, v, batch)
    assert out.shape == (20, 4 * 64) and not out.isnan().any()
