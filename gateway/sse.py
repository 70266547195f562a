"""Server-sent event frames of one streamed request, built for a per-token hot path.

Every chunk of a stream repeats the same envelope (id, object, created, model); only ``choices``
changes. The envelope is serialized once per request and each event is that prefix, the choice
serialized by orjson (a C serializer, several times faster than ``json.dumps`` on these small
dicts) and a fixed suffix — no per-chunk envelope dict, no per-chunk ``time.time()``.
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
        head = orjson.dumps({"id": request_id, "object": kind, "created": int(time.time()), "model": model})
        self._prefix = b"data: " + head[:-1] + b',"choices":['

    def event(self, choice: dict[str, Any]) -> bytes:
        return self._prefix + orjson.dumps(choice) + b"]}\n\n"

    def usage(self, usage: Usage) -> bytes:
        """The extra last event of ``stream_options.include_usage``: no choices, the request's usage."""
        return self._prefix + b'],"usage":' + orjson.dumps(usage_body(usage)) + b"}\n\n"

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(body) + b"\n\n"
