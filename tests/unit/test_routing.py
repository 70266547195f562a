"""Routing policies (gateway/routing.py): chosen by name, options checked, each policy's choice."""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from gateway.routing import Candidate, make_policy, policy_names

A, B, C = (Candidate(f"10.0.0.{i}:8100") for i in (1, 2, 3))


def test_policies_by_name_with_their_options():
    assert policy_names() == ("least_load", "power_of_two", "prefix_aware", "round_robin")
    assert make_policy("prefix_aware", {"block_size": 4}).block_size == 4
    assert make_policy("prefix_aware", block_size=8, balance_margin=0).balance_margin == 0


def test_unknown_policies_and_options_are_refused():
    with pytest.raises(ValueError, match=r"'least_load': unknown option 'bogus' \(allowed: none\)"):
        make_policy("least_load", {"bogus": 1})
    with pytest.raises(ValueError, match=r"'power_of_two': unknown option 'block_size' \(allowed: seed\)"):
        make_policy("power_of_two", block_size=4)
    with pytest.raises(ValueError, match=r"unknown routing policy 'random' \(known: least_load, "):
        make_policy("random")


def test_round_robin_cycles_and_least_load_picks_the_idlest():
    rr = make_policy("round_robin")
    assert [rr.choose([C, A, B], []).address for _ in range(4)] == [a.address for a in (A, B, C, A)]
    busy = Candidate(A.address, in_flight=3)
    assert make_policy("least_load").choose([busy, B], []) is B


def test_prefix_aware_returns_a_prompt_to_where_its_prefix_went():
    policy = make_policy("prefix_aware", block_size=2)
    prompt = [1, 2, 3, 4, 5]
    policy.observe(B, prompt)
    assert policy.choose([A, B, C], [*prompt, 9]) is B


def test_decode_pools_of_a_disaggregated_gateway_take_no_prompt_cache_policy():
    assert policy_names(prompt_cache=False) == ("least_load", "power_of_two", "round_robin")
    with pytest.raises(ValueError, match="decode_policy: prefix_aware needs colocated decode"):
        GatewayConfig(model="m", prefill=("a:1",), decode=("b:2",), decode_policy="prefix_aware")
    with pytest.raises(ValueError, match=r"prefill_policy: unknown routing policy 'nearest'"):
        GatewayConfig(model="m", prefill=("a:1",), decode=("b:2",), prefill_policy="nearest")
    assert GatewayConfig(model="m", prefill=(), decode=("b:2",), decode_policy="prefix_aware")
