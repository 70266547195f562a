"""The gateway as users reach it: the official `openai` SDK, raw SSE, the gRPC stubs and client,
routing over two prefill and two decode instances, bad input, health and metrics, the load test.

Oracles: the single-process engine (``LLM``) for tokens and text; the instances' own load reports
and prefix-cache hits for where requests went; HTTP / gRPC status codes for errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from services import REPO, Service, prefix_group_hits, start_all

from engine import LLM, SamplingParams
from gateway.client import AsyncClient, Client
from protos import common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from protos.convert import sampling_to_proto

openai = pytest.importorskip("openai")

ENGINE = ("--page-size", "4", "--max-num-batched-tokens", "32", "--kv-cache-mib", "16")
MODEL = "tiny-qwen3"
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def instances(tiny_model, tmp_path_factory):
    """Two prefill, two decode, and a decode that holds one sequence at a time."""
    logs = tmp_path_factory.mktemp("gw_logs")
    specs = [("prefill", tiny_model, ENGINE)] * 2 + [("decode", tiny_model, ENGINE)] * 2
    specs.append(("decode", tiny_model, (*ENGINE, "--max-num-seqs", "1")))
    services = start_all(specs, logs)
    yield {"prefill": services[:2], "decode": services[2:4], "one_seq": services[4], "logs": logs}
    for s in services:
        s.stop()


def start_gateway(instances, tiny_model, *args, prefill=None, decode=None) -> Service:
    routes = []
    for s in prefill or instances["prefill"]:
        routes += ["--prefill", s.address]
    for s in decode or instances["decode"]:
        routes += ["--decode", s if isinstance(s, str) else s.address]
    gw = Service("gateway", tiny_model, "--served-model-name", MODEL, *routes, *args,
                 log_dir=instances["logs"])  # fmt: skip
    try:
        return gw.wait_ready()
    except BaseException:
        gw.stop()
        raise


@pytest.fixture(scope="module")
def gateway(instances, tiny_model):
    gw = start_gateway(instances, tiny_model)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LLM(str(tiny_model), page_size=4, max_num_batched_tokens=32, kv_cache_bytes=16 << 20)


def sdk(gw: Service):
    return openai.OpenAI(base_url=f"{gw.http_url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def test_openai_sdk_completions_match_the_engine(gateway, reference):
    client = sdk(gateway)
    prompt = "The lighthouse keeper counted the ships"
    ref = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=12, logprobs=2))[0]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids) and out.usage.completion_tokens == len(
        ref.token_ids
    )
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(
        [lp.logprob for lp in ref.logprobs], abs=1e-4
    )
    streamed = client.completions.create(
        model=MODEL, prompt=ref.prompt_token_ids, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_openai_sdk_chat_streams_what_it_returns(gateway, reference):
    client = sdk(gateway)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    template = reference.tokenizer.apply_chat_template(messages)
    ids = reference.tokenizer.encode(template, add_special_tokens=False)
    ref = reference.generate([ids], SamplingParams(temperature=0, max_tokens=10))[0]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    seeded = [
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0.9, seed=7)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_sse_wire_format_and_stop_strings(gateway, reference):
    ref = reference.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=20))[0]
    stop = ref.text[6:9]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0, "stream": True,
            "stop": [stop], "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{gateway.http_url}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    if stop.strip() and stop in ref.text:
        assert text == ref.text[: ref.text.index(stop)]
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] > 0


def test_stream_interval_sends_fewer_larger_events_with_the_same_text(instances, tiny_model, reference):
    """--stream-interval 4: the first token at once, then events of at least 4 tokens (the last may
    be shorter); the text, logprobs and usage are those of the unbatched stream."""
    prompt = "The lighthouse keeper counted"
    ref = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=14, logprobs=1))[0]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 14, "temperature": 0, "stream": True, "logprobs": 1,
            "stream_options": {"include_usage": True}}  # fmt: skip
    gw = start_gateway(instances, tiny_model, "--stream-interval", "4")
    try:
        with httpx.stream("POST", f"{gw.http_url}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    finally:
        gw.stop()
    choices = [e["choices"][0] for e in events if e["choices"]]
    sizes = [len(c["logprobs"]["tokens"]) for c in choices]
    assert sizes[0] == 1 and all(n >= 4 for n in sizes[1:-1]) and sum(sizes) == 14, sizes
    assert len(choices) <= 1 + -(-13 // 4)
    assert "".join(c["text"] for c in choices) == ref.text
    logprobs = [lp for c in choices for lp in c["logprobs"]["token_logprobs"]]
    assert logprobs == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-4)
    assert choices[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 14


def test_grpc_stubs_and_client(gateway, reference):
    prompt = list(range(40, 70))
    ref = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=9))[0]
    with Client(gateway.address, timeout_s=TIMEOUT_S) as client:
        out = client.generate(prompt, max_tokens=9, temperature=0)
        assert out.token_ids == ref.token_ids and out.text == ref.text and out.finish_reason == "length"
        assert client.models() == [MODEL]
        text_out = client.generate("The lighthouse keeper", max_tokens=5, temperature=0)
        assert text_out.prompt_tokens == len(reference.tokenizer.encode("The lighthouse keeper"))

    async def concurrently():
        async with AsyncClient(gateway.address, timeout_s=TIMEOUT_S) as client:
            return await asyncio.gather(
                *(client.generate(prompt, max_tokens=9, temperature=0) for _ in range(4))
            )

    assert all(o.token_ids == ref.token_ids for o in asyncio.run(concurrently()))
    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(gateway.address))
    bad = gateway_pb2.GatewayGenerateRequest(text="x", sampling=common_pb2.SamplingParams(top_p=2.0))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(bad, timeout=TIMEOUT_S))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details()


BAD_INPUTS = [
    ("not json", None, None),
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens", None),
    ({"model": MODEL, "prompt": ""}, "prompt", None),
    ({"model": MODEL, "prompt": []}, "prompt", None),
    ({"model": MODEL, "prompt": [1] * 5000}, "prompt", None),
    ({"model": MODEL, "prompt": [10**7]}, "prompt", None),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens", None),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, "max_tokens", None),
    ({"prompt": "x"}, "model", None),
    ({"model": MODEL, "prompt": "x", "temperature": 3}, "temperature", None),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p", None),
    ({"model": MODEL, "prompt": "x", "n": 2}, "n", None),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 3}, "presence_penalty", None),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias.abc", None),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"1": 101}}, "logit_bias.1", None),
    ({"model": MODEL, "prompt": "x", "logit_bias": {str(10**6): 1}}, "logit_bias", None),
    ({"model": MODEL, "prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens", None),
    ({"model": MODEL, "prompt": "x", "min_p": 2}, "min_p", None),
    ({"model": MODEL, "prompt": "x", "repetition_penalty": 0}, "repetition_penalty", None),
    ({"model": MODEL, "prompt": "x", "logprobs": 50}, "logprobs", None),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"model": MODEL, "prompt": ["a", "b"]}, "prompt", None),
    ({"model": MODEL, "prompt": "x", "top_k": 2**32}, "top_k", None),  # beyond what the protos carry
    ({"model": MODEL, "prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids.0", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_k": 2738634775}, "top_k", "chat"),
    ({"model": MODEL, "messages": []}, "messages", "chat"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "chat"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 99},
        "top_logprobs",
        "chat",
    ),
]


@pytest.mark.parametrize(("body", "param", "api"), BAD_INPUTS)
def test_bad_input_is_400_naming_the_parameter(gateway, body, param, api):
    url = f"{gateway.http_url}/v1/{'chat/completions' if api == 'chat' else 'completions'}"
    if isinstance(body, str):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=TIMEOUT_S)
    else:
        r = httpx.post(url, json=body, timeout=TIMEOUT_S)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] in ("invalid_request_error", "not_found_error") and error["message"]
    assert error["param"] == param
    ok = httpx.post(
        f"{gateway.http_url}/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 2},
        timeout=TIMEOUT_S,
    )
    assert ok.status_code == 200


def test_health_and_metrics(gateway, instances):
    health = httpx.get(f"{gateway.http_url}/health", timeout=TIMEOUT_S)
    assert health.status_code == 200 and health.json()["ready"] and health.json()["canary"] == "passed"
    httpx.post(
        f"{gateway.http_url}/v1/completions",
        json={"model": MODEL, "prompt": "metrics", "max_tokens": 3},
        timeout=TIMEOUT_S,
    )
    text = httpx.get(f"{gateway.http_url}/metrics", timeout=TIMEOUT_S).text
    assert 'pdserve_requests_total{api="completions",status="ok"}' in text
    assert 'pdserve_requests_total{api="completions",status="400"}' in text  # the bad-input table ran first
    assert "pdserve_prompt_tokens_total" in text and "pdserve_prompt_tokens_total 0.0" not in text
    for name in ("pdserve_time_to_first_token_seconds_count", "pdserve_e2e_request_latency_seconds_count",
                 "pdserve_kv_transfer_seconds_count", "pdserve_requests_in_flight"):  # fmt: skip
        assert name in text
    for s in instances["decode"]:
        assert f'pdserve_instance_healthy{{address="{s.address}",role="decode"}} 1.0' in text
    assert "pdserve_kv_transfer_bytes_total" in text
    counts = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.endswith("_count")
    }
    # Every completed request so far went through prefill: each left a transfer and a hidden part.
    assert (
        counts["pdserve_kv_transfer_hidden_seconds_count"] == counts["pdserve_kv_transfer_seconds_count"] >= 1
    )


def hold_streams(gw: Service, n: int) -> tuple[list, list]:
    """Start ``n`` long streamed completions and read the first event of each; returns the open
    responses (and their line iterators, which must stay referenced: dropping one closes its
    response) so the caller can check where they run, then close them (the client going away)."""
    client = httpx.Client(timeout=TIMEOUT_S)
    responses, lines = [], []
    for i in range(n):
        body = {
            "model": MODEL,
            "prompt": [100 + i, 7, 8, 9],
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
        }
        r = client.send(client.build_request("POST", f"{gw.http_url}/v1/completions", json=body), stream=True)
        assert r.status_code == 200
        lines.append(r.iter_lines())
        next(lines[-1])
        responses.append(r)
    return responses, [client, lines]


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "power_of_two"])
def test_decode_policies_spread_concurrent_streams(instances, tiny_model, policy):
    gw = start_gateway(instances, tiny_model, "--decode-policy", policy)
    try:
        responses, clients = hold_streams(gw, 4)
        running = [d.load().num_running for d in instances["decode"]]
        for r in responses:
            r.close()
        clients[0].close()
        assert running == [2, 2], f"{policy} placed the streams as {running}"
        for d in instances["decode"]:
            d.wait_idle()  # closing the HTTP streams cancelled the decode work
    finally:
        gw.stop()


@pytest.mark.parametrize("policy", ["prefix_aware", "round_robin"])
def test_prefix_aware_prefill_routing_hits_the_cache(instances, tiny_model, policy):
    gw = start_gateway(instances, tiny_model, "--prefill-policy", policy)
    try:
        hits = prefix_group_hits(gw.http_url, MODEL, policy)
    finally:
        gw.stop()
    follow_ups = hits[3:]
    if policy == "prefix_aware":
        assert all(follow_ups), hits
    else:
        assert not all(follow_ups), "round robin should split some groups across the two prefills"


def _occupy(decode: Service, prefill: Service):
    """A long request straight to ``decode`` (through ``prefill``): its stream, to read and cancel."""
    params = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
    return decode_pb2_grpc.DecodeServiceStub(decode.channel).Generate(
        decode_pb2.GenerateRequest(
            prompt_token_ids=[5, 6, 7], prefill_address=prefill.address, sampling=sampling_to_proto(params)
        ),
        timeout=TIMEOUT_S,
    )


def test_a_request_waits_for_room_when_every_decode_is_full(instances, tiny_model):
    """The only decode holds one sequence and runs one: with --queue-timeout-s 0 a request is 429 at
    once; by default it waits, and is served once the running one ends."""
    one = instances["one_seq"]
    impatient = start_gateway(instances, tiny_model, "--queue-timeout-s", "0", decode=[one])
    patient = start_gateway(instances, tiny_model, decode=[one])
    busy = _occupy(one, instances["prefill"][0])
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
    try:
        next(busy)
        assert one.load().num_running == 1
        refused = httpx.post(f"{impatient.http_url}/v1/completions", json=body, timeout=TIMEOUT_S)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        threading.Timer(1.0, busy.cancel).start()  # room in a second
        start = time.monotonic()
        served = httpx.post(f"{patient.http_url}/v1/completions", json=body, timeout=TIMEOUT_S)
        assert served.status_code == 200, served.text
        assert 0.8 < time.monotonic() - start < 20
        assert served.json()["usage"]["completion_tokens"] == 2
    finally:
        busy.cancel()
        impatient.stop()
        patient.stop()
    one.wait_idle()


def test_full_decode_refuses_and_the_gateway_retries_elsewhere(instances, tiny_model):
    one = instances["one_seq"]
    gw = start_gateway(
        instances, tiny_model, "--decode-policy", "round_robin", decode=[one, instances["decode"][0]]
    )
    busy = _occupy(one, instances["prefill"][0])
    try:
        next(busy)
        with httpx.Client(timeout=TIMEOUT_S) as client:
            codes = [
                client.post(
                    f"{gw.http_url}/v1/completions",
                    json={"model": MODEL, "prompt": [1, 2, i], "max_tokens": 2},
                ).status_code
                for i in range(4)
            ]
            metrics = client.get(f"{gw.http_url}/metrics").text
        assert codes == [200] * 4
        assert 'pdserve_routing_retries_total{reason="full",role="decode"}' in metrics
    finally:
        busy.cancel()
        gw.stop()
    one.wait_idle()


def test_unreachable_instance_is_ejected_and_the_rest_serve(instances, tiny_model):
    gw = start_gateway(instances, tiny_model, decode=[instances["decode"][0], "127.0.0.1:1"])
    try:
        health = httpx.get(f"{gw.http_url}/health", timeout=TIMEOUT_S).json()
        assert health["ready"] and health["decode"] == {
            instances["decode"][0].address: True,
            "127.0.0.1:1": False,
        }
        with httpx.Client(timeout=TIMEOUT_S) as client:
            for i in range(3):
                r = client.post(
                    f"{gw.http_url}/v1/completions", json={"model": MODEL, "prompt": [3, i], "max_tokens": 2}
                )
                assert r.status_code == 200
    finally:
        gw.stop()


@pytest.mark.parametrize("backend", ["rest", "grpc"])
def test_load_test_reports_sane_numbers(gateway, instances, tmp_path, backend):
    target = (
        ["--base-url", gateway.http_url]
        if backend == "rest"
        else ["--grpc-address", gateway.address, "--model", MODEL]
    )
    cmd = [sys.executable, "-m", "pdserve", "bench", "--backend", backend, *target, "--num-requests", "12",
           "--warmup-requests", "2", "--input-len-min", "8", "--input-len-max", "40", "--output-len-min", "4",
           "--output-len-max", "12", "--request-rate", "20", "--max-concurrency", "6", "--max-duration-s", "60",
           "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--out-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    servers = {
        "gateway": gateway,
        **{f"{s.role}@{s.address}": s for s in instances["prefill"] + instances["decode"]},
    }
    cpu_before = {name: _cpu_seconds(s.proc.pid) for name, s in servers.items()}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=120, check=False)
    cpu_after = {name: _cpu_seconds(s.proc.pid) for name, s in servers.items()}
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    report = json.loads((tmp_path / "load_test.json").read_text())
    s = report["summary"]
    assert s["num_completed"] == 12 and s["num_failed"] == 0
    if backend == "rest":  # each server process's CPU per output token, against the kernel's count
        reported = s["server_cpu_us_per_token"]
        num_out = sum(r["output_tokens"] for r in report["requests"])
        assert "gateway" in reported and any(name.startswith("decode@") for name in reported), reported
        for name, us in reported.items():
            assert 0 <= us * num_out / 1e6 <= cpu_after[name] - cpu_before[name] + 0.05, (name, us)
        assert reported["gateway"] > 0
    else:
        assert s["server_cpu_us_per_token"] == {}  # no metrics URL over gRPC unless given
    assert (
        s["request_throughput"] > 0
        and s["output_token_throughput"] > 0
        and s["goodput"] == pytest.approx(s["request_throughput"])
    )
    assert 0 < s["ttft"]["median_ms"] <= s["e2e"]["median_ms"] <= s["e2e"]["p99_ms"]
    outputs = [r["output_tokens"] for r in report["requests"]]
    assert all(4 <= n <= 12 for n in outputs), outputs
    assert (tmp_path / "load_test.png").stat().st_size > 0


def _cpu_seconds(pid: int) -> float:
    """A process's CPU time (user + system) from /proc: the kernel's count, not ours."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_client_disconnect_mid_stream_frees_decode(gateway, instances):
    responses, clients = hold_streams(gateway, 2)
    assert sum(d.load().num_running for d in instances["decode"]) == 2
    for r in responses:
        r.close()
    clients[0].close()
    for d in instances["decode"] + instances["prefill"]:
        d.wait_idle()


def test_client_disconnect_on_a_non_streamed_request_frees_decode(gateway, instances):
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": True}  # ~15 s of decoding
    outcome: list = []

    def client():
        try:
            httpx.post(f"{gateway.http_url}/v1/completions", json=body, timeout=3.0)
        except httpx.ReadTimeout as e:
            outcome.append(e)

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 3
    while sum(d.load().num_running for d in instances["decode"]) == 0:  # it must really be decoding
        assert time.monotonic() < deadline, "the request never reached decode"
        time.sleep(0.02)
    thread.join(timeout=10)
    assert outcome, "the client should have given up (timeout) long before 4000 tokens"
    for d in instances["decode"]:
        d.wait_idle(timeout_s=5)  # far sooner than the ~15 s the request would have taken
    metrics = httpx.get(f"{gateway.http_url}/metrics", timeout=10).text
    assert 'pdserve_requests_total{api="completions",status="cancelled"}' in metrics


def test_sigterm_stops_the_gateway_gracefully(instances, tiny_model):
    gw = start_gateway(instances, tiny_model)
    gw.proc.terminate()
    assert gw.proc.wait(timeout=30) == 0
    assert "gateway stopped" in gw.log()
    gw.stop()


def test_gateway_keeps_serving_after_everything_above(gateway, reference):
    results, errors = [], []

    def one(i):
        try:
            r = httpx.post(f"{gateway.http_url}/v1/completions", json={"model": MODEL, "prompt": [9, 9, i], "max_tokens": 4,
                                                                        "temperature": 0}, timeout=TIMEOUT_S)  # fmt: skip
            results.append((i, r.json()["choices"][0]["text"]))
        except Exception as e:  # the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT_S)
    assert not errors
    expected = reference.generate([[9, 9, i] for i in range(6)], SamplingParams(temperature=0, max_tokens=4))
    assert sorted(results) == [(i, e.text) for i, e in enumerate(expected)]
