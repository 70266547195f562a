"""What every graph runner does around capture: one fresh memory pool, capture time and the device
memory it took (free memory before minus after, caches emptied on both sides)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def capture_all(device: torch.device, capture: Callable[[Any], None]) -> tuple[float, int]:
    """Run ``capture(pool)`` under inference mode on ``device``; returns (seconds, bytes taken)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info(device)[0]
    start = time.perf_counter()
    with torch.inference_mode(), torch.cuda.device(device):
        capture(torch.cuda.graph_pool_handle())
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return time.perf_counter() - start, free_before - torch.cuda.mem_get_info(device)[0]
