"""Server-side limits: over each one a request gets 413 / 429 / RESOURCE_EXHAUSTED with a message,
never a crash, and the next request is served."""

from __future__ import annotations

import grpc
import httpx
import pytest
from services import Service, start_all

from protos import gateway_pb2, gateway_pb2_grpc

MODEL = "tiny-qwen3"
ENGINE = ("--page-size", "4", "--kv-cache-mib", "16")


@pytest.fixture(scope="module")
def limited(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("limit_logs")
    prefill, full_prefill, decode = start_all(
        [("prefill", tiny_model, ENGINE), ("prefill", tiny_model, (*ENGINE, "--max-queued-requests", "0")),
         ("decode", tiny_model, ENGINE)],
        logs,
    )  # fmt: skip
    gw = Service(
        "gateway", tiny_model, "--served-model-name", MODEL, "--prefill", full_prefill.address,
        "--prefill", prefill.address, "--decode", decode.address, "--prefill-policy", "round_robin",
        "--max-request-bytes", "4096", "--max-prompt-tokens", "200", "--max-concurrent-requests", "2",
        log_dir=logs,
    ).wait_ready()  # fmt: skip
    yield {"gateway": gw, "decode": decode, "prefill": prefill}
    for s in (gw, prefill, full_prefill, decode):
        s.stop()


def post(gw: Service, **kwargs) -> httpx.Response:
    return httpx.post(f"{gw.http_url}/v1/completions", timeout=60, **kwargs)


def served(gw: Service) -> bool:
    return post(gw, json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}).status_code == 200


def test_body_over_the_limit_is_413_with_or_without_content_length(limited):
    gw = limited["gateway"]
    big = {"model": MODEL, "prompt": "word " * 2000, "max_tokens": 2}
    r = post(gw, json=big)
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    chunked = post(gw, content=iter([b'{"model": "tiny-qwen3", "prompt": "', b"x" * 5000, b'"}']),
                   headers={"content-type": "application/json"})  # fmt: skip
    assert chunked.status_code == 413
    assert served(gw)


def test_prompt_over_the_token_limit_is_413_naming_prompt(limited):
    r = post(limited["gateway"], json={"model": MODEL, "prompt": list(range(250)), "max_tokens": 2})
    assert r.status_code == 413 and r.json()["error"]["param"] == "prompt"
    assert served(limited["gateway"])


def test_concurrency_over_the_limit_is_429(limited):
    gw = limited["gateway"]
    client = httpx.Client(timeout=60)
    held, lines = [], []
    try:
        for i in range(2):
            body = {"model": MODEL, "prompt": [9, i], "max_tokens": 4000, "ignore_eos": True, "stream": True}
            r = client.send(
                client.build_request("POST", f"{gw.http_url}/v1/completions", json=body), stream=True
            )
            lines.append(r.iter_lines())
            next(lines[-1])
            held.append(r)
        third = post(gw, json={"model": MODEL, "prompt": [1], "max_tokens": 2})
        assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
    finally:
        for r in held:
            r.close()
        client.close()
    limited["decode"].wait_idle()
    assert served(gw)


def test_grpc_message_over_the_limit_is_resource_exhausted(limited):
    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(limited["gateway"].address))
    with pytest.raises(grpc.RpcError) as err:
        # the size alone (an oversized model name): nothing of it is tokenized or validated
        list(stub.Generate(gateway_pb2.GatewayGenerateRequest(model="m" * 10000, text="x"), timeout=30))
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served(limited["gateway"])


def test_a_full_prefill_queue_refuses_and_the_gateway_goes_to_another(limited):
    gw = limited["gateway"]
    assert all(served(gw) for _ in range(4))  # round robin sends half to the full prefill: all retried
    metrics = httpx.get(f"{gw.http_url}/metrics", timeout=30).text
    assert 'pdserve_routing_retries_total{reason="full",role="prefill"}' in metrics
    limited["prefill"].wait_idle()
