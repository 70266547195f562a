"""One prefill request: validate → queue in the engine (prompt only, first token sampled with the
request's own seed) → lease its pages → send them layer by layer to the decode instance → release
the lease once decode acknowledged (or on any error, abort or deadline) → answer with the first
token and the timing marks.

Layer by layer (the default with one rank): the engine leases the prompt's pages when the step that
completes the prompt is launched, and layer ``i`` is sent as soon as that step has computed it
(``engine.kv_stream``), so the transfer runs under the prefill and only its last layer's share
remains after the first token. Otherwise (``layerwise=False``, or tensor parallelism) the pages are
leased with the final output and sent after it: with one rank from the pool directly (the leased
pages are written by no step), with tensor parallelism as whole kv heads gathered from every rank
between two steps in ranges of layers (``Engine.read_kv`` through ``call_on_ranks``)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from typing import Any

import grpc
import torch

from engine.async_engine import AsyncEngine, EngineFailed, RequestStream
from engine.distributed.kv_shards import layer_ranges
from engine.engine import Engine
from engine.kv_stream import KVLease, LayerProgress, StepFailed
from engine.output import RequestOutput
from kvtransfer import Destination, KVSender, SendSession, TransferError
from kvtransfer.base import remaining_s
from protos import common_pb2, prefill_pb2, prefill_pb2_grpc
from protos.convert import EARLY_END_STATUS, deadline_ns, load_report, logprob_to_proto, sampling_from_proto

log = logging.getLogger("pdserve.prefill")


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        sender: KVSender,
        kv_backend: str,
        request_timeout_s: float,
        max_queued_requests: int = 4096,
        layerwise: bool = True,
    ) -> None:
        self.max_queued_requests = max_queued_requests
        self.engine, self.sender = engine, sender
        self.kv_backend, self.request_timeout_s = kv_backend, request_timeout_s
        self.model_config = engine.engine.model_config
        self.page_size, self.tp = engine.engine.cfg.page_size, engine.engine.cfg.tp
        # Layer by layer needs the whole heads in this rank's pool (module docstring).
        self.layerwise = layerwise and self.tp == 1
        self.num_leased_pages = 0
        self.num_sending = 0

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> Any:
        timing = common_pb2.TimingMarks()
        timing.CopyFrom(request.timing)
        timing.prefill_received_ns = time.time_ns()
        deadline = deadline_ns(request.deadline_unix_ns, self.request_timeout_s)
        params = await self._validate(request, context)
        try:  # before any work: a layout mismatch is FAILED_PRECONDITION, whatever else is off
            await self.sender.connect(request.kv_destination.address, deadline)
        except TransferError as e:
            await context.abort(e.code, e.message)
        dest = await self._destination(request, context)
        if len(self.engine.engine.scheduler.waiting) >= self.max_queued_requests:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"prefill queue is full ({self.max_queued_requests} waiting); retry later or elsewhere",
            )
        prompt = list(request.prompt_token_ids)
        first_only = dataclasses.replace(params, max_tokens=1, stop=(), ignore_eos=True)
        try:
            stream = await self.engine.generate(
                request.request_id, prompt, first_only, deadline,
                hold_kv=not self.layerwise, stream_kv=self.layerwise,
            )  # fmt: skip
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineFailed as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine: {e}")
        outputs = asyncio.ensure_future(_collect(stream))  # the last one has the first token
        pages: list[int] = []
        sending = False
        try:
            # The lease comes when the prompt's last step is launched (layer by layer), or with the
            # final output; no lease at all when the request ended early (error, deadline, abort).
            lease = stream.kv_lease
            if lease is not None:
                either: set[asyncio.Future[Any]] = {outputs, lease}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            progress = None
            if lease is not None and lease.done():
                pages, progress = lease.result().pages, lease.result().progress
            else:
                pages = (await self._final(outputs, request.request_id, context)).kv_pages or []
            self.num_leased_pages += len(pages)
            self.num_sending += 1
            sending = True
            assert len(pages) == len(dest.page_ids), "a lease holds one page per destination page"
            async with await self.sender.open(dest, pages, len(prompt), deadline) as session:
                await self._send(
                    session, pages, progress, deadline, timing, outputs, request.request_id, context
                )
                final = await self._final(outputs, request.request_id, context)
                timing.prefill_started_ns, timing.prefill_done_ns = final.admitted_ns, outputs.result()[1]
                first_token = final.new_token_ids[0]
                first_logprob = final.logprobs[0] if final.logprobs else None
                await session.commit(first_token, first_logprob)
        except _EngineDown as e:  # a tensor-parallel rank died while its KV was read
            log.error("request %s: reading its KV failed: %s", request.request_id, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine: {e}")
        except StepFailed as e:  # the step computing the KV raised: the final output says how
            await self._final(outputs, request.request_id, context)
            # It finished normally, yet its KV was never reported complete (a forward path that
            # skipped the layer hook: a bug, never a wrong transfer).
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill of {request.request_id}: {e}")
        except Exception as exc:  # a transfer error, or a backend's own (CUDA, NCCL): the transfer failed
            if isinstance(exc, grpc.aio.AbortError):
                raise
            err = (
                exc if isinstance(exc, TransferError) else TransferError(grpc.StatusCode.INTERNAL, repr(exc))
            )
            log.warning("request %s: KV transfer failed: %s", request.request_id, err)
            await context.abort(err.code, f"KV transfer to {dest.address}: {err.message}")
        finally:  # the lease ends here: acknowledged, failed, aborted or past the deadline
            if stream.kv_lease is not None and not stream.kv_lease.done():
                stream.kv_lease.cancel()  # refuse a lease not delivered yet (the engine frees it)
            outputs.cancel()  # a stream left early aborts its request and frees a lease in it
            if sending:
                self.num_leased_pages -= len(pages)
                self.num_sending -= 1
            else:  # cancelled just as a lease arrived
                pages = _unclaimed_lease(stream.kv_lease, outputs)
            if pages:
                self.engine.call_soon(functools.partial(Engine.free_pages, pages=pages))
        timing.transfer_done_ns = time.time_ns()
        return prefill_pb2.PrefillResponse(
            first_token_id=first_token,
            first_logprob=logprob_to_proto(first_logprob),
            num_cached_tokens=final.num_cached_tokens,
            timing=timing,
        )

    async def _send(
        self, session: SendSession, pages: list[int], progress: LayerProgress | None, deadline: int,
        timing: common_pb2.TimingMarks, outputs: asyncio.Future[tuple[list[RequestOutput], int]],
        request_id: str, context: Any,
    ) -> None:  # fmt: skip
        """Every layer of ``pages``: each as soon as the step computing it has (``progress``), or,
        once the prefill finished, from this rank's pool (one rank) or gathered (tensor parallel)."""
        if self.tp == 1:
            for layer in range(self.model_config.num_layers):
                if progress is not None:
                    await self._computed(progress, layer, deadline, outputs, request_id, context)
                timing.transfer_started_ns = timing.transfer_started_ns or time.time_ns()
                await session.send_layer(layer)
            return
        # rank 0's pool is a shard: every rank's heads, joined (Engine.read_kv)
        timing.transfer_started_ns = time.time_ns()
        for layers in layer_ranges(self.model_config, self.page_size, len(pages)):
            kv = await self._read_kv(layers, pages)  # [layers, 2, pages, page_size, heads, dim]
            for i, layer in enumerate(layers):
                await session.send_layer(layer, kv[i])

    async def _computed(
        self, progress: LayerProgress, layer: int, deadline: int,
        outputs: asyncio.Future[tuple[list[RequestOutput], int]], request_id: str, context: Any,
    ) -> None:  # fmt: skip
        """Wait until the step has computed ``layer``, or the request ended with an error status
        first: the engine loop died while that step never returns (a context-parallel rank died
        in its collective) ends the stream, not the step; the deadline bounds the rest."""
        computed = asyncio.ensure_future(progress.wait(layer))
        try:
            waiting: set[asyncio.Future[Any]] = {computed, outputs}
            done, _ = await asyncio.wait(
                waiting, timeout=remaining_s(deadline), return_when=asyncio.FIRST_COMPLETED
            )
            if computed not in done and outputs in done:
                await self._final(outputs, request_id, context)  # aborts unless it finished normally
                done, _ = await asyncio.wait({computed}, timeout=remaining_s(deadline))  # then it is (CUDA)
            if computed not in done:
                raise TransferError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed during the prefill")
            computed.result()  # StepFailed
        finally:
            computed.cancel()

    async def _final(
        self, outputs: asyncio.Future[tuple[list[RequestOutput], int]], request_id: str, context: Any
    ) -> RequestOutput:
        """The request's final output (its first token), or the gRPC error it ended with."""
        final = (await outputs)[0][-1]
        if final.finish_reason == "error" and self.engine.failure is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill engine: {self.engine.failure!r}")
        if final.finish_reason in EARLY_END_STATUS:
            await context.abort(
                EARLY_END_STATUS[final.finish_reason], f"prefill of {request_id}: {final.finish_reason}"
            )
        return final

    async def _read_kv(self, layers: range, pages: list[int]) -> torch.Tensor:
        try:
            return await self.engine.call_on_ranks(lambda e: e.read_kv(pages, layers))
        except RuntimeError as e:  # EngineFailed included
            raise _EngineDown(str(e)) from e

    async def _validate(self, request: prefill_pb2.PrefillRequest, context: Any) -> Any:
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}")
        problems = []
        if not request.request_id:
            problems.append("request_id: required")
        if not request.sampling.HasField("seed"):
            problems.append("sampling.seed: required (decode picks it so both sides sample alike)")
        kv = request.kv_destination
        if not kv.address or not kv.transfer_id:
            problems.append("kv_destination: address and transfer_id are required")
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        return params

    async def _destination(self, request: prefill_pb2.PrefillRequest, context: Any) -> Destination:
        problems = []
        kv = request.kv_destination
        if kv.backend != self.kv_backend:
            problems.append(
                f"kv_destination.backend: this instance sends with {self.kv_backend!r}, not {kv.backend!r}"
            )
        num_pages = -(-len(request.prompt_token_ids) // self.page_size)
        if len(kv.page_ids) != num_pages:
            num_tokens = len(request.prompt_token_ids)
            problems.append(
                f"kv_destination.page_ids: {len(kv.page_ids)} pages for a {num_tokens}-token prompt "
                f"(need {num_pages})"
            )
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        return Destination(kv.address, kv.transfer_id, tuple(kv.page_ids))

    async def GetLoad(self, request: Any, context: Any) -> Any:
        return load_report(
            self.engine.engine, "prefill", self.num_leased_pages, self.num_sending, self.sender.num_bytes_sent
        )


async def _collect(stream: RequestStream) -> tuple[list[RequestOutput], int]:
    """The request's outputs and when the last (the first token) arrived (unix ns)."""
    outputs = [out async for out in stream]
    return outputs, time.time_ns()


def _unclaimed_lease(
    lease: asyncio.Future[KVLease] | None, outputs: asyncio.Future[tuple[list[RequestOutput], int]]
) -> list[int]:
    """Pages leased to a handler that was cancelled before it took them."""
    if lease is not None and lease.done() and not lease.cancelled():
        return lease.result().pages
    if outputs.done() and not outputs.cancelled() and outputs.exception() is None:
        return outputs.result()[0][-1].kv_pages or []
    return []


class _EngineDown(Exception):
    """The engine could not read a request's KV (a tensor-parallel rank is gone)."""
