"""What serving costs the servers' CPUs: process CPU time (user + system, all threads) of the gateway
and of every prefill and decode instance, read from the gateway's ``/metrics`` before and after a run.

The gateway exports its own ``process_cpu_seconds_total`` and, per instance, the
``pdserve_instance_cpu_seconds`` the instance reported in its ``LoadReport`` (fetched fresh at each
scrape). Divided by the run's output tokens this is the per-token host cost of each hop — the number
that decides how many tokens per second one process can serve — and it works against any
deployment the load tool can reach, local or not.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

GATEWAY = "gateway"


def parse_cpu_seconds(text: str) -> dict[str, float]:
    """``{"gateway": s, "decode@host:port": s, ...}`` from a Prometheus text exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_cpu_seconds_total":
                out[GATEWAY] = sample.value
            elif sample.name == "pdserve_instance_cpu_seconds_total":
                out[f"{sample.labels['role']}@{sample.labels['address']}"] = sample.value
    return out


async def scrape_cpu_seconds(client: httpx.AsyncClient, metrics_url: str) -> dict[str, float]:
    """The CPU seconds at ``metrics_url``; empty when it cannot be read (the report just omits them)."""
    try:
        reply = await client.get(metrics_url, timeout=10.0)
        reply.raise_for_status()
    except httpx.HTTPError:
        return {}
    return parse_cpu_seconds(reply.text)


def us_per_token(
    before: Mapping[str, float], after: Mapping[str, float], num_tokens: int
) -> dict[str, float]:
    """CPU µs per output token of each process seen in both readings. An instance whose counter
    went down restarted during the run: its figure would be wrong, so it is left out."""
    return {
        name: 1e6 * (after[name] - before[name]) / num_tokens
        for name in sorted(after)
        if name in before and after[name] >= before[name] and num_tokens > 0
    }
