"""Prefill sends KV layer by layer while its step computes the later layers (the default), or after
the prefill (``--kv-after-prefill``); both give the same tokens.

Oracles: the single-process engine (``LLM``) for the tokens; the timing marks both services stamp
on the response (the first layer left prefill before the first token was sampled, or after it);
the services' load reports for "every page came back".
"""

from __future__ import annotations

import grpc
import pytest
from services import start_all

from engine import LLM, SamplingParams
from protos import decode_pb2, decode_pb2_grpc
from protos.convert import sampling_to_proto

ENGINE_ARGS = ("--page-size", "16", "--max-num-batched-tokens", "512", "--kv-cache-mib", "64")
PARAMS = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
PROMPT = [(11 * i) % 400 + 5 for i in range(1000)]  # two chunks; the last one's layers overlap


@pytest.fixture(scope="module")
def services(deep_model, tmp_path_factory):
    started = start_all(
        [
            ("prefill", deep_model, ENGINE_ARGS),
            ("prefill", deep_model, (*ENGINE_ARGS, "--kv-after-prefill")),
            ("decode", deep_model, ENGINE_ARGS),
        ],
        tmp_path_factory.mktemp("logs"),
    )
    yield dict(zip(["layerwise", "after", "decode"], started, strict=True))
    for s in started:
        s.stop()


def generate(decode, prefill, request_id: str) -> tuple[list[int], object]:
    request = decode_pb2.GenerateRequest(
        request_id=request_id, prompt_token_ids=PROMPT, sampling=sampling_to_proto(PARAMS),
        prefill_address=prefill.address,
    )  # fmt: skip
    try:
        responses = list(decode_pb2_grpc.DecodeServiceStub(decode.channel).Generate(request, timeout=60))
    except grpc.RpcError as e:
        raise AssertionError(f"{e}\nprefill log:\n{prefill.log()}\ndecode log:\n{decode.log()}") from e
    return [t for r in responses for t in r.token_ids], responses[-1].timing


def test_layer_by_layer_sending_starts_before_the_first_token_and_changes_nothing(services, deep_model):
    expected = LLM(str(deep_model), page_size=16, max_num_batched_tokens=512).generate([PROMPT], PARAMS)
    decode = services["decode"]
    tokens, timing = generate(decode, services["layerwise"], "layerwise")
    after_tokens, after_timing = generate(decode, services["after"], "after")
    assert tokens == after_tokens == expected[0].token_ids
    for t in (timing, after_timing):
        assert 0 < t.prefill_started_ns < t.prefill_done_ns < t.transfer_done_ns, t
        assert t.prefill_started_ns < t.transfer_started_ns < t.transfer_done_ns, t
    assert timing.transfer_started_ns < timing.prefill_done_ns, "layer 0 waited for the whole prefill"
    assert after_timing.transfer_started_ns >= after_timing.prefill_done_ns
    for s in services.values():
        s.wait_idle()
