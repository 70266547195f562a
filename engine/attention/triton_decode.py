"""Triton paged decode attention: split-KV (flash-decoding) with a log-sum-exp merge, GQA-aware.

Stage 1, grid ``(batch, kv_heads, num_splits)``: a program takes one sequence, one KV head and all
``group = num_heads // num_kv_heads`` query heads that share it (so each K/V page is read once per
group, not once per query head), walks its split of the sequence's pages through the page table,
and writes an unnormalised partial output plus its log-sum-exp. Split lengths are derived from
``seq_len`` on the device, so nothing is read back to the host.
Stage 2, grid ``(batch, num_heads)``: merges the splits, weighting each by ``exp(lse_s - max lse)``.
``num_splits`` is a launch constant chosen from the batch shape and a bound on the sequence lengths
(``num_splits_for``); any value is correct for any ``seq_len >= 1``, so a CUDA graph fixes it per
captured batch size from ``max_model_len``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.layers.triton_common import on_device

BLOCK_N = 64  # keys per inner-loop tile; a split is a whole number of tiles


@triton.jit
def _split_kernel(
    Q, K, V, PageTable, SeqLens, PartOut, PartLse,
    stride_qb, stride_qh, stride_pt, stride_kp, stride_ks, stride_kh,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    scale,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = s * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    g_valid = g < GROUP
    hq = hk * GROUP + g
    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + d[None, :], mask=g_valid[:, None], other=0.0)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        t_valid = t < end
        page = tl.load(PageTable + b * stride_pt + t // PAGE_SIZE, mask=t_valid, other=0).to(tl.int64)
        off = page * stride_kp + (t % PAGE_SIZE) * stride_ks + hk * stride_kh  # [BLOCK_N]
        k = tl.load(K + off[:, None] + d[None, :], mask=t_valid[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N] fp32
        qk = tl.where(t_valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))  # finite: position n0 is always valid
        alpha = tl.exp(m - m_new)
        p = tl.exp(qk - m_new[:, None])
        den = den * alpha + tl.sum(p, 1)
        v = tl.load(V + off[:, None] + d[None, :], mask=t_valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    has = den > 0  # an empty split (past seq_len) contributes weight 0 in the merge
    out = acc / tl.where(has, den, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, den, 1.0)), float("-inf"))
    o_ptr = PartOut + b * stride_ob + hq[:, None] * stride_oh + s * stride_os + d[None, :]
    tl.store(o_ptr, out, mask=g_valid[:, None])
    tl.store(PartLse + b * stride_lb + hq * stride_lh + s, lse, mask=g_valid)


@triton.jit
def _merge_kernel(
    PartOut, PartLse, Out,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(PartLse + b * stride_lb + h * stride_lh + s)  # [NUM_SPLITS]
    w = tl.exp(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    part = tl.load(PartOut + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :])
    out = tl.sum(part * w[:, None], 0)
    tl.store(Out + b * stride_outb + h * stride_outh + d, out.to(Out.dtype.element_ty))


def num_splits_for(batch_size: int, num_kv_heads: int, num_sms: int, max_seq_len: int) -> int:
    """Enough programs to fill the GPU about twice: a power of two in [1, 16], and no more splits
    than ``max_seq_len`` has tiles (further splits would be empty for every sequence in the batch)."""
    want = triton.cdiv(2 * num_sms, batch_size * num_kv_heads)
    tiles = triton.cdiv(max(max_seq_len, 1), BLOCK_N)
    most = 1 << (min(16, tiles).bit_length() - 1)  # largest power of two <= min(16, tiles)
    return max(1, min(most, triton.next_power_of_2(want)))


def paged_decode_attention(
    q: torch.Tensor,  # [batch, num_heads, head_dim]
    k_pages: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: torch.Tensor,
    page_table: torch.Tensor,  # [batch, max_pages] int32/int64
    seq_lens: torch.Tensor,  # [batch]
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,  # [batch, num_heads, head_dim]
    *,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Launch knobs (``block_n`` keys per tile, warps, pipeline stages) default to the tuned values;
    ``bench/decode_attn_sweep.py`` measures the alternatives."""
    bs, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    assert k_pages.stride() == v_pages.stride(), "K and V pages must share a layout"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
    group = num_heads // num_kv_heads
    part_out = torch.empty(bs, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(bs, num_heads, num_splits, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q) if out is None else out
    with on_device(q):  # Triton launches on the current device
        _split_kernel[(bs, num_kv_heads, num_splits)](
            q, k_pages, v_pages, page_table, seq_lens, part_out, part_lse,
            q.stride(0), q.stride(1), page_table.stride(0), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            scale,
            PAGE_SIZE=page_size, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
            BLOCK_N=block_n, NUM_SPLITS=num_splits, num_warps=num_warps, num_stages=num_stages,
            # float32 models are the exactness reference: no TF32 rounding in their dots
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )  # fmt: skip
        _merge_kernel[(bs, num_heads)](
            part_out, part_lse, out,
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
        )  # fmt: skip
    return out
