"""Streaming detokenization equals a one-shot decode, never shows half a character; stop-string search."""

from __future__ import annotations

import random
import time

import pytest

from engine.detokenizer import IncrementalDetokenizer, find_stop
from engine.tokenizer import Tokenizer

MULTIBYTE = "Le café était célèbre. 机器学习是一门学科。😀🎉🚀 👍🏽 👩‍💻 → ≤ ∞ done."


@pytest.fixture(scope="module")
def tok(model_dirs) -> Tokenizer:
    return Tokenizer.from_dir(model_dirs["qwen3"])


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] = (), skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    parts = [detok.push(t) for t in ids]
    parts.append(detok.flush())
    assert detok.text == "".join(parts)
    assert detok.output_ids == ids
    return parts


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_streams_equal_one_shot_decode(tok, skip):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        prompt = tok.encode("The lighthouse keeper said:") if rng.random() < 0.5 else []
        parts = stream(tok, ids, prompt, skip)
        assert "".join(parts) == tok.decode(ids, skip_special_tokens=skip), ids
        # Only flush may show a trailing partial character.
        assert not any(p.endswith("\ufffd") for p in parts[:-1])


@pytest.mark.parametrize("skip", [True, False])
def test_deferred_text_equals_the_streamed_text(tok, skip):
    """What offline generation does (all tokens decoded once at the end) gives the streamed text."""
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        if rng.random() < 0.3:
            ids = tok.encode(MULTIBYTE)[: rng.randrange(1, 30)]  # may end mid-character
        prompt = tok.encode("The lighthouse keeper said:") if rng.random() < 0.5 else []
        once = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        text = once.push_many(ids) + once.flush()
        assert text == "".join(stream(tok, ids, prompt, skip)) and once.output_ids == ids, ids


def test_multibyte_text_streams_whole_characters(tok):
    ids = tok.encode(MULTIBYTE)
    parts = stream(tok, ids)
    assert "".join(parts) == MULTIBYTE
    assert all("\ufffd" not in p for p in parts)
    # The byte-level BPE really splits some characters across tokens, so waiting was exercised.
    assert "" in parts[:-1]
    assert parts[-1] == ""


def test_incomplete_character_is_held_until_flush(tok):
    ids = tok.encode("x😀")
    assert len(ids) >= 3, "the emoji should span several byte tokens"
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[0]) == "x"
    assert [detok.push(t) for t in ids[1:-1]] == [""] * (len(ids) - 2)
    assert detok.flush() == "\ufffd"  # the stream ended mid-character: like decode(), not dropped
    assert detok.text == tok.decode(ids[:-1])
    assert detok.flush() == ""


def test_special_tokens_are_skipped_or_shown(tok):
    im_end = tok.token_to_id("<|im_end|>")
    ids = [*tok.encode("hi"), im_end, *tok.encode(" there")]
    assert "".join(stream(tok, ids, skip=True)) == "hi there"
    assert "".join(stream(tok, ids, skip=False)) == "hi<|im_end|> there"


def test_prompt_context_does_not_leak_into_output(tok):
    prompt = tok.encode("Question: 中文?")
    out = tok.encode(" Answer: café 😀")
    assert "".join(stream(tok, out, prompt)) == " Answer: café 😀"
    # A prompt cut mid-character (raw ids from a client) must not corrupt the output either.
    cut = tok.encode("x😀")[:-1]
    assert "".join(stream(tok, out, cut)) == " Answer: café 😀"


def test_find_stop_reports_only_matches_ending_in_new_text():
    assert find_stop("hello world", ["world"], new_text_len=5) == 6
    assert find_stop("hello world", ["world"], new_text_len=1) == 6  # straddles old/new
    assert find_stop("hello world", ["hello"], new_text_len=6) is None  # found on an earlier call
    assert find_stop("a\n\nb", ["\n\n"], new_text_len=2) == 1
    assert find_stop("abc", ["x"], new_text_len=3) is None
    assert find_stop("abc", ["c"], new_text_len=0) is None
    # The earliest start wins, whichever stop string it belongs to.
    assert find_stop("xxSTOPend", ["end", "STOP", "OP"], new_text_len=7) == 2


def test_find_stop_with_streamed_deltas(tok):
    text, found = "", None
    detok = IncrementalDetokenizer(tok)
    for t in tok.encode("Le café 😀 était ### célèbre"):
        new = detok.push(t)
        text += new
        found = find_stop(text, ["###", "😀 é"], len(new))
        if found is not None:
            break
    assert found == text.index("😀") and text.startswith("Le café 😀 é")


def test_bytes_that_never_form_a_character_stream_in_linear_time(tok):
    """A client can bias the sampler towards a byte no character starts with (0xFF): the text is
    U+FFFD per byte as decode() shows it, streamed as it comes, each push as cheap as the first."""
    ff = tok.token_to_id("ÿ")  # byte-level BPE's symbol for the byte 0xFF
    assert ff is not None and tok.decode([ff]) == "\ufffd"
    for n in (500, 4000):
        ids = [ff] * n + tok.encode(" then café")
        start = time.perf_counter()
        parts = stream(tok, ids)
        elapsed = time.perf_counter() - start
        assert "".join(parts) == tok.decode(ids)
        assert sum(len(p) for p in parts[: n // 2]) > 0  # not all held back to the end
        assert elapsed < 0.5 + n * 50e-6, elapsed  # linear: ~µs per token, not a decode of the window
