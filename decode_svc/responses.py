"""What decode sends for each of a request's engine outputs (``Responses.fill``), shared by the
``Generate`` stream and the ``Session`` batches, so both carry the same responses and end with the
same statuses."""

from __future__ import annotations

import time

from engine.async_engine import AsyncEngine
from engine.output import RequestOutput
from protos import common_pb2, decode_pb2
from protos.convert import logprob_to_proto
from protos.errors import EARLY_END_ERRORS, Unavailable


class Responses:
    def __init__(self, engine: AsyncEngine, num_cached: int | None, timing: common_pb2.TimingMarks) -> None:
        """``num_cached``: prompt tokens prefill found cached; None for a colocated request, whose
        outputs carry this engine's count, and whose first token also marks ``prefill_done_ns`` and
        ``transfer_done_ns`` (nothing is transferred)."""
        self.engine, self.num_cached, self.timing = engine, num_cached, timing
        self.first = True

    def fill(self, msg: decode_pb2.GenerateResponse, out: RequestOutput) -> None:
        """Write ``out`` into the empty ``msg``; raises the ``ServiceError`` the request ends with
        when the engine ended it early (deadline, abort, a failed step or engine)."""
        reason = out.finish_reason
        if reason == "error" and self.engine.failure is not None:
            raise Unavailable(f"decode engine: {self.engine.failure!r}")
        if reason in EARLY_END_ERRORS:
            raise EARLY_END_ERRORS[reason](f"request {out.request_id}: {reason}")
        timing = self.timing
        if self.first and self.num_cached is None:
            timing.prefill_done_ns = timing.transfer_done_ns = time.time_ns()
        if out.num_output_tokens == 2 and out.new_token_ids:
            timing.first_decode_token_ns = time.time_ns()
        if out.finished:
            timing.finished_ns = time.time_ns()
        msg.token_ids.extend(out.new_token_ids)
        msg.text = out.new_text
        if out.logprobs:
            msg.logprobs.extend(logprob_to_proto(lp) for lp in out.logprobs)
        msg.finish_reason = reason or ""
        usage = msg.usage
        usage.prompt_tokens, usage.completion_tokens = out.num_prompt_tokens, out.num_output_tokens
        usage.cached_tokens = out.num_cached_tokens if self.num_cached is None else self.num_cached
        if self.first or out.finished:  # the early marks on the first, all of them on the last
            msg.timing.CopyFrom(timing)
        self.first = False
