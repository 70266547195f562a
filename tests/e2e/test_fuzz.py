"""Fuzzing the public APIs: the REST API from its own OpenAPI document (schemathesis), the gRPC API
with hypothesis-generated messages. Whatever arrives: no 5xx / INTERNAL / UNKNOWN, every call
answered within its bound, and the gateway still serving afterwards.

The instances run with a 64-token context so that every valid generated request finishes quickly.
"""

from __future__ import annotations

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from services import Service, start_all

from protos import common_pb2, gateway_pb2, gateway_pb2_grpc

schemathesis = pytest.importorskip("schemathesis")

MODEL = "tiny-qwen3"
CALL_TIMEOUT_S = 30
FUZZ = settings(max_examples=220, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def fuzz_gateway(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("fuzz_logs")
    engine = ("--page-size", "4", "--kv-cache-mib", "16", "--max-model-len", "64")
    prefill, decode = start_all([("prefill", tiny_model, engine), ("decode", tiny_model, engine)], logs)
    gw = Service("gateway", tiny_model, "--served-model-name", MODEL, "--prefill", prefill.address,
                 "--decode", decode.address, "--max-model-len", "64", log_dir=logs).wait_ready()  # fmt: skip
    yield gw
    for s in (gw, prefill, decode):
        s.stop()
    assert not any(
        word in s.log() for s in (gw, prefill, decode) for word in ("Traceback", "unhandled error")
    )


def _operations(gw: Service) -> list:
    schema = schemathesis.openapi.from_url(f"{gw.http_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health"])
def test_rest_api_never_answers_5xx(fuzz_gateway, path):
    """Cases generated from the gateway's own OpenAPI document by schemathesis (valid and invalid
    bodies alike); 110 per generating operation."""
    (operation,) = [op for op in _operations(fuzz_gateway) if op.path == path]

    statuses: list[int] = []

    @FUZZ
    @given(case=operation.as_strategy())
    def check(case):
        if isinstance(case.body, dict) and "model" in case.body and hash(str(case.body)) % 4:
            case.body["model"] = MODEL  # mostly the served model, so generation itself gets fuzzed too
        response = case.call(base_url=fuzz_gateway.http_url, timeout=CALL_TIMEOUT_S)
        statuses.append(response.status_code)
        assert response.status_code < 500, (
            f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text[:300]}"
        )
        if response.status_code >= 400:
            assert response.json()["error"]["message"]

    check()
    if path in ("/v1/completions", "/v1/chat/completions"):
        assert len(statuses) >= 200, len(statuses)
        assert 200 in statuses and any(400 <= code < 500 for code in statuses), "accepted and rejected both"


_u32 = st.integers(0, 2**32 - 1)
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


def _mostly(valid: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """Usually in range (so requests get through to generation), sometimes anything at all."""
    return st.one_of(valid, valid, valid, wild)


_sampling = st.builds(
    common_pb2.SamplingParams,
    temperature=_mostly(st.floats(0, 2), _floats), top_k=_mostly(st.integers(-1, 50), st.integers(-(2**31), 2**31 - 1)),
    top_p=_mostly(st.floats(0.05, 1), _floats), seed=_mostly(st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1)),
    max_tokens=_mostly(st.integers(1, 8), st.integers(0, 300)), stop=st.lists(st.text(min_size=1, max_size=4), max_size=2)
    | st.lists(st.text(max_size=8), max_size=6), stop_token_ids=st.lists(_u32, max_size=4), ignore_eos=st.booleans(),
    logprobs=_mostly(st.integers(0, 5), st.integers(0, 40)), skip_special_tokens=st.booleans(),
)  # fmt: skip
_requests = st.builds(
    gateway_pb2.GatewayGenerateRequest,
    model=_mostly(st.sampled_from(["", MODEL]), st.text(max_size=12)),
    text=_mostly(st.text(min_size=1, max_size=60), st.none() | st.text(max_size=200)),
    sampling=_sampling,
    timeout_s=_mostly(st.sampled_from([0.0, 30.0]), st.floats(allow_nan=True, allow_infinity=True)),
    request_id=st.text(max_size=16),
).flatmap(
    lambda r: st.one_of(
        st.just(r),
        st.lists(_mostly(st.integers(0, 1000), _u32), max_size=80).map(lambda ids: _with_ids(r, ids)),
    )
)


def _with_ids(
    request: gateway_pb2.GatewayGenerateRequest, ids: list[int]
) -> gateway_pb2.GatewayGenerateRequest:
    copy = gateway_pb2.GatewayGenerateRequest()
    copy.CopyFrom(request)
    copy.token_ids.ids.extend(ids)
    return copy


_VALID = gateway_pb2.GatewayGenerateRequest(
    model=MODEL, text="hello", sampling=common_pb2.SamplingParams(temperature=0.5, max_tokens=3, seed=1)
)


def test_grpc_api_never_answers_internal(fuzz_gateway):
    """220 hypothesis-built GatewayGenerateRequests (plus one valid example)."""
    channel = grpc.insecure_channel(fuzz_gateway.address)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    outcomes: list[str] = []

    @FUZZ
    @given(request=_requests)
    @example(request=_VALID)
    def check(request):
        try:
            for _ in stub.Generate(request, timeout=CALL_TIMEOUT_S):
                pass
            outcomes.append("OK")
        except grpc.RpcError as e:
            outcomes.append(e.code().name)
            bad = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)
            assert e.code() not in bad, f"{request} -> {e.code()}: {e.details()}"
            assert e.code() is not grpc.StatusCode.DEADLINE_EXCEEDED or request.timeout_s, "nothing may hang"

    try:
        check()
    finally:
        channel.close()
    assert len(outcomes) >= 200, len(outcomes)
    assert "OK" in outcomes and "INVALID_ARGUMENT" in outcomes, "both accepted and rejected requests"


def test_still_serving_after_the_fuzzing(fuzz_gateway):
    assert httpx.get(f"{fuzz_gateway.http_url}/health", timeout=10).json()["ready"]
    r = httpx.post(
        f"{fuzz_gateway.http_url}/v1/completions",
        json={"model": MODEL, "prompt": "ok", "max_tokens": 3},
        timeout=30,
    )
    assert r.status_code == 200
