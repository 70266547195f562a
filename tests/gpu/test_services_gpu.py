"""Prefill and decode services on one CUDA device (GPU box only): tokens equal the offline engine's
on the same device, and the TTFT breakdown for 128 / 512 / 2048-token prompts is printed, with the
prefill instance's piecewise CUDA graphs on and off (two prefill instances).

float32 so that batching differences cannot flip a greedy token; both run the Triton backend.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from services import start_all  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.make_model import make_model  # noqa: E402
from protos import decode_pb2, decode_pb2_grpc  # noqa: E402
from protos.convert import sampling_to_proto  # noqa: E402

COMMON = (
    "--device",
    "cuda",
    "--page-size",
    "16",
    "--max-num-batched-tokens",
    "2048",
    "--kv-cache-mib",
    "2048",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(
        tmp_path_factory.mktemp("gpu_svc") / "qwen3", arch="qwen3", num_layers=4, hidden_size=256,
        intermediate_size=768, num_heads=8, num_kv_heads=2, head_dim=64, seed=5, max_position_embeddings=8192,
    )  # fmt: skip


@pytest.fixture(scope="module")
def services(model_dir, tmp_path_factory):
    triton = (*COMMON, "--attention-backend", "triton")
    started = start_all(
        [
            ("prefill", model_dir, triton),
            ("decode", model_dir, triton),
            ("prefill", model_dir, (*triton, "--no-cuda-graphs")),
        ],
        tmp_path_factory.mktemp("gpu_logs"),
    )
    yield started
    for s in started:
        s.stop()


def _request(prefill, prompt, params):
    return decode_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=sampling_to_proto(params), prefill_address=prefill.address
    )


def _run(decode, request):
    return list(decode_pb2_grpc.DecodeServiceStub(decode.channel).Generate(request, timeout=120))


def test_services_on_cuda_match_the_offline_engine(services, model_dir):
    prefill, decode, _ = services
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 60, 300, 1000, 17, 129, 2500, 33)
    ]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(
            pool.map(
                lambda p: [t for r in _run(decode, _request(prefill, p, params)) for t in r.token_ids],
                prompts,
            )
        )
    ref = LLM(
        str(model_dir),
        device="cuda",
        page_size=16,
        max_num_batched_tokens=2048,
        kv_cache_bytes=2 << 30,
        attention_backend="triton",
    )
    assert got == [o.token_ids for o in ref.generate(prompts, params)]
    prefill.wait_idle()
    decode.wait_idle()


def test_ttft_breakdown(services):
    prefill_graphs, decode, prefill_eager = services
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    rows = []
    for (graphs, prefill), n in itertools.product(
        [("on", prefill_graphs), ("off", prefill_eager)], (128, 512, 2048)
    ):
        parts: dict[str, list[float]] = {
            k: [] for k in ("queue", "prefill", "transfer", "first_decode", "ttft_client")
        }
        for i in range(6):
            prompt = [(7 * n + 13 * i + j) % 1000 for j in range(n)]  # distinct: no prefix-cache hits
            start = time.time_ns()
            responses = _run(decode, _request(prefill, prompt, params))
            t = responses[-1].timing
            if i == 0:
                continue  # warm-up
            parts["queue"].append(t.prefill_started_ns - t.prefill_received_ns)
            parts["prefill"].append(t.prefill_done_ns - t.prefill_started_ns)
            parts["transfer"].append(t.transfer_done_ns - t.prefill_done_ns)
            parts["first_decode"].append(t.first_decode_token_ns - t.transfer_done_ns)
            parts["ttft_client"].append(t.transfer_done_ns - start)
        rows.append((graphs, n, {k: statistics.median(v) / 1e6 for k, v in parts.items()}))
    lines = [
        "prefill graphs | prompt | queue ms | prefill ms | transfer ms | first decode ms | TTFT (client→first token) ms"
    ]
    for graphs, n, m in rows:
        lines.append(
            f"{graphs} | {n} | {m['queue']:.2f} | {m['prefill']:.2f} | {m['transfer']:.2f} | {m['first_decode']:.2f} "
            f"| {m['ttft_client']:.2f}"
        )
    report = "\n".join(lines)
    print("\n" + report)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "ttft_breakdown.txt"), "w") as f:
            f.write(report + "\n")
    assert all(m["transfer"] > 0 for _, _, m in rows)
