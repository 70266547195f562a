"""The engine's penalised greedy output equals HF transformers' ``generate`` on the same weights:
``repetition_penalty`` with HF's own semantics, and min_tokens / logit_bias through HF's
processors — with overlap scheduling on, where a row's newest token is still on the device when
the next one is sampled, and with chunked prefill and a mixed batch."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers")
NUM_NEW = 24


@pytest.fixture(scope="module")
def hf(model_dirs):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dirs["qwen3"], dtype=torch.float32, attn_implementation="eager"
    )
    model.generation_config.eos_token_id = None  # as ignore_eos: the length is NUM_NEW
    return model.eval()


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 9, 17, 30)]


def hf_generate(model, prompt: list[int], **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NUM_NEW,
            pad_token_id=0, **kwargs,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_repetition_penalty_greedy_equals_hf_generate(model_dirs, hf, overlap):
    prompts = prompts_for(hf.config.vocab_size)
    llm = LLM(
        str(model_dirs["qwen3"]), page_size=4, max_num_batched_tokens=16, max_num_seqs=4, overlap=overlap
    )
    # one unpenalised row in the same batches: the adjustments stay per row
    params = [SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, repetition_penalty=rp)
              for rp in (1.8, 1.3, 0.7, 1.0)]  # fmt: skip
    outs = llm.generate(prompts, params)
    penalised_somewhere = False
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        expected = hf_generate(hf, prompt, repetition_penalty=p.repetition_penalty)
        assert out.token_ids == expected
        penalised_somewhere |= expected != hf_generate(hf, prompt)
    assert penalised_somewhere, "the penalty should change some continuation of these prompts"


def test_logit_bias_and_min_tokens_steer_greedy_like_hf(model_dirs, hf):
    prompt = prompts_for(hf.config.vocab_size)[1]
    llm = LLM(str(model_dirs["qwen3"]), page_size=4, overlap=True)
    free = hf_generate(hf, prompt)
    banned, forced = free[0], (free[0] + 1) % hf.config.vocab_size
    bias = {banned: -100.0, forced: 5.0}
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logit_bias=bias)
    )
    processor = transformers.SequenceBiasLogitsProcessor({(banned,): -100.0, (forced,): 5.0})
    expected = hf_generate(hf, prompt, logits_processor=transformers.LogitsProcessorList([processor]))
    assert out[0].token_ids == expected
    # min_tokens: with the would-be first token as a stop token, it cannot end the request early
    stop = SamplingParams(temperature=0, max_tokens=NUM_NEW, stop_token_ids=(free[0],), min_tokens=3)
    held = llm.generate([prompt], stop)[0]
    assert len(held.token_ids) >= 3 and free[0] not in held.token_ids[:3]
