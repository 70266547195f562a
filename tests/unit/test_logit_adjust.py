"""Penalties, logit bias, min_tokens and min_p in the sampler, against references outside it: HF
transformers' LogitsProcessors (repetition penalty, min_p, min new tokens) and numpy for OpenAI's
presence / frequency penalties and the logit bias. Greedy rows make the adjusted logits visible
as an argmax; the random rows' frequencies are checked with chi-square."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.logit_adjust import LogitAdjustments, RowHistory
from engine.sampling import Sampler, SamplingTensors
from engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")
VOCAB = 50
EOS = frozenset({VOCAB - 1})


def adjusted(logits, params, rows, last_tokens=None):
    return LogitAdjustments.build(params, rows, EOS, logits.shape[-1], "cpu", last_tokens).apply(logits)


def histories(batch, seed=0):
    g = np.random.default_rng(seed)
    return [
        RowHistory(g.integers(0, VOCAB, 7).tolist(), (out := g.integers(0, VOCAB, 12).tolist()), len(out))
        for _ in range(batch)
    ]


def test_repetition_penalty_equals_hf_processor_over_prompt_and_output():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    rows = histories(4)
    for penalty in (0.5, 1.3, 2.0):
        params = [SamplingParams(repetition_penalty=penalty)] * 4
        ours = adjusted(logits, params, rows)
        hf = transformers.RepetitionPenaltyLogitsProcessor(penalty)
        ids = torch.tensor([list(r.prompt_ids) + list(r.output_ids) for r in rows])
        assert torch.allclose(ours, hf(ids, logits.clone()), atol=1e-6)


def test_presence_and_frequency_penalties_equal_openai_formula_on_output_only():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    rows = histories(3, seed=1)
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4),
        SamplingParams(),  # a row without penalties in the same step is untouched
        SamplingParams(frequency_penalty=2.0),
    ]
    ours = adjusted(logits, params, rows).numpy()
    expected = logits.numpy().copy()
    for i, p in enumerate(params):
        counts = np.bincount(np.asarray(rows[i].output_ids), minlength=VOCAB)
        expected[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_the_token_still_on_the_device_counts_like_one_the_host_has():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2)).expand(2, -1)
    prompt, out = [1, 2, 3], [5, 5, 9, 11]
    params = [SamplingParams(frequency_penalty=1.0, repetition_penalty=1.5)] * 2
    last_tokens = torch.tensor([0, 11, 0])  # the previous step's samples, by row
    host_knows_all = RowHistory(prompt, out, len(out))
    one_in_flight = RowHistory(prompt, out[:-1], len(out), inflight_row=1)
    both = adjusted(logits, params, [host_knows_all, one_in_flight], last_tokens)
    assert torch.equal(both[0], both[1])


def test_logit_bias_and_min_tokens_against_hf_min_new_tokens():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    params = [
        SamplingParams(logit_bias={7: 100.0, 8: -100.0}),
        SamplingParams(min_tokens=5, stop_token_ids=(3,)),
        SamplingParams(min_tokens=5, stop_token_ids=(3,), ignore_eos=True),
    ]
    rows = [RowHistory([1], [], 0), RowHistory([1], [2, 2], 4), RowHistory([1], [2, 2], 2)]
    ours = adjusted(logits, params, rows)
    expected = logits.clone()
    expected[0, 7] += 100.0
    expected[0, 8] -= 100.0
    # HF masks its eos ids until min_new_tokens are generated: rows 1 (EOS + stop id) and 2 (stop id)
    for row, stops in ((1, [VOCAB - 1, 3]), (2, [3])):
        hf = transformers.MinNewTokensLengthLogitsProcessor(1, 5, stops)
        expected[row] = hf(
            torch.tensor([[1] + [2] * rows[row].num_generated]), logits[row : row + 1].clone()
        )[0]
    assert torch.equal(ours, expected)
    # once min_tokens were generated nothing is masked
    done = adjusted(logits[1:2], params[1:2], [RowHistory([1], [2] * 5, 5)])
    assert torch.equal(done, logits[1:2])


def test_greedy_rows_take_the_argmax_of_the_adjusted_logits():
    logits = torch.zeros(2, VOCAB)
    logits[:, 4] = 5.0
    params = [SamplingParams(temperature=0, logit_bias={6: 10.0}), SamplingParams(temperature=0)]
    rows = [RowHistory([1], [], 0)] * 2
    t = SamplingTensors.build(
        params, [0, 0], [0, 0], VOCAB, "cpu", LogitAdjustments.build(params, rows, EOS, VOCAB, "cpu")
    )
    out = Sampler()(logits, t)
    assert out.token_ids.tolist() == [6, 4]


def test_logprobs_stay_those_of_the_raw_logits():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0, logprobs=2, presence_penalty=2.0)]
    rows = [RowHistory([1], [int(logits.argmax())], 1)]
    t = SamplingTensors.build(
        params, [0], [0], VOCAB, "cpu", LogitAdjustments.build(params, rows, EOS, VOCAB, "cpu")
    )
    out = Sampler()(logits, t)
    raw = torch.log_softmax(logits.double(), -1)[0]
    assert out.logprobs[0].item() == pytest.approx(raw[out.token_ids[0]].item(), abs=1e-5)


def test_min_p_keeps_what_hf_min_p_keeps_with_renormalised_frequencies():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    n, min_p = 4000, 0.3
    kept = transformers.MinPLogitsWarper(min_p)(None, probs.log()[None].float())[0] > float("-inf")
    params = SamplingParams(temperature=1.0, min_p=min_p)
    logits = probs.log().float().expand(n, -1)
    t = SamplingTensors.build([params] * n, [99] * n, list(range(n)), len(probs), "cpu")
    assert t.any_min_p
    counts = torch.bincount(Sampler()(logits, t).token_ids, minlength=len(probs))
    assert ((counts > 0) == kept).all()
    expected = probs[kept] / probs[kept].sum()
    stat = ((counts[kept].double() - expected * n) ** 2 / (expected * n)).sum()
    pvalue = torch.special.gammaincc(
        torch.tensor((kept.sum().item() - 1) / 2.0, dtype=torch.float64), stat / 2
    )
    assert pvalue.item() > 1e-4


def test_min_p_after_top_k_on_the_sorted_path():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    n = 600
    params = SamplingParams(temperature=1.0, top_k=3, min_p=0.6)  # keeps 0.4 and 0.3 (>= 0.24)
    t = SamplingTensors.build([params] * n, [5] * n, list(range(n)), len(probs), "cpu")
    tokens = set(Sampler()(probs.log().float().expand(n, -1), t).token_ids.tolist())
    assert tokens == {0, 1}


def test_no_adjustment_requested_keeps_the_fast_path():
    params = [SamplingParams(temperature=0.7, top_k=5)]
    assert not LogitAdjustments.needed(params)
    assert LogitAdjustments.needed([SamplingParams(repetition_penalty=1.1)])
    assert not SamplingTensors.build(params, [0], [0], VOCAB, "cpu").any_min_p


@pytest.mark.parametrize(
    ("field", "value"),
    [("presence_penalty", 2.5), ("frequency_penalty", float("nan")), ("repetition_penalty", 0.0),
     ("min_p", 1.5), ("min_tokens", -1), ("logit_bias", {1: 101.0}), ("logit_bias", {-1: 1.0})],
)  # fmt: skip
def test_out_of_range_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**{field: value})
