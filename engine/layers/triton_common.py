"""What the Triton kernel modules share: launch options, the rounding helper, the device guard.

``_LAUNCH``: launches pass ``enable_fp_fusion=False`` so float32 models do not get a*b+c contracted
into FMAs torch does not use; ``_rnd`` rounds a float32 value to the model dtype and back, the value
torch stores between two ops.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_LAUNCH = dict(enable_fp_fusion=False)


@triton.jit
def _rnd(x, dtype: tl.constexpr):
    """Round float32 ``x`` to ``dtype`` and back: the value torch stores between two ops."""
    return x.to(dtype).to(tl.float32)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Around a Triton launch: Triton launches on the thread's current CUDA device and its current
    stream, not on the tensors' device; this makes ``t``'s device current (a no-op off CUDA). Else an
    engine on cuda:1 stepped from a thread whose current device is cuda:0 (two engines in one
    thread: each constructor makes its own device current) runs its kernels on cuda:0's stream."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
