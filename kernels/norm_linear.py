"""`torch.ops.dsv3.add_rms_norm_fp8_linear`: residual add + RMSNorm + an FP8 linear (one launch at batch-1 decode
with DSV3_NORM_LINEAR=fused; measured no faster end to end, so not the default).

A decoder layer starts with `h = h + previous layer's output; x = input_layernorm(h); y = x @ W^T` (W: MLA's fused
q/kv_a input projection). At batch-1 decode the add and the norm are a chain of one or two tiny launches (~1-2 us
each whatever their bytes, on the H200) in front of the GEMV. The GEMV's programs already load a token's whole
row of x (`_fp8_gemv_rows_kernel`), so each can as well load h and the delta, add them and normalize the row
itself: one launch instead of two or three.

Contract
- h, delta: [..., K] bfloat16/float16 (the residual stream and the sublayer output to add), norm_weight: [K] same
  dtype, eps: float; weight [N, K] float8_e4m3fn with weight_scale_inv [ceil(N/128), ceil(K/128)] fp32.
- Returns (h_out, y): h_out = h + delta (h.dtype), y = fp8_linear(rms_norm_rounded(h_out, norm_weight, eps), weight,
  weight_scale_inv) ([..., N], h.dtype), i.e. exactly what `dsv3.add_rms_norm_quant`'s h_out / y followed by
  `dsv3.fp8_linear` compute (same rounding points; the per-row sum of squares and the reciprocal square root are
  the ones of `dsv3.kernels.rms_norm`, see there).

Implementations (branch taken at trace time)
- CPU, or DSV3_NORM_LINEAR=torch: `add_rms_norm_fp8_linear_reference`, the add and the norm as torch ops and
  `dsv3.fp8_linear` (on CUDA that is the graph the model ran before this op: one Inductor kernel + the GEMV).
- CUDA with DSV3_NORM_LINEAR=fused, M = prod(h.shape[:-1]) statically 1..GEMV_ROWS_M_TILE (batch-1 to 4 decode):
  `_add_norm_gemv_rows_kernel`,
  `_fp8_gemv_rows_kernel` with a prologue: every program loads the M rows of h and delta and the norm weight
  ([KB_PAD, 128] tiles), rounds h + delta to h.dtype, normalizes and quantizes the row in registers
  (`quantize_tile_rcp`, exactly `quantize_activation`'s values and scales) and multiplies it with its BLOCK_N
  weight rows; program 0 also stores h_out. Launch config: the GEMV's own ('rows' row of GEMV_TUNED if it has one,
  else the 'rows' default).
- CUDA with DSV3_NORM_LINEAR=fused, larger static M (<= GEMV_MAX_M): `dsv3.add_rms_norm_quant`'s kernel (h_out, x and x quantized, one launch)
  and the decode GEMV on the quantized x (its act-quant launch saved).
- CUDA with DSV3_NORM_LINEAR=fused, dynamic or larger M (prefill): the add + norm kernel, then `fp8_linear`'s GEMM path.
DSV3_NORM_LINEAR=fused|torch (read at trace time) pins a path. The default is `torch`: measured no gain.

Measured (H200, scripts/gpu_check.sh ab16, 16B FP8 at 8 layers, 2026-11-23, two runs): the fused path 0.21 / 0.03
us per layer faster at batch 1 (nothing), batch 8 within noise. Profile: the fused kernel 6.9 us per call against
5.3 (the qkv GEMV) + 1.8 (Inductor's add + norm): the ~1.6 us its 456 programs spend on the row's reduction and
normalization (one dependent chain in front of every program's dot) takes back what the removed launch saved.

The redundant work: every GEMV program (456 on the 16B qkv projection) reads the same 3 x K x 2 bytes from L2 and
reduces the row once; next to its own 8-16 KB of weights that is noise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, env_switch, next_pow2, num_sms, static_int
from dsv3.kernels.fp8_blocks import BLOCK, FP8_DTYPE
from dsv3.kernels.fp8_linear import (
    GEMV_MAX_M,
    GEMV_ROWS_M_TILE,
    GEMV_VARIANT_DEFAULTS,
    dot_rows,
    fp8_gemv,
    fp8_linear_triton,
    gemv_choice,
    k_blocks,
    load_weight_rows,
    quantize_tile_rcp,
)
from dsv3.kernels.rms_norm import add_rms_norm_quant_triton, rms_norm_rounded, rms_scale

NORM_LINEAR_DEFAULT = "torch"  # the fused kernel measured no faster end to end (see above)


def add_rms_norm_fp8_linear_reference(
    h: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    h_out = h + delta
    return h_out, torch.ops.dsv3.fp8_linear(rms_norm_rounded(h_out, norm_weight, eps), weight, weight_scale_inv)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _add_norm_gemv_rows_kernel(
    h_ptr, d_ptr, nw_ptr, ho_ptr, w_ptr, ws_ptr, out_ptr,
    M, N, K, eps, stride_hm, stride_dm, stride_hom, stride_wn, stride_wsn, stride_om,
    BLOCK_N: tl.constexpr, M_TILE: tl.constexpr, KB_PAD: tl.constexpr,
):
    """out[m, n] for BLOCK_N weight rows (whole K in one load, as `_fp8_gemv_rows_kernel`) of the M <= M_TILE tokens
    x[m] = RMSNorm(h[m] + delta[m]); program 0 stores h_out. Elements past K load as zeros: they add nothing to the
    sum of squares and quantize as `quantize_activation`'s zero padding."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_b, offs_k, k_mask, kb_mask = k_blocks(K, KB_PAD)
    w, ws = load_weight_rows(w_ptr, ws_ptr, offs_n, n_mask, offs_b, offs_k, k_mask, kb_mask, stride_wn, stride_wsn)
    nw = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    dt = ho_ptr.dtype.element_ty
    for t in tl.static_range(M_TILE):
        if t < M:
            hv = tl.load(h_ptr + t * stride_hm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            dv = tl.load(d_ptr + t * stride_dm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            ho = (hv + dv).to(dt)
            if pid == 0:
                tl.store(ho_ptr + t * stride_hom + offs_k, ho, mask=k_mask)
            xf = ho.to(tl.float32)
            r = rms_scale(tl.sum(tl.sum(xf * xf, axis=1), axis=0), K, eps)
            x = (nw * (xf * r).to(dt).to(tl.float32)).to(dt)
            xq, xs = quantize_tile_rcp(x.to(tl.float32))
            y = dot_rows(w, ws, xq.to(tl.float32), xs)
            tl.store(out_ptr + t * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def rows_config(m: int, n: int, k: int, sms: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the fused kernel: the decode GEMV's measured 'rows' config for this shape, else the
    'rows' default."""
    variant, block_n, num_warps, _ = gemv_choice(m, n, k, sms)
    if variant in ("rows", "rows_prequant"):
        return block_n, num_warps
    block_n, num_warps, _ = GEMV_VARIANT_DEFAULTS["rows"]
    return block_n, num_warps


def add_rms_norm_fp8_linear_triton(
    h: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    weight_scale_inv: torch.Tensor, block_n: int | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA path (see the module docstring); block_n / num_warps override the fused kernel's config (sweeps)."""
    k = static_int(h.shape[-1])
    assert k is not None, "add_rms_norm_fp8_linear: the hidden size must be static"
    n = weight.shape[0]
    h2, d2 = h.reshape(-1, k), delta.reshape(-1, k)
    h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
    d2 = d2 if d2.stride(-1) == 1 else d2.contiguous()
    m = static_int(h2.shape[0])
    if m is not None and 0 < m <= GEMV_ROWS_M_TILE:
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        bn, nw = rows_config(m, n, k, num_sms(h.device))
        bn, nw = block_n or bn, num_warps or nw
        h_out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        y = torch.empty((*h.shape[:-1], n), dtype=h.dtype, device=h.device)
        wrap_triton(_add_norm_gemv_rows_kernel)[(cdiv(n, bn),)](
            h2, d2, norm_weight, h_out, weight, weight_scale_inv, y,
            m, n, k, eps, h2.stride(0), d2.stride(0), k, weight.stride(0), weight_scale_inv.stride(0), n,
            BLOCK_N=bn, M_TILE=m, KB_PAD=next_pow2(cdiv(k, BLOCK)), num_warps=nw,
        )
        return h_out, y
    h_out, x, x_q, x_scale = add_rms_norm_quant_triton(h, delta, norm_weight, eps)
    if m is not None and 0 < m <= GEMV_MAX_M:
        y = fp8_gemv(x_q.reshape(m, k), weight, weight_scale_inv, h.dtype, x_scale=x_scale.reshape(m, -1))
        return h_out, y.reshape(*h.shape[:-1], n)
    return h_out, fp8_linear_triton(x, weight, weight_scale_inv)


def norm_linear_choice() -> str:
    return env_switch("DSV3_NORM_LINEAR", NORM_LINEAR_DEFAULT, ("fused", "torch"))


def _check_args(h, delta, norm_weight, weight, weight_scale_inv) -> None:
    torch._check(delta.shape == h.shape and delta.dtype == h.dtype,
                 lambda: f"add_rms_norm_fp8_linear: delta {tuple(delta.shape)} {delta.dtype} vs h "
                         f"{tuple(h.shape)} {h.dtype}")
    torch._check(norm_weight.dim() == 1 and norm_weight.shape[0] == h.shape[-1],
                 lambda: f"add_rms_norm_fp8_linear: norm weight {tuple(norm_weight.shape)} vs h {tuple(h.shape)}")
    torch._check(weight.dim() == 2 and weight.shape[1] == h.shape[-1],
                 lambda: f"add_rms_norm_fp8_linear: weight {tuple(weight.shape)} vs h {tuple(h.shape)}")
    torch._check(weight_scale_inv.shape == (cdiv(weight.shape[0], BLOCK), cdiv(weight.shape[1], BLOCK)),
                 lambda: f"add_rms_norm_fp8_linear: scales {tuple(weight_scale_inv.shape)} vs weight "
                         f"{tuple(weight.shape)}")


@triton_op("dsv3::add_rms_norm_fp8_linear", mutates_args=())
def add_rms_norm_fp8_linear(
    h: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_args(h, delta, norm_weight, weight, weight_scale_inv)
    if (h.device.type == "cpu" or h.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != FP8_DTYPE
            or norm_linear_choice() == "torch"):
        return add_rms_norm_fp8_linear_reference(h, delta, norm_weight, eps, weight, weight_scale_inv)
    return add_rms_norm_fp8_linear_triton(h, delta, norm_weight, eps, weight, weight_scale_inv)


@add_rms_norm_fp8_linear.register_fake
def _add_rms_norm_fp8_linear_fake(h, delta, norm_weight, eps, weight, weight_scale_inv):
    _check_args(h, delta, norm_weight, weight, weight_scale_inv)
    return h.new_empty(h.shape), h.new_empty((*h.shape[:-1], weight.shape[0]))


__all__ = ["add_rms_norm_fp8_linear", "add_rms_norm_fp8_linear_reference", "add_rms_norm_fp8_linear_triton"]
