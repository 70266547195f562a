"""Graphs of an engine on cuda:1 are captured on a stream of cuda:1.

``torch.cuda.graph`` without ``stream=`` captures on one stream per process, made on whichever
device was current at the process's first capture: a second engine on another GPU (two ``LLM``s,
or ``pytest tests/gpu`` on a 2-GPU box) would capture on the first engine's device. CUDA faked:
the runners run their CPU stand-ins and we record the stream each capture is given."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_decode_graph_staging import with_stand_in_graphs

from engine import LLM
from engine.graphs import PiecewiseGraphRunner

DEVICE = torch.device("cuda", 1)


class FakeStream:
    def __init__(self, device=None):
        self.device = torch.device("cuda", 0) if device is None else torch.device(device)


@pytest.fixture
def captures(monkeypatch):
    """The stream every ``torch.cuda.graph`` capture ran on (its default when none is given)."""
    streams: list[torch.device] = []

    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        streams.append((stream if stream is not None else FakeStream()).device)
        return contextlib.nullcontext()

    for name, fake in {
        "graph": graph, "Stream": FakeStream, "CUDAGraph": lambda: None, "graph_pool_handle": lambda: None,
        "device": lambda d: contextlib.nullcontext(), "synchronize": lambda d=None: None,
        "empty_cache": lambda: None, "mem_get_info": lambda d=None: (0, 0),
    }.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, fake)
    return streams


def test_decode_and_piecewise_graphs_capture_on_the_engines_device(tiny_model, captures):
    llm = LLM(str(tiny_model), page_size=4, max_num_seqs=4, max_model_len=128, max_num_batched_tokens=64)
    runner = with_stand_in_graphs(llm.engine).runner
    runner.graphs.device = DEVICE
    runner.graphs.capture()
    assert len(captures) == len(runner.graphs.batch_sizes)
    pw = PiecewiseGraphRunner(
        runner.model, runner.kv_pool, runner.attn_backend, max_tokens=32, device=torch.device("cpu")
    )
    pw.device = DEVICE
    pw.capture()
    assert len(captures) == len(runner.graphs.batch_sizes) + len(pw.buckets) * pw.num_pieces
    assert set(captures) == {DEVICE}
