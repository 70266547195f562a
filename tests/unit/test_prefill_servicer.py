"""The prefill servicer's layer-by-layer path against a real engine (``prefill_svc.servicer``), with
a sender that only records and a context whose ``abort`` raises like gRPC's. Oracle: the status a
client would get, and how soon."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from engine import SamplingParams
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine
from kvtransfer.base import KVSender, SendSession
from prefill_svc.servicer import PrefillServicer
from protos import prefill_pb2
from protos.convert import sampling_to_proto

PAGE = 16


class _Aborted(grpc.aio.AbortError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class _Session(SendSession):
    def __init__(self, sent: list[int]) -> None:
        self.sent = sent

    async def send_layer(self, layer: int, kv: object = None) -> None:
        self.sent.append(layer)

    async def commit(self, first_token: int, first_logprob: object) -> int:
        return 0

    def abort(self) -> None:
        pass


class _Sender(KVSender):
    def __init__(self) -> None:
        self.sent: list[int] = []

    async def connect(self, address: str, deadline_ns: int) -> None:
        pass

    async def open(self, dest, src_pages, num_tokens, deadline_ns) -> SendSession:  # type: ignore[no-untyped-def]
        return _Session(self.sent)


@pytest.fixture
def engine(deep_model):
    cfg = EngineConfig(
        model=str(deep_model), page_size=PAGE, max_num_batched_tokens=512, kv_cache_bytes=64 << 20
    )
    engine = Engine(cfg)
    yield engine
    engine.close()


def test_engine_loop_dying_mid_step_ends_the_prefill_unavailable_at_once(engine, monkeypatch):
    """A context-parallel rank dies inside the step computing the prompt: rank 0's step waits in
    its collective, and the AsyncEngine loop dies (its rank check). The streams end with "error";
    the handler, waiting for a layer of that step, must answer UNAVAILABLE then, not at the
    deadline."""
    entered, release = threading.Event(), threading.Event()
    mlp = engine.runner.model.model.layers[1].mlp
    real_forward = mlp.forward

    def stuck(*args, **kwargs):  # the step thread, inside layer 1: a collective with a dead peer
        entered.set()
        release.wait(60)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", stuck)

    def check_ranks() -> None:
        if entered.is_set():
            raise RuntimeError("injected: cp rank 1 exited with code -9")

    monkeypatch.setattr(engine, "check_ranks", check_ranks)
    prompt = [(7 * i) % 500 + 3 for i in range(100)]
    request = prefill_pb2.PrefillRequest(
        request_id="r", prompt_token_ids=prompt, deadline_unix_ns=time.time_ns() + int(60e9),
        sampling=sampling_to_proto(SamplingParams(temperature=0, max_tokens=1, seed=1)),
        kv_destination=prefill_pb2.KVDestination(
            backend="tcp", address="decode:1", transfer_id="r", page_ids=range(-(-len(prompt) // PAGE))
        ),
    )  # fmt: skip

    async def body() -> tuple[_Aborted, float]:
        driver = AsyncEngine(engine)

        async def step_checking_ranks(step):  # AsyncEngine._step with ranks, checked more often
            while not step.done():
                engine.check_ranks()
                await asyncio.sleep(0.005)
            return step.result()

        driver._step = step_checking_ranks  # type: ignore[method-assign]
        driver.start()
        servicer = PrefillServicer(driver, _Sender(), "tcp", request_timeout_s=60)
        try:
            start = time.monotonic()
            with pytest.raises(_Aborted) as err:
                await asyncio.wait_for(servicer.Prefill(request, _Context()), 10)
            return err.value, time.monotonic() - start
        finally:
            release.set()
            await driver.stop()

    aborted, took_s = asyncio.run(body())
    assert aborted.code is grpc.StatusCode.UNAVAILABLE and "cp rank 1" in aborted.details, aborted.details
    assert took_s < 10
