"""The goodput sweep's arithmetic (bench/goodput_sweep.py): where a system starts missing its SLO
(the knee) and the goodput ratio there, on hand-made points with hand-computed answers."""

from __future__ import annotations

import argparse

import pytest

from bench.goodput_sweep import compare, knee, parse_target


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
