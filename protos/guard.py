"""Every pdserve gRPC server decodes its requests itself (``RequestGuard``), so a malformed message
is INVALID_ARGUMENT with at most one log line, not gRPC's own UNKNOWN / INTERNAL with a traceback
per call; and the public API checks its credentials before it parses a byte (``authorize``).

gRPC would deserialize a request before the servicer runs, and on failure log an ERROR with a
traceback for every call: a log anyone who reaches the port can fill. Here each method's handler
gets an identity deserializer and a behaviour that parses the bytes, so the failure is ours to
answer (INVALID_ARGUMENT) and to log (``PeerLogLimiter``: once per peer host per interval, with the
count of what was held back).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protos.errors import InvalidArgument, ServiceError

log = logging.getLogger("pdserve.grpc")

# ``authorize(method, metadata)`` raises a ``ServiceError`` (``Unauthenticated``) to refuse a call.
Authorize = Callable[[str, Sequence[tuple[str, str | bytes]]], None]


class MalformedMessage(InvalidArgument):
    """A request message that does not parse (raised into a servicer's request iterator)."""


class PeerLogLimiter:
    """At most one line per peer host per ``interval_s``; the next line says how many were held
    back. Peers are keyed by host (a client's port changes with every connection) and at most
    ``max_peers`` are remembered."""

    def __init__(self, interval_s: float = 60.0, max_peers: int = 1024) -> None:
        self.interval_s, self.max_peers = interval_s, max_peers
        self._peers: OrderedDict[str, tuple[float, int]] = OrderedDict()  # host -> (last line, held back)

    def warning(self, peer: str, message: str) -> bool:
        """Log ``message`` about ``peer`` unless a line about it went out within the interval."""
        host = peer_host(peer)
        now = time.monotonic()
        last, held = self._peers.pop(host, (float("-inf"), 0))
        if now - last < self.interval_s:
            self._peers[host] = (last, held + 1)
            return False
        self._peers[host] = (now, 0)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        more = f" ({held} more from this peer since the last line)" if held else ""
        log.warning("%s from %s%s", message, host, more)
        return True


def peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` → ``1.2.3.4``; ``ipv6:[::1]:5678`` → ``[::1]``; others unchanged."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0]
    return peer


class RequestGuard(grpc.aio.ServerInterceptor):
    """Swaps each method handler for one that authorizes (methods under ``protected`` prefixes,
    when ``authorize`` is given), then parses the request bytes itself."""

    def __init__(
        self,
        authorize: Authorize | None = None,
        protected: Sequence[str] = (),
        limiter: PeerLogLimiter | None = None,
    ) -> None:
        self.authorize, self.protected = authorize, tuple(protected)
        self.limiter = limiter or PeerLogLimiter()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        check = self.authorize if self.authorize and method.startswith(self.protected) else None
        metadata = tuple(details.invocation_metadata or ())  # type: ignore[attr-defined]
        parse = handler.request_deserializer
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour):
                wrapped = self._wrap(kind, behaviour, parse, method, metadata, check)
                return handler._replace(request_deserializer=None, **{kind: wrapped})  # type: ignore[attr-defined]
        return handler

    def _wrap(
        self,
        kind: str,
        behaviour: Callable[..., Any],
        parse: Callable[[bytes], Any],
        method: str,
        metadata: tuple[tuple[str, str | bytes], ...],
        check: Authorize | None,
    ) -> Callable[..., Any]:
        guard = self

        async def admit(context: grpc.aio.ServicerContext) -> None:
            if check is not None:
                try:
                    check(method, metadata)
                except ServiceError as e:
                    await context.abort(e.code, e.message)

        async def decode(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                return parse(data)
            except DecodeError:
                guard.limiter.warning(context.peer(), f"malformed {method} request")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request message does not parse")

        async def messages(
            raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async for data in raw:
                try:
                    yield parse(data)
                except DecodeError:
                    guard.limiter.warning(context.peer(), f"malformed {method} message")
                    raise MalformedMessage("a stream message does not parse") from None

        async def ended_by(error: MalformedMessage, context: grpc.aio.ServicerContext) -> None:
            await context.abort(error.code, error.message)

        if kind.startswith("stream"):
            if inspect.isasyncgenfunction(behaviour):

                async def stream_gen(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                    await admit(context)
                    try:
                        async for reply in behaviour(messages(raw, context), context):
                            yield reply
                    except MalformedMessage as e:
                        await ended_by(e, context)

                return stream_gen

            async def stream_call(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                await admit(context)
                try:
                    return await behaviour(messages(raw, context), context)
                except MalformedMessage as e:
                    await ended_by(e, context)

            return stream_call

        if inspect.isasyncgenfunction(behaviour):

            async def unary_gen(data: bytes, context: grpc.aio.ServicerContext) -> Any:
                await admit(context)
                request = await decode(data, context)
                async for reply in behaviour(request, context):
                    yield reply

            return unary_gen

        async def unary_call(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            return await behaviour(await decode(data, context), context)

        return unary_call
