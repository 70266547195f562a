"""What every pdserve gRPC server has: the aio server, standard health and reflection, clean shutdown.

Health (``grpc.health.v1``) reports NOT_SERVING until ``mark_serving`` (after warm-up) and again
from the start of a graceful shutdown, for the overall server ("") and for each named service.
An engine-backed instance drains on SIGTERM / SIGINT (``protos.drain``): NOT_SERVING, no new
admissions, the running requests finish (up to the drain timeout), then it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.drain import Drain
from protos.guard import RequestGuard
from protos.tls import TLSConfig

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 << 20
# Clients (gateway → instances, decode → prefill, the KV sender) allow the same message sizes.
# A peer that restarts on its address is reconnected to within half a second of listening again
# (gRPC's default backoff grows to minutes while it is down, and fails calls meanwhile).
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]


def host_port(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts bracketed as gRPC addresses want them."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    def __init__(
        self,
        service_names: Iterable[str],
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        guard: RequestGuard | None = None,
        admission_methods: Iterable[str] = (),
    ) -> None:
        """``max_message_bytes``: larger requests are refused by gRPC with RESOURCE_EXHAUSTED.
        ``guard``: parses every request (malformed → INVALID_ARGUMENT, logged per peer at most once a
        minute) and checks credentials where it was told to; a plain one by default.
        ``admission_methods``: the full method names a drain refuses (``protos.drain``)."""
        options = dict(SERVER_OPTIONS) | {"grpc.max_receive_message_length": max_message_bytes}
        self.drain = Drain(admission_methods)
        self.server = grpc.aio.server(  # each option key once: gRPC takes the first
            options=list(options.items()), interceptors=[guard or RequestGuard(), self.drain]
        )
        self.service_names = list(service_names)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0
        self._watcher: asyncio.Task | None = None

    def bind(self, host: str, port: int, tls: TLSConfig | None = None) -> int:
        """Listen on host:port (port 0 picks a free one), with TLS when given; returns the port."""
        address = host_port(host, port)
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, tls.server_credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        return self.port

    async def start(self) -> None:
        await self.server.start()
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def mark_serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def mark_not_serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_all(self, status: int) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    def watch(self, healthy: Callable[[], bool], interval_s: float = 0.5) -> None:
        """Report NOT_SERVING for good once ``healthy()`` turns false (the engine loop died)."""

        async def poll() -> None:
            while healthy():
                await asyncio.sleep(interval_s)
            log.error("unhealthy: reporting NOT_SERVING")
            await self.mark_not_serving()

        self._watcher = asyncio.get_running_loop().create_task(poll(), name="health-watch")

    async def serve_engine(
        self,
        engine: Any,
        role: str,
        host: str,
        close: Callable[[], Awaitable[None]],
        drain_timeout_s: float = 30.0,
    ) -> None:
        """The life of an engine-backed instance (prefill, decode), once its services are added and
        its port bound: start the engine loop and the server, report SERVING (until the loop dies),
        print where it listens (the line ``pdserve up`` and the tests read), serve until a signal,
        drain (running requests get ``drain_timeout_s`` to finish), then stop the engine and
        ``close`` the instance's own clients."""
        engine.start()
        await self.start()
        await self.mark_serving()
        self.watch(lambda: engine.failure is None)
        print(f"pdserve {role} listening on {host_port(host, self.port)}", flush=True)
        try:
            await self.run_until_signal(drain_timeout_s)
            load = engine.load
            log.info(
                "%s stopped: %d of %d KV pages free, %d more held by the prefix cache only",
                role, load.num_free_pages, load.num_total_pages, load.num_cached_pages,
            )  # fmt: skip
        finally:
            closed = await engine.stop()
            await close()
            if not closed:  # a step thread that never returns would block the interpreter's exit
                log.critical("exiting without the engine's step thread (stuck in a dead rank's collective)")
                logging.shutdown()
                os._exit(1)

    async def run_until_signal(self, drain_timeout_s: float = 5.0, grace_s: float = 2.0) -> None:
        """Serve until SIGINT/SIGTERM; then report NOT_SERVING, refuse new admissions, wait up to
        ``drain_timeout_s`` for the admitted calls to end, and stop (other calls get ``grace_s``)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.health.enter_graceful_shutdown()
        self.drain.start()
        log.info(
            "draining: %d requests running (drain timeout %.1fs)", self.drain.num_in_flight, drain_timeout_s
        )
        if await self.drain.wait_idle(drain_timeout_s):
            log.info("drained: no request running; shutting down")
        else:
            log.warning("drain timeout: %d requests still running are cancelled", self.drain.num_in_flight)
        await self.server.stop(grace_s)
