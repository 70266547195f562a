"""SIGTERM to a decode instance drains it (real processes on loopback): health turns NOT_SERVING,
new requests are refused with UNAVAILABLE before any work (what the gateway retries elsewhere),
the request it runs streams to its end — its KV arrived from prefill, which still works — and the
process exits 0 with every page released. Past ``--drain-timeout-s`` a running request is cut."""

from __future__ import annotations

import re
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from services import Service, start_all
from test_disaggregated import ENGINE_ARGS, generate_request

from engine import SamplingParams
from protos import decode_pb2_grpc

LONG = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)


class Stream(threading.Thread):
    """One long Generate through ``decode``, read on a thread: its tokens, and how it ended."""

    def __init__(self, decode: Service, prefill: Service) -> None:
        super().__init__(daemon=True)
        self.request = generate_request([1, 2, 3, 4, 5], LONG, prefill)
        self.stub = decode_pb2_grpc.DecodeServiceStub(decode.channel)
        self.num_tokens, self.finish_reason, self.error = 0, "", None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            for msg in self.stub.Generate(self.request, timeout=120):
                self.num_tokens += len(msg.token_ids)
                self.finish_reason = msg.finish_reason or self.finish_reason
                self.started.set()
        except grpc.RpcError as e:
            self.error = e


@pytest.fixture
def pair(tiny_model, tmp_path):
    """Starts a prefill and a decode with the given drain timeout; stops them after the test."""
    services: list[Service] = []

    def start(drain_timeout_s: float) -> tuple[Service, Service]:
        decode_args = (*ENGINE_ARGS, "--drain-timeout-s", str(drain_timeout_s))
        services.extend(
            start_all([("prefill", tiny_model, ENGINE_ARGS), ("decode", tiny_model, decode_args)], tmp_path)
        )
        return services[0], services[1]

    yield start
    for s in services:
        s.stop()


def test_sigterm_drains_running_requests_refuses_new_ones_and_exits_0(pair):
    prefill, decode = pair(60)
    stream = Stream(decode, prefill)
    stream.start()
    assert stream.started.wait(30), "the long request streams"
    decode.proc.send_signal(signal.SIGTERM)
    health = health_pb2_grpc.HealthStub(decode.channel)
    deadline = time.monotonic() + 10
    while (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        != health_pb2.HealthCheckResponse.NOT_SERVING
    ):
        assert time.monotonic() < deadline, "NOT_SERVING after SIGTERM"
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as refused:
        list(decode_pb2_grpc.DecodeServiceStub(decode.channel).Generate(
            generate_request([7, 8, 9], SamplingParams(max_tokens=2), prefill), timeout=30))  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
    assert stream.is_alive(), "still running when the new request was refused"
    stream.join(timeout=120)
    assert stream.error is None and (stream.num_tokens, stream.finish_reason) == (LONG.max_tokens, "length")
    assert decode.proc.wait(timeout=30) == 0
    free, total, cached = map(
        int, re.search(r"stopped: (\d+) of (\d+) KV pages free, (\d+) more", decode.log()).groups()
    )
    assert free + cached == total
    prefill.wait_idle()


def test_a_request_still_running_at_the_drain_timeout_is_cut_and_the_instance_exits(pair):
    prefill, decode = pair(1)
    stream = Stream(decode, prefill)
    stream.start()
    assert stream.started.wait(30)
    decode.proc.send_signal(signal.SIGTERM)
    stream.join(timeout=60)
    assert stream.error is not None and stream.num_tokens < LONG.max_tokens
    assert decode.proc.wait(timeout=30) == 0
    assert "drain timeout: 1 requests still running are cancelled" in decode.log()
    prefill.wait_idle()
