"""The bounds the gateway and services put on hostile input, unit by unit: prompt text tokenized
with bounded work, the bounded channel cache, the per-peer log limiter, and instance errors that
reach a client without the instance's details.

Oracles: the HF ``tokenizers`` library itself (ids of a text that passes), counts of characters the
tokenizer was actually given, real gRPC channels (a closed one refuses calls).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from engine.tokenizer import Tokenizer
from gateway.envelope import request_id
from gateway.errors import APIError
from gateway.limits import PIECE_CHARS, PromptGuard, PromptTooLong, unicode_problem
from protos.channels import ChannelCache
from protos.guard import PeerLogLimiter, peer_host


class CountingTokenizer(Tokenizer):
    """The real tokenizer, counting the characters it was asked to encode."""

    num_chars = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.num_chars += len(text)
        return super().encode(text, add_special_tokens)


@pytest.fixture(scope="module")
def tokenizer(tiny_model) -> CountingTokenizer:
    base = Tokenizer.from_dir(tiny_model)
    tok = CountingTokenizer.__new__(CountingTokenizer)
    tok.__dict__.update(base.__dict__)
    return tok


def test_text_longer_than_any_fitting_text_is_refused_unread(tokenizer):
    guard = PromptGuard(tokenizer, max_tokens=100)
    longest = max(len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size))
    assert guard.max_chars == 100 * longest
    tokenizer.num_chars = 0
    with pytest.raises(PromptTooLong):
        guard.encode("x" * (guard.max_chars + 1))
    assert tokenizer.num_chars == 0


def test_a_long_text_stops_being_encoded_soon_after_the_limit(tokenizer):
    guard = PromptGuard(tokenizer, max_tokens=3000)
    text = "a b " * 9_000  # under the character bound, far over 3000 tokens
    assert len(text) <= guard.max_chars
    tokenizer.num_chars = 0
    with pytest.raises(PromptTooLong) as err:
        guard.encode(text)
    assert err.value.at_least > 3000
    assert tokenizer.num_chars <= PIECE_CHARS < len(text) // 2


def test_text_within_the_limit_encodes_exactly_as_the_tokenizer_does(tokenizer, tiny_model):
    import tokenizers

    reference = tokenizers.Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    text = "The scheduler runs a step, then another one.\n" * 500  # > PIECE_CHARS: counted in pieces
    assert len(text) > PIECE_CHARS
    guard = PromptGuard(tokenizer, max_tokens=len(reference.encode(text).ids))
    assert (
        guard.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False).ids
    )


def test_lone_surrogates_are_named_and_real_text_passes():
    assert unicode_problem("héllo wörld 🙂") is None
    assert "surrogate at character 3" in (unicode_problem("abc\ud800") or "")


def test_the_channel_cache_keeps_the_recent_and_closes_what_it_evicts():
    async def run() -> None:
        evicted: list[str] = []
        cache = ChannelCache(
            grpc.aio.insecure_channel, max_channels=4, on_evict=evicted.append, evict_grace_s=0.1
        )
        first = cache.get("127.0.0.1:1")
        second = cache.get("127.0.0.1:2")
        for port in range(3, 10):
            cache.get(f"127.0.0.1:{port}")
            cache.get("127.0.0.1:1")  # kept in use: never the least recent
        assert len(cache) == 4 and "127.0.0.1:1" in cache and cache.get("127.0.0.1:1") is first
        assert evicted == [f"127.0.0.1:{p}" for p in range(2, 7)] and cache.num_evicted == 5
        await asyncio.sleep(0.3)  # past the grace: the evicted channels are closed
        with pytest.raises(grpc.aio.UsageError):  # a closed channel refuses new calls
            await second.unary_unary("/x/y")(b"", timeout=1)
        await cache.close()
        with pytest.raises(grpc.aio.UsageError):
            await first.unary_unary("/x/y")(b"", timeout=1)

    asyncio.run(run())


def test_the_log_limiter_writes_one_line_per_peer_host_per_interval(caplog):
    limiter = PeerLogLimiter(interval_s=60)
    with caplog.at_level(logging.WARNING, logger="pdserve.grpc"):
        for port in range(100):  # one client reconnecting: a new port every time
            limiter.warning(f"ipv4:10.0.0.1:{port}", "malformed request")
        limiter.warning("ipv6:[::1]:5000", "malformed request")
    assert [r.getMessage() for r in caplog.records] == [
        "malformed request from 10.0.0.1",
        "malformed request from [::1]",
    ]
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"


def test_an_instance_error_reaches_the_client_without_its_details(caplog):
    token = request_id.set("req-test-1")
    try:
        with caplog.at_level(logging.WARNING, logger="pdserve.gateway"):
            e = APIError.from_grpc(grpc.StatusCode.UNAVAILABLE, "prefill at 127.0.0.1:39931: Stream removed")
    finally:
        request_id.reset(token)
    assert e.status == 503 and "127.0.0.1" not in e.message and "req-test-1" in e.message
    assert "127.0.0.1:39931" in caplog.text and "req-test-1" in caplog.text
    invalid = APIError.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1]")
    assert invalid.status == 400 and invalid.param == "sampling.top_p" and "top_p" in invalid.message
