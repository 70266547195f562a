"""Fault injection on real processes: instances killed mid-stream and mid-transfer, deadlines in
every phase, a stalled KV link, a restarted instance rejoining, and the server-side limits.

Every case asserts what a user and an operator would see: a clear status within a stated bound,
the survivors still serving, every surviving instance back to idle (its own load report: no page
held, nothing running), and the gateway's health and metrics reflecting the fault.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import httpx
import pytest
from services import Service, start_all

from gateway.client import Client
from protos import gateway_pb2, gateway_pb2_grpc

MODEL = "tiny-qwen3"
# Small chunks make a long prompt's prefill take a while on CPU (a deadline can land inside it).
ENGINE = ("--page-size", "4", "--max-num-batched-tokens", "4", "--kv-cache-mib", "16")
_LONG_PROMPTS = iter(range(1000))


def long_prompt() -> list[int]:
    """4000 tokens (~1000 prefill steps), each call a different first token: never a cache hit."""
    return [next(_LONG_PROMPTS)] + [(7 * i) % 1000 for i in range(3999)]


@pytest.fixture(scope="module")
def core(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("fault_logs")
    prefill, decode = start_all([("prefill", tiny_model, ENGINE), ("decode", tiny_model, ENGINE)], logs)
    yield {"prefill": prefill, "decode": decode, "logs": logs, "model": tiny_model}
    prefill.stop()
    decode.stop()


def instance(core, role: str, *args: str) -> Service:
    return Service(role, core["model"], *ENGINE, *args, log_dir=core["logs"]).wait_ready()


def gateway(core, prefill: list[Service], decode: list[Service], *args: str, ready: bool = True) -> Service:
    routes = [a for s in prefill for a in ("--prefill", s.address)]
    routes += [a for s in decode for a in ("--decode", s.address)]
    gw = Service("gateway", core["model"], "--served-model-name", MODEL, *routes, *args, log_dir=core["logs"])
    return gw.wait_ready() if ready else gw.wait_listening()


def health(gw: Service) -> dict:
    return httpx.get(f"{gw.http_url}/health", timeout=10).json()


def wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def complete(gw: Service, prompt, max_tokens: int = 4, **extra) -> httpx.Response:
    """Greedy and EOS-blind, so a successful request always returns exactly `max_tokens` tokens."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body.update(extra)
    return httpx.post(f"{gw.http_url}/v1/completions", json=body, timeout=60)


def test_decode_killed_mid_stream(core):
    victim = instance(core, "decode")
    gw = gateway(core, [core["prefill"]], [core["decode"], victim], "--decode-policy", "round_robin")
    try:
        client = httpx.Client(timeout=60)
        streams = []
        for i in range(2):  # round robin: one stream on each decode
            body = {"model": MODEL, "prompt": [5, i], "max_tokens": 800, "ignore_eos": True, "stream": True}
            r = client.send(
                client.build_request("POST", f"{gw.http_url}/v1/completions", json=body), stream=True
            )
            lines = r.iter_lines()
            next(lines)
            streams.append((r, lines))
        assert victim.load().num_running == 1 and core["decode"].load().num_running == 1
        errors: list[tuple[float, dict]] = []
        readers = [
            threading.Thread(target=_first_error, args=(lines, errors), daemon=True) for _, lines in streams
        ]
        for t in readers:
            t.start()
        start = time.monotonic()
        victim.proc.kill()
        wait_for(lambda: errors, 15, "the stream on the killed decode ends with an error event")
        for t in readers:
            t.join(timeout=30)  # the surviving stream runs to its end (a few seconds)
        for r, _ in streams:
            r.close()
        client.close()
        assert len(errors) == 1 and errors[0][1]["type"] == "service_unavailable", errors
        assert errors[0][0] - start < 15
        address = victim.address
        wait_for(lambda: not health(gw)["decode"][address], 10, "gateway ejects the dead decode")
        metrics = httpx.get(f"{gw.http_url}/metrics", timeout=10).text
        assert f'pdserve_instance_healthy{{address="{address}",role="decode"}} 0.0' in metrics
        assert health(gw)["ready"]  # a healthy pair remains
        assert all(complete(gw, [6, i]).status_code == 200 for i in range(4))
        core["decode"].wait_idle()
        core["prefill"].wait_idle()
    finally:
        gw.stop()
        victim.stop()


def _first_error(lines, errors: list) -> None:
    """Read a stream until an error event (recorded with its arrival time) or its end."""
    try:
        for line in lines:
            if line.startswith('data: {"error"'):
                errors.append((time.monotonic(), json.loads(line[6:])["error"]))
                return
            if line == "data: [DONE]":
                return
    except httpx.HTTPError:
        return  # closed by the test


def test_prefill_killed_mid_transfer_is_retried_elsewhere(core):
    slow = instance(core, "prefill", "--kv-fault-delay-ms", "3000")
    gw = gateway(core, [slow, core["prefill"]], [core["decode"]], "--prefill-policy", "round_robin")
    try:
        result: dict = {}
        thread = None
        for attempt in range(3):  # round robin alternates; go until a request lands on the slow one
            thread = threading.Thread(target=lambda a=attempt: result.update(r=complete(gw, [9, a], 3)))
            thread.start()
            try:
                wait_for(
                    lambda: slow.load().num_pending_transfers > 0, 2, "transfer starts on the slow prefill"
                )
                break
            except AssertionError:
                thread.join(timeout=30)
        else:
            pytest.fail("no request went to the slow prefill")
        assert core["decode"].load().num_held_pages > 0
        slow.proc.kill()
        thread.join(timeout=30)
        assert result["r"].status_code == 200, result["r"].text  # retried on the healthy prefill
        assert result["r"].json()["usage"]["completion_tokens"] == 3
        core["decode"].wait_idle()
        core["prefill"].wait_idle()
        address = slow.address
        wait_for(lambda: not health(gw)["prefill"][address], 10, "gateway ejects the dead prefill")
        assert (
            'pdserve_routing_retries_total{reason="unavailable",role="prefill"}'
            in httpx.get(f"{gw.http_url}/metrics").text
        )
    finally:
        gw.stop()
        slow.stop()


@pytest.fixture(scope="module")
def long_prefill_s(core) -> float:
    """How long a long_prompt() prefill takes here: deadlines below are fractions of it, so they land
    inside the phase on any machine speed."""
    gw = gateway(core, [core["prefill"]], [core["decode"]])
    try:
        start = time.monotonic()
        Client(gw.address, timeout_s=120).generate(long_prompt(), max_tokens=1)
        return time.monotonic() - start
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("phase", "prompt", "max_tokens", "fraction"),
    [
        ("prefill queue", [1, 2, 3], 2, 0.3),  # waits behind a long prompt that holds the token budget
        ("prefill", None, 1, 0.3),
        ("decode", [4, 5], 4000, None),  # ~15 s of decoding; 1 s deadline
    ],
)
def test_deadline_in_each_phase(core, long_prefill_s, phase, prompt, max_tokens, fraction):
    prompt = prompt or long_prompt()
    assert long_prefill_s > 0.3, (
        f"the long prefill takes only {long_prefill_s:.2f}s: no room for a deadline in it"
    )
    timeout_s = long_prefill_s * fraction if fraction else 1.0
    gw = gateway(core, [core["prefill"]], [core["decode"]])
    blocker = None
    try:
        if phase == "prefill queue":
            blocker = threading.Thread(
                target=lambda: Client(gw.address, timeout_s=60).generate(long_prompt(), max_tokens=1)
            )
            blocker.start()
            wait_for(lambda: core["prefill"].load().num_running > 0, 5, "the long prompt is prefilling")
        stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(gw.address))
        request = gateway_pb2.GatewayGenerateRequest(
            token_ids=gateway_pb2.TokenIds(ids=prompt), timeout_s=timeout_s
        )
        request.sampling.max_tokens, request.sampling.ignore_eos = max_tokens, True
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=30))
        assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        assert time.monotonic() - start < timeout_s + 3
        if blocker is not None:
            blocker.join(timeout=60)
        core["decode"].wait_idle()
        core["prefill"].wait_idle()
        assert complete(gw, [7, 7]).status_code == 200
    finally:
        gw.stop()


def test_stalled_kv_link_times_out_with_504_and_frees_everything(core):
    stalled = instance(core, "prefill", "--kv-fault-delay-ms", "600000")  # never gets to send data
    gw = gateway(
        core, [stalled], [core["decode"]], "--request-timeout-s", "2", ready=False
    )  # no canary passes
    try:
        start = time.monotonic()
        r = complete(gw, [3, 1, 4], 3)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        assert time.monotonic() - start < 6
        assert (
            'pdserve_requests_total{api="completions",status="504"}'
            in httpx.get(f"{gw.http_url}/metrics").text
        )
        assert health(gw)["ready"] is False  # its canary cannot pass either
    finally:
        gw.stop()  # its canary keeps trying; stopping it cancels that too
        try:
            core["decode"].wait_idle()
            stalled.wait_idle()
        finally:
            stalled.stop()


def test_streaming_client_leaving_before_the_first_token_frees_everything(core):
    slow = instance(core, "prefill", "--kv-fault-delay-ms", "5000")  # the first token is 5+ s away
    gw = gateway(core, [slow], [core["decode"]], ready=False)
    try:
        body = {"model": MODEL, "prompt": [2, 7, 1, 8], "max_tokens": 3, "stream": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{gw.http_url}/v1/completions", json=body, timeout=1.0)
        cancelled = 'pdserve_requests_total{api="completions",status="cancelled"}'
        wait_for(lambda: cancelled in httpx.get(f"{gw.http_url}/metrics").text, 2, "the gateway cancels it")
    finally:
        gw.stop()  # also ends its canary, which waits on the same slow prefill
    try:
        core["decode"].wait_idle(timeout_s=3)  # long before the 5 s transfer could have finished
        slow.wait_idle(timeout_s=3)
    finally:
        slow.stop()


def test_restarted_decode_rejoins(core):
    with socket.socket() as s:  # a fixed port, so the restarted process answers at the same address
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    victim = _decode_on(core, port)
    gw = gateway(core, [core["prefill"]], [core["decode"], victim], "--decode-policy", "round_robin")
    try:
        victim.proc.kill()
        victim.stop()
        address = victim.address
        wait_for(lambda: not health(gw)["decode"][address], 10, "ejection")
        assert all(complete(gw, [8, i]).status_code == 200 for i in range(2))  # served by the survivor
        reborn = _decode_on(core, port)
        try:
            wait_for(lambda: health(gw)["decode"][address], 10, "re-admission")
            assert all(complete(gw, [9, i]).status_code == 200 for i in range(4))
            assert reborn.load().kv_bytes_transferred > 0  # it takes traffic again
        finally:
            reborn.stop()
    finally:
        gw.stop()


def _decode_on(core, port: int) -> Service:
    return Service("decode", core["model"], *ENGINE, log_dir=core["logs"], port=port).wait_ready()
