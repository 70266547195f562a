"""Tensor-parallel ranks 1..N-1 as worker processes that rank 0 drives.

Rank 0 owns the engine (scheduler, allocator, prefix cache, outputs) and its own ``ModelRunner``
shard; a worker holds only a shard. When rank 0 launches a step it first sends every worker the
step's ``StepPlan`` (what ``prepare`` and ``sample_async`` read of each sequence, as a delta against
the sequences the worker mirrors: ``engine.distributed.plans``); each worker rebuilds the batch and
runs the same prepare → forward → sample_async. So every rank takes part in
the model's collectives in the same order, samples the same tokens from the same all-gathered
logits, and holds the same ``last_tokens`` that the next step's in-flight inputs are read from
(overlap scheduling). Workers never read tokens back.

Plans travel over one pipe per worker rather than a collective: an idle engine (a server with no
requests) may send nothing for hours, where a gloo wait would time out; and a worker whose driver
is gone sees its pipe close and exits. The model's collectives are bounded by the group timeout,
and rank 0 checks its workers are alive before each send, so a dead worker is an error naming its
rank and exit code, not a hang. The model group is torch's default group: one TP engine per
process at a time.

Context-parallel ranks (``EngineConfig.cp``, ``engine.distributed.context_parallel``) are driven
the same way: the group holds ``cfg.num_ranks`` processes and each builds its runner with
``ModelRunner.of_rank``; errors name the kind (``tp`` / ``cp``).

Besides steps, the pipe carries other plans every rank runs at the same point of the stream (their
collectives pair up like a step's): the KV export and import of the services
(``engine.distributed.kv_shards``). A plan other than a ``StepPlan`` has ``run(runner)``.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import pickle
import signal
import socket
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig, ModelConfig, rank_device
from engine.distributed.groups import TPGroup, destroy_tp, init_tp
from engine.distributed.kv_shards import KVExportPlan, KVImportPlan
from engine.distributed.plans import PlanDecoder, PlanEncoder, StepPlan
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledBatch

COLLECTIVE_TIMEOUT_S = 300.0  # a rank waiting longer than this in a collective fails
JOIN_TIMEOUT_S = 30.0  # a worker told to stop that is still running after this is killed
_STOP = pickle.dumps(None)


class TPWorkers:
    """Rank 0's handle on ranks 1..N-1: starts them and joins the group (``tp``), sends each step's
    plan (``send``), stops them (``close``). Tensor- or context-parallel (``kind``)."""

    def __init__(self, cfg: EngineConfig) -> None:
        assert cfg.num_ranks > 1, "one rank needs no workers"
        self.kind = "cp" if cfg.cp > 1 else "tp"
        if dist.is_initialized():
            raise RuntimeError(
                f"{self.kind}: this process already belongs to a process group (one multi-rank engine "
                "per process)"
            )
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self._closed = False
        self.plans = PlanEncoder()  # step plans as deltas against the workers' mirrors
        for rank in range(1, cfg.num_ranks):
            conn, child_conn = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, cfg, init_method, child_conn),
                name=f"pdserve-{self.kind}{rank}",
                daemon=True,
            )
            proc.start()
            child_conn.close()
            self.procs.append(proc)
            self.conns.append(conn)
        try:
            device = rank_device(cfg.device, 0)
            self.tp = init_tp(0, cfg.num_ranks, init_method, device=device, timeout_s=COLLECTIVE_TIMEOUT_S)
        except BaseException:
            self.close(graceful=False)
            raise

    def send(self, batch: ScheduledBatch) -> None:
        """Hand ``batch`` to every worker; call it before rank 0 prepares the same batch."""
        self.send_plan(self.plans.encode(batch))

    def send_plan(self, plan: StepPlan | KVExportPlan | KVImportPlan) -> None:
        """Hand ``plan`` to every worker; rank 0 then runs its own part of it."""
        if self._closed:
            raise RuntimeError(
                f"{self.kind}: the ranks were stopped (closed, or a step failed); make a new engine"
            )
        self.check_alive()
        data = pickle.dumps(plan)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as e:
                raise RuntimeError(f"{self.kind}: worker rank {rank} is gone ({e})") from e

    @property
    def closed(self) -> bool:
        """Stopped: by ``close``, or after a failed step (the engine cannot go on)."""
        return self._closed

    def check_alive(self) -> None:
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                raise RuntimeError(f"{self.kind}: worker rank {rank} exited with code {proc.exitcode}")

    def dead_rank(self, timeout_s: float) -> str | None:
        """Which worker is gone and how, waiting up to ``timeout_s`` for one to exit (a collective
        fails as soon as a dying peer's sockets close, before the peer is reaped); None if all live."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.check_alive()
            except RuntimeError as e:
                return str(e)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # The sentinel fires when the process exits; polling too covers one whose sentinel
            # another process still holds open (is_alive asks the kernel directly).
            wait([p.sentinel for p in self.procs], min(left, 0.05))

    def close(self, graceful: bool = True) -> None:
        """Stop the workers and leave the group. ``graceful``: every worker is alive and idle, so all
        ranks tear the group down together (``destroy_tp``); else the workers are killed."""
        if self._closed:
            return
        self._closed = True
        graceful = graceful and all(p.is_alive() for p in self.procs)
        if graceful:
            try:
                for conn in self.conns:
                    conn.send_bytes(_STOP)
            except OSError:  # a worker died after the check: nobody to tear the group down with
                graceful = False
        if graceful:
            gc.collect()  # model layers of a dropped runner still referencing the group go first
            destroy_tp()
        elif dist.is_initialized():
            _abandon_group()
        for proc in self.procs:
            proc.join(JOIN_TIMEOUT_S if graceful else 0)
            if proc.is_alive():
                proc.kill()
                proc.join(JOIN_TIMEOUT_S)
        for conn in self.conns:
            conn.close()


def _abandon_group() -> None:
    """Leave the group without the other ranks (one is gone or stuck). NCCL is aborted: a rank
    waiting in a collective its peer never joins cannot be destroyed, only aborted."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if dist.get_backend() == "nccl" and abort is not None:
        abort()
    else:
        dist.destroy_process_group()  # no barrier


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, cfg: EngineConfig, init_method: str, conn: Connection) -> None:
    # Ctrl-C reaches the whole process group: rank 0 decides when the ranks stop (or dies, and the
    # pipe's end tells us), never the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.num_ranks))  # the ranks share the cores
    cfg = dataclasses.replace(cfg, device=rank_device(cfg.device, rank))
    tp: TPGroup | None = init_tp(
        rank, cfg.num_ranks, init_method, device=cfg.device, timeout_s=COLLECTIVE_TIMEOUT_S
    )
    runner: ModelRunner | None = ModelRunner.of_rank(cfg, ModelConfig.from_dir(cfg.model, cfg.dtype), tp)
    mirror = PlanDecoder()  # rank 0's sequences as far as the steps read them
    assert runner is not None
    while True:
        try:
            plan: StepPlan | KVExportPlan | KVImportPlan | None = pickle.loads(conn.recv_bytes())
        except EOFError:
            return  # rank 0 is gone without stopping us: nobody to tear the group down with
        if plan is None:
            break
        if not isinstance(plan, StepPlan):
            plan.run(runner)
            continue
        batch = mirror.decode(plan)
        runner.sample_async(runner.forward(runner.prepare(batch)), batch)
    # Drop every reference to the group so that destroy_tp tears it down, not interpreter exit.
    runner = tp = None
    gc.collect()
    destroy_tp()
