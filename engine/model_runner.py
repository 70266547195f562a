"""Owns the device side of an engine: weights, the KV page pool, the attention backend, the sampler.

``prepare`` turns a scheduled batch (plain Python) into a ``ForwardBatch`` of device tensors,
``forward`` runs the model to last-token logits, ``sample_async`` picks tokens and starts copying
them to the host; ``PendingTokens.wait`` is the step's one host sync (``sample`` does both). The
sampled tokens also stay on the device in ``last_tokens``, where the next step's ``prepare`` reads
the input tokens the host does not have yet (overlap scheduling, ``engine.sequence``).

CUDA graphs (``engine.graphs``): on CUDA with a graph-capable attention backend, decode batches of
up to ``EngineConfig.graph_batch_limit`` sequences are staged into static buffers by ``prepare`` and
replayed by ``forward``; EXTEND batches of up to ``EngineConfig.piecewise_token_limit`` tokens whose
eager run would be host-bound (``_piecewise_pays``) are staged likewise and run as piecewise graphs
with eager attention in between. Everything else (and everything on the CPU) runs eagerly.

Context parallelism (``cp``, ``engine.distributed.context_parallel``): ``prepare`` keeps this rank's
share of a step that splits, the attention backend is wrapped to gather the ranks' K/V, and only
rank 0 samples (the others take its tokens).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from engine.attention import ForwardBatch, ForwardMode, create_backend
from engine.config import EAGER_LAYER_LAUNCH_FLOPS, PIECEWISE_MIN_TOKENS, EngineConfig, ModelConfig
from engine.device import upload, use_device
from engine.distributed import TPGroup
from engine.distributed.context_parallel import ContextParallelAttention, CPGroup, split_forward_batch
from engine.distributed.zigzag import ZigzagPlan, should_split
from engine.graphs import (
    DecodeGraphRunner,
    PiecewiseGraphRunner,
    create_decode_graphs,
    create_piecewise_graphs,
    resolve_input_ids,
)
from engine.kvcache.page_pool import KVPagePool
from engine.layers.kernels import create_layer_ops, layer_ops_name
from engine.loader import load_model
from engine.logit_adjust import LogitAdjustments
from engine.packing import pack
from engine.sampling import Sampler, SamplingTensors
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

log = logging.getLogger(__name__)
CPU_DEFAULT_KV_CACHE_BYTES = 256 << 20
# Left free on a GPU whose pool is sized by the utilization: graph pools, cuBLAS/cuDNN workspaces.
GPU_MEMORY_MARGIN_BYTES = 2 << 30


@dataclass
class SampledTokens:
    """Host-side sampling results for one step, one entry per sequence of the batch."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


@dataclass
class PendingTokens:
    """A launched step's samples on their way to the host; ``wait`` blocks until they are there."""

    token_ids: torch.Tensor  # [batch] int64 host, filled by an async copy
    logprobs: torch.Tensor | None  # [batch] float32 host
    top_token_ids: torch.Tensor | None  # [batch, max_logprobs] int64 host
    top_logprobs: torch.Tensor | None  # [batch, max_logprobs] float32 host
    ready: torch.cuda.Event | None  # recorded after the copies (None on CPU: already done)

    def wait(self) -> SampledTokens:
        if self.ready is not None:
            self.ready.synchronize()
        token_ids = self.token_ids.tolist()
        if self.logprobs is None:
            return SampledTokens(token_ids, None, None)
        top = None
        if self.top_token_ids is not None and self.top_logprobs is not None:
            pairs = zip(self.top_token_ids.tolist(), self.top_logprobs.tolist(), strict=True)
            top = [list(zip(ids, lps, strict=True)) for ids, lps in pairs]
        return SampledTokens(token_ids, self.logprobs.tolist(), top)


class ModelRunner:
    def __init__(
        self, cfg: EngineConfig, model_cfg: ModelConfig, tp: TPGroup | None = None, cp: CPGroup | None = None
    ) -> None:
        """``tp``: this rank's tensor-parallel group (its shard of the weights and of the KV heads);
        ``cp``: its context-parallel group (the whole model; long prefills split). None: one rank."""
        assert tp is None or cp is None, "tp and cp do not combine yet"
        self.cfg, self.model_cfg = cfg, model_cfg
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:  # "cuda": the current GPU, fixed from now on
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        use_device(device)
        if tp is not None and cfg.symmetric_memory and cfg.cuda_graphs and self.device.type == "cuda":
            # Every all-reduce inside a graph fits: the largest decode batch or piecewise step.
            rows = max(cfg.graph_batch_limit, cfg.piecewise_token_limit(model_cfg.layer_params(cfg.tp)))
            dtype = model_cfg.torch_dtype
            tp = tp.with_symmetric_memory(rows * model_cfg.hidden_size * dtype.itemsize, dtype, self.device)
        self.tp = tp if tp is not None else TPGroup()
        self.cp = cp if cp is not None else CPGroup()
        self.num_split_steps = 0  # steps split over the CP ranks (tests, logs)
        self.num_kv_heads = model_cfg.tp_heads(1 if tp is None else tp.world_size)[1]  # in this rank's pool
        self.max_model_len = self._max_model_len()
        # The latest step's sampled tokens, by row, on the device; and two host buffers they are
        # copied into, used in turn (a step's buffer is read before the step after next is launched).
        # Rows: a step holds at most max_num_seqs sequences; the memory profile's prefill may hold more,
        # and the startup warm-up step two.
        rows = max(2, cfg.max_num_seqs, cfg.max_num_batched_tokens // max(1, self.max_model_len - 1) + 1)
        self.last_tokens = torch.zeros(rows, dtype=torch.int64, device=self.device)
        pin = self.device.type == "cuda"
        self._readback = [torch.zeros(rows, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._readback_ready = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._readback_turn = 0
        self.layer_ops = create_layer_ops(layer_ops_name(cfg))
        self.model = load_model(
            model_cfg, cfg.model, self.device, dummy=cfg.load_format == "dummy", ops=self.layer_ops, tp=tp
        )
        # The start-up line names what `auto` resolved to (EngineConfig), so a GPU host on the slow
        # path is visible in the first lines of the log.
        log.info(
            "device %s, attention backend %s, layer ops %s (fused_kernels=%s)",
            self.device, cfg.attention_backend, self.layer_ops.name, cfg.fused_kernels,
        )  # fmt: skip
        self.attn_backend = create_backend(cfg)
        if self.cp.world_size > 1:
            # A rank's share of a step: at most sum(2 * ceil(n / 2cp)) <= tokens / cp + 2 * sequences.
            max_rows = min(
                cfg.max_num_batched_tokens, cfg.max_num_batched_tokens // self.cp.world_size + 2 * rows
            )
            self.cp.reserve(
                max_rows, self.num_kv_heads, model_cfg.head_dim, model_cfg.torch_dtype, self.device,
                symmetric=cfg.symmetric_memory,
            )  # fmt: skip
            self.attn_backend = ContextParallelAttention(self.attn_backend, self.cp)
        self.sampler = Sampler()
        # What min_tokens holds back besides stop_token_ids; the engine adds its tokenizer's.
        self.eos_token_ids = frozenset(model_cfg.eos_token_ids)
        self.graphs: DecodeGraphRunner | None = None  # captured once the KV pool exists
        self.piecewise: PiecewiseGraphRunner | None = None
        self.num_pages = self._num_pages()
        self.kv_pool = self._make_pool(self.num_pages)
        log.info(
            "KV pool: %d pages x %d tokens (%.1f MiB) on %s",
            self.num_pages,
            cfg.page_size,
            self.kv_pool.kv_gpu.numel() * self.kv_pool.kv_gpu.element_size() / 2**20,
            self.device,
        )
        self.graphs = create_decode_graphs(
            cfg,
            self.model,
            self.kv_pool,
            self.attn_backend,
            self.last_tokens,
            self.max_model_len,
            model_cfg.vocab_size,
        )
        self.piecewise = create_piecewise_graphs(cfg, self.model, self.kv_pool, self.attn_backend)
        if self.device.type == "cuda":
            self._warm_up()
        self.bind_thread()

    @classmethod
    def of_rank(cls, cfg: EngineConfig, model_cfg: ModelConfig, ranks: TPGroup | None) -> ModelRunner:
        """This process's runner among the engine's ``cfg.num_ranks`` ranks (``ranks``: the group
        they joined; None: one rank): a tensor-parallel shard, or with ``cp`` > 1 a CP rank."""
        if ranks is not None and cfg.cp > 1:
            return cls(cfg, model_cfg, cp=CPGroup.of(ranks))
        return cls(cfg, model_cfg, tp=ranks)

    # -- the step ------------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch, use_graphs: bool = True) -> ForwardBatch:
        """``use_graphs=False`` forces the eager path (tests and benchmarks compare the two)."""
        graphs = self.graphs if use_graphs else None
        if graphs is not None and batch.is_decode and len(batch.seqs) <= graphs.max_batch_size:
            return graphs.prepare(batch)
        packed = pack(batch.seqs, batch.extend_lens, self.cfg.page_size)
        fields = [packed.input_ids, packed.positions, packed.slots, packed.page_table, packed.seq_lens,
                  packed.last_rows] + ([packed.input_rows] if packed.input_rows is not None else [])  # fmt: skip
        ids, positions, slots, page_table, seq_lens, last_rows, *input_rows = upload(fields, self.device)
        if input_rows:
            ids = resolve_input_ids(ids, input_rows[0], self.last_tokens)
        fb = ForwardBatch(
            mode=ForwardMode.DECODE if batch.is_decode else ForwardMode.EXTEND,
            input_ids=ids,
            positions=positions,
            out_cache_loc=slots,
            page_table=page_table,
            seq_lens=seq_lens,
            logits_indices=last_rows,
            seq_lens_cpu=packed.seq_lens.tolist(),
            extend_lens_cpu=list(batch.extend_lens),
            kv_pool=self.kv_pool,
            attn_backend=self.attn_backend,
        )
        cp = self.cp.world_size
        if cp > 1 and should_split(batch.extend_lens, batch.is_decode, cp, self.cfg.cp_min_tokens):
            plan = ZigzagPlan.build([seq.num_computed for seq in batch.seqs], batch.extend_lens, cp)
            fb = split_forward_batch(fb, plan, self.cp.rank)  # this rank's tokens; piecewise sees them
            self.num_split_steps += 1
        piecewise = self.piecewise if use_graphs else None
        if piecewise is not None and not batch.is_decode and self._piecewise_pays(fb, piecewise.max_tokens):
            piecewise.stage(fb)
        return fb

    def _piecewise_pays(self, fb: ForwardBatch, max_tokens: int) -> bool:
        """Piecewise graphs for this EXTEND step: always up to ``PIECEWISE_MIN_TOKENS``; above, only
        while the step's per-layer work stays under what the GPU does while the host launches a layer
        eagerly (``EngineConfig.piecewise_token_limit``). A long lone prompt is attention-heavy and
        GPU-bound: an 8k-token prompt on the 0.6B shape took 34.1 ms from graphs, 32.3 ms eager."""
        if fb.num_tokens > max_tokens:
            return False
        if fb.num_tokens <= PIECEWISE_MIN_TOKENS:
            return True
        flops = self.model_cfg.extend_layer_flops(fb.extend_lens_cpu, fb.seq_lens_cpu, self.tp.world_size)
        return flops <= EAGER_LAYER_LAUNCH_FLOPS

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Last-token logits, [batch, vocab] float32. From a decode graph replay they are a view of a
        static buffer, valid until the next forward: sample (or clone) them before that."""
        if self.graphs is not None and self.graphs.is_staged(fb):
            return self.graphs.replay(fb)
        if self.piecewise is not None and self.piecewise.is_staged(fb):
            return self.piecewise.replay(fb)
        self.attn_backend.prepare(fb)
        return self.model(fb)  # [batch, vocab] float32

    def sample(self, logits: torch.Tensor, batch: ScheduledBatch) -> SampledTokens:
        return self.sample_async(logits, batch).wait()

    @torch.inference_mode()
    def sample_async(self, logits: torch.Tensor, batch: ScheduledBatch) -> PendingTokens:
        """Sample ``batch``'s rows from ``logits`` [batch, vocab]; nothing waits for the GPU. Each
        sequence's step index counts its tokens still in flight (a seeded draw depends on it).
        Context parallel: rank 0 samples (it holds every last token) and the others receive its
        tokens (their ``logits`` are not read; no logprobs there)."""
        n = len(batch.seqs)
        out = None
        params = [seq.params for seq in batch.seqs]
        adjusted = LogitAdjustments.needed(params)
        if self.cp.rank == 0:
            tensors = SamplingTensors.build(
                params,
                seeds=[seq.seed for seq in batch.seqs],
                steps=[seq.num_output + seq.num_inflight for seq in batch.seqs],
                vocab_size=logits.shape[-1],
                device=self.device,
                adjust=LogitAdjustments.of_batch(
                    batch.seqs, self.eos_token_ids, logits.shape[-1], self.device, self.last_tokens
                )
                if adjusted
                else None,
            )
            out = self.sampler(logits, tensors)
            self.last_tokens[:n].copy_(out.token_ids)
        self.cp.broadcast_tokens(self.last_tokens[:n])  # no-op for one rank
        if adjusted and self.tp.world_size > 1:
            # A worker rank's mirror (``engine.distributed.plans``) lacks the tokens it never
            # computed (prompts from the prefix cache): rank 0's penalised samples are the step's.
            CPGroup(self.tp.rank, self.tp.world_size, self.tp.group).broadcast_tokens(self.last_tokens[:n])
        turn, self._readback_turn = self._readback_turn, self._readback_turn ^ 1
        token_ids = self._readback[turn][:n]  # [n]
        token_ids.copy_(self.last_tokens[:n], non_blocking=True)
        pending = PendingTokens(token_ids, None, None, None, self._readback_ready[turn])
        if out is not None and out.logprobs is not None:
            pending.logprobs = out.logprobs.to("cpu", non_blocking=True)
            if out.top_token_ids is not None and out.top_logprobs is not None:
                pending.top_token_ids = out.top_token_ids.to("cpu", non_blocking=True)
                pending.top_logprobs = out.top_logprobs.to("cpu", non_blocking=True)
        if pending.ready is not None:  # this device's stream: the thread's current device may be another
            pending.ready.record(torch.cuda.current_stream(self.device))
        return pending

    # -- sizing --------------------------------------------------------------------------------------
    def _max_model_len(self) -> int:
        limit = self.model_cfg.max_position_embeddings
        if self.cfg.max_model_len is not None and self.cfg.max_model_len > limit:
            raise ValueError(
                f"max_model_len: {self.cfg.max_model_len} exceeds the model's max_position_embeddings ({limit})"
            )
        return self.cfg.max_model_len or limit

    def _bytes_per_page(self) -> int:
        m = self.model_cfg
        return KVPagePool.bytes_per_page(
            m.num_layers, self.cfg.page_size, self.num_kv_heads, m.head_dim, m.torch_dtype
        )

    def _make_pool(self, num_pages: int) -> KVPagePool:
        m = self.model_cfg
        return KVPagePool(
            m.num_layers,
            num_pages,
            self.cfg.page_size,
            self.num_kv_heads,
            m.head_dim,
            m.torch_dtype,
            self.device,
        )

    def _num_pages(self) -> int:
        if self.cfg.kv_cache_bytes is not None:
            budget = self.cfg.kv_cache_bytes
        elif self.device.type == "cpu":
            budget = CPU_DEFAULT_KV_CACHE_BYTES
        else:
            peak_activation = self._profile_activation_bytes()
            free, total = torch.cuda.mem_get_info(self.device)
            # The utilization is this instance's share of the device: its own allocations (the
            # weights) count against it and other processes' do not, so instances sharing a GPU
            # each get their fraction. Never more than is free, less a margin for the CUDA graph
            # pools and workspaces allocated after the pool.
            own = torch.cuda.memory_reserved(self.device)
            share = int(total * self.cfg.gpu_memory_utilization) - own - peak_activation
            budget = min(share, free - peak_activation - GPU_MEMORY_MARGIN_BYTES)
        # Every rank's pool must hold the same pages (rank 0 allocates them for all): the smallest.
        num_pages = self.tp.min_int(budget // self._bytes_per_page(), self.device)
        num_pages = self.cp.min_int(num_pages, self.device)
        if num_pages < 2:
            raise ValueError(
                f"KV cache: budget {budget} bytes holds {num_pages} pages of {self._bytes_per_page()} bytes; "
                "raise kv_cache_bytes / gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return num_pages

    def _scratch_step(self, lens: list[int], name: str) -> None:
        """One extend step of fresh sequences of ``lens`` tokens (token 0) on consecutive pages from
        page 1 on, pages no request holds yet: the startup steps (memory profile, warm-up)."""
        seqs, next_page = [], 1
        for i, k in enumerate(lens):
            seq = Sequence(f"{name}-{i}", [0] * k, SamplingParams(), seed=0, max_len=k + 1)
            num_pages = -(-k // self.cfg.page_size)
            seq.pages, next_page = list(range(next_page, next_page + num_pages)), next_page + num_pages
            seqs.append(seq)
        batch = ScheduledBatch(seqs, lens, is_decode=False)
        self.sample(self.forward(self.prepare(batch)), batch)

    def _warm_up(self) -> None:
        """One extend step of two short fresh sequences at startup (on free pages, which hold no
        one's KV yet): the first multi-sequence extend in a process pulled in what torch registers
        lazily, ~5 s of imports on a host without cached bytecode (measured on the GPU box), which
        would otherwise stall the first batch of real requests."""
        if self.num_pages < 3:
            return
        start, ps = time.perf_counter(), self.cfg.page_size
        self._scratch_step([ps, ps], "warm-up")  # waits for the step's tokens
        log.info("warm-up step (a two-sequence extend): %.2f s", time.perf_counter() - start)

    def bind_thread(self) -> None:
        """Ready the calling thread to step this runner: its current device (``use_device``) and, on
        CUDA, what the attention backend keeps per thread (cuDNN's plans, which torch caches per
        thread: ``AttentionBackend.warm_up``). The constructing thread is ready; another thread that
        steps the engine calls this first (``AsyncEngine``'s step thread does)."""
        use_device(self.device)
        if self.device.type != "cuda":
            return
        start, m = time.perf_counter(), self.model_cfg
        heads, kv_heads = m.tp_heads(self.tp.world_size)
        tokens = min(self.cfg.max_num_batched_tokens, self.max_model_len)  # the longest lone prompt
        dtype = self.kv_pool.kv_gpu.dtype
        plans = self.attn_backend.warm_up(heads, kv_heads, m.head_dim, dtype, tokens, self.device)
        if plans:
            thread = threading.current_thread().name
            log.info("%s: %d attention plans built in %.2f s", thread, plans, time.perf_counter() - start)

    def _profile_activation_bytes(self) -> int:
        """Peak memory of the largest steps, measured, not guessed: a full-budget prefill (split into
        sequences no longer than the context) and sampling ``max_num_seqs`` rows with top-k/top-p."""
        n, ps = self.cfg.max_num_batched_tokens, self.cfg.page_size
        per_seq = self.max_model_len - 1
        lens = [per_seq] * (n // per_seq) + ([n % per_seq] if n % per_seq else [])
        self.kv_pool = self._make_pool(sum(-(-k // ps) for k in lens) + 1)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._scratch_step(lens, "profile")
        rows = min(self.cfg.max_num_seqs, n)
        logits = torch.randn(rows, self.model_cfg.vocab_size, device=self.device)
        random_params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logprobs=5)
        self.sampler(
            logits,
            SamplingTensors.build(
                [random_params] * rows, [0] * rows, [0] * rows, logits.shape[-1], self.device
            ),
        )
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del self.kv_pool, logits
        torch.cuda.empty_cache()
        return peak
