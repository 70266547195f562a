"""A gateway's session with a decode instance: many requests over one bidirectional stream.

Per request a session carries exactly what ``Generate`` would: the same responses, and the status it
would end with as the last update's ``error_code``. What differs is the framing: every update made
while the previous batch was being written goes out in the next batch. An engine step that advances
256 requests delivers all of their outputs in one pass of the event loop, so it costs one message
instead of 256 — gRPC's per-message cost (serialization, HTTP/2 framing, a wake-up on each side) is
paid per step, not per token per request, and when the gateway reads slower than the engine runs the
batches simply grow.

The gateway gives a request up with ``cancel_request_id``; a session that ends — closed, cancelled,
or its peer gone — cancels every request it still runs, and their pages go back as they do for a
cancelled ``Generate``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from decode_svc.responses import Responses
from engine.output import RequestOutput
from engine.request_stream import RequestStream
from protos import decode_pb2
from protos.drain import DRAINING, Drain
from protos.errors import AlreadyExists, InvalidArgument, Relayed, ServiceError, Unavailable, service_error

log = logging.getLogger("pdserve.decode")

Start = Callable[[decode_pb2.GenerateRequest], Awaitable[tuple[RequestStream, Responses]]]
CANCEL_GRACE_S = 5.0  # how long the end of a session waits for its requests to give their pages back


class Session:
    def __init__(self, start: Start, drain: Drain) -> None:
        """``drain``: the server's. Each request is admitted through it, so a drain waits for the
        session's running requests; once draining, new requests are refused (UNAVAILABLE: the
        gateway sends them elsewhere) and the session ends with its last request."""
        self.start, self.drain = start, drain
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._outbox: list[decode_pb2.RequestUpdate] = []
        self._ready = asyncio.Event()
        self._reading = True

    async def run(
        self,
        requests: AsyncIterator[decode_pb2.SessionRequest],
        write: Callable[[decode_pb2.SessionBatch], Awaitable[None]],
    ) -> None:
        """Serve until the peer has stopped sending and every request has ended (or the call ends)."""
        reader = asyncio.create_task(self._read(requests), name="session-reader")
        watch = asyncio.create_task(self._watch_stopping(), name="session-stopping")
        try:
            while (self._reading and not self.drain.draining) or self._tasks or self._outbox:
                await self._ready.wait()
                self._ready.clear()
                if self._outbox:
                    batch, self._outbox = self._outbox, []
                    await write(decode_pb2.SessionBatch(updates=batch))
            if not self.drain.draining:
                await reader  # a failed read ends the call with its error
        finally:
            reader.cancel()
            watch.cancel()
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            if tasks:  # let each request give its pages back before the call is gone
                await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)

    async def _watch_stopping(self) -> None:
        await self.drain.started.wait()
        self._ready.set()

    async def _read(self, requests: AsyncIterator[decode_pb2.SessionRequest]) -> None:
        try:
            async for request in requests:
                if request.HasField("generate"):
                    self._start(request.generate)
                elif task := self._tasks.get(request.cancel_request_id):
                    task.cancel()
        finally:
            self._reading = False
            self._ready.set()

    def _start(self, request: decode_pb2.GenerateRequest) -> None:
        request_id = request.request_id
        if not request_id:
            self._fail(request_id, InvalidArgument("request_id: a session's requests must name themselves"))
        elif request_id in self._tasks:
            self._fail(request_id, AlreadyExists(f"request_id: {request_id!r} is already in this session"))
        elif not self.drain.try_admit():
            self._fail(request_id, Unavailable(DRAINING))
        else:
            task = self._tasks[request_id] = asyncio.create_task(
                self._serve(request), name=f"session-{request_id}"
            )
            # Not in _serve's finally: a task cancelled before its first step never runs it.
            task.add_done_callback(functools.partial(self._ended, request_id))

    async def _serve(self, request: decode_pb2.GenerateRequest) -> None:
        request_id = request.request_id
        try:
            stream, responses = await self.start(request)
            # Outputs go straight from the engine loop's delivery into the outbox: a step that
            # advances every request of the session wakes no task per request.
            await stream.forward(functools.partial(self._forward, request_id, responses))
        except asyncio.CancelledError:
            pass  # given up by the gateway, or the session ended: nobody wants an update
        except Exception as exc:
            self._fail(request_id, self._error(request_id, exc))

    def _ended(self, request_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(request_id, None)
        self.drain.release()
        self._ready.set()

    def _forward(self, request_id: str, responses: Responses, out: RequestOutput) -> None:
        update = decode_pb2.RequestUpdate(request_id=request_id)
        try:
            responses.fill(update.response, out)
        except Exception as exc:  # the request's end (deadline, abort, engine gone): its status
            self._fail(request_id, self._error(request_id, exc))
            return
        self._post(update)

    @staticmethod
    def _error(request_id: str, exc: Exception) -> ServiceError:
        err = service_error(exc, "decode")
        if err is None:  # a bug: Generate would end with UNKNOWN, and so does this request
            log.error("request %s failed", request_id, exc_info=exc)
            err = Relayed(grpc.StatusCode.UNKNOWN, f"Unexpected {exc!r}")
        return err

    def _fail(self, request_id: str, err: ServiceError) -> None:
        code = err.code.value[0]
        update = decode_pb2.RequestUpdate(
            request_id=request_id, error_code=code, error_message=err.message, fault=err.fault or ""
        )
        self._post(update)

    def _post(self, update: decode_pb2.RequestUpdate) -> None:
        self._outbox.append(update)
        self._ready.set()
