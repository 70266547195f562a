"""Start pdserve services as real processes on loopback, for end-to-end tests.

Every wait is bounded: startup (the "listening on" line, then grpc.health.v1 SERVING), shutdown
(SIGTERM, then SIGKILL), and polls for a service to return to idle.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from protos.convert import is_idle
from protos.tls import TLSConfig

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90


class Service:
    """One ``pdserve prefill|decode|gateway`` process listening on 127.0.0.1 at free ports.

    ``address`` is its gRPC address (for the gateway: the public gRPC API; ``http_url`` is REST).
    Ready means grpc.health.v1 SERVING, which for the gateway means its canary passed.
    """

    def __init__(
        self, role: str, model: Path, *args: str, log_dir: Path, tls: TLSConfig | None = None, port: int = 0
    ) -> None:
        self.role, self.tls = role, tls
        self.http_url = ""
        if role == "gateway":
            args = ("--grpc-port", "0", *args)
        self.log_path = log_dir / f"{role}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        env = os.environ | {"PYTHONUNBUFFERED": "1", "PDSERVE_LOG_LEVEL": "INFO"}
        cmd = [sys.executable, "-m", "pdserve", role, "--model", str(model), "--port", str(port), *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.address = ""
        self.channel: grpc.Channel | None = None

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode(errors="replace"))

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> Service:
        self.wait_listening(timeout_s)
        deadline = time.monotonic() + timeout_s
        health = health_pb2_grpc.HealthStub(self.channel)
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.role} not SERVING after {timeout_s}s:\n{self.log()}")
            time.sleep(0.1)

    def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> Service:
        """Until the process printed where it listens (a gateway serves requests from then on,
        before its canary made it "ready")."""
        deadline = time.monotonic() + timeout_s
        while not self.address:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                line = self._lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.role} did not start in {timeout_s}s:\n{self.log()}") from None
                continue
            if "listening on" in line:
                rest = line.split("listening on", 1)[1].strip()
                if "(grpc " in rest:  # the gateway: "http://host:port (grpc host:port)"
                    self.http_url = rest.split()[0]
                    self.address = rest.split("(grpc ", 1)[1].rstrip(")")
                else:
                    self.address = rest
        if self.tls is None:
            self.channel = grpc.insecure_channel(self.address)
        else:
            self.channel = grpc.secure_channel(self.address, self.tls.channel_credentials())
        return self

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def load(self) -> common_pb2.LoadReport:
        assert self.channel is not None
        stub: prefill_pb2_grpc.PrefillServiceStub | decode_pb2_grpc.DecodeServiceStub
        if self.role == "prefill":
            stub = prefill_pb2_grpc.PrefillServiceStub(self.channel)
        else:
            stub = decode_pb2_grpc.DecodeServiceStub(self.channel)
        return stub.GetLoad(common_pb2.LoadRequest(), timeout=5)

    def wait_idle(self, timeout_s: float = 15.0) -> common_pb2.LoadReport:
        """Poll until nothing is running, held or pending and every page is free or cached."""
        deadline = time.monotonic() + timeout_s
        while True:
            load = self.load()
            if is_idle(load):
                return load
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.role} not idle after {timeout_s}s: {load}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def start_all(
    specs: list[tuple[str, Path, tuple[str, ...]]], log_dir: Path, tls: TLSConfig | None = None
) -> list[Service]:
    """Start several services at once (startup is mostly importing torch) and wait for all."""
    services = [Service(role, model, *args, log_dir=log_dir, tls=tls) for role, model, args in specs]
    try:
        for s in services:
            s.wait_ready()
    except BaseException:
        for s in services:
            s.stop()
        raise
    return services


def prefix_group_hits(http_url: str, model: str, seed: str, timeout_s: float = 60) -> list[bool]:
    """Nine completions in three interleaved groups sharing a 48-token prefix (g0 g1 g2 g0 ...);
    whether each one's prompt found cached tokens where it was served. Follow-ups (from the fourth
    on) all hit when routing sends each group to the instance that cached it."""
    import random

    import httpx

    rng = random.Random(seed)
    bases = [[rng.randrange(1000) for _ in range(48)] for _ in range(3)]
    hits = []
    with httpx.Client(timeout=timeout_s) as client:
        for i in range(9):
            prompt = bases[i % 3] + [rng.randrange(1000) for _ in range(5)]
            r = client.post(
                f"{http_url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2}
            )
            hits.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0)
    return hits
