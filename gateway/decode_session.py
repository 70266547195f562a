"""The gateway's end of a decode ``Session``: one bidirectional stream per decode instance carries
every request the gateway sends there (see ``decode_svc/session.py`` for why).

``DecodeSession.generate`` looks like a ``Generate`` call to its caller: it yields the request's
responses and raises ``DecodeError`` with the status, message and fault a ``Generate`` call would end
with. Each iteration yields *every* response that arrived since the last one, so a consumer that
falls behind (a slow client, a busy event loop) catches up in one step instead of one per token.

The stream opens on the first request and reopens on the next request after it broke. A broken
stream ends each of its requests with UNAVAILABLE (a request that had no response yet is retried
elsewhere by the caller). Every request also has a timer at its deadline plus a grace period, so a
decode instance that stops answering cannot hold a client past its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator

import grpc

from protos import decode_pb2, decode_pb2_grpc

log = logging.getLogger("pdserve.gateway")

DEADLINE_GRACE_S = 2.0  # decode ends a request at its deadline itself; this only catches a silent one


class DecodeError(Exception):
    """How a request ended on decode, as a ``Generate`` call's status would say it."""

    def __init__(self, code: grpc.StatusCode, details: str, fault: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.fault = code, details, fault


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Mailbox:
    """A request's updates as they arrive, and a wake-up for its consumer."""

    def __init__(self) -> None:
        self.updates: deque[decode_pb2.RequestUpdate | DecodeError] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, update: decode_pb2.RequestUpdate | DecodeError) -> None:
        self.updates.append(update)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[decode_pb2.RequestUpdate | DecodeError]:
        while not self.updates:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        taken = list(self.updates)
        self.updates.clear()
        return taken


class DecodeSession:
    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.stub = decode_pb2_grpc.DecodeServiceStub(channel)
        self.address = address
        self._call: grpc.aio.StreamStreamCall | None = None
        self._outgoing: asyncio.Queue[decode_pb2.SessionRequest] = asyncio.Queue()
        self._boxes: dict[str, _Mailbox] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def num_requests(self) -> int:
        return len(self._boxes)

    async def generate(
        self, request: decode_pb2.GenerateRequest
    ) -> AsyncGenerator[list[decode_pb2.GenerateResponse], None]:
        """The request's responses, batched as they arrived; raises ``DecodeError`` as it ends."""
        request_id = request.request_id
        box = self._boxes[request_id] = _Mailbox()
        self._open()
        self._outgoing.put_nowait(decode_pb2.SessionRequest(generate=request))
        grace = max(0.0, (request.deadline_unix_ns - time.time_ns()) / 1e9) + DEADLINE_GRACE_S
        timer = asyncio.get_running_loop().call_later(grace, box.put, _silent(self.address))
        ended = False  # decode ended it (its last response, or its error): nothing to cancel
        try:
            while not ended:
                responses, error = [], None
                for update in await box.take():
                    if isinstance(update, DecodeError):  # the session broke, or decode went silent
                        error = update
                        break
                    if update.error_code:
                        ended = True
                        error = DecodeError(
                            _CODES[update.error_code], update.error_message, update.fault or None
                        )
                        break
                    responses.append(update.response)
                    ended = bool(update.response.finish_reason)
                if responses:  # what decode sent before an error still reaches the caller
                    yield responses
                if error is not None:
                    raise error
        finally:
            timer.cancel()
            del self._boxes[request_id]
            if not ended and self._call is not None:  # given up (the caller, or the deadline): decode too
                self._outgoing.put_nowait(decode_pb2.SessionRequest(cancel_request_id=request_id))

    def _open(self) -> None:
        if self._call is not None:
            return
        self._outgoing = asyncio.Queue()
        call = self._call = self.stub.Session()
        self._tasks = [
            asyncio.create_task(self._send(call), name=f"session-send-{self.address}"),
            asyncio.create_task(self._receive(call), name=f"session-receive-{self.address}"),
        ]

    async def _send(self, call: grpc.aio.StreamStreamCall) -> None:
        outgoing = self._outgoing
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while True:
                await call.write(await outgoing.get())

    async def _receive(self, call: grpc.aio.StreamStreamCall) -> None:
        error = DecodeError(grpc.StatusCode.UNAVAILABLE, f"decode at {self.address}: the session ended")
        try:
            async for batch in call:
                for update in batch.updates:
                    box = self._boxes.get(update.request_id)
                    if box is not None:  # else: given up, and its cancel is on the way
                        box.put(update)
        except grpc.aio.AioRpcError as e:
            error = DecodeError(
                grpc.StatusCode.UNAVAILABLE, f"decode at {self.address}: {e.code().name}: {e.details()}"
            )
            log.warning("session with decode %s broke: %s", self.address, error.details)
        finally:
            if self._call is call:
                self._call = None
                for task in self._tasks:
                    if task is not asyncio.current_task():
                        task.cancel()
            for box in self._boxes.values():
                box.put(error)

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _silent(address: str) -> DecodeError:
    return DecodeError(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"decode at {address} sent nothing past the request's deadline"
    )
