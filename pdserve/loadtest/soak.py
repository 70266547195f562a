"""Soak test: keep a running gateway saturated for a set time and watch for leaks.

``pdserve soak --base-url http://127.0.0.1:8000 --duration-s 600 --concurrency 32``

A closed loop of ``--concurrency`` clients sends completions (random token prompts, ``ignore_eos``)
back to back; every ``--sample-interval-s`` the tool asks each instance behind the gateway (found
through its /health) for its ``LoadReport``: resident memory and KV pages. After the load it waits
for every instance to go idle. It passes (exit 0) when no request failed, every instance is idle
again (free + cached pages == all pages, nothing held or running), and no instance's RSS grew by
more than ``--max-rss-growth-pct`` between the first and the last sample taken under load (the
first after ``--warmup-s``, so caches and allocator pools have filled). Results go to stdout and,
with ``--out-dir``, to ``soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from pdserve.loadtest.senders import auth_headers
from pdserve.loadtest.workload import served_vocab_size
from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from protos.convert import is_idle


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--warmup-s", type=float, default=5.0, help="RSS growth is measured from this point")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    p.add_argument(
        "--vocab-high", type=int, default=None,
        help="token ids are drawn from [0, this) (default: the served model's vocab_size, from /v1/models)",
    )  # fmt: skip
    p.add_argument("--sample-interval-s", type=float, default=1.0)
    p.add_argument("--max-rss-growth-pct", type=float, default=20.0)
    p.add_argument("--idle-timeout-s", type=float, default=30.0, help="how long instances get to go idle")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    return p


async def _load(args: argparse.Namespace, model: str, stop_at: float, counts: dict[str, Any]) -> None:
    import httpx

    rng = random.Random(args.seed)
    async with httpx.AsyncClient(
        base_url=args.base_url, timeout=args.request_timeout_s, trust_env=False, headers=auth_headers()
    ) as client:

        async def worker() -> None:
            while time.monotonic() < stop_at:
                prompt = [rng.randrange(args.vocab_high) for _ in range(rng.randint(*args.input_len))]
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": rng.randint(*args.output_len),
                    "ignore_eos": True,
                }
                try:
                    r = await client.post("/v1/completions", json=body)
                    ok = r.status_code == 200
                    error = "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                    tokens = r.json()["usage"]["completion_tokens"] if ok else 0
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    ok, error, tokens = False, f"{type(e).__name__}: {e}", 0
                counts["requests"] += 1
                counts["output_tokens"] += tokens
                if not ok:
                    counts["errors"][error] = counts["errors"].get(error, 0) + 1

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))


async def _sample(instances: dict[str, str]) -> dict[str, common_pb2.LoadReport]:
    out = {}
    for address, role in instances.items():
        async with grpc.aio.insecure_channel(address) as channel:
            stub: Any = (
                prefill_pb2_grpc.PrefillServiceStub(channel)
                if role == "prefill"
                else decode_pb2_grpc.DecodeServiceStub(channel)
            )
            out[address] = await stub.GetLoad(common_pb2.LoadRequest(), timeout=5)
    return out


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the report
    async with httpx.AsyncClient(
        base_url=args.base_url, timeout=30, trust_env=False, headers=auth_headers()
    ) as client:
        health = (await client.get("/health")).json()
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
    if args.vocab_high is None:
        args.vocab_high = await served_vocab_size(args.base_url, auth_headers())
    instances = {a: "prefill" for a in health["prefill"]} | {a: "decode" for a in health["decode"]}
    counts: dict[str, Any] = {"requests": 0, "output_tokens": 0, "errors": {}}
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    load = asyncio.ensure_future(_load(args, model, start + args.duration_s, counts))
    while not load.done():
        reports = await _sample(instances)
        samples.append({"t_s": round(time.monotonic() - start, 2), "requests": counts["requests"],
                        **{a: {"rss_mib": r.rss_bytes / 2**20, "free_or_cached_pages": r.num_free_pages + r.num_cached_pages,
                               "total_pages": r.num_total_pages, "running": r.num_running} for a, r in reports.items()}})  # fmt: skip
        await asyncio.wait({load}, timeout=args.sample_interval_s)
    await load
    elapsed = time.monotonic() - start
    idle_deadline = time.monotonic() + args.idle_timeout_s
    final = await _sample(instances)
    while not all(is_idle(r) for r in final.values()) and time.monotonic() < idle_deadline:
        await asyncio.sleep(0.2)
        final = await _sample(instances)
    under_load = [s for s in samples if s["t_s"] >= args.warmup_s] or samples
    per_instance = {}
    for address in instances:
        first, last = under_load[0][address]["rss_mib"], under_load[-1][address]["rss_mib"]
        per_instance[address] = {
            "role": instances[address],
            "rss_mib_first": round(first, 1),
            "rss_mib_last": round(last, 1),
            "rss_mib_max": round(max(s[address]["rss_mib"] for s in under_load), 1),
            "rss_growth_pct": round(100 * (last - first) / first, 2),
            "idle_after": is_idle(final[address]),
            "free_or_cached_pages_after": final[address].num_free_pages + final[address].num_cached_pages,
            "total_pages": final[address].num_total_pages,
        }
    num_errors = sum(counts["errors"].values())
    passed = (
        num_errors == 0
        and counts["requests"] > 0
        and all(
            i["idle_after"] and i["rss_growth_pct"] <= args.max_rss_growth_pct for i in per_instance.values()
        )
    )
    return {
        "passed": passed,
        "duration_s": round(elapsed, 1),
        "requests": counts["requests"],
        "errors": num_errors,
        "error_kinds": counts["errors"],
        "request_throughput": round(counts["requests"] / elapsed, 2),
        "output_token_throughput": round(counts["output_tokens"] / elapsed, 1),
        "instances": per_instance,
        "samples": samples,
    }


def run_from_args(args: argparse.Namespace) -> int:
    result = asyncio.run(soak(args))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    return run_from_args(add_arguments(argparse.ArgumentParser(description=__doc__)).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
