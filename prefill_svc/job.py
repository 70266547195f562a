"""One prefill request's state from queueing to the answer: its engine stream, its lease, its
transfer, its deadline and how it ended (``PrefillJob``).

Layer by layer (the default with one rank): the engine leases the prompt's pages when the step that
completes the prompt is launched, and layer ``i`` is sent as soon as that step has computed it
(``engine.kv_stream``), so the transfer runs under the prefill and only its last layer's share
remains after the first token. Otherwise (``layerwise=False``, or tensor parallelism) the pages are
leased with the final output and sent after it: with one rank from the pool directly (the leased
pages are written by no step), with tensor parallelism as whole kv heads gathered from every rank
between two steps in ranges of layers (``Engine.read_kv`` through ``call_on_ranks``).

Errors are raised as ``protos.errors`` types; the servicer turns them into statuses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from typing import Any

import grpc
import torch

from engine.async_engine import AsyncEngine, RequestStream
from engine.distributed.kv_shards import layer_ranges
from engine.engine import Engine
from engine.kv_stream import KVLease, LayerProgress, StepFailed
from engine.output import RequestOutput
from engine.sampling_params import SamplingParams
from kvtransfer import Destination, KVSender, SendSession, TransferError
from kvtransfer.base import remaining_s
from protos import common_pb2, prefill_pb2
from protos.convert import logprob_to_proto
from protos.errors import EARLY_END_ERRORS, Internal, Relayed, ServiceError, Unavailable

log = logging.getLogger("pdserve.prefill")
Outputs = asyncio.Future[tuple[list[RequestOutput], int]]  # every output, and when the last came (unix ns)


class PrefillJob:
    """One request: ``run`` (queue the prompt) → ``take_lease`` → ``send`` (layers, then the first
    token) → ``finish`` (the lease goes back, whatever the ending) → ``response``."""

    def __init__(
        self, engine: AsyncEngine, request: prefill_pb2.PrefillRequest, params: SamplingParams,
        dest: Destination, deadline: int, timing: common_pb2.TimingMarks,
    ) -> None:  # fmt: skip
        self.engine, self.params, self.dest = engine, params, dest
        self.request_id, self.prompt = request.request_id, list(request.prompt_token_ids)
        self.deadline, self.timing = deadline, timing
        self.num_layers = engine.engine.model_config.num_layers
        self.stream: RequestStream | None = None
        self.outputs: Outputs | None = None
        self.pages: list[int] = []  # the lease, once taken: this job frees it
        self.progress: LayerProgress | None = None  # layer by layer: the step computing the pages
        self.final: RequestOutput | None = None  # the output with the first token

    @property
    def num_held_pages(self) -> int:
        return len(self.pages)

    async def run(self, layerwise: bool) -> None:
        """Queue the prompt alone; the first token is sampled with the request's own seed and
        sampling params (min_tokens and ignore_eos included: they decide whether EOS may be drawn)."""
        first_only = dataclasses.replace(self.params, max_tokens=1, stop=())
        self.stream = await self.engine.generate(
            self.request_id, self.prompt, first_only, self.deadline,
            hold_kv=not layerwise, stream_kv=layerwise,
        )  # fmt: skip
        self.outputs = asyncio.ensure_future(_collect(self.stream))

    async def take_lease(self) -> None:
        """The lease comes when the prompt's last step is launched (layer by layer), or with the
        final output; none when the request ended early (error, deadline, abort: raised here)."""
        assert self.stream is not None and self.outputs is not None, "run first"
        lease = self.stream.kv_lease
        if lease is not None:
            either: set[asyncio.Future[Any]] = {self.outputs, lease}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if lease is not None and lease.done():
            self.pages, self.progress = lease.result().pages, lease.result().progress
        else:
            self.pages = (await self._final()).kv_pages or []

    async def send(self, sender: KVSender, tp: int, page_size: int) -> None:
        """Every layer of the leased pages, then the first token; a transfer that fails ends the
        request with the status its error names (INTERNAL for a backend's own: CUDA, NCCL)."""
        try:
            assert len(self.pages) == len(self.dest.page_ids), "a lease holds one page per destination page"
            async with await sender.open(self.dest, self.pages, len(self.prompt), self.deadline) as session:
                if tp == 1:
                    await self._send_from_pool(session)
                else:
                    await self._send_gathered(session, page_size)
                final = await self._final()
                assert self.outputs is not None, "run first"
                self.timing.prefill_started_ns = final.admitted_ns
                self.timing.prefill_done_ns = self.outputs.result()[1]
                await session.commit(final.new_token_ids[0], final.logprobs[0] if final.logprobs else None)
        except ServiceError:
            raise
        except StepFailed as e:  # the step computing the KV raised: the final output says how
            await self._final()
            # It finished normally, yet its KV was never reported complete (a forward path that
            # skipped the layer hook: a bug, never a wrong transfer).
            raise Internal(f"prefill of {self.request_id}: {e}") from e
        except Exception as exc:
            err = (
                exc if isinstance(exc, TransferError) else TransferError(grpc.StatusCode.INTERNAL, repr(exc))
            )
            log.warning("request %s: KV transfer failed: %s", self.request_id, err)
            raise Relayed(err.code, f"KV transfer to {self.dest.address}: {err.message}") from exc

    def finish(self) -> None:
        """End the lease: acknowledged, failed, aborted or past the deadline."""
        if self.stream is None:
            return
        lease = self.stream.kv_lease
        if lease is not None and not lease.done():
            lease.cancel()  # refuse a lease not delivered yet (the engine frees it)
        assert self.outputs is not None, "set with the stream"
        self.outputs.cancel()  # a stream left early aborts its request and frees a lease in it
        pages = self.pages or _unclaimed_lease(lease, self.outputs)  # cancelled just as a lease came
        self.pages = []
        if pages:
            self.engine.call_soon(functools.partial(Engine.free_pages, pages=pages))

    def response(self) -> prefill_pb2.PrefillResponse:
        self.timing.transfer_done_ns = time.time_ns()
        final = self.final
        assert final is not None, "answered after a commit only"
        first_logprob = final.logprobs[0] if final.logprobs else None
        return prefill_pb2.PrefillResponse(
            first_token_id=final.new_token_ids[0],
            first_logprob=logprob_to_proto(first_logprob),
            num_cached_tokens=final.num_cached_tokens,
            timing=self.timing,
        )

    async def _send_from_pool(self, session: SendSession) -> None:
        """This rank's pool holds every kv head: each layer as soon as the step has computed it."""
        for layer in range(self.num_layers):
            if self.progress is not None:
                await self._computed(layer)
            self.timing.transfer_started_ns = self.timing.transfer_started_ns or time.time_ns()
            await session.send_layer(layer)

    async def _send_gathered(self, session: SendSession, page_size: int) -> None:
        """Rank 0's pool is a shard: every rank's heads, joined (``Engine.read_kv``) between steps."""
        self.timing.transfer_started_ns = time.time_ns()
        model_config = self.engine.engine.model_config
        for layers in layer_ranges(model_config, page_size, len(self.pages)):
            kv = await self._read_kv(layers)  # [layers, 2, pages, page_size, heads, dim]
            for i, layer in enumerate(layers):
                await session.send_layer(layer, kv[i])

    async def _computed(self, layer: int) -> None:
        """Wait until the step has computed ``layer``, or the request ended with an error status
        first: the engine loop died while that step never returns (a context-parallel rank died
        in its collective) ends the stream, not the step; the deadline bounds the rest."""
        assert self.progress is not None and self.outputs is not None, "a layer-by-layer lease"
        computed = asyncio.ensure_future(self.progress.wait(layer))
        try:
            waiting: set[asyncio.Future[Any]] = {computed, self.outputs}
            done, _ = await asyncio.wait(
                waiting, timeout=remaining_s(self.deadline), return_when=asyncio.FIRST_COMPLETED
            )
            if computed not in done and self.outputs in done:
                await self._final()  # raises unless it finished normally, and then the layer is (CUDA)
                done, _ = await asyncio.wait({computed}, timeout=remaining_s(self.deadline))
            if computed not in done:
                raise TransferError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed during the prefill")
            computed.result()  # StepFailed
        finally:
            computed.cancel()

    async def _final(self) -> RequestOutput:
        """The request's final output (its first token); raises the error it ended with."""
        assert self.outputs is not None, "run first"
        final = (await self.outputs)[0][-1]
        if final.finish_reason == "error" and self.engine.failure is not None:
            raise Unavailable(f"prefill engine: {self.engine.failure!r}")
        reason = final.finish_reason
        if reason in EARLY_END_ERRORS:
            raise EARLY_END_ERRORS[reason](f"prefill of {self.request_id}: {reason}")
        self.final = final
        return final

    async def _read_kv(self, layers: range) -> torch.Tensor:
        pages = self.pages
        try:
            return await self.engine.call_on_ranks(lambda e: e.read_kv(pages, layers))
        except RuntimeError as e:  # a tensor-parallel rank died while its KV was read (EngineFailed too)
            log.error("request %s: reading its KV failed: %s", self.request_id, e)
            raise Unavailable(f"prefill engine: {e}") from e


async def _collect(stream: RequestStream) -> tuple[list[RequestOutput], int]:
    """The request's outputs and when the last (the first token) arrived (unix ns)."""
    outputs = [out async for out in stream]
    return outputs, time.time_ns()


def _unclaimed_lease(lease: asyncio.Future[KVLease] | None, outputs: Outputs) -> list[int]:
    """Pages leased to a handler that was cancelled before it took them."""
    if lease is not None and lease.done() and not lease.cancelled():
        return lease.result().pages
    if outputs.done() and not outputs.cancelled() and outputs.exception() is None:
        return outputs.result()[0][-1].kv_pages or []
    return []
