"""A layer as a sequence of compute stages separated by all-reduces.

A decoder layer under tensor parallelism computes, all-reduces (after ``o_proj``), computes,
all-reduces (after ``down_proj``). Written as a generator, the layer yields each partial sum it
needs reduced and receives the sum back; it returns its outputs. One definition of the layer's
order then serves two drivers: ``run_stages`` reduces at once (every forward), and two-batch
overlap (``engine.graphs.two_batch``) interleaves two micro-batches' stages so that one's
all-reduce runs while the other computes. With one rank the reduce is the identity, so the layer
runs exactly the ops it runs without stages.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

import torch

R = TypeVar("R")
# yields a partial sum [T, hidden] to all-reduce, receives the sum, returns R
Stages = Generator[torch.Tensor, torch.Tensor, R]


def run_stages(stages: Stages[R], reduce: Callable[[torch.Tensor], torch.Tensor]) -> R:
    """Run every stage, reducing each yielded tensor with ``reduce`` before resuming."""
    try:
        partial = next(stages)
        while True:
            partial = stages.send(reduce(partial))
    except StopIteration as done:
        return done.value
