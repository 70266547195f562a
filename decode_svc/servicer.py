"""One decode request: validate → reserve the prompt's KV pages (RESOURCE_EXHAUSTED if they are not
there, so the caller can go elsewhere) → expect them from the KV receiver → ask the named prefill
instance to fill them → land them in every tensor-parallel rank's pool (``kv_landing``) → hand the
request and its pages to the engine's continuous batch → stream. A request naming no prefill
instance is *colocated*: this engine runs its prompt too, as a non-disaggregated server would (the
gateway's mode when it has no prefill instances).

Whatever ends the request — finish, the client cancelling, the deadline, a failed prefill or
transfer — the pages go back exactly once: to the engine before the hand-over is done, by the
engine after it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from decode_svc.kv_landing import KVLanding
from engine.async_engine import AsyncEngine, EngineFailed, RequestStream
from engine.engine import Engine
from engine.output import RequestOutput
from kvtransfer import KVReceiver, TransferState
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.convert import (
    EARLY_END_STATUS,
    FAULT_METADATA_KEY,
    deadline_ns,
    load_report,
    logprob_from_proto,
    logprob_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)
from protos.serving import CHANNEL_OPTIONS
from protos.tls import TLSConfig, aio_channel

log = logging.getLogger("pdserve.decode")


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        receiver: KVReceiver,
        landing: KVLanding,
        kv_backend: str,
        kv_address: str,
        request_timeout_s: float,
        tls: TLSConfig | None = None,
    ) -> None:
        self.tls = tls
        self.engine, self.receiver, self.landing = engine, receiver, landing
        self.kv_backend, self.kv_address, self.request_timeout_s = kv_backend, kv_address, request_timeout_s
        self.page_size = engine.engine.cfg.page_size
        self.max_num_seqs = engine.engine.cfg.max_num_seqs
        self.num_reserved_pages = 0
        self._admitting: set[str] = set()  # request ids holding a reservation, not yet in the engine
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._seed_rng = random.Random()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    def _prefill(self, address: str) -> prefill_pb2_grpc.PrefillServiceStub:
        if address not in self._channels:
            self._channels[address] = aio_channel(address, self.tls, CHANNEL_OPTIONS)
        return prefill_pb2_grpc.PrefillServiceStub(self._channels[address])

    async def GetLoad(self, request: Any, context: Any) -> Any:
        return load_report(
            self.engine.engine,
            "decode",
            self.num_reserved_pages,
            self.receiver.num_pending,
            self.receiver.num_bytes_received,
        )

    async def Generate(
        self, request: decode_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.GenerateResponse]:
        timing = common_pb2.TimingMarks()
        timing.CopyFrom(request.timing)
        timing.decode_received_ns = time.time_ns()
        request_id = request.request_id or uuid.uuid4().hex
        deadline = deadline_ns(request.deadline_unix_ns, self.request_timeout_s)
        prompt = list(request.prompt_token_ids)
        params = await self._validate(request, context)
        if not request.prefill_address:  # colocated: no prefill instance, the prompt runs here
            async for msg in self._stream(await self._generate_here(request_id, prompt, params, deadline, context),
                                          None, timing, context):  # fmt: skip
                yield msg
            return
        if params.seed is None:  # decided here: prefill samples the first token with the same seed
            params = dataclasses.replace(params, seed=self._seed_rng.getrandbits(63))
        num_pages = -(-len(prompt) // self.page_size)

        def reserve(e: Engine) -> list[int] | None:
            e.check_request(request_id, prompt, params)
            if request_id in self._admitting:
                raise KeyError(request_id)
            if e.scheduler.num_unfinished + len(self._admitting) >= self.max_num_seqs:
                return None
            pages = e.reserve_pages(num_pages)
            if pages is not None:  # counted here, in the same command, so admissions cannot overtake
                self._admitting.add(request_id)
                self.num_reserved_pages += len(pages)
            return pages

        try:
            pages = await self.engine.call(
                reserve, undo=lambda _, p: self._unreserve(request_id, p, free=True)
            )
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except KeyError:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already in flight"
            )
        except EngineFailed as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode engine: {e}")
        if pages is None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"decode is full: {num_pages} KV pages or a sequence slot (max_num_seqs {self.max_num_seqs}) "
                "are not free now; retry later or elsewhere",
            )
        assert pages is not None, "context.abort raised"
        timing.decode_admitted_ns = time.time_ns()
        stream, num_cached = await self._prefill_into(
            request_id, prompt, params, pages, deadline, timing, request, context
        )
        async for msg in self._stream(stream, num_cached, timing, context):
            yield msg

    async def _generate_here(
        self, request_id: str, prompt: list[int], params: Any, deadline: int, context: Any
    ) -> RequestStream:
        """A colocated request: this engine prefills the prompt too (prefix cache, chunked prefill,
        admission: the engine's own queue), like a non-disaggregated server."""
        try:
            return await self.engine.generate(request_id, prompt, params, deadline)
        except EngineFailed as e:  # a dead rank: go elsewhere
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode engine: {e}")
            raise AssertionError("context.abort raised") from e
        except ValueError as e:
            code = grpc.StatusCode.INVALID_ARGUMENT
            if "already running" in str(e):
                code = grpc.StatusCode.ALREADY_EXISTS
            await context.abort(code, str(e))
            raise AssertionError("context.abort raised") from e

    def _unreserve(self, request_id: str, pages: list[int] | None, free: bool) -> None:
        """End an admission: drop the counts; with ``free``, give the pages back (else the engine has them)."""
        if pages is None:
            return
        self._admitting.discard(request_id)
        self.num_reserved_pages -= len(pages)
        if free:
            self.engine.call_soon(lambda eng: eng.free_pages(pages))

    async def _prefill_into(
        self,
        request_id: str,
        prompt: list[int],
        params: Any,
        pages: list[int],
        deadline: int,
        timing: common_pb2.TimingMarks,
        request: decode_pb2.GenerateRequest,
        context: Any,
    ) -> tuple[RequestStream, int]:
        """Have prefill fill ``pages``; returns the engine's stream and the prompt tokens prefill
        found in its prefix cache. Owns ``pages`` until it hands them to ``engine.adopt``."""
        handed_over = False
        call = None
        try:
            self.landing.open(pages)
            pending = self.receiver.expect(request_id, pages, len(prompt), deadline)
            call = self._prefill(request.prefill_address).Prefill(
                prefill_pb2.PrefillRequest(
                    request_id=request_id,
                    prompt_token_ids=prompt,
                    sampling=sampling_to_proto(params),
                    deadline_unix_ns=deadline,
                    kv_destination=prefill_pb2.KVDestination(
                        backend=self.kv_backend,
                        address=self.kv_address,
                        transfer_id=request_id,
                        page_ids=pages,
                    ),
                    timing=timing,
                ),
                timeout=max(0.0, (deadline - time.time_ns()) / 1e9),
            )
            try:
                reply = await call
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code is grpc.StatusCode.DEADLINE_EXCEEDED or time.time_ns() > deadline:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                # Tells a router that the prefill instance failed, not this one (it may retry there).
                context.set_trailing_metadata(((FAULT_METADATA_KEY, "prefill"),))
                await context.abort(code, f"prefill at {request.prefill_address}: {e.details()}")
            result = await pending.wait()
            if result.state is not TransferState.DONE:
                error = result.error
                assert error is not None, "a transfer that is not DONE carries its error"
                await context.abort(error.code, f"KV transfer: {error.message}")
            assert result.first_token == reply.first_token_id, "the KV commit and the reply agree"
            try:
                await self.landing.land(pages)
            except RuntimeError as e:  # a tensor-parallel rank died (EngineFailed included)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode engine: {e}")
            timing.MergeFrom(reply.timing)
            timing.transfer_done_ns = time.time_ns()
            first_lp = logprob_from_proto(reply.first_logprob) if reply.HasField("first_logprob") else None
            handed_over = True  # adopt owns the pages from the call on, even if it raises or is cancelled
            try:
                stream = await self.engine.adopt(
                    request_id, prompt, params, params.seed, pages, reply.first_token_id, first_lp, deadline
                )
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return stream, reply.num_cached_tokens
        finally:
            self._unreserve(request_id, pages, free=not handed_over)
            if not handed_over:
                if call is not None:
                    call.cancel()
                self.receiver.abort(request_id, "decode gave the request up")
                self.landing.close(pages)

    async def _stream(
        self, stream: RequestStream, num_cached: int | None, timing: common_pb2.TimingMarks, context: Any
    ) -> AsyncIterator[decode_pb2.GenerateResponse]:
        """``num_cached``: prompt tokens prefill found cached; None for a colocated request, whose
        outputs carry this engine's count, and whose first token also marks ``prefill_done_ns`` and
        ``transfer_done_ns`` (nothing is transferred)."""
        first = True
        try:
            async for out in stream:
                if out.finish_reason == "error" and self.engine.failure is not None:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"decode engine: {self.engine.failure!r}"
                    )
                if out.finish_reason in EARLY_END_STATUS:
                    await context.abort(
                        EARLY_END_STATUS[out.finish_reason], f"request {out.request_id}: {out.finish_reason}"
                    )
                if first and num_cached is None:
                    timing.prefill_done_ns = timing.transfer_done_ns = time.time_ns()
                if out.num_output_tokens == 2 and out.new_token_ids:
                    timing.first_decode_token_ns = time.time_ns()
                if out.finished:
                    timing.finished_ns = time.time_ns()
                cached = out.num_cached_tokens if num_cached is None else num_cached
                yield self._response(out, cached, timing if first or out.finished else None)
                first = False
        finally:
            stream.close()

    @staticmethod
    def _response(out: RequestOutput, num_cached: int, timing: common_pb2.TimingMarks | None) -> Any:
        return decode_pb2.GenerateResponse(
            token_ids=out.new_token_ids,
            text=out.new_text,
            logprobs=[logprob_to_proto(lp) for lp in out.logprobs],
            finish_reason=out.finish_reason or "",
            usage=decode_pb2.Usage(
                prompt_tokens=out.num_prompt_tokens,
                completion_tokens=out.num_output_tokens,
                cached_tokens=num_cached,
            ),
            timing=timing,
        )

    async def _validate(self, request: decode_pb2.GenerateRequest, context: Any) -> Any:
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}")
        if not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: must not be empty")
        return params
