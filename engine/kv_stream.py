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
    """How far one launched step has written its new K/V, layer by layer (module docstring).

    On CUDA one thread per step follows the device through the layers' events (whatever the
    number of waiters: a prefill step may complete hundreds of prompts) and wakes the waiters of
    each layer the device has passed."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.device = device
        self._cuda = device.type == "cuda"
        self._cond = threading.Condition()
        self._num_done = 0  # layers the step has passed on the host (CUDA: launched)
        self._events: list[torch.cuda.Event] = []  # CUDA: one per launched layer
        self._num_ready = 0  # layers complete on the device
        self._error: BaseException | None = None
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._watcher: threading.Thread | None = None

    @property
    def num_done(self) -> int:
        """Layers whose K/V the step has written (on CUDA: launched; ``wait`` waits for the device)."""
        return self._num_done

    def is_ready(self, layer: int) -> bool:
        """Layer ``layer``'s K/V are complete in the pool (on the device), without waiting."""
        return layer < self._num_ready

    def layer_done(self, layer: int) -> None:
        """The step's thread, right after layer ``layer``'s attention (layers in order)."""
        with self._cond:
            assert layer == self._num_done, f"layer {layer} done after {self._num_done} layers"
            self._num_done = layer + 1
        if not self._cuda:  # the forward ran it: it is written
            self._set_ready(layer + 1)
            return
        event = torch.cuda.Event()
        # The step's stream on the engine's device (not the thread's current device: an engine
        # on cuda:1 may run from a thread whose current device is cuda:0): after this layer's K/V.
        event.record(torch.cuda.current_stream(self.device))
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._follow_device, name="kv-layers", daemon=True)
                self._watcher.start()

    def fail(self, error: BaseException) -> None:
        """The step raised (or reported too few layers): every waiter, now and later, gets
        ``StepFailed``."""
        with self._cond:
            self._error = error
            self._cond.notify_all()
            ready, self._waiters = self._waiters, []
        for _, loop, future in ready:
            loop.call_soon_threadsafe(_resolve, future)

    def _follow_device(self) -> None:
        torch.cuda.set_device(self.device)  # not cuda:0's context: a new thread's current device
        for layer in range(self.num_layers):
            with self._cond:
                while layer >= len(self._events) and self._error is None:
                    self._cond.wait()
                if self._error is not None:
                    return
                event = self._events[layer]
            event.synchronize()
            self._set_ready(layer + 1)

    def _set_ready(self, num_ready: int) -> None:
        with self._cond:
            self._num_ready = num_ready
            ready = [w for w in self._waiters if w[0] < num_ready]
            self._waiters = [w for w in self._waiters if w[0] >= num_ready]
        for _, loop, future in ready:
            loop.call_soon_threadsafe(_resolve, future)

    async def wait(self, layer: int) -> None:
        """Return once layer ``layer``'s K/V are complete in the pool (on the device); raises
        ``StepFailed`` if the step failed first. Bound it with ``asyncio.wait_for``."""
        assert 0 <= layer < self.num_layers, f"layer {layer} of {self.num_layers}"
        loop = asyncio.get_running_loop()
        waiter = None
        with self._cond:
            if self._error is None and layer >= self._num_ready:
                waiter = (layer, loop, loop.create_future())
                self._waiters.append(waiter)
        if waiter is not None:
            try:
                await waiter[2]
            finally:
                with self._cond:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        if self._error is not None:
            raise StepFailed(f"the step computing this KV failed: {self._error!r}")


@dataclass(frozen=True)
class KVLease:
    """A watched request's prompt pages (one reference held for the watcher, who frees them) and
    the progress of the step that completes them."""

    pages: list[int]
    progress: LayerProgress


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
