"""Decode CUDA graphs: one graph per padded batch size, replayed with the live batch copied in.

Eager decode is launch-bound (docs/BENCHMARKS.md: ~1.7k kernel launches and ~33 ms of host work
around ~4 ms of kernels), so the whole decode forward, embedding to logits, is captured once per
size in ``graph_batch_sizes`` and replayed. What makes a replay valid for any batch:

- Static inputs. A graph keeps the addresses it read at capture, so every step's inputs go into the
  same device buffers: ``input_ids``, ``input_rows``, ``positions``, ``out_cache_loc``, ``seq_lens``
  ``[max_bs]`` and ``page_table`` ``[max_bs, ceil(max_model_len / page_size)]``. A row whose input
  token is still on the device (overlap scheduling, ``engine.sequence``) has ``input_rows`` >= 0:
  the graph's first op reads that token from the runner's ``last_tokens`` (the latest step's samples). ``prepare`` fills one persistent
  pinned host buffer per field with numpy (no per-element torch ops) and copies the padded batch's
  rows with ``non_blocking`` copies: nothing waits for the GPU. The page table goes over as the
  batch's ``[padded, its most pages]`` block only, then one device copy puts it into the static
  table (whose later columns keep stale page ids nothing reads).
- Padding. A batch of n sequences runs in the smallest captured size bs >= n. Rows n..bs-1 decode
  token 0 at position 0 as a length-1 sequence whose only page is the dummy page 0 (never
  allocated, see ``PageAllocator``): they write their K/V into slot 0 and read nothing else,
  whatever stale values a larger batch left in the buffers. Their logits are never returned.
- Fixed attention metadata. The backend's ``prepare_graph`` derives it from the captured size and
  ``max_model_len`` only (for ``triton``, the KV split count); nothing is read from the host.
- One memory pool. Graphs are captured largest first into one pool, so the smaller ones reuse the
  largest one's activation memory (replays never overlap). Each graph's LM head output is
  converted into one shared static float32 ``[max_bs, vocab]`` buffer as it is copied there (one
  pass; no float32 temporary); holding every graph's own output instead would
  keep ``sum(sizes) * vocab`` floats alive (~1.4 GB for 152k vocab at 256).

Sampling stays eager after the replay and reads the logits returned by ``replay``: a view of that
shared buffer, valid until the next replay.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Sequence as Seq
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from engine.attention.base import AttentionBackend, ForwardBatch, ForwardMode
from engine.graphs.capture import capture_all
from engine.graphs.two_batch import run_overlapped, split_batch, tbo_split
from engine.kvcache.page_pool import KVPagePool
from engine.packing import page_entries, slot_of
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

log = logging.getLogger(__name__)


def graph_batch_sizes(limit: int) -> list[int]:
    """Captured sizes: 1, 2, 4, 8, steps of 8 up to 64, steps of 16 beyond, and ``limit`` itself.

    Padding costs little in memory-bound decode (a padded row reads one KV token, no weights of its
    own), so steps of 16 at large sizes trade a few wasted rows for fewer graphs to capture."""
    assert limit >= 1, f"graph batch limit must be >= 1, got {limit}"
    candidates = [1, 2, 4, *range(8, 65, 8), *range(80, limit, 16)]
    return [s for s in candidates if s < limit] + [limit]


def stage_decode(
    seqs: Seq[Sequence],
    page_size: int,
    padded: int,
    input_ids: np.ndarray,  # [max_bs] int64
    input_rows: np.ndarray,  # [max_bs] int64: row of last_tokens holding the input token, or -1
    positions: np.ndarray,  # [max_bs] int64
    out_cache_loc: np.ndarray,  # [max_bs] int64
    seq_lens: np.ndarray,  # [max_bs] int64
    page_rows: np.ndarray,  # [>= padded * width] int64, flat
) -> int:
    """Write a decode batch's inputs into rows ``[0, len(seqs))`` and padding into rows up to
    ``padded``; its page table goes to the front of ``page_rows`` as ``[padded, width]``, ``width``
    the batch's most pages (returned), so only those columns cross to the device. Entries past a
    row's last page hold stale ids: nothing reads them."""
    n = len(seqs)
    pos = np.fromiter((s.num_computed for s in seqs), np.int64, n)  # [n] position of the new token
    rows, cols, pages, num_pages = page_entries(seqs)
    width = max(1, int(num_pages.max(initial=0)))
    assert padded * width <= page_rows.size, "more pages than max_model_len allows"
    page_table = page_rows[: padded * width].reshape(padded, width)
    page_table[rows, cols] = pages
    rows_in = np.fromiter((s.next_input_row for s in seqs), np.int64, n)  # [n]
    input_rows[:n] = rows_in
    input_ids[:n] = [s.token_ids[s.num_computed] if r < 0 else 0 for s, r in zip(seqs, rows_in, strict=True)]
    positions[:n] = pos
    seq_lens[:n] = pos + 1
    out_cache_loc[:n] = slot_of(page_table, np.arange(n), pos, page_size)
    input_ids[n:padded] = 0
    input_rows[n:padded] = -1
    positions[n:padded] = 0
    out_cache_loc[n:padded] = 0
    seq_lens[n:padded] = 1
    page_table[n:padded, 0] = 0
    return width


def resolve_input_ids(
    input_ids: torch.Tensor, input_rows: torch.Tensor, last_tokens: torch.Tensor
) -> torch.Tensor:
    """Input tokens with the in-flight ones filled in on the device: row i takes
    ``last_tokens[input_rows[i]]`` where ``input_rows[i] >= 0``. All [n] int64; no host sync."""
    from_device = last_tokens[input_rows.clamp(min=0)]  # [n]
    return torch.where(input_rows >= 0, from_device, input_ids)


class DecodeGraphRunner:
    """CUDA graphs for DECODE batches of up to ``max_batch_size`` sequences (module docstring).

    ``capture()`` once, after the KV pool exists. Then per step: ``prepare(batch)`` stages the batch
    into the static buffers and returns its ``ForwardBatch``; ``replay(fb)`` runs the graph of the
    padded size and returns ``[n, vocab]`` float32 logits. ``replay`` takes only the batch of the
    latest ``prepare``: the static buffers hold one batch at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        kv_pool: KVPagePool,
        attn_backend: AttentionBackend,
        last_tokens: torch.Tensor,
        *,
        max_batch_size: int,
        max_model_len: int,
        vocab_size: int,
        device: torch.device,
        tbo_min_batch: int = 0,
    ) -> None:
        """``tbo_min_batch``: sizes from this one up run as two overlapped micro-batches
        (``engine.graphs.two_batch``; 0: none)."""
        self.model, self.kv_pool, self.attn_backend = model, kv_pool, attn_backend
        self.tbo_min_batch = tbo_min_batch
        self._side_stream = torch.cuda.Stream(device) if tbo_min_batch and device.type == "cuda" else None
        self.last_tokens = last_tokens  # [>= max_bs] int64, the latest step's sampled tokens
        self.device, self.max_model_len, self.page_size = device, max_model_len, kv_pool.page_size
        self.batch_sizes = graph_batch_sizes(max_batch_size)
        max_bs, max_pages = self.batch_sizes[-1], -(-max_model_len // self.page_size)
        pin = device.type == "cuda"  # CPU runs only in unit tests, with stand-in graphs

        def host(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.int64, pin_memory=pin)

        # One pinned host buffer per input field (stage_decode's order) and its static device twin.
        # Every row starts as padding: token 0 at position 0 into slot 0, length 1 on page 0.
        staging_cpu = [
            host(max_bs),
            host(max_bs).fill_(-1),
            host(max_bs),
            host(max_bs),
            host(max_bs).fill_(1),
            host(max_bs * max_pages),  # the page table, [padded, width] at the front (stage_decode)
        ]
        self._staging = [t.numpy() for t in staging_cpu]  # numpy views of the pinned memory
        static = [torch.empty_like(t, device=device).copy_(t) for t in staging_cpu]
        self._copies = list(zip(static[:5], staging_cpu[:5], strict=True))
        self._page_rows = (static[5], staging_cpu[5])  # the flat page-table staging: device, host
        self.input_ids_gpu, self.input_rows_gpu, self.positions_gpu = static[:3]  # [max_bs] each
        self.out_cache_loc_gpu, self.seq_lens_gpu = static[3:5]  # [max_bs] each
        self.page_table_gpu = torch.zeros(max_bs, max_pages, dtype=torch.int64, device=device)
        self.logits_indices_gpu = torch.arange(max_bs, device=device)  # [max_bs]
        self.logits_gpu = torch.zeros(max_bs, vocab_size, dtype=torch.float32, device=device)
        self.static_bytes = sum(
            t.nbytes for t in [*static, self.page_table_gpu, self.logits_indices_gpu, self.logits_gpu]
        )
        self._copied = torch.cuda.Event() if pin else None  # the staging buffers are free again
        self._graphs: dict[int, Any] = {}  # batch size -> torch.cuda.CUDAGraph
        self._staged: ForwardBatch | None = None
        self.capture_seconds, self.graph_memory_bytes = 0.0, 0

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def padded_size(self, num_seqs: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_seqs)]

    # -- the step ------------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> ForwardBatch:
        """Stage a DECODE batch of at most ``max_batch_size`` sequences: host fill + async copies."""
        assert batch.is_decode and len(batch.seqs) <= self.max_batch_size, "not a graph-sized decode batch"
        n = len(batch.seqs)
        padded = self.padded_size(n)
        if self._copied is not None and not self._copied.query():
            self._copied.synchronize()  # the previous step's copies still read the staging buffers
        width = stage_decode(batch.seqs, self.page_size, padded, *self._staging)
        assert width <= self.page_table_gpu.shape[1], "more pages than max_model_len allows"
        for gpu, cpu in self._copies:
            gpu[:padded].copy_(cpu[:padded], non_blocking=True)
        # The page table: only the batch's [padded, width] entries cross PCIe (all max_pages
        # columns were ~5 MB at bs 256 and a 40k context), then a device copy into the static table.
        rows_gpu, rows_cpu = self._page_rows
        flat = padded * width
        rows_gpu[:flat].copy_(rows_cpu[:flat], non_blocking=True)
        self.page_table_gpu[:padded, :width].copy_(rows_gpu[:flat].view(padded, width))
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device))  # where the copies went
        self._staged = self._static_batch(n, self._staging[4][:n].tolist())
        return self._staged

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        assert fb is self._staged, "replay() runs the batch of the latest prepare()"
        n = fb.batch_size
        self._graphs[self.padded_size(n)].replay()
        return self.logits_gpu[:n]  # [n, vocab] float32, overwritten by the next replay

    def is_staged(self, fb: ForwardBatch) -> bool:
        return fb is self._staged

    # -- capture -------------------------------------------------------------------------------------
    def capture(self) -> None:
        """Capture every size, largest first, into one pool; logs the time and the memory taken."""

        def capture(pool: Any, stream: torch.cuda.Stream) -> None:
            for bs in reversed(self.batch_sizes):
                self._graphs[bs] = self._capture(bs, pool, stream)

        self.capture_seconds, self.graph_memory_bytes = capture_all(self.device, capture)
        tbo = [bs for bs in self.batch_sizes if self.uses_tbo(bs)]
        log.info(
            "decode CUDA graphs: %d batch sizes (1..%d%s) captured in %.2f s; graph pool %.1f MiB, "
            "static buffers %.1f MiB",
            len(self.batch_sizes),
            self.max_batch_size,
            f"; two-batch overlap from {tbo[0]}" if tbo else "",
            self.capture_seconds,
            self.graph_memory_bytes / 2**20,
            self.static_bytes / 2**20,
        )

    def _capture(self, bs: int, pool: Any, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        self.run_static(bs)  # warm-up: compiles the Triton variants, sets up cuBLAS outside capture
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self.run_static(bs)
        return graph

    def run_static(self, bs: int) -> None:
        """What a graph of size ``bs`` holds: the model over the first ``bs`` static rows, its logits
        converted into the shared static output. Reads the static buffers as they are now."""
        fb = self._static_batch(bs, [1] * bs)  # host lengths are capture-time placeholders
        fb.input_ids = resolve_input_ids(fb.input_ids, self.input_rows_gpu[:bs], self.last_tokens)
        if self.uses_tbo(bs):
            halves = split_batch(fb, tbo_split(bs))
            for half in halves:
                self.attn_backend.prepare_graph(half, self.max_model_len)
            model = cast(Any, self.model)  # a decoder with forward_two_batch (engine.models.llama)
            run = functools.partial(run_overlapped, reduce=model.tp.all_reduce, side_stream=self._side_stream)
            model.forward_two_batch(fb, halves, run, out=self.logits_gpu[:bs])
        else:
            self.attn_backend.prepare_graph(fb, self.max_model_len)
            self.model(fb, out=self.logits_gpu[:bs])  # [bs, vocab] float32, straight from the LM head

    def uses_tbo(self, bs: int) -> bool:
        return self.tbo_min_batch > 0 and bs >= max(2, self.tbo_min_batch)

    def _static_batch(self, n: int, seq_lens_cpu: list[int]) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids_gpu[:n],
            positions=self.positions_gpu[:n],
            out_cache_loc=self.out_cache_loc_gpu[:n],
            page_table=self.page_table_gpu[:n],
            seq_lens=self.seq_lens_gpu[:n],
            logits_indices=self.logits_indices_gpu[:n],
            seq_lens_cpu=seq_lens_cpu,
            extend_lens_cpu=[1] * n,
            kv_pool=self.kv_pool,
            attn_backend=self.attn_backend,
        )
