"""The periodic stats line of a serving instance (torch-free): what a step-level engine log shows
(vLLM's "Avg prompt throughput ..." line), built only from two ``EngineLoad`` snapshots and the
instance's KV byte counter, never from the engine's internals.

    decode stats: running 12, waiting 0 | in 310.2 tok/s, out 95.4 tok/s | KV pages 140/512 used
    (31 cached) | prefix cache hit 42.0% | KV transfer 18.3 MB/s
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.load import EngineLoad

log = logging.getLogger("pdserve.stats")


@dataclass(frozen=True)
class Stats:
    """An interval's rates and the load at its end."""

    num_running: int
    num_waiting: int
    prompt_tok_s: float  # prompt tokens prefilled here per second
    output_tok_s: float  # tokens sampled here per second
    num_used_pages: int  # held by requests (not free, not only cached)
    num_cached_pages: int
    num_total_pages: int
    prefix_hit_rate: float | None  # cached / prompt tokens in the interval; None: no prompt finished
    kv_bytes_s: float  # KV bytes sent (prefill) or received (decode) per second

    @classmethod
    def between(cls, a: EngineLoad, b: EngineLoad, kv_bytes: int, seconds: float) -> Stats:
        """From snapshot ``a`` to ``b`` (``seconds`` apart) with ``kv_bytes`` moved in between."""
        seconds = max(seconds, 1e-9)
        num_prompt = b.num_prompt_tokens - a.num_prompt_tokens
        num_cached = b.num_cached_prompt_tokens - a.num_cached_prompt_tokens
        return cls(
            num_running=b.num_running,
            num_waiting=b.num_waiting,
            prompt_tok_s=num_prompt / seconds,
            output_tok_s=(b.num_generated_tokens - a.num_generated_tokens) / seconds,
            num_used_pages=b.num_total_pages - b.num_free_pages - b.num_cached_pages,
            num_cached_pages=b.num_cached_pages,
            num_total_pages=b.num_total_pages,
            prefix_hit_rate=num_cached / num_prompt if num_prompt else None,
            kv_bytes_s=kv_bytes / seconds,
        )

    def line(self, role: str) -> str:
        hit = "-" if self.prefix_hit_rate is None else f"{100 * self.prefix_hit_rate:.1f}%"
        return (
            f"{role} stats: running {self.num_running}, waiting {self.num_waiting} | "
            f"in {self.prompt_tok_s:.1f} tok/s, out {self.output_tok_s:.1f} tok/s | "
            f"KV pages {self.num_used_pages}/{self.num_total_pages} used ({self.num_cached_pages} cached) | "
            f"prefix cache hit {hit} | KV transfer {self.kv_bytes_s / 1e6:.2f} MB/s"
        )


class StatsLogger:
    """Logs one stats line every ``interval_s`` from ``load()`` (the engine's latest snapshot) and
    ``kv_bytes()`` (the instance's running total of KV bytes moved)."""

    def __init__(
        self, role: str, interval_s: float, load: Callable[[], EngineLoad], kv_bytes: Callable[[], int]
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"log_stats_interval_s: must be > 0, got {interval_s}")
        self.role, self.interval_s, self.load, self.kv_bytes = role, interval_s, load, kv_bytes
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.role}-stats")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        last, last_bytes, last_t = self.load(), self.kv_bytes(), time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            now, now_bytes, now_t = self.load(), self.kv_bytes(), time.monotonic()
            stats = Stats.between(last, now, now_bytes - last_bytes, now_t - last_t)
            log.info(stats.line(self.role), extra={"stats": stats.__dict__ | {"role": self.role}})
            last, last_bytes, last_t = now, now_bytes, now_t


def start_stats_logger(
    role: str, interval_s: float, load: Callable[[], EngineLoad], kv_bytes: Callable[[], int]
) -> StatsLogger | None:
    """A started ``StatsLogger`` (call from the event loop), or None when stats lines are off (0)."""
    if not interval_s:
        return None
    stats = StatsLogger(role, interval_s, load, kv_bytes)
    stats.start()
    return stats


def check_ops_config(drain_timeout_s: float, log_stats_interval_s: float) -> None:
    """The operational fields every instance's config has."""
    if drain_timeout_s < 0:
        raise ValueError(f"drain_timeout_s: must be >= 0, got {drain_timeout_s}")
    if log_stats_interval_s < 0:
        raise ValueError(
            f"log_stats_interval_s: must be >= 0 (0: no stats lines), got {log_stats_interval_s}"
        )
