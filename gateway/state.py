"""Everything one gateway holds: pools, metrics, the generation pipeline, and readiness.

Ready means: a canary request has completed a real prefill → KV transfer → decode round trip at
least once, and a healthy instance of each role is in the pools now (colocated, with no prefill
instances: a decode instance's own prefill + decode). Until the canary succeeds it is retried (each
attempt bounded); REST /health answers 503 and gRPC health NOT_SERVING meanwhile.

After that, an instance that was out of routing (ejected, restarted) comes back only once a canary
through *it* passes (``_probe``: a decode instance with a healthy prefill, a prefill instance with a
healthy decode), so a process that answers health checks but cannot move KV is never routed to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from engine.sampling_params import SamplingParams
from gateway.access_log import LoggedGenerator, note_instance
from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.metrics import Metrics
from gateway.pool import Instance, Pool
from gateway.routing import make_policy
from protos import decode_pb2
from protos.convert import sampling_to_proto

CANARY_PARAMS = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

log = logging.getLogger("pdserve.gateway")


class GatewayState:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        interval = cfg.health_interval_s
        self.prefill = Pool("prefill", cfg.prefill, make_policy(cfg.prefill_policy), interval, tls=cfg.tls)
        self.decode = Pool("decode", cfg.decode, make_policy(cfg.decode_policy), interval, tls=cfg.tls)
        self.metrics = Metrics([self.prefill, self.decode])
        self.generator = LoggedGenerator(
            cfg.model, self.prefill, self.decode, self.metrics, cfg.request_timeout_s, cfg.max_model_len,
            cfg.max_prompt_tokens, cfg.max_concurrent_requests, cfg.stream_interval, cfg.queue_timeout_s,
        )  # fmt: skip
        self.generator.log_requests = cfg.log_requests
        for pool in (self.prefill, self.decode):
            pool.on_pick = note_instance
        self.model_name = cfg.served_model_name or Path(cfg.model).name
        self.created = int(time.time())
        self.canary_done = False
        self.canary_error = ""
        self._canary: asyncio.Task | None = None

    @property
    def colocated(self) -> bool:
        return not self.prefill.instances

    @property
    def ready(self) -> bool:
        return self.canary_done and self._instances_up()

    def _instances_up(self) -> bool:
        return bool(self.decode.healthy()) and (self.colocated or bool(self.prefill.healthy()))

    def health(self) -> dict[str, Any]:
        status = "ready" if self.ready else ("unavailable" if self.canary_done else "starting")
        return {
            "ready": self.ready,
            "status": status,
            "canary": "passed" if self.canary_done else (self.canary_error or "pending"),
            "mode": "colocated" if self.colocated else "disaggregated",
            "prefill": {i.address: i.healthy for i in self.prefill.instances},
            "decode": {i.address: i.healthy for i in self.decode.instances},
        }

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "pdserve",
            "max_model_len": self.generator.max_model_len,
            # Token ids a prompt may hold are [0, vocab_size): load tools draw random prompts from it.
            "vocab_size": self.generator.vocab_size,
        }

    async def start(self) -> None:
        await asyncio.gather(self.prefill.check_all(), self.decode.check_all())
        self.prefill.start()
        self.decode.start()
        self._canary = asyncio.get_running_loop().create_task(self._run_canary(), name="canary")

    async def close(self) -> None:
        if self._canary is not None:
            self._canary.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._canary
        await self.generator.close()
        await self.prefill.close()
        await self.decode.close()

    async def _run_canary(self) -> None:
        """A two-token request through a real pair, until one succeeds."""
        prompt = self.generator.tokenize("pdserve canary")
        while not self.canary_done:
            if self._instances_up():
                try:
                    async for _ in self.generator.generate(
                        prompt, CANARY_PARAMS, "canary", timeout_s=self.cfg.canary_timeout_s
                    ):
                        pass
                    self.canary_done = True
                    path = "decode (colocated)" if self.colocated else "prefill → KV transfer → decode"
                    log.info("canary passed: %s works; ready", path)
                    self.prefill.probe = self.decode.probe = self._probe
                    return
                except APIError as e:
                    self.canary_error = e.message
                    log.warning("canary failed: %s", e.message)
            await asyncio.sleep(self.cfg.health_interval_s / 2)

    async def _probe(self, instance: Instance) -> None:
        """A two-token request through ``instance`` with every healthy instance of the other role
        (none in colocated mode: the decode runs the prompt itself), all of which must pass: each
        peer's own connection to a restarted instance must be back, not only one. With no healthy
        peer there is nothing to pair it with: it is admitted on its health check, and the peers'
        own probes pair them later."""
        pairs: list[tuple[Instance, Instance | None]]
        if self.colocated:
            pairs = [(instance, None)]
        elif instance.role == "decode":
            pairs = [(instance, p) for p in self.prefill.healthy()]
        else:
            pairs = [(d, instance) for d in self.decode.healthy()]
        await asyncio.gather(*(self._canary_through(d, p) for d, p in pairs))

    async def _canary_through(self, decode: Instance, prefill: Instance | None) -> None:
        request = decode_pb2.GenerateRequest(
            request_id=f"canary-{uuid.uuid4().hex[:12]}",
            prompt_token_ids=self.generator.tokenize("pdserve canary"),
            sampling=sampling_to_proto(CANARY_PARAMS),
            deadline_unix_ns=time.time_ns() + int(self.cfg.canary_timeout_s * 1e9),
            prefill_address="" if prefill is None else prefill.address,
        )
        num_tokens = 0
        async for msg in decode.decode_stub.Generate(request, timeout=self.cfg.canary_timeout_s):
            num_tokens += len(msg.token_ids)
        if num_tokens != CANARY_PARAMS.max_tokens:
            raise RuntimeError(f"canary got {num_tokens} tokens, asked for {CANARY_PARAMS.max_tokens}")
