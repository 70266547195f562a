"""Batch-1 projections (decode of one sequence) as one Triton kernel each, with the layer's
elementwise work fused in (the ``triton`` ``LayerOps``' ``linear``/``norm_linear``/``norm_gate_up``).

Why: at batch 1 a decode step reads every weight once; cuBLAS's GEMV kernels read a 4–12 MB matrix
at ~1.4 TB/s (Qwen3-0.6B, H100) and a split-K one adds a reduce kernel, and the RMSNorm before a
projection and the SiLU·up after ``gate_up`` are kernels of their own that cost a few µs each
whatever their size. This kernel streams ``weight`` [N, K] once, ``BLOCK_N`` rows per program and
many programs per SM (occupancy hides the memory latency; no shared-memory staging), with:
- ``NORM``: the pre-norm RMSNorm of the input computed in the prologue (each program reads the few
  input rows, a few KB from L2, for the statistics), optionally after the residual add, whose sum
  program 0 writes out (``ResOut``) for the residual stream;
- ``GATED``: the packed gate/up projection: each program computes the same ``BLOCK_N`` features of
  gate and of up (rows ``n`` and ``up_offset + n``) and stores ``silu(gate) * up`` only.

Numerics follow the torch ops (``LayerOps``): the residual sum, the normalised row, the projection
and the activation are each rounded to the model dtype where torch stores them; products accumulate
in float32 (as cuBLAS does, in another order).

Where: the ``triton`` ops take it at ``M <= MAX_ROWS`` rows and weights up to ``MAX_WEIGHT_BYTES``
(measured on an H100: 1.2-1.5x cuBLAS plus the separate norm / SiLU kernels on Qwen3-0.6B's
matrices at one row; slower than cuBLAS's GEMMs from 2 rows, and no faster than its GEMV on
Qwen3-8B's 50-200 MB matrices, which it reads at ~2.1-2.5 TB/s where a pure read of the same
bytes reaches 2.6-3.0). Tried on those and dropped, each no faster (docs/BENCHMARKS.md): weight
tiles through ``tl.dot`` staged in shared memory, as TMA bulk copies, an L2 bulk prefetch ahead of
the loop, programmatic dependent launch, a persistent grid.
The kernel itself takes up to ``KERNEL_MAX_ROWS`` rows. ``x`` [M, K] with unit stride along K,
``weight`` [N, K] contiguous. Launch parameters are a
function of the shapes only, outputs come from ``torch.empty`` and nothing reads back to the host,
so the kernel runs inside CUDA graphs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.layers.triton_common import _LAUNCH, _rnd, on_device

# The ``triton`` ops use the GEMV for one row and weights up to MAX_WEIGHT_BYTES; cuBLAS's GEMMs are
# faster at 2+ rows and its GEMV as fast on larger matrices (bench/gemv_bench.py, docs/BENCHMARKS.md).
MAX_ROWS = 1
MAX_WEIGHT_BYTES = 32 << 20
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
        nw = tl.load(NW + kk, mask=x_mask, other=0.0).to(tl.float32)
        xv = _rnd(nw * _rnd(xv * rstd, dtype), dtype)
    return xv


@triton.jit
def _weight_chunk(w_rows, kk, n_ok, K, EVEN: tl.constexpr):
    """Columns ``kk`` [1, BK] of the weight rows ``w_rows`` [BN, 1]: [BN, BK], zero past N and K."""
    if EVEN:
        return tl.load(w_rows + kk)
    return tl.load(w_rows + kk, mask=n_ok & (kk < K), other=0.0)


@triton.jit
def _gemv_kernel(
    X, R, NW, W, B, Out, ResOut,
    M, N, K, stride_xm, stride_rm, stride_wn, stride_om, stride_rom, up_offset, inv_k, eps,
    NORM: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N),): program p computes output features [p * BLOCK_N, +BLOCK_N) of all
    M rows. ``EVEN``: N % BLOCK_N == 0 and K % BLOCK_K == 0 (no masks on the weight loads)."""
    pid = tl.program_id(0)
    dtype = Out.dtype.element_ty
    m = tl.arange(0, BLOCK_M)[:, None]  # [BM, 1]
    m_ok = m < M
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = (n < N)[:, None]  # [BN, 1]
    k = tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
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
    w_rows = W + n[:, None].to(tl.int64) * stride_wn  # [BN, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)  # elementwise products
    acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + k
        x_mask = m_ok & (kk < K)
        xv = _input_chunk(X, R, NW, rstd, m, kk, x_mask, stride_xm, stride_rm, dtype, NORM, RESIDUAL)
        wv = _weight_chunk(w_rows, kk, n_ok, K, EVEN)  # [BN, BK] in the model dtype
        acc += xv[:, None, :] * wv.to(tl.float32)[None, :, :]
        if GATED:
            uv = _weight_chunk(w_rows + up_offset * stride_wn, kk, n_ok, K, EVEN)
            acc_up += xv[:, None, :] * uv.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)  # [BM, BN]
    y_up = tl.sum(acc_up, axis=2)
    if HAS_BIAS:
        y += tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    if GATED:  # silu(gate) * up, each rounded where torch stores it (gate_up, then F.silu)
        gate = _rnd(y, dtype)
        act = _rnd(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), dtype)
        y = act * _rnd(y_up, dtype)
    tl.store(Out + m * stride_om + n[None, :], y.to(dtype), mask=m_ok & (n < N)[None, :])


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``gemv`` runs this projection (else cuBLAS): 1..MAX_ROWS rows, a weight of at most
    MAX_WEIGHT_BYTES, layouts it reads."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and weight.numel() * weight.element_size() <= MAX_WEIGHT_BYTES
        and x.stride(1) == 1
        and weight.is_contiguous()
        and x.dtype == weight.dtype
        and x.is_cuda
    )


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int


def gemv_config(rows: int, n: int, k: int, gated: bool) -> GemvConfig:
    """Launch parameters from the shapes: the best of ``bench/gemv_bench.py --sweep`` on an H100 at
    one row (docs/BENCHMARKS.md): ~1000-2000 programs reading a few KB each per loop step; fewer K
    columns per step where rows (and the gated second accumulator) add registers."""
    block_n = 1 if n <= 1024 else 4 if k >= 4096 else 2
    block_k = min(
        triton.next_power_of_2(k), max(64, (512 if gated else 1024) // triton.next_power_of_2(rows))
    )
    return GemvConfig(block_n, block_k, 2 if block_n * block_k <= 2048 else 4)


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
    cfg = config or gemv_config(rows, n, k, gated)
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
            BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, **_LAUNCH,
        )  # fmt: skip
    return out, res_out
