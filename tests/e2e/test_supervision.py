"""``pdserve up`` keeps serving when an instance dies or is restarted: the supervisor restarts the
child on its address, the gateway routes around it meanwhile and takes it back after a canary
through it, and requests sent once the gateway has noticed do not fail. Also the logs an operator
reads: an access line per request, periodic stats lines, every child's lines prefixed.

"Noticed" (detected) means: the gateway's /health lists the instance as not healthy. Requests
that were running on a killed instance may fail (their KV is gone); every request *started* after
detection must succeed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from test_up import up_process, wait_gone

from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from protos.convert import is_idle

START_TIMEOUT_S = 180
BACK_TIMEOUT_S = 90  # a killed instance restarts (backoff + model load) and passes its canary within this


@dataclass
class Up:
    """A running ``pdserve up``: its output (stdout and stderr, read as it comes) and addresses."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    base: str = ""

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout_s: float, after: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, f"pdserve up exited:\n{''.join(self.lines[-60:])}"
            time.sleep(0.1)
        pytest.fail(f"no line matching {pattern!r} within {timeout_s} s:\n{''.join(self.lines[-60:])}")

    def pid(self, name: str) -> int:
        pids = [
            int(m.group(1)) for line in self.lines if (m := re.search(rf"{name} started \(pid (\d+)\)", line))
        ]
        return pids[-1]

    def address(self, name: str) -> str:
        return self.wait_for(rf"^{name} \| pdserve \w+ listening on (\S+)", 5).group(1)

    def health(self) -> dict:
        r = httpx.get(f"{self.base}/health", timeout=10)
        return r.json() | {"http_status": r.status_code}

    def healthy(self, name: str) -> bool:
        role = name.split("-")[0]
        return self.health()[role][self.address(name)]

    def wait_health(self, predicate, timeout_s: float, what: str) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.health()):
                return time.monotonic()
            time.sleep(0.1)
        pytest.fail(f"{what} not within {timeout_s} s: {self.health()}")


@contextmanager
def running_up(tmp_path, *args: str, env: dict[str, str] | None = None) -> Iterator[Up]:
    extra = dict(env or {})
    os.environ.update(extra)  # up_process copies os.environ
    try:
        proc = up_process(
            tmp_path, "--kv-cache-mib", "32", "--log-stats-interval-s", "1", *args,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
    finally:
        for k in extra:
            os.environ.pop(k)
    up = Up(proc)
    threading.Thread(target=up.read, daemon=True).start()
    try:
        info = json.loads(up.wait_for(r'^\{.*"status": "up".*\}$', START_TIMEOUT_S).group(0))
        up.base = info["openai_base_url"].removesuffix("/v1")
        yield up
    finally:
        kids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True, check=False).stdout.split()]  # fmt: skip
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
        assert wait_gone(kids, 30) == [], "children left running"


class Load:
    """``num_workers`` threads sending completions back to back; every request's start time and outcome."""

    def __init__(self, base: str, num_workers: int = 3, max_tokens: int = 12) -> None:
        self.base, self.max_tokens = base, max_tokens
        self.results: list[tuple[float, int | str]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(num_workers)
        ]

    def _work(self, worker: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not self._stop.is_set():
                body = {
                    "model": "tiny-qwen3",
                    "prompt": f"worker {worker} request {i} says",
                    "max_tokens": self.max_tokens,
                }
                started = time.monotonic()
                try:
                    status: int | str = client.post(f"{self.base}/v1/completions", json=body).status_code
                except httpx.HTTPError as e:
                    status = repr(e)
                self.results.append((started, status))
                i += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def failed_since(self, t: float) -> list[tuple[float, int | str]]:
        return [(s, status) for s, status in self.results if s >= t and status != 200]


def load_report(address: str, role: str) -> common_pb2.LoadReport:
    with grpc.insecure_channel(address) as channel:
        stub_type = (
            decode_pb2_grpc.DecodeServiceStub if role == "decode" else prefill_pb2_grpc.PrefillServiceStub
        )
        return stub_type(channel).GetLoad(common_pb2.LoadRequest(), timeout=10)


def wait_all_idle(up: Up, names: list[str], timeout_s: float = 30) -> None:
    """Every instance back to its baseline: nothing running, held or in transfer; every page free
    or only held by the prefix cache."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while not is_idle(report := load_report(up.address(name), name.split("-")[0])):
            assert time.monotonic() < deadline, f"{name} not idle: {report}"
            time.sleep(0.2)


def test_kill_9_a_decode_and_a_prefill_under_load_loses_no_request_after_detection(tmp_path):
    names = ["prefill-0", "prefill-1", "decode-0", "decode-1"]
    victims = ["decode-0", "prefill-1"]
    with running_up(tmp_path, "--num-prefill", "2", "--num-decode", "2") as up:
        with Load(up.base) as load:
            time.sleep(2)  # under load
            old = {n: up.pid(n) for n in victims}
            for n in victims:
                os.kill(old[n], signal.SIGKILL)
            detected = up.wait_health(
                lambda h: not any(h[n.split("-")[0]][up.address(n)] for n in victims), 15, "ejection"
            )
            back = up.wait_health(
                lambda h: all(h[n.split("-")[0]][up.address(n)] for n in victims),
                BACK_TIMEOUT_S,
                "re-admission",
            )
            mark = len(up.lines)
            time.sleep(3)  # served with the restarted instances in the pools
        wait_all_idle(up, names)  # pages back to baseline everywhere, the restarted ones included
    assert all(up.pid(n) != old[n] for n in victims), "restarted as new processes"
    after = [s for s, _ in load.results if s >= detected]
    assert len(after) >= 10, "load kept running through the outage"
    assert load.failed_since(detected) == []
    assert back - detected < BACK_TIMEOUT_S
    log = "".join(up.lines)
    for n in victims:
        assert f"pdserve up: {n} exited with code -9; restarting" in log
    # the restarted instances serve again (each access line names the instances of its request)
    served = [line for line in up.lines[mark:] if line.startswith("gateway | ") and " access " in line]
    for n in victims:
        assert any(up.address(n) in line for line in served), f"{n} routed to after its restart"


def test_one_decode_killed_health_goes_unready_then_serving_resumes_by_itself(tmp_path):
    with running_up(
        tmp_path, "--num-prefill", "1", "--num-decode", "1", env={"PDSERVE_API_KEY": "k" * 16}
    ) as up:
        headers = {"Authorization": "Bearer " + "k" * 16}
        # The API key reaches the gateway only.
        environ = {
            n: Path(f"/proc/{up.pid(n)}/environ").read_bytes() for n in ("gateway", "decode-0", "prefill-0")
        }
        assert b"PDSERVE_API_KEY=" in environ["gateway"]
        assert (
            b"PDSERVE_API_KEY=" not in environ["decode-0"] and b"PDSERVE_API_KEY=" not in environ["prefill-0"]
        )
        os.kill(up.pid("decode-0"), signal.SIGKILL)
        up.wait_health(lambda h: h["http_status"] == 503 and not h["ready"], 15, "/health not ready")
        body = {"model": "tiny-qwen3", "prompt": "while it restarts", "max_tokens": 4}
        r = httpx.post(f"{up.base}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 503, r.text
        up.wait_health(
            lambda h: h["http_status"] == 200 and h["ready"], BACK_TIMEOUT_S, "/health ready again"
        )
        r = httpx.post(f"{up.base}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text


def test_rolling_restart_of_every_instance_under_load_fails_no_request(tmp_path):
    names = ["prefill-0", "prefill-1", "decode-0", "decode-1"]
    with running_up(tmp_path, "--num-prefill", "2", "--num-decode", "2", "--drain-timeout-s", "30") as up:
        with Load(up.base) as load:
            time.sleep(2)
            for name in names:  # the documented procedure: SIGTERM one, wait until it is back, next
                mark, old = len(up.lines), up.pid(name)
                os.kill(old, signal.SIGTERM)
                up.wait_for(rf"pdserve up: {name} exited with code 0; restarting", 60, after=mark)
                up.wait_for(rf"pdserve up: {name} started \(pid \d+\)", 30, after=mark)
                up.wait_health(
                    lambda h, n=name: h[n.split("-")[0]][up.address(n)], BACK_TIMEOUT_S, f"{name} back"
                )
            time.sleep(2)
        wait_all_idle(up, names)
    assert len(load.results) >= 20
    failed_lines = [
        line
        for line in up.lines
        if (" access " in line and "status=200" not in line) or "WARNING" in line or "ERROR" in line
    ][:60]
    assert load.failed_since(0.0) == [], "".join(failed_lines)
    log = "".join(up.lines)
    assert log.count("draining:") >= 4 and "drain timeout:" not in log
    # each drained instance released every page before it exited
    stopped = re.findall(
        r"stopped: (\d+) of (\d+) KV pages free, (\d+) more held by the prefix cache only", log
    )
    assert len(stopped) >= 4
    assert all(int(free) + int(cached) == int(total) for free, total, cached in stopped), stopped


def test_access_and_stats_lines_are_logged_with_the_instance_name(tmp_path):
    with running_up(tmp_path, "--num-prefill", "1", "--num-decode", "1") as up:
        # the model card says which prompt ids are valid (what `pdserve bench` / `soak` draw from)
        card = httpx.get(f"{up.base}/v1/models", timeout=10).json()["data"][0]
        config = json.loads((tmp_path / "cache" / "models" / "tiny-qwen3" / "config.json").read_text())
        assert card["vocab_size"] == config["vocab_size"]
        body = {"model": "tiny-qwen3", "prompt": "log me", "max_tokens": 5}
        r = httpx.post(f"{up.base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
        access = up.wait_for(
            rf"^gateway \| .* access id={r.json()['id']} route=completions status=200 .*", 10
        )
        assert "prompt_tokens=" in access.group(0) and "output_tokens=5 " in access.group(0)
        assert f"prefill={up.address('prefill-0')}" in access.group(0)
        assert f"decode={up.address('decode-0')}" in access.group(0)
        # the interval that saw the request: decode sampled its tokens, prefill computed its prompt
        # and sent the KV
        up.wait_for(
            r"^decode-0 \| .* decode stats: running \d+, waiting \d+ \| in [\d.]+ tok/s, out (?!0\.0 )[\d.]+ tok/s"
            r" \| KV pages \d+/\d+ used \(\d+ cached\) \| prefix cache hit \S+ \| KV transfer (?!0\.00 )[\d.]+ MB/s",
            10,
        )
        up.wait_for(
            r"^prefill-0 \| .* prefill stats: .* \| in (?!0\.0 )[\d.]+ tok/s, .* prefix cache hit [\d.]+%", 10
        )


def test_json_logs_and_no_access_lines(tmp_path):
    args = ("--num-prefill", "0", "--num-decode", "1", "--log-format", "json", "--disable-log-requests")
    with running_up(tmp_path, *args) as up:
        body = {"model": "tiny-qwen3", "prompt": "quiet", "max_tokens": 3}
        assert httpx.post(f"{up.base}/v1/completions", json=body, timeout=60).status_code == 200
        line = up.wait_for(r"^decode-0 \| (\{.*\"decode stats.*\})$", 10).group(1)
        record = json.loads(line)
        assert record["logger"] == "pdserve.stats" and record["role"] == "decode"
        assert record["num_running"] == 0 and record["num_total_pages"] > 0
        time.sleep(1)
    assert not [line for line in up.lines if "pdserve.access" in line]


def test_a_child_that_keeps_dying_makes_up_give_up(tmp_path):
    with running_up(tmp_path, "--num-prefill", "0", "--num-decode", "1", "--max-restarts", "0") as up:
        os.kill(up.pid("decode-0"), signal.SIGKILL)
        assert up.proc.wait(timeout=30) == 1
    assert "decode-0 exited with code -9 after 0 restarts within 300 s; giving up" in "".join(up.lines)
