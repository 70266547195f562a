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
Each backend's ``KVBackendCaps`` says what it needs (CUDA, distinct GPUs) and serves (tensor-parallel
instances); callers check those (``check_kv_backend``, ``kv_backend_caps``) instead of names, and pass
each side the options it takes (``sender_options`` / ``receiver_options``: the factory's keywords).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.registry import Registry
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

if TYPE_CHECKING:
    from protos.tls import TLSConfig


@dataclass(frozen=True)
class KVBackendCaps:
    """What a backend needs from, and offers to, the instances it connects."""

    requires_cuda: bool  # moves KV between GPU pools: both instances' devices must be CUDA
    # Serves a tensor-parallel instance, whose pool is a shard per rank: tcp sends the whole heads
    # the servicer gathers from the ranks (``Engine.read_kv``); the GPU backends address one
    # device's pool.
    tensor_parallel: bool
    distinct_devices: bool  # prefill and decode must be on different GPUs (an NCCL pair needs two)


_SENDERS: Registry[KVSender, KVBackendCaps] = Registry("kv backend")
_RECEIVERS: Registry[KVReceiver, KVBackendCaps] = Registry("kv backend")


def register_backend(
    name: str, sender: Callable[..., KVSender], receiver: Callable[..., KVReceiver], caps: KVBackendCaps
) -> None:
    """Both sides of backend ``name``: factories ``(layout, pool, *, options...)``; their keyword
    parameters are the options each side takes."""
    _SENDERS.register(name, sender, caps=caps)
    _RECEIVERS.register(name, receiver, caps=caps)


def kv_backend_names(**caps: bool) -> tuple[str, ...]:
    """Every backend's name, sorted; with ``caps`` (``tensor_parallel=True``), those whose
    capability record has each given value."""
    names = _SENDERS.names()
    return tuple(n for n in names if all(getattr(_SENDERS.caps(n), k) == v for k, v in caps.items()))


def kv_backend_caps(name: str) -> KVBackendCaps:
    """``name``'s capability record; ``UnknownName`` (a ValueError listing the known ones) if none."""
    return _SENDERS.caps(name)


def check_kv_backend(name: str, device: str, tp: int = 1) -> None:
    """At config time, before any model loads: the backend exists and fits an instance on ``device``
    (a resolved one) with ``tp`` tensor-parallel ranks."""
    _SENDERS.check(name, field="kv_backend")
    caps = kv_backend_caps(name)
    if caps.requires_cuda and not device.startswith("cuda"):
        raise ValueError(
            f"kv_backend: {name!r} moves KV between GPUs; this instance runs on {device!r} "
            f"(use --device cuda[:N], or --kv-backend {' / '.join(kv_backend_names(requires_cuda=False))})"
        )
    if tp != 1 and not caps.tensor_parallel:
        raise ValueError(
            f"kv_backend: {name!r} addresses one device's KV pool and a tensor-parallel instance's pool "
            f"is a shard per rank; use {' / '.join(kv_backend_names(tensor_parallel=True))} with tp {tp}"
        )


def sender_options(name: str, **candidates: Any) -> dict[str, Any]:
    """Of ``candidates`` (every sender setting the caller has), those ``name``'s sender takes."""
    return _SENDERS.select(name, **candidates)


def receiver_options(name: str, **candidates: Any) -> dict[str, Any]:
    """Of ``candidates``, those ``name``'s receiver takes."""
    return _RECEIVERS.select(name, **candidates)


def create_sender(name: str, layout: KVLayout, pool: Any, **options: Any) -> KVSender:
    """``name``'s sender; an option it does not take raises ``UnknownOption``."""
    return _SENDERS.create(name, layout, pool, **options)


def create_receiver(name: str, layout: KVLayout, pool: Any, **options: Any) -> KVReceiver:
    """``name``'s receiver; an option it does not take raises ``UnknownOption``."""
    return _RECEIVERS.create(name, layout, pool, **options)


def _tcp_sender(
    layout: KVLayout,
    pool: Any,
    *,
    tls: TLSConfig | None = None,
    max_chunk_bytes: int = 1 << 20,
    chunk_delay_s: float = 0.0,
) -> KVSender:
    from kvtransfer.tcp import TcpSender

    return TcpSender(layout, pool, max_chunk_bytes=max_chunk_bytes, chunk_delay_s=chunk_delay_s, tls=tls)


def _tcp_receiver(layout: KVLayout, pool: Any) -> KVReceiver:
    from kvtransfer.tcp import TcpReceiver

    return TcpReceiver(layout, pool)


def _cuda_ipc_sender(layout: KVLayout, pool: Any, *, tls: TLSConfig | None = None) -> KVSender:
    from kvtransfer.cuda_ipc import CudaIpcSender

    return CudaIpcSender(layout, pool, tls=tls)


def _cuda_ipc_receiver(layout: KVLayout, pool: Any) -> KVReceiver:
    from kvtransfer.cuda_ipc import CudaIpcReceiver

    return CudaIpcReceiver(layout, pool)


def _nccl_sender(layout: KVLayout, pool: Any, *, tls: TLSConfig | None = None) -> KVSender:
    from kvtransfer.nccl import NcclSender

    return NcclSender(layout, pool, tls=tls)


def _nccl_receiver(layout: KVLayout, pool: Any, *, host: str = "127.0.0.1") -> KVReceiver:
    """``host``: the address this instance's NCCL pairs listen on (what prefill connects to)."""
    from kvtransfer.nccl import NcclReceiver

    return NcclReceiver(layout, pool, host=host)


register_backend(
    "tcp",
    _tcp_sender,
    _tcp_receiver,
    KVBackendCaps(requires_cuda=False, tensor_parallel=True, distinct_devices=False),
)
register_backend(
    "cuda_ipc",
    _cuda_ipc_sender,
    _cuda_ipc_receiver,
    KVBackendCaps(requires_cuda=True, tensor_parallel=False, distinct_devices=False),
)
register_backend(
    "nccl",
    _nccl_sender,
    _nccl_receiver,
    KVBackendCaps(requires_cuda=True, tensor_parallel=False, distinct_devices=True),
)

__all__ = [
    "Destination",
    "KVBackendCaps",
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
    "kv_backend_caps",
    "kv_backend_names",
    "model_fingerprint",
    "receiver_options",
    "register_backend",
    "sender_options",
]
