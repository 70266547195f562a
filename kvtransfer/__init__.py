"""kvtransfer — moving one request's KV pages from a prefill engine to a decode engine.

Roles
-----
* **Receiver** (decode side, ``KVReceiver``). Decode reserves pages in its own pool, then calls
  ``expect(transfer_id, page_ids, num_tokens, deadline_ns)``; the returned ``PendingTransfer``'s
  ``wait()`` resolves to a ``TransferResult`` once the sender committed (DONE, with the first token)
  or the transfer failed, was aborted or passed its deadline. ``abort(transfer_id)`` rejects
  everything that arrives later; once it returns nothing writes into those pages again, so decode
  may free them. ``add_to_server(server)`` registers the backend's endpoint on decode's gRPC server.
* **Sender** (prefill side, ``KVSender``). ``await open(dest, num_tokens, deadline_ns)`` returns a
  ``SendSession``; ``await send_layer(layer, kv)`` ships one layer's K/V of the request's pages
  (``[2, num_pages, page_size, num_kv_heads, head_dim]``; layers in any order, so a GPU backend can
  send each layer as soon as prefill computed it); ``await commit(first_token, first_logprob)``
  returns once the receiver acknowledged that every page of every layer is written.
  ``abort()`` ends the session early; leaving ``async with`` on an exception does it too.

Guarantees
----------
* Handshake once per (sender, receiver address): both ``KVLayout``s are compared; a mismatch raises
  ``TransferError(FAILED_PRECONDITION)`` naming each differing field with both sides' values. Every
  transfer also carries the layout digest, so a peer that changed since the handshake is caught.
* Every transfer has an id and a deadline and ends DONE, FAILED or ABORTED; no call waits past the
  deadline. Errors are ``TransferError`` with a gRPC status code for the services to pass on.

Backends are registered by name (``register_backend``) and created once at startup:
``tcp`` (gRPC streaming, any host, the CPU path); ``cuda_ipc`` and ``nccl`` come with #8.
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


register_backend("tcp", _tcp_sender, _tcp_receiver)

__all__ = [
    "Destination",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "PendingTransfer",
    "SendSession",
    "TransferError",
    "TransferResult",
    "TransferState",
    "create_receiver",
    "create_sender",
    "model_fingerprint",
    "register_backend",
]
