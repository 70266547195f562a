"""The sender's half of the shared control plane (``stream.py``): gRPC channels, the handshake once
per receiver address, and ``StreamSession``, one ``PushKV`` call per transfer. Backends supply
``session`` and ``send_layer``."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from engine.output import TokenLogprob
from kvtransfer.base import Destination, KVSender, SendSession, TransferError, remaining_s
from kvtransfer.layout import KVLayout
from kvtransfer.stream import DRAINED_KEY, FAILED_PRECONDITION, host_id, layout_from_proto, layout_to_proto
from protos import kvtransfer_pb2, kvtransfer_pb2_grpc
from protos.channels import ChannelCache
from protos.convert import logprob_to_proto
from protos.serving import CHANNEL_OPTIONS
from protos.tls import TLSConfig, aio_channel

log = logging.getLogger(__name__)
_QUEUE_CHUNKS = 8  # data messages buffered ahead of the network: bounds the sender's extra memory


class StreamSender(KVSender):
    """Prefill side: gRPC channels, the handshake once per receiver address, sessions."""

    backend = ""

    def __init__(self, layout: KVLayout, pool: Any, tls: TLSConfig | None = None) -> None:
        self.layout, self.pool, self.tls = layout, pool, tls
        self.sender_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        # An evicted receiver is handshaken again on its next transfer (a new channel, a new session).
        self._channels = ChannelCache(
            lambda address: aio_channel(address, self.tls, CHANNEL_OPTIONS), on_evict=self.forget
        )
        self._handshaken: set[str] = set()
        self._connecting: dict[str, asyncio.Future[None]] = {}  # address -> its handshake in flight
        self.num_bytes_sent = 0

    def peer_info(self) -> kvtransfer_pb2.PeerInfo:
        return kvtransfer_pb2.PeerInfo(backend=self.backend, host_id=host_id(), sender_id=self.sender_id)

    async def on_connected(self, address: str, peer: kvtransfer_pb2.PeerInfo) -> None:
        """Set up the data plane with the receiver that answered ``peer`` (raise to refuse)."""

    def session(
        self, dest: Destination, src_pages: Sequence[int], num_tokens: int, deadline_ns: int
    ) -> StreamSession:
        raise NotImplementedError

    def stub(self, address: str) -> kvtransfer_pb2_grpc.KVTransferStub:
        return kvtransfer_pb2_grpc.KVTransferStub(self._channels.get(address))

    def forget(self, address: str) -> None:
        """Handshake again before the next transfer to ``address`` (its data plane broke)."""
        self._handshaken.discard(address)

    async def connect(self, address: str, deadline_ns: int) -> None:
        """Handshake with ``address`` unless done; one handshake per address at a time (a burst of
        requests waits for the one in flight: each handshake re-creates a backend's data plane,
        so two at once could leave the sides on different ones). Waiting is bounded by
        ``deadline_ns``; the handshake itself by its first caller's."""
        while address not in self._handshaken:
            inflight = self._connecting.get(address)
            if inflight is None:
                inflight = asyncio.ensure_future(self._handshake(address, deadline_ns))
                self._connecting[address] = inflight
                inflight.add_done_callback(functools.partial(self._handshake_done, address))
            try:
                await asyncio.wait_for(asyncio.shield(inflight), remaining_s(deadline_ns))
            except TimeoutError:
                raise TransferError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"handshake with {address}: deadline passed"
                ) from None

    def _handshake_done(self, address: str, future: asyncio.Future[None]) -> None:
        self._connecting.pop(address, None)
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have given up on it already

    async def _handshake(self, address: str, deadline_ns: int) -> None:
        request = kvtransfer_pb2.HandshakeRequest(layout=layout_to_proto(self.layout), peer=self.peer_info())
        try:
            reply = await self.stub(address).Handshake(request, timeout=remaining_s(deadline_ns))
        except grpc.aio.AioRpcError as e:
            raise TransferError(e.code(), f"handshake with {address}: {e.details()}") from None
        problems = self.layout.mismatches(layout_from_proto(reply.receiver))
        if problems:  # the receiver checks too; this guards against a receiver that does not
            raise TransferError(
                FAILED_PRECONDITION, f"KV layout mismatch with {address}: {'; '.join(problems)}"
            )
        await self.on_connected(address, reply.peer)
        self._handshaken.add(address)

    async def open(
        self, dest: Destination, src_pages: Sequence[int], num_tokens: int, deadline_ns: int
    ) -> SendSession:
        assert len(src_pages) == len(dest.page_ids), (
            f"{len(src_pages)} pages for {len(dest.page_ids)} destinations"
        )
        await self.connect(dest.address, deadline_ns)
        return self.session(dest, src_pages, num_tokens, deadline_ns)

    async def close(self) -> None:
        await self._channels.close()


class StreamSession(SendSession):
    """One ``PushKV`` call. Subclasses implement ``send_layer`` with ``put`` / ``put_notice``."""

    _END = None
    queue_size = _QUEUE_CHUNKS

    def __init__(
        self, sender: StreamSender, dest: Destination, src_pages: Sequence[int], num_tokens: int,
        deadline_ns: int, header_src_pages: bool = False,
    ) -> None:  # fmt: skip
        self.sender, self.dest, self.deadline_ns = sender, dest, deadline_ns
        self.src_pages = list(src_pages)
        self.header = kvtransfer_pb2.KVHeader(
            transfer_id=dest.transfer_id, layout_digest=sender.layout.digest, num_pages=len(dest.page_ids),
            num_tokens=num_tokens, sender_id=sender.sender_id,
            src_page_ids=self.src_pages if header_src_pages else [],
        )  # fmt: skip
        self.queue: asyncio.Queue[kvtransfer_pb2.KVChunk | None] = asyncio.Queue(self.queue_size)
        self.call = sender.stub(dest.address).PushKV(self._chunks(), timeout=remaining_s(deadline_ns))
        self.call_task = asyncio.ensure_future(self._finish_call())
        self.drained = False  # the call ended with the receiver having consumed the whole stream

    async def _chunks(self) -> AsyncIterator[kvtransfer_pb2.KVChunk]:
        yield kvtransfer_pb2.KVChunk(header=self.header)
        while (chunk := await self.queue.get()) is not self._END:
            yield chunk

    async def _finish_call(self) -> kvtransfer_pb2.KVAck:
        try:
            ack = await self.call
            self.drained = True
            return ack
        except grpc.aio.AioRpcError as e:
            self.drained = any(key == DRAINED_KEY for key, _ in e.trailing_metadata() or ())
            raise TransferError(e.code(), f"to {self.dest.address}: {e.details()}") from None

    def check_open(self) -> None:
        """Raise the receiver's error if it already answered, or DEADLINE_EXCEEDED."""
        if self.call_task.done():
            self.call_task.result()
            raise TransferError(grpc.StatusCode.INTERNAL, "the receiver answered before the commit")
        if remaining_s(self.deadline_ns) <= 0:
            raise TransferError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"transfer {self.dest.transfer_id}: deadline passed"
            )

    def put_notice(self, layer: int) -> None:
        """Queue "layer ``layer`` of every page" without waiting (the queue of a noticing session is
        unbounded): nothing can cancel the caller between this and what it launches next."""
        self.check_open()
        data = kvtransfer_pb2.KVData(layer=layer, first_page=0, num_pages=len(self.src_pages))
        self.queue.put_nowait(kvtransfer_pb2.KVChunk(data=data))

    async def put(self, chunk: kvtransfer_pb2.KVChunk | None) -> None:
        put = asyncio.ensure_future(self.queue.put(chunk))
        try:
            await asyncio.wait(
                {put, self.call_task},
                timeout=remaining_s(self.deadline_ns),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not put.done():
                put.cancel()
        if put.done() and not put.cancelled():
            return
        self.check_open()
        raise TransferError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"transfer {self.dest.transfer_id}: deadline passed"
        )

    async def before_commit(self) -> None:
        """Return once the receiver may read everything sent (cuda_ipc: the sender's copies)."""

    async def commit(self, first_token: int, first_logprob: TokenLogprob | None) -> int:
        await self.before_commit()
        commit = kvtransfer_pb2.KVCommit(
            first_token_id=first_token, first_logprob=logprob_to_proto(first_logprob)
        )
        await self.put(kvtransfer_pb2.KVChunk(commit=commit))
        await self.put(self._END)
        start = time.monotonic()
        try:
            ack = await asyncio.wait_for(asyncio.shield(self.call_task), remaining_s(self.deadline_ns))
        except TimeoutError:
            self.abort()
            raise TransferError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"transfer {self.dest.transfer_id}: no ack by the deadline"
            ) from None
        log.debug("transfer %s acked after %.1f ms", self.dest.transfer_id, (time.monotonic() - start) * 1e3)
        return int(ack.num_bytes)

    def abort(self) -> None:
        self.call.cancel()
        self.consume_result()

    def consume_result(self) -> None:
        """An aborted session's error is already reported: keep asyncio from logging it again."""
        if self.call_task.done() and not self.call_task.cancelled():
            self.call_task.exception()
        else:
            self.call_task.add_done_callback(lambda t: t.cancelled() or t.exception())
