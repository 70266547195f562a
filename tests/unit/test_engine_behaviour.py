"""What a user of ``engine.LLM`` / ``Engine`` notices: when generation stops, what text comes back,
seeded sampling, request validation, abort, prefix reuse and continuous batching.

Oracles are outside the code under test: the ``tokenizers`` library decoding the same tokenizer.json,
arithmetic on the requested limits, and a fresh engine generating each prompt on its own (greedy
decoding must not depend on what else is batched, cached or preempted).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers
import torch

from engine import LLM, SamplingParams
from engine.engine import Engine
from engine.output import RequestOutput

PROMPTS = [
    "The lighthouse keeper counted the ships",
    "A serving engine takes requests from many users at once.",
    "def fibonacci(n: int) -> list[int]:",
    "user: What is the capital of France? assistant:",
]


def pool_bytes(model_dir: Path, num_pages: int, page_size: int = 4) -> int:
    """KV cache bytes for ``num_pages`` pages (one of them reserved) of a float32 model."""
    cfg = json.loads((model_dir / "config.json").read_text())
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 4  # k and v
    return num_pages * page_size * per_token


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=kw.pop("ignore_eos", True), **kw)


def random_prompt(n: int, seed: int) -> list[int]:
    # ids below 1021 are ordinary (non-special) tokens of the tiny tokenizer
    return torch.randint(0, 1021, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def stream(engine: Engine, request_id: str, prompt_ids: list[int], params: SamplingParams):
    """Drive one request through Engine.step; return its outputs in order."""
    engine.add_request(request_id, prompt_ids, params)
    outputs: list[RequestOutput] = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def assert_no_page_leaked(engine: Engine) -> None:
    allocator, cache = engine.allocator, engine.prefix_cache
    assert allocator.num_free + cache.num_cached_pages == allocator.num_total
    cache.evict(10**9)
    assert allocator.num_free == allocator.num_total


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def llm(tiny_model: Path, request) -> LLM:
    """With and without overlap scheduling: what a user sees must not change."""
    return LLM(str(tiny_model), kv_cache_bytes=8 << 20, overlap=request.param)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


# -- when generation stops -------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 5, 17])
def test_max_tokens_is_respected(llm, max_tokens):
    out = llm.generate(PROMPTS[0], greedy(max_tokens))[0]
    assert len(out.token_ids) == max_tokens
    assert out.finish_reason == "length"


def third_token_case(llm) -> tuple[str, list[int]]:
    """A prompt whose greedy 3rd token does not already occur among the first two."""
    for prompt in PROMPTS:
        tokens = llm.generate(prompt, greedy(12))[0].token_ids
        if tokens[2] not in tokens[:2]:
            return prompt, tokens
    raise AssertionError("no prompt with a fresh 3rd token")


def test_stop_token_ends_output_at_that_token(llm, hf_tokenizer):
    prompt, tokens = third_token_case(llm)
    stop_id = tokens[2]
    out = llm.generate(prompt, greedy(12, ignore_eos=False, stop_token_ids=(stop_id,)))[0]
    assert out.token_ids == tokens[:3]
    assert out.finish_reason == "stop"
    assert out.text == hf_tokenizer.decode(tokens[:2])  # the stop token itself adds no text


def test_eos_stops_unless_ignore_eos(llm, tiny_model, tmp_path, hf_tokenizer):
    prompt, tokens = third_token_case(llm)
    # Declare the 3rd greedy token to be this model's EOS (as config.json's eos_token_id).
    model_dir = Path(shutil.copytree(tiny_model, tmp_path / "eos"))
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["eos_token_id"] = tokens[2]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    eos_llm = LLM(str(model_dir), kv_cache_bytes=1 << 20)

    stopped = eos_llm.generate(prompt, greedy(12, ignore_eos=False))[0]
    assert stopped.token_ids == tokens[:3]
    assert stopped.finish_reason == "stop"
    assert stopped.text == hf_tokenizer.decode(tokens[:2])

    ignored = eos_llm.generate(prompt, greedy(12, ignore_eos=True))[0]
    assert ignored.token_ids == tokens
    assert ignored.finish_reason == "length"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_is_the_tokenizers_decode(llm, hf_tokenizer, prompt):
    out = llm.generate(prompt, greedy(32))[0]
    assert out.prompt_token_ids == hf_tokenizer.encode(prompt).ids
    assert out.text == hf_tokenizer.decode(out.token_ids)
    streamed = stream(llm.engine, "decode", out.prompt_token_ids, greedy(32))
    assert "".join(o.new_text for o in streamed) == out.text


def stop_case(text: str, start: int, length: int) -> str:
    stop = text[start : start + length]
    assert len(stop) == length, "the base text is too short for this case"
    return stop


@pytest.mark.parametrize("prompt", PROMPTS[:3])
@pytest.mark.parametrize(("where", "length"), [(0.5, 1), (0.5, 4), (0.25, 2), (0.8, 6)])
def test_stop_string_cuts_text_and_stream_agrees(llm, prompt, where, length):
    base = llm.generate(prompt, greedy(40))[0]
    stop = stop_case(base.text, max(1, int(len(base.text) * where)), length)
    expected = base.text[: base.text.index(stop)]
    params = greedy(40, stop=("never-appears-here", stop))

    out = llm.generate(prompt, params)[0]
    assert out.text == expected
    assert out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[: len(out.token_ids)]

    streamed = stream(llm.engine, "stop", base.prompt_token_ids, params)
    assert "".join(o.new_text for o in streamed) == expected
    assert [t for o in streamed for t in o.new_token_ids] == out.token_ids
    assert streamed[-1].finished and streamed[-1].finish_reason == "stop"
    assert not any(o.finished for o in streamed[:-1])


def test_stop_string_that_never_appears_changes_nothing(llm):
    base = llm.generate(PROMPTS[1], greedy(24))[0]
    out = llm.generate(PROMPTS[1], greedy(24, stop=("never-appears-here",)))[0]
    assert (out.token_ids, out.text, out.finish_reason) == (base.token_ids, base.text, "length")


# -- seeded sampling -------------------------------------------------------------------------------


def sampled(seed: int | None, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True, **kw)


def test_same_seed_same_tokens_wherever_it_is_batched(llm):
    target = PROMPTS[2]
    alone = llm.generate(target, sampled(1234))[0].token_ids
    batch = llm.generate(
        [PROMPTS[0], target, PROMPTS[1], target],
        [sampled(99, top_p=0.8), sampled(1234), greedy(5), sampled(1234)],
    )
    assert batch[1].token_ids == alone
    assert batch[3].token_ids == alone
    reordered = llm.generate([target, PROMPTS[3]], [sampled(1234), sampled(7, top_k=20)])
    assert reordered[0].token_ids == alone


def test_different_seeds_give_different_samples(llm):
    outs = llm.generate([PROMPTS[0]] * 3, [sampled(1), sampled(2), sampled(3)])
    assert len({tuple(o.token_ids) for o in outs}) == 3


def test_top_k_1_sampling_is_greedy(llm):
    # Only the argmax survives top-k=1, whatever the temperature and seed.
    expected = llm.generate(PROMPTS[3], greedy(16))[0].token_ids
    out = llm.generate(PROMPTS[3], sampled(5, top_k=1))[0]
    assert out.token_ids == expected


# -- request validation ----------------------------------------------------------------------------


def expect_error(llm: LLM, prompt, params: SamplingParams, field: str) -> None:
    """The request is rejected with a ValueError naming ``field``; the engine keeps serving."""
    reference = llm.generate(PROMPTS[0], greedy(4))[0].token_ids
    with pytest.raises(ValueError, match=f"^{field}"):
        llm.generate([prompt], params)
    again = llm.generate(PROMPTS[0], greedy(4))[0]
    assert again.token_ids == reference
    assert again.finish_reason == "length"


def test_empty_prompt_rejected(llm):
    expect_error(llm, [], greedy(4), "prompt")
    expect_error(llm, "", greedy(4), "prompt")


@pytest.mark.parametrize("bad_id", [1024, 10**6, -1])
def test_out_of_vocab_token_rejected(llm, bad_id):
    expect_error(llm, [5, bad_id, 7], greedy(4), "prompt")


def test_prompt_filling_the_context_rejected(tiny_model):
    short = LLM(str(tiny_model), kv_cache_bytes=1 << 20, max_model_len=16)
    expect_error(short, random_prompt(16, 0), greedy(4), "prompt")
    expect_error(short, random_prompt(40, 0), greedy(4), "prompt")
    # one token short of the context: exactly one token fits, then the context ends the request
    out = short.generate([random_prompt(15, 0)], greedy(4))[0]
    assert len(out.token_ids) == 1
    assert out.finish_reason == "length"


def test_request_larger_than_the_kv_pool_rejected(tiny_model):
    pool = LLM(str(tiny_model), page_size=4, kv_cache_bytes=pool_bytes(tiny_model, 13))
    capacity = pool.engine.allocator.num_total * 4
    assert capacity == 48  # 13 pages, one reserved, 4 tokens each
    prompt = random_prompt(10, 1)
    expect_error(pool, prompt, greedy(capacity - 10 + 1), "max_tokens")
    out = pool.generate([prompt], greedy(capacity - 10))[0]  # exactly the whole pool still runs
    assert len(out.token_ids) == capacity - 10
    assert out.finish_reason == "length"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("temperature", {"temperature": -1.0}),
        ("top_p", {"top_p": 0.0}),
        ("top_k", {"top_k": 0}),
        ("max_tokens", {"max_tokens": 0}),
        ("seed", {"seed": -1}),
        ("stop", {"stop": ("",)}),
    ],
)
def test_invalid_sampling_params_name_the_field(llm, field, kwargs):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)
    assert llm.generate(PROMPTS[0], greedy(2))[0].finish_reason == "length"


def test_invalid_prompt_in_a_batch_leaves_the_engine_usable(tiny_model):
    fresh = LLM(str(tiny_model), kv_cache_bytes=1 << 20)
    with pytest.raises(ValueError, match=r"^prompt"):
        fresh.generate([PROMPTS[0], ""], greedy(4))
    out = fresh.generate(PROMPTS[0], greedy(4))[0]
    assert len(out.token_ids) == 4


# -- abort -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_abort_mid_decode_and_while_waiting(tiny_model, overlap):
    engine = LLM(
        str(tiny_model),
        page_size=4,
        max_num_seqs=2,
        kv_cache_bytes=pool_bytes(tiny_model, 64),
        overlap=overlap,
    ).engine
    prompts = {f"r{i}": random_prompt(6 + 5 * i, 10 + i) for i in range(4)}
    solo = {rid: stream(engine, f"solo-{rid}", ids, greedy(12)) for rid, ids in prompts.items()}
    solo_tokens = {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in solo.items()}

    for rid, ids in prompts.items():
        engine.add_request(rid, ids, greedy(12))
    got: dict[str, list[RequestOutput]] = {rid: [] for rid in prompts}
    while len(got["r0"]) < 3:  # r0 is decoding; with max_num_seqs=2, r3 is still waiting
        for out in engine.step():
            got[out.request_id].append(out)
    assert got["r3"] == []

    for rid in ("r0", "r3"):
        aborted = engine.abort(rid)
        assert aborted is not None
        assert aborted.finished and aborted.finish_reason == "abort"
        assert aborted.new_token_ids == []
        got[rid].append(aborted)
    assert engine.abort("r0") is None  # already gone
    assert engine.abort("never-added") is None

    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].append(out)

    for rid in ("r0", "r3"):
        assert [o.finished for o in got[rid]] == [False] * (len(got[rid]) - 1) + [True]
    r0_tokens = [t for o in got["r0"] for t in o.new_token_ids]
    assert r0_tokens == solo_tokens["r0"][: len(r0_tokens)]
    assert got["r3"][-1].num_output_tokens == 0
    for rid in ("r1", "r2"):
        assert got[rid][-1].finish_reason == "length"
        assert [t for o in got[rid] for t in o.new_token_ids] == solo_tokens[rid]
    assert_no_page_leaked(engine)

    # an aborted id can be reused, and the request then runs normally
    again = stream(engine, "r0", prompts["r0"], greedy(12))
    assert [t for o in again for t in o.new_token_ids] == solo_tokens["r0"]


# -- prefix cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [48, 53])
def test_prefix_cache_reuses_whole_pages_of_a_repeated_prompt(tiny_model, prompt_len):
    prompt = random_prompt(prompt_len, 3)
    cached = LLM(str(tiny_model), kv_cache_bytes=1 << 20)  # page_size 16
    first, second = (cached.generate([prompt], greedy(8))[0] for _ in range(2))
    assert first.num_cached_tokens == 0
    # whole pages only, and the last prompt token is always recomputed (its logits are needed)
    assert second.num_cached_tokens == (prompt_len - 1) // 16 * 16
    assert second.token_ids == first.token_ids

    uncached = LLM(str(tiny_model), kv_cache_bytes=1 << 20, enable_prefix_cache=False)
    for _ in range(2):
        out = uncached.generate([prompt], greedy(8))[0]
        assert out.num_cached_tokens == 0
        assert out.token_ids == first.token_ids


# -- continuous batching ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlap", "mixed"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["sync", "overlap", "sync-mixed", "overlap-mixed"],
)
def test_many_prompts_through_a_small_pool_match_one_at_a_time(tiny_model, overlap, mixed):
    prompts = [random_prompt(1 + (i * 7) % 64, 100 + i) for i in range(40)]
    params = [greedy(4 + i % 13) for i in range(40)]
    alone_llm = LLM(str(tiny_model), kv_cache_bytes=1 << 20, enable_prefix_cache=False)
    alone = [alone_llm.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]

    busy = LLM(
        str(tiny_model),
        page_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        kv_cache_bytes=pool_bytes(tiny_model, 25),  # 96 tokens for 8 running sequences: preemption
        overlap=overlap,
        mixed_batches=mixed,
    )
    together = busy.generate(prompts, params)
    for a, b, sp in zip(alone, together, params, strict=True):
        assert b.token_ids == a.token_ids
        assert b.text == a.text
        assert b.finish_reason == "length" and len(b.token_ids) == sp.max_tokens
    assert_no_page_leaked(busy.engine)


# -- chat template ---------------------------------------------------------------------------------


def test_chat_template_prompt_generates(llm, hf_tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    text = llm.tokenizer.apply_chat_template(messages)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    out = llm.generate(text, greedy(8))[0]
    assert out.prompt_token_ids == hf_tokenizer.encode(text).ids
    assert out.prompt_token_ids.count(hf_tokenizer.token_to_id("<|im_start|>")) == 3
    assert len(out.token_ids) == 8
    assert out.text == hf_tokenizer.decode(out.token_ids)


def test_interrupted_generate_leaves_the_engine_usable(tiny_model, monkeypatch):
    llm = LLM(str(tiny_model), page_size=4)
    prompts = [random_prompt(n, seed=n) for n in (5, 9, 13)]
    expected = [o.token_ids for o in llm.generate(prompts, greedy(12))]
    real_forward, calls = llm.engine.runner.forward, []

    def failing_forward(batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C mid-generate looks like to the caller
        return real_forward(batch)

    monkeypatch.setattr(llm.engine.runner, "forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, greedy(12))
    monkeypatch.undo()
    assert not llm.engine.has_unfinished()
    assert_no_page_leaked(llm.engine)
    assert [o.token_ids for o in llm.generate(prompts, greedy(12))] == expected


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_usage_reports_first_admission_cache_hits_despite_preemption(tiny_model, overlap):
    llm = LLM(
        str(tiny_model),
        page_size=4,
        kv_cache_bytes=pool_bytes(tiny_model, 24),
        max_num_batched_tokens=16,
        overlap=overlap,
    )
    prompts = [random_prompt(n, seed=100 + n) for n in (20, 21, 22, 23)]  # no shared prefixes
    outs = llm.generate(prompts, greedy(40))
    assert all(len(o.token_ids) == 40 for o in outs)
    assert [o.num_cached_tokens for o in outs] == [0, 0, 0, 0]


def test_max_model_len_beyond_the_model_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_model), max_model_len=10**6)


@pytest.mark.parametrize("flag", ["use_sliding_window", "mlp_bias"])
def test_unsupported_config_flags_are_rejected(tiny_model, tmp_path, flag):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg[flag] = True
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=flag):
        LLM(str(broken))


def test_mixed_batches_keep_decoding_while_prompts_prefill(tiny_model):
    """Prefill first stalls running requests for whole prefills; mixed batches give every decoding
    sequence a token in every step while a long prompt is chunked in, with the same outputs."""
    params = greedy(12)

    def run(mixed: bool) -> tuple[int, dict[str, list[int]]]:
        """(steps that decoded "short" while "long" was still prefilling, every request's tokens)."""
        llm = LLM(str(tiny_model), page_size=4, max_num_batched_tokens=32, mixed_batches=mixed)
        engine = llm.engine
        engine.add_request("short", random_prompt(5, 8), params)
        tokens: dict[str, list[int]] = {"short": [], "long": []}
        while not engine.scheduler.decoding:  # the short request reaches decode
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
        engine.add_request("long", random_prompt(200, 7), params)  # 7 chunks at a 32-token budget
        overlapping = 0
        while engine.has_unfinished():
            long_prefilling = any(s.request_id == "long" for s in engine.scheduler.waiting) or any(
                s.request_id == "long" for s in engine.scheduler.prefilling
            )
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
                overlapping += long_prefilling and out.request_id == "short" and bool(out.new_token_ids)
        return overlapping, tokens

    stalled, plain = run(False)
    decoding, mixed = run(True)
    assert mixed == plain, "mixed batches change scheduling, not outputs"
    assert stalled == 0 and decoding >= 5, (stalled, decoding)


def test_startup_warm_up_step_fits_a_one_sequence_engine(tiny_model):
    """The extend step a CUDA engine runs at startup (two short sequences on free pages; CPU
    engines skip it) run here on a ``max_num_seqs=1`` engine: its buffers hold the two rows, and
    the engine then generates exactly what an engine without the step does."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = (
        LLM(str(tiny_model), max_num_seqs=1, max_num_batched_tokens=64)
        .generate([[5, 6, 7, 8, 9]], params)[0]
        .token_ids
    )
    llm = LLM(str(tiny_model), max_num_seqs=1, max_num_batched_tokens=64)
    llm.engine.runner._warm_up()
    assert llm.generate([[5, 6, 7, 8, 9]], params)[0].token_ids == want
