"""The outputs of one request as an async iterator (``AsyncEngine.generate`` / ``adopt`` return it)."""

from __future__ import annotations

import asyncio
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

    def close(self) -> None:
        """Abort the request unless it finished, and give back leases nobody will read."""
        self.owner.detach(self)
