"""Row-parallel FP8 kernels for one token (batch-1 decode): the weight streamed with every load in flight at once.

Why a third decode form. The tensor-core decode kernels (`fp8_linear._fp8_gemv_kernel`, `routed_experts`'s up/down)
give each program a [BLOCK_N, 128] weight tile per K step and walk K serially: at one token the program is a chain
of 16 dependent steps and the GPU holds too few of them to cover the memory latency (16B MoE up at T=1: 46 MB in
17.7 us, 2.6 TB/s; qkv_a 7.5 MB in 7.8 us, 1 TB/s; H200, 2026-11-23). Here a program owns a few weight rows and
loads them over the whole K in one `tl.load` ([BLOCK_N, KB, 128], K padded to a power of two of 128-blocks), so each
thread has all its loads in flight at once and thousands of small programs keep the memory system busy; the
products are summed on CUDA cores (e4m3 widened to fp32: exact products, fp32 sums), per 128-block times the two
block scales, as `fp8_linear`'s contract says.

Kernels (x is one token, quantized per 128 channels by `act_quant`, or inside the program: QUANT_X)
- `_gemv_rows_kernel`: out[m, n] for M (<= 4, a static loop) tokens; grid cdiv(N, BLOCK_N).
- `_moe_up_rows_kernel`: grid (K slots, cdiv(I, BLOCK_N)): slot k is expert topk_idx[0, k] (ids outside [0, E) do
  nothing), gate and up rows of that expert, then SiLU(gate) * up with the reference's rounding points, written in
  x.dtype to h[k].
- `_moe_down_rows_kernel`: grid cdiv(D, BLOCK_N): each program owns BLOCK_N output channels and walks all K slots
  (the quantized h[k] times the rows of expert topk_idx[0, k]), rounds each expert's output to x.dtype and adds it
  times topk_weight[0, k] in fp32: the combine happens here, no [K, D] buffer and no combine launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from dsv3.kernels._launch import cdiv, next_pow2
from dsv3.kernels.fp8_linear import act_quant, quantize_tile_rcp

GEMV_ROWS_MAX_M = 4


@triton.jit
def _dot_rows(w, ws, xq, xs):
    """w [BN, KB, 128] fp32 (e4m3 values), ws [BN, KB], xq [KB, 128] fp32 (e4m3 values), xs [KB] -> [BN] fp32."""
    part = tl.sum(w * xq[None, :, :], axis=2)
    return tl.sum(part * (ws * xs[None, :]), axis=1)


@triton.jit
def _load_x(x_ptr, xs_ptr, offs_k, k_mask, offs_b, kb_mask, QUANT_X: tl.constexpr):
    """One token's x as (e4m3 values in fp32 [KB, 128], scales [KB])."""
    if QUANT_X:
        xv = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        xq, xs = quantize_tile_rcp(xv)
        return xq.to(tl.float32), xs
    else:
        xq = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        xs = tl.load(xs_ptr + offs_b, mask=kb_mask, other=0.0)
        return xq, xs


@triton.jit
def _gemv_rows_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr,
    N, K, stride_xm, stride_xsm, stride_wn, stride_wsn, stride_om,
    M: tl.constexpr, QUANT_X: tl.constexpr, BLOCK_N: tl.constexpr, KB_PAD: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_b = tl.arange(0, KB_PAD)
    offs_k = offs_b[:, None] * 128 + tl.arange(0, 128)[None, :]
    k_mask = offs_k < K
    kb_mask = offs_b < tl.cdiv(K, 128)
    w = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + offs_k[None, :, :],
                mask=n_mask[:, None, None] & k_mask[None, :, :], other=0.0).to(tl.float32)
    ws = tl.load(ws_ptr + (offs_n // 128)[:, None] * stride_wsn + offs_b[None, :],
                 mask=n_mask[:, None] & kb_mask[None, :], other=0.0)
    for m in tl.static_range(M):
        xq, xs = _load_x(x_ptr + m * stride_xm, xs_ptr + m * stride_xsm, offs_k, k_mask, offs_b, kb_mask, QUANT_X)
        y = _dot_rows(w, ws, xq, xs)
        tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _moe_up_rows_kernel(
    x_ptr, xs_ptr, idx_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr,
    E, I, D, stride_we, stride_wn, stride_se, stride_sn, stride_h,
    QUANT_X: tl.constexpr, BLOCK_N: tl.constexpr, KB_PAD: tl.constexpr,
):
    slot = tl.program_id(0)
    e = tl.load(idx_ptr + slot)
    if (e >= 0) & (e < E):
        e64 = e.to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < I
        offs_b = tl.arange(0, KB_PAD)
        offs_k = offs_b[:, None] * 128 + tl.arange(0, 128)[None, :]
        k_mask = offs_k < D
        kb_mask = offs_b < tl.cdiv(D, 128)
        w_off = e64 * stride_we + offs_n[:, None, None] * stride_wn + offs_k[None, :, :]
        w_mask = n_mask[:, None, None] & k_mask[None, :, :]
        s_off = e64 * stride_se + (offs_n // 128)[:, None] * stride_sn + offs_b[None, :]
        s_mask = n_mask[:, None] & kb_mask[None, :]
        wg = tl.load(wg_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
        wu = tl.load(wu_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
        sg = tl.load(sg_ptr + s_off, mask=s_mask, other=0.0)
        su = tl.load(su_ptr + s_off, mask=s_mask, other=0.0)
        xq, xs = _load_x(x_ptr, xs_ptr, offs_k, k_mask, offs_b, kb_mask, QUANT_X)
        odt = h_ptr.dtype.element_ty
        # the reference rounds gate, up, silu and the product to the activation dtype
        g = _dot_rows(wg, sg, xq, xs).to(odt).to(tl.float32)
        u = _dot_rows(wu, su, xq, xs).to(odt).to(tl.float32)
        sl = (g / (1.0 + tl.exp(-g))).to(odt).to(tl.float32)
        tl.store(h_ptr + slot * stride_h + offs_n, (sl * u).to(odt), mask=n_mask)


@triton.jit
def _moe_down_rows_kernel(
    hq_ptr, hs_ptr, idx_ptr, wt_ptr, wd_ptr, sd_ptr, out_ptr,
    E, I, D, stride_hq, stride_hs, stride_we, stride_wn, stride_se, stride_sn,
    N_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, KB_PAD: tl.constexpr,
):
    """hq/hs: h quantized per slot (act_quant of [K, I]); out [D] in the activation dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    offs_b = tl.arange(0, KB_PAD)
    offs_k = offs_b[:, None] * 128 + tl.arange(0, 128)[None, :]
    k_mask = offs_k < I
    kb_mask = offs_b < tl.cdiv(I, 128)
    odt = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for slot in tl.static_range(N_SLOTS):
        e = tl.load(idx_ptr + slot)
        valid = (e >= 0) & (e < E)
        e64 = tl.where(valid, e, 0).to(tl.int64)
        wgt = tl.load(wt_ptr + slot)
        # an id outside [0, E) (another rank's expert) reads nothing: the masks carry `valid` per element
        ok_n = n_mask & ((offs_n * 0 + e) >= 0) & ((offs_n * 0 + e) < E)
        ok_b = kb_mask & ((offs_b * 0 + e) >= 0) & ((offs_b * 0 + e) < E)
        w = tl.load(wd_ptr + e64 * stride_we + offs_n[:, None, None] * stride_wn + offs_k[None, :, :],
                    mask=ok_n[:, None, None] & k_mask[None, :, :], other=0.0).to(tl.float32)
        sd = tl.load(sd_ptr + e64 * stride_se + (offs_n // 128)[:, None] * stride_sn + offs_b[None, :],
                     mask=ok_n[:, None] & ok_b[None, :], other=0.0)
        hq = tl.load(hq_ptr + slot * stride_hq + offs_k, mask=k_mask & ok_b[:, None], other=0.0).to(tl.float32)
        hs = tl.load(hs_ptr + slot * stride_hs + offs_b, mask=ok_b, other=0.0)
        y = _dot_rows(w, sd, hq, hs).to(odt).to(tl.float32)  # the reference rounds each expert's output
        acc += tl.where(valid, y * wgt, 0.0)
    tl.store(out_ptr + offs_n, acc.to(odt), mask=n_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _kb_pad(k: int) -> int:
    return max(1, next_pow2(cdiv(k, 128)))


def gemv_rows(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype,
              block_n: int = 2, num_warps: int = 4, quant_x: bool = True,
              x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M <= GEMV_ROWS_MAX_M, K] (bf16/fp16) -> [M, N]; FP8 weight [N, K] with 128x128 block scales.
    `x_scale` given: x2 is already e4m3 with these scales [M, ceil(K/128)] (quant_x is ignored)."""
    m, k = x2.shape
    n = weight.shape[0]
    assert m <= GEMV_ROWS_MAX_M and 128 % block_n == 0
    if x_scale is not None:
        xs, quant_x = x_scale, False
    elif quant_x:
        xs = x2
    else:
        x2, xs = act_quant(x2)
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    wrap_triton(_gemv_rows_kernel)[(cdiv(n, block_n),)](
        x2, xs, weight, scale, out,
        n, k, x2.stride(0), xs.stride(0), weight.stride(0), scale.stride(0), out.stride(0),
        M=m, QUANT_X=quant_x, BLOCK_N=block_n, KB_PAD=_kb_pad(k), num_warps=num_warps,
    )
    return out


def moe_rows(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
             gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
             gate_scale_inv: torch.Tensor, up_scale_inv: torch.Tensor, down_scale_inv: torch.Tensor,
             up_block_n: int = 2, up_num_warps: int = 4, down_block_n: int = 2, down_num_warps: int = 4,
             quant_x: bool = False) -> torch.Tensor:
    """`routed_experts` for one token ([1, D]) with FP8 weights: 4 launches (x quantization, up, h quantization,
    down with the combine) or 3 with `quant_x` (x quantized inside every up program)."""
    t, d = x.shape
    assert t == 1
    k = topk_idx.shape[1]
    e, i, _ = gate_proj.shape
    idx = topk_idx.contiguous()
    wt = topk_weight.contiguous().float()
    if quant_x:
        xq, xs = x, x
    else:
        xq, xs = act_quant(x)
    h = torch.empty((k, i), dtype=x.dtype, device=x.device)
    sg = gate_scale_inv
    wrap_triton(_moe_up_rows_kernel)[(k, cdiv(i, up_block_n))](
        xq, xs, idx, gate_proj, up_proj, sg, up_scale_inv, h,
        e, i, d, gate_proj.stride(0), gate_proj.stride(1), sg.stride(0), sg.stride(1), h.stride(0),
        QUANT_X=quant_x, BLOCK_N=up_block_n, KB_PAD=_kb_pad(d), num_warps=up_num_warps,
    )
    hq, hs = act_quant(h)
    out = torch.empty_like(x)
    sd = down_scale_inv
    wrap_triton(_moe_down_rows_kernel)[(cdiv(d, down_block_n),)](
        hq, hs, idx, wt, down_proj, sd, out,
        e, i, d, hq.stride(0), hs.stride(0), down_proj.stride(0), down_proj.stride(1), sd.stride(0), sd.stride(1),
        N_SLOTS=k, BLOCK_N=down_block_n, KB_PAD=_kb_pad(i), num_warps=down_num_warps,
    )
    return out
