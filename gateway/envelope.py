"""Every error a client gets, in the OpenAI error envelope, and the request id that ties it to the log.

The body is always ``{"error": {"message", "type", "param", "code"}}``, ``code`` a string or null as
OpenAI's (``model_not_found``, ``unsupported_parameter``, ``unsupported_value``, ``invalid_api_key``,
``rate_limit_exceeded``; null where OpenAI has none) — from a route, from the web
framework (unknown path 404, wrong method 405, an unparsable body 400), or from the HTTP protocol
layer itself (431 headers too large, 408 headers too slow, 400 not HTTP; ``raw_response``).

``request_id`` is a context variable set once per REST request (``RequestIds``, also sent back as
the ``x-request-id`` header) and per public gRPC call: what an instance said about a failed request
goes to the gateway's log under that id, and the client's message names the id, never the
instance's address or internals.
"""

from __future__ import annotations

import contextvars
import json
import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("pdserve_request_id", default="-")

_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def error_body(
    status: int, message: str, param: str | None = None, type: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = type or _TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    return {
        "error": {
            "message": _printable(message),
            "type": kind,
            "param": param and _printable(param),
            "code": code or _CODES.get(status),
        }
    }


def _printable(text: str) -> str:
    """``text`` that UTF-8 can carry: a message may quote the client (a field name it sent), and a
    lone surrogate there would fail the response's own encoding."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


def raw_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, for the protocol layer
    (before any request reached the app)."""
    body = json.dumps(error_body(status, message)).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class RequestIds:
    """ASGI middleware: a fresh id per HTTP request, in ``request_id`` for the log lines written
    while serving it and in the ``x-request-id`` response header. Never taken from the client
    (that would let it write chosen text into the log)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_id()
        token = request_id.set(rid)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = message | {
                    "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
