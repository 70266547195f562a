"""The ``cuda_ipc`` backend (one host, any two GPUs or one): the receiver maps the sender's whole KV
pool once, at the handshake (CUDA IPC), and from then on only page indices travel: the header
carries the transfer's source page ids, each layer a notice. On a notice the receiver pulls the
layer itself — gather on the sender's GPU, one peer copy, scatter into its own pages — on its side
streams, and acknowledges the commit once those copies finished.

Why the receiver pulls (rather than the sender writing into a mapped decode pool): only the decode
process ever writes decode's pool, so ``abort`` is local and exact (see ``cuda_common``: no copy
from the other process can land in pages decode already freed). The sender only reads; its pages
stay leased until the ack, and a transfer the sender gave up reads pages nobody keeps.

A layer's notice goes out once its KV is complete on the sender's device (the caller waited for
it, ``SendSession.send_layer``: the prefill step's per-layer event, ``engine.kv_stream``): the
receiver's copies run in another process, outside the sender's stream order.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from kvtransfer.base import Destination, PendingTransfer, TransferError
from kvtransfer.cuda_common import (
    GpuReceiverMixin,
    check_same_gpu_numbering,
    decode_ipc,
    device_uuid,
    encode_ipc,
    require_cuda_pool,
    wait_stream,
)
from kvtransfer.layout import KVLayout
from kvtransfer.stream import FAILED_PRECONDITION, StreamReceiver, host_id
from kvtransfer.stream_send import StreamSender, StreamSession
from protos import kvtransfer_pb2
from protos.tls import TLSConfig

log = logging.getLogger(__name__)


def _same_host(peer: kvtransfer_pb2.PeerInfo, who: str) -> None:
    if peer.host_id != host_id():
        raise TransferError(
            FAILED_PRECONDITION,
            f"kv backend cuda_ipc needs prefill and decode on one host; the {who} runs on "
            f"{peer.host_id or 'an unknown host'}, this side on {host_id()} (use nccl or tcp)",
        )


class CudaIpcSender(StreamSender):
    backend = "cuda_ipc"

    def __init__(self, layout: KVLayout, pool: Any, tls: TLSConfig | None = None) -> None:
        super().__init__(layout, pool, tls)
        self.device = require_cuda_pool(self.backend, pool)
        self._pool_handle = encode_ipc(pool.kv_gpu)  # once: every receiver maps the same pool

    def peer_info(self) -> kvtransfer_pb2.PeerInfo:
        info = super().peer_info()
        info.device, info.device_uuid, info.cuda_ipc_pool = (
            str(self.device),
            device_uuid(self.device),
            self._pool_handle,
        )
        return info

    async def on_connected(self, address: str, peer: kvtransfer_pb2.PeerInfo) -> None:
        _same_host(peer, f"receiver at {address}")  # the receiver checks too

    def session(
        self, dest: Destination, src_pages: Sequence[int], num_tokens: int, deadline_ns: int
    ) -> StreamSession:
        return _IpcSession(self, dest, src_pages, num_tokens, deadline_ns, True)


class _IpcSession(StreamSession):
    sender: CudaIpcSender
    queue_size = 0  # notices only: a few bytes each

    async def send_layer(self, layer: int, kv: Any = None) -> None:
        assert kv is None, "cuda_ipc reads the sender's pool; a TP engine is refused at start-up"
        # The layer's KV is complete on the device (``SendSession.send_layer``): the receiver may
        # read it at once, on its own stream. (Waiting for this device's current stream instead
        # would wait for every step launched since.)
        self.put_notice(layer)
        self.sender.num_bytes_sent += (
            len(self.src_pages) * self.sender.layout.page_size * (self.sender.layout.bytes_per_token_layer)
        )


@dataclass
class _Mapped:
    """A sender's pool mapped into this process, and the stream our gathers run on there."""

    pool: torch.Tensor  # [num_layers, 2, sender_pages, page_size, num_kv_heads, head_dim] on its GPU
    stream: torch.cuda.Stream
    pid: int


class CudaIpcReceiver(GpuReceiverMixin, StreamReceiver):
    backend = "cuda_ipc"

    def __init__(self, layout: KVLayout, pool: Any, **_: Any) -> None:
        StreamReceiver.__init__(self, layout, pool)
        self.init_gpu(self.backend, pool)
        self.senders: dict[str, _Mapped] = {}

    def peer_info(self) -> kvtransfer_pb2.PeerInfo:
        info = super().peer_info()
        info.device, info.device_uuid = str(self.device), device_uuid(self.device)
        return info

    async def on_handshake(self, peer: kvtransfer_pb2.PeerInfo) -> kvtransfer_pb2.PeerInfo:
        _same_host(peer, "sender")
        self._forget_dead_senders()
        if peer.sender_id not in self.senders:
            self.senders[peer.sender_id] = self._map(peer)
        return self.peer_info()

    def _map(self, peer: kvtransfer_pb2.PeerInfo) -> _Mapped:
        src_device = check_same_gpu_numbering(peer.device, peer.device_uuid)
        try:
            pool = decode_ipc(peer.cuda_ipc_pool)
        except (RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as e:
            raise TransferError(FAILED_PRECONDITION, f"cannot map the sender's KV pool: {e}") from None
        ours = self.pool.kv_gpu
        if pool.device != src_device or pool.dtype != ours.dtype or pool.shape[:2] != ours.shape[:2] or (
            pool.shape[3:] != ours.shape[3:]
        ):  # fmt: skip
            raise TransferError(
                FAILED_PRECONDITION,
                f"the sender's pool {tuple(pool.shape)} {pool.dtype} on {pool.device} does not match "
                f"ours {tuple(ours.shape)} {ours.dtype} (pages may differ) or its {src_device}",
            )
        stream = self.stream if src_device == self.device else torch.cuda.Stream(device=src_device)
        log.info("cuda_ipc: mapped sender %s's pool %s on %s", peer.sender_id, tuple(pool.shape), src_device)
        return _Mapped(pool, stream, int(peer.sender_id.split("-", 1)[0]))

    def _forget_dead_senders(self) -> None:
        """Unmap pools of sender processes that exited: a mapping keeps their GPU memory allocated."""
        for sender_id, mapped in list(self.senders.items()):
            try:
                os.kill(mapped.pid, 0)
            except ProcessLookupError:
                del self.senders[sender_id]
            except PermissionError:
                pass

    def begin(self, header: kvtransfer_pb2.KVHeader, pending: PendingTransfer | None) -> Any:
        assert pending is not None, "cuda_ipc does not drain"
        mapped = self.senders.get(header.sender_id)
        if mapped is None:
            raise TransferError(
                FAILED_PRECONDITION,
                f"no cuda_ipc handshake with sender {header.sender_id!r}: handshake again",
            )
        src = list(header.src_page_ids)
        if len(src) != len(pending.page_ids) or not all(0 < p < mapped.pool.shape[2] for p in src):
            raise TransferError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"src_page_ids: {len(src)} ids for {len(pending.page_ids)} pages, each in [1, {mapped.pool.shape[2]})",
            )
        with torch.cuda.stream(mapped.stream), torch.cuda.stream(self.stream):
            src_gpu = torch.tensor(src, dtype=torch.int64, device=mapped.pool.device)
            dst_gpu = torch.tensor(pending.page_ids, dtype=torch.int64, device=self.device)
        return mapped, src_gpu, dst_gpu

    async def on_data(self, state: Any, pending: PendingTransfer | None, data: kvtransfer_pb2.KVData) -> None:
        mapped, src_gpu, dst_gpu = state
        lo, hi = data.first_page, data.first_page + data.num_pages
        with torch.cuda.stream(mapped.stream), torch.cuda.stream(self.stream):
            # [2, num_pages, page_size, num_kv_heads, head_dim], gathered on the sender's GPU
            kv = mapped.pool[data.layer].index_select(1, src_gpu[lo:hi])
            self.pool.kv_gpu[data.layer].index_copy_(1, dst_gpu[lo:hi], kv.to(self.device, non_blocking=True))

    async def before_ack(self, state: Any, pending: PendingTransfer) -> None:
        await wait_stream(self.stream, pending.deadline_ns, f"transfer {pending.transfer_id}: copies")
