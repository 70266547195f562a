"""A read-only snapshot of an engine's load (torch-free).

The scheduler, allocator and radix cache belong to the engine's owner and change during a step, so
nothing else reads them. ``Engine.load()`` copies the counts a load report needs, between steps;
``AsyncEngine.load`` is the copy taken after each step and after the commands applied between
steps, which the services read from any task without touching the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLoad:
    """How loaded one engine was when the snapshot was taken."""

    num_waiting: int  # queued, not yet admitted by the scheduler
    num_running: int  # admitted: prefilling or decoding
    num_free_pages: int
    num_total_pages: int  # allocatable pages of the KV pool
    num_cached_pages: int  # held by the prefix cache (reusable, evictable when nothing else holds them)
    page_size: int
    max_num_seqs: int
    num_evictable_pages: int = 0  # of the cached pages, those no request holds (free when evicted)
    # Totals since start (rates are differences of two snapshots): prompts whose prefill finished
    # here, the part of them the prefix cache served, and tokens sampled here.
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_generated_tokens: int = 0

    @property
    def num_unfinished(self) -> int:
        return self.num_waiting + self.num_running
