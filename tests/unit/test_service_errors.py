"""The status a caller gets is chosen by the error's type (``protos.errors``), never by its message:
a reworded message keeps the status, a message that happens to contain another error's words does
not borrow its status. Oracles: the gRPC status codes of ``docs/PROTOCOL.md``, seen through a
context whose ``abort`` raises like gRPC's, and the decode servicer's own load report."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from async_driver import run

from decode_svc.kv_landing import KVLanding
from decode_svc.servicer import DecodeServicer
from engine import SamplingParams
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import AlreadyRunning, EngineFailed, InvalidRequest
from protos import decode_pb2
from protos.convert import FAULT_METADATA_KEY, is_idle, sampling_to_proto
from protos.errors import Relayed, ResourceExhausted, statuses

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


class _Aborted(grpc.aio.AbortError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    def __init__(self) -> None:
        self.trailers: tuple = ()

    def set_trailing_metadata(self, trailers: tuple) -> None:
        self.trailers = trailers

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


def _status(exc: Exception, role: str = "decode") -> tuple[grpc.StatusCode, str, tuple]:
    async def body() -> tuple[grpc.StatusCode, str, tuple]:
        context = _Context()
        with pytest.raises(_Aborted) as err:
            async with statuses(context, role):  # type: ignore[arg-type]
                raise exc
        return err.value.code, err.value.details, context.trailers

    return asyncio.run(body())


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (AlreadyRunning("request_id: 'r' is already running"), grpc.StatusCode.ALREADY_EXISTS),
        (AlreadyRunning("request_id: 'r' is taken"), grpc.StatusCode.ALREADY_EXISTS),
        (InvalidRequest("request_id: 'r' is already running"), grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidRequest("prompt: must contain at least one token"), grpc.StatusCode.INVALID_ARGUMENT),
        (EngineFailed("already running"), grpc.StatusCode.UNAVAILABLE),
        (ResourceExhausted("already running"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_the_status_follows_the_type_whatever_the_message(exc, code):
    got, details, _ = _status(exc)
    assert got is code
    assert str(exc) in details  # the message reaches the caller as written


def test_a_dead_engine_is_named_and_a_relayed_status_keeps_its_code_and_fault():
    code, details, _ = _status(EngineFailed("rank 1 exited"), role="prefill")
    assert code is grpc.StatusCode.UNAVAILABLE and details == "prefill engine: rank 1 exited"
    code, details, trailers = _status(Relayed(grpc.StatusCode.DEADLINE_EXCEEDED, "slow", fault="prefill"))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED and details == "slow"
    assert trailers == ((FAULT_METADATA_KEY, "prefill"),)


def test_an_error_of_no_known_type_is_not_turned_into_a_status():
    async def body() -> None:
        async with statuses(_Context(), "decode"):  # type: ignore[arg-type]
            raise ValueError("request_id: 'r' is already running")

    with pytest.raises(ValueError, match="already running"):
        asyncio.run(body())


class _Receiver:
    num_pending = 0
    num_bytes_received = 0

    def expect(self, *args: object) -> object:
        return None

    def abort(self, transfer_id: str, reason: str) -> None:
        pass


class _NeverAnswers:
    """A prefill instance that holds every call until the caller cancels it."""

    def Prefill(self, request: object, timeout: float) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()


def _generate(request_id: str, prefill_address: str = "") -> decode_pb2.GenerateRequest:
    return decode_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=list(range(3, 23)),
        sampling=sampling_to_proto(LONG),
        prefill_address=prefill_address,
    )


async def _first(
    servicer: DecodeServicer, request: decode_pb2.GenerateRequest
) -> decode_pb2.GenerateResponse:
    async for msg in servicer.Generate(request, _Context()):  # type: ignore[arg-type]
        return msg
    raise AssertionError("no message")


@pytest.fixture
def engine(tiny_model):
    cfg = EngineConfig(model=str(tiny_model), page_size=4, max_num_batched_tokens=64, kv_cache_bytes=4 << 20)
    engine = Engine(cfg)
    yield engine
    engine.close()


def _servicer(driver: AsyncEngine) -> DecodeServicer:
    servicer = DecodeServicer(driver, _Receiver(), KVLanding(driver), "tcp", "decode:1", 60)  # type: ignore[arg-type]
    servicer._prefill = lambda address: _NeverAnswers()  # type: ignore[assignment,method-assign,return-value]
    return servicer


def test_a_second_request_with_a_running_id_is_already_exists(engine):
    """Colocated: the first request runs in the engine, the second with its id is refused."""

    async def body(driver: AsyncEngine) -> grpc.StatusCode:
        servicer = _servicer(driver)
        first = servicer.Generate(_generate("r"), _Context())  # type: ignore[arg-type]
        await anext(first)
        try:
            with pytest.raises(_Aborted) as err:
                await _first(servicer, _generate("r"))
        finally:
            await first.aclose()
        return err.value.code

    assert asyncio.run(run(engine, body)) is grpc.StatusCode.ALREADY_EXISTS


def test_a_second_request_with_an_id_being_admitted_is_already_exists_and_pages_come_back(engine):
    """Disaggregated: the first request holds its reserved pages while prefill runs; the second
    with its id is refused; cancelling the first gives every page back."""

    async def body(driver: AsyncEngine):
        servicer = _servicer(driver)
        first = asyncio.ensure_future(_first(servicer, _generate("r", "prefill:1")))
        while not servicer.admissions.num_reserved_pages:
            await asyncio.sleep(0.01)
        held = await servicer.GetLoad(None, None)
        with pytest.raises(_Aborted) as err:
            await _first(servicer, _generate("r", "prefill:1"))
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await driver.call(lambda e: None)  # the freed pages are back and the snapshot taken
        return err.value.code, held, await servicer.GetLoad(None, None)

    code, held, after = asyncio.run(run(engine, body, timeout_s=30))
    assert code is grpc.StatusCode.ALREADY_EXISTS
    assert held.num_held_pages == 5 and held.num_free_pages == held.num_total_pages - 5  # 20 tokens / 4
    assert is_idle(after), after
