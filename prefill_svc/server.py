"""Startup of a prefill instance: engine, KV sender, gRPC server with health and reflection."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import uvloop

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine
from engine.stats_log import check_ops_config, start_stats_logger
from kvtransfer import KVLayout, check_kv_backend, create_sender, sender_options
from prefill_svc.servicer import PrefillServicer
from protos import prefill_pb2, prefill_pb2_grpc
from protos.serving import GrpcServer
from protos.tls import TLSConfig

log = logging.getLogger("pdserve.prefill")


@dataclass(frozen=True)
class PrefillConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8100
    kv_backend: str = "tcp"
    request_timeout_s: float = 600.0  # deadline of a request that names none
    kv_chunk_delay_s: float = 0.0  # fault hook (tests): delay before each KV chunk sent
    tls: TLSConfig | None = None
    max_queued_requests: int = 4096  # waiting for the scheduler; more → RESOURCE_EXHAUSTED
    kv_layerwise: bool = True  # send each layer's KV as the prefill step computes it (tp 1 only)
    drain_timeout_s: float = 30.0  # on SIGTERM, running requests get this long to finish
    log_stats_interval_s: float = 10.0  # a stats line this often; 0: none

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: must be in [0, 65536), got {self.port}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s: must be > 0, got {self.request_timeout_s}")
        check_ops_config(self.drain_timeout_s, self.log_stats_interval_s)
        check_kv_backend(self.kv_backend, self.engine.device, self.engine.tp)
        # cp > 1 is fine: every CP rank writes the whole KV into its pool, so rank 0's pool (the
        # one the sender reads) is laid out as with one rank and the transfer is unchanged.


async def serve(cfg: PrefillConfig) -> None:
    engine = Engine(cfg.engine)
    layout = KVLayout.of_engine(engine)
    options = sender_options(cfg.kv_backend, tls=cfg.tls, chunk_delay_s=cfg.kv_chunk_delay_s)
    # With tp > 1 the servicer hands the sender whole heads (Engine.read_kv): this pool is rank 0's shard.
    sender = create_sender(cfg.kv_backend, layout, engine.runner.kv_pool, **options)
    async_engine = AsyncEngine(engine)
    servicer = PrefillServicer(
        async_engine, sender, cfg.kv_backend, cfg.request_timeout_s, cfg.max_queued_requests,
        layerwise=cfg.kv_layerwise,
    )  # fmt: skip
    service = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name
    server = GrpcServer([service], admission_methods=[f"/{service}/Prefill"])
    prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, server.server)
    port = server.bind(cfg.host, cfg.port, cfg.tls)
    log.info(
        "prefill serving on %s:%d (model %s, tp %d, layout %s, kv backend %s, sent %s)",
        cfg.host, port, cfg.engine.model, cfg.engine.tp, layout.digest, cfg.kv_backend,
        "layer by layer" if servicer.layerwise else "after the prefill",
    )  # fmt: skip

    stats = start_stats_logger(
        "prefill", cfg.log_stats_interval_s, lambda: async_engine.load, lambda: sender.num_bytes_sent
    )

    async def close() -> None:  # the engine (and its TP / CP ranks) is closed by AsyncEngine.stop
        if stats is not None:
            stats.stop()
        await sender.close()

    await server.serve_engine(async_engine, "prefill", cfg.host, close, cfg.drain_timeout_s)


def run(cfg: PrefillConfig) -> int:
    # uvloop: the event loop's own cost (callbacks, futures, socket I/O) is paid per step and per
    # request on the serving path; it runs grpc.aio as the gateway does.
    uvloop.run(serve(cfg))
    return 0
