"""What the GPU backends (``cuda_ipc``, ``nccl``) share: the CUDA-pool check made at startup, the
device identity exchanged in the handshake, the receiver's side stream and its fence, and waits on
GPU work that never block the event loop and never outlive the transfer's deadline.

Receivers write the pool only from their own process, on ``self.stream`` (a side stream, so a
transfer never waits behind decode steps). Every transfer that ends makes the pool device's
current stream — the one the engine computes on — wait for that side stream (``fence``), so pages
freed after an abort or a failure are never written by a copy still in flight: after ``abort``
returns, nothing writes into those pages again in any order the engine can observe.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import time
from typing import Any

import grpc
import torch

from kvtransfer.base import KVReceiver, PendingTransfer, TransferError

_POLL_S = 50e-6


def require_cuda_pool(backend: str, pool: Any) -> torch.device:
    """The pool's device; a CPU pool is a startup error, not a hang or a crash later."""
    device = pool.kv_gpu.device
    if device.type != "cuda":
        raise ValueError(
            f"kv_backend: {backend!r} moves KV between GPUs, but this instance's KV pool is on "
            f"{device} (run it with --device cuda[:N], or use --kv-backend tcp)"
        )
    return device


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def check_same_gpu_numbering(peer_device: str, peer_uuid: str) -> torch.device:
    """``peer_device`` as a device of this process, if it names the GPU the peer means (a different
    CUDA_VISIBLE_DEVICES on the two sides would silently map another GPU)."""
    device = torch.device(peer_device)
    ours = (
        device_uuid(device) if device.index is not None and device.index < torch.cuda.device_count() else ""
    )
    if ours != peer_uuid:
        raise TransferError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the sender's {peer_device} (uuid {peer_uuid}) is {ours or 'not visible'} here: "
            "run prefill and decode with the same CUDA_VISIBLE_DEVICES",
        )
    return device


class GpuReceiverMixin(KVReceiver):
    """A side stream on the pool's device, and the fence at every transfer's end (module docstring)."""

    device: torch.device
    stream: torch.cuda.Stream

    def init_gpu(self, backend: str, pool: Any) -> None:
        self.device = require_cuda_pool(backend, pool)
        self.stream = torch.cuda.Stream(device=self.device)

    def expect(
        self, transfer_id: str, page_ids: list[int], num_tokens: int, deadline_ns: int
    ) -> PendingTransfer:
        pending = super().expect(transfer_id, page_ids, num_tokens, deadline_ns)
        pop = pending.on_finish

        def finish() -> None:
            if pop is not None:
                pop()
            self.fence()

        pending.on_finish = finish
        return pending

    def fence(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


async def wait_until(done: Any, deadline_ns: int, what: str, device: torch.device) -> None:
    """Poll ``done()`` on a worker thread until true; DEADLINE_EXCEEDED at the deadline. The thread
    makes ``device`` current first: a CUDA call from a thread left on cuda:0 would create a context
    there (memory another instance on cuda:0 counted on)."""

    def poll() -> bool:
        torch.cuda.set_device(device)
        while not done():
            if time.time_ns() > deadline_ns:
                return False
            time.sleep(_POLL_S)
        return True

    if not done() and not await asyncio.to_thread(poll):
        raise TransferError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{what}: deadline passed")


async def wait_stream(stream: torch.cuda.Stream, deadline_ns: int, what: str) -> None:
    """Until the work queued on ``stream`` so far is done (off the event loop)."""
    event = torch.cuda.Event()
    event.record(stream)
    await wait_until(event.query, deadline_ns, what, stream.device)


# CUDA IPC handles travel as torch's own rebuild arguments, pickled; the unpickler resolves only
# the few torch names those arguments hold, so a peer cannot make it run anything else.
# reduce_tensor names the storage class of ``tensor._typed_storage()``: TypedStorage.
_IPC_GLOBALS = {
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch.storage", "TypedStorage"),
    ("torch.storage", "UntypedStorage"),
}


class _IpcUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _IPC_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch.storage if module == "torch.storage" else torch, name)
        raise pickle.UnpicklingError(f"cuda_ipc handle: {module}.{name} is not allowed")


def encode_ipc(tensor: torch.Tensor) -> bytes:
    """``tensor``'s CUDA IPC handle (torch.multiprocessing's reduction), as bytes."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

    rebuild, args = reduce_tensor(tensor)
    assert rebuild is rebuild_cuda_tensor, f"not a CUDA tensor's reduction: {rebuild}"
    return pickle.dumps(args)


def decode_ipc(blob: bytes) -> torch.Tensor:
    """The tensor ``encode_ipc`` described, mapped into this process (same host only)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = _IpcUnpickler(io.BytesIO(blob)).load()
    return rebuild_cuda_tensor(*args)
