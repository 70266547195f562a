"""All-reduce through symmetric memory: the tensor-parallel sums without NCCL's launch path.

A symmetric buffer is allocated identically on every rank and registered once
(``torch.distributed._symmetric_memory``: ``empty`` + ``rendezvous``); each rank can then read its
peers' buffers directly over NVLink, so an all-reduce is one kernel that copies nothing through
NCCL's channels. Two algorithms, both from torch's ``symm_mem`` ops (NVLink multicast stays off,
so ``multimem_*`` is never used):

- one-shot: every rank reads every peer's whole buffer and sums. Latency-bound messages (decode).
- two-shot: reduce-scatter then all-gather through the peers' buffers; moves ``2 (n-1)/n`` of the
  message instead of ``n - 1`` copies of it, so it wins once bandwidth dominates.
  ``one_shot_max_bytes`` is the crossover; its default is a guess until ``bench/tp_check.py`` sweeps
  it on two GPUs (docs/BENCHMARKS.md, multi-GPU).

Buffers are sized once at start-up (``max_bytes`` per channel, the largest activation a captured
graph all-reduces) so nothing is allocated during graph capture; a larger message, or a dtype other
than the buffers', takes NCCL (``TPGroup.all_reduce`` checks ``fits`` on the host, no sync).
Channels are independent buffers, each with its own signal pad: two micro-batches (two-batch
overlap) reduce on channels 0 and 1 concurrently from two streams. Every rank must issue the same
channel's all-reduces in the same order, as with any collective.

``SymmetricAllReduce.create`` returns None, with the reason logged, where this cannot work: one
rank, not CUDA, the symm_mem ops missing from this torch build, or a dtype their kernels do not
take (float16: they dispatch bfloat16 and float32 only).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ONE_SHOT_MAX_BYTES = 256 << 10  # not yet measured on GPUs: see the module docstring


class SymmetricAllReduce:
    """``num_channels`` registered buffers of ``max_bytes`` each, for all-reduces of ``dtype``."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        max_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
        num_channels: int = 2,
        one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES,
    ) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.dtype, self.one_shot_max_bytes = dtype, one_shot_max_bytes
        numel = max_bytes // dtype.itemsize
        self.max_numel = numel
        self._fused_copy = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
        self._two_shot_out = hasattr(torch.ops.symm_mem, "two_shot_all_reduce_out")
        self.buffers: list[torch.Tensor] = []  # [max_numel] each, symmetric
        for _ in range(num_channels):
            buf = symm_mem.empty(numel, dtype=dtype, device=device)
            symm_mem.rendezvous(buf, group)  # collective: every rank allocates the same
            self.buffers.append(buf)

    @classmethod
    def create(
        cls,
        group: dist.ProcessGroup,
        world_size: int,
        max_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> SymmetricAllReduce | None:
        """The all-reduce for ``group`` or None where symmetric memory cannot serve it (logged).
        Collective when it returns an instance: every rank calls it with the same arguments."""
        why = None
        if world_size == 1:
            why = "one rank"
        elif device.type != "cuda":
            why = f"device {device} is not CUDA"
        elif not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
            why = "this torch build has no symm_mem all-reduce ops"
        elif dtype not in (torch.bfloat16, torch.float32):  # the ops' kernels dispatch these two only
            why = f"the symm_mem all-reduce ops do not take {dtype}"
        if why is not None:
            log.info("symmetric-memory all-reduce off (%s): NCCL all-reduce", why)
            return None
        out = cls(group, max_bytes, dtype, device)
        log.info(
            "symmetric-memory all-reduce on: %d channels x %.1f MiB (%s), one-shot up to %d KiB",
            len(out.buffers),
            max_bytes / 2**20,
            dtype,
            out.one_shot_max_bytes >> 10,
        )
        return out

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.numel() <= self.max_numel and x.is_contiguous()

    def all_reduce(self, x: torch.Tensor, channel: int = 0) -> torch.Tensor:
        """Sum ``x`` over the ranks through buffer ``channel``, in place; returns ``x``. Each op
        starts and ends with a barrier over the peers' signal pads, so the next op may overwrite
        the buffer as soon as this one returns on the stream."""
        flat = x.view(-1)  # [numel]
        buf = self.buffers[channel][: flat.numel()]  # [numel], symmetric
        ops = torch.ops.symm_mem
        if flat.numel() * flat.element_size() <= self.one_shot_max_bytes:
            if self._fused_copy:  # one kernel: copy in, barrier, sum the peers' buffers
                ops.one_shot_all_reduce_copy_out(buf, flat, "sum", self.group_name, flat)
            else:
                buf.copy_(flat)
                ops.one_shot_all_reduce_out(buf, "sum", self.group_name, flat)
        else:
            buf.copy_(flat)
            if self._two_shot_out:
                ops.two_shot_all_reduce_out(buf, "sum", self.group_name, flat)
            else:
                ops.two_shot_all_reduce_(buf, "sum", self.group_name)
                flat.copy_(buf)
        return x
