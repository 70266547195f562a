"""Batched next-token sampling without CPU-GPU syncs or generator state.

Contract: ``Sampler()(logits, SamplingTensors.build(...))`` picks one token per row. The logits are
first adjusted when some row asked for penalties, a logit bias or min_tokens
(``engine.logit_adjust``; skipped entirely otherwise). Greedy rows (temperature 0) take the argmax.
Random rows divide by the temperature, keep the top-k ranks, keep the nucleus (smallest sorted
prefix whose mass reaches top_p, computed on the top-k-renormalised distribution; the top token is
always kept), drop tokens under min_p times the top token's probability, and then run an
exponential race: ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)``, which draws ``i`` with probability
``p_i``. Logprobs are those of the raw logits.

The uniform behind ``E_i`` is a counter-based hash of (seed, step, vocab id) built from int64 tensor
ops, so a seeded request gets the same token whatever else is in the batch and wherever its row sits,
and nothing on the hot path reads a tensor back to the host (CUDA-graph friendly). The only Python
branches are on flags fixed when the ``SamplingTensors`` are built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.logit_adjust import LogitAdjustments
from engine.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingTensors:
    """Per-step sampling parameters for a batch, already on the logits' device.

    The Python fields are known at build time so that a step can skip whole code paths without
    looking at tensor values: ``all_greedy`` (no random rows), ``any_top_k_top_p`` (some random row
    filters, so the vocab must be sorted), ``any_min_p``, ``return_logprobs`` (some row asked for
    logprobs, even top-0) and ``max_logprobs`` (widest top-n requested, 0 if none). ``adjust``:
    the step's penalties and biases, None when no row has any.
    """

    temperatures: Tensor  # [batch] float32, 0 for greedy rows
    top_ks: Tensor  # [batch] int64, vocab_size when off
    top_ps: Tensor  # [batch] float32, 1.0 when off
    seeds: Tensor  # [batch] int64 in [0, 2**63)
    steps: Tensor  # [batch] int64, index of the sampled token within the request's output
    min_ps: Tensor | None = None  # [batch] float32, 0 when off
    all_greedy: bool = False
    any_top_k_top_p: bool = True
    any_min_p: bool = False
    return_logprobs: bool = False
    max_logprobs: int = 0
    adjust: LogitAdjustments | None = None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
        adjust: LogitAdjustments | None = None,
    ) -> SamplingTensors:
        """Pack on the CPU, then copy asynchronously (from pinned memory when the target is CUDA)."""
        assert len(params) == len(seeds) == len(steps), "params, seeds and steps must align"
        assert all(0 <= s < 2**63 for s in seeds), "seeds must be in [0, 2**63)"
        top_ks = [vocab_size if p.greedy or p.top_k <= 0 else min(p.top_k, vocab_size) for p in params]
        top_ps = [1.0 if p.greedy else p.top_p for p in params]
        min_ps = [0.0 if p.greedy else p.min_p for p in params]
        floats_cpu = torch.tensor(
            [[p.temperature for p in params], top_ps, min_ps], dtype=torch.float32
        )  # [3, batch]
        ints_cpu = torch.tensor([top_ks, list(seeds), list(steps)], dtype=torch.int64)  # [3, batch]
        device = torch.device(device)
        if device.type == "cuda":
            floats_cpu, ints_cpu = floats_cpu.pin_memory(), ints_cpu.pin_memory()
        floats = floats_cpu.to(device, non_blocking=True)
        ints = ints_cpu.to(device, non_blocking=True)
        requested = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperatures=floats[0],
            top_ps=floats[1],
            top_ks=ints[0],
            seeds=ints[1],
            steps=ints[2],
            min_ps=floats[2],
            all_greedy=all(p.greedy for p in params),
            any_top_k_top_p=any(k < vocab_size for k in top_ks) or any(p < 1.0 for p in top_ps),
            any_min_p=any(m > 0.0 for m in min_ps),
            return_logprobs=bool(requested),
            max_logprobs=max(requested, default=0),
            adjust=adjust,
        )


@dataclass
class SampleOutput:
    """Sampled ids; logprobs are under the raw model distribution (log_softmax of the logits)."""

    token_ids: Tensor  # [batch] int64
    logprobs: Tensor | None = None  # [batch] float32, of the sampled token
    top_logprobs: Tensor | None = None  # [batch, max_logprobs] float32, descending
    top_token_ids: Tensor | None = None  # [batch, max_logprobs] int64


class Sampler:
    """Stateless: the same (logits row, params, seed, step) always yields the same token."""

    def __call__(self, logits: Tensor, t: SamplingTensors) -> SampleOutput:
        raw = logits.float()  # [batch, vocab]
        logits = raw if t.adjust is None else t.adjust.apply(raw)  # [batch, vocab]
        token_ids = logits.argmax(dim=-1)  # [batch]
        if not t.all_greedy:
            sampled = _sample_random(logits, t)  # [batch]
            token_ids = torch.where(t.temperatures == 0, token_ids, sampled)
        out = SampleOutput(token_ids=token_ids)
        if t.return_logprobs:
            logprobs = torch.log_softmax(raw, dim=-1)  # [batch, vocab]
            out.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
            if t.max_logprobs > 0:
                out.top_logprobs, out.top_token_ids = logprobs.topk(t.max_logprobs, dim=-1)
        return out


def _sample_random(logits: Tensor, t: SamplingTensors) -> Tensor:
    """Temperature, top-k, top-p, min-p and the exponential race; greedy rows return garbage (masked
    later).

    The race uses unnormalised weights ``exp(x - max)``: the race is scale-invariant per row, and the
    weights are then bit-identical on the sorted and unsorted paths, so a row's token does not depend
    on whether another row in the batch forced the sorted path.
    """
    temperatures = torch.where(t.temperatures > 0, t.temperatures, 1.0)  # [batch]
    scaled = logits / temperatures[:, None]  # [batch, vocab]
    noise = -torch.log(hash_uniform(t.seeds, t.steps, logits.shape[-1]))  # [batch, vocab], Exp(1)
    if not t.any_top_k_top_p:
        weights = torch.exp(scaled - scaled.amax(dim=-1, keepdim=True))  # [batch, vocab], top = 1
        if t.any_min_p:
            weights = _drop_under_min_p(weights, t)
        return (weights / noise).argmax(dim=-1)
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True, stable=True)  # [batch, vocab]
    ranks = torch.arange(logits.shape[-1], device=logits.device)  # [vocab]
    sorted_logits = sorted_logits.masked_fill(ranks >= t.top_ks[:, None], float("-inf"))
    weights = torch.exp(sorted_logits - sorted_logits[:, :1])  # [batch, vocab]
    cumulative = weights.cumsum(dim=-1)  # [batch, vocab]
    mass_before = (cumulative - weights) / cumulative[:, -1:]  # [batch, vocab], 0 at rank 0
    outside_nucleus = (mass_before >= t.top_ps[:, None]) & (t.top_ps[:, None] < 1.0)
    weights = weights.masked_fill(outside_nucleus, 0.0)
    if t.any_min_p:
        weights = _drop_under_min_p(weights, t)
    race = weights / noise.gather(1, sorted_ids)  # [batch, vocab]
    return sorted_ids.gather(1, race.argmax(dim=-1, keepdim=True)).squeeze(1)


def _drop_under_min_p(weights: Tensor, t: SamplingTensors) -> Tensor:
    """``weights`` are probabilities relative to the top token's (which is 1), so min_p compares
    with them directly; the top token always stays."""
    assert t.min_ps is not None, "built with min_ps"
    return weights.masked_fill(weights < t.min_ps[:, None], 0.0)


def hash_uniform(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """Uniforms in (0, 1), strictly, as a pure function of (seed, step, vocab id).

    ``seeds``/``steps`` are [batch] int64 >= 0; returns [batch, vocab_size] float32. The row key is
    murmur3_32 over the words (seed_lo, seed_hi, step_lo, step_hi); each element is
    ``fmix32(row_key ^ fmix32(vocab_id))``. All arithmetic stays in 32-bit lanes of int64 so that
    no product overflows.
    """
    key = torch.zeros_like(seeds)  # [batch]
    for word in (seeds & _MASK32, seeds >> 32, steps & _MASK32, (steps >> 32) & _MASK32):
        key = _murmur_round(key, word)
    key = _fmix32(key ^ 16)  # 16 = message length in bytes
    vocab_keys = _fmix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64))  # [vocab]
    bits = _fmix32(key[:, None] ^ vocab_keys)  # [batch, vocab], uniform on [0, 2**32)
    # 23 bits keep (k + 0.5) / 2**23 exact in float32: min 2**-24, max 1 - 2**-24.
    return ((bits >> 9).float() + 0.5) * 2.0**-23


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32): split off c's top bit so x * c' < 2**63."""
    low = x * (c & 0x7FFFFFFF)
    if c >> 31:
        low = low + ((x & 1) << 31)
    return low & _MASK32


def _rotl32(x: Tensor, r: int) -> Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _murmur_round(h: Tensor, k: Tensor) -> Tensor:
    k = _mul32(_rotl32(_mul32(k, 0xCC9E2D51), 15), 0x1B873593)
    h = _rotl32(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & _MASK32
