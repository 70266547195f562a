"""``pdserve up``: the whole system on one machine — prefill and decode instances and a gateway, as
child processes on loopback — with one command, kept running.

Children pick free ports and report them on stdout ("... listening on host:port"); the gateway is
started once every instance listens, and ``up`` returns control only when the gateway's /health
says ready (a canary went prefill → KV transfer → decode). Every line a child writes (stdout and
stderr) is printed prefixed with its name (``decode-1 | ...``).

Supervision: a child that exits without being asked to — killed, crashed, or drained after a
SIGTERM someone else sent (a rolling restart) — is started again on the same address after a
backoff (``pdserve.supervisor``); the gateway ejects it meanwhile and takes it back once it answers
its health check and a canary through it passes. A child that keeps exiting makes ``up`` give up:
everything stops and ``up`` exits 1. Ctrl-C or SIGTERM stops the gateway first, then the
instances, each given its grace period before SIGKILL. Children get SIGTERM if ``up`` itself dies
(Linux parent-death signal), so nothing is orphaned.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pdserve.supervisor import RestartPolicy, RestartTracker

START_TIMEOUT_S = 600.0  # default of --start-timeout-s: loading a large checkpoint takes minutes
STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1
# Only the gateway checks the API key: no other child gets it in its environment.
GATEWAY_ONLY_ENV = ("PDSERVE_API_KEY",)


def _die_with_parent() -> None:
    # Not Linux: no parent-death signal, but every normal exit path still stops the children.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_env(name: str, base: Mapping[str, str]) -> dict[str, str]:
    """What a child's environment holds: ``base`` without the gateway's secrets, unless it is the gateway."""
    env = {k: v for k, v in base.items() if name == "gateway" or k not in GATEWAY_ONLY_ENV}
    return env | {"PYTHONUNBUFFERED": "1"}


def set_flag(argv: list[str], flag: str, value: str) -> None:
    """Set ``flag``'s value in ``argv`` (the last occurrence wins in argparse, so replace that one)."""
    at = len(argv) - 1 - argv[::-1].index(flag)
    argv[at + 1] = value


@dataclass
class Child:
    name: str
    argv: list[str]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    stop_grace_s: float = STOP_GRACE_S
    proc: subprocess.Popen = field(init=False)
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    address: str = ""
    rest: str = ""  # the rest of the "listening on" line
    restart_at: float | None = None  # exited; start again at this monotonic time
    _watching: bool = True  # queue lines for wait_listening (startup only: nobody reads them later)

    def __post_init__(self) -> None:
        self.restarts = RestartTracker(self.policy)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=child_env(self.name, os.environ), preexec_fn=_die_with_parent,
        )  # fmt: skip
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        print(f"pdserve up: {self.name} started (pid {self.proc.pid})", flush=True)

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if self._watching:
                self.lines.put(line)
            print(f"{self.name} | {line}", end="", flush=True)

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
                self._watching = False
                return self.address
        raise TimeoutError(
            f"{self.name} did not start listening within {timeout_s:.0f} s (raise --start-timeout-s for a large model)"
        )

    def supervise(self, now: float) -> str | None:
        """Restart the child if it exited (after its backoff); returns why ``up`` must give up, if so."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.restart_at = None
                self.start()
            return None
        code = self.proc.poll()
        if code is None:
            return None
        delay = self.restarts.on_exit(now)
        if delay is None:
            return (
                f"{self.name} exited with code {code} after {self.policy.max_restarts} restarts within "
                f"{self.policy.window_s:.0f} s; giving up (its log above says why)"
            )
        print(
            f"pdserve up: {self.name} exited with code {code}; restarting in {delay:.1f} s "
            f"(restart {self.restarts.num_recent} of {self.policy.max_restarts} allowed within "
            f"{self.policy.window_s:.0f} s)",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        self.restart_at = now + delay
        return None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.restart_at = None
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
    """The gateway first (no new work), then the instances; SIGKILL after each one's grace period."""
    for group in (children[-1:], children[:-1]):
        for c in group:
            c.stop()
        deadline = time.monotonic() + max((c.stop_grace_s for c in group), default=0.0)
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
    policy: RestartPolicy | None = None,
    instance_grace_s: float = STOP_GRACE_S,
) -> int:
    """``prefill_args`` / ``decode_args``: one argument list per instance (engine flags, device, KV
    backend). Every instance must listen, and the gateway report healthy, within ``start_timeout_s``.
    ``instance_grace_s``: how long a stopping instance may drain before SIGKILL."""
    policy = policy or RestartPolicy()
    children = [
        Child(f"{role}-{i}", _pdserve(role, "--model", model, "--port", "0", *args), policy, instance_grace_s)
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
            set_flag(c.argv, "--port", c.address.rsplit(":", 1)[1])  # a restart comes back on this address
        routes = [arg for c in children for arg in (f"--{c.name.split('-')[0]}", c.address)]
        gateway = Child("gateway", _pdserve("gateway", "--model", model, "--host", host, "--port", str(port),
                                            "--grpc-port", str(grpc_port), *routes, *gateway_args), policy)  # fmt: skip
        children.append(gateway)
        gateway.start()
        gateway.wait_listening(deadline, stop, start_timeout_s)
        base = gateway.address
        grpc_address = gateway.rest.split("(grpc ", 1)[-1].split(")")[0]
        set_flag(gateway.argv, "--port", base.rsplit(":", 1)[1])
        set_flag(gateway.argv, "--grpc-port", grpc_address.rsplit(":", 1)[1])
        _wait_ready(f"{base}/health", deadline, children, stop, start_timeout_s)
        print(json.dumps({"status": "up", "openai_base_url": f"{base}/v1", "grpc": grpc_address}), flush=True)
        print(f"pdserve is up: OpenAI API at {base}/v1 — try\n  curl {base}/v1/completions -H 'Content-Type: "
              f"application/json' -d '{{\"model\": \"{os.path.basename(model.rstrip('/'))}\", \"prompt\": \"Hello\", "
              f"\"max_tokens\": 16}}'\nCtrl-C stops everything.", flush=True)  # fmt: skip
        while not stop.wait(0.2):
            for c in children:
                if (why := c.supervise(time.monotonic())) is not None:
                    print(f"pdserve up: {why}; stopping", file=sys.stderr, flush=True)
                    return 1
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"pdserve up: {e}", file=sys.stderr)
        return 1
    finally:
        stop_all(children)
