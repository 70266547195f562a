"""Graceful drain of an instance: once draining, calls that would start new work (admission
methods: ``Generate``, ``Prefill``) are refused with UNAVAILABLE before they touch the service,
while every other call — the KV transfers and health checks the requests already running need —
is still served. A router reads UNAVAILABLE-before-any-work as "go elsewhere" and retries, so a
drained instance loses no request. ``num_in_flight`` counts the admitted work not yet ended — calls
of the admission methods, and requests a long-lived stream (a decode session) admits through
``try_admit`` / ``release`` — and the server waits for it to reach zero (bounded by the drain
timeout) before it stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

DRAINING = "draining: this instance is shutting down"
_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class Drain(grpc.aio.ServerInterceptor):
    def __init__(self, admission_methods: Iterable[str]) -> None:
        """``admission_methods``: full method names, e.g. ``/pdserve.v1.DecodeService/Generate``."""
        self.admission_methods = frozenset(admission_methods)
        self.started = asyncio.Event()  # set when draining begins: streams wait on it
        self.num_in_flight = 0
        self.num_refused = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def draining(self) -> bool:
        return self.started.is_set()

    def start(self) -> None:
        self.started.set()

    def try_admit(self) -> bool:
        """Count one unit of new work in; False (counted as refused) once draining."""
        if self.draining:
            self.num_refused += 1
            return False
        self.num_in_flight += 1
        return True

    def release(self) -> None:
        """The end of work ``try_admit`` let in."""
        self.num_in_flight -= 1
        if not self.num_in_flight:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted call is running; False if some still are after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.num_in_flight:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return self.num_in_flight == 0
        return True

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.admission_methods:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        assert handler.unary_stream is not None, f"{handler_call_details.method}: unsupported call shape"
        return grpc.unary_stream_rpc_method_handler(
            self._stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        if not self.try_admit():
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)

    def _unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._admit(context)
            try:
                return await behavior(request, context)
            finally:
                self.release()

        return admitted

    def _stream(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._admit(context)
            try:
                async for msg in behavior(request, context):
                    yield msg
            finally:
                self.release()

        return admitted
