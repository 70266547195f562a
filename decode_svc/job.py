"""One decode request's state from admission to the engine's stream (``DecodeJob``), and the
admissions holding reserved pages (``Admissions``).

Disaggregated: ``Admissions.reserve`` takes the prompt's KV pages (RESOURCE_EXHAUSTED if they are
not there, so the caller can go elsewhere) → ``DecodeJob.fill`` expects them from the KV receiver,
asks the named prefill instance to fill them, lands them in every tensor-parallel rank's pool
(``kv_landing``) and hands the request and its pages to the engine's continuous batch. Colocated
(no prefill instance named): ``DecodeJob.run_here`` has this engine run the prompt too.

Whatever ends the request — finish, the client cancelling, the deadline, a failed prefill or
transfer — the pages go back exactly once: to the engine before the hand-over is done, by the
engine after it. Errors are raised as ``protos.errors`` types; the servicer turns them into statuses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from decode_svc.kv_landing import KVLanding
from engine.async_engine import AsyncEngine, RequestStream
from engine.engine import Engine
from engine.output import TokenLogprob
from engine.sampling_params import SamplingParams
from kvtransfer import KVReceiver, PendingTransfer, TransferState
from kvtransfer.base import remaining_s
from protos import common_pb2, prefill_pb2, prefill_pb2_grpc
from protos.convert import logprob_from_proto, sampling_to_proto
from protos.errors import AlreadyExists, Relayed, ResourceExhausted, Unavailable


@dataclass(frozen=True)
class KVPath:
    """Where prefill sends a request's KV and how it becomes readable here."""

    receiver: KVReceiver
    landing: KVLanding
    backend: str
    address: str  # this instance's KVTransfer address, given to prefill


class DecodeJob:
    """One request: colocated, ``run_here``; else ``Admissions.reserve`` → ``fill`` (prefill →
    receive → land → adopt). ``pages`` are this job's from the reservation to the hand-over."""

    def __init__(
        self, engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams,
        deadline: int, timing: common_pb2.TimingMarks,
    ) -> None:  # fmt: skip
        self.engine, self.request_id, self.prompt, self.params = engine, request_id, prompt, params
        self.deadline, self.timing = deadline, timing
        self.pages: list[int] | None = None  # reserved, not yet handed to the engine
        self.call: grpc.aio.UnaryUnaryCall | None = None

    async def run_here(self) -> RequestStream:
        """A colocated request: this engine prefills the prompt too (prefix cache, chunked prefill,
        admission: the engine's own queue), like a non-disaggregated server."""
        return await self.engine.generate(self.request_id, self.prompt, self.params, self.deadline)

    async def fill(
        self,
        prefill_stub: Callable[[str], prefill_pb2_grpc.PrefillServiceStub],
        prefill_address: str,
        kv: KVPath,
        admissions: Admissions,
    ) -> tuple[RequestStream, int]:
        """Have the prefill instance at ``prefill_address`` fill the reserved pages, then hand them to
        the engine; returns the engine's stream and the prompt tokens prefill found in its prefix
        cache. The pages go back here on any error or cancellation before the hand-over."""
        pages = self.pages
        assert pages is not None, "reserve first"
        assert self.params.seed is not None, "fixed by the servicer: prefill samples the first token with it"
        handed_over = False
        try:
            kv.landing.open(pages)
            pending = kv.receiver.expect(self.request_id, pages, len(self.prompt), self.deadline)
            prefill = prefill_stub(prefill_address)
            self.call = prefill.Prefill(self._prefill_request(kv), timeout=remaining_s(self.deadline))
            reply = await self._reply(prefill_address)
            await self._land(pending, reply, kv.landing)
            first_logprob = self._arrived(reply)
            handed_over = True  # adopt owns the pages from the call on, even if it raises or is cancelled
            stream = await self.engine.adopt(
                self.request_id, self.prompt, self.params, self.params.seed, pages,
                reply.first_token_id, first_logprob, self.deadline,
            )  # fmt: skip
            return stream, reply.num_cached_tokens
        finally:
            admissions.release(self, free=not handed_over)
            if not handed_over:
                if self.call is not None:
                    self.call.cancel()
                kv.receiver.abort(self.request_id, "decode gave the request up")
                kv.landing.close(pages)

    def _prefill_request(self, kv: KVPath) -> prefill_pb2.PrefillRequest:
        assert self.pages is not None, "reserve first"
        return prefill_pb2.PrefillRequest(
            request_id=self.request_id,
            prompt_token_ids=self.prompt,
            sampling=sampling_to_proto(self.params),
            deadline_unix_ns=self.deadline,
            kv_destination=prefill_pb2.KVDestination(
                backend=kv.backend, address=kv.address, transfer_id=self.request_id, page_ids=self.pages
            ),
            timing=self.timing,
        )

    async def _reply(self, prefill_address: str) -> prefill_pb2.PrefillResponse:
        """Prefill's answer, or its status passed on, marked as prefill's fault (a router may retry
        with another prefill instance)."""
        assert self.call is not None, "called"
        try:
            return await self.call
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code is grpc.StatusCode.DEADLINE_EXCEEDED or time.time_ns() > self.deadline:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise Relayed(code, f"prefill at {prefill_address}: {e.details()}", fault="prefill") from e

    async def _land(
        self, pending: PendingTransfer, reply: prefill_pb2.PrefillResponse, landing: KVLanding
    ) -> None:
        """Wait for the transfer's end, then make the pages readable by every rank."""
        assert self.pages is not None, "reserve first"
        result = await pending.wait()
        if result.state is not TransferState.DONE:
            error = result.error
            assert error is not None, "a transfer that is not DONE carries its error"
            raise Relayed(error.code, f"KV transfer: {error.message}")
        assert result.first_token == reply.first_token_id, "the KV commit and the reply agree"
        try:
            await landing.land(self.pages)
        except RuntimeError as e:  # a tensor-parallel rank died (EngineFailed included)
            raise Unavailable(f"decode engine: {e}") from e

    def _arrived(self, reply: prefill_pb2.PrefillResponse) -> TokenLogprob | None:
        """Mark the KV and the first token arrived; the first token's logprob, if asked for."""
        self.timing.MergeFrom(reply.timing)
        self.timing.transfer_done_ns = time.time_ns()
        return logprob_from_proto(reply.first_logprob) if reply.HasField("first_logprob") else None


class Admissions:
    """Requests holding reserved pages, not yet in the engine. Reserving counts them in the same
    engine command that takes the pages, so concurrent admissions cannot overtake each other."""

    def __init__(self, engine: AsyncEngine, page_size: int, max_num_seqs: int) -> None:
        self.engine, self.page_size, self.max_num_seqs = engine, page_size, max_num_seqs
        self._jobs: dict[str, DecodeJob] = {}

    @property
    def num_reserved_pages(self) -> int:
        return sum(len(job.pages or ()) for job in self._jobs.values())

    async def reserve(self, job: DecodeJob) -> None:
        """Take ``job``'s prompt pages; raises ``ResourceExhausted`` when the pages or a sequence
        slot are not free now, ``AlreadyExists`` when its id is being admitted, and the engine's
        errors (``InvalidRequest``, ``AlreadyRunning``) when the request cannot run here."""
        num_pages = -(-len(job.prompt) // self.page_size)

        def reserve(e: Engine) -> list[int] | None:
            e.check_request(job.request_id, job.prompt, job.params)
            if job.request_id in self._jobs:
                raise AlreadyExists(f"request_id: {job.request_id!r} is already in flight")
            if e.load().num_unfinished + len(self._jobs) >= self.max_num_seqs:
                return None
            pages = e.reserve_pages(num_pages)
            if pages is not None:
                job.pages = pages
                self._jobs[job.request_id] = job
            return pages

        pages = await self.engine.call(reserve, undo=lambda _, p: self.release(job, free=True))
        if pages is None:
            raise ResourceExhausted(
                f"decode is full: {num_pages} KV pages or a sequence slot (max_num_seqs {self.max_num_seqs}) "
                "are not free now; retry later or elsewhere"
            )

    def release(self, job: DecodeJob, free: bool) -> None:
        """End an admission; with ``free``, give the pages back (else the engine has them)."""
        pages, job.pages = job.pages, None
        if pages is None:
            return
        self._jobs.pop(job.request_id, None)
        if free:
            self.engine.call_soon(lambda eng: eng.free_pages(pages))
