"""Startup of a decode instance: engine, KV receiver, gRPC server with health and reflection."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import uvloop

from decode_svc.kv_landing import KVLanding
from decode_svc.servicer import DecodeServicer
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine
from engine.stats_log import check_ops_config, start_stats_logger
from kvtransfer import KVLayout, check_kv_backend, create_receiver, receiver_options
from protos import decode_pb2, decode_pb2_grpc, kvtransfer_pb2
from protos.serving import GrpcServer, host_port
from protos.tls import TLSConfig

log = logging.getLogger("pdserve.decode")


@dataclass(frozen=True)
class DecodeConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8200
    kv_backend: str = "tcp"
    request_timeout_s: float = 600.0  # deadline of a request that names none
    advertise_host: str | None = None  # the host prefill sends KV to (default: host)
    tls: TLSConfig | None = None
    drain_timeout_s: float = 30.0  # on SIGTERM, running requests get this long to finish
    log_stats_interval_s: float = 10.0  # a stats line this often; 0: none

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: must be in [0, 65536), got {self.port}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s: must be > 0, got {self.request_timeout_s}")
        check_ops_config(self.drain_timeout_s, self.log_stats_interval_s)
        check_kv_backend(self.kv_backend, self.engine.device, self.engine.tp)
        if self.engine.cp != 1:
            raise ValueError(
                f"cp: decode runs one rank (context parallelism splits prefills: give --cp to the "
                f"prefill service), got {self.engine.cp}"
            )


async def serve(cfg: DecodeConfig) -> None:
    engine = Engine(cfg.engine)
    layout = KVLayout.of_engine(engine)
    async_engine = AsyncEngine(engine)
    landing = KVLanding(async_engine)  # with tp > 1 the receiver writes into host staging
    options = receiver_options(cfg.kv_backend, host=cfg.advertise_host or cfg.host)
    receiver = create_receiver(cfg.kv_backend, layout, landing.pool, **options)
    names = [
        decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name,
        kvtransfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name,
    ]
    server = GrpcServer(names, admission_methods=[f"/{names[0]}/Generate"])
    port = server.bind(cfg.host, cfg.port, cfg.tls)
    kv_address = host_port(cfg.advertise_host or cfg.host, port)
    servicer = DecodeServicer(
        async_engine, receiver, landing, cfg.kv_backend, kv_address, cfg.request_timeout_s, cfg.tls
    )
    servicer.drain = server.drain
    decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server.server)
    receiver.add_to_server(server.server)
    log.info(
        "decode serving on %s:%d (model %s, tp %d, layout %s)",
        cfg.host, port, cfg.engine.model, cfg.engine.tp, layout.digest,
    )  # fmt: skip
    stats = start_stats_logger(
        "decode", cfg.log_stats_interval_s, lambda: async_engine.load, lambda: receiver.num_bytes_received
    )

    async def close() -> None:
        if stats is not None:
            stats.stop()
        await servicer.close()

    await server.serve_engine(async_engine, "decode", cfg.host, close, cfg.drain_timeout_s)


def run(cfg: DecodeConfig) -> int:
    # uvloop: the event loop's own cost (callbacks, futures, socket I/O) is paid per step and per
    # request on the serving path; it runs grpc.aio as the gateway does.
    uvloop.run(serve(cfg))
    return 0
