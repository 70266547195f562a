"""Packed variable-length EXTEND attention through FlashAttention-2 (the aten op behind torch's ``varlen_attn``).

An EXTEND batch packs every sequence's new queries into one ``[num_tokens, num_heads, head_dim]``
tensor; FA2's varlen kernel attends them all in one launch, given cumulative query and key lengths.
Its causal mask is bottom-right aligned when a sequence has more keys than queries: query ``t`` of a
sequence with ``P`` cached tokens sees keys ``0 .. P + t``, which is exactly extend over a prefix.

Keys: when no sequence of a group has a cached prefix (fresh prompts, the common case), a sequence's
keys are its new tokens, passed in as they are; a group of one long fresh prompt goes through SDPA's
dense causal path instead, whose cuDNN kernel beats FA2 on Hopper (``SDPA_MIN_TOKENS``). Otherwise
the keys live in the page pool. FA2's own paged mode (``block_table``) wants pages of 256 tokens and is FA3-only in torch, so
each layer instead gathers the group's keys (prefix and new; the new ones are already stored) into a
packed ``[num_keys, num_kv_heads, head_dim]`` buffer with one ``index_select`` by pool slot. The
slots are computed once per step on the device from the page table (``build_extend_metadata``),
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
_HAS_FLASH = hasattr(torch.ops.aten, "_flash_attention_forward")


def _flash_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """Causal varlen attention: q [Tq, H, D], k/v [Tk, Hkv, D] -> [Tq, H, D] (q's dtype)."""
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, True, False, scale=scale
    )
    return out[0]


VARLEN_DTYPES = (torch.float16, torch.bfloat16)  # FA2 runs no other dtype
# A lone fresh prompt at least this long goes through SDPA (cuDNN on Hopper) instead of FA2. cuDNN
# builds an execution plan for each new sequence length it meets, which blocks the host for
# milliseconds; below this length that costs more than cuDNN's faster kernel saves (measured on an
# H100: an offline run whose short prompts each met a new length lost ~0.5 s to it).
SDPA_MIN_TOKENS = 4096


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
        cu = _to(list(itertools.accumulate(extend_lens, initial=0)), torch.int32, device)  # [batch + 1]
        longest = max(extend_lens)
        return ExtendMetadata((ExtendGroup(0, sum(extend_lens), cu, cu, longest, longest, None),))
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
        if g.cu_seq_q.numel() == 2 and g.q_end - g.q_start >= SDPA_MIN_TOKENS:
            # One long fresh prompt: SDPA's dense causal path picks its fastest kernel (cuDNN on an
            # H100: about twice FA2's rate on an 8k prompt).
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )  # [1, num_heads, group_tokens, head_dim]
            return o[0].transpose(0, 1)
    else:
        k = k_flat.index_select(0, g.key_slots)  # [num_keys, num_kv_heads, head_dim]
        v = v_flat.index_select(0, g.key_slots)
    return _flash_varlen(q, k, v, g.cu_seq_q, g.cu_seq_k, g.max_q, g.max_k, scale)


def _to(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # non_blocking from pageable memory: the copy is staged before returning, and no stream sync
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
