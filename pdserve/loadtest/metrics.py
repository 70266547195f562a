"""Metrics of the serving load test (``pdserve bench``, load_test.py): per-request records, summary, report files.

Pure functions over timings a runner observed, so every number in the report is unit-tested without a
network. Definitions: TTFT = send → first chunk carrying tokens; ITL = gaps between chunks carrying
tokens (a chunk of several tokens is one gap); E2E = send → end of stream; TPOT = (E2E − TTFT) /
(output_tokens − 1), defined for outputs of two tokens or more; goodput = successful requests per
second that meet every SLO given.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# ---- per-request metrics --------------------------------------------------------------------------


@dataclass
class StreamTrace:
    """What a runner observes while one request streams (perf_counter seconds); the driver owns it."""

    start_s: float
    token_times_s: list[float] = field(default_factory=list)  # arrival of each chunk carrying tokens
    end_s: float = 0.0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class RequestRecord:
    """One measured request, as written to the JSON report (times in seconds)."""

    index: int
    success: bool
    error: str
    prompt_tokens: int
    output_tokens: int
    send_time_s: float  # offset from the start of the measured run
    ttft_s: float | None
    e2e_s: float
    itl_s: list[float]

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def make_record(index: int, trace: StreamTrace, run_start_s: float, error: str = "") -> RequestRecord:
    times = trace.token_times_s
    return RequestRecord(
        index=index,
        success=not error,
        error=error,
        prompt_tokens=trace.num_prompt_tokens,
        output_tokens=trace.num_output_tokens,
        send_time_s=trace.start_s - run_start_s,
        ttft_s=times[0] - trace.start_s if times else None,
        e2e_s=trace.end_s - trace.start_s,
        itl_s=[b - a for a, b in itertools.pairwise(times)],
    )


# ---- summary --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default method)."""
    assert values and 0 <= q <= 100, "percentile needs values and 0 <= q <= 100"
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencyStats:
    mean_ms: float
    median_ms: float
    p90_ms: float
    p99_ms: float

    @staticmethod
    def of(values_s: Sequence[float]) -> LatencyStats | None:
        if not values_s:
            return None
        ms = [v * 1000 for v in values_s]
        return LatencyStats(sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99))


@dataclass(frozen=True)
class Summary:
    """The report's numbers; throughputs count successful requests only, over the whole duration."""

    num_completed: int
    num_failed: int
    num_not_sent: int  # arrivals after --max-duration-s
    duration_s: float
    request_throughput: float
    input_token_throughput: float
    output_token_throughput: float
    ttft: LatencyStats | None
    tpot: LatencyStats | None
    itl: LatencyStats | None
    e2e: LatencyStats | None
    goodput: float | None  # req/s meeting the SLOs; None when no SLO was given
    errors: dict[str, int]  # error text -> count
    # Process CPU µs per output token over the measured run: "gateway", "decode@host:port", ...
    server_cpu_us_per_token: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Summary:
        stats = {k: LatencyStats(**d[k]) if d[k] else None for k in ("ttft", "tpot", "itl", "e2e")}
        return Summary(**{**d, **stats})


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """A success within both SLOs; a missing SLO always holds, and a 1-token output has no TPOT to miss."""
    if not record.success:
        return False
    if slo_ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > slo_ttft_ms):
        return False
    tpot = record.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * 1000 <= slo_tpot_ms


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    num_not_sent: int = 0,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> Summary:
    ok = [r for r in records if r.success]
    per_s = 1 / duration_s if duration_s > 0 else 0.0
    goodput = None
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        goodput = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in ok) * per_s
    return Summary(
        num_completed=len(ok),
        num_failed=len(records) - len(ok),
        num_not_sent=num_not_sent,
        duration_s=duration_s,
        request_throughput=len(ok) * per_s,
        input_token_throughput=sum(r.prompt_tokens for r in ok) * per_s,
        output_token_throughput=sum(r.output_tokens for r in ok) * per_s,
        ttft=LatencyStats.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=LatencyStats.of([t for r in ok if (t := r.tpot_s) is not None]),
        itl=LatencyStats.of([g for r in ok for g in r.itl_s]),
        e2e=LatencyStats.of([r.e2e_s for r in ok]),
        goodput=goodput,
        errors=dict(Counter(r.error[:200] for r in records if not r.success).most_common()),
    )


def format_summary(s: Summary) -> str:
    def row(name: str, value: object) -> str:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        return f"{name:<40}{shown:>14}"

    lines = ["=" * 18 + " Load test result " + "=" * 17]
    lines += [row("Successful requests:", s.num_completed), row("Failed requests:", s.num_failed)]
    if s.num_not_sent:
        lines.append(row("Not sent (past --max-duration-s):", s.num_not_sent))
    lines += [
        row("Duration (s):", s.duration_s),
        row("Request throughput (req/s):", s.request_throughput),
        row("Input token throughput (tok/s):", s.input_token_throughput),
        row("Output token throughput (tok/s):", s.output_token_throughput),
    ]
    if s.goodput is not None:
        lines.append(row("Goodput (req/s):", s.goodput))
    for name, stats in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E", s.e2e)):
        lines.append(f"{'-' * 22} {name} (ms) {'-' * (25 - len(name))}")
        if stats is None:
            lines.append(row("(no samples)", ""))
            continue
        for key in ("mean_ms", "median_ms", "p90_ms", "p99_ms"):
            lines.append(row(f"{key.removesuffix('_ms').capitalize()}:", getattr(stats, key)))
    if s.server_cpu_us_per_token:
        lines.append(f"{'-' * 10} Server CPU (µs per output token) {'-' * 11}")
        lines += [row(f"{name}:", us) for name, us in s.server_cpu_us_per_token.items()]
    for error, count in list(s.errors.items())[:5]:
        lines.append(f"error x{count}: {error}")
    lines.append("=" * 54)
    return "\n".join(lines)


# ---- report files ---------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def write_report(
    out_dir: Path, config: dict[str, Any], summary: Summary, records: Sequence[RequestRecord]
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {k: _json_safe(v) for k, v in config.items()},
        "summary": asdict(summary),
        "requests": [{**asdict(r), "tpot_s": r.tpot_s} for r in records],
    }
    path = out_dir / "load_test.json"
    path.write_text(json.dumps(report, indent=1))
    return path


def read_report(path: Path) -> tuple[dict[str, Any], Summary, list[RequestRecord]]:
    report = json.loads(path.read_text())
    names = {f.name for f in fields(RequestRecord)}
    records = [RequestRecord(**{k: v for k, v in r.items() if k in names}) for r in report["requests"]]
    return report["config"], Summary.from_dict(report["summary"]), records


def write_plots(out_dir: Path, records: Sequence[RequestRecord]) -> Path | None:
    """TTFT and E2E histograms and the ITL CDF; skipped with a warning when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; skipping load_test.png", file=sys.stderr)
        return None
    ok = [r for r in records if r.success]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    itl = sorted(g * 1000 for r in ok for g in r.itl_s)
    fig, (ax_ttft, ax_e2e, ax_itl) = plt.subplots(1, 3, figsize=(15, 4))
    ax_ttft.hist(ttft, bins=50)
    ax_ttft.set(title="TTFT", xlabel="ms", ylabel="requests")
    ax_e2e.hist([r.e2e_s * 1000 for r in ok], bins=50)
    ax_e2e.set(title="E2E latency", xlabel="ms", ylabel="requests")
    ax_itl.plot(itl, [(i + 1) / len(itl) for i in range(len(itl))])
    ax_itl.set(title="ITL CDF", xlabel="ms", ylabel="fraction of gaps")
    fig.tight_layout()
    path = out_dir / "load_test.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
