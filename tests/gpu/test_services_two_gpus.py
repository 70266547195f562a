"""1P1D on two GPUs (GPU box with >= 2 GPUs): prefill on cuda:0, decode on cuda:1, for each KV
backend. The services generate the same tokens whatever the backend (tcp is the reference: its
path is proven on the CPU against the engine), both return to idle, and the transfer time per
backend is printed. Then ``pdserve up --prefill-device cuda:0 --decode-device cuda:1 --kv-backend
cuda_ipc`` answers a completion through the gateway.

float32 so that no batching difference can flip a greedy token.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

from services import REPO, start_all  # noqa: E402

from engine import SamplingParams  # noqa: E402
from engine.make_model import make_model  # noqa: E402
from protos import decode_pb2, decode_pb2_grpc  # noqa: E402
from protos.convert import sampling_to_proto  # noqa: E402

COMMON = ("--dtype", "float32", "--page-size", "16", "--max-num-batched-tokens", "2048", "--kv-cache-mib", "1024",
          "--attention-backend", "triton")  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(
        tmp_path_factory.mktemp("two_gpus") / "qwen3", arch="qwen3", num_layers=4, hidden_size=256,
        intermediate_size=768, num_heads=8, num_kv_heads=2, head_dim=64, seed=9, max_position_embeddings=8192,
    )  # fmt: skip


def _generate(prefill, decode, prompts, params):
    def one(prompt):
        request = decode_pb2.GenerateRequest(
            prompt_token_ids=prompt, sampling=sampling_to_proto(params), prefill_address=prefill.address
        )
        responses = list(decode_pb2_grpc.DecodeServiceStub(decode.channel).Generate(request, timeout=120))
        t = responses[-1].timing
        return [tok for r in responses for tok in r.token_ids], (t.transfer_done_ns - t.prefill_done_ns) / 1e6

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_prefill_on_gpu0_decode_on_gpu1_same_tokens_with_every_backend(model_dir, tmp_path):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 60, 300, 1000, 17, 2500)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens, report = {}, []
    for backend in ("tcp", "cuda_ipc", "nccl"):
        prefill, decode = start_all(
            [
                ("prefill", model_dir, (*COMMON, "--device", "cuda:0", "--kv-backend", backend)),
                ("decode", model_dir, (*COMMON, "--device", "cuda:1", "--kv-backend", backend)),
            ],
            tmp_path,
        )
        try:
            _generate(prefill, decode, prompts[:1], params)  # warm-up: handshake (nccl: the pair forms)
            out = _generate(prefill, decode, prompts, params)
            tokens[backend] = [t for t, _ in out]
            ms = [m for _, m in out]
            report.append(
                f"{backend}: transfer ms per prompt {[f'{m:.1f}' for m in ms]} (median {statistics.median(ms):.1f})"
            )
            prefill.wait_idle()
            decode.wait_idle()
        finally:
            for s in (prefill, decode):
                s.stop()
    print("\n" + "\n".join(report))
    assert all(len(t) == 16 for t in tokens["tcp"])
    assert tokens["cuda_ipc"] == tokens["tcp"], "cuda_ipc generated other tokens than tcp"
    assert tokens["nccl"] == tokens["tcp"], "nccl generated other tokens than tcp"


def test_pdserve_up_on_two_gpus_with_cuda_ipc(model_dir, tmp_path):
    cmd = [sys.executable, "-m", "pdserve", "up", "--model", str(model_dir), "--port", "0", "--grpc-port", "0",
           *COMMON, "--prefill-device", "cuda:0", "--decode-device", "cuda:1", "--kv-backend", "cuda_ipc"]  # fmt: skip
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline, info, lines = time.monotonic() + 300, None, []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("{") and '"status": "up"' in line:
                info = json.loads(line)
                break
            assert time.monotonic() < deadline, "pdserve up did not come up in 300 s"
        assert info is not None, "pdserve up exited:\n" + "".join(lines[-40:])
        reply = httpx.post(
            f"{info['openai_base_url']}/completions",
            json={"model": model_dir.name, "prompt": "Hello there", "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8
    finally:
        proc.send_signal(2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
