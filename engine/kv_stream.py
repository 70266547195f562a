"""Layer-by-layer hand-off of a prompt's KV from a running step to another thread.

A prefill instance sends each request's KV to a decode instance. Waiting for the whole step before
sending puts the whole transfer on the time to first token; sending layer ``i`` while layers
``i+1..`` still compute hides it under the prefill (DESIGN.md: the transfer overlaps prefill).

- A request added with a *watcher* (``Engine.add_request(kv_watch=...)``) is handed a ``KVLease``
  when the step that completes its prompt is launched: its prompt's pages, with one reference held
  for the watcher, and that step's ``LayerProgress``. The watcher is called on the step's thread,
  before the forward runs; it must return at once (``AsyncEngine`` passes the lease to its event
  loop).
- The step's forward calls ``LayerProgress.layer_done(i)`` right after layer ``i``'s attention, on
  every path (eager, piecewise graphs, a context-parallel split step, whose K/V are gathered into
  the pool before attending). On CUDA it records an event on the step's stream; ``await
  progress.wait(i)`` returns once the device has passed it, so the layer's K/V are in the pool for
  any reader on any stream or process. ``fail`` (the step raised) wakes every waiter with
  ``StepFailed``.
- Only the last prompt chunk overlaps: earlier chunks' K/V are complete before it starts.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import torch


class StepFailed(RuntimeError):
    """The step that was computing the awaited layers raised."""


class LayerProgress:
    """How far one launched step has written its new K/V, layer by layer (module docstring)."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.device = device
        self._cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._events: list[torch.cuda.Event | None] = []  # one per finished layer (None on CPU)
        self._error: BaseException | None = None
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def num_done(self) -> int:
        """Layers whose K/V the step has written (on CUDA: launched; ``wait`` waits for the device)."""
        return len(self._events)

    def layer_done(self, layer: int) -> None:
        """The step's thread, right after layer ``layer``'s attention (layers in order)."""
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            # The step's stream on the engine's device (not the thread's current device: an engine
            # on cuda:1 runs from threads whose current device is cuda:0): after this layer's K/V.
            event.record(torch.cuda.current_stream(self.device))
        with self._lock:
            assert layer == len(self._events), f"layer {layer} done after {len(self._events)} layers"
            self._events.append(event)
            ready = [w for w in self._waiters if w[0] <= layer]
            self._waiters = [w for w in self._waiters if w[0] > layer]
        for _, loop, future in ready:
            loop.call_soon_threadsafe(_resolve, future)

    def fail(self, error: BaseException) -> None:
        """The step raised: every waiter, now and later, gets ``StepFailed``."""
        with self._lock:
            self._error = error
            ready, self._waiters = self._waiters, []
        for _, loop, future in ready:
            loop.call_soon_threadsafe(_resolve, future)

    async def wait(self, layer: int) -> None:
        """Return once layer ``layer``'s K/V are complete in the pool (on the device); raises
        ``StepFailed`` if the step failed first. Bound it with ``asyncio.wait_for``."""
        assert 0 <= layer < self.num_layers, f"layer {layer} of {self.num_layers}"
        loop = asyncio.get_running_loop()
        waiter = None
        with self._lock:
            if self._error is None and layer >= len(self._events):
                waiter = (layer, loop, loop.create_future())
                self._waiters.append(waiter)
        if waiter is not None:
            try:
                await waiter[2]
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        if self._error is not None:
            raise StepFailed(f"the step computing this KV failed: {self._error!r}")
        event = self._events[layer]
        if event is not None and not event.query():
            await asyncio.to_thread(event.synchronize)


@dataclass(frozen=True)
class KVLease:
    """A watched request's prompt pages (one reference held for the watcher, who frees them) and
    the progress of the step that completes them."""

    pages: list[int]
    progress: LayerProgress


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
