"""One access line per request the generation pipeline serves (``--disable-log-requests`` turns
them off), written when the request ends, whatever ended it:

    access id=cmpl-3f2a route=completions status=200 prompt_tokens=12 output_tokens=16
    ttft_ms=41.2 e2e_ms=208.9 prefill=127.0.0.1:41003 decode=127.0.0.1:41007

``status`` is the HTTP status the client was answered with (for the gRPC API, the HTTP equivalent
of its status code); 499 when the client went away first. ``prefill`` / ``decode`` are the
instances that served it (the last ones tried, after retries); "-" where none was picked.

The instances are noted by the pools' ``on_pick`` hook (``note_instance``) into the current
request's entry — a context variable: the pipeline runs inside the request's own task — so the
pipeline itself carries no logging code.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from gateway.errors import APIError
from gateway.generation import Chunk, Generator

log = logging.getLogger("pdserve.access")
CLIENT_CLOSED = 499  # the client left before the end (nginx's code for it)


@dataclass
class AccessEntry:
    request_id: str
    route: str
    num_prompt_tokens: int
    started: float = field(default_factory=time.monotonic)
    instances: dict[str, str] = field(default_factory=dict)  # role -> address
    ttft_s: float | None = None
    num_output_tokens: int = 0
    status: int = 200
    finished: bool = False  # the final chunk went out: leaving the stream now is no client abort

    def fields(self) -> dict[str, object]:
        return {
            "id": self.request_id,
            "route": self.route,
            "status": self.status,
            "prompt_tokens": self.num_prompt_tokens,
            "output_tokens": self.num_output_tokens,
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1e3, 1),
            "e2e_ms": round((time.monotonic() - self.started) * 1e3, 1),
            "prefill": self.instances.get("prefill", "-"),
            "decode": self.instances.get("decode", "-"),
        }

    def line(self, fields: dict[str, object]) -> str:
        return "access " + " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())


_current: contextvars.ContextVar[AccessEntry | None] = contextvars.ContextVar("access_entry", default=None)


def note_instance(role: str, address: str) -> None:
    """The current request was routed to ``address`` for ``role`` (a pool's ``on_pick`` hook)."""
    entry = _current.get()
    if entry is not None:
        entry.instances[role] = address


class LoggedGenerator(Generator):
    """The generation pipeline, writing an access line for every request it ends."""

    log_requests: bool = True

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        api: str,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Chunk]:
        if not self.log_requests:
            async for chunk in super().generate(prompt_ids, params, api, request_id, timeout_s):
                yield chunk
            return
        entry = AccessEntry(request_id or "-", api, len(prompt_ids))
        _current.set(entry)
        try:
            async for chunk in super().generate(prompt_ids, params, api, request_id, timeout_s):
                if chunk.token_ids and entry.ttft_s is None:
                    entry.ttft_s = time.monotonic() - entry.started
                entry.num_output_tokens += len(chunk.token_ids)
                entry.finished = entry.finished or chunk.finish_reason is not None
                yield chunk
        except APIError as e:
            entry.status = e.status
            raise
        except BaseException:
            if not entry.finished:
                entry.status = CLIENT_CLOSED
            raise
        finally:
            _current.set(None)
            fields = entry.fields()
            log.info(entry.line(fields), extra={"access": fields})
