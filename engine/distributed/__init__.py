"""Multi-rank plumbing: process groups and the collectives the model layers use.

``groups.py``: ``TPGroup`` (one rank's view of its tensor-parallel group, passed to the model
constructor; ``None`` there means a single rank) and ``init_tp`` (gloo on the CPU, NCCL on CUDA).
``workers.py``: rank 0 driving ranks 1..N-1 with per-step plans. ``kv_shards.py``: a request's KV
pages out of / into every rank's pool as whole heads (the services' KV transfer).
``symmetric.py``: all-reduce through symmetric memory. ``context_parallel.py`` + ``zigzag.py``: context-parallel
prefill (the zigzag split, the K/V all-gather). ``plans.py``: the per-step plans rank 0 sends.
"""

from __future__ import annotations

from engine.distributed.groups import TPGroup, destroy_tp, init_tp

__all__ = ["TPGroup", "destroy_tp", "init_tp"]
