"""Startup of the gateway: REST (uvicorn on uvloop) and the public gRPC API in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from gateway.config import GatewayConfig
from gateway.envelope import RequestIds
from gateway.grpc_api import GatewayServicer, authorize
from gateway.http import create_app
from gateway.limits import guarded_protocol
from gateway.state import GatewayState
from protos import gateway_pb2, gateway_pb2_grpc
from protos.guard import RequestGuard
from protos.serving import GrpcServer

log = logging.getLogger("pdserve.gateway")


async def serve(cfg: GatewayConfig) -> None:
    state = GatewayState(cfg)
    service = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
    # The key is checked before a byte of the message is parsed; health and reflection stay open.
    guard = RequestGuard(authorize(cfg.api_key), protected=(f"/{service}/",)) if cfg.api_key else None
    grpc_server = GrpcServer([service], max_message_bytes=cfg.max_request_bytes, guard=guard)
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(state), grpc_server.server)
    grpc_port = grpc_server.bind(cfg.host, cfg.grpc_port, cfg.tls)
    http = _HTTPServer(
        uvicorn.Config(
            RequestIds(create_app(state)), host=cfg.host, port=cfg.port, log_level="warning",
            access_log=False, http=guarded_protocol(cfg.http), timeout_keep_alive=cfg.http.keep_alive_s,
        )
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, http.request_exit)
    await grpc_server.start()
    await state.start()
    http_task = asyncio.get_running_loop().create_task(http.serve(), name="http")
    while not http.started:
        if http_task.done():
            await http_task  # raises why it could not start (port in use, ...)
            raise OSError(f"REST server on {cfg.host}:{cfg.port} did not start")
        await asyncio.sleep(0.05)
    port = http.servers[0].sockets[0].getsockname()[1]
    print(f"pdserve gateway listening on http://{cfg.host}:{port} (grpc {cfg.host}:{grpc_port})", flush=True)
    log.info("model %s; prefill %s (%s); decode %s (%s)", state.model_name, list(cfg.prefill), cfg.prefill_policy,
             list(cfg.decode), cfg.decode_policy)  # fmt: skip
    readiness = asyncio.get_running_loop().create_task(_track_readiness(state, grpc_server), name="readiness")
    try:
        await http_task  # returns once SIGINT / SIGTERM asked it to (in-flight REST requests finish)
    finally:
        readiness.cancel()
        await grpc_server.health.enter_graceful_shutdown()
        await grpc_server.server.stop(5)
        await state.close()
        log.info("gateway stopped")


class _HTTPServer(uvicorn.Server):
    """uvicorn without its own signal handling: one handler stops REST and gRPC together, with
    their grace periods (uvicorn's would re-raise SIGTERM after serving and skip the gRPC shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def request_exit(self) -> None:
        self.should_exit = True


async def _track_readiness(state: GatewayState, server: GrpcServer) -> None:
    """gRPC health follows readiness (canary passed, a healthy pair exists), like REST /health."""
    ready = None
    while True:
        if state.ready != ready:
            ready = state.ready
            await (server.mark_serving() if ready else server.mark_not_serving())
            log.info("gateway %s", "ready" if ready else "not ready")
        await asyncio.sleep(0.1)


def run(cfg: GatewayConfig) -> int:
    import uvloop

    uvloop.run(serve(cfg))
    return 0
