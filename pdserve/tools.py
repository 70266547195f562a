"""The load tools, run against a gateway that is already up: ``bench`` (a load test: latency,
throughput, goodput; REST or gRPC), ``soak`` (saturation for a while, then errors and leaks checked)
and ``goodput`` (a goodput-under-SLO sweep over request rates, one or more systems side by side).
The tools' modules live in ``pdserve.loadtest`` and import nothing of the engine's hot path."""

from __future__ import annotations

import argparse

from engine.env import Env


def add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """bench, soak, goodput."""
    from pdserve.loadtest import goodput, load_test, soak

    bench = sub.add_parser("bench", help="load-test a running gateway (REST or gRPC)")
    load_test.add_arguments(bench)
    bench.set_defaults(func=_bench)

    soaker = sub.add_parser("soak", help="saturate a running gateway for a while; check for errors and leaks")
    soak.add_arguments(soaker)
    soaker.set_defaults(func=_soak)

    sweep = sub.add_parser("goodput", help="goodput under a TTFT + TPOT SLO, swept over request rates")
    goodput.add_arguments(sweep)
    sweep.set_defaults(func=_goodput)


def _bench(args: argparse.Namespace, env: Env) -> int:
    from pdserve.loadtest.load_test import run_from_args

    return run_from_args(args)


def _soak(args: argparse.Namespace, env: Env) -> int:
    from pdserve.loadtest.soak import run_from_args

    return run_from_args(args)


def _goodput(args: argparse.Namespace, env: Env) -> int:
    from pdserve.loadtest.goodput import run_from_args

    return run_from_args(args)
