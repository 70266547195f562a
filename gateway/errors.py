"""Errors a client sees, one type for both APIs: an HTTP status with an OpenAI-style body, or the
matching gRPC status code. Everything the gateway rejects or passes on goes through here."""

from __future__ import annotations

import hmac
import logging

import grpc

from gateway.envelope import error_body, request_id

log = logging.getLogger("pdserve.gateway")

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
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # over --max-prompt-tokens: retrying will not help
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# What a client reads when an instance ended its request: the instance's own words (its address, its
# page counts) go to the gateway's log under the request id. Only a validation message, which names
# the client's field, is passed on as it is.
_PUBLIC = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the server is at capacity; retry later",
    grpc.StatusCode.UNAVAILABLE: "no instance could serve the request; retry later",
    grpc.StatusCode.FAILED_PRECONDITION: "no instance could serve the request; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the request did not finish within its deadline",
    grpc.StatusCode.CANCELLED: "the request was cancelled",
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
    """``code``: OpenAI's machine-readable code (a string), None where there is none."""

    def __init__(
        self, status: int, message: str, param: str | None = None, type: str | None = None,
        code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.counted = False  # already in the request metrics (the generation pipeline counts its own)

    @classmethod
    def invalid(cls, param: str, message: str, code: str | None = None) -> APIError:
        return cls(400, f"{param}: {message}", param, code=code)

    @classmethod
    def unsupported(cls, param: str, value: object = None) -> APIError:
        """A field (or, with ``value``, one value of it) this server does not implement."""
        if value is None:
            return cls.invalid(param, "not supported", "unsupported_parameter")
        return cls.invalid(param, f"{value!r:.60} is not supported", "unsupported_value")

    @classmethod
    def model_not_found(cls, name: str, served: str) -> APIError:
        return cls(
            404, f"model: {name!r:.100} is not served here (try {served!r})", "model", "not_found_error",
            "model_not_found",
        )  # fmt: skip

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, details: str) -> APIError:
        """The error an instance's status stands for. Its details are logged here, with the request
        id; the client's message carries the id and, for INVALID_ARGUMENT only, the details."""
        status, type_ = _BY_GRPC.get(code, (500, "server_error"))
        rid = request_id.get()
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            param = details.split(":", 1)[0] if ":" in details else None
            return cls(status, details or code.name, param, type_)
        # Refusals are routine under load (the pipeline retries elsewhere): not worth a line each.
        level = logging.DEBUG if code is grpc.StatusCode.RESOURCE_EXHAUSTED else logging.WARNING
        log.log(level, "request %s: an instance answered %s: %s", rid, code.name, details)
        public = _PUBLIC.get(code, "internal error")
        return cls(status, f"{public} (request id {rid})", None, type_)

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _BY_STATUS.get(self.status, grpc.StatusCode.INTERNAL)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.type, self.code)
