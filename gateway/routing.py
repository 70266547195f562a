"""Routing policies: which instance of a pool serves a request (torch-free; plain data in and out).

A policy sees the pool's healthy candidates as ``Candidate`` snapshots and the prompt's token ids,
and returns one candidate. ``observe`` tells it where a request went (the prefix-aware policy
learns from it). Policies are registered by name; each pool (prefill, decode) gets its own.

Load, for the load-aware policies, is ``in_flight + num_waiting`` — requests this gateway has
running on the instance (fresh, counted here) plus the queue the instance last reported — with the
fraction of its KV pages in use as the tie-break.
"""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.registry import Registry


@dataclass(frozen=True)
class Candidate:
    address: str
    in_flight: int = 0
    num_waiting: int = 0
    used_page_fraction: float = 0.0

    @property
    def load(self) -> tuple[int, float]:
        return (self.in_flight + self.num_waiting, self.used_page_fraction)


class Policy:
    name = ""

    def choose(self, candidates: Sequence[Candidate], prompt_ids: Sequence[int]) -> Candidate:
        raise NotImplementedError

    def observe(self, chosen: Candidate, prompt_ids: Sequence[int]) -> None:
        pass


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Candidate], prompt_ids: Sequence[int]) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.address)  # stable order as instances come and go
        return ordered[next(self._counter) % len(ordered)]


class LeastLoad(Policy):
    name = "least_load"

    def __init__(self) -> None:
        self._tie = RoundRobin()

    def choose(self, candidates: Sequence[Candidate], prompt_ids: Sequence[int]) -> Candidate:
        best = min(c.load for c in candidates)
        return self._tie.choose([c for c in candidates if c.load == best], prompt_ids)


class PowerOfTwo(Policy):
    """Two candidates drawn at random, the less loaded wins: near least-load balance without every
    router herding onto the same instance between load reports."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[Candidate], prompt_ids: Sequence[int]) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if a.load <= b.load else b


class PrefixAware(Policy):
    """Send a prompt where its longest prefix was sent before, so that instance's radix cache hits.

    Each instance has an LRU set of block hashes (``block_size`` tokens, chained so a hash stands for
    the whole prefix up to its block) of prompts routed there: an approximation of its cache that
    costs no RPC. The best match wins unless it is more than ``balance_margin`` requests busier than
    the least loaded candidate; no match (or too busy) → least load. The remembered blocks are
    bounded per instance (``max_blocks``), oldest forgotten first, as the instance's cache evicts.
    """

    name = "prefix_aware"

    def __init__(self, block_size: int = 16, max_blocks: int = 1 << 16, balance_margin: int = 4) -> None:
        self.block_size, self.max_blocks, self.balance_margin = block_size, max_blocks, balance_margin
        self._blocks: dict[str, OrderedDict[int, None]] = {}
        self._fallback = LeastLoad()

    def _hashes(self, prompt_ids: Sequence[int]) -> list[int]:
        hashes, h = [], 0
        for start in range(0, len(prompt_ids) - self.block_size + 1, self.block_size):
            h = hash((h, tuple(prompt_ids[start : start + self.block_size])))
            hashes.append(h)
        return hashes

    def matched_blocks(self, address: str, prompt_ids: Sequence[int]) -> int:
        known: dict[int, None] | OrderedDict[int, None] = self._blocks.get(address, {})
        n = 0
        for h in self._hashes(prompt_ids):
            if h not in known:
                break
            n += 1
        return n

    def choose(self, candidates: Sequence[Candidate], prompt_ids: Sequence[int]) -> Candidate:
        matches = [(self.matched_blocks(c.address, prompt_ids), c) for c in candidates]
        best_match, best = max(matches, key=lambda m: (m[0], -m[1].load[0]))
        least = min(c.load[0] for c in candidates)
        if best_match > 0 and best.load[0] <= least + self.balance_margin:
            return best
        return self._fallback.choose(candidates, prompt_ids)

    def observe(self, chosen: Candidate, prompt_ids: Sequence[int]) -> None:
        known = self._blocks.setdefault(chosen.address, OrderedDict())
        for h in self._hashes(prompt_ids):
            known[h] = None
            known.move_to_end(h)
        while len(known) > self.max_blocks:
            known.popitem(last=False)


@dataclass(frozen=True)
class PolicyCaps:
    # Routes by where prompts were cached: only for instances that prefill (prefill instances, or
    # colocated decode); a disaggregated decode instance holds no prompt cache to aim at.
    needs_prompt_cache: bool = False


POLICIES: Registry[Policy, PolicyCaps] = Registry("routing policy")
for _policy in (RoundRobin, LeastLoad, PowerOfTwo):
    POLICIES.register(_policy.name, _policy, caps=PolicyCaps())
POLICIES.register(PrefixAware.name, PrefixAware, caps=PolicyCaps(needs_prompt_cache=True))


def make_policy(name: str, options: Mapping[str, Any] | None = None, **more: Any) -> Policy:
    """Policy ``name`` built with ``options`` and ``more`` (the constructor's keyword parameters);
    ``UnknownName`` / ``UnknownOption`` (ValueErrors naming the known ones) otherwise."""
    return POLICIES.create(name, **{**(options or {}), **more})


def policy_names(prompt_cache: bool = True) -> tuple[str, ...]:
    """The policies for a pool whose instances hold a prompt cache (``prompt_cache``) or not."""
    return tuple(n for n in POLICIES.names() if prompt_cache or not POLICIES.caps(n).needs_prompt_cache)
