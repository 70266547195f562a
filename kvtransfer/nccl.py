"""The ``nccl`` backend (GPU to GPU, any hosts NCCL reaches): a standalone two-rank NCCL group per
(sender, receiver) — receiver rank 0, sender rank 1 — built from a ``TCPStore`` the receiver
listens on and names in the handshake; independent of any TP group (no ``init_process_group``).

Per layer the sender gathers the pages into one contiguous buffer, queues a notice on the transfer's
``PushKV`` stream, then posts ``send``; the receiver, per notice, posts ``recv`` into a staging
buffer and scatters it into the reserved pages once it arrived (at most ``_AHEAD`` receives ahead,
which bounds staging memory).

Matching sends and receives: NCCL pairs them by order alone, so
* one transfer at a time per pair: the sender holds the pair's lock from ``open`` until its call
  ended (simple; transfers to one decode queue behind each other);
* every send has a receive: a notice is queued before its send is posted, with no ``await`` in
  between; the receiver consumes the stream to its end even after an abort or a refusal
  (``drains``), receiving into staging it then drops; a sender that aborts ends its stream after
  the notices it queued rather than cancelling the call.
* anything irregular — the stream cancelled or past its deadline, a receive that never completes —
  breaks the pair: both sides abort its NCCL group and the next transfer handshakes a new one.
Each side posts its ops from one thread per pair (ordered; NCCL's first op blocks on the peer
while the communicator forms) and polls their completion off the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import torch

from kvtransfer.base import Destination, PendingTransfer, SendSession, TransferError, remaining_s
from kvtransfer.cuda_common import GpuReceiverMixin, device_uuid, require_cuda_pool, wait_stream, wait_until
from kvtransfer.layout import KVLayout
from kvtransfer.stream import FAILED_PRECONDITION, StreamReceiver
from kvtransfer.stream_send import StreamSender, StreamSession
from protos import kvtransfer_pb2
from protos.tls import TLSConfig

log = logging.getLogger(__name__)
_AHEAD = 2  # receives posted ahead of the scatter
_GROUP_TIMEOUT = timedelta(minutes=10)  # NCCL's watchdog; broken pairs are aborted long before
_STORE_TIMEOUT = timedelta(seconds=60)
_DRAIN_S = 60.0  # bound on draining a refused transfer (it has no deadline of its own)


class _Pair:
    """One two-rank NCCL group and the single thread that posts its operations in order."""

    def __init__(self, store: Any, rank: int, device: torch.device) -> None:
        self.store, self.rank, self.device = store, rank, device
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"kv-nccl-r{rank}")
        self.pg: Any = None

    def make(self) -> None:
        from torch.distributed import PrefixStore, ProcessGroupNCCL

        torch.cuda.set_device(self.device)
        options = ProcessGroupNCCL.Options()
        options._timeout = _GROUP_TIMEOUT
        self.pg = ProcessGroupNCCL(PrefixStore("pdserve-kv", self.store), self.rank, 2, options)

    async def run(self, fn: Any, deadline_ns: int, what: str) -> Any:
        """``fn`` on the pair's thread (NCCL ops in posting order), awaited until ``deadline_ns``:
        a blocking call that outlives it (the first op initializes the communicator and waits for
        the peer) is a DEADLINE_EXCEEDED, and the caller breaks the pair."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn)
        try:
            return await asyncio.wait_for(asyncio.shield(future), remaining_s(deadline_ns))
        except TimeoutError:
            raise TransferError(grpc.StatusCode.DEADLINE_EXCEEDED, f"NCCL {what}: deadline passed") from None

    def close(self) -> None:
        """Abort, not destroy: the peer may be gone, or stuck in an op this side never matches.
        On a thread of its own: the pair's thread may be the one stuck."""

        def abort() -> None:
            for name in ("abort", "_abort", "shutdown"):
                if self.pg is not None and hasattr(self.pg, name):
                    getattr(self.pg, name)()
                    return

        threading.Thread(target=abort, name="kv-nccl-abort", daemon=True).start()
        self.executor.shutdown(wait=False)


def _open_store(host: str, port: int, is_master: bool) -> Any:
    from torch.distributed import TCPStore

    return TCPStore(host, port, 2, is_master, timeout=_STORE_TIMEOUT, wait_for_workers=False)


@dataclass
class _Incoming:
    pair: _Pair
    sender_id: str
    dst_gpu: torch.Tensor | None  # the reserved pages (None: a refused transfer, drained only)
    deadline_ns: int
    # (work, staging, data, pending or None): receives posted, not yet scattered
    posted: collections.deque[tuple[Any, torch.Tensor, Any, Any]] = field(default_factory=collections.deque)


class NcclReceiver(GpuReceiverMixin, StreamReceiver):
    """``host``: the address the sender reaches this host at (the store listens there)."""

    backend = "nccl"
    drains = True

    def __init__(self, layout: KVLayout, pool: Any, host: str = "127.0.0.1") -> None:
        StreamReceiver.__init__(self, layout, pool)
        self.init_gpu(self.backend, pool)
        self.host = host
        self.pairs: dict[str, _Pair] = {}

    def peer_info(self) -> kvtransfer_pb2.PeerInfo:
        info = super().peer_info()
        info.device, info.device_uuid = str(self.device), device_uuid(self.device)
        return info

    async def on_handshake(self, peer: kvtransfer_pb2.PeerInfo) -> kvtransfer_pb2.PeerInfo:
        if peer.device_uuid and peer.device_uuid == device_uuid(self.device):
            raise TransferError(
                FAILED_PRECONDITION,
                f"nccl: sender and receiver share GPU {self.device} ({peer.device_uuid}); NCCL needs one "
                "GPU per rank: put prefill and decode on different GPUs, or use cuda_ipc / tcp",
            )
        self._break(peer.sender_id)  # a sender handshakes again when its pair broke
        store = await asyncio.to_thread(_open_store, self.host, 0, True)
        pair = _Pair(store, 0, self.device)
        await asyncio.get_running_loop().run_in_executor(pair.executor, pair.make)  # its thread's device
        self.pairs[peer.sender_id] = pair
        info = self.peer_info()
        info.nccl_store = f"{self.host}:{store.port}"
        return info

    def _break(self, sender_id: str, pair: _Pair | None = None) -> None:
        """Drop the pair with ``sender_id`` (only if it is still ``pair``, when given: a late end of
        an old transfer must not break the pair a new handshake made)."""
        current = self.pairs.get(sender_id)
        if current is None or (pair is not None and current is not pair):
            return
        del self.pairs[sender_id]
        log.warning("nccl: dropping the pair with sender %s", sender_id)
        current.close()

    def begin(self, header: kvtransfer_pb2.KVHeader, pending: PendingTransfer | None) -> Any:
        pair = self.pairs.get(header.sender_id)
        if pair is None:
            raise TransferError(
                FAILED_PRECONDITION, f"no NCCL pair with sender {header.sender_id!r}: handshake again"
            )
        if pending is None:
            return _Incoming(pair, header.sender_id, None, time.time_ns() + int(_DRAIN_S * 1e9))
        with torch.cuda.stream(self.stream):
            dst_gpu = torch.tensor(pending.page_ids, dtype=torch.int64, device=self.device)
        return _Incoming(pair, header.sender_id, dst_gpu, pending.deadline_ns)

    async def on_data(self, state: Any, pending: PendingTransfer | None, data: kvtransfer_pb2.KVData) -> None:
        inc: _Incoming = state
        lay = self.layout
        with torch.cuda.stream(self.stream):  # staging follows self.stream's order (see _post)
            # [2, num_pages, page_size, num_kv_heads, head_dim]
            staging = torch.empty(
                (2, data.num_pages, lay.page_size, lay.num_kv_heads, lay.head_dim),
                dtype=self.pool.kv_gpu.dtype, device=self.device,
            )  # fmt: skip

        def post() -> Any:  # the receive waits for self.stream: staging's last reader is done
            with torch.cuda.stream(self.stream):
                return inc.pair.pg.recv([staging], 1, 0)

        inc.posted.append((await inc.pair.run(post, inc.deadline_ns, "receive"), staging, data, pending))
        await self._scatter(inc, _AHEAD)

    async def _scatter(self, inc: _Incoming, keep: int) -> None:
        while len(inc.posted) > keep:
            work, staging, data, pending = inc.posted[0]
            await wait_until(work.is_completed, inc.deadline_ns, "NCCL receive", self.device)
            inc.posted.popleft()
            with torch.cuda.stream(self.stream):
                try:
                    work.wait()  # orders self.stream after the receive
                except RuntimeError as e:  # DistBackendError and friends: the pair is gone
                    raise TransferError(grpc.StatusCode.UNAVAILABLE, f"NCCL receive failed: {e}") from None
                if pending is not None and not pending.result.done() and inc.dst_gpu is not None:
                    pages = inc.dst_gpu[data.first_page : data.first_page + data.num_pages]
                    self.pool.write_pages(data.layer, pages, staging)

    async def before_ack(self, state: Any, pending: PendingTransfer) -> None:
        await self._scatter(state, 0)
        await wait_stream(self.stream, pending.deadline_ns, f"transfer {pending.transfer_id}: scatter")

    async def settle(self, state: Any) -> None:
        if state is not None:
            await self._scatter(state, 0)

    def end(self, state: Any, drained: bool) -> None:
        if state is not None and (not drained or state.posted):
            self._break(state.sender_id, state.pair)


class NcclSender(StreamSender):
    backend = "nccl"

    def __init__(self, layout: KVLayout, pool: Any, tls: TLSConfig | None = None) -> None:
        super().__init__(layout, pool, tls)
        self.device = require_cuda_pool(self.backend, pool)
        self.read_stream = torch.cuda.Stream(self.device)  # pool reads (``SendSession.send_layer``)
        self.pairs: dict[str, _Pair] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def peer_info(self) -> kvtransfer_pb2.PeerInfo:
        info = super().peer_info()
        info.device, info.device_uuid = str(self.device), device_uuid(self.device)
        return info

    async def on_connected(self, address: str, peer: kvtransfer_pb2.PeerInfo) -> None:
        self._break(address)
        host, port = peer.nccl_store.rsplit(":", 1)
        try:
            store = await asyncio.to_thread(_open_store, host, int(port), False)
        except (RuntimeError, ValueError) as e:  # DistStoreError is a RuntimeError
            raise TransferError(grpc.StatusCode.UNAVAILABLE, f"NCCL store {peer.nccl_store}: {e}") from None
        pair = _Pair(store, 1, self.device)
        await asyncio.get_running_loop().run_in_executor(pair.executor, pair.make)  # its thread's device
        self.pairs[address] = pair

    def _break(self, address: str, pair: _Pair | None = None) -> None:
        """Drop the pair with ``address`` (only if it is still ``pair``, when given)."""
        current = self.pairs.get(address)
        if current is None or (pair is not None and current is not pair):
            return
        self.forget(address)
        del self.pairs[address]
        log.warning("nccl: dropping the pair with receiver %s", address)
        current.close()

    async def open(
        self, dest: Destination, src_pages: Sequence[int], num_tokens: int, deadline_ns: int
    ) -> SendSession:
        lock = self._locks.setdefault(dest.address, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), remaining_s(deadline_ns))
        except TimeoutError:
            raise TransferError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"transfer {dest.transfer_id}: waited for the NCCL pair"
            ) from None
        try:
            session = await super().open(dest, src_pages, num_tokens, deadline_ns)
        except BaseException:
            lock.release()
            raise
        assert isinstance(session, _NcclSession)

        def ended(_: Any) -> None:
            lock.release()
            if not session.drained:
                self._break(dest.address, session.pair)

        session.call_task.add_done_callback(ended)
        return session

    def session(
        self, dest: Destination, src_pages: Sequence[int], num_tokens: int, deadline_ns: int
    ) -> StreamSession:
        return _NcclSession(self, dest, src_pages, num_tokens, deadline_ns)


class _NcclSession(StreamSession):
    sender: NcclSender
    queue_size = 0  # notices only

    def __init__(self, sender: NcclSender, *args: Any) -> None:
        super().__init__(sender, *args)
        self.pair = sender.pairs[self.dest.address]
        with torch.cuda.stream(sender.read_stream):
            self.src_gpu = torch.tensor(self.src_pages, dtype=torch.int64, device=sender.device)

    async def send_layer(self, layer: int, kv: Any = None) -> None:
        assert kv is None, "nccl reads the sender's pool; a TP engine is refused at start-up"
        stream = self.sender.read_stream
        with torch.cuda.stream(stream):  # not the engine's stream: a read there waits for its steps
            kv = self.sender.pool.read_pages(layer, self.src_gpu)  # [2, pages, page_size, kv_heads, dim]
        self.put_notice(layer)

        def send() -> Any:  # on the pair's thread: NCCL orders the send after ``stream`` there
            with torch.cuda.stream(stream):
                return self.pair.pg.send([kv], 0, 0)

        # Posted even if this task is cancelled now: the receiver will wait for it.
        await self.pair.run(send, self.deadline_ns, "send")
        self.sender.num_bytes_sent += kv.numel() * kv.element_size()

    def abort(self) -> None:
        """End the stream after the notices queued (the receiver drains them), not cancel it."""
        if not self.call_task.done():
            self.queue.put_nowait(self._END)
        self.consume_result()
