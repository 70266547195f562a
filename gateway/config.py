"""The gateway's configuration, resolved once at startup (``pdserve gateway`` / ``pdserve up``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.routing import POLICIES, policy_names
from protos.tls import TLSConfig


@dataclass(frozen=True)
class HTTPLimits:
    """What one HTTP client connection may cost the REST server."""

    header_timeout_s: float = 10.0  # the request line and headers must arrive within this (408)
    max_header_bytes: int = 32 << 10  # request line + headers; larger → 431
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this (whole seconds)
    body_timeout_s: float = 60.0  # the whole body must arrive within this (408)

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "keep_alive_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes: must be >= 1024, got {self.max_header_bytes}")


@dataclass(frozen=True)
class GatewayConfig:
    model: str  # the HF model directory (tokenizer, chat template, context length)
    prefill: tuple[str, ...]  # host:port of every prefill instance
    decode: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000  # REST; 0 picks a free port
    grpc_port: int = 8001  # public gRPC API; 0 picks a free port
    served_model_name: str | None = None  # default: the model directory's name
    prefill_policy: str = "prefix_aware"
    decode_policy: str = "least_load"
    request_timeout_s: float = 600.0
    max_model_len: int | None = None
    health_interval_s: float = 1.0
    canary_timeout_s: float = 60.0
    max_request_bytes: int = 4 << 20  # REST body / public gRPC message; larger → 413 / RESOURCE_EXHAUSTED
    max_prompt_tokens: int | None = None  # operator cap below the context; larger → 413
    max_concurrent_requests: int = 1024  # in flight through this gateway; more → 429 / RESOURCE_EXHAUSTED
    # Tokens per streamed event at least (the first token and the last event are never held back):
    # fewer, larger events for batch-heavy deployments. 1 = an event as soon as tokens arrive.
    stream_interval: int = 1
    # When every instance refused a request as full, it waits this long for room, retrying, before
    # the client gets 429: a burst above capacity queues, as in one engine, instead of failing.
    queue_timeout_s: float = 30.0
    tls: TLSConfig | None = None  # gRPC to the instances and on the public gRPC port
    http: HTTPLimits = HTTPLimits()  # per-connection bounds of the REST server
    api_key: str | None = field(default=None, repr=False)  # required on /v1/* and the public gRPC API
    log_requests: bool = True  # one access line per request (gateway.access_log)

    def __post_init__(self) -> None:
        if not self.decode:
            raise ValueError("decode: at least one instance is required")
        POLICIES.check(self.prefill_policy, field="prefill_policy")
        POLICIES.check(self.decode_policy, field="decode_policy")
        # Disaggregated decode holds no prompt cache to aim at; colocated decode instances do (they
        # prefill), so with no prefill instances every policy applies to them.
        if self.prefill and POLICIES.caps(self.decode_policy).needs_prompt_cache:
            raise ValueError(
                f"decode_policy: {self.decode_policy} needs colocated decode (no prefill instances); "
                f"with prefill instances use one of {', '.join(policy_names(prompt_cache=False))}"
            )
        for name in ("port", "grpc_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name}: must be in [0, 65536), got {getattr(self, name)}")
        for name in ("max_request_bytes", "max_concurrent_requests", "stream_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens: must be >= 1, got {self.max_prompt_tokens}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("api_key: use at least 8 characters")
        if self.queue_timeout_s < 0:
            raise ValueError(f"queue_timeout_s: must be >= 0, got {self.queue_timeout_s}")
        if self.request_timeout_s <= 0 or self.health_interval_s <= 0:
            raise ValueError("request_timeout_s and health_interval_s must be > 0")
