"""Serving load test for the gateway: TTFT, TPOT, ITL, E2E, throughput and goodput under a load.

    pdserve bench --backend rest --base-url http://127.0.0.1:8000 --num-requests 200 \\
        --request-rate 8 --max-concurrency 64 --input-len-min 128 --input-len-max 512 --out-dir out/

Measures what a client sees, like vLLM's benchmark_serving.py and SGLang's bench_serving: requests
arrive as a Poisson process (or all at once), optionally capped by a concurrency limit, and each one
streams with ``ignore_eos`` so its output length is the one asked for. Workloads and arrival times
(``workload.py``) and the metrics (``metrics.py``) are pure functions; only the two
runners in ``senders.py`` (OpenAI REST over httpx, gRPC over grpc.aio) talk to the gateway. Over REST a chunk "carries tokens" when its text
is non-empty, so tokens the detokenizer holds back (partial UTF-8) merge into the next ITL gap; gRPC
counts ``token_ids`` exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from pdserve.loadtest.metrics import (
    RequestRecord,
    StreamTrace,
    Summary,
    format_summary,
    make_record,
    summarize,
    write_plots,
    write_report,
)
from pdserve.loadtest.senders import RequestError, Send, auth_headers, grpc_sender, rest_sender
from pdserve.loadtest.server_cpu import scrape_cpu_seconds, us_per_token
from pdserve.loadtest.workload import (
    RequestSpec,
    arrival_times,
    grpc_vocab_size,
    load_jsonl,
    random_workload,
    served_vocab_size,
)

# ---- config ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadTestConfig:
    """Everything a run depends on (written to the report); field names are the flags' dests."""

    backend: str = "rest"
    base_url: str = "http://127.0.0.1:8000"
    grpc_address: str = "127.0.0.1:8001"
    model: str | None = None  # None: the first of GET /v1/models (rest), "" = the only one (grpc)
    dataset: str = "random"
    dataset_path: str | None = None
    num_requests: int = 100
    warmup_requests: int = 0
    input_len_min: int = 128
    input_len_max: int = 512
    output_len_min: int = 64
    output_len_max: int = 128
    vocab_low: int = 0
    vocab_high: int | None = None  # None: the served model's vocab_size (asked of the gateway)
    seed: int = 0
    request_rate: float = math.inf
    max_concurrency: int | None = None
    max_duration_s: float | None = None
    drain_timeout_s: float = 30.0
    request_timeout_s: float = 300.0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    out_dir: str | None = None
    progress: bool = True
    metrics_url: str | None = None  # None: <base-url>/metrics over REST, none over gRPC; "" = off

    @property
    def cpu_metrics_url(self) -> str:
        if self.metrics_url is not None:
            return self.metrics_url
        return f"{self.base_url.rstrip('/')}/metrics" if self.backend == "rest" else ""

    def __post_init__(self) -> None:
        checks = [
            (self.backend in ("rest", "grpc"), "--backend must be rest or grpc"),
            (self.dataset in ("random", "file"), "--dataset must be random or file"),
            (self.dataset != "file" or bool(self.dataset_path), "--dataset file needs --dataset-path"),
            (
                self.num_requests >= 1 and self.warmup_requests >= 0,
                "--num-requests >= 1, --warmup-requests >= 0",
            ),
            (1 <= self.input_len_min <= self.input_len_max, "need 1 <= --input-len-min <= --input-len-max"),
            (
                1 <= self.output_len_min <= self.output_len_max,
                "need 1 <= --output-len-min <= --output-len-max",
            ),
            (
                0 <= self.vocab_low < (self.vocab_high or self.vocab_low + 1),
                "need 0 <= --vocab-low < --vocab-high",
            ),
            (self.request_rate > 0, "--request-rate must be > 0 (inf = all at once)"),
            (self.max_concurrency is None or self.max_concurrency >= 1, "--max-concurrency must be >= 1"),
            (self.max_duration_s is None or self.max_duration_s >= 0, "--max-duration-s must be >= 0"),
            (self.request_timeout_s > 0 and self.drain_timeout_s >= 0, "timeouts must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def build_workload(cfg: LoadTestConfig) -> list[RequestSpec]:
    """Warm-up requests first, then the measured ones; a file shorter than that is cycled."""
    total = cfg.warmup_requests + cfg.num_requests
    if cfg.dataset == "random":
        lens = (cfg.input_len_min, cfg.input_len_max), (cfg.output_len_min, cfg.output_len_max)
        assert cfg.vocab_high is not None, "resolved from the server by run()"
        return random_workload(total, *lens, (cfg.vocab_low, cfg.vocab_high), cfg.seed)
    assert cfg.dataset_path is not None, "validated in LoadTestConfig"
    specs = load_jsonl(Path(cfg.dataset_path))
    return [specs[i % len(specs)] for i in range(total)]


# ---- driver ---------------------------------------------------------------------------------------


async def run_requests(
    send: Send, specs: Sequence[RequestSpec], arrivals: Sequence[float], cfg: LoadTestConfig, desc: str
) -> tuple[list[RequestRecord], float]:
    """Send each spec at its arrival offset; returns the records of those sent and the duration (s).

    Past ``max_duration_s`` nothing new is sent (also not a request still queued on the concurrency
    limit); requests in flight ``drain_timeout_s`` later are cancelled and recorded as failed."""
    records: list[RequestRecord] = []
    semaphore = asyncio.Semaphore(cfg.max_concurrency or max(1, len(specs)))
    start = time.perf_counter()
    stop_sending = start + (math.inf if cfg.max_duration_s is None else cfg.max_duration_s)
    bar = tqdm(total=len(specs), desc=desc, unit="req", disable=not cfg.progress)

    async def one(index: int, spec: RequestSpec) -> None:
        async with semaphore:
            if time.perf_counter() > stop_sending:
                return
            trace = StreamTrace(time.perf_counter(), num_prompt_tokens=_num_ids(spec.prompt))
            error = ""
            try:
                await asyncio.wait_for(send(spec, trace), cfg.request_timeout_s)
            except TimeoutError:
                error = f"timed out after --request-timeout-s {cfg.request_timeout_s:g}"
            except asyncio.CancelledError:
                error = "cancelled at the --max-duration-s hard bound"
                raise
            except Exception as exc:  # a failed request is a result: recorded below, not swallowed
                error = str(exc) if isinstance(exc, RequestError) else f"{type(exc).__name__}: {exc}"
            finally:
                trace.end_s = time.perf_counter()
                records.append(make_record(index, trace, start, error))
                bar.update()

    tasks = []
    for index, (spec, at) in enumerate(zip(specs, arrivals, strict=True)):
        if start + at > stop_sending:
            break
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(index, spec)))
    if tasks:
        bound = (
            None if cfg.max_duration_s is None else stop_sending + cfg.drain_timeout_s - time.perf_counter()
        )
        done, pending = await asyncio.wait(tasks, timeout=None if bound is None else max(0.0, bound))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the driver surfaces instead of vanishing with its task
    duration = time.perf_counter() - start
    bar.close()
    return sorted(records, key=lambda r: r.index), duration


def _num_ids(prompt: str | list[int]) -> int:
    return len(prompt) if isinstance(prompt, list) else 0


async def run(cfg: LoadTestConfig) -> tuple[Summary, list[RequestRecord], str]:
    """Warm up (all at once, not measured), then the measured run; returns its summary and records."""
    if cfg.dataset == "random" and cfg.vocab_high is None:
        if cfg.backend == "rest":
            vocab = await served_vocab_size(cfg.base_url, auth_headers())
        else:
            vocab = await grpc_vocab_size(
                cfg.grpc_address, tuple((k.lower(), v) for k, v in auth_headers().items())
            )
        cfg = dataclasses.replace(cfg, vocab_high=vocab)
    specs = build_workload(cfg)
    warmup, measured = specs[: cfg.warmup_requests], specs[cfg.warmup_requests :]
    opener = rest_sender if cfg.backend == "rest" else grpc_sender
    async with opener(cfg) as (send, model):
        if warmup:
            warm_cfg = dataclasses.replace(cfg, max_duration_s=None)
            warm, _ = await run_requests(send, warmup, [0.0] * len(warmup), warm_cfg, "warmup")
            if num_failed := sum(not r.success for r in warm):
                print(f"warning: {num_failed}/{len(warm)} warm-up requests failed", file=sys.stderr)
        arrivals = arrival_times(len(measured), cfg.request_rate, cfg.seed)
        async with httpx.AsyncClient() as metrics:
            url = cfg.cpu_metrics_url
            cpu_before = await scrape_cpu_seconds(metrics, url) if url else {}
            records, duration = await run_requests(send, measured, arrivals, cfg, "requests")
            cpu_after = await scrape_cpu_seconds(metrics, url) if cpu_before else {}
    summary = summarize(records, duration, len(measured) - len(records), cfg.slo_ttft_ms, cfg.slo_tpot_ms)
    num_out = sum(r.output_tokens for r in records if r.success)
    summary = dataclasses.replace(
        summary, server_cpu_us_per_token=us_per_token(cpu_before, cpu_after, num_out)
    )
    return summary, records, model


# ---- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = LoadTestConfig()
    add = parser.add_argument
    add("--backend", choices=["rest", "grpc"], default=d.backend)
    add("--base-url", default=d.base_url, help="REST: the gateway's OpenAI-compatible server")
    add("--grpc-address", default=d.grpc_address, help="gRPC: host:port of pdserve.v1.GatewayService")
    add("--model", default=d.model, help="default: the first of /v1/models (rest), '' (grpc)")
    add("--dataset", choices=["random", "file"], default=d.dataset)
    add("--dataset-path", default=d.dataset_path, help='JSONL: {"prompt": "text" | [ids], "max_tokens": N}')
    add("--num-requests", type=int, default=d.num_requests)
    add("--warmup-requests", type=int, default=d.warmup_requests, help="sent first, not measured")
    for name in ("input-len-min", "input-len-max", "output-len-min", "output-len-max"):
        add(f"--{name}", type=int, default=getattr(d, name.replace("-", "_")), help="random dataset, tokens")
    add("--vocab-low", type=int, default=d.vocab_low, help="random prompt token ids in [low, high)")
    add("--vocab-high", type=int, default=d.vocab_high, help="default: the served model's vocab_size")
    add("--seed", type=int, default=d.seed, help="random prompts and arrival times")
    add("--request-rate", type=float, default=d.request_rate, help="Poisson req/s; inf = all at once")
    add("--max-concurrency", type=int, default=d.max_concurrency, help="requests in flight at most")
    add("--max-duration-s", type=float, default=d.max_duration_s, help="stop sending new requests after")
    add("--drain-timeout-s", type=float, default=d.drain_timeout_s, help="then cancel in-flight ones after")
    add("--request-timeout-s", type=float, default=d.request_timeout_s)
    add("--slo-ttft-ms", type=float, default=d.slo_ttft_ms, help="goodput: TTFT at most this")
    add("--slo-tpot-ms", type=float, default=d.slo_tpot_ms, help="goodput: TPOT at most this")
    add("--out-dir", default=d.out_dir, help="write load_test.json and load_test.png here")
    add("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    add("--metrics-url", default=d.metrics_url,
        help="the gateway's /metrics, for each server process's CPU µs per output token (default: "
             "<base-url>/metrics over REST, none over gRPC; '' = off)")  # fmt: skip
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(prog="pdserve bench", description=(__doc__ or "").split("\n")[0])
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run, print the table, write the report; 1 when no request succeeded, 2 on a bad setup."""
    try:
        cfg = LoadTestConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LoadTestConfig)})
        summary, records, model = asyncio.run(run(cfg))
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if cfg.out_dir:
        out_dir = Path(cfg.out_dir)
        print(f"wrote {write_report(out_dir, {**dataclasses.asdict(cfg), 'model': model}, summary, records)}")
        if png := write_plots(out_dir, records):
            print(f"wrote {png}")
    return 0 if summary.num_completed else 1


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
