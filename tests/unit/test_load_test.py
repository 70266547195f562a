"""Load test tool: the numbers it reports, the workloads it sends, its report files (no network).

Oracles: numpy's percentile/mean for the statistics, hand-computed timings for TTFT/ITL/TPOT, and the
exponential distribution's known mean and spread for the Poisson arrivals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pdserve.loadtest.load_test import (
    LoadTestConfig,
    build_parser,
    build_workload,
    main,
)
from pdserve.loadtest.metrics import (
    RequestRecord,
    StreamTrace,
    format_summary,
    make_record,
    meets_slo,
    percentile,
    read_report,
    summarize,
    write_plots,
    write_report,
)
from pdserve.loadtest.senders import RequestError, on_rest_chunk
from pdserve.loadtest.workload import RequestSpec, arrival_times, load_jsonl, random_workload


def record(
    index: int = 0,
    ttft: float | None = 0.1,
    e2e: float = 1.0,
    output_tokens: int = 10,
    itl: list[float] | None = None,
    prompt_tokens: int = 5,
    error: str = "",
) -> RequestRecord:
    return RequestRecord(
        index=index,
        success=not error,
        error=error,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        send_time_s=0.0,
        ttft_s=ttft,
        e2e_s=e2e,
        itl_s=itl or [],
    )


# ---- metrics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
@pytest.mark.parametrize(
    "values", [[3.0], [5.0, 1.0], [1.0, 2.0, 3.0, 4.0], list(np.random.default_rng(0).exponential(size=101))]
)
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_hand_computed() -> None:
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile([10, 0], 50) == pytest.approx(5.0)


def test_record_from_synthetic_stream_timings() -> None:
    trace = StreamTrace(start_s=10.0, token_times_s=[10.1, 10.15, 10.25], end_s=10.3)
    trace.num_prompt_tokens, trace.num_output_tokens = 7, 4  # last chunk carried two tokens
    r = make_record(3, trace, run_start_s=9.5)
    assert r.success and r.error == ""
    assert r.send_time_s == pytest.approx(0.5)
    assert r.ttft_s == pytest.approx(0.1)
    assert r.itl_s == pytest.approx([0.05, 0.1])
    assert r.e2e_s == pytest.approx(0.3)
    assert r.tpot_s == pytest.approx((0.3 - 0.1) / (4 - 1))


def test_tpot_undefined_for_single_token_and_no_token() -> None:
    assert record(output_tokens=1).tpot_s is None
    failed = make_record(0, StreamTrace(start_s=1.0, end_s=1.5), 0.0, error="HTTP 400: bad max_tokens")
    assert not failed.success and failed.ttft_s is None and failed.tpot_s is None and failed.itl_s == []


def test_summary_against_numpy() -> None:
    rng = np.random.default_rng(1)
    ok = [
        record(
            i,
            ttft=float(t),
            e2e=float(t) + 1 + i / 10,
            output_tokens=5 + i,
            itl=list(rng.uniform(0.01, 0.05, 4)),
            prompt_tokens=10 + i,
        )
        for i, t in enumerate(rng.uniform(0.05, 0.5, 20))
    ]
    failed = [
        record(20, error="HTTP 503: no decode instance"),
        record(21, error="HTTP 503: no decode instance"),
    ]
    s = summarize(ok + failed, duration_s=4.0, num_not_sent=3)

    assert (s.num_completed, s.num_failed, s.num_not_sent) == (20, 2, 3)
    assert s.errors == {"HTTP 503: no decode instance": 2}
    assert s.request_throughput == pytest.approx(20 / 4.0)
    assert s.input_token_throughput == pytest.approx(sum(10 + i for i in range(20)) / 4.0)
    assert s.output_token_throughput == pytest.approx(sum(5 + i for i in range(20)) / 4.0)
    assert s.goodput is None
    oracles = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok],
        "itl": [g for r in ok for g in r.itl_s],
        "e2e": [r.e2e_s for r in ok],
    }
    for name, values_s in oracles.items():
        ms = np.array(values_s) * 1000
        stats = getattr(s, name)
        assert stats.mean_ms == pytest.approx(ms.mean()), name
        assert stats.median_ms == pytest.approx(np.median(ms)), name
        assert stats.p90_ms == pytest.approx(np.percentile(ms, 90)), name
        assert stats.p99_ms == pytest.approx(np.percentile(ms, 99)), name


def test_summary_with_every_request_failed() -> None:
    s = summarize([record(error="timed out")], duration_s=2.0, slo_ttft_ms=100)
    assert s.num_completed == 0 and s.request_throughput == 0 and s.goodput == 0
    assert s.ttft is None and s.e2e is None
    assert "(no samples)" in format_summary(s)


def test_goodput_counts_requests_within_slos() -> None:
    # ttft ms, tpot ms: (e2e - ttft) / 9 with 10 output tokens
    records = [
        record(0, ttft=0.050, e2e=0.050 + 9 * 0.010),  # 50, 10
        record(1, ttft=0.150, e2e=0.150 + 9 * 0.010),  # 150, 10
        record(2, ttft=0.050, e2e=0.050 + 9 * 0.030),  # 50, 30
        record(3, ttft=0.200, e2e=0.200 + 9 * 0.030),  # 200, 30
        record(4, ttft=0.050, e2e=0.5, output_tokens=1),  # no TPOT: cannot miss it
        record(5, ttft=0.010, e2e=0.1, error="HTTP 500: boom"),  # failed: never good
    ]
    assert summarize(records, 2.0, slo_ttft_ms=100).goodput == pytest.approx(3 / 2.0)
    assert summarize(records, 2.0, slo_tpot_ms=20).goodput == pytest.approx(3 / 2.0)
    both = summarize(records, 2.0, slo_ttft_ms=100, slo_tpot_ms=20)
    assert both.goodput == pytest.approx(2 / 2.0)
    assert "Goodput (req/s):" in format_summary(both)
    assert "Goodput" not in format_summary(summarize(records, 2.0))
    assert meets_slo(record(ttft=0.1), slo_ttft_ms=100, slo_tpot_ms=None)  # the bound itself is met
    assert not meets_slo(record(ttft=None), slo_ttft_ms=100, slo_tpot_ms=None)


def test_rest_chunks_count_tokens_and_take_usage() -> None:
    trace = StreamTrace(start_s=0.0)
    on_rest_chunk({"choices": [{"text": ""}]}, 0.1, trace)  # e.g. partial UTF-8 held back
    on_rest_chunk({"choices": [{"text": "Hel"}], "usage": None}, 0.2, trace)
    on_rest_chunk({"choices": [{"text": "lo"}]}, 0.3, trace)
    assert trace.token_times_s == [0.2, 0.3] and trace.num_output_tokens == 2
    on_rest_chunk({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}, 0.4, trace)
    assert (trace.num_prompt_tokens, trace.num_output_tokens) == (9, 3)
    with pytest.raises(RequestError, match="stream error: engine died"):
        on_rest_chunk({"error": {"message": "engine died", "type": "internal_error"}}, 0.5, trace)


# ---- workload -------------------------------------------------------------------------------------


def test_poisson_arrivals_have_the_requested_rate() -> None:
    rate = 5.0
    times = arrival_times(20_000, rate, seed=7)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)  # exponential: std == mean
    assert arrival_times(100, rate, seed=7) == times[:100]
    assert arrival_times(100, rate, seed=8) != times[:100]


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_times(5, math.inf, seed=0) == [0.0] * 5


def test_random_workload_within_bounds_and_reproducible() -> None:
    specs = random_workload(500, input_len=(3, 9), output_len=(1, 4), vocab=(100, 110), seed=3)
    input_lens = {len(s.prompt) for s in specs}
    output_lens = {s.max_tokens for s in specs}
    assert input_lens == set(range(3, 10)) and output_lens == set(range(1, 5))  # inclusive, both ends hit
    assert all(100 <= t < 110 for s in specs for t in s.prompt)
    assert random_workload(500, (3, 9), (1, 4), (100, 110), seed=3) == specs
    assert random_workload(500, (3, 9), (1, 4), (100, 110), seed=4) != specs


def test_jsonl_dataset(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hello there", "max_tokens": 4}\n\n{"prompt": [1, 2, 3], "max_tokens": 2}\n')
    assert load_jsonl(path) == [RequestSpec("hello there", 4), RequestSpec([1, 2, 3], 2)]

    cfg = LoadTestConfig(dataset="file", dataset_path=str(path), num_requests=3, warmup_requests=2)
    assert [s.max_tokens for s in build_workload(cfg)] == [4, 2, 4, 2, 4]  # cycled, warm-up first


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "Expecting property name"),
        ('{"prompt": "hi"}', "missing key 'max_tokens'"),
        ('{"prompt": "hi", "max_tokens": 0}', "'max_tokens' must be a positive integer"),
        ('{"prompt": [1, -2], "max_tokens": 3}', "'prompt' must be"),
        ('{"prompt": "", "max_tokens": 3}', "'prompt' must be"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "ok", "max_tokens": 1}\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: bad request line: {reason}"):
        load_jsonl(path)


# ---- config, command line, report files -----------------------------------------------------------


def test_every_config_field_is_a_flag_with_its_default() -> None:
    args = build_parser().parse_args([])
    assert LoadTestConfig(**vars(args)) == LoadTestConfig()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--input-len-min", "9", "--input-len-max", "3"], "--input-len-max"),
        (["--vocab-low", "5", "--vocab-high", "5"], "--vocab-high"),
        (["--request-rate", "0"], "--request-rate"),
        (["--dataset", "file"], "--dataset-path"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--no-progress"]) == 2
    assert flag in capsys.readouterr().err


def test_report_round_trip(tmp_path: Path) -> None:
    records = [record(0, itl=[0.01, 0.02]), record(1, error="HTTP 400: prompt too long", ttft=None)]
    summary = summarize(records, 1.5, slo_ttft_ms=200)
    config = {"backend": "rest", "request_rate": math.inf, "model": "tiny"}
    path = write_report(tmp_path / "out", config, summary, records)

    assert path == tmp_path / "out" / "load_test.json"
    raw = json.loads(path.read_text())  # strict JSON: inf is written as a string
    assert raw["config"]["request_rate"] == "inf"
    assert raw["requests"][0]["tpot_s"] == pytest.approx(0.9 / 9)
    config_back, summary_back, records_back = read_report(path)
    assert summary_back == summary and records_back == records
    assert config_back == {**config, "request_rate": "inf"}


def test_plots_written_as_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = write_plots(tmp_path, [record(i, ttft=0.01 * i, itl=[0.01, 0.02]) for i in range(1, 5)])
    assert path is not None and path.read_bytes().startswith(b"\x89PNG")
