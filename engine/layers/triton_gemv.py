"""Batch-1 projections (decode of one sequence) as one Triton kernel each, with the layer's
elementwise work fused in (the ``triton`` ``LayerOps``' ``linear``/``norm_linear``/``norm_gate_up``).

Why: at batch 1 a decode step reads every weight once; cuBLAS's GEMV kernels read Qwen3-0.6B's
2-12 MB matrices at ~0.7-1.2 TB/s and Qwen3-8B's 32-200 MB ones at 2.0-2.5 TB/s (H100), and the
RMSNorm before a projection and the SiLU·up after ``gate_up`` are kernels of their own that cost a
few µs each whatever their size. This kernel streams ``weight`` [N, K] once, with:
- ``NORM``: the pre-norm RMSNorm of the input computed in the prologue (each program reads the few
  input rows, a few KB from L2, for the statistics), optionally after the residual add, whose sum
  program 0 writes out (``ResOut``) for the residual stream;
- ``GATED``: the packed gate/up projection: each program computes the same ``BLOCK_N`` features of
  gate and of up (rows ``n`` and ``up_offset + n``) and stores ``silu(gate) * up`` only.

How it streams: ``BLOCK_N`` rows per program, ``BLOCK_K`` columns (up to 8 KB of a row) per step
in one load, each step's products reduced at once, so a program holds few registers, many programs
share an SM and each has its whole step in flight (occupancy hides the memory latency; no
shared-memory staging). Every program loads its first weights before anything else, and,
launched as a programmatic dependent (``USE_PDL``), before waiting for the previous kernel: the
weight stream of one projection starts while the one before finishes.

Numerics follow the torch ops (``LayerOps``): the residual sum, the normalised row, the projection
and the activation are each rounded to the model dtype where torch stores them; products accumulate
in float32 (as cuBLAS does, in another order).

Where: the ``triton`` ops take it at ``M <= MAX_ROWS`` rows, any weight size, the LM head too
(measured on an H100, docs/BENCHMARKS.md: Qwen3-8B's matrices at 92-100 % of the speed of a pure
read of the same bytes, 96-100 % launched with PDL, against 79-89 % for cuBLAS plus the norm / SiLU
kernels). Tried and dropped, each no
faster: a [BN, BK] product per program reduced once at the end (the first version: many
registers, few programs per SM, 2.1-2.5 TB/s on the 8B matrices), weight tiles through ``tl.dot`` staged in shared memory, as TMA bulk copies,
a register double buffer, L2 bulk prefetches ahead of the loop (and of ``o_proj`` during
attention, from a side stream), a persistent grid.
The kernel itself takes up to ``KERNEL_MAX_ROWS`` rows. ``x`` [M, K] with unit stride along K,
``weight`` [N, K] contiguous, and never written by the kernel just before (it is loaded before
``gdc_wait``: parameters only, not a tensor computed in the step). Launch parameters are a function
of the shapes (and whether the GPU has PDL), outputs come from ``torch.empty`` and nothing reads
back to the host, so the kernel runs inside CUDA graphs.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.layers.triton_common import _LAUNCH, _rnd, on_device

# The ``triton`` ops use the GEMV up to MAX_ROWS rows; cuBLAS's GEMMs are faster from there
# (bench/gemv_bench.py, docs/BENCHMARKS.md).
MAX_ROWS = 1
KERNEL_MAX_ROWS = 16  # what the kernel takes (its accumulators grow with the rows)


@triton.jit
def _input_chunk(X, R, NW, rstd, m, kk, x_mask, stride_xm, stride_rm, dtype: tl.constexpr,
                 NORM: tl.constexpr, RESIDUAL: tl.constexpr):  # fmt: skip
    """Columns ``kk`` of the projection's input rows ``m`` as float32 [BLOCK_M, BLOCK_K]: x, or
    rms_norm(x [+ residual]) with the row statistics ``rstd`` [BLOCK_M, 1]."""
    xv = tl.load(X + m * stride_xm + kk, mask=x_mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        xv = _rnd(xv + tl.load(R + m * stride_rm + kk, mask=x_mask, other=0.0).to(tl.float32), dtype)
    if NORM:
        nw = tl.load(NW + kk + 0 * m, mask=x_mask, other=0.0).to(tl.float32)  # [BM, BK], as the mask
        xv = _rnd(nw * _rnd(xv * rstd, dtype), dtype)
    return xv


@triton.jit
def _weight_chunk(w_rows, kk, n_ok, K, EVEN: tl.constexpr):
    """Columns ``kk`` [1, BK] of the weight rows ``w_rows`` [BN, 1]: [BN, BK], zero past N and K.
    Each weight byte is read once: ``evict_first`` keeps the stream from pushing the activations
    (and the next kernel's inputs) out of L2."""
    if EVEN:
        return tl.load(w_rows + kk, eviction_policy="evict_first")
    return tl.load(w_rows + kk, mask=n_ok & (kk < K), other=0.0, eviction_policy="evict_first")


@triton.jit
def _accumulate(acc, xv, wv, BLOCK_M: tl.constexpr):
    """acc + the products of input rows x [BM, BK] and weight rows w [BN, BK], float32, reduced over
    K: acc [BN] for one input row (a 2-D product, no 3-D layout), else [BM, BN]."""
    if BLOCK_M == 1:
        out = acc + tl.sum(xv * wv.to(tl.float32), axis=1)
    else:
        out = acc + tl.sum(xv[:, None, :] * wv.to(tl.float32)[None, :, :], axis=2)
    return out


@triton.jit
def _gemv_kernel(
    X, R, NW, W, B, Out, ResOut,
    M, N, K, stride_xm, stride_rm, stride_wn, stride_om, stride_rom, up_offset, inv_k, eps,
    NORM: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N),): program p computes output features [p * BLOCK_N, +BLOCK_N) of all
    M rows. ``EVEN``: N % BLOCK_N == 0 and K % BLOCK_K == 0 (no masks on the weight loads).
    The first step's weights are loaded before anything else, before
    the norm's statistics, and with ``PDL`` (launched as a programmatic dependent: the kernel may
    start while the previous one finishes) before waiting for the previous kernel (``gdc_wait``):
    weights are never written during a step, the inputs are."""
    pid = tl.program_id(0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch as soon as we all run
    dtype = Out.dtype.element_ty
    m = tl.arange(0, BLOCK_M)[:, None]  # [BM, 1]
    m_ok = m < M
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = (n < N)[:, None]  # [BN, 1]
    k = tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
    w_rows = W + n[:, None].to(tl.int64) * stride_wn  # [BN, 1]
    u_rows = w_rows + up_offset * stride_wn  # GATED: the up half's rows
    wv = _weight_chunk(w_rows, k, n_ok, K, EVEN)  # [BN, BK] in the model dtype
    uv = wv
    if GATED:
        uv = _weight_chunk(u_rows, k, n_ok, K, EVEN)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the previous kernel's writes (x, residual) are visible from here
    rstd = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if NORM:  # pass 1: the rows' statistics (and program 0 writes the residual sum)
        ss = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k
            x_mask = m_ok & (kk < K)
            xv = _input_chunk(X, R, NW, rstd, m, kk, x_mask, stride_xm, stride_rm, dtype, False, RESIDUAL)
            if RESIDUAL:
                tl.store(ResOut + m * stride_rom + kk, xv.to(dtype), mask=x_mask & (pid == 0))
            ss += tl.sum(xv * xv, axis=1, keep_dims=True)
        rstd = tl.math.rsqrt(ss * inv_k + eps)
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = acc
    xv = _input_chunk(X, R, NW, rstd, m, k, m_ok & (k < K), stride_xm, stride_rm, dtype, NORM, RESIDUAL)
    acc = _accumulate(acc, xv, wv, BLOCK_M)
    if GATED:
        acc_up = _accumulate(acc_up, xv, uv, BLOCK_M)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # the other steps: each step's weight loads first
        kk = k0 + k
        wv = _weight_chunk(w_rows, kk, n_ok, K, EVEN)
        if GATED:
            uv = _weight_chunk(u_rows, kk, n_ok, K, EVEN)
        x_mask = m_ok & (kk < K)
        xv = _input_chunk(X, R, NW, rstd, m, kk, x_mask, stride_xm, stride_rm, dtype, NORM, RESIDUAL)
        acc = _accumulate(acc, xv, wv, BLOCK_M)
        if GATED:
            acc_up = _accumulate(acc_up, xv, uv, BLOCK_M)
    if BLOCK_M == 1:
        y, y_up = acc[None, :], acc_up[None, :]
    else:
        y, y_up = acc, acc_up
    if HAS_BIAS:
        y += tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    if GATED:  # silu(gate) * up, each rounded where torch stores it (gate_up, then F.silu)
        gate = _rnd(y, dtype)
        act = _rnd(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), dtype)
        y = act * _rnd(y_up, dtype)
    tl.store(Out + m * stride_om + n[None, :], y.to(dtype), mask=m_ok & (n < N)[None, :])


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``gemv`` runs this projection (else cuBLAS): 1..MAX_ROWS rows, layouts it reads."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.stride(1) == 1
        and weight.is_contiguous()
        and x.dtype == weight.dtype
        and x.is_cuda
    )


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    pdl: bool = False  # launch as a programmatic dependent of the previous kernel (sm_90+)


# Launch the GEMVs as programmatic dependents (``_gemv_kernel``) where the GPU has them (sm_90+):
# decode graphs at batch 1 on an H100 take 5.60 ms instead of 5.68 (Qwen3-8B), 0.96 instead of
# 1.04 (Qwen3-0.6B), bit for bit the same (docs/BENCHMARKS.md).
USE_PDL = True
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter runs no griddepcontrol


@functools.cache
def supports_pdl(device_index: int) -> bool:
    """Programmatic dependent launch (``griddepcontrol``) needs sm_90 or newer."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _pdl_on(device: torch.device) -> bool:
    """Whether the default configs launch with PDL on ``device``."""
    if not USE_PDL or device.type != "cuda" or _INTERPRET:
        return False
    return supports_pdl(torch.cuda.current_device() if device.index is None else device.index)


def gemv_config(rows: int, n: int, k: int, gated: bool, pdl: bool = False) -> GemvConfig:
    """Launch parameters from the shapes, chosen by the decode graph's step time at batch 1 on an
    H100 (Qwen3-0.6B and -8B, one projection's candidates at a time; docs/BENCHMARKS.md): up to 4096
    columns a step (8 KB of a bf16 row, one load); 2-4 rows a program for ungated matrices of more
    than 1024 rows read in one step (8-16 KB a step), else one; 8 warps for 16 KB steps and for
    rows read in several steps. More input rows take fewer columns a step, so a step's
    [rows, BN, BK] product stays at most 8k elements (16k gated)."""
    block_k = min(triton.next_power_of_2(k), 4096)
    block_n = 1 if gated or k > block_k or n <= 1024 else min(4, max(2, 4096 // block_k))
    rows_pow2 = triton.next_power_of_2(rows)
    if rows_pow2 > 1:
        block_k = min(block_k, max(64, 8192 // (rows_pow2 * block_n)))
    warps = 8 if (block_n * block_k >= 8192 and not gated) or k > block_k else 4
    return GemvConfig(block_n, block_k, warps, pdl)


class NormIn(NamedTuple):
    """The RMSNorm in front of a projection: its weight [K] and eps, and the residual [M, K] to add
    to the input first (None: the input is normalised as it is)."""

    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None


def gemv(
    x: torch.Tensor,  # [M, K], M <= KERNEL_MAX_ROWS, unit stride along K
    weight: torch.Tensor,  # [N, K] (GATED: [2 * N, K], gate rows then up rows)
    bias: torch.Tensor | None = None,  # [N]
    norm: NormIn | None = None,
    gated: bool = False,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, residual sum)``: y = F.linear(norm(x), weight, bias) [M, N] (``gated``: silu(gate) * up,
    [M, N]); the residual sum ``x + residual`` [M, K] when ``norm`` has a residual, else None."""
    rows, k = x.shape
    assert 0 < rows <= KERNEL_MAX_ROWS and x.stride(1) == 1, (
        f"gemv takes 1..{KERNEL_MAX_ROWS} rows, unit stride"
    )
    assert weight.is_contiguous() and weight.shape[1] == k and weight.dtype == x.dtype, "weight [N, K]"
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    assert not (gated and bias is not None), "the gated projection has no bias"
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    residual = norm.residual if norm is not None else None
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype
    if norm is not None:
        assert norm.weight.shape == (k,) and norm.weight.dtype == x.dtype, (
            "norm weight [K] in the model dtype"
        )
    cfg = config or gemv_config(rows, n, k, gated, _pdl_on(x.device))
    block_m = triton.next_power_of_2(rows)
    grid = triton.cdiv(n, cfg.block_n)
    placeholder = x  # pointer arguments a variant does not read
    with on_device(x):
        _gemv_kernel[(grid,)](
            x, placeholder if residual is None else residual, placeholder if norm is None else norm.weight,
            weight, placeholder if bias is None else bias, out, placeholder if res_out is None else res_out,
            rows, n, k, x.stride(0), 0 if residual is None else residual.stride(0), weight.stride(0),
            out.stride(0), 0 if res_out is None else res_out.stride(0), n, 1.0 / k,
            norm.eps if norm is not None else 0.0,
            NORM=norm is not None, RESIDUAL=residual is not None, HAS_BIAS=bias is not None, GATED=gated,
            EVEN=n % cfg.block_n == 0 and k % cfg.block_k == 0,
            BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PDL=cfg.pdl,
            num_warps=cfg.num_warps, launch_pdl=cfg.pdl, **_LAUNCH,
        )  # fmt: skip
    return out, res_out
