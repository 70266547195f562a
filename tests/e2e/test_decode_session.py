"""A decode instance's ``Session`` stream — many requests over one call, as the gateway uses it —
against a real decode process.

Oracles: the single-process engine (``LLM``) for the tokens; the instance's own load report for
running requests and pages; the number of messages on the wire for the batching.
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from services import Service, start_all

from engine import LLM, SamplingParams
from protos import decode_pb2, decode_pb2_grpc
from protos.convert import sampling_to_proto

ENGINE = ("--page-size", "4", "--max-num-batched-tokens", "64", "--kv-cache-mib", "16")
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def decode(tiny_model, tmp_path_factory):
    (service,) = start_all([("decode", tiny_model, ENGINE)], tmp_path_factory.mktemp("session_logs"))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LLM(str(tiny_model), page_size=4, max_num_batched_tokens=64, kv_cache_bytes=16 << 20)


def _request(request_id: str, prompt: list[int], max_tokens: int) -> decode_pb2.SessionRequest:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    generate = decode_pb2.GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling=sampling_to_proto(params)
    )
    return decode_pb2.SessionRequest(generate=generate)


async def _run_session(
    address: str, requests: list[decode_pb2.SessionRequest]
) -> list[decode_pb2.SessionBatch]:
    """Send every request, read batches until each request has ended; returns the batches."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = decode_pb2_grpc.DecodeServiceStub(channel).Session()
        for r in requests:
            await call.write(r)
        open_ids = {r.generate.request_id for r in requests}
        batches = []
        async with asyncio.timeout(TIMEOUT_S):
            while open_ids:
                batch = await call.read()
                assert batch is not grpc.aio.EOF, f"the session ended with {open_ids} still open"
                batches.append(batch)
                for u in batch.updates:
                    if u.error_code or u.response.finish_reason:
                        open_ids.discard(u.request_id)
        await call.done_writing()
        return batches


def test_one_session_serves_many_requests_as_the_engine_would_in_fewer_messages(decode, reference):
    prompts = [[i + 3, 100 + 7 * i, 5 + i, 60] * (i + 1) for i in range(6)]
    lengths = [5, 9, 16, 12, 7, 20]
    requests = [_request(f"r{i}", p, n) for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    batches = asyncio.run(_run_session(decode.address, requests))

    tokens: dict[str, list[int]] = {r.generate.request_id: [] for r in requests}
    finals = {}
    for batch in batches:
        for u in batch.updates:
            assert not u.error_code, u.error_message
            tokens[u.request_id] += u.response.token_ids
            if u.response.finish_reason:
                finals[u.request_id] = u.response
    refs = reference.generate(
        prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    )
    for i, ref in enumerate(refs):
        assert tokens[f"r{i}"] == ref.token_ids
        assert finals[f"r{i}"].finish_reason == "length"
        assert finals[f"r{i}"].usage.completion_tokens == lengths[i]
    num_updates = sum(len(b.updates) for b in batches)
    assert len(batches) < num_updates / 2, (len(batches), num_updates)  # a step's tokens share a message
    decode.wait_idle()


def test_errors_are_per_request_and_the_session_goes_on(decode, reference):
    bad = _request("bad", [], 4)  # an empty prompt can never run
    batches = asyncio.run(_run_session(decode.address, [_request("good", [9, 8, 7], 6), bad]))
    updates = [u for b in batches for u in b.updates]
    (error,) = [u for u in updates if u.request_id == "bad"]
    assert (
        error.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        and "prompt_token_ids" in error.error_message
    )
    good = [t for u in updates if u.request_id == "good" for t in u.response.token_ids]
    assert good == reference.generate([[9, 8, 7]], SamplingParams(temperature=0, max_tokens=6))[0].token_ids
    decode.wait_idle()


def test_cancelling_a_request_or_the_session_frees_its_pages(decode):
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(decode.address) as channel:
            call = decode_pb2_grpc.DecodeServiceStub(channel).Session()
            for i in range(2):  # long enough to still run when cancelled
                await call.write(_request(f"long{i}", [11 + i, 12, 13], 4000))
            seen: set[str] = set()
            async with asyncio.timeout(TIMEOUT_S):
                while seen != {"long0", "long1"}:
                    seen |= {u.request_id for u in (await call.read()).updates}
            assert decode.load().num_running == 2
            await call.write(decode_pb2.SessionRequest(cancel_request_id="long0"))
            deadline = time.monotonic() + 5
            while decode.load().num_running != 1:
                assert time.monotonic() < deadline, "the cancelled request still runs"
                await asyncio.sleep(0.05)
            call.cancel()  # the gateway went away: its last request goes too
        decode.wait_idle(timeout_s=5)

    asyncio.run(scenario())


def test_sigterm_drains_a_session_running_requests_finish_new_ones_are_refused(tiny_model, tmp_path):
    service = Service("decode", tiny_model, *ENGINE, log_dir=tmp_path).wait_ready()

    async def scenario() -> tuple[list[int], decode_pb2.RequestUpdate, float]:
        async with grpc.aio.insecure_channel(service.address) as channel:
            call = decode_pb2_grpc.DecodeServiceStub(channel).Session()
            await call.write(_request("running", [4, 5, 6], 300))
            tokens: list[int] = []
            refused = None
            async with asyncio.timeout(TIMEOUT_S):
                tokens += (await call.read()).updates[0].response.token_ids
                service.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)  # the drain has begun
                await call.write(_request("late", [7, 8, 9], 3))
                while True:
                    batch = await call.read()
                    if batch is grpc.aio.EOF:
                        break
                    for u in batch.updates:
                        if u.request_id == "late":
                            refused = u
                        else:
                            tokens += u.response.token_ids
                start = time.monotonic()
                assert await call.code() is grpc.StatusCode.OK  # the session ended by itself
            assert refused is not None
            return tokens, refused, time.monotonic() - start

    try:
        tokens, refused, _ = asyncio.run(scenario())
        assert len(tokens) == 300  # the running request finished whole
        assert (
            refused.error_code == grpc.StatusCode.UNAVAILABLE.value[0] and "draining" in refused.error_message
        )
        assert service.proc.wait(timeout=15) == 0
        assert "KV pages free" in service.log()
    finally:
        service.stop()
