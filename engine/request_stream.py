"""The outputs of one request as an async iterator (``AsyncEngine.generate`` / ``adopt`` return it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.kv_stream import KVLease
from engine.output import RequestOutput

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine


class RequestStream:
    """The outputs of one request; iterate with ``async for``. See ``engine.async_engine``'s contract."""

    def __init__(self, owner: AsyncEngine, request_id: str) -> None:
        self.owner, self.request_id = owner, request_id
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False
        self.kv_lease: asyncio.Future[KVLease] | None = None  # ``generate(stream_kv=True)`` only
        self._sink: Callable[[RequestOutput], None] | None = None
        self._ended: asyncio.Future[None] | None = None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self.queue.get()
        except BaseException:
            self.close()
            raise
        self.finished = out.finished
        return out

    def put(self, out: RequestOutput) -> None:
        """The engine loop's delivery of the next output: queued, or handed to the sink."""
        if self._sink is None:
            self.queue.put_nowait(out)
            return
        self._sink(out)
        if out.finished and self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    async def forward(self, sink: Callable[[RequestOutput], None]) -> None:
        """Hand every output, in order, to ``sink`` as the engine delivers it — a plain call on the
        event loop, no task woken per output — and return after the last. A consumer of many
        streams (a decode session) handles a whole step's outputs in one pass this way. ``sink``
        must not raise, and owns any lease in an output. Cancelling the wait closes the stream."""
        self._ended = asyncio.get_running_loop().create_future()
        while not self.queue.empty() and not self.finished:  # what came before, first
            out = self.queue.get_nowait()
            self.finished = out.finished
            sink(out)
        if self.finished:
            return
        self._sink = sink
        try:
            await self._ended
            self.finished = True
        except BaseException:
            self._sink = None
            self.close()
            raise

    def close(self) -> None:
        """Abort the request unless it finished, and give back leases nobody will read."""
        self.owner.detach(self)
