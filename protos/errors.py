"""Errors that end an RPC, and the one mapping from error types to gRPC statuses (torch-free).

A service raises a ``ServiceError`` subclass where it detects a condition; its class names the
status (``code``). Errors from below — the engine's (``engine.errors``) — are mapped by their type
in ``service_error``. ``statuses`` wraps a servicer method and is the one place an error becomes a
status. Nothing here looks at a message: rewording one never changes the status a caller gets.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from engine.errors import AlreadyRunning, EngineFailed, InvalidRequest
from protos.convert import FAULT_METADATA_KEY


class ServiceError(Exception):
    """Ends the RPC with ``code`` and the message. ``fault`` names the instance that failed when it
    is not this one (the ``pdserve-fault`` trailer: a router retries elsewhere by it)."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, fault: str | None = None) -> None:
        super().__init__(message)
        self.message, self.fault = message, fault


class InvalidArgument(ServiceError):
    """The request can never succeed as sent; the message starts with the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(ServiceError):
    """Missing or wrong credentials (the public API's key)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class AlreadyExists(ServiceError):
    """A request with this id is in flight here."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(ServiceError):
    """No room now (pages, sequence slots, queue): retry later or elsewhere; nothing was started."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    """The instances cannot work together (their KV layouts differ)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    """An instance cannot serve (unreachable, or its engine is gone): go elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class Internal(ServiceError):
    """A bug or a failed engine step (logged where it happened)."""

    code = grpc.StatusCode.INTERNAL


class Relayed(ServiceError):
    """A status another party already chose — a peer's RPC status, a KV transfer's error — passed on
    with this instance's context in the message."""

    def __init__(self, code: grpc.StatusCode, message: str, fault: str | None = None) -> None:
        super().__init__(message, fault)
        self.code = code


# How a request the engine ended early (its finish reason) ends the RPC.
EARLY_END_ERRORS: dict[str, type[ServiceError]] = {
    "deadline": DeadlineExceeded,
    "abort": Cancelled,
    "error": Internal,
}

# The engine's error types; an error takes the entry of the nearest class in its MRO.
_ENGINE_ERRORS: dict[type[Exception], type[ServiceError]] = {
    AlreadyRunning: AlreadyExists,
    InvalidRequest: InvalidArgument,
    EngineFailed: Unavailable,
}


def service_error(exc: Exception, role: str) -> ServiceError | None:
    """The ``ServiceError`` that ``exc`` stands for, chosen by its type; None for any other type
    (a bug: it propagates, and gRPC answers UNKNOWN). ``role`` ("prefill", "decode") names the
    engine in the message of an engine that is gone."""
    if isinstance(exc, ServiceError):
        return exc
    for cls in type(exc).__mro__:
        kind = _ENGINE_ERRORS.get(cls)
        if kind is Unavailable:
            return Unavailable(f"{role} engine: {exc}")
        if kind is not None:
            return kind(str(exc))
    return None


@contextlib.asynccontextmanager
async def statuses(context: grpc.aio.ServicerContext, role: str) -> AsyncIterator[None]:
    """Run a servicer method's body; an error ``service_error`` knows ends the RPC with its status
    (and its ``fault`` trailer), anything else propagates unchanged."""
    try:
        yield
    except Exception as exc:
        err = service_error(exc, role)
        if err is None:
            raise
        if err.fault is not None:
            context.set_trailing_metadata(((FAULT_METADATA_KEY, err.fault),))
        await context.abort(err.code, err.message)
