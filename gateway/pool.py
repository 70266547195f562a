"""A pool of prefill or decode instances: health checks, ejection and re-admission, load reports,
and picking one by the pool's routing policy.

Every ``health_interval_s`` each instance is asked for ``grpc.health.v1`` status and its
``LoadReport`` (both bounded by ``health_timeout_s``). ``eject_after`` consecutive failures — or
one failed request that could not reach it, or one NOT_SERVING answer (the instance is draining or
its engine died: it says so itself) — take it out of routing. An instance is never removed from
the pool: a restarted process on the same address rejoins once it answers its health check and,
when the pool has a ``probe`` (the gateway's data-path canary through that instance), the probe
passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.routing import Candidate, Policy
from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from protos.serving import CHANNEL_OPTIONS
from protos.tls import TLSConfig, aio_channel

log = logging.getLogger("pdserve.gateway")


@dataclass(eq=False)
class Instance:
    address: str
    role: str  # "prefill" | "decode"
    channel: grpc.aio.Channel
    healthy: bool = False
    failures: int = 0
    in_flight: int = 0
    num_routed: int = 0
    load: common_pb2.LoadReport = field(default_factory=common_pb2.LoadReport)

    @property
    def stub(self) -> decode_pb2_grpc.DecodeServiceStub | prefill_pb2_grpc.PrefillServiceStub:
        if self.role == "decode":
            return self.decode_stub
        return prefill_pb2_grpc.PrefillServiceStub(self.channel)

    @property
    def decode_stub(self) -> decode_pb2_grpc.DecodeServiceStub:
        assert self.role == "decode", f"{self.address} is a {self.role} instance"
        return decode_pb2_grpc.DecodeServiceStub(self.channel)

    def candidate(self) -> Candidate:
        total = self.load.num_total_pages or 1
        used = (total - self.load.num_free_pages - self.load.num_cached_pages) / total
        return Candidate(self.address, self.in_flight, self.load.num_waiting, max(0.0, used))


class Pool:
    def __init__(
        self,
        role: str,
        addresses: Sequence[str],
        policy: Policy,
        health_interval_s: float = 1.0,
        health_timeout_s: float = 1.0,
        eject_after: int = 2,
        tls: TLSConfig | None = None,
    ) -> None:
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"{role}: duplicate addresses in {list(addresses)}")
        self.role, self.policy = role, policy
        self.health_interval_s, self.health_timeout_s, self.eject_after = (
            health_interval_s,
            health_timeout_s,
            eject_after,
        )
        self.instances = [Instance(a, role, aio_channel(a, tls, CHANNEL_OPTIONS)) for a in addresses]
        self._task: asyncio.Task | None = None
        # Run before an instance that answers its health check is routed to again; raises if the
        # instance cannot serve. None: the health check alone admits.
        self.probe: Callable[[Instance], Awaitable[None]] | None = None
        self.on_pick: Callable[[str, str], None] | None = None  # (role, address) of each pick
        self._probing: dict[str, asyncio.Task] = {}

    # -- routing -----------------------------------------------------------------------------------
    def healthy(self) -> list[Instance]:
        return [i for i in self.instances if i.healthy]

    def pick(self, prompt_ids: Sequence[int], exclude: set[str]) -> Instance | None:
        """The policy's choice among healthy instances not in ``exclude``; None if there is none."""
        by_address = {i.address: i for i in self.instances if i.healthy and i.address not in exclude}
        if not by_address:
            return None
        chosen = self.policy.choose([i.candidate() for i in by_address.values()], prompt_ids)
        instance = by_address[chosen.address]
        self.policy.observe(chosen, prompt_ids)
        instance.num_routed += 1
        if self.on_pick is not None:
            self.on_pick(self.role, instance.address)
        return instance

    def mark_unreachable(self, instance: Instance, reason: str) -> None:
        if instance.healthy:
            log.warning("%s %s ejected: %s", self.role, instance.address, reason)
        instance.healthy = False
        instance.failures = max(instance.failures, self.eject_after)

    # -- health ------------------------------------------------------------------------------------
    async def check(self, instance: Instance) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(instance.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.health_timeout_s
            )
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                # Its own word, not a flaky network: out of routing now, not after eject_after checks.
                instance.failures = max(instance.failures, self.eject_after - 1)
                raise RuntimeError(
                    f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
                )
            instance.load = await instance.stub.GetLoad(
                common_pb2.LoadRequest(), timeout=self.health_timeout_s
            )
        except (grpc.aio.AioRpcError, RuntimeError) as e:
            instance.failures += 1
            if instance.healthy and instance.failures >= self.eject_after:
                instance.healthy = False
                reason = e.code().name if isinstance(e, grpc.aio.AioRpcError) else str(e)
                log.warning(
                    "%s %s ejected after %d failed checks (%s)",
                    self.role,
                    instance.address,
                    instance.failures,
                    reason,
                )
            return False
        instance.failures = 0
        if not instance.healthy:
            if self.probe is None:
                log.info("%s %s admitted", self.role, instance.address)
                instance.healthy = True
            elif instance.address not in self._probing:
                task = asyncio.get_running_loop().create_task(self._admit(instance), name="probe")
                self._probing[instance.address] = task
        return instance.healthy

    async def _admit(self, instance: Instance) -> None:
        """Route to ``instance`` again once the probe through it passes (else the next check retries)."""
        assert self.probe is not None
        try:
            await self.probe(instance)
        except Exception as e:  # whatever the probe's failure, the instance stays out of routing
            why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else repr(e)
            log.warning("%s %s answers but its canary failed (%s)", self.role, instance.address, why)
        else:
            log.info("%s %s admitted (canary through it passed)", self.role, instance.address)
            instance.healthy, instance.failures = True, 0
        finally:
            del self._probing[instance.address]

    async def refresh_loads(self) -> None:
        """Fetch every healthy instance's load report now (a scrape reads current counters, not ones
        up to a health interval old); health state is left to the checks."""

        async def refresh(instance: Instance) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                instance.load = await instance.stub.GetLoad(
                    common_pb2.LoadRequest(), timeout=self.health_timeout_s
                )

        await asyncio.gather(*(refresh(i) for i in self.healthy()))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in self.instances))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"{self.role}-health")

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.health_interval_s)

    async def close(self) -> None:
        for task in [self._task, *self._probing.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for i in self.instances:
            await i.channel.close()
