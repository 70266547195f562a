"""Behaviour of the sampler: greedy, top-k, top-p, temperature, seeding, logprobs.

Oracles come from outside the sampler: torch.argmax / topk / log_softmax in float64, the known
probabilities of hand-built logits checked with chi-square and binomial bounds, and a pure-Python
murmur3 for the noise hash. Independent draws are rows of one batch that differ in seed or step.
"""

from __future__ import annotations

import pytest
import torch

from engine.sampling import Sampler, SamplingTensors, hash_uniform
from engine.sampling_params import SamplingParams

P_MIN = 1e-4  # reject a frequency test only when its p-value is below this


def sample(logits, params, seeds=None, steps=None):
    n = logits.shape[0]
    params = params if isinstance(params, list) else [params] * n
    seeds = list(range(n)) if seeds is None else seeds
    steps = [0] * n if steps is None else steps
    t = SamplingTensors.build(params, seeds, steps, vocab_size=logits.shape[-1], device="cpu")
    return Sampler()(logits, t)


def draws(probs, params, n=4000, seed=1234):
    """Token counts from n independent draws (same seed, steps 0..n-1) of one distribution."""
    logits = torch.tensor(probs, dtype=torch.float64).log().float().expand(n, -1)  # [n, vocab]
    tokens = sample(logits, params, seeds=[seed] * n, steps=list(range(n))).token_ids
    return torch.bincount(tokens, minlength=len(probs))


def chi2_pvalue(counts, expected_probs):
    """Pearson chi-square goodness of fit; sf of chi2(df) is the regularised upper gamma."""
    counts = counts.double()
    expected = torch.as_tensor(expected_probs, dtype=torch.float64) * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor((len(expected) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, stat / 2).item()


def test_greedy_is_argmax_for_any_dtype():
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = sample(logits.to(dtype), SamplingParams(temperature=0.0))
        assert torch.equal(out.token_ids, logits.to(dtype).float().argmax(-1))
        assert out.logprobs is None and out.top_logprobs is None


def test_top_k_never_leaves_the_true_top_k():
    n, vocab, k = 3000, 64, 5
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 0.3  # flat-ish
    params = SamplingParams(temperature=1.5, top_k=k)
    tokens = sample(logits.expand(n, -1), params, seeds=list(range(n)), steps=[7] * n).token_ids
    allowed = set(logits.topk(k).indices.tolist())
    assert set(tokens.tolist()) == allowed  # nothing outside, and every member reachable


def test_top_p_keeps_exactly_the_nucleus_with_renormalised_frequencies():
    counts = draws([0.5, 0.3, 0.1, 0.1], SamplingParams(top_p=0.7))
    assert counts[2:].sum() == 0
    assert chi2_pvalue(counts[:2], [0.625, 0.375]) > P_MIN


def test_top_p_boundary_includes_the_token_that_crosses_p():
    counts = draws([0.5, 0.3, 0.15, 0.05], SamplingParams(top_p=0.85))
    assert counts[3] == 0
    assert chi2_pvalue(counts[:3], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]) > P_MIN


def test_tiny_top_p_still_keeps_the_top_token():
    counts = draws([0.2, 0.5, 0.3], SamplingParams(top_p=1e-6), n=200)
    assert counts.tolist() == [0, 200, 0]


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # After top_k=2 the mass is [0.625, 0.375]; top_p=0.6 is reached by token 0 alone.
    counts = draws([0.5, 0.3, 0.1, 0.1], SamplingParams(top_k=2, top_p=0.6), n=500)
    assert counts.tolist() == [500, 0, 0, 0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, 1.2, 0.3])
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    n = 4000
    params = SamplingParams(temperature=temperature)
    # Half the draws vary the step, half vary the seed: both must act as independent randomness.
    by_step = sample(logits.expand(n, -1), params, seeds=[99] * n, steps=list(range(n))).token_ids
    by_seed = sample(logits.expand(n, -1), params, seeds=list(range(n)), steps=[3] * n).token_ids
    for tokens in (by_step, by_seed):
        assert chi2_pvalue(torch.bincount(tokens, minlength=8), expected) > P_MIN


def test_seeded_row_is_independent_of_batch_composition_and_position():
    gen = torch.Generator().manual_seed(2)
    vocab, n = 500, 40
    target_logits = torch.randn(n, vocab, generator=gen)
    target_params = SamplingParams(temperature=0.9)
    seeds, steps = [10_000 + i for i in range(n)], [i % 7 for i in range(n)]
    alone = sample(target_logits, target_params, seeds=seeds, steps=steps).token_ids

    # Interleave with other rows whose params force the sorted (top-k/top-p) and greedy paths.
    others = [SamplingParams(top_k=3), SamplingParams(temperature=0.0), SamplingParams(top_p=0.5)]
    perm = torch.randperm(3 * n, generator=gen)
    rows = torch.randn(3 * n, vocab, generator=gen)
    params, batch_seeds, batch_steps = [], [], []
    for pos in range(3 * n):
        params.append(others[pos % 3])
        batch_seeds.append(pos)
        batch_steps.append(pos)
    target_pos = perm[:n]
    for i, pos in enumerate(target_pos.tolist()):
        rows[pos] = target_logits[i]
        params[pos], batch_seeds[pos], batch_steps[pos] = target_params, seeds[i], steps[i]
    mixed = sample(rows, params, seeds=batch_seeds, steps=batch_steps).token_ids
    assert torch.equal(mixed[target_pos], alone)
    assert len(set(alone.tolist())) > n // 2  # really random, not argmax in disguise


def test_same_seed_repeats_and_other_seeds_diverge():
    vocab, n = 1000, 64
    logits = torch.zeros(n, vocab)  # uniform: every draw is pure noise
    params = SamplingParams(temperature=1.0)

    def stream(seed):
        return sample(logits, params, seeds=[seed] * n, steps=list(range(n))).token_ids

    base = stream(5)
    assert torch.equal(base, stream(5))
    for other in (6, 5 + 2**32, 2**63 - 1):  # low half, high half, extreme seed
        assert (stream(other) != base).float().mean() > 0.9
    assert len(set(base.tolist())) > n // 2  # steps are independent draws too


def test_logprobs_match_log_softmax_of_raw_logits():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 50, generator=gen) * 3).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.7, top_k=4, logprobs=5),
        SamplingParams(temperature=1.3, top_p=0.8, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=2.0, logprobs=3),
        SamplingParams(temperature=0.0),
    ]
    out = sample(logits, params)
    reference = torch.log_softmax(logits.double(), dim=-1)  # [batch, vocab]
    picked = reference.gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs.double(), picked, atol=1e-5, rtol=1e-5)
    assert out.top_logprobs.shape == out.top_token_ids.shape == (6, 5)
    top_ref = reference.topk(5, dim=-1).values
    torch.testing.assert_close(out.top_logprobs.double(), top_ref, atol=1e-5, rtol=1e-5)
    at_ids = reference.gather(1, out.top_token_ids)
    torch.testing.assert_close(out.top_logprobs.double(), at_ids, atol=1e-5, rtol=1e-5)


def test_logprobs_zero_returns_only_the_sampled_logprob():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4))
    out = sample(logits, SamplingParams(logprobs=0))
    assert out.logprobs is not None and out.logprobs.shape == (3,)
    assert out.top_logprobs is None and out.top_token_ids is None


def test_mixed_greedy_and_random_batch():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 300, generator=gen)
    greedy, hot = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=50)
    params = [greedy, hot] * 4
    seeds, steps = list(range(100, 108)), list(range(8))
    out = sample(logits, params, seeds=seeds, steps=steps).token_ids
    argmax = logits.argmax(-1)
    assert torch.equal(out[0::2], argmax[0::2])
    random_only = sample(logits[1::2], hot, seeds=seeds[1::2], steps=steps[1::2]).token_ids
    assert torch.equal(out[1::2], random_only)
    assert not torch.equal(out[1::2], argmax[1::2])


def test_build_reports_static_flags():
    params = [SamplingParams(temperature=0.0, top_k=5, logprobs=3), SamplingParams(logprobs=7)]
    t = SamplingTensors.build(params, [1, 2], [0, 9], vocab_size=100, device="cpu")
    assert not t.all_greedy and t.return_logprobs and t.max_logprobs == 7
    assert not t.any_top_k_top_p  # the greedy row's top_k is irrelevant
    assert t.top_ks.tolist() == [100, 100] and t.steps.tolist() == [0, 9]
    t = SamplingTensors.build([SamplingParams(top_k=500)], [0], [0], vocab_size=100, device="cpu")
    assert t.top_ks.tolist() == [100] and not t.any_top_k_top_p  # k >= vocab is off
    t = SamplingTensors.build([SamplingParams(temperature=0.0)], [0], [0], vocab_size=100, device="cpu")
    assert t.all_greedy and not t.return_logprobs and t.max_logprobs == 0


def _murmur3_32(data: bytes) -> int:
    """Reference MurmurHash3_x86_32 with seed 0, in plain Python integers."""
    m = 0xFFFFFFFF
    h = 0
    for i in range(0, len(data), 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * 0xCC9E2D51) & m
        k = ((k << 15) | (k >> 17)) & m
        k = (k * 0x1B873593) & m
        h ^= k
        h = ((h << 13) | (h >> 19)) & m
        h = (h * 5 + 0xE6546B64) & m
    return _fmix32(h ^ len(data))


def _fmix32(h: int) -> int:
    m = 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def test_noise_hash_matches_reference_and_stays_strictly_inside_unit_interval():
    seeds = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 123456789012345]
    steps = [0, 5, 2**31, 7, 2**40 + 3, 1]
    vocab = 257
    u = hash_uniform(torch.tensor(seeds), torch.tensor(steps), vocab)  # [6, vocab]
    for row, (seed, step) in enumerate(zip(seeds, steps, strict=True)):
        key = _murmur3_32(seed.to_bytes(8, "little") + step.to_bytes(8, "little"))
        for v in (0, 1, 128, vocab - 1):
            bits = _fmix32(key ^ _fmix32(v))
            assert u[row, v].item() == ((bits >> 9) + 0.5) / 2**23
    big = hash_uniform(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096)  # [64, 4096]
    assert big.min() > 0 and big.max() < 1
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002
    extremes = (torch.tensor([0.0, 2**23 - 1], dtype=torch.float32) + 0.5) * 2.0**-23  # smallest, largest
    assert extremes[0] > 0 and extremes[1] < 1 and (-extremes.log() > 0).all()
