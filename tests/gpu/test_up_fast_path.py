"""``pdserve up`` on a GPU host with no device flags takes the fast path: every instance runs on the
GPU with the triton attention backend, fused kernels and decode CUDA graphs, and serves what the
offline engine on the same GPU generates."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The lighthouse keeper counted the ships"


def _lines(proc: subprocess.Popen) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_up_without_device_flags_serves_from_the_gpu_fast_path(tiny_model):
    cmd = [
        sys.executable,
        "-m",
        "pdserve",
        "up",
        "--model",
        str(tiny_model),
        "--port",
        "0",
        "--grpc-port",
        "0",
    ]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, log, info = _lines(proc), [], None
    try:
        deadline = time.monotonic() + 300
        while info is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            log.append(line)
            if line.startswith("{") and '"status": "up"' in line:
                info = json.loads(line)
        assert info is not None, "pdserve up did not come up:\n" + "".join(log[-40:])
        reply = httpx.post(
            f"{info['openai_base_url']}/completions",
            json={"model": tiny_model.name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                  "ignore_eos": True},
            timeout=60,
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    started = [line for line in log if "attention backend" in line and "layer ops" in line]
    assert len(started) == 2, started  # one start-up line per instance (prefill, decode)
    assert all("device cuda:0, attention backend triton, layer ops triton" in line for line in started), (
        started
    )
    assert any("decode CUDA graphs:" in line for line in log), "no CUDA graphs captured"
    with LLM(str(tiny_model), device="cuda", attention_backend="triton") as llm:
        offline = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert reply.json()["choices"][0]["text"] == offline.text
