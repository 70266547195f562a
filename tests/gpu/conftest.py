"""GPU tests share one device: what a test's engines held goes back before the next test starts.

An engine's KV pool is sized from the device's free memory (``gpu_memory_utilization``), and memory
the caching allocator still holds for a finished test counts as used: without this, the suite's
later engines found negative KV budgets (and a cuBLAS call inside a graph capture failed for want of
memory) once earlier tests' engines had piled up.
"""

from __future__ import annotations

import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
