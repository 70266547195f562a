"""Prometheus metrics of one gateway (its own registry, so several gateways can live in one test
process). Request-level series are observed by the generation pipeline; instance-level series are
read from the pools' latest health checks at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.pool import Pool

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, pools: Sequence[Pool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total etc.: what serving costs this process
        self.requests = Counter(
            "pdserve_requests", "Finished requests by API and outcome", ["api", "status"], registry=r
        )
        self.in_flight = Gauge("pdserve_requests_in_flight", "Requests being served", registry=r)
        self.queued = Gauge(
            "pdserve_requests_queued", "Requests waiting for room: every instance was full", registry=r
        )
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.output_tokens = Counter("pdserve_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "TTFT", buckets=_LATENCY, registry=r)
        self.tpot = Histogram(
            "pdserve_time_per_output_token_seconds", "TPOT per request", buckets=_TOKEN_LATENCY, registry=r
        )
        self.itl = Histogram(
            "pdserve_inter_token_latency_seconds",
            "Gap between streamed tokens",
            buckets=_TOKEN_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds", "Request latency", buckets=_LATENCY, registry=r
        )
        self.queue = Histogram(
            "pdserve_prefill_queue_seconds", "Wait in prefill's queue", buckets=_LATENCY, registry=r
        )
        self.prefill = Histogram("pdserve_prefill_seconds", "Prefill compute", buckets=_LATENCY, registry=r)
        self.kv_transfer = Histogram(
            "pdserve_kv_transfer_seconds", "KV transfer left after the first token: prefill done to ack",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.kv_transfer_hidden = Histogram(
            "pdserve_kv_transfer_hidden_seconds",
            "KV sending under the prefill (layer by layer): first layer sent to prefill done",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "pdserve_routing_retries",
            "Requests sent elsewhere after a refusal",
            ["role", "reason"],
            registry=r,
        )
        r.register(_InstanceCollector(pools))


class _InstanceCollector(Collector):
    def __init__(self, pools: Sequence[Pool]) -> None:
        self.pools = pools

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["role", "address"]
        gauges = {
            "healthy": GaugeMetricFamily("pdserve_instance_healthy", "1 if routed to", labels=labels),
            "in_flight": GaugeMetricFamily(
                "pdserve_instance_in_flight", "Requests this gateway runs there", labels=labels
            ),
            "running": GaugeMetricFamily(
                "pdserve_instance_running", "Requests the instance runs", labels=labels
            ),
            "waiting": GaugeMetricFamily(
                "pdserve_instance_waiting", "Requests queued on the instance", labels=labels
            ),
            # A page is free, held by requests (running, reserved, leased, in transfer; maybe also
            # in the prefix cache), or held only by the prefix cache (evictable: reusable, freed when
            # pages run short). An idle instance with a warm cache has many cached pages, none used.
            "pages_used": GaugeMetricFamily(
                "pdserve_instance_kv_pages_used", "KV pages held by requests", labels=labels
            ),
            "pages_cached": GaugeMetricFamily(
                "pdserve_instance_kv_pages_cached", "KV pages in the prefix cache", labels=labels
            ),
            "pages_evictable": GaugeMetricFamily(
                "pdserve_instance_kv_pages_evictable",
                "KV pages held only by the prefix cache (freed when needed)",
                labels=labels,
            ),
            "pages_total": GaugeMetricFamily("pdserve_instance_kv_pages_total", "KV pages", labels=labels),
        }
        routed = CounterMetricFamily(
            "pdserve_instance_routed", "Requests routed to the instance", labels=labels
        )
        kv_bytes = CounterMetricFamily(
            "pdserve_kv_transfer_bytes", "KV bytes sent/received (reported)", labels=labels
        )
        cpu = CounterMetricFamily(
            "pdserve_instance_cpu_seconds", "The instance process's CPU time (reported)", labels=labels
        )
        for pool in self.pools:
            for i in pool.instances:
                key = [pool.role, i.address]
                gauges["healthy"].add_metric(key, float(i.healthy))
                gauges["in_flight"].add_metric(key, i.in_flight)
                gauges["running"].add_metric(key, i.load.num_running)
                gauges["waiting"].add_metric(key, i.load.num_waiting)
                free, evictable = i.load.num_free_pages, i.load.num_evictable_pages
                gauges["pages_used"].add_metric(key, i.load.num_total_pages - free - evictable)
                gauges["pages_cached"].add_metric(key, i.load.num_cached_pages)
                gauges["pages_evictable"].add_metric(key, evictable)
                gauges["pages_total"].add_metric(key, i.load.num_total_pages)
                routed.add_metric(key, i.num_routed)
                kv_bytes.add_metric(key, i.load.kv_bytes_transferred)
                cpu.add_metric(key, i.load.cpu_seconds)
        yield from gauges.values()
        yield routed
        yield kv_bytes
        yield cpu
