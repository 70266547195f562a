"""Prefill and decode instances with tensor parallelism, as real processes on loopback.

Four instances — prefill tp=2, decode tp=2, prefill tp=1, decode tp=1 (gloo ranks, KV over tcp as
whole heads) — cover every pairing with TP on either side. Oracles: the single-process engine
(tp=1) for the tokens; the instances' own load reports for "every page came back"; gRPC status
codes and grpc.health.v1 for the failures. The last test kills ranks, so it runs last.
"""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from services import Service, start_all

from engine import LLM, SamplingParams
from protos import decode_pb2, decode_pb2_grpc
from protos.convert import sampling_to_proto

ENGINE_ARGS = ("--page-size", "4", "--max-num-batched-tokens", "32", "--kv-cache-mib", "8")
RPC_TIMEOUT_S = 60
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
NAMES = ["p2", "d2", "p1", "d1"]


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    specs = [
        ("prefill", tiny_model, (*ENGINE_ARGS, "--tp", "2")),
        ("decode", tiny_model, (*ENGINE_ARGS, "--tp", "2")),
        ("prefill", tiny_model, ENGINE_ARGS),
        ("decode", tiny_model, ENGINE_ARGS),
    ]
    services = start_all(specs, logs)
    yield dict(zip(NAMES, services, strict=True))
    for s in services:
        s.stop()


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LLM(str(tiny_model), page_size=4, max_num_batched_tokens=32, kv_cache_bytes=8 << 20)


def request(prompt: list[int], prefill: Service, params: SamplingParams = GREEDY, deadline_s: float = 0):
    return decode_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        sampling=sampling_to_proto(params),
        prefill_address=prefill.address,
        deadline_unix_ns=time.time_ns() + int(deadline_s * 1e9) if deadline_s else 0,
    )


def tokens_of(decode: Service, req: decode_pb2.GenerateRequest) -> list[int]:
    stub = decode_pb2_grpc.DecodeServiceStub(decode.channel)
    return [t for r in stub.Generate(req, timeout=RPC_TIMEOUT_S) for t in r.token_ids]


def wait_all_idle(cluster: dict[str, Service]) -> None:
    for s in cluster.values():
        s.wait_idle(timeout_s=20)


@pytest.mark.parametrize(("prefill", "decode"), [("p2", "d2"), ("p2", "d1"), ("p1", "d2")])
def test_tp_pairs_generate_what_one_process_generates(cluster, reference, prefill, decode):
    """Prompts of 1 to 70 tokens (chunk 32, page 4: up to 18 pages), concurrently, then again with a
    shared prefix (prefill's cached pages are exported too)."""
    rng = random.Random(len(prefill + decode))
    vocab = reference.engine.model_config.vocab_size
    first = [[rng.randrange(vocab) for _ in range(n)] for n in (1, 4, 5, 17, 33, 70)]
    second = [[*first[-1][:50], 7, 8, 9], [*first[3], 1]]
    for prompts in (first, second):
        reqs = [request(p, cluster[prefill]) for p in prompts]
        with ThreadPoolExecutor(len(reqs)) as pool:
            got = list(pool.map(lambda r: tokens_of(cluster[decode], r), reqs))
        expected = [out.token_ids for out in reference.generate(prompts, GREEDY)]
        assert got == expected
    wait_all_idle(cluster)


def test_cancel_and_deadlines_free_every_page_with_tp(cluster):
    """A stream cancelled mid-decode, and a burst of requests whose short deadline ends each of them
    somewhere (prefill queue, prefill, export, transfer, import, decode): only OK or
    DEADLINE_EXCEEDED, and every instance idle afterwards."""
    p2, d2 = cluster["p2"], cluster["d2"]
    stub = decode_pb2_grpc.DecodeServiceStub(d2.channel)
    long = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
    call = stub.Generate(request(list(range(100, 170)), p2, long), timeout=RPC_TIMEOUT_S)
    assert all(next(call).token_ids for _ in range(3))
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() is grpc.StatusCode.CANCELLED

    def short(i: int) -> grpc.StatusCode:
        try:
            tokens_of(d2, request(list(range(10 + i, 70 + i)), p2, long, deadline_s=0.2 + 0.15 * i))
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(short, range(6)))
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    wait_all_idle(cluster)


def rank_processes(service: Service) -> list[int]:
    """The spawned tensor-parallel ranks of ``service`` (its children running ``spawn_main``)."""
    pid = service.proc.pid
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def wait_not_serving(service: Service, timeout_s: float = 20.0) -> None:
    health = health_pb2_grpc.HealthStub(service.channel)
    deadline = time.monotonic() + timeout_s
    while (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    ):
        assert time.monotonic() < deadline, f"{service.role} still SERVING {timeout_s}s after losing a rank"
        time.sleep(0.1)


def test_a_dead_rank_is_a_clear_error_and_not_serving(cluster):
    """Runs last: kills rank 1 of both TP instances — decode's mid-stream, prefill's while idle. The
    open stream ends UNAVAILABLE naming the rank, both report NOT_SERVING within seconds, a request
    naming either fails UNAVAILABLE naming the rank, and the tp=1 peers stay idle and serving."""
    p2, d2, p1, d1 = (cluster[n] for n in NAMES)
    stub = decode_pb2_grpc.DecodeServiceStub(d2.channel)
    long = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
    call = stub.Generate(request(list(range(100, 140)), p1, long), timeout=RPC_TIMEOUT_S)
    assert all(next(call).token_ids for _ in range(2))
    start = time.monotonic()
    for service in (d2, p2):
        (rank1,) = rank_processes(service)
        os.kill(rank1, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "worker rank 1 exited with code -9" in err.value.details()
    assert time.monotonic() - start < 10
    for service in (p2, d2):
        wait_not_serving(service)
    for decode, prefill in ((d2, p1), (d1, p2)):
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            tokens_of(decode, request([1, 2, 3, 4, 5], prefill))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "worker rank 1 exited with code -9" in err.value.details()
        assert time.monotonic() - start < 10
    assert tokens_of(d1, request([1, 2, 3], p1)) != []
    for service in (p1, d1):
        service.wait_idle(timeout_s=20)
