"""Drive an ``Engine`` from asyncio: one task owns it, its steps run on one dedicated worker thread.

The services receive requests on the event loop; the engine (scheduler, allocator, radix cache) is
single-threaded. So every mutation — adding, aborting, reserving or freeing pages — is queued as a
command and applied by the loop task *between* steps, never while a step runs on the worker thread.

Contract:
- ``await call(fn)`` runs ``fn(engine)`` between steps and returns its result or raises its error;
  ``call_soon(fn)`` does the same without waiting (safe in ``finally`` blocks of cancelled handlers).
  ``await call_on_ranks(fn)`` too, but on the step thread (device work that takes every
  tensor-parallel rank, like ``Engine.read_kv``; the event loop keeps serving meanwhile).
- ``await generate(...)`` / ``await adopt(...)`` add a request and return a ``RequestStream``: an async
  iterator of the request's ``RequestOutput``s, the last one finished. Leaving the iteration early
  (the consumer was cancelled, the client went away) aborts the request and frees its pages, and any
  ``kv_pages`` lease that the consumer never took.
- ``generate(..., stream_kv=True)``: the stream's ``kv_lease`` future gets a ``KVLease`` (its prompt's
  pages and their layer-by-layer progress, ``engine.kv_stream``) as soon as the step completing the
  prompt is launched, before that step's outputs. Once the future is done the lease is the
  consumer's to free (``call_soon(lambda e: e.free_pages(pages))``); cancelling the future refuses a
  lease not delivered yet (it is then freed here), and so does leaving the stream early.
- Every request has a deadline (unix ns; 0 = none): past it, the request finishes with reason
  "deadline". A step that raises finishes every request with reason "error" and the loop goes on.
  Should the loop itself die (a bug, or a tensor-parallel rank that died: checked after every
  failure and every second while idle), every stream ends with "error", every pending ``call``
  raises ``EngineFailed``, and ``failure`` says why (the services then report NOT_SERVING).
- ``load`` (``engine.load.EngineLoad``) is taken on the step thread after each step, and after the
  commands between steps: read it, never the scheduler or allocator a running step is changing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from engine.engine import Engine
from engine.errors import AlreadyRunning, EngineFailed
from engine.kv_stream import KVLease
from engine.load import EngineLoad
from engine.output import RequestOutput, TokenLogprob
from engine.request_stream import RequestStream
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_CHECK_S = 1.0  # an idle engine with tensor-parallel ranks checks they are alive this often
STOP_TIMEOUT_S = 60.0  # closing the engine (joining its ranks) longer than this: its step is stuck


Undo = Callable[[Engine, Any], Any]


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # (fn, future or None, run on the step thread)
        self._commands: deque[tuple[Callable[[Engine], Any], asyncio.Future | None, bool]] = deque()
        self._streams: dict[str, RequestStream] = {}
        self._deadlines: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="engine-step", initializer=engine.runner.bind_thread
        )
        self._task: asyncio.Task | None = None
        self.failure: BaseException | None = None  # set if the loop itself died (a bug): serve nothing
        self.load: EngineLoad = engine.load()  # module contract

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._executor.submit(lambda: None)  # start the step thread now: it binds itself (bind_thread)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")
        self._task.add_done_callback(self._on_loop_exit)

    async def stop(self) -> bool:
        """Stop the loop and close the engine; False when the engine could not be closed (its step
        thread is stuck: the process should exit without waiting for it, ``os._exit``)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # Stop the tensor-parallel ranks, if any, off the event loop (it joins their processes).
        # The step thread may be stuck for good (a rank died inside a captured collective): then
        # close cannot run there; the workers die with this process (daemons, pipes closed).
        closing = asyncio.get_running_loop().run_in_executor(self._executor, self.engine.close)
        try:
            await asyncio.wait_for(closing, STOP_TIMEOUT_S)
        except TimeoutError:
            log.error(
                "the engine did not close within %.0f s (a step never finished); leaving it", STOP_TIMEOUT_S
            )
            self._executor.shutdown(wait=False, cancel_futures=True)
            return False
        self._executor.shutdown(wait=True)
        return True

    # -- commands ----------------------------------------------------------------------------------
    async def call(self, fn: Callable[[Engine], T], undo: Undo | None = None) -> T:
        """Run ``fn(engine)`` between steps and return its result. If the caller is cancelled first,
        ``fn`` is skipped; if it is cancelled after ``fn`` ran, ``undo(engine, result)`` runs instead
        of the result being lost (a page reservation, say)."""
        return await self._call(fn, undo, on_thread=False)

    async def call_on_ranks(self, fn: Callable[[Engine], T]) -> T:
        """Run ``fn(engine)`` on the step thread between steps and return its result (skipped if
        the caller is cancelled first)."""
        return await self._call(fn, None, on_thread=True)

    async def _call(self, fn: Callable[[Engine], T], undo: Undo | None, on_thread: bool) -> T:
        if self.failure is not None:
            raise EngineFailed(f"the engine loop failed: {self.failure!r}")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._commands.append((fn, future, on_thread))
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            if undo is not None and future.done() and not future.cancelled() and future.exception() is None:
                result = future.result()
                self.call_soon(lambda e: undo(e, result))
            raise

    def call_soon(self, fn: Callable[[Engine], Any]) -> None:
        """Run ``fn(engine)`` between steps, never skipped; errors are logged."""
        self._commands.append((fn, None, False))
        self._wake.set()

    # -- requests ----------------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        deadline_ns: int = 0,
        hold_kv: bool = False,
        stream_kv: bool = False,
    ) -> RequestStream:
        """Queue a request; raises ``InvalidRequest`` (field first) if it can never run here,
        ``AlreadyRunning`` if a request with this id is (``engine.errors``)."""
        stream = self._register(request_id, deadline_ns)
        watch = None
        if stream_kv:
            stream.kv_lease = asyncio.get_running_loop().create_future()
            watch = self._kv_watcher(stream)
        try:
            await self.call(
                lambda e: e.add_request(request_id, prompt_ids, params, hold_kv=hold_kv, kv_watch=watch),
                undo=lambda e, _: self._abort_now(e, request_id, "abort"),
            )
        except BaseException:
            self._unregister(request_id)
            raise
        return stream

    def _kv_watcher(self, stream: RequestStream) -> Callable[[KVLease], None]:
        loop = asyncio.get_running_loop()

        def deliver(lease: KVLease) -> None:  # on the event loop
            future = stream.kv_lease
            assert future is not None, "a watcher is made for a stream_kv request only"
            if future.done() or self._streams.get(stream.request_id) is not stream:  # nobody would free it
                self.call_soon(functools.partial(Engine.free_pages, pages=lease.pages))
            else:
                future.set_result(lease)

        def watch(lease: KVLease) -> None:  # step thread, before the forward: loop callbacks keep
            # their order, so the lease reaches the stream before any output of that step
            loop.call_soon_threadsafe(deliver, lease)

        return watch

    def adopt(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int,
        pages: list[int],
        first_token: int,
        first_logprob: TokenLogprob | None,
        deadline_ns: int = 0,
    ) -> Awaitable[RequestStream]:
        """Add a request prefilled elsewhere (``Engine.add_prefilled``); await the result for its
        stream, which starts with the first token's output. Not a coroutine on purpose: the engine
        owns ``pages`` from the moment of the call (before any await), and whatever happens after —
        the request is invalid, the caller is cancelled — frees them exactly once."""
        if self.failure is not None:  # nobody would run ``add``: the pages go back with the error
            return self._failed(EngineFailed(f"the engine loop failed: {self.failure!r}"))
        try:
            stream = self._register(request_id, deadline_ns)
        except ValueError as exc:
            self.call_soon(lambda e: e.free_pages(pages))
            return self._failed(exc)
        added: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def add(e: Engine) -> None:
            try:
                first = e.add_prefilled(
                    request_id, prompt_ids, params, seed, pages, first_token, first_logprob
                )
            except Exception as exc:
                e.free_pages(pages)
                self._unregister(request_id)
                if not added.done():
                    added.set_exception(exc)
                return
            self._deliver(first)
            if not added.done():
                added.set_result(None)

        self.call_soon(add)  # never skipped, so the pages cannot be forgotten
        return self._adopted(stream, added)

    async def _adopted(self, stream: RequestStream, added: asyncio.Future[None]) -> RequestStream:
        try:
            await asyncio.shield(added)
        except asyncio.CancelledError:
            self.detach(stream)  # the abort is queued after ``add``: it frees what ``add`` adopted
            raise
        return stream

    @staticmethod
    async def _failed(exc: Exception) -> RequestStream:
        raise exc

    def abort(self, request_id: str, reason: str = "abort") -> None:
        self.call_soon(lambda e: self._abort_now(e, request_id, reason))

    def detach(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            # Unregister first: an output a step produces from now on finds no stream and its lease
            # goes straight back (``_deliver``), whatever the order of this abort and that step.
            self._unregister(stream.request_id)
            self.abort(stream.request_id)
        if stream.kv_lease is not None and not stream.kv_lease.done():
            stream.kv_lease.cancel()  # a lease delivered from now on goes straight back
        while not stream.queue.empty():  # outputs nobody will read; a lease in them must go back
            out = stream.queue.get_nowait()
            if out.kv_pages:
                self.call_soon(functools.partial(Engine.free_pages, pages=out.kv_pages))
        stream.finished = True

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # -- the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._apply_commands()
            self._expire_deadlines()
            self.load = self.engine.load()
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self._commands:
                    await self._idle()
                continue
            try:
                outputs = await self._step(loop.run_in_executor(self._executor, self._step_and_measure))
            except Exception:
                log.exception("engine step failed; finishing every request with reason 'error'")
                # A dead rank ends the loop first, so the streams' "error" comes with ``failure``.
                self.engine.check_ranks()
                self._fail_all("error")
                continue
            for out in outputs:
                self._deliver(out)
            await asyncio.sleep(0)  # let handlers consume before the next step

    def _step_and_measure(self) -> list[RequestOutput]:
        """One step and the load it leaves, both on the step thread."""
        outputs = self.engine.step()
        self.load = self.engine.load()
        return outputs

    async def _step(self, step: asyncio.Future[list[RequestOutput]]) -> list[RequestOutput]:
        """Await a step; with tensor-parallel ranks, check every ``IDLE_CHECK_S`` that they live. On
        CUDA a rank that dies inside a collective captured in a graph leaves rank 0's step waiting
        with no timeout (graphs are outside NCCL's watchdog): the check ends the loop with the dead
        rank as its cause, so requests fail and health says NOT_SERVING instead of hanging (the
        step's thread stays blocked; the process needs a restart)."""
        if self.engine.workers is None:
            return await step
        while True:
            done, _ = await asyncio.wait({step}, timeout=IDLE_CHECK_S)
            if done:
                return step.result()
            self.engine.check_ranks()

    async def _idle(self) -> None:
        """Wait for work; with tensor-parallel ranks, check every ``IDLE_CHECK_S`` that they live."""
        if self.engine.workers is None:
            await self._wake.wait()
            return
        try:
            await asyncio.wait_for(self._wake.wait(), IDLE_CHECK_S)
        except TimeoutError:
            self.engine.check_ranks()

    def _fail_all(self, reason: str) -> None:
        for request_id in list(self._streams):
            try:
                self._abort_now(self.engine, request_id, reason)
            except Exception:  # the engine's state may be broken: still end the stream
                log.exception("aborting %s failed", request_id)
                self._end_stream(request_id, reason)

    def _on_loop_exit(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self.failure = task.exception()
        log.error("the engine loop died: %r; failing every request", self.failure)
        for request_id in list(self._streams):
            self._end_stream(request_id, "error")
        while self._commands:
            _, future, _ = self._commands.popleft()
            if future is not None and not future.done():
                future.set_exception(EngineFailed(f"the engine loop failed: {self.failure!r}"))

    def _end_stream(self, request_id: str, reason: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._unregister(request_id)
            stream.put(RequestOutput(request_id, [], "", True, reason))

    async def _apply_commands(self) -> None:
        loop = asyncio.get_running_loop()
        while self._commands:
            fn, future, on_thread = self._commands.popleft()
            if future is not None and future.cancelled():
                continue  # the caller is gone and wants nothing done
            try:
                if on_thread:
                    result = await loop.run_in_executor(self._executor, fn, self.engine)
                else:
                    result = fn(self.engine)
            except Exception as e:
                if future is None:
                    log.exception("engine command failed")
                elif not future.done():
                    future.set_exception(e)
                if on_thread:
                    self.engine.check_ranks()  # a KV move that lost a rank ends the loop
                continue
            if future is not None and not future.done():
                future.set_result(result)

    def _expire_deadlines(self) -> None:
        now = time.time_ns()
        for request_id, deadline in list(self._deadlines.items()):
            if deadline and now > deadline:
                self._abort_now(self.engine, request_id, "deadline")

    def _abort_now(self, engine: Engine, request_id: str, reason: str) -> None:
        out = engine.abort(request_id, reason)
        if out is not None:
            self._deliver(out)
        else:  # not in the engine (never added, or finished): end the stream so nobody waits forever
            self._end_stream(request_id, reason)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            if out.kv_pages:  # its consumer is gone: the lease goes straight back
                self.engine.free_pages(out.kv_pages)
            return
        if out.finished:
            self._unregister(out.request_id)
        stream.put(out)

    def _register(self, request_id: str, deadline_ns: int) -> RequestStream:
        if request_id in self._streams:
            raise AlreadyRunning(f"request_id: {request_id!r} is already running")
        stream = self._streams[request_id] = RequestStream(self, request_id)
        self._deadlines[request_id] = deadline_ns
        return stream

    def _unregister(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._deadlines.pop(request_id, None)
