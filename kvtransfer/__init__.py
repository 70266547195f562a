"""kvtransfer — moving one request's KV pages from a prefill engine to a decode engine.

Roles
-----
* **Receiver** (decode side, ``KVReceiver``). Decode reserves pages in its own pool, then calls
  ``expect(transfer_id, page_ids, num_tokens, deadline_ns)``; the returned ``PendingTransfer``'s
  ``wait()`` resolves to a ``TransferResult`` once the sender committed (DONE, with the first token)
  or the transfer failed, was aborted or passed its deadline. ``abort(transfer_id)`` rejects
  everything that arrives later; once it returns nothing writes into those pages again, so decode
  may free them. ``add_to_server(server)`` registers the backend's endpoint on decode's gRPC server.
* **Sender** (prefill side, ``KVSender``). ``await open(dest, src_pages, num_tokens, deadline_ns)``
  returns a ``SendSession`` moving pages ``src_pages`` of the sender's own pool to ``dest.page_ids``;
  ``await send_layer(layer)`` ships one layer of them (layers in any order, each once, as soon as
  its KV is complete on the device, so sending can follow prefill layer by layer:
  ``engine.kv_stream``); ``await commit(first_token, first_logprob)`` returns once the receiver acknowledged that
  every page of every layer is written. The source pages must stay allocated until ``commit``
  returned or the session ended (prefill's lease). ``abort()`` ends the session early; leaving
  ``async with`` on an exception does it too.

Guarantees
----------
* Handshake once per (sender, receiver address): both ``KVLayout``s are compared; a mismatch raises
  ``TransferError(FAILED_PRECONDITION)`` naming each differing field with both sides' values. Every
  transfer also carries the layout digest, so a peer that changed since the handshake is caught.
* Every transfer has an id and a deadline and ends DONE, FAILED or ABORTED; no call waits past the
  deadline. Errors are ``TransferError`` with a gRPC status code for the services to pass on.

Backends are registered by name (``register_backend``) and created once at startup; all share
the gRPC control plane of ``stream.py`` (handshake, one ``PushKV`` stream per transfer, commit/ack):
``tcp`` (bytes in the stream; any host, the CPU path), ``cuda_ipc`` (same host: the receiver maps
the sender's pool once and pulls pages GPU to GPU; ``cuda_ipc.py``), ``nccl`` (a two-rank NCCL
pair per (sender, receiver); ``nccl.py``). The GPU backends refuse a CPU pool at creation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtransfer.base import (
    Destination,
    KVReceiver,
    KVSender,
    PendingTransfer,
    SendSession,
    TransferError,
    TransferResult,
    TransferState,
)
from kvtransfer.layout import KVLayout, model_fingerprint

SenderFactory = Callable[..., KVSender]
ReceiverFactory = Callable[..., KVReceiver]
_BACKENDS: dict[str, tuple[SenderFactory, ReceiverFactory]] = {}


def register_backend(name: str, sender: SenderFactory, receiver: ReceiverFactory) -> None:
    assert name not in _BACKENDS, f"kv transfer backend {name!r} registered twice"
    _BACKENDS[name] = (sender, receiver)


def _factories(name: str) -> tuple[SenderFactory, ReceiverFactory]:
    if name not in _BACKENDS:
        raise ValueError(f"kv_transfer_backend: unknown backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


BACKENDS = ("tcp", "cuda_ipc", "nccl")


def check_kv_backend(name: str, device: str) -> None:
    """At config time, before any model loads: the backend exists and fits the device."""
    _factories(name)
    if name != "tcp" and not device.startswith("cuda"):
        raise ValueError(
            f"kv_backend: {name!r} moves KV between GPUs; this instance runs on {device!r} "
            "(use --device cuda[:N], or --kv-backend tcp)"
        )


def create_sender(name: str, layout: KVLayout, pool: Any, **options: Any) -> KVSender:
    return _factories(name)[0](layout, pool, **options)


def create_receiver(name: str, layout: KVLayout, pool: Any, **options: Any) -> KVReceiver:
    return _factories(name)[1](layout, pool, **options)


def _tcp_sender(layout: KVLayout, pool: Any, **options: Any) -> KVSender:
    from kvtransfer.tcp import TcpSender

    return TcpSender(layout, pool, **options)


def _tcp_receiver(layout: KVLayout, pool: Any, **options: Any) -> KVReceiver:
    from kvtransfer.tcp import TcpReceiver

    return TcpReceiver(layout, pool, **options)


def _cuda_ipc_sender(layout: KVLayout, pool: Any, **options: Any) -> KVSender:
    from kvtransfer.cuda_ipc import CudaIpcSender

    return CudaIpcSender(layout, pool, **options)


def _cuda_ipc_receiver(layout: KVLayout, pool: Any, **options: Any) -> KVReceiver:
    from kvtransfer.cuda_ipc import CudaIpcReceiver

    return CudaIpcReceiver(layout, pool, **options)


def _nccl_sender(layout: KVLayout, pool: Any, **options: Any) -> KVSender:
    from kvtransfer.nccl import NcclSender

    return NcclSender(layout, pool, **options)


def _nccl_receiver(layout: KVLayout, pool: Any, **options: Any) -> KVReceiver:
    from kvtransfer.nccl import NcclReceiver

    return NcclReceiver(layout, pool, **options)


register_backend("tcp", _tcp_sender, _tcp_receiver)
register_backend("cuda_ipc", _cuda_ipc_sender, _cuda_ipc_receiver)
register_backend("nccl", _nccl_sender, _nccl_receiver)

__all__ = [
    "BACKENDS",
    "Destination",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "PendingTransfer",
    "SendSession",
    "TransferError",
    "TransferResult",
    "TransferState",
    "check_kv_backend",
    "create_receiver",
    "create_sender",
    "model_fingerprint",
    "register_backend",
]
