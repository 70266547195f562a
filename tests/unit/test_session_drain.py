"""A decode session's requests and the server's drain: whatever ends a session, every request it
admitted is given back, so a later drain does not wait for work that no longer exists."""

from __future__ import annotations

import asyncio

from decode_svc.session import Session
from protos import decode_pb2
from protos.drain import Drain


def _generate(request_id: str) -> decode_pb2.SessionRequest:
    return decode_pb2.SessionRequest(
        generate=decode_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=[1])
    )


async def _session_cancelled_as_a_request_arrives(drain: Drain) -> list[str]:
    started: list[str] = []
    run: asyncio.Task[None] | None = None

    async def start(request: decode_pb2.GenerateRequest) -> None:  # never returns: admission in progress
        started.append(request.request_id)
        await asyncio.sleep(3600)

    async def requests():  # the peer goes away just as its request arrives
        await asyncio.sleep(0.01)
        assert run is not None
        run.cancel()
        yield _generate("r1")
        await asyncio.sleep(3600)

    async def write(batch: decode_pb2.SessionBatch) -> None:
        pass

    run = asyncio.create_task(Session(start, drain).run(requests(), write))  # type: ignore[arg-type]
    await asyncio.gather(run, return_exceptions=True)
    await asyncio.sleep(0.05)
    return started


def test_a_request_cancelled_before_it_started_is_not_left_counted():
    async def scenario() -> tuple[list[str], int, bool]:
        drain = Drain(())
        started = await _session_cancelled_as_a_request_arrives(drain)
        return started, drain.num_in_flight, await drain.wait_idle(0.5)

    started, in_flight, idle = asyncio.run(scenario())
    assert in_flight == 0 and idle, (started, in_flight)


def test_a_session_opened_while_draining_ends_at_once_and_admits_nothing():
    """The gateway sees the session end and sends its requests elsewhere (UNAVAILABLE, retried)."""

    async def scenario() -> tuple[list[decode_pb2.RequestUpdate], int]:
        drain = Drain(())
        drain.start()
        sent: list[decode_pb2.RequestUpdate] = []

        async def start(request: decode_pb2.GenerateRequest) -> None:
            raise AssertionError("a draining session admits nothing")

        async def requests():
            yield _generate("late")
            await asyncio.sleep(3600)

        async def write(batch: decode_pb2.SessionBatch) -> None:
            sent.extend(batch.updates)

        await asyncio.wait_for(Session(start, drain).run(requests(), write), timeout=5)  # type: ignore[arg-type]
        return sent, drain.num_in_flight

    sent, in_flight = asyncio.run(scenario())
    assert all(u.error_code for u in sent) and in_flight == 0
