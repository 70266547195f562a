"""Errors a client sees, one type for both APIs: an HTTP status with an OpenAI-style body, or the
matching gRPC status code. Everything the gateway rejects or passes on goes through here."""

from __future__ import annotations

import hmac

import grpc

_BY_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "service_unavailable"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
}
_BY_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # over --max-prompt-tokens: retrying will not help
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def check_api_key(authorization: str, expected: str | None) -> None:
    """Raise 401 unless ``authorization`` is ``Bearer <expected>`` (or no key is configured).
    Constant-time comparison; the key never appears in a message or a log line."""
    if expected is None:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(
            401, "invalid or missing API key: send 'Authorization: Bearer <key>'", type="authentication_error"
        )


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.counted = False  # already in the request metrics (the generation pipeline counts its own)

    @classmethod
    def invalid(cls, param: str, message: str) -> APIError:
        return cls(400, f"{param}: {message}", param)

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, details: str) -> APIError:
        status, type_ = _BY_GRPC.get(code, (500, "server_error"))
        param = (
            details.split(":", 1)[0] if code is grpc.StatusCode.INVALID_ARGUMENT and ":" in details else None
        )
        return cls(status, details or code.name, param, type_)

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _BY_STATUS.get(self.status, grpc.StatusCode.INTERNAL)

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }
