"""One engine: a model replica with its scheduler, KV cache and output processing, stepped by a caller.

``Engine.step`` is the whole algorithm: schedule → prepare → forward → sample → postprocess. The
offline ``LLM`` drives it in a loop; the services (#3) drive it from their own loops.

Overlap scheduling (``EngineConfig.overlap``, on for CUDA by default): ``step`` launches step N,
then reads back and postprocesses step N-1 while the GPU runs N, so the host's scheduling, staging,
detokenizing and stop checks hide under GPU time. Step N is scheduled before N-1's tokens are known:
``Scheduler.commit`` accounts for the tokens in flight, and a decode row whose input is one of them
reads it on the device (``engine.sequence``). A request that stops on a token of step N-1 was
already scheduled into step N; that row's result is dropped (one wasted row, never a wrong token).
Outputs come one ``step`` call later than without overlap, never later in time.

Tensor parallelism (``EngineConfig.tp`` > 1): this process is rank 0 and starts the other ranks
(``engine.distributed.workers``). ``_launch`` sends them the batch before preparing it, i.e. after
``schedule`` and before ``commit``, so they build the inputs this rank builds. ``close`` stops them.
Context parallelism (``EngineConfig.cp`` > 1) uses the same workers; rank 0's pool, allocator and
prefix cache hold the whole KV as with one rank (``engine.distributed.context_parallel``).

``read_kv`` / ``write_kv`` move a request's KV pages out of / into every rank's pool as whole heads
(``engine.distributed.kv_shards``); call them between steps, like ``step``. A request added with
``kv_watch`` is instead leased its prompt's pages when the step completing the prompt is launched,
with that step's per-layer progress (``engine.kv_stream``: a prefill instance sends each layer
while the next ones compute).
"""

from __future__ import annotations

import gc
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention.base import ForwardBatch
from engine.config import EngineConfig, ModelConfig
from engine.distributed.kv_shards import KVExportPlan, KVImportPlan
from engine.distributed.workers import TPWorkers
from engine.errors import AlreadyRunning, InvalidRequest
from engine.kv_stream import KVLease, LayerProgress
from engine.kvcache.allocator import PageAllocator
from engine.kvcache.radix_cache import RadixCache
from engine.load import EngineLoad
from engine.model_runner import ModelRunner, PendingTokens
from engine.output import OutputProcessor, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)
DEAD_RANK_WAIT_S = 5.0  # after a failure, how long a dying rank gets to show as the cause (a loaded
# host can take over a second to reap a killed process; a failure with every rank alive waits this long)


@dataclass
class _Launched:
    """A launched step: the rows whose tokens it samples, and those tokens on their way back."""

    rows: list[tuple[int, Sequence]]
    pending: PendingTokens


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.model_config = ModelConfig.from_dir(cfg.model, cfg.dtype)
        self.tokenizer = Tokenizer.from_dir(cfg.model)
        self.workers = TPWorkers(cfg) if cfg.num_ranks > 1 else None
        try:
            self.runner = ModelRunner.of_rank(
                cfg, self.model_config, self.workers.tp if self.workers else None
            )
        except BaseException:
            if self.workers is not None:
                self.workers.close(graceful=False)
            raise
        self.max_model_len = self.runner.max_model_len
        self.allocator = PageAllocator(self.runner.num_pages)
        self.prefix_cache = RadixCache(self.allocator, cfg.page_size) if cfg.enable_prefix_cache else None
        self.scheduler = Scheduler(
            self.allocator, cfg.page_size, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.prefix_cache,
            mixed=cfg.mixed_batches,
        )  # fmt: skip
        eos = frozenset(self.model_config.eos_token_ids) | self.tokenizer.eos_token_ids
        self.outputs = OutputProcessor(self.tokenizer, eos)
        self.runner.eos_token_ids = eos
        self._seqs: dict[str, Sequence] = {}
        self._seed_rng = random.Random(cfg.seed)
        self.overlap = cfg.overlap if cfg.overlap is not None else self.runner.device.type == "cuda"
        self._inflight: _Launched | None = None  # the launched step not read back yet (overlap)
        self._ranks_failure = "closed"  # why the ranks were stopped (``check_ranks``)
        self._num_prompt_tokens = self._num_cached_prompt_tokens = self._num_generated_tokens = 0

    def close(self) -> None:
        """Free the model, KV pool and graphs, and stop the other tensor- or context-parallel ranks,
        if any (idempotent). The engine is unusable after."""
        if self.workers is not None and self.cfg.cp > 1 and hasattr(self, "runner"):
            log.info(
                "context parallel: %d steps split over %d ranks", self.runner.num_split_steps, self.cfg.cp
            )
        self._inflight = None
        self._drop_runner()
        if self.workers is not None:
            self.workers.close()

    def _drop_runner(self) -> None:
        """Free this rank's runner before its group goes: its CUDA graphs hold the NCCL
        communicator's collectives, and tearing the group down under them waits forever."""
        if hasattr(self, "runner"):
            del self.runner
        gc.collect()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        hold_kv: bool = False,
        stream_text: bool = True,
        kv_watch: Callable[[KVLease], None] | None = None,
    ) -> None:
        """Queue a request. Raises ``InvalidRequest`` (field name first) if it can never run here.

        ``hold_kv``: when the request finishes, its final output carries ``kv_pages`` with one
        reference held for the caller (a prefill instance ships them, then calls ``free_pages``).
        ``kv_watch``: called once, on the step's thread, with a ``KVLease`` on the prompt's pages
        when the step that completes the prompt is launched, so the caller can ship each layer as
        soon as it is computed (``engine.kv_stream``; the caller frees the lease). This rank's
        pool must hold every kv head: not with tensor parallelism.
        ``stream_text=False``: outputs before the last carry no text and the last carries all of
        it (without stop strings, the tokens are then detokenized once, at the end: offline use).
        """
        max_len = self.check_request(request_id, prompt_ids, params)
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        seq = Sequence(request_id, list(prompt_ids), params, seed=seed, max_len=max_len, hold_kv=hold_kv)
        seq.stream_text = stream_text
        if kv_watch is not None:
            assert self.cfg.tp == 1, "kv_watch: a tensor-parallel rank's pool holds a share of the heads"
            seq.kv_watch = kv_watch
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def add_prefilled(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int,
        pages: list[int],
        first_token: int,
        first_logprob: TokenLogprob | None,
    ) -> RequestOutput:
        """Adopt a request prefilled elsewhere: ``pages`` (from ``reserve_pages``) hold its prompt's KV
        and ``first_token`` was sampled there with ``seed``. Returns the output for the first token,
        which may already be final (a stop token, max_tokens == 1). The engine owns ``pages`` now."""
        max_len = self.check_request(request_id, prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), params, seed=seed, max_len=max_len)
        seq.pages, seq.num_computed = list(pages), len(prompt_ids)
        seq.token_ids.append(first_token)
        self._seqs[request_id] = seq
        self.scheduler.add_running(seq)
        out, reason = self.outputs.process(seq, first_token, first_logprob)
        if reason is not None:
            self._finish(seq, reason)
        return out

    def abort(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.release(seq, reason)
        return self.outputs.finish(seq, reason)

    def reserve_pages(self, num_pages: int) -> list[int] | None:
        """Take ``num_pages`` pages for a request not yet in the scheduler (decode's reservation)."""
        return self.scheduler.take_pages(num_pages)

    def free_pages(self, pages: list[int]) -> None:
        """Drop the caller's reference on pages from ``reserve_pages`` or a ``kv_pages`` lease."""
        self.allocator.free(pages)

    def check_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> int:
        """Check a request can ever run here; returns its max length (prompt + max_tokens, capped).
        Raises ``AlreadyRunning`` or ``InvalidRequest`` (``engine.errors``)."""
        if request_id in self._seqs:
            raise AlreadyRunning(f"request_id: {request_id!r} is already running")
        if not prompt_ids:
            raise InvalidRequest("prompt: must contain at least one token")
        vocab = self.model_config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequest(f"prompt: token ids must be in [0, {vocab})")
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:  # sorted by id
            raise InvalidRequest(f"logit_bias: token ids must be in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"prompt: {len(prompt_ids)} tokens leave no room to generate within the model's context "
                f"of {self.max_model_len} tokens"
            )
        max_len = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        capacity = self.scheduler.capacity_tokens()
        if max_len > capacity:
            raise InvalidRequest(
                f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) needs {max_len} "
                f"tokens of KV cache but the whole pool holds {capacity}"
            )
        return max_len

    def load(self) -> EngineLoad:
        """The counts a load report needs, as they are now (call between steps, like ``step``)."""
        cached = self.prefix_cache.num_cached_pages if self.prefix_cache is not None else 0
        return EngineLoad(
            num_waiting=len(self.scheduler.waiting),
            num_running=self.scheduler.num_running,
            num_free_pages=self.allocator.num_free,
            num_total_pages=self.allocator.num_total,
            num_cached_pages=cached,
            page_size=self.cfg.page_size,
            max_num_seqs=self.cfg.max_num_seqs,
            num_evictable_pages=self.prefix_cache.num_evictable_pages()
            if self.prefix_cache is not None
            else 0,
            num_prompt_tokens=self._num_prompt_tokens,
            num_cached_prompt_tokens=self._num_cached_prompt_tokens,
            num_generated_tokens=self._num_generated_tokens,
        )

    def has_unfinished(self) -> bool:
        """A request not finished. (A launched step whose rows all ended is not work: the next step
        reads it back and drops it.)"""
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of the step read back now (module docstring)."""
        try:
            batch = self.scheduler.schedule()
            launched = self._launch(batch) if batch is not None else None
            if self.overlap:
                launched, self._inflight = self._inflight, launched
            return self._postprocess(launched) if launched is not None else []
        except BaseException as e:
            self._inflight = None  # its requests end with the error (the caller aborts them)
            self._stop_ranks(e)
            raise

    def _stop_ranks(self, error: BaseException) -> None:
        """After a failed step or KV move: ranks may be mid-collective, and pairing the next plan's
        collectives with a half-done one would be silent garbage, so they stop for good. The cause
        is kept for ``check_ranks``: a dead rank if there is one (a collective with a dead peer
        fails with a less telling message), else the error."""
        if self.workers is None or self.workers.closed:
            return
        self._ranks_failure = self.workers.dead_rank(DEAD_RANK_WAIT_S) or repr(error)
        self._drop_runner()
        self.workers.close(graceful=False)

    def check_ranks(self) -> None:
        """Raise RuntimeError (naming the rank) if a tensor-parallel rank died or the ranks were
        stopped by a failure; the engine cannot serve again then."""
        if self.workers is not None:
            if self.workers.closed:
                raise RuntimeError(f"tp: the ranks were stopped ({self._ranks_failure}); make a new engine")
            self.workers.check_alive()

    def read_kv(self, pages: list[int], layers: range) -> torch.Tensor:
        """The K/V of ``pages`` for ``layers`` with every kv head, whatever the TP size:
        ``[len(layers), 2, len(pages), page_size, num_kv_heads, head_dim]`` on this rank's device
        (with tp > 1 every rank takes part: call between steps)."""
        plan = KVExportPlan(list(pages), layers)
        try:
            if self.workers is not None:
                self.workers.send_plan(plan)
            whole = plan.run(self.runner)
        except BaseException as e:
            self._stop_ranks(e)
            raise
        assert whole is not None, "rank 0 gets the whole heads"
        return whole

    def write_kv(self, pages: list[int], layers: range, kv: torch.Tensor) -> None:
        """Write ``kv`` (as ``read_kv`` returns it, any device) into ``pages`` of every rank's pool,
        each rank its heads (with tp > 1 every rank takes part: call between steps)."""
        plan = KVImportPlan(list(pages), layers)
        try:
            if self.workers is not None:
                self.workers.send_plan(plan)
            plan.run(self.runner, kv)
        except BaseException as e:
            self._stop_ranks(e)
            raise

    def _launch(self, batch: ScheduledBatch) -> _Launched:
        if self.workers is not None:
            self.workers.send(batch)
        forward_batch = self.runner.prepare(batch)
        progress = self._watch_kv(batch, forward_batch)
        try:
            logits = self.runner.forward(forward_batch)
        except BaseException as e:
            if progress is not None:
                progress.fail(e)
            raise
        if progress is not None and progress.num_done != progress.num_layers:  # a path without the hook
            progress.fail(
                RuntimeError(f"the forward reported {progress.num_done} of {progress.num_layers} layers")
            )
        pending = self.runner.sample_async(logits, batch)
        return _Launched(self.scheduler.commit(batch), pending)

    def _watch_kv(self, batch: ScheduledBatch, forward_batch: ForwardBatch) -> LayerProgress | None:
        """Lease the prompt pages of each watched sequence whose prompt this step completes to its
        watcher, with the step's layer-by-layer progress (``engine.kv_stream``)."""
        progress = None
        for seq, n in zip(batch.seqs, batch.extend_lens, strict=True):
            if seq.kv_watch is None or seq.num_computed + n < seq.num_prompt:
                continue
            if progress is None:
                progress = LayerProgress(self.model_config.num_layers, self.runner.device)
                forward_batch.on_layer_done = progress.layer_done
            lease = seq.pages[: -(-seq.num_prompt // self.cfg.page_size)]
            self.allocator.incref(lease)
            watch, seq.kv_watch = seq.kv_watch, None
            watch(KVLease(lease, progress))
        return progress

    def _postprocess(self, launched: _Launched) -> list[RequestOutput]:
        sampled = launched.pending.wait()
        outputs, finished = [], []
        for i, seq in launched.rows:
            if seq.finished:
                continue  # ended (stop, abort) after this step was launched: drop its row
            token = sampled.token_ids[i]
            seq.num_inflight -= 1
            seq.token_ids.append(token)
            self._num_generated_tokens += 1
            if seq.num_output == 1:  # its prompt was prefilled here (adopted ones arrive with a token)
                self._num_prompt_tokens += seq.num_prompt
                self._num_cached_prompt_tokens += seq.num_cached_prompt
            logprob = None
            if seq.params.logprobs is not None and sampled.logprobs is not None:
                top = sampled.top_logprobs[i][: seq.params.logprobs] if sampled.top_logprobs else []
                logprob = TokenLogprob(token, sampled.logprobs[i], top)
            out, reason = self.outputs.process(seq, token, logprob)
            if reason is not None:
                finished.append((seq, reason, out))
            outputs.append(out)
        # Released only once every output exists: a lease taken here always reaches the caller.
        for seq, reason, out in finished:
            out.kv_pages = self._finish(seq, reason)
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> list[int] | None:
        """Release a finished sequence; returns its pages, leased to the caller, if it holds KV."""
        lease = None
        if seq.hold_kv:
            lease = list(seq.pages)
            self.allocator.incref(lease)
        self.scheduler.release(seq, reason)
        del self._seqs[seq.request_id]
        return lease
