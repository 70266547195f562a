"""Fused Triton kernels for the decoder layer (the ``triton`` ``LayerOps``; contract in ``kernels.py``).

Three kernels replace ~50 small torch ops per layer:
- ``_rms_norm_kernel``, one program per row: optional residual add, float32 sum of squares, the
  normalised row rounded to the input dtype, times the weight.
- ``_silu_mul_kernel``, grid ``(tokens, column blocks)``: ``silu(gate) * up`` read from the packed
  gate/up GEMM output, written once.
- ``_qk_norm_rope_kernel``, one program per (token, q or k head): Qwen3's per-head RMSNorm, then
  rotary with cos/sin gathered from the rotary table by the device ``positions``.

Numerics follow the torch ops step by step: each value torch would store in the model dtype is
rounded to it here too (``_rnd``), and launches pass ``enable_fp_fusion=False`` so float32 models do
not get a*b+c contracted into FMAs torch does not use. What remains different is the float32 sum
order of the norms' reductions.

Graph safety: outputs come from ``torch.empty`` (the graph pool inside a capture), grids from shapes,
positions and weights are read on the device; nothing syncs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.layers import triton_gemv
from engine.layers.kernels import LayerOps
from engine.layers.triton_common import _LAUNCH, _rnd, on_device


@triton.jit
def _rms_norm_kernel(
    X, R, W, Out, ResOut,
    stride_x, stride_r, stride_o, stride_ro,
    n_cols, inv_n, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = _rnd(x + r, ResOut.dtype.element_ty)  # the norm reads the sum as stored
        tl.store(ResOut + row * stride_ro + cols, x.to(ResOut.dtype.element_ty), mask=mask)
    var = tl.sum(x * x, axis=0) * inv_n
    y = _rnd(x * tl.math.rsqrt(var + eps), X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (w * y).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(GateUp, Out, stride_g, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = Out.dtype.element_ty
    gate = tl.load(GateUp + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_g + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = _rnd(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), dtype)  # F.silu, stored in dtype
    tl.store(Out + row * stride_o + cols, (act * up).to(dtype), mask=mask)


@triton.jit
def _norm_rope_heads(
    X, stride_xh, Out, Cache, W, cos1, cos2, sin1, sin2, h, d, mask, eps,
    HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr, STORE: tl.constexpr,
):  # fmt: skip
    """All heads of one token as a [heads, half] tile: ``X + h * stride_xh`` holds head h, as halves
    x1, x2 (``d`` indexes a half). cos/sin [1, half] already in dtype. The result goes to ``Out``
    (heads contiguous) and, with ``STORE``, to ``Cache`` (the token's KV-cache slot, same layout)."""
    dtype = Out.dtype.element_ty
    half = HEAD_DIM // 2
    rows = X + h * stride_xh + d
    x1 = tl.load(rows, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(rows + half, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) * (1.0 / HEAD_DIM)  # [heads]
        rstd = tl.math.rsqrt(var + eps)[:, None]
        w1 = tl.load(W + d, mask=d < half, other=0.0).to(tl.float32)  # [1, half]
        w2 = tl.load(W + half + d, mask=d < half, other=0.0).to(tl.float32)
        x1 = _rnd(w1 * _rnd(x1 * rstd, dtype), dtype)
        x2 = _rnd(w2 * _rnd(x2 * rstd, dtype), dtype)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); every product rounded like torch's
    out1 = (_rnd(x1 * cos1, dtype) + _rnd(-x2 * sin1, dtype)).to(dtype)
    out2 = (_rnd(x2 * cos2, dtype) + _rnd(x1 * sin2, dtype)).to(dtype)
    dst = h * HEAD_DIM + d
    tl.store(Out + dst, out1, mask=mask)
    tl.store(Out + half + dst, out2, mask=mask)
    if STORE:
        tl.store(Cache + dst, out1, mask=mask)
        tl.store(Cache + half + dst, out2, mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    Q, K, V, QOut, KOut, KCache, VCache, Slots, QW, KW, Positions, Cos, Sin,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    eps,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr, STORE_KV: tl.constexpr,
):  # fmt: skip
    """Grid (tokens, 2 [+ 1 with STORE_KV]): program (t, 0) rotates every q head of token t, (t, 1)
    every k head (and with STORE_KV writes them to the token's cache slot), (t, 2) copies the v heads
    into the slot. The caches are [num_slots, NUM_KV_HEADS, HEAD_DIM] contiguous."""
    t = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    dtype = QOut.dtype.element_ty
    half = HEAD_DIM // 2
    d = tl.arange(0, BLOCK_HALF)[None, :]  # [1, half]
    in_half = d < half
    table = tl.load(Positions + t).to(tl.int64) * stride_cos
    cos1 = _rnd(tl.load(Cos + table + d, mask=in_half, other=0.0), dtype)  # cos_cache[pos].to(dtype)
    cos2 = _rnd(tl.load(Cos + table + half + d, mask=in_half, other=0.0), dtype)
    sin1 = _rnd(tl.load(Sin + table + d, mask=in_half, other=0.0), dtype)
    sin2 = _rnd(tl.load(Sin + table + half + d, mask=in_half, other=0.0), dtype)
    # (Triton needs a name to keep one type across branches: each branch has its own names.)
    if part == 2:  # STORE_KV only: the v heads, copied
        hv = tl.arange(0, BLOCK_KV)[:, None]
        v_mask = (hv < NUM_KV_HEADS) & in_half
        v_dst = VCache + tl.load(Slots + t).to(tl.int64) * NUM_KV_HEADS * HEAD_DIM + hv * HEAD_DIM + d
        v_src = V + t * stride_vt + hv * stride_vh + d
        tl.store(v_dst, tl.load(v_src, mask=v_mask), mask=v_mask)
        tl.store(v_dst + half, tl.load(v_src + half, mask=v_mask), mask=v_mask)
    elif part == 0:
        hq = tl.arange(0, BLOCK_Q)[:, None]
        _norm_rope_heads(
            Q + t * stride_qt, stride_qh, QOut + t * NUM_Q_HEADS * HEAD_DIM, QOut, QW,
            cos1, cos2, sin1, sin2, hq, d, (hq < NUM_Q_HEADS) & in_half, eps, HEAD_DIM, HAS_NORM, False,
        )  # fmt: skip
    else:
        hk = tl.arange(0, BLOCK_KV)[:, None]
        k_cache = KCache
        if STORE_KV:
            k_cache = KCache + tl.load(Slots + t).to(tl.int64) * NUM_KV_HEADS * HEAD_DIM
        _norm_rope_heads(
            K + t * stride_kt, stride_kh, KOut + t * NUM_KV_HEADS * HEAD_DIM, k_cache, KW,
            cos1, cos2, sin1, sin2, hk, d, (hk < NUM_KV_HEADS) & in_half, eps, HEAD_DIM, HAS_NORM, STORE_KV,
        )  # fmt: skip


def _row_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _rows(x: torch.Tensor) -> torch.Tensor:
    assert x.stride(-1) == 1, "the last dim must be contiguous"
    return x.reshape(-1, x.shape[-1])  # [rows, dim]; a view for the layer's activations


def rms_norm(
    x: torch.Tensor,  # [..., dim]
    weight: torch.Tensor,  # [dim]
    eps: float,
    residual: torch.Tensor | None = None,  # like x
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rms_norm(x [+ residual]), x + residual or None)`` in one kernel; the torch ops' dtypes."""
    x2 = _rows(x)
    rows, dim = x2.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    out2 = out.view(rows, dim)
    r2, res_out, res_out2 = x2, None, x2
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
        r2 = _rows(residual)
        res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        res_out2 = res_out.view(rows, dim)
    block = triton.next_power_of_2(dim)
    with on_device(x):
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out2, res_out2,
            x2.stride(0), r2.stride(0), out2.stride(0), res_out2.stride(0),
            dim, 1.0 / dim, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_row_warps(block), **_LAUNCH,
        )  # fmt: skip
    return out, res_out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    g2 = _rows(gate_up)  # [T, 2 * inter]
    rows, width = g2.shape
    assert width % 2 == 0, "gate_up holds gate and up halves"
    inter = width // 2
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    grid = (rows, triton.cdiv(inter, block))
    with on_device(gate_up):
        _silu_mul_kernel[grid](g2, out.view(rows, inter), g2.stride(0), inter, inter, BLOCK=block, **_LAUNCH)
    return out


def qk_norm_rope(
    positions: torch.Tensor,  # [T] int
    q: torch.Tensor,  # [T, num_heads, head_dim], last dim contiguous (e.g. a view of the qkv output)
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    cos_cache: torch.Tensor,  # [max_positions, head_dim] float32
    sin_cache: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    kv_store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns new contiguous q [T, num_heads, head_dim] and k [T, num_kv_heads, head_dim].
    ``kv_store`` = (v [T, num_kv_heads, head_dim], k_cache, v_cache [num_slots, num_kv_heads,
    head_dim] contiguous, slots [T]): the rotated k and v are also written into the caches at
    ``slots``, in the same launch."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.dtype == q.dtype and k.shape[2] == head_dim and head_dim % 2 == 0, "q/k heads must match"
    assert q.stride(2) == 1 and k.stride(2) == 1, "head_dim must be contiguous"
    assert cos_cache.stride() == sin_cache.stride() and cos_cache.stride(1) == 1, "cos/sin table layout"
    has_norm = q_weight is not None and k_weight is not None
    if q_weight is not None and k_weight is not None:
        assert q_weight.dtype == q.dtype and k_weight.dtype == q.dtype, "norm weights in the model dtype"
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(num_tokens, num_kv_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out, k_out
    v, k_cache, v_cache, slots = kv_store if kv_store is not None else (k, k_out, k_out, positions)
    if kv_store is not None:
        assert v.shape == k.shape and v.stride(2) == 1, "v must be shaped like k"
        for cache in (k_cache, v_cache):
            assert cache.is_contiguous() and cache.shape[1:] == k.shape[1:] and cache.dtype == k.dtype
    grid = (num_tokens, 3 if kv_store is not None else 2)
    with on_device(q):
        _qk_norm_rope_kernel[grid](
            q, k, v, q_out, k_out, k_cache, v_cache, slots, q_weight if has_norm else q,
            k_weight if has_norm else k, positions, cos_cache, sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_cache.stride(0),
            eps,
            NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            BLOCK_Q=triton.next_power_of_2(num_heads), BLOCK_KV=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2), HAS_NORM=has_norm, STORE_KV=kv_store is not None,
            num_warps=4 if num_heads * head_dim >= 2048 else 2, **_LAUNCH,
        )  # fmt: skip
    return q_out, k_out


class TritonOps(LayerOps):
    """``LayerOps`` on the fused kernels above (CUDA; also runs under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)[0]

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, summed = rms_norm(x, weight, eps, residual)
        assert summed is not None
        return out, summed

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)

    # Projections: one GEMV kernel with its norm / activation at one row, cuBLAS otherwise.
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if triton_gemv.takes(x, weight):
            return triton_gemv.gemv(x, weight, bias)[0]
        return super().linear(x, weight, bias)

    def norm_project(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gated: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if triton_gemv.takes(x, weight):
            norm = triton_gemv.NormIn(norm_weight, eps, residual)
            y, summed = triton_gemv.gemv(x, weight, bias, norm, gated)
            return y, x if summed is None else summed
        return super().norm_project(x, residual, norm_weight, eps, weight, bias, gated)

    def qk_norm_rope(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_cache: torch.Tensor,
        sin_cache: torch.Tensor,
        q_weight: torch.Tensor | None,
        k_weight: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return qk_norm_rope(positions, q, k, cos_cache, sin_cache, q_weight, k_weight, eps)

    def qk_norm_rope_store(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos_cache: torch.Tensor,
        sin_cache: torch.Tensor,
        q_weight: torch.Tensor | None,
        k_weight: torch.Tensor | None,
        eps: float,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return qk_norm_rope(
            positions, q, k, cos_cache, sin_cache, q_weight, k_weight, eps, (v, k_cache, v_cache, slots)
        )
