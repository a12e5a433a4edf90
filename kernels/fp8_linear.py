"""`torch.ops.dsv3.fp8_linear`: y = x @ W^T with W in DeepSeek's FP8 block format (W8A8).

Contract
- x: [..., K], bfloat16/float16/float32. weight: [N, K] float8_e4m3fn. weight_scale_inv: [ceil(N/128), ceil(K/128)]
  float32 (the checkpoint tensor of that name; partial edge blocks allowed, e.g. N=576 or K=10944).
- Activations are quantized per token per 128 channels (`dsv3.kernels.fp8_blocks.quantize_activation`), then
  y[m, n] = sum_kb (sum_{k in kb} xq[m,k] * wq[n,k]) * xs[m,kb] * ws[n//128, kb], accumulated in fp32.
- Returns [..., N] in x.dtype.

Implementations (one op; the branch is taken at trace time from the device and the static shapes)
- CPU: `fp8_linear_reference` (plain torch; Inductor fuses it when the model is compiled on CPU).
- CUDA, M = prod(x.shape[:-1]) statically <= 64 (decode): `fp8_gemv`, one of its variants, chosen at trace time
  by `gemv_choice(m, n, k, sms)` (GEMV_TUNED, measured on the H200; `gemv_default`'s shape classes for shapes it
  does not list) or pinned by `DSV3_GEMV_VARIANT=splitk|splitk_fused|cc|cc_prequant|nosplit|fused_nosplit|rows|
  rows_prequant[:BLOCK_N:WARPS:STAGES]`, or given a
  measured table by `DSV3_GEMV_TABLE=sweep_gemv.json` (scripts/sweep_gemv.py's output; read at trace time, for
  building artifacts with a table measured on the build GPU before it is pasted into GEMV_TUNED). Every variant quantizes x
  exactly as `quantize_activation` (amax/448 with the 1e-4 floor, correctly rounded division, RTNE cast), either
  once in `_act_quant_kernel` or inside each GEMV program on the [M, 128] x block it is about to use, both with
  `quantize_tile_rcp` (one division per row, an FMA-corrected product per element: the e4m3 values and scales of
  `quantize_tile`'s per-element division),
  and accumulates every 128-wide K block's exact e4m3 products in fp32 times xs * ws.
  - 'splitk' (3 launches): `_act_quant_kernel`, then `_fp8_gemv_kernel`, a split-K "swap-AB" GEMV: each program
    owns BLOCK_N = 64 weight rows and a range of 128-wide K blocks, streams its weight tiles once (5-stage cp.async
    pipeline) and accumulates `tl.dot(w_tile, xq_tile^T)` (FP8 MMA, tokens padded to 16) times the two scales per
    K block in fp32. About one program per SM (`gemv_plan`); with more than one split the fp32 partials go through
    `_splitk_reduce_kernel`. `fused=True` (tests, sweeps) quantizes x inside every GEMV program instead.
  - 'splitk_fused' (2 launches, 1 without splits): 'splitk' with x quantized inside every GEMV program.
  - 'nosplit' (2 launches): `_act_quant_kernel`, then `_fp8_gemv_kernel` with one split (whole K per program) and
    a small BLOCK_N (16-32) so that N / BLOCK_N programs fill the GPU; no partials, no reduce.
  - 'fused_nosplit' (1 launch): the same with x quantized inside every program.
  - 'cc' (1 launch): `_fp8_gemv_cc_kernel`, CUDA cores, no tensor cores: each program owns BLOCK_N (8-64) weight
    rows and the whole K, quantizes each [M, 128] x block itself, widens the e4m3 weight tile to fp32 and reduces
    `w * xq` over the block (exact products, fp32 sums). For M <= 8 per program (grid axis 1 chunks larger M).
  - 'cc_prequant' (2 launches): `_act_quant_kernel`, then the same kernel on the e4m3 activations.
  - 'rows' (1 launch): `_fp8_gemv_rows_kernel`, CUDA cores, for one or a few tokens: each program owns BLOCK_N
    (1-8) weight rows and loads them over the whole K in one [BLOCK_N, KB, 128] tile (K padded to a power of two
    of 128-blocks), so all its weight bytes are in flight at once and thousands of small programs cover the memory
    latency; x quantized inside each program; tokens M_TILE (<= 4) per program along grid axis 1. The serial-K
    kernels above leave each program a chain of dependent K steps, which at M = 1 ran at 0.5-1.6 TB/s; 'rows' was
    1.1-2.0x faster on every 16B and 671B-tp8 shape measured (H200, 2026-11-23, scripts/bench_rows.py).
  - 'rows_prequant' (2 launches): `_act_quant_kernel`, then the same kernel on the e4m3 activations.
- CUDA, larger or dynamic M (prefill): `_act_quant_kernel` then either `F.scaled_mm` with
  BlockWise1x128/BlockWise128x128 (cuBLAS; sm_90, torch >= 2.11, bf16 output, K % 128 == 0, N % 128 == 0; M padded to
  a multiple of 4, weight scales zero-padded to round_up(K/128, 4) columns) or the tiled Triton GEMM `_fp8_gemm_kernel`.
  `DSV3_FP8_GEMM=triton|scaled_mm|gemv` (read at trace time) pins a path, for benchmarks and tests.

`torch.ops.dsv3.fp8_linear_a16` (end of this file): the same product without the activation quantization (W8A16),
the row-parallel kernel with ACT16 at <= 16 tokens; the model's one-token steps use it by default in compiled
artifacts (bf16 batch-1 activations, docs/KERNELS.md).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import capability, cdiv, env_choice, env_switch, next_pow2, num_sms, static_int
from dsv3.kernels.fp8_blocks import (
    ACT_AMAX_FLOOR,
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
)

# torch >= 2.11 on CUDA: the v2 scaled-mm API with explicit block-scaling recipes (guarded: torch 2.13 CPU imports
# this module too, and older builds lack it).
_HAS_SCALED_MM = hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")
GEMV_MAX_M = 64
# Rows per program of the activation-quantization kernels past decode sizes (`act_quant_launch`): act_quant of a
# [M, 2048] x in cuBLAS's layout 10.1 -> 8.0 us at M 4096, 6.5 -> 5.4 at 2048 (with one division per block; H200,
# scripts/ab_act_quant.py, 2026-11-26); silu_mul_quant reads two inputs and is best at 2 rows (its own rule)
ACT_QUANT_ROWS = 4


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: quantize activations exactly as the kernels do, dequantize both sides, fp32 GEMM."""
    xq, xs = quantize_activation(x)
    w = dequantize_weight(weight, weight_scale_inv)
    return (dequantize_activation(xq, xs) @ w.t()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def quantize_tile(x, AXIS: tl.constexpr):
    """fp32 tile (zero-padded past K) -> (e4m3 tile, fp32 scales), exactly `quantize_activation`: AXIS=1 for
    [R, 128] (one scale per row), AXIS=0 for [128, C] (one per column)."""
    amax = tl.max(tl.abs(x), axis=AXIS)
    scale = tl.div_rn(tl.maximum(amax, 1e-4), 448.0)
    q = tl.div_rn(x, tl.expand_dims(scale, AXIS))
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    return q.to(tl.float8e4nv), scale


@triton.jit
def quantize_tile_rcp(x):
    """`quantize_tile` with one division per row instead of one per element, for kernels that quantize x inside
    every program (a per-element `div_rn` is a branch to a slow path each: 16 of them serialized per thread made the
    CUDA-core GEMV ~1 us per K block). x / scale is computed as q0 = x * r with r = RN(1 / scale), then one FMA
    residual correction q = q0 + (x - q0 * scale) * r (Markstein): the correctly rounded quotient whenever the
    residual does not underflow, i.e. |x| > ~2^-100. Below that x / scale < 2^-78 and both paths give e4m3 zero,
    so the e4m3 values agree with `quantize_activation` (up to the sign of a zero) and the scales bit for bit."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.div_rn(tl.maximum(amax, 1e-4), 448.0)
    r = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)[:, None]
    q0 = x * r
    q = tl.fma(tl.fma(-q0, scale[:, None], x), r, q0)
    q = tl.where(x == 0.0, x, q)
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    return q.to(tl.float8e4nv), scale


@triton.jit
def pick_scale(vals, offs, kb):
    """Element kb of a scale vector preloaded before a K loop (`offs` its indices): exact (one term, zeros else).

    Why preload: Triton software-pipelines the tile loads that feed tl.dot (cp.async, NUM_STAGES - 1 in flight) but
    not the small scale loads next to them (a scalar, or one value per token): inside the loop each of those is a
    synchronous global load whose latency (~0.5-1 us) every K iteration waits out before it can scale its dot
    (seen in the sm_90 TTGIR: `tt.load` of the scales after `async_wait`). A program's scales are a few hundred
    bytes, so they are loaded once, before the loop, and picked out of registers here."""
    return tl.sum(tl.where(offs == kb, vals, 0.0), axis=0)


@triton.jit
def pick_scales(vals, offs, kb):
    """Column kb of a [R, KB] scale matrix preloaded before a K loop -> [R] (see `pick_scale`)."""
    return tl.sum(tl.where(offs[None, :] == kb, vals, 0.0), axis=1)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr,
    M, N, K, KB_PER_SPLIT,
    stride_xm, stride_xsm, stride_wn, stride_wsn, stride_wsk, stride_os, stride_om,
    PREQUANT: tl.constexpr,  # x is already e4m3 with scales xs [M, ceil(K/128)] (tests; the interpreter)
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[split, m, n] (+)= sum over this split's K blocks; acc is [BLOCK_N weight rows, BLOCK_T tokens]."""
    BLOCK_K: tl.constexpr = 128
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    t_mask = offs_t < M
    kb_total = tl.cdiv(K, BLOCK_K)
    kb0 = pid_s * KB_PER_SPLIT
    kb1 = tl.minimum(kb0 + KB_PER_SPLIT, kb_total)
    # BLOCK_N divides 128, so all rows of this program share one row of weight scales.
    ws_row = ws_ptr + ((pid_n * BLOCK_N) // 128) * stride_wsn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_t[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for kb in range(kb0, kb1):
        k_mask = (kb * BLOCK_K + offs_k) < K
        w = tl.load(w_ptrs + kb * BLOCK_K, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if PREQUANT:
            xq = tl.load(x_ptrs + kb * BLOCK_K, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            xs = tl.load(xs_ptr + offs_t * stride_xsm + kb, mask=t_mask, other=1.0)
        else:
            xv = tl.load(x_ptrs + kb * BLOCK_K, mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            xq, xs = quantize_tile_rcp(xv.to(tl.float32))
        ws = tl.load(ws_row + kb * stride_wsk)
        acc += tl.dot(w, tl.trans(xq)) * (xs[None, :] * ws)
    o_ptrs = out_ptr + pid_s * stride_os + offs_t[None, :] * stride_om + offs_n[:, None]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & t_mask[None, :])


@triton.jit
def _fp8_gemv_cc_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xsm, stride_wn, stride_wsn, stride_wsk, stride_om,
    PREQUANT: tl.constexpr,  # x is already e4m3 with scales xs [M, ceil(K/128)] (tests; the interpreter)
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, X_ROWS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """out[m, n] for BLOCK_N weight rows x BLOCK_T tokens over the whole K, on CUDA cores (no tl.dot).

    Per 128-wide K block: quantize the x block of this program's tokens (`quantize_tile`, exact), widen the e4m3
    weight tile to fp32 (exact), and per token reduce the products (exact in fp32) over the block and add them times
    xs * ws to that token's fp32 column of the accumulator.

    Code-generation notes (Triton 3.9, sm_90; from the PTX, not from timings):
    - `tl.range(num_stages=...)`: a loop without tl.dot is not software-pipelined by the launch option alone; with
      it the weight (and x) tiles stream through cp.async buffers, NUM_STAGES - 1 tiles in flight per program.
    - the x tile is loaded and quantized before the weight tile, and has X_ROWS >= BLOCK_T rows (the extra ones
      masked: no memory traffic) so that each thread loads >= 4 bytes of it and it is pipelined too. Otherwise
      Triton reads the weight tile out of shared memory in the x tile's one-element-per-thread layout and the
      per-row sums over K become ~8x more shuffles and cross-warp reductions.
    - tokens are a static loop of [BLOCK_N, 128] x [128] products (each token's row picked out of the quantized
      tile by a masked sum, exact); a [BLOCK_N, BLOCK_T, 128] broadcast got a layout with K spread over all
      threads."""
    BLOCK_K: tl.constexpr = 128
    pid_n = tl.program_id(0)
    t0 = tl.program_id(1) * BLOCK_T
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, X_ROWS)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    r_mask = (offs_r < BLOCK_T) & (t0 + offs_r < M)
    # BLOCK_N divides 128, so all rows of this program share one row of weight scales.
    ws_row = ws_ptr + ((pid_n * BLOCK_N) // 128) * stride_wsn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + (t0 + offs_r)[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for kb in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
        k_mask = (kb * BLOCK_K + offs_k) < K
        if PREQUANT:
            xq = tl.load(x_ptrs + kb * BLOCK_K, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            xs = tl.load(xs_ptr + (t0 + offs_r) * stride_xsm + kb, mask=r_mask, other=1.0)
        else:
            xv = tl.load(x_ptrs + kb * BLOCK_K, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            xq, xs = quantize_tile_rcp(xv.to(tl.float32))
        xq = xq.to(tl.float32)
        w = tl.load(w_ptrs + kb * BLOCK_K, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        ws = tl.load(ws_row + kb * stride_wsk)
        for t in tl.static_range(BLOCK_T):
            sel = offs_r == t
            x_t = tl.sum(tl.where(sel[:, None], xq, 0.0), axis=0)  # [128]: row t (the others add zeros)
            s_t = tl.sum(tl.where(sel, xs, 0.0), axis=0) * ws
            part = tl.sum(w * x_t[None, :], axis=1)  # [BLOCK_N], products exact, fp32 sums
            acc = tl.where((offs_t == t)[None, :], acc + (part * s_t)[:, None], acc)
    offs_m = t0 + offs_t
    o_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & (offs_m < M)[None, :])


@triton.jit
def k_blocks(K, KB_PAD: tl.constexpr):
    """A whole K as [KB_PAD, 128] (128-wide scale blocks, padded to a power of two): block indices [KB_PAD], element
    offsets [KB_PAD, 128], their masks. The row-parallel kernels load a weight row over all of K with these."""
    offs_b = tl.arange(0, KB_PAD)
    offs_k = offs_b[:, None] * 128 + tl.arange(0, 128)[None, :]
    return offs_b, offs_k, offs_k < K, offs_b < tl.cdiv(K, 128)


@triton.jit
def load_weight_rows(w_ptr, ws_ptr, offs_n, n_mask, offs_b, offs_k, k_mask, kb_mask, stride_wn, stride_wsn):
    """Weight rows offs_n over the whole K as ([BLOCK_N, KB, 128] fp32 e4m3 values, [BLOCK_N, KB] block scales),
    in one load each (the row-parallel kernels' tile; `k_blocks` gives the K layout)."""
    w = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + offs_k[None, :, :],
                mask=n_mask[:, None, None] & k_mask[None, :, :], other=0.0).to(tl.float32)
    ws = tl.load(ws_ptr + (offs_n // 128)[:, None] * stride_wsn + offs_b[None, :],
                 mask=n_mask[:, None] & kb_mask[None, :], other=0.0)
    return w, ws


@triton.jit
def dot_rows(w, ws, xq, xs):
    """w [BN, KB, 128] fp32 (e4m3 values), ws [BN, KB] their block scales, xq [KB, 128] fp32 (one token's e4m3
    values), xs [KB] -> [BN] fp32: per 128-block sums of exact products, times both scales, summed."""
    part = tl.sum(w * xq[None, :, :], axis=2)
    return tl.sum(part * (ws * xs[None, :]), axis=1)


@triton.jit
def load_x_row(x_ptr, xs_ptr, offs_k, k_mask, offs_b, kb_mask, QUANT_X: tl.constexpr):
    """One token as (e4m3 values in fp32 [KB, 128], scales [KB]): quantized here (`quantize_tile_rcp`, exact) from
    x in its activation dtype, or loaded already quantized."""
    if QUANT_X:
        xq, xs = quantize_tile_rcp(tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32))
        return xq.to(tl.float32), xs
    else:
        xq = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        xs = tl.load(xs_ptr + offs_b, mask=kb_mask, other=0.0)
        return xq, xs


@triton.jit
def load_x_act(x_ptr, offs_k, k_mask, offs_b):
    """One token in its activation dtype, not quantized (W8A16: `fp8_linear_a16`), as (fp32 [KB, 128], ones [KB]):
    the pair `dot_rows` takes, with unit activation scales."""
    x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    return x, tl.full(offs_b.shape, 1.0, tl.float32)


@triton.jit
def _fp8_gemv_rows_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr,
    M, N, K, stride_xm, stride_xsm, stride_wn, stride_wsn, stride_om,
    QUANT_X: tl.constexpr, ACT16: tl.constexpr, BLOCK_N: tl.constexpr, M_TILE: tl.constexpr,
    KB_PAD: tl.constexpr,
):
    """out[m, n] for BLOCK_N weight rows over the whole K (padded to KB_PAD 128-blocks) in ONE load, and the
    M_TILE tokens of grid column 1 (a static loop): every weight byte of the program is in flight at once.
    ACT16: x is used in its dtype (W8A16, `fp8_linear_a16`; xs_ptr and QUANT_X unused)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t0 = tl.program_id(1) * M_TILE
    n_mask = offs_n < N
    offs_b, offs_k, k_mask, kb_mask = k_blocks(K, KB_PAD)
    w, ws = load_weight_rows(w_ptr, ws_ptr, offs_n, n_mask, offs_b, offs_k, k_mask, kb_mask, stride_wn, stride_wsn)
    for j in tl.static_range(M_TILE):
        t = t0 + j
        if t < M:
            if ACT16:
                xq, xs = load_x_act(x_ptr + t * stride_xm, offs_k, k_mask, offs_b)
            else:
                xq, xs = load_x_row(x_ptr + t * stride_xm, xs_ptr + t * stride_xsm, offs_k, k_mask, offs_b, kb_mask,
                                    QUANT_X)
            y = dot_rows(w, ws, xq, xs)
            tl.store(out_ptr + t * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, out_ptr, NUMEL, SPLITS, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, MP, K, KP, stride_xm, stride_qm, stride_sm, stride_sk,
    ROWS: tl.constexpr, BLOCKS: tl.constexpr,
):
    """ROWS rows x BLOCKS 128-wide blocks per program, written up to MP >= M rows and KP >= K columns. Rows >= M and
    columns >= K are quantized zeros (padding for cuBLAS: e4m3 0 with the floor scale, contributing nothing to a
    product). One division per block, not per element (`quantize_tile_rcp`: the same e4m3 values and scales as
    `quantize_tile`; per-element IEEE divisions made this kernel ALU-bound at prefill sizes)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kb = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    cols = kb[:, None] * 128 + tl.arange(0, 128)[None, :]  # [BLOCKS, 128]
    r64 = rows.to(tl.int64)[:, None, None]
    x = tl.load(x_ptr + r64 * stride_xm + cols[None, :, :], mask=(rows < M)[:, None, None] & (cols < K)[None, :, :],
                other=0.0).to(tl.float32)
    q, s = quantize_tile_rcp(tl.reshape(x, (ROWS * BLOCKS, 128)))
    tl.store(q_ptr + r64 * stride_qm + cols[None, :, :], tl.reshape(q, (ROWS, BLOCKS, 128)),
             mask=(rows < MP)[:, None, None] & (cols < KP)[None, :, :])
    tl.store(s_ptr + rows.to(tl.int64)[:, None] * stride_sm + kb[None, :] * stride_sk, tl.reshape(s, (ROWS, BLOCKS)),
             mask=(rows < MP)[:, None] & (kb < tl.cdiv(KP, 128))[None, :])


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr,
    M, N, K,
    stride_am, stride_asm, stride_ask, stride_wn, stride_wsn, stride_wsk, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = dequant(A) @ dequant(W)^T for pre-quantized A (e4m3 + [M, K/128] scales); tiles BLOCK_M x BLOCK_N."""
    BLOCK_K: tl.constexpr = 128
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
    ws_ptrs = ws_ptr + (offs_n // 128) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb_total = tl.cdiv(K, BLOCK_K)
    # The scale vectors are not software-pipelined by Triton (see `pick_scale`): each iteration loads the next
    # block's, so their latency overlaps the current block's MMA instead of stalling before it.
    a_s = tl.load(as_ptrs, mask=m_mask, other=0.0)
    w_s = tl.load(ws_ptrs, mask=n_mask, other=0.0)
    for kb in range(0, kb_total):
        k_mask = (kb * BLOCK_K + offs_k) < K
        a = tl.load(a_ptrs + kb * BLOCK_K, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + kb * BLOCK_K, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        kb_next = tl.minimum(kb + 1, kb_total - 1)  # the last iteration re-reads its own (unused)
        a_s_next = tl.load(as_ptrs + kb_next * stride_ask, mask=m_mask, other=0.0)
        w_s_next = tl.load(ws_ptrs + kb_next * stride_wsk, mask=n_mask, other=0.0)
        acc += tl.dot(a, tl.trans(w)) * (a_s[:, None] * w_s[None, :])
        a_s = a_s_next
        w_s = w_s_next
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers (host side; shapes are static at trace time)
# ----------------------------------------------------------------------------------------------------------------


def gemv_plan(m: int, n: int, k: int, sms: int, block_n: int = 64) -> tuple[int, int]:
    """(splits, K blocks per split) for the decode GEMV: about one program per SM (the H200 sweep of 2026-11-22:
    fewer, longer programs beat 2-4 waves of short ones), at least 2 K blocks per program, and fp32 partials at
    most 1/8 of the weight bytes (split * M * N * 4 <= N * K / 8)."""
    kbt = cdiv(k, BLOCK)
    split = max(1, round(sms / cdiv(n, block_n)))
    split = min(split, max(1, kbt // 2), max(1, k // (32 * max(m, 1))))
    per = cdiv(kbt, split)
    return cdiv(kbt, per), per


GEMV_VARIANTS = ("splitk", "splitk_fused", "cc", "cc_prequant", "nosplit", "fused_nosplit", "rows", "rows_prequant")
# variants without tl.dot: any power-of-two block_n dividing 128 (the others need >= 16 rows for the MMA)
GEMV_CUDA_CORE_VARIANTS = ("cc", "cc_prequant", "rows", "rows_prequant")
# tokens per `_fp8_gemv_rows_kernel` program (a static loop; more tokens take more programs along grid axis 1)
GEMV_ROWS_M_TILE = 4
# Launch config (block_n, num_warps, num_stages) a variant gets when pinned without one.
GEMV_VARIANT_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "splitk": (64, 4, 5), "splitk_fused": (64, 4, 5), "cc": (16, 2, 8), "cc_prequant": (16, 2, 8), "nosplit": (32, 4, 4),
    "fused_nosplit": (32, 4, 4), "rows": (8, 8, 1), "rows_prequant": (2, 8, 1),
}
# Tokens per `_fp8_gemv_cc_kernel` program (its fp32 product tile is BLOCK_N x BLOCK_T x 128); more tokens take more
# programs along grid axis 1, each re-reading its weight rows.
GEMV_CC_MAX_T = 8
# Measured per weight shape: (N, K) -> ((max M, variant, block_n, num_warps, num_stages), ...) in ascending max M;
# the first row with M <= max M applies. Paste the table `scripts/sweep_gemv.py` prints (H200, 132 SMs). Shapes
# not listed, and M above a shape's last row, get `gemv_default` (by shape class).
GEMV_TUNED: dict[tuple[int, int], tuple[tuple[int, str, int, int, int], ...]] = {
    # M = 1 rows 'rows'/'rows_prequant': scripts/bench_rows.py on the H200, 2026-11-23 (graph-timed, us, today's
    # choice -> rows): 16B qkv_a 9.84 -> 5.45, o_proj 7.16 -> 3.86, dense.down 14.50 -> 12.70; 671B-tp8 qkv_a
    # 10.99 -> 8.85, q_b 8.85 -> 4.32, o_proj 8.88 -> 8.04, shared.down 3.40 -> 2.75. Other rows: the sweep below.
    # H200, scripts/sweep_gemv.py --quick (M = 1 and 8), 2026-11-23, the rank layout's GEMVs. Per shape class, the
    # best config against the split-K default: M=1 under 2 MB 1.34x, 2-8 MB 1.07x, >= 8 MB 1.00x; M=8 1.31x /
    # 1.08x / 1.00x (rows equal to the default are kept: they record that the default won there).
    (256, 7168): ((1, "rows", 2, 8, 1), (4, "rows_prequant", 1, 8, 1),
                  (8, "splitk_fused", 32, 4, 5)),  # 671B-tp8 shared.gate/up
    (2048, 2048): ((1, "rows", 8, 8, 1), (16, "splitk_fused", 64, 4, 5), (32, "nosplit", 16, 4, 6)),  # 16B o_proj
    (2048, 10944): ((1, "rows_prequant", 2, 8, 1), (16, "splitk_fused", 128, 8, 3), (32, "splitk", 128, 4, 3)),  # dn
    (2112, 7168): ((1, "rows_prequant", 2, 8, 1), (8, "splitk", 64, 4, 5)),  # 671B-tp8 qkv_a_proj
    (2304, 7168): ((1, "rows_prequant", 2, 8, 1), (8, "splitk", 64, 4, 5), (16, "splitk_fused", 128, 8, 3)),  # g/u
    (3072, 1536): ((1, "rows", 8, 8, 1), (8, "splitk_fused", 64, 4, 5), (16, "splitk_fused", 128, 8, 3),
                   (32, "nosplit", 16, 4, 4)),  # 671B-tp8 q_b_proj
    (3648, 2048): ((1, "rows", 8, 8, 1), (16, "splitk_fused", 128, 8, 3)),  # 16B qkv_a_proj
    (7168, 256): ((1, "rows", 8, 2, 1), (16, "splitk_fused", 64, 4, 5), (32, "splitk_fused", 64, 8, 5)),  # sh.down
    (7168, 2048): ((1, "rows_prequant", 2, 4, 1), (16, "splitk", 64, 4, 5), (32, "splitk", 64, 8, 5)),  # o_proj
    (7168, 2304): ((1, "splitk", 64, 4, 5), (4, "splitk_fused", 128, 8, 3), (8, "nosplit", 32, 4, 4),
                   (16, "nosplit", 16, 2, 4), (32, "nosplit", 32, 2, 4)),  # 671B-tp8 dense.down
    (10944, 2048): ((1, "rows_prequant", 4, 4, 1), (8, "splitk", 64, 4, 5)),  # 16B dense.gate/up
    # 2026-11-24, the same sweep with the row-parallel variants in its grid (--models 16B,671B-tp8 --ms 1,4,8,16),
    # rows changed where the best beat the op by >= 5% (us, op -> best): 671B-tp8 shared.gate/up M=1 8.66 -> 3.51
    # (split-K had 8 programs of 32 rows), dense.gate/up M=1 11.85 -> 9.52, qkv_a M=1 10.01 -> 9.20 (2 rows per
    # program, not 4); 16B dense.gate/up M=1 11.06 -> 10.21, qkv_a M=16 9.49 (gemv_default) -> 8.95 (split-K).
    # 671B at TP 4 / 2 where the shape-class rule of `gemv_default` measured >= 7% slower than the sweep's best
    # (sweep_gemv.py --quick --models 671B-tp4,671B-tp2 --ms 1,4,16, H200, 2026-11-24): us, rule -> row.
    (512, 7168): ((1, "rows", 4, 8, 1),),  # 671B-tp4 shared.gate/up: 5.23 -> 4.48
    (7168, 1024): ((1, "rows", 8, 4, 1), (16, "splitk", 64, 4, 5)),  # 671B-tp2 shared.down: M=4 7.88 -> 6.79
}
# 2026-11-26: sweep_gemv.py --models 16B,671B-tp8 --ms 4,8,16,32 (variants splitk, splitk_fused, nosplit,
# fused_nosplit, rows, rows_prequant; H200), rows changed above where the best config beat the op by >= 5% (us, op ->
# best; each config's output checked against float64): 16B qkv_a M = 4 / 8 / 16 8.48 / 8.76 / 8.79 -> 7.86 / 7.86 /
# 8.14, o_proj M = 32 9.01 -> 8.47, dense.down M = 4 / 8 / 16 / 32 17.82 / 18.10 / 18.23 / 18.83 -> 14.05 / 14.36 /
# 14.66 / 15.55; 671B-tp8 shared.gate/up M = 4 8.62 -> 7.33, q_b M = 16 / 32 8.13 / 9.05 -> 7.38 / 8.43, o_proj M = 32
# 11.05 -> 10.40, shared.down M = 32 5.07 -> 4.08, dense.gate/up M = 16 12.59 -> 11.86, dense.down M = 4 / 16 / 32
# 11.71 / 12.25 / 13.38 -> 11.03 / 11.29 / 12.28. Rows whose range now reaches past M = 8 or 16 repeat the config M
# 9-16 had before (gemv_default's), so only measured M changed; M 2-3 take the new M = 4 rows and M 17-31 the M = 32
# rows (not measured there).
# cuBLAS's block-scaled GEMM (with act_quant) took 8.5-77 us at these M: not a decode path. bf16 F.linear on twice
# the bytes beat every FP8 config on 16B qkv_a / o_proj, 671B q_b / shared.gate/up (5.8-7.7 us against 7.3-9.6):
# one cuBLAS launch against our act_quant / split-K / reduce chain (docs/BENCHMARKS.md, forty-sixth session).
GEMV_DEFAULT: tuple[str, int, int, int] = ("splitk", 64, 4, 5)
# The rows kernels hold a program's rows over the whole K (padded to a power of two of 128-blocks) in registers:
# past this K they spill (H200: 7168 x 9216 at 8 rows x 8 warps took 710 us against 28 us split-K).
ROWS_MAX_K = 8192


def gemv_default(m: int, n: int, k: int) -> tuple[str, int, int, int]:
    """The decode GEMV config for a shape GEMV_TUNED does not list, by measured class. scripts/sweep_gemv.py --quick
    on the H200 (2026-11-24) over 19 shapes the table does not list (the issue's bench shapes, 671B at TP 4 and 2),
    M = 1, 4, 16: this rule within 8% of the best config in 54 of the 57 cases (the 3 others 15-17% slower: two are
    rows of GEMV_TUNED now, one a bench-only shape), where split-K everywhere was up to 2.7x slower at M = 1:
    - M = 1, weights under 8 MB (or K <= 2048 under 16 MB): the row-parallel kernel quantizing x in its programs,
      8 rows per program (4 warps at K <= 1024, else 8): one launch, every weight byte of a program in flight at once;
    - M = 1, larger weights with K >= 4096 in nearly whole power-of-two 128-blocks (KB >= 3/4 of its padding):
      x quantized once, then 2 rows per program (rows_prequant) 1.13-1.29x over split-K;
    - M = 1 otherwise (K padded by more than 1/4, e.g. 4608, 9216; large N at small K): split-K (the rows kernels
      lost 1-8% there);
    - 2 <= M <= 16, weights under 8 MB: split-K quantizing x in its programs (1.0-1.12x), else split-K."""
    wbytes = n * k
    if m == 1 and k <= ROWS_MAX_K:
        if wbytes < 8e6 or (k <= 2048 and wbytes < 16e6):
            return ("rows", 8, 4 if k <= 1024 else 8, 1)
        kb = cdiv(k, BLOCK)
        if k >= 4096 and 4 * kb >= 3 * next_pow2(kb):
            return ("rows_prequant", 2, 4, 1)
        return GEMV_DEFAULT
    if 1 < m <= 16 and wbytes < 8e6:
        return ("splitk_fused",) + GEMV_DEFAULT[1:]
    return GEMV_DEFAULT


@functools.lru_cache(maxsize=4)
def _table_file(path: str) -> dict[tuple[int, int], tuple[tuple[int, str, int, int, int], ...]]:
    """The suggested table of a scripts/sweep_gemv.py JSON file ({"suggestion": {"table": {"N,K": rows}}})."""
    try:
        with open(path) as f:
            rows = json.load(f)["suggestion"]["table"]
        return {tuple(int(v) for v in key.split(",")): tuple(tuple(r) for r in vals) for key, vals in rows.items()}
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"DSV3_GEMV_TABLE={path}: not a scripts/sweep_gemv.py JSON with a suggested table ({e})")


def gemv_choice(m: int, n: int, k: int, sms: int) -> tuple[str, int, int, int]:
    """(variant, block_n, num_warps, num_stages) for the decode GEMV of an [m, k] x [n, k]^T product on a device
    with `sms` multiprocessors: the one place the default is decided (trace time, static shapes). A table file
    named by DSV3_GEMV_TABLE replaces GEMV_TUNED."""
    path = os.environ.get("DSV3_GEMV_TABLE", "").strip()
    table = _table_file(path) if path else GEMV_TUNED
    for max_m, variant, block_n, num_warps, num_stages in table.get((n, k), ()):
        if m <= max_m:
            return variant, block_n, num_warps, num_stages
    return gemv_default(m, n, k)


def parse_gemv_variant(spec: str) -> tuple[str, Optional[tuple[int, int, int]]]:
    """'cc' -> ('cc', None); 'cc:16:4:3' -> ('cc', (16, 4, 3)) (the DSV3_GEMV_VARIANT syntax)."""
    name, *cfg = spec.strip().lower().split(":")
    if name not in GEMV_VARIANTS + ("auto",):
        raise ValueError(f"GEMV variant {spec!r}: expected one of auto, {', '.join(GEMV_VARIANTS)}")
    if not cfg:
        return name, None
    if len(cfg) != 3 or name == "auto":
        raise ValueError(f"GEMV variant {spec!r}: expected VARIANT or VARIANT:BLOCK_N:NUM_WARPS:NUM_STAGES")
    bn, nw, ns = (int(v) for v in cfg)
    return name, (bn, nw, ns)


def resolve_gemv(
    m: int, n: int, k: int, sms: int, variant: str = "auto", block_n: Optional[int] = None,
    num_warps: Optional[int] = None, num_stages: Optional[int] = None,
) -> tuple[str, int, int, int]:
    """The config `fp8_gemv` launches: an explicit `variant` wins, else DSV3_GEMV_VARIANT, else `gemv_choice`;
    explicit block_n / num_warps / num_stages override the config's fields."""
    cfg: Optional[tuple[int, int, int]] = None
    if variant == "auto":
        variant, cfg = parse_gemv_variant(env_choice("DSV3_GEMV_VARIANT", "auto"))
    else:
        variant, cfg = parse_gemv_variant(variant)
    if variant == "auto":
        variant, *chosen = gemv_choice(m, n, k, sms)
        cfg = tuple(chosen)
    elif cfg is None:
        chosen_variant, *chosen = gemv_choice(m, n, k, sms)
        cfg = tuple(chosen) if chosen_variant == variant else GEMV_VARIANT_DEFAULTS[variant]
    bn, nw, ns = cfg
    return (variant, bn if block_n is None else block_n, nw if num_warps is None else num_warps,
            ns if num_stages is None else num_stages)


def fp8_gemv(
    x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype,
    x_scale: Optional[torch.Tensor] = None, block_n: Optional[int] = None, num_warps: Optional[int] = None,
    num_stages: Optional[int] = None, split: Optional[int] = None, fused: bool = False, variant: str = "auto",
) -> torch.Tensor:
    """x2 [M <= 64, K] -> [M, N] in out_dtype (the decode GEMV; variants in the module docstring).

    `variant`: 'auto' (DSV3_GEMV_VARIANT if set, else `gemv_choice`), 'splitk', 'nosplit', 'fused_nosplit', 'cc',
    'cc_prequant' (optionally with ':BLOCK_N:WARPS:STAGES'). Explicit block_n / num_warps / num_stages override the chosen config.
    Legacy split-K knobs: `split` (number of K splits) or `fused=True` (quantize x inside every GEMV program) given
    with variant 'auto' select 'splitk'. `x_scale` given: x2 is already e4m3 with these scales (every variant reads
    it as is; 'fused_nosplit' then equals 'nosplit', 'cc' equals 'cc_prequant')."""
    m, k = x2.shape
    n = weight.shape[0]
    assert m <= GEMV_MAX_M
    sms = num_sms(x2.device)
    if variant == "auto" and (split is not None or fused):
        variant = "splitk"
    variant, block_n, num_warps, num_stages = resolve_gemv(m, n, k, sms, variant, block_n, num_warps, num_stages)
    if variant == "splitk_fused":
        variant, fused = "splitk", True
    assert 128 % block_n == 0, f"GEMV block_n={block_n} must divide 128"
    prequant = x_scale is not None
    if variant in ("rows", "rows_prequant"):
        if variant == "rows_prequant" and not prequant:
            x2, x_scale = act_quant(x2)
            prequant = True
        m_tile = min(m, GEMV_ROWS_M_TILE)
        out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
        xs = x_scale if prequant else x2
        wrap_triton(_fp8_gemv_rows_kernel)[(cdiv(n, block_n), cdiv(m, m_tile))](
            x2, xs, weight, scale, out,
            m, n, k, x2.stride(0), xs.stride(0), weight.stride(0), scale.stride(0), out.stride(0),
            QUANT_X=not prequant, ACT16=False, BLOCK_N=block_n, M_TILE=m_tile, KB_PAD=next_pow2(cdiv(k, BLOCK)),
            num_warps=num_warps,
        )
        return out
    if variant in ("cc", "cc_prequant"):
        if variant == "cc_prequant" and not prequant:
            x2, x_scale = act_quant(x2)
            prequant = True
        block_t = min(next_pow2(m), GEMV_CC_MAX_T)
        # x tile rows: at least 4 bytes per thread, so that Triton pipelines it (see the kernel's notes)
        x_rows = max(block_t, next_pow2(cdiv(4 * 32 * num_warps, BLOCK * x2.element_size())))
        out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
        xs = x_scale if prequant else x2
        wrap_triton(_fp8_gemv_cc_kernel)[(cdiv(n, block_n), cdiv(m, block_t))](
            x2, xs, weight, scale, out,
            m, n, k,
            x2.stride(0), xs.stride(0), weight.stride(0), scale.stride(0), scale.stride(1), out.stride(0),
            PREQUANT=prequant, BLOCK_N=block_n, BLOCK_T=block_t, X_ROWS=x_rows, NUM_STAGES=num_stages,
            num_warps=num_warps, num_stages=num_stages,
        )
        return out
    assert block_n >= 16, f"GEMV variant {variant!r} uses tl.dot: block_n={block_n} must be >= 16"
    block_t = max(16, next_pow2(m))
    if variant == "splitk":
        splits, per = gemv_plan(m, n, k, sms, block_n)
        if split is not None:
            per = cdiv(cdiv(k, BLOCK), split)
            splits = cdiv(cdiv(k, BLOCK), per)
    else:  # nosplit, fused_nosplit: every program runs over the whole K
        fused = variant == "fused_nosplit"
        splits, per = 1, cdiv(k, BLOCK)
    if not prequant and not fused:
        x2, x_scale = act_quant(x2)
        prequant = True
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    target = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x2.device)
    xs = x_scale if prequant else x2
    wrap_triton(_fp8_gemv_kernel)[(cdiv(n, block_n), splits)](
        x2, xs, weight, scale, target,
        m, n, k, per,
        x2.stride(0), xs.stride(0), weight.stride(0), scale.stride(0), scale.stride(1),
        m * n, n,
        PREQUANT=prequant, BLOCK_N=block_n, BLOCK_T=block_t, num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        blk = 1024
        wrap_triton(_splitk_reduce_kernel)[(cdiv(m * n, blk),)](target, out, m * n, splits, BLOCK=blk, num_warps=4)
    return out


def act_quant(x2: torch.Tensor, pad_rows_to: int = 1, scales_m_major: bool = False, pad_k_blocks_to: int = 1,
              pad_k: bool = False):
    """x2 [M, K] -> (e4m3 [Mp, Kp], fp32 scales [Mp, Kp/128 or ceil(K/128)]) with Mp = M rounded up to
    `pad_rows_to`, and with pad_k (or pad_k_blocks_to > 1) Kp = K rounded up to whole 128-blocks, and to a multiple
    of pad_k_blocks_to blocks; padding rows and columns are quantized zeros (a ragged last block keeps the scale of
    its real columns, as quantize_activation's). `scales_m_major`: scales stored outer-dim-major (strides (1, Mp)),
    the layout cuBLAS wants."""
    m, k = x2.shape
    mp = cdiv(m, pad_rows_to) * pad_rows_to
    kbt = cdiv(cdiv(k, BLOCK), pad_k_blocks_to) * pad_k_blocks_to
    kp = kbt * BLOCK if pad_k or pad_k_blocks_to > 1 else k
    q = torch.empty((mp, kp), dtype=FP8_DTYPE, device=x2.device)
    if scales_m_major:
        s = torch.empty((kbt, mp), dtype=torch.float32, device=x2.device).t()
    else:
        s = torch.empty((mp, kbt), dtype=torch.float32, device=x2.device)
    rows, blocks, warps = act_quant_launch(m, kbt)
    wrap_triton(_act_quant_kernel)[(cdiv(mp, rows), cdiv(kbt, blocks))](
        x2, q, s, m, mp, k, kp, x2.stride(0), q.stride(0), s.stride(0), s.stride(1), ROWS=rows, BLOCKS=blocks,
        num_warps=warps,
    )
    return q, s


def act_quant_launch(m, kb: int, rows: int = ACT_QUANT_ROWS) -> tuple[int, int, int]:
    """(rows, blocks, warps) per program of the quantization kernels for M rows (an int, or a SymInt when dynamic:
    read without a guard) of kb 128-wide blocks: one row at decode sizes, `rows` past them."""
    static_m = static_int(m)
    return (1 if static_m is not None and static_m <= GEMV_MAX_M else rows), min(8, next_pow2(kb)), 4


def fp8_gemm(
    xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype,
    block_m: int = 128, block_n: int = 128, group_m: int = 8, num_warps: int = 8, num_stages: int = 4,
) -> torch.Tensor:
    """Tiled Triton W8A8 GEMM on pre-quantized activations: xq [M, K] e4m3, xs [M, ceil(K/128)] (any strides)."""
    m, k = xq.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    grid = (cdiv(m, block_m) * cdiv(n, block_n),)
    wrap_triton(_fp8_gemm_kernel)[grid](
        xq, xs, weight, scale, out, m, n, k,
        xq.stride(0), xs.stride(0), xs.stride(1), weight.stride(0), scale.stride(0), scale.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def fp8_gemm_mode() -> str:
    """DSV3_FP8_GEMM pins one GEMM path for benchmarks and tests; auto picks by M and hardware."""
    return env_switch("DSV3_FP8_GEMM", "auto", ("auto", "gemv", "scaled_mm", "triton"))


def scaled_mm_usable(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """cuBLAS blockwise FP8 applies: Hopper, torch with F.scaled_mm, bf16 out. Any N and K: fp8_scaled_mm pads a
    ragged N or K to whole 128-blocks with zeros (torch 2.11's meta function for `_scaled_mm_v2` wants N // 128
    weight-scale rows, so a ragged N cannot be passed as it is; the ceil-shaped scales already cover the padding)."""
    return scaled_mm_runs(x2.device, x2.dtype)


def scaled_mm_runs(device: torch.device, out_dtype: torch.dtype) -> bool:
    """`scaled_mm_usable` from the activation's device and output dtype alone."""
    ok = scaled_mm_hardware_for(device, out_dtype)
    if ok and _aot_compiling():
        ok = env_choice("DSV3_AOTI_SCALED_MM", "1") == "1"
    return ok


def scaled_mm_hardware(x2: torch.Tensor) -> bool:
    """`scaled_mm_usable` without its AOTInductor switch (which only an op's body can read: model code traced by
    dynamo cannot tell whether AOTInductor compiles it)."""
    return scaled_mm_hardware_for(x2.device, x2.dtype)


def scaled_mm_hardware_for(device: torch.device, out_dtype: torch.dtype) -> bool:
    return _HAS_SCALED_MM and device.type == "cuda" and capability(device) == (9, 0) and out_dtype == torch.bfloat16


def _aot_compiling() -> bool:
    try:
        from torch._inductor.virtualized import V

        return bool(V.aot_compilation)
    except Exception:  # pragma: no cover
        return False


def fp8_scaled_mm(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """cuBLAS block-scaled GEMM (compile_stack.md §6): M padded to 4, weight scales padded to K/128 -> mult. of 4.
    Inside AOTInductor compilation the v1 `torch._scaled_mm` is used instead (torch 2.11 has a C shim for it but
    not for `_scaled_mm_v2`, whose proxy-executor fallback fails at run time); v1 infers the recipe from the scale
    shapes and is only correct when K/128 % 4 == 0: there K is padded to that with zero blocks (zero activations,
    zero weight columns, zero weight scales: nothing added), a copy of the weight per call (the 16B experts' down
    projection, K = 1408: 3 MB against a 24 GFLOP GEMM at a prefill's M; before, such K went to the Triton GEMM).
    A ragged K (16B's dense MLP's 10944) is padded to whole 128-blocks the same way (a weight copy per call; before
    the thirteenth session those shapes went to the Triton tiled GEMM); a ragged N (16B's kv_a 576 rows) too, except
    in packages (see scaled_mm_quantized)."""
    m = x2.shape[0]
    n = weight.shape[0]
    xq, xs = act_quant(x2, pad_rows_to=4, scales_m_major=True, pad_k_blocks_to=scaled_mm_k_blocks(scale.shape[1]),
                       pad_k=True)
    # (no-op views when M % 4 == 0 and N % 128 == 0; no size comparison, so dynamic M stays unguarded)
    return scaled_mm_quantized(xq, xs, weight, scale, x2.dtype)[:m, :n]


def scaled_mm_k_blocks(kb: int) -> int:
    """The `pad_k_blocks_to` an activation quantized for `scaled_mm_quantized` needs: 4 inside AOTInductor
    compilation when the weight has K/128 % 4 != 0 (the v1 API, see fp8_scaled_mm), else 1."""
    return 4 if _aot_compiling() and kb % 4 else 1


def scaled_mm_quantized(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLAS block-scaled GEMM on an activation already quantized for it: xq [Mp, Kx] e4m3 with Mp % 4 == 0 and
    Kx whole 128-blocks, xs [Mp, Kx/128] M-major (act_quant(..., pad_rows_to=4, scales_m_major=True, pad_k=True,
    pad_k_blocks_to=scaled_mm_k_blocks(kb))); weight [N, K] with scale [ceil(N/128), kb]. The weight is padded with
    zero columns to Kx and, for F.scaled_mm, zero rows to whole 128-blocks of N (fp8 has no constant-pad kernel: the
    bytes are padded, 0x00 is +0.0 in e4m3). Returns [Mp, ceil(N/128) * 128], or [Mp, N] inside AOTInductor
    compilation: v1 `torch._scaled_mm` takes a ragged N with its ceil(N/128) scale rows as it is (H200, 2026-11-25,
    `scripts/try_scaled_mm_ragged_n.py`: N 3648 / 2112 / 576, eager and packaged, bitwise equal to the padded call),
    so the per-call row pad of 16B's fused q / kv_a weight (~160 us per 4095-token prefill) is not made there."""
    kb = scale.shape[1]
    n, k = weight.shape
    aot = _aot_compiling()
    pad_rows, pad_cols = 0 if aot else scale.shape[0] * BLOCK - n, xq.shape[1] - k
    if pad_rows or pad_cols:
        weight = F.pad(weight.view(torch.uint8), (0, pad_cols, 0, pad_rows)).view(weight.dtype)
    if aot:
        pad_blocks = xq.shape[1] // BLOCK - kb
        if pad_blocks:
            scale = F.pad(scale.float(), (0, pad_blocks))
        return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.float().t(), out_dtype=out_dtype)
    ws = F.pad(scale.float(), (0, (-kb) % 4)) if kb % 4 else scale.float().contiguous()
    return F.scaled_mm(
        xq, weight.t(), xs, F.ScalingType.BlockWise1x128, ws.t(), F.ScalingType.BlockWise128x128,
        output_dtype=out_dtype,
    )


def fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m = static_int(x2.shape[0])
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    mode = fp8_gemm_mode()
    if mode == "auto":
        if m is not None and m <= GEMV_MAX_M:
            mode = "gemv"
        elif scaled_mm_usable(x2, weight):
            mode = "scaled_mm"
        else:
            mode = "triton"
    if mode == "gemv" and m is not None and m <= GEMV_MAX_M:
        y = fp8_gemv(x2, weight, weight_scale_inv, x.dtype)
    elif mode == "scaled_mm" and scaled_mm_usable(x2, weight):
        y = fp8_scaled_mm(x2, weight, weight_scale_inv)
    else:
        xq, xs = act_quant(x2)
        y = fp8_gemm(xq, xs, weight, weight_scale_inv, x.dtype)
    return y.reshape(*x.shape[:-1], n)


@triton_op("dsv3::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    # The device branch is resolved at trace time, so one model compiles on CPU (plain torch, fused by Inductor)
    # and on CUDA (Triton kernels compiled into the graph or the AOTInductor package).
    if x.device.type == "cpu":
        return fp8_linear_reference(x, weight, weight_scale_inv)
    return fp8_linear_triton(x, weight, weight_scale_inv)


@fp8_linear.register_fake
def _fp8_linear_fake(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"fp8_linear: x has K={x.shape[-1]}, weight {weight.shape}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def fp8_linear_quantized_reference(x_q: torch.Tensor, x_scale: torch.Tensor, m: int, weight: torch.Tensor,
                                   weight_scale_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Plain PyTorch: both sides dequantized (x's padding rows and columns dropped), fp32 GEMM: `fp8_linear_reference`
    on the activation x_q / x_scale were quantized from."""
    k = weight.shape[1]
    x = dequantize_activation(x_q[:m, :k].contiguous(), x_scale[:m, :cdiv(k, BLOCK)])
    return (x @ dequantize_weight(weight, weight_scale_inv).t()).to(out_dtype)


@triton_op("dsv3::fp8_linear_quantized", mutates_args=())
def fp8_linear_quantized(x_q: torch.Tensor, x_scale: torch.Tensor, m: int, weight: torch.Tensor,
                         weight_scale_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x @ weight.T for an x of m rows already quantized in cuBLAS's layout (x_q [Mp, Kp] e4m3, Mp = m rounded up to
    4, Kp whole 128-blocks >= K; x_scale [Mp, Kp/128] fp32, any strides: what dsv3.moe_residual_norm_quant returns)
    -> [m, N] in out_dtype, the values `fp8_linear` gives on the x they were quantized from: cuBLAS's block-scaled
    GEMM on Hopper (bf16 out), else the Triton tiled GEMM; plain torch on CPU. The padding rows are dropped here,
    inside the op: a slice in the model would make torch.export guard m <= Mp, which its solver cannot prove for a
    dynamic m."""
    n, k = weight.shape
    if x_q.device.type == "cpu":
        return fp8_linear_quantized_reference(x_q, x_scale, m, weight, weight_scale_inv, out_dtype)
    if scaled_mm_runs(x_q.device, out_dtype):
        # (no-op views when m % 4 == 0 and N % 128 == 0; eager pads a ragged N to whole blocks)
        return scaled_mm_quantized(x_q, x_scale, weight, weight_scale_inv, out_dtype)[:m, :n]
    return fp8_gemm(x_q[:m, :k], x_scale[:m, :cdiv(k, BLOCK)], weight.contiguous(), weight_scale_inv, out_dtype)


@fp8_linear_quantized.register_fake
def _fp8_linear_quantized_fake(x_q, x_scale, m, weight, weight_scale_inv, out_dtype):
    torch._check(x_q.shape[1] >= weight.shape[1] and x_q.shape[1] % BLOCK == 0,
                 lambda: f"fp8_linear_quantized: x_q {tuple(x_q.shape)} does not cover weight {tuple(weight.shape)}")
    return x_q.new_empty((m, weight.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# W8A16: `torch.ops.dsv3.fp8_linear_a16`
# ----------------------------------------------------------------------------------------------------------------

# The row-parallel kernel holds BLOCK_N x KB_PAD x 128 weight values per program in registers; at most this many per
# thread (the GEMV sweeps' rows configs that did not spill held 128: bench_rows.py, sweep_gemv.py).
A16_VALUES_PER_THREAD = 128
# Tokens up to which the W8A16 op runs the row-parallel kernel (each program re-reads nothing: its rows stay in
# registers while its M_TILE tokens go by); more or dynamic tokens dequantize the weight for a bf16 GEMM.
A16_ROWS_MAX_M = 16


def fp8_linear_a16_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: the weight dequantized by its block scales, x as it is, fp32 GEMM, rounded to x.dtype."""
    return (x.float() @ dequantize_weight(weight, weight_scale_inv).t()).to(x.dtype)


# W8A16 one-token GEMV launch configs (block_n, num_warps) per weight shape (N, K), measured on the H200
# (scripts/sweep_a16.py, 2026-11-24, every (1, 2, 4, 8) x (4, 8) within the per-thread budget); shapes not listed
# take `gemv_a16_config`'s rule, which gives 4/8 (the sweep's best at 6 of the 11 shapes). us of W8A8 as the model
# runs it -> W8A16 at this config: 16B dense gate 10.19 -> 8.26; 671B-tp8 o_proj 8.12 -> 6.39, dense down 11.15 ->
# 8.98, shared gate/up 4.60 -> 3.73; 4/8 at the others: 16B qkv_a 5.34 -> 4.53, o_proj 4.02 -> 3.65, dense down
# 13.49 -> 12.31; 671B-tp8 qkv_a 8.87 -> 7.77, q_b 4.49 -> 3.97, dense gate/up 13.62 -> 12.88. (The first rule, the
# W8A8 table's rows configs, kept 2 rows per program at K = 7168, where every program's bf16 x re-read is as many
# bytes as its weights: qkv_a 9.03 and dense gate/up 14.51 us, slower than W8A8.)
A16_TUNED: dict[tuple[int, int], tuple[int, int]] = {
    (10944, 2048): (4, 4),  # 16B dense gate / up
    (7168, 2048): (4, 4),  # 671B-tp8 o_proj
    (7168, 2304): (4, 4),  # 671B-tp8 dense down
    (512, 7168): (1, 8),  # 671B-tp8 shared gate/up
    (7168, 256): (8, 2),  # 671B-tp8 shared down: W8A8's rows config (2.46 us; W8A16 8/4 2.48)
}


def gemv_a16_config(m: int, n: int, k: int) -> tuple[int, int]:
    """(block_n, num_warps) of the W8A16 row-parallel GEMV: A16_TUNED's row, else 4 rows at 8 warps, fewer (a power
    of two) where 4 would hold more than A16_VALUES_PER_THREAD weight values per thread (K > 8192)."""
    if (n, k) in A16_TUNED:
        return A16_TUNED[(n, k)]
    row_values = next_pow2(cdiv(k, BLOCK)) * BLOCK
    fit = next_pow2(A16_VALUES_PER_THREAD * 32 * 8 // row_values + 1) // 2
    return max(1, min(4, fit)), 8


def fp8_gemv_a16(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: Optional[int] = None,
                 num_warps: Optional[int] = None) -> torch.Tensor:
    """x2 [M <= A16_ROWS_MAX_M, K] in its dtype -> [M, N] in x2.dtype: `_fp8_gemv_rows_kernel` with ACT16 (one
    launch, no activation quantization)."""
    m, k = x2.shape
    n = weight.shape[0]
    bn, nw = gemv_a16_config(m, n, k)
    block_n, num_warps = block_n or bn, num_warps or nw
    m_tile = min(m, GEMV_ROWS_M_TILE)
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    wrap_triton(_fp8_gemv_rows_kernel)[(cdiv(n, block_n), cdiv(m, m_tile))](
        x2, x2, weight, scale, out,
        m, n, k, x2.stride(0), x2.stride(0), weight.stride(0), scale.stride(0), out.stride(0),
        QUANT_X=False, ACT16=True, BLOCK_N=block_n, M_TILE=m_tile, KB_PAD=next_pow2(cdiv(k, BLOCK)),
        num_warps=num_warps,
    )
    return out


def fp8_linear_a16_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    m = static_int(x2.shape[0])
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    if m is not None and m <= A16_ROWS_MAX_M and x2.dtype in (torch.bfloat16, torch.float16):
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        y = fp8_gemv_a16(x2, weight, weight_scale_inv)
    else:  # not a decode size: the weight dequantized once for this call, a GEMM in x's dtype with fp32 accumulation
        y = F.linear(x2, dequantize_weight(weight, weight_scale_inv, x2.dtype))
    return y.reshape(*x.shape[:-1], n)


@triton_op("dsv3::fp8_linear_a16", mutates_args=())
def fp8_linear_a16(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """`dsv3.fp8_linear` without activation quantization (W8A16): y[m, n] = sum_kb (sum_{k in kb} x[m,k] * wq[n,k])
    * ws[n//128, kb] in fp32, rounded to x.dtype; x, weight and scales as fp8_linear's. The numerics of DeepSeek's
    official inference code at its default (`gemm_impl="bf16"`: weights dequantized, activations not quantized),
    closer to the bf16 model than W8A8. The model uses it for one-token steps when built so
    (`Transformer.set_batch1_activations_`): no quantization launch or in-program quantization before a GEMV whose
    CUDA cores widen x to fp32 anyway. CPU: `fp8_linear_a16_reference`; CUDA, statically <= A16_ROWS_MAX_M tokens:
    the row-parallel GEMV (`_fp8_gemv_rows_kernel` with ACT16); more or dynamic tokens (not on the model's hot path):
    the weight dequantized to x.dtype and F.linear (fp32 accumulation, so equal to the reference up to rounding)."""
    if x.device.type == "cpu":
        return fp8_linear_a16_reference(x, weight, weight_scale_inv)
    return fp8_linear_a16_triton(x, weight, weight_scale_inv)


@fp8_linear_a16.register_fake
def _fp8_linear_a16_fake(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: f"fp8_linear_a16: x has K={x.shape[-1]}, weight {weight.shape}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


__all__ = ["fp8_linear", "fp8_linear_a16", "fp8_linear_a16_reference", "fp8_linear_quantized",
           "fp8_linear_quantized_reference", "fp8_linear_reference", "fp8_linear_triton",
           "fp8_gemv", "fp8_gemm", "act_quant", "gemv_choice", "quantize_tile", "ACT_AMAX_FLOOR", "FP8_MAX", "GEMV_VARIANTS", "GEMV_CUDA_CORE_VARIANTS"]
