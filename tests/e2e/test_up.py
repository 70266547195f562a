"""``pdserve up`` as a user runs it: one command brings the system up on loopback (making the
embedded tiny model on first run), requests work, and Ctrl-C — or the parent dying — leaves no
process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from services import REPO

START_TIMEOUT_S = 180


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose (its parent has not reaped it yet)
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def up_process(tmp_path, *args: str, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``pdserve up`` on free ports, its model cache (the embedded tiny model) under ``tmp_path``."""
    env = os.environ | {"PDSERVE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pdserve", "up", "--port", "0", "--grpc-port", "0", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True)


def start_up(tmp_path, *args: str) -> tuple[subprocess.Popen, dict]:
    proc = up_process(tmp_path, "--kv-cache-mib", "32", *args)
    deadline = time.monotonic() + START_TIMEOUT_S
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{") and '"status": "up"' in line:
            return proc, json.loads(line)
        assert time.monotonic() < deadline, "pdserve up did not come up in time"
    proc.kill()
    pytest.fail(f"pdserve up exited with {proc.wait(timeout=10)} before coming up")


def test_up_serves_and_ctrl_c_stops_everything(tmp_path):
    """The prefill runs two tensor-parallel ranks (its rank 1 a grandchild of ``up``)."""
    proc, info = start_up(tmp_path, "--num-prefill", "1", "--num-decode", "2", "--prefill-tp", "2")
    try:
        kids = children_of(proc.pid)
        assert len(kids) == 4  # 1 prefill, 2 decode, 1 gateway
        grandchildren = [g for kid in kids for g in children_of(kid)]
        ranks = [g for g in grandchildren if b"spawn_main" in Path(f"/proc/{g}/cmdline").read_bytes()]
        assert len(ranks) == 1, "the prefill's rank 1"
        base = info["openai_base_url"]
        model = httpx.get(f"{base}/models", timeout=30).json()["data"][0]["id"]
        assert model == "tiny-qwen3"
        r = httpx.post(
            f"{base}/completions", json={"model": model, "prompt": "Hello", "max_tokens": 5}, timeout=60
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert wait_gone(kids + grandchildren, 10) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killing_up_takes_its_children_down(tmp_path):
    proc, _ = start_up(tmp_path)
    kids = children_of(proc.pid)
    assert len(kids) == 3
    proc.kill()  # no chance to clean up: the parent-death signal must do it
    proc.wait(timeout=10)
    assert wait_gone(kids, 30) == []


def test_an_instance_too_slow_to_start_stops_everything_with_a_clear_error(tmp_path):
    proc = up_process(tmp_path, "--start-timeout-s", "0.5", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=120)  # importing torch alone takes longer than 0.5 s
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "did not start listening within 0 s (raise --start-timeout-s" in err, err[-2000:]
    assert not wait_gone(with_env(f"PDSERVE_CACHE_DIR={tmp_path / 'cache'}"), 10), "instances left running"


def with_env(entry: str) -> list[int]:
    """Live processes whose environment holds ``entry`` (this test's children and theirs)."""
    pids = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if entry.encode() in (proc_dir / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc_dir.name))
        except OSError:  # gone, or not ours
            continue
    return [p for p in pids if alive(p)]
