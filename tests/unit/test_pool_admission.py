"""The gateway pool's view of an instance's own word: a NOT_SERVING answer (a drain, a dead engine)
takes it out of routing at the first check, and once it answers SERVING again it is routed to only
after the probe through it passed. The instance is a real gRPC server in this process answering
grpc.health.v1 and GetLoad."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2

from gateway.pool import Instance, Pool
from gateway.routing import make_policy
from protos import common_pb2, decode_pb2_grpc
from protos.serving import GrpcServer


class _Load(decode_pb2_grpc.DecodeServiceServicer):
    async def GetLoad(self, request: Any, context: Any) -> common_pb2.LoadReport:
        return common_pb2.LoadReport(num_total_pages=8, num_free_pages=8)


async def _scenario() -> list[tuple[str, bool]]:
    server = GrpcServer(["pdserve.v1.DecodeService"])
    decode_pb2_grpc.add_DecodeServiceServicer_to_server(_Load(), server.server)
    port = server.bind("127.0.0.1", 0)
    await server.start()
    await server.mark_serving()
    pool = Pool("decode", [f"127.0.0.1:{port}"], make_policy("round_robin"), eject_after=3)
    instance = pool.instances[0]
    seen: list[tuple[str, bool]] = []
    probe_ok = False
    probes_done = asyncio.Queue[None]()

    async def probe(i: Instance) -> None:
        await asyncio.sleep(0)
        probes_done.put_nowait(None)  # the pool reads the outcome right after this returns
        if not probe_ok:
            raise RuntimeError("canary failed")

    async def check(label: str) -> None:
        await pool.check(instance)
        if pool.probe is not None and not instance.healthy:  # a probe runs on its own task
            await asyncio.wait_for(probes_done.get(), 5)
            await asyncio.sleep(0.01)
        seen.append((label, instance.healthy))

    try:
        await check("serving")
        await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await check("one NOT_SERVING answer")
        pool.probe = probe
        await server.mark_serving()
        await check("serving, probe failing")
        probe_ok = True
        await check("serving, probe passing")
    finally:
        await pool.close()
        await server.server.stop(0)
    return seen


def test_not_serving_ejects_at_once_and_readmission_waits_for_the_probe():
    assert asyncio.run(_scenario()) == [
        ("serving", True),
        ("one NOT_SERVING answer", False),  # eject_after=3 is for failed checks, not for its own word
        ("serving, probe failing", False),
        ("serving, probe passing", True),
    ]
