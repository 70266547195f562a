"""Goodput under a TTFT + TPOT SLO, swept over the request rate, for one or more running systems —
e.g. disaggregated (1P1D) against colocated serving on the same GPUs.

    pdserve goodput --target 1p1d=http://127.0.0.1:8000 \\
        --target colocated=http://127.0.0.1:9000 --rates 1,2,4,8,16 \\
        --slo-ttft-ms 500 --slo-tpot-ms 50 --num-requests 200 --out-dir out/sweep

Each (target, rate) point is one ``pdserve bench`` run (``pdserve.loadtest.load_test``) (Poisson arrivals, the same seeded
workload for every target, ``ignore_eos``). Goodput is the rate of requests that met both SLOs.
The *knee* of a target is the lowest swept rate at which its goodput falls below
``--knee-fraction`` of the offered rate (where it starts missing its SLO); ``ratio_at_knee["a/b"]``
is a's goodput over b's at b's knee. Writes
``goodput_sweep.json`` and ``goodput_sweep.png`` (goodput and SLO attainment against rate).

Start the systems with ``pdserve up`` (``--num-prefill 0`` is the colocated one); see
docs/BENCHMARKS.md for the two-GPU recipe.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from pdserve.loadtest.load_test import LoadTestConfig, run


def parse_target(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith("http"):
        raise argparse.ArgumentTypeError(f"--target: expected NAME=http://host:port, got {text!r}")
    return name, url


def knee(points: list[dict], fraction: float) -> float | None:
    """The lowest rate whose goodput is below ``fraction`` of that rate; None if every point met it."""
    for p in sorted(points, key=lambda p: p["rate"]):
        if p["goodput"] < fraction * p["rate"]:
            return p["rate"]
    return None


def compare(results: dict[str, list[dict]], fraction: float) -> dict[str, float | None]:
    """For every ordered pair (a, b): goodput(a) / goodput(b) at b's knee (None: b has no knee in
    the sweep, or b's goodput there is zero)."""
    ratios: dict[str, float | None] = {}
    for b, b_points in results.items():
        rate = knee(b_points, fraction)
        at_b = {p["rate"]: p["goodput"] for p in b_points}
        for a, a_points in results.items():
            if a == b:
                continue
            at_a = {p["rate"]: p["goodput"] for p in a_points}
            ok = rate is not None and at_b.get(rate) and rate in at_a
            ratios[f"{a}/{b}"] = at_a[rate] / at_b[rate] if ok else None  # type: ignore[index]
    return ratios


def sweep(targets: list[tuple[str, str]], rates: list[float], base: LoadTestConfig) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name, _ in targets}
    for name, url in targets:
        for rate in rates:
            cfg = dataclasses.replace(base, base_url=url, request_rate=rate, out_dir=None)
            summary, _, _ = asyncio.run(run(cfg))
            point = {
                "rate": rate,
                "goodput": summary.goodput or 0.0,
                "completed": summary.num_completed,
                "failed": summary.num_failed,
                "throughput": summary.request_throughput,
                "ttft_p50_ms": summary.ttft.median_ms if summary.ttft else None,
                "ttft_p99_ms": summary.ttft.p99_ms if summary.ttft else None,
                "tpot_p50_ms": summary.tpot.median_ms if summary.tpot else None,
                "tpot_p99_ms": summary.tpot.p99_ms if summary.tpot else None,
            }
            results[name].append(point)
            print(f"{name:>12} rate {rate:7.2f}/s: goodput {point['goodput']:.2f}/s "
                  f"({point['completed']} ok, {point['failed']} failed)", flush=True)  # fmt: skip
    return results


def table(results: dict[str, list[dict]], rates: list[float]) -> list[str]:
    names = list(results)
    lines = [
        "| rate (req/s) | "
        + " | ".join(f"{n} goodput | {n} TTFT p99 ms | {n} TPOT p99 ms" for n in names)
        + " |"
    ]
    lines.append("|---" * (1 + 3 * len(names)) + "|")
    for i, rate in enumerate(rates):
        cells = []
        for n in names:
            p = results[n][i]
            cells += [f"{p['goodput']:.2f}", _ms(p["ttft_p99_ms"]), _ms(p["tpot_p99_ms"])]
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in results.items():
        rates = [p["rate"] for p in points]
        ax1.plot(rates, [p["goodput"] for p in points], marker="o", label=name)
        ax2.plot(rates, [p["goodput"] / p["rate"] for p in points], marker="o", label=name)
    ax1.set(xlabel="request rate (req/s)", ylabel="goodput (req/s)", title="goodput under the SLO")
    ax2.set(
        xlabel="request rate (req/s)", ylabel="fraction within SLO", title="SLO attainment", ylim=(0, 1.05)
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--target", type=parse_target, action="append", help="NAME=http://host:port")
    p.add_argument(
        "--merge", nargs="+", metavar="JSON",
        help="instead of sweeping: join earlier runs' goodput_sweep.json (systems that cannot run at once)",
    )  # fmt: skip
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-tpot-ms", type=float)
    p.add_argument(
        "--knee-fraction", type=float, default=0.9, help="a rate 'misses its SLO' below this share"
    )
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--warmup-requests", type=int, default=4)
    for name, default in (("input-len-min", 128), ("input-len-max", 512), ("output-len-min", 64),
                          ("output-len-max", 128)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--max-duration-s", type=float, default=None, help="per point: stop sending after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """Sweep (or merge earlier sweeps), print the table, write the report; 2 on a bad setup."""
    if args.merge:
        return merge(args.merge, args.knee_fraction, args.out_dir)
    if not args.target or args.rates is None or args.slo_ttft_ms is None or args.slo_tpot_ms is None:
        print(
            "error: a sweep needs --target, --rates, --slo-ttft-ms and --slo-tpot-ms (or --merge)",
            file=sys.stderr,
        )
        return 2
    try:
        base = LoadTestConfig(
            num_requests=args.num_requests, warmup_requests=args.warmup_requests,
            input_len_min=args.input_len_min, input_len_max=args.input_len_max,
            output_len_min=args.output_len_min, output_len_max=args.output_len_max,
            slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, max_duration_s=args.max_duration_s,
            seed=args.seed, progress=False,
        )  # fmt: skip
        results = sweep(args.target, args.rates, base)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report(results, args.slo_ttft_ms, args.slo_tpot_ms, args.knee_fraction, args.out_dir)
    return 0 if all(p["completed"] for points in results.values() for p in points) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve goodput", description=(__doc__ or "").split("\n")[0])
    return run_from_args(add_arguments(parser).parse_args(argv))


def report(
    results: dict[str, list[dict]],
    slo_ttft_ms: float,
    slo_tpot_ms: float,
    fraction: float,
    out_dir: str | None,
) -> None:
    """Print the side-by-side table, knees and ratios; write JSON + plot to ``out_dir``."""
    full = {
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "knee_fraction": fraction,
        "knees": {n: knee(points, fraction) for n, points in results.items()},
        "ratio_at_knee": compare(results, fraction),
        "results": results,
    }
    rates = sorted({p["rate"] for points in results.values() for p in points})
    if all([p["rate"] for p in points] == rates for points in results.values()):
        print("\n".join(table(results, rates)))
    print(json.dumps({k: full[k] for k in ("knees", "ratio_at_knee")}))
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "goodput_sweep.json").write_text(json.dumps(full, indent=1))
        plot(results, out / "goodput_sweep.png")
        print(f"wrote {out / 'goodput_sweep.json'} and goodput_sweep.png")


def merge(paths: list[str], fraction: float, out_dir: str | None) -> int:
    """Join sweeps run one after another (e.g. 1P1D, then colocated on the same GPUs); they must
    share their SLOs."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    slos = {(r["slo_ttft_ms"], r["slo_tpot_ms"]) for r in runs}
    if len(slos) != 1:
        print(f"error: the runs' SLOs differ: {sorted(slos)}", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {}
    for run_report in runs:
        results |= run_report["results"]
    ((ttft, tpot),) = slos
    report(results, ttft, tpot, fraction, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
