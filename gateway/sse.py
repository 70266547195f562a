"""Server-sent event frames of one streamed request, built for a per-token hot path.

Every chunk of a stream repeats the same envelope (id, object, created, model); only ``choices``
changes. The envelope is serialized once per request and each event is that prefix, the choice
serialized by orjson (a C serializer, several times faster than ``json.dumps`` on these small
dicts) and a fixed suffix — no per-chunk envelope dict, no per-chunk ``time.time()``.

orjson writes non-ASCII text as UTF-8, which is valid JSON; but U+0085, U+2028 and U+2029 are line
breaks to every client that splits a stream with ``str.splitlines`` (httpx's ``iter_lines``
among them), which would cut an event in two. They are written as JSON escapes, as
``json.dumps`` does for all non-ASCII text.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway.generation import Usage
from gateway.openai_api import usage_body

DONE = b"data: [DONE]\n\n"


class SSEFrames:
    def __init__(self, kind: str, request_id: str, model: str) -> None:
        head = _dumps({"id": request_id, "object": kind, "created": int(time.time()), "model": model})
        self._prefix = b"data: " + head[:-1] + b',"choices":['

    def event(self, choice: dict[str, Any]) -> bytes:
        return self._prefix + _dumps(choice) + b"]}\n\n"

    def usage(self, usage: Usage) -> bytes:
        """The extra last event of ``stream_options.include_usage``: no choices, the request's usage."""
        return self._prefix + b'],"usage":' + _dumps(usage_body(usage)) + b"}\n\n"

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return b"data: " + _dumps(body) + b"\n\n"


_LINE_BREAKS = (
    ("\u0085".encode(), b"\\u0085"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def _dumps(value: Any) -> bytes:
    data = orjson.dumps(value)
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data
