"""Hostile clients against a real gateway → prefill → decode on loopback: huge prompts, text that
is not Unicode, garbage gRPC, slow and huge HTTP headers, bodies the framework cannot parse.

Each case asserts the status and the OpenAI error envelope, and the suite as a whole that a normal
request next to the attack stays fast, that the gateway's memory stays bounded, that logs hold no
traceback and at most one line per flood, and that every KV page is back afterwards. Oracles: the
gateway's /proc status (RSS, peak RSS), raw sockets and raw gRPC bytes (no pdserve client code).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from services import Service, start_all

API_KEY = "sk-hostile-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "tiny-qwen3"
MAX_PROMPT_TOKENS = 1000
HEADER_TIMEOUT_S = 10.0  # the gateway's default (GatewayConfig.http)


@pytest.fixture(scope="module")
def hostile(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("hostile_logs")
    key_file = logs / "key"
    key_file.write_text(API_KEY)
    engine = ("--page-size", "4", "--kv-cache-mib", "16")
    prefill, decode = start_all([("prefill", tiny_model, engine), ("decode", tiny_model, engine)], logs)
    gw = Service(
        "gateway", tiny_model, "--served-model-name", MODEL, "--prefill", prefill.address,
        "--decode", decode.address, "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
        "--api-key-file", str(key_file), log_dir=logs,
    )  # fmt: skip
    try:
        gw.wait_ready()
        assert normal_request_s(gw) < 5  # warm
        yield {"gateway": gw, "prefill": prefill, "decode": decode, "rss_start": status_kib(gw, "VmRSS")}
    finally:
        for s in (gw, prefill, decode):
            s.stop()


def status_kib(service: Service, field: str) -> int:
    for line in Path(f"/proc/{service.proc.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{service.proc.pid}/status")


def post(gw: Service, path: str = "/v1/completions", **kwargs) -> httpx.Response:
    headers = AUTH | {"content-type": "application/json"} | kwargs.pop("headers", {})
    return httpx.post(f"{gw.http_url}{path}", headers=headers, timeout=30, **kwargs)


def normal_request_s(gw: Service) -> float:
    start = time.monotonic()
    r = post(gw, json={"model": MODEL, "prompt": "hello there", "max_tokens": 2})
    assert r.status_code == 200, r.text
    return time.monotonic() - start


def assert_envelope(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] is None or isinstance(error["code"], str), error  # OpenAI's: a string or null
    if param is not None:
        assert error["param"] == param, error
    return error


def test_huge_prompts_are_refused_fast_in_bounded_memory_while_others_are_served(hostile):
    gw = hostile["gateway"]
    body = json.dumps({"model": MODEL, "prompt": "lorem ipsum " * 333_000, "max_tokens": 2}).encode()
    assert len(body) > 3_900_000  # just under the 4 MiB body limit
    peak_before = status_kib(gw, "VmHWM")
    start = time.monotonic()
    assert_envelope(post(gw, content=body, headers={"content-type": "application/json"}), 413, "prompt")
    assert time.monotonic() - start < 1.0
    assert status_kib(gw, "VmHWM") - peak_before < 50 * 1024

    with ThreadPoolExecutor(9) as pool:
        big = [
            pool.submit(post, gw, content=body, headers={"content-type": "application/json"})
            for _ in range(8)
        ]
        time.sleep(0.05)
        assert pool.submit(normal_request_s, gw).result() < 1.0
        for f in big:
            assert_envelope(f.result(), 413, "prompt")
    # the chat route bounds the conversation's text before its template runs
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "ab " * 1_000_000}]}
    assert_envelope(post(gw, "/v1/chat/completions", json=chat), 413, "messages")


def test_text_that_is_not_unicode_is_400_naming_the_field(hostile):
    gw = hostile["gateway"]
    bad = "hi \ud800 there"  # valid JSON ("\\ud800"), but not encodable text
    user = {"role": "user", "content": "hello"}
    cases = [
        ("/v1/completions", {"prompt": bad}, "prompt"),
        ("/v1/completions", {"prompt": [bad]}, "prompt"),
        ("/v1/completions", {"prompt": "ok", "stop": bad}, "stop"),
        ("/v1/completions", {"prompt": "ok", "stop": ["x", bad]}, "stop"),
        ("/v1/completions", {"prompt": "ok", "user": bad}, "user"),
        ("/v1/completions", {"prompt": "ok", "logit_bias": {bad: 1.0}}, "logit_bias"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": bad}]}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [user, {"role": "user", "content": [{"type": "text", "text": bad}]}]},
         "messages.1.content"),
        ("/v1/chat/completions", {"messages": [user], "stop": [bad]}, "stop"),
    ]  # fmt: skip
    for path, fields, param in cases:
        r = post(gw, path, content=json.dumps({"model": MODEL, **fields}).encode())
        error = assert_envelope(r, 400)
        assert error["param"].startswith(param), (fields, error)
    r = post(gw, content=json.dumps({"model": bad, "prompt": "ok"}).encode())
    assert_envelope(r, 400, "model")
    assert normal_request_s(gw) < 5


def test_bodies_and_paths_the_framework_refuses_answer_in_the_envelope(hostile):
    gw = hostile["gateway"]
    raw = {
        "deep nesting": b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "invalid UTF-8": b'{"model": "m", "prompt": "\xff\xfe"}',
        "huge number": b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
        "not JSON": b"{{{",
        "empty": b"",
    }
    for name, content in raw.items():
        r = post(gw, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, name
        assert_envelope(r, 400)
    assert_envelope(httpx.get(f"{gw.http_url}/v1/nothing", headers=AUTH, timeout=30), 404)
    assert_envelope(httpx.get(f"{gw.http_url}/v1/completions", headers=AUTH, timeout=30), 405)
    assert_envelope(httpx.put(f"{gw.http_url}/health", timeout=30), 405)
    assert_envelope(httpx.get(f"{gw.http_url}/v1/models", timeout=30), 401)  # no key
    assert "x-request-id" in httpx.get(f"{gw.http_url}/v1/nothing", headers=AUTH, timeout=30).headers


def _raw_http(gw: Service, request: bytes, timeout_s: float = 30) -> bytes:
    host, port = gw.http_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_huge_headers_are_431_and_garbage_is_400_in_the_envelope(hostile):
    gw = hostile["gateway"]
    for size in (64 << 10, 1 << 20):
        r = httpx.get(f"{gw.http_url}/v1/models", headers=AUTH | {"x-filler": "a" * size}, timeout=30)
        assert_envelope(r, 431)
    many = {f"x-h{i}": "b" * 100 for i in range(700)}  # many small ones add up the same
    assert_envelope(httpx.get(f"{gw.http_url}/health", headers=many, timeout=30), 431)
    reply = _raw_http(gw, b"NOT HTTP AT ALL\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert normal_request_s(gw) < 5


def test_slow_headers_and_idle_keep_alive_are_cut_off(hostile):
    """Slowloris sockets (a header line every second, never finished) are answered 408 and closed
    within the header timeout; an idle keep-alive connection is closed after the keep-alive bound;
    a normal request meanwhile is served as usual."""
    gw = hostile["gateway"]
    host, port = gw.http_url.removeprefix("http://").rsplit(":", 1)
    outcomes: list[tuple[float, bytes]] = []  # (seconds until closed, what the server sent)
    lock = threading.Lock()

    def slowloris() -> None:
        with socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT_S + 10) as s:
            start = time.monotonic()
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(1.0)
            reply = b""
            try:
                while time.monotonic() - start < HEADER_TIMEOUT_S + 8:
                    s.sendall(b"X-a: b\r\n")
                    try:
                        chunk = s.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    reply += chunk
            except OSError:  # reset: the server closed first
                pass
            with lock:
                outcomes.append((time.monotonic() - start, reply))

    threads = [threading.Thread(target=slowloris) for _ in range(20)]
    for t in threads:
        t.start()
    with socket.create_connection((host, int(port)), timeout=30) as idle:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1)
        assert idle.recv(65536).startswith(b"HTTP/1.1 ")
        start = time.monotonic()
        idle.settimeout(30)
        while idle.recv(65536):
            pass
        assert time.monotonic() - start < 8  # keep-alive bound 5 s
    assert normal_request_s(gw) < 2
    for t in threads:
        t.join(timeout=HEADER_TIMEOUT_S + 20)
    assert len(outcomes) == 20
    assert max(t for t, _ in outcomes) < HEADER_TIMEOUT_S + 3, outcomes
    assert all(reply.startswith(b"HTTP/1.1 408") or not reply for _, reply in outcomes), outcomes


def _garbage_calls(address: str, method: str, n: int, metadata=(), stream: bool = False) -> set:
    codes = set()
    with grpc.insecure_channel(address) as channel:
        if stream:
            call = channel.stream_unary(method)  # identity (de)serializers: raw bytes on the wire
            for _ in range(n):
                try:
                    call(iter([b"\xff\xff\xff garbage"]), timeout=10, metadata=metadata)
                except grpc.RpcError as e:
                    codes.add(e.code())
        else:
            call = channel.unary_stream(method)
            for _ in range(n):
                try:
                    list(call(b"\xff\xff\xff garbage", timeout=10, metadata=metadata))
                except grpc.RpcError as e:
                    codes.add(e.code())
    return codes


def test_garbage_grpc_is_refused_with_one_log_line_and_the_key_checked_first(hostile):
    gw, prefill, decode = hostile["gateway"], hostile["prefill"], hostile["decode"]
    before = {s: len(s.log_path.read_text(errors="replace").splitlines()) for s in (gw, prefill, decode)}
    generate = "/pdserve.v1.GatewayService/Generate"
    assert _garbage_calls(gw.address, generate, 50) == {grpc.StatusCode.UNAUTHENTICATED}
    auth = (("authorization", f"Bearer {API_KEY}"),)
    assert _garbage_calls(gw.address, generate, 50, auth) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert _garbage_calls(decode.address, "/pdserve.v1.DecodeService/Generate", 50) == {
        grpc.StatusCode.INVALID_ARGUMENT
    }
    assert _garbage_calls(prefill.address, "/pdserve.v1.PrefillService/Prefill", 50) == {
        grpc.StatusCode.INVALID_ARGUMENT
    }
    assert _garbage_calls(decode.address, "/pdserve.v1.KVTransfer/PushKV", 50, stream=True) == {
        grpc.StatusCode.INVALID_ARGUMENT
    }
    time.sleep(0.5)
    for service, lines in before.items():
        new = service.log_path.read_text(errors="replace").splitlines()[lines:]
        assert "Traceback" not in "\n".join(new), service.role
        assert len([line for line in new if "malformed" in line]) <= 1, (service.role, new)
    assert normal_request_s(gw) < 5


def test_afterwards_pages_are_back_memory_is_bounded_and_logs_are_clean(hostile):
    gw, prefill, decode = hostile["gateway"], hostile["prefill"], hostile["decode"]
    assert normal_request_s(gw) < 5
    for service in (prefill, decode):
        service.wait_idle()
    metrics = httpx.get(f"{gw.http_url}/metrics", timeout=30).text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the gateway's view follows its health checks
        used = [line for line in metrics.splitlines() if line.startswith("pdserve_instance_kv_pages_used{")]
        if used and all(line.endswith(" 0.0") for line in used):
            break
        time.sleep(0.5)
        metrics = httpx.get(f"{gw.http_url}/metrics", timeout=30).text
    assert used and all(line.endswith(" 0.0") for line in used), used
    cached = [line for line in metrics.splitlines() if line.startswith("pdserve_instance_kv_pages_cached{")]
    assert any(not line.endswith(" 0.0") for line in cached), cached  # prompts were cached
    assert status_kib(gw, "VmRSS") - hostile["rss_start"] < 100 * 1024
    for service in (gw, prefill, decode):
        assert "Traceback" not in service.log(), service.role
