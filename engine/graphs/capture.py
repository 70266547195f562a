"""What every graph runner does around capture: one fresh memory pool, one capture stream on the
runner's device, capture time and the device memory it took (free memory before minus after,
caches emptied on both sides).

The stream is ours, not ``torch.cuda.graph``'s default: that one is made once per process, on
whichever device was current at the first capture, so a second engine on another GPU would capture
on the first one's device."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def capture_all(device: torch.device, capture: Callable[[Any, torch.cuda.Stream], None]) -> tuple[float, int]:
    """Run ``capture(pool, stream)`` under inference mode on ``device``; every graph is captured on
    ``stream`` (``torch.cuda.graph(..., stream=stream)``). Returns (seconds, bytes taken)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info(device)[0]
    start = time.perf_counter()
    stream = torch.cuda.Stream(device)
    with torch.inference_mode(), torch.cuda.device(device):
        capture(torch.cuda.graph_pool_handle(), stream)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return time.perf_counter() - start, free_before - torch.cuda.mem_get_info(device)[0]
