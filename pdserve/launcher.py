"""``pdserve up``: the whole system on one machine — prefill and decode instances and a gateway, as
child processes on loopback — with one command.

Children pick free ports and report them on stdout ("... listening on host:port"); the gateway is
started once every instance listens, and ``up`` returns control only when the gateway's /health
says ready (a canary went prefill → KV transfer → decode). Ctrl-C or SIGTERM stops the gateway
first, then the instances, each given ``STOP_GRACE_S`` before SIGKILL. Children get SIGTERM if
``up`` itself dies (Linux parent-death signal), so nothing is orphaned. If a child exits on its
own, everything stops and ``up`` exits 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

START_TIMEOUT_S = 600.0  # default of --start-timeout-s: loading a large checkpoint takes minutes
STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Not Linux: no parent-death signal, but every normal exit path still stops the children.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen = field(init=False)
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    address: str = ""
    rest: str = ""  # the rest of the "listening on" line

    def start(self) -> None:
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, env=env, preexec_fn=_die_with_parent)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self.lines.put(line)
            print(f"[{self.name}] {line}", end="", flush=True)

    def wait_listening(self, deadline: float, stop: threading.Event, timeout_s: float) -> str:
        while time.monotonic() < deadline:
            if stop.is_set():
                raise RuntimeError("stopped during startup")
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} during startup")
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if "listening on" in line:
                self.rest = line.split("listening on", 1)[1].strip()
                self.address = self.rest.split()[0]
                return self.address
        raise TimeoutError(
            f"{self.name} did not start listening within {timeout_s:.0f} s (raise --start-timeout-s for a large model)"
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)


def _pdserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdserve", *args]


def _wait_ready(
    url: str, deadline: float, children: Sequence[Child], stop: threading.Event, timeout_s: float
) -> None:
    last = ""
    while time.monotonic() < deadline:
        if stop.is_set():
            raise RuntimeError("stopped during startup")
        for c in children:
            if c.proc.poll() is not None:
                raise RuntimeError(f"{c.name} exited with code {c.proc.returncode} during startup")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError as e:  # 503 while starting arrives as HTTPError, a subclass
            last = e.read().decode() if hasattr(e, "read") else str(e)
        time.sleep(0.25)
    raise TimeoutError(f"gateway not ready within {timeout_s:.0f} s: {last}")


def stop_all(children: Sequence[Child]) -> None:
    """The gateway first (no new work), then the instances; SIGKILL after the grace period."""
    for group in (children[-1:], children[:-1]):
        for c in group:
            c.stop()
        deadline = time.monotonic() + STOP_GRACE_S
        for c in group:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(timeout=5)


def up(
    model: str,
    prefill_args: Sequence[Sequence[str]],
    decode_args: Sequence[Sequence[str]],
    gateway_args: list[str],
    host: str,
    port: int,
    grpc_port: int,
    start_timeout_s: float = START_TIMEOUT_S,
) -> int:
    """``prefill_args`` / ``decode_args``: one argument list per instance (engine flags, device, KV
    backend). Every instance must listen, and the gateway report healthy, within ``start_timeout_s``."""
    children = [
        Child(f"{role}-{i}", _pdserve(role, "--model", model, "--port", "0", *args))
        for role, instances in (("prefill", prefill_args), ("decode", decode_args))
        for i, args in enumerate(instances)
    ]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deadline = time.monotonic() + start_timeout_s
        for c in children:
            c.start()
        for c in children:
            c.wait_listening(deadline, stop, start_timeout_s)
        routes = [arg for c in children for arg in (f"--{c.name.split('-')[0]}", c.address)]
        gateway = Child("gateway", _pdserve("gateway", "--model", model, "--host", host, "--port", str(port),
                                            "--grpc-port", str(grpc_port), *routes, *gateway_args))  # fmt: skip
        children.append(gateway)
        gateway.start()
        gateway.wait_listening(deadline, stop, start_timeout_s)
        base = gateway.address
        grpc_address = gateway.rest.split("(grpc ", 1)[-1].split(")")[0]
        _wait_ready(f"{base}/health", deadline, children, stop, start_timeout_s)
        print(json.dumps({"status": "up", "openai_base_url": f"{base}/v1", "grpc": grpc_address}), flush=True)
        print(f"pdserve is up: OpenAI API at {base}/v1 — try\n  curl {base}/v1/completions -H 'Content-Type: "
              f"application/json' -d '{{\"model\": \"{os.path.basename(model.rstrip('/'))}\", \"prompt\": \"Hello\", "
              f"\"max_tokens\": 16}}'\nCtrl-C stops everything.", flush=True)  # fmt: skip
        while not stop.wait(0.5):
            dead = [c for c in children if c.proc.poll() is not None]
            if dead:
                print(
                    f"pdserve up: {dead[0].name} exited with code {dead[0].proc.returncode}; stopping",
                    file=sys.stderr,
                )
                return 1
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"pdserve up: {e}", file=sys.stderr)
        return 1
    finally:
        stop_all(children)
