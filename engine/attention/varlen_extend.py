"""Packed variable-length EXTEND attention through FlashAttention-2 (the aten op behind torch's
``varlen_attn``).

An EXTEND batch packs every sequence's new queries into one ``[num_tokens, num_heads, head_dim]``
tensor; FA2's varlen kernel attends them all in one launch, given cumulative query and key lengths.
Its causal mask is bottom-right aligned when a sequence has more keys than queries: query ``t`` of a
sequence with ``P`` cached tokens sees keys ``0 .. P + t``, which is exactly extend over a prefix.

Keys: when no sequence of a group has a cached prefix (fresh prompts, the common case), a sequence's
keys are its new tokens, passed in as they are; a group of one long fresh prompt goes through SDPA's
dense causal path instead, whose cuDNN kernel beats FA2 on Hopper (``SDPA_MIN_TOKENS``). Otherwise
the keys live in the page pool. FA2's own paged mode (``block_table``) wants pages of 256 tokens
and is FA3-only in torch, so each layer instead gathers the group's keys (prefix and new; the new
ones are already stored) into a packed ``[num_keys, num_kv_heads, head_dim]`` buffer with one
``index_select`` by pool slot. The slots are computed once per step on the device from the page table (``build_extend_metadata``),
every size taken from host lists, so neither the metadata nor the forward syncs with the GPU.

Sequences are attended in groups of consecutive sequences whose gathered keys fit
``max_gather_tokens`` (the step token budget, as in torch_native's decode): a prefix-heavy batch then
needs no more transient memory than the profiled prefill. A batch without prefixes is one group.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.packing import slot_of

# FA2's varlen forward, called as the aten op that ``torch.nn.attention.varlen.varlen_attn`` wraps:
# that wrapper is a Python custom op whose dispatch costs ~0.1 ms of host time per call (measured on
# an H100 host: 28 calls made up ~3 ms of a 0.6B model's 8k-token eager step, which is host-bound),
# and it allocates and zeroes an RNG-state tensor each call. FA2 takes fewer KV heads than query
# heads as they are (grouped-query attention) and aligns the causal mask bottom-right.
_HAS_FLASH = torch.backends.cuda.is_flash_attention_available()  # False on a CPU-only build


def _flash_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """Causal varlen attention: q [Tq, H, D], k/v [Tk, Hkv, D] -> [Tq, H, D] (q's dtype)."""
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, True, False, scale=scale
    )
    return out[0]


VARLEN_DTYPES = (torch.float16, torch.bfloat16)  # FA2 runs no other dtype
# A lone fresh prompt at least this long goes through SDPA's dense causal path (cuDNN on Hopper, twice
# FA2's rate at 4k-8k tokens) instead of FA2. cuDNN builds an execution plan for each new sequence
# length, blocking the host for 45-72 ms (measured on an H100); an offline run whose short prompts
# kept meeting new lengths lost ~0.5 s to it. So the dense path takes the prompt's first
# ``DENSE_LENGTH_STEP`` multiple of tokens, a length whose plan startup built (``warm_dense_plans``),
# and FA2 attends the few queries left over (they see every key: FA2's causal mask is bottom-right).
SDPA_MIN_TOKENS = 4096
DENSE_LENGTH_STEP = 512


def varlen_supported(dtype: torch.dtype) -> bool:
    return _HAS_FLASH and dtype in VARLEN_DTYPES


@dataclass(frozen=True)
class ExtendGroup:
    """Consecutive sequences attended by one kernel call."""

    q_start: int  # first row of the group in the packed queries
    q_end: int
    cu_seq_q: torch.Tensor  # [group_size + 1] int32 cumulative new tokens, from 0
    cu_seq_k: torch.Tensor  # [group_size + 1] int32 cumulative keys, from 0 (is cu_seq_q without gather)
    max_q: int
    max_k: int
    key_slots: torch.Tensor | None  # [num_keys] int64 pool slot of every key; None: keys are the new tokens
    dense_tokens: int = 0  # a lone fresh prompt: its first queries attended by the dense (cuDNN) path
    cu_tail: torch.Tensor | None = None  # then [0, tail queries, 0, all keys] int32 for FA2's rest


@dataclass(frozen=True)
class ExtendMetadata:
    """The varlen EXTEND path's per-step metadata, built once and read by every layer."""

    groups: tuple[ExtendGroup, ...]


def split_groups(seq_lens: list[int], max_gather_tokens: int) -> list[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` ranges of sequences whose KV lengths sum to at most
    ``max_gather_tokens``; a longer sequence is a group on its own."""
    bounds: list[tuple[int, int]] = []
    lo, total = 0, 0
    for i, n in enumerate(seq_lens):
        if i > lo and total + n > max_gather_tokens:
            bounds.append((lo, i))
            lo, total = i, 0
        total += n
    bounds.append((lo, len(seq_lens)))
    return bounds


def key_slots(page_table: torch.Tensor, seq_lens: list[int], page_size: int) -> torch.Tensor:
    """Pool slot of every KV position of every sequence, sequences one after another:
    ``[sum(seq_lens)]`` on ``page_table``'s device (``page_table`` ``[len(seq_lens), max_pages]``).
    Sizes come from the host list, so nothing is read back from the device."""
    device = page_table.device
    cu = _to(list(itertools.accumulate(seq_lens, initial=0)), torch.int64, device)  # [batch + 1]
    keys = torch.arange(sum(seq_lens), device=device)  # [num_keys]
    seq = torch.searchsorted(cu[1:], keys, right=True)  # [num_keys] owning sequence
    pos = keys - cu[seq]  # [num_keys] position in its sequence
    return slot_of(page_table, seq, pos, page_size)


def dense_tokens(extend_lens: list[int]) -> int:
    """Queries of a step of fresh prompts that the dense causal path attends: a lone prompt's first
    multiple of ``DENSE_LENGTH_STEP`` tokens once it has ``SDPA_MIN_TOKENS``, else 0."""
    if len(extend_lens) != 1 or extend_lens[0] < SDPA_MIN_TOKENS:
        return 0
    return extend_lens[0] // DENSE_LENGTH_STEP * DENSE_LENGTH_STEP


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA's causal path over one sequence: q [T, H, D], k/v [T, Hkv, D] -> [T, H, D] (a transposed
    view). The inputs are made contiguous first (a view of the qkv output is not): cuDNN keys its
    plans by strides too, so every call meets the layout ``warm_dense_plans`` built."""
    q, k, v = (t.contiguous().transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, T, D]
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def warm_dense_plans(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_tokens: int, scale: float,
    device: torch.device,
) -> int:  # fmt: skip
    """Build the dense path's plans for every length it can meet (``dense_tokens`` of lone prompts
    of at most ``max_tokens``): at startup, not in front of a request. torch caches cuDNN's plans
    per thread, so this runs on each thread that steps the engine (``ModelRunner.bind_thread``).
    Returns how many."""
    lengths = range(dense_tokens([SDPA_MIN_TOKENS]), dense_tokens([max_tokens]) + 1, DENSE_LENGTH_STEP)
    for n in lengths:
        q = torch.zeros(n, num_heads, head_dim, dtype=dtype, device=device)
        kv = torch.zeros(n, num_kv_heads, head_dim, dtype=dtype, device=device)
        dense_causal(q, kv, kv, scale)
    return len(lengths)


def build_extend_metadata(
    seq_lens: list[int],
    extend_lens: list[int],
    page_table: torch.Tensor,  # [batch, max_pages] on the device
    page_size: int,
    max_gather_tokens: int,
) -> ExtendMetadata:
    device = page_table.device
    has_prefix = [n > e for n, e in zip(seq_lens, extend_lens, strict=True)]
    if not any(has_prefix):
        n, longest = sum(extend_lens), max(extend_lens)
        cu_host = list(itertools.accumulate(extend_lens, initial=0))  # [batch + 1]
        dense = dense_tokens(extend_lens)
        if dense and dense < n:
            cu_host += [0, n - dense, 0, n]
        cu_all = _to(cu_host, torch.int32, device)
        cu, cu_tail = cu_all[: len(extend_lens) + 1], cu_all[len(extend_lens) + 1 :]
        tail = cu_tail if cu_tail.numel() else None
        return ExtendMetadata((ExtendGroup(0, n, cu, cu, longest, longest, None, dense, tail),))
    slots = key_slots(page_table, seq_lens, page_size)  # [sum(seq_lens)]
    bounds = split_groups(seq_lens, max_gather_tokens)
    # every group's cumulative lengths go to the device in one copy
    host: list[int] = []
    offsets = []
    for lo, hi in bounds:
        q_off = len(host)
        host += itertools.accumulate(extend_lens[lo:hi], initial=0)
        k_off = len(host)
        host += itertools.accumulate(seq_lens[lo:hi], initial=0)
        offsets.append((q_off, k_off))
    cu_all = _to(host, torch.int32, device)
    groups = []
    q_start = k_start = 0
    for (lo, hi), (q_off, k_off) in zip(bounds, offsets, strict=True):
        ext, lens = extend_lens[lo:hi], seq_lens[lo:hi]
        q_end, k_end = q_start + sum(ext), k_start + sum(lens)
        cu_seq_q = cu_all[q_off : q_off + hi - lo + 1]
        if any(has_prefix[lo:hi]):
            cu_seq_k = cu_all[k_off : k_off + hi - lo + 1]
            groups.append(
                ExtendGroup(q_start, q_end, cu_seq_q, cu_seq_k, max(ext), max(lens), slots[k_start:k_end])
            )
        else:
            groups.append(ExtendGroup(q_start, q_end, cu_seq_q, cu_seq_q, max(ext), max(ext), None))
        q_start, k_start = q_end, k_end
    return ExtendMetadata(tuple(groups))


def paged_extend_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_new: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], already stored in the pool
    v_new: torch.Tensor,
    k_pages: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: torch.Tensor,
    meta: ExtendMetadata,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its prefix and themselves:
    ``[num_tokens, num_heads, head_dim]`` (``out`` when given)."""
    assert _HAS_FLASH, "this torch build has no FlashAttention-2 varlen op"
    num_kv_heads, head_dim = k_pages.shape[2], k_pages.shape[3]
    k_flat = k_pages.view(-1, num_kv_heads, head_dim)  # [num_pages * page_size, num_kv_heads, head_dim]
    v_flat = v_pages.view(-1, num_kv_heads, head_dim)
    if out is None and len(meta.groups) == 1:
        return _attend(q, k_new, v_new, k_flat, v_flat, meta.groups[0], scale)
    out = torch.empty_like(q) if out is None else out
    for g in meta.groups:
        out[g.q_start : g.q_end] = _attend(q, k_new, v_new, k_flat, v_flat, g, scale)
    return out


def _attend(q, k_new, v_new, k_flat, v_flat, g: ExtendGroup, scale: float) -> torch.Tensor:
    q = q[g.q_start : g.q_end]  # [group_tokens, num_heads, head_dim]
    if g.key_slots is None:
        k, v = k_new[g.q_start : g.q_end], v_new[g.q_start : g.q_end]
        if g.dense_tokens:  # a lone long fresh prompt (SDPA_MIN_TOKENS)
            d, n = g.dense_tokens, q.shape[0]
            head = dense_causal(q[:d], k[:d], v[:d], scale)  # [d, num_heads, head_dim]
            if g.cu_tail is None:
                return head
            tail = _flash_varlen(q[d:], k, v, g.cu_tail[:2], g.cu_tail[2:], n - d, n, scale)
            return torch.cat([head, tail])
    else:
        k = k_flat.index_select(0, g.key_slots)  # [num_keys, num_kv_heads, head_dim]
        v = v_flat.index_select(0, g.key_slots)
    return _flash_varlen(q, k, v, g.cu_seq_q, g.cu_seq_k, g.max_q, g.max_k, scale)


def _to(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # non_blocking from pageable memory: the copy is staged before returning, and no stream sync
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
