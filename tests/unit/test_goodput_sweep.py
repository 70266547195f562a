"""The goodput sweep's arithmetic (bench/goodput_sweep.py): where a system starts missing its SLO
(the knee) and the goodput ratio there, on hand-made points with hand-computed answers."""

from __future__ import annotations

import argparse
import json

import pytest

from pdserve.loadtest.goodput import compare, knee, main, parse_target


def points(*pairs: tuple[float, float]) -> list[dict]:
    return [{"rate": r, "goodput": g} for r, g in pairs]


def test_knee_is_the_first_rate_below_the_fraction():
    assert knee(points((1, 1.0), (2, 1.95), (4, 3.0), (8, 2.0)), 0.9) == 4
    assert knee(points((8, 2.0), (1, 1.0), (4, 3.0)), 0.9) == 4, "unsorted input"
    assert knee(points((1, 1.0), (2, 2.0)), 0.9) is None


def test_ratio_at_the_other_targets_knee():
    results = {
        "1p1d": points((1, 1.0), (2, 2.0), (4, 3.9), (8, 6.0)),  # knee at 8
        "colocated": points((1, 1.0), (2, 1.9), (4, 2.0), (8, 1.0)),  # knee at 4
    }
    ratios = compare(results, 0.9)
    assert ratios["1p1d/colocated"] == pytest.approx(3.9 / 2.0)
    assert ratios["colocated/1p1d"] == pytest.approx(1.0 / 6.0)
    assert compare({"a": points((1, 1.0)), "b": points((1, 1.0))}, 0.9) == {"a/b": None, "b/a": None}


def test_target_syntax():
    assert parse_target("colocated=http://127.0.0.1:9000") == ("colocated", "http://127.0.0.1:9000")
    for bad in ("http://x:1", "=http://x:1", "a=x:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_target(bad)


def run_file(tmp_path, name: str, pairs, ttft: float = 500.0) -> str:
    path = tmp_path / f"{name}.json"
    pts = [p | {"completed": 10, "failed": 0, "ttft_p99_ms": 1.0, "tpot_p99_ms": 1.0} for p in points(*pairs)]
    path.write_text(json.dumps({"slo_ttft_ms": ttft, "slo_tpot_ms": 40.0, "results": {name: pts}}))
    return str(path)


def test_merge_joins_runs_made_one_after_another(tmp_path):
    a = run_file(tmp_path, "1p1d", [(1, 1.0), (2, 2.0), (4, 3.9)])
    b = run_file(tmp_path, "colocated", [(1, 1.0), (2, 1.0), (4, 1.0)])
    assert main(["--merge", a, b, "--out-dir", str(tmp_path / "both")]) == 0
    joined = json.loads((tmp_path / "both" / "goodput_sweep.json").read_text())
    assert set(joined["results"]) == {"1p1d", "colocated"}
    assert joined["knees"] == {"1p1d": None, "colocated": 2}
    assert joined["ratio_at_knee"]["1p1d/colocated"] == pytest.approx(2.0)
    assert (tmp_path / "both" / "goodput_sweep.png").stat().st_size > 0
    other_slo = run_file(tmp_path, "x", [(1, 1.0)], ttft=100.0)
    assert main(["--merge", a, other_slo]) == 2


def test_a_sweep_needs_its_parameters(capsys):
    assert main(["--rates", "1,2"]) == 2
    assert "needs --target" in capsys.readouterr().err
