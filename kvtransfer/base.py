"""The backend-independent parts of kvtransfer: states, results, errors and the base classes
(see the package docstring for the contract)."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc

from engine.output import TokenLogprob


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"


class TransferError(Exception):
    """A transfer that did not end DONE; ``code`` is the gRPC status the services pass on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


@dataclass
class TransferResult:
    transfer_id: str
    state: TransferState
    first_token: int = -1
    first_logprob: TokenLogprob | None = None
    num_bytes: int = 0
    error: TransferError | None = None


def remaining_s(deadline_ns: int) -> float:
    """Seconds left until ``deadline_ns`` (unix ns), never negative."""
    return max(0.0, (deadline_ns - time.time_ns()) / 1e9)


@dataclass
class PendingTransfer:
    """The receiver's record of one expected transfer; ``wait()`` is bounded by the deadline."""

    transfer_id: str
    page_ids: list[int]
    num_tokens: int
    deadline_ns: int
    result: asyncio.Future[TransferResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    num_bytes: int = 0
    on_finish: Callable[[], object] | None = None  # runs once, synchronously, at the terminal state

    @property
    def state(self) -> TransferState:
        return self.result.result().state if self.result.done() else TransferState.PENDING

    def finish(
        self, state: TransferState, error: TransferError | None = None, first_token: int = -1,
        first_logprob: TokenLogprob | None = None,
    ) -> bool:  # fmt: skip
        """Move to a terminal state once; returns False if it already had one."""
        if self.result.done():
            return False
        self.result.set_result(
            TransferResult(self.transfer_id, state, first_token, first_logprob, self.num_bytes, error)
        )
        if self.on_finish is not None:
            self.on_finish()
        return True

    async def wait(self) -> TransferResult:
        try:
            return await asyncio.wait_for(asyncio.shield(self.result), remaining_s(self.deadline_ns))
        except TimeoutError:
            error = TransferError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"transfer {self.transfer_id}: deadline passed"
            )
            self.finish(TransferState.FAILED, error)
            return self.result.result()


class KVReceiver:
    """Decode side. Subclasses implement the backend's endpoint; bookkeeping lives here."""

    def __init__(self) -> None:
        self.transfers: dict[str, PendingTransfer] = {}
        self.num_bytes_received = 0

    def add_to_server(self, server: Any) -> None:
        raise NotImplementedError

    def expect(
        self, transfer_id: str, page_ids: list[int], num_tokens: int, deadline_ns: int
    ) -> PendingTransfer:
        assert transfer_id not in self.transfers, f"transfer {transfer_id} is already expected"
        pending = PendingTransfer(transfer_id, list(page_ids), num_tokens, deadline_ns)
        pending.on_finish = lambda: self.transfers.pop(transfer_id, None)
        self.transfers[transfer_id] = pending
        return pending

    def abort(self, transfer_id: str, reason: str = "aborted by the receiver") -> None:
        pending = self.transfers.pop(transfer_id, None)
        if pending is not None:
            pending.finish(TransferState.ABORTED, TransferError(grpc.StatusCode.ABORTED, reason))

    @property
    def num_pending(self) -> int:
        return len(self.transfers)


class SendSession:
    """One transfer from the sender's side; use as ``async with``."""

    async def send_layer(self, layer: int, kv: Any = None) -> None:
        """Ship layer ``layer`` of the session's source pages. Their KV must be complete on the
        device when this is called: the caller waited for the step that computed it (its layer
        event, ``engine.kv_stream``, or its sampled token, which is read back after the whole
        forward). Backends read the pool on their own streams and never wait for the device's
        current stream: the engine keeps launching steps there. ``kv``: the layer's K/V as whole
        heads (``[2, num_pages, page_size, kv_heads, head_dim]``), made on the current stream,
        when the sender's pool does not hold them (a tensor-parallel engine's rank 0 holds a
        shard); only ``tcp`` takes it, the backends that address the pool directly refuse a TP
        engine at start-up."""
        raise NotImplementedError

    async def commit(self, first_token: int, first_logprob: TokenLogprob | None) -> int:
        """Returns the bytes the receiver acknowledged."""
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> SendSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.abort()


@dataclass(frozen=True)
class Destination:
    """Where one request's pages go: the receiver's address and its page ids (one per page sent)."""

    address: str
    transfer_id: str
    page_ids: tuple[int, ...]


class KVSender:
    """Prefill side: opens sessions to receivers, handshaking once per receiver address."""

    num_bytes_sent = 0

    async def connect(self, address: str, deadline_ns: int) -> None:
        """Handshake with the receiver at ``address`` unless done before (``open`` calls it too)."""
        raise NotImplementedError

    async def open(
        self, dest: Destination, src_pages: Sequence[int], num_tokens: int, deadline_ns: int
    ) -> SendSession:
        """A session moving pages ``src_pages`` of the sender's pool to ``dest.page_ids`` (pairwise)."""
        raise NotImplementedError

    async def close(self) -> None:
        pass
