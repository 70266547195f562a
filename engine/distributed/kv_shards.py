"""A request's KV pages in and out of a tensor-parallel engine, as whole heads.

Each rank's pool holds only its kv heads (``ModelConfig.tp_heads``: a split when there are at least
as many heads as ranks, else one head replicated on ``tp / num_kv_heads`` ranks). The KV transfer
between services carries whole heads — the layout of one rank — so a prefill and a decode instance
of different TP sizes can talk, and the services' transfer code (which runs in rank 0's process
only) never sees a shard.

* **Export** (prefill): every rank reads its heads of the request's pages for a range of layers,
  a gather brings them to rank 0, which joins them into whole heads, each head taken once (a
  replicated head is on several ranks; the first holder's copy is used).
* **Import** (decode): rank 0 splits the whole heads into each rank's slice (a replicated head goes
  to each of its holders) and scatters them; every rank writes its slice into its own pool at the
  same page ids.

Both are plans (``KVExportPlan``, ``KVImportPlan``) that rank 0 sends down the same pipe as the step
plans and runs itself between steps (``Engine.read_kv`` / ``write_kv``), so their collectives pair
up across ranks like a step's and are ordered with the steps: an imported page is on every rank
before any later step reads it. A move covers a range of layers sized by ``layer_ranges`` so that
no rank holds more than ``MOVE_BYTES`` of a request's KV at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.config import ModelConfig
    from engine.model_runner import ModelRunner

MOVE_BYTES = 64 << 20  # whole-head KV of one request moved per plan, at most (unless one layer is more)


def kv_head_ranges(num_kv_heads: int, tp_size: int) -> list[range]:
    """The whole-model kv heads rank r's pool holds, for every rank (the rule of
    ``ModelConfig.tp_heads``, which validates the shapes)."""
    per_rank = max(1, num_kv_heads // tp_size)
    replicas = max(1, tp_size // num_kv_heads)
    starts = [(r // replicas) * per_rank for r in range(tp_size)]
    return [range(s, s + per_rank) for s in starts]


def join_heads(parts: list[torch.Tensor], num_kv_heads: int) -> torch.Tensor:
    """Whole heads from every rank's ``[..., local_heads, head_dim]``: each head once, from the
    first rank holding it. Returns ``[..., num_kv_heads, head_dim]``."""
    ranges = kv_head_ranges(num_kv_heads, len(parts))
    owners = [r for r, rg in enumerate(ranges) if r == 0 or rg.start != ranges[r - 1].start]
    whole = torch.cat([parts[r] for r in owners], dim=-2)
    assert whole.shape[-2] == num_kv_heads, f"joined {whole.shape[-2]} heads of {num_kv_heads}"
    return whole


def split_heads(whole: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """Each rank's slice of ``[..., num_kv_heads, head_dim]`` (views; a replicated head goes to
    every rank that holds it)."""
    ranges = kv_head_ranges(whole.shape[-2], tp_size)
    return [whole[..., rg.start : rg.stop, :] for rg in ranges]


def layer_ranges(model_cfg: ModelConfig, page_size: int, num_pages: int) -> list[range]:
    """Consecutive layer ranges covering the model's layers, each moving at most ``MOVE_BYTES`` of
    whole-head KV of ``num_pages`` pages (at least one layer each)."""
    m = model_cfg
    page_layer_bytes = 2 * page_size * m.num_kv_heads * m.head_dim * m.torch_dtype.itemsize
    step = max(1, MOVE_BYTES // max(1, num_pages * page_layer_bytes))
    return [range(lo, min(lo + step, m.num_layers)) for lo in range(0, m.num_layers, step)]


@dataclass(frozen=True)
class KVExportPlan:
    """Rank 0 wants whole heads of ``pages`` for ``layers``: every rank sends its heads."""

    pages: list[int]
    layers: range

    def run(self, runner: ModelRunner) -> torch.Tensor | None:
        """Collective. Rank 0 gets ``[len(layers), 2, len(pages), page_size, num_kv_heads,
        head_dim]`` (whole heads, on its device); the others None."""
        pool = runner.kv_pool
        pages = torch.tensor(self.pages, dtype=torch.int64, device=pool.kv_gpu.device)
        kv = pool.kv_gpu[self.layers.start : self.layers.stop]
        local = kv.index_select(2, pages)  # [layers, 2, pages, page_size, local_heads, head_dim]
        parts = runner.tp.gather_to_first(local)
        return None if parts is None else join_heads(parts, runner.model_cfg.num_kv_heads)


@dataclass(frozen=True)
class KVImportPlan:
    """Rank 0 holds whole heads of ``pages`` for ``layers``: every rank writes its slice."""

    pages: list[int]
    layers: range

    def run(self, runner: ModelRunner, whole: torch.Tensor | None = None) -> None:
        """Collective. ``whole`` (rank 0 only): ``[len(layers), 2, len(pages), page_size,
        num_kv_heads, head_dim]``, any device."""
        pool = runner.kv_pool
        device = pool.kv_gpu.device
        shape = (len(self.layers), 2, len(self.pages), pool.page_size, pool.num_kv_heads, pool.head_dim)
        parts = None
        if whole is not None:
            assert whole.shape[-2] == runner.model_cfg.num_kv_heads, "import takes whole heads"
            parts = split_heads(whole.to(device, pool.kv_gpu.dtype), runner.tp.world_size)
        out = torch.empty(shape, dtype=pool.kv_gpu.dtype, device=device)
        local = runner.tp.scatter_from_first(parts, out)
        pages = torch.tensor(self.pages, dtype=torch.int64, device=device)
        pool.kv_gpu[self.layers.start : self.layers.stop].index_copy_(2, pages, local)
