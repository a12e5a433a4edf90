"""dsv3::fp8_swiglu: a SwiGLU MLP with FP8 block-scaled weights, down(silu(gate(x)) * up(x)), for prefill-sized M.

Contract:
    x [..., D] bf16/fp32; gate_w, up_w [N, D] e4m3 with gate_s, up_s [N/128, D/128] fp32 (N = S * I);
    down_w [S, D, I] e4m3 with down_s [S, D/128, ceil(I/128)]: S down projections, one per I-column slice of
    h = silu(g) * u, summed. S = 1 is a plain MLP (dense layers, an unstacked shared MLP); S > 1 the stacked shared
    experts of world size 1 (their gate/up rows are consecutive rows of one matrix, their down projections separate
    slots). Returns [..., D] in x's dtype: sum_s fp8_linear(h[:, s*I:(s+1)*I], down_w[s], down_s[s]).
    Or S = 1 with I > N, a multiple of 128: the down projection's columns past N are zero padding (weights and
    scales), h is taken as padded with zeros: the stacked shared experts' down projections laid side by side and
    padded once at load (RoutedExperts.add_prefill_copies_), so no call copies them.

Why one op (the 16B prefill's profile, a3c632a): the shared experts cost per MoE layer two activation quantizations
of x (one per gate and up GEMM), an elementwise SiLU-mul writing h in bf16, one quantization of h per down slot and
one down GEMM per slot, each slot's weight padded for cuBLAS. Here, on Hopper with cuBLAS block-scaled GEMMs:
x is quantized once for gate and up; one Triton kernel computes h = silu(g) * u and quantizes it straight into the
layout cuBLAS takes (rows padded to 4, scales M-major, K padded to 4 blocks inside AOTInductor compilation); the S
down slots are concatenated along K (I is a multiple of 128, so their block scales concatenate too) into one GEMM
that also does the sum. Same arithmetic as the composition: h rounded as eager PyTorch rounds it (silu(g) to the
activation dtype, then the product), quantized per 1x128 block exactly as `quantize_activation`.

Elsewhere (CPU; M <= GEMV_MAX_M, where the GEMV kernels stream the weights; shapes cuBLAS does not take) the
composition of dsv3::fp8_linear's implementations, which is also the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, next_pow2, static_int
from dsv3.kernels.fp8_blocks import BLOCK, FP8_DTYPE
from dsv3.kernels.fp8_linear import (
    GEMV_MAX_M,
    act_quant,
    fp8_linear_reference,
    fp8_linear_triton,
    quantize_tile,
    scaled_mm_k_blocks,
    scaled_mm_quantized,
    scaled_mm_usable,
)
from dsv3.kernels.routed_experts import _swiglu


def fp8_swiglu_reference(x: torch.Tensor, gate_w: torch.Tensor, gate_s: torch.Tensor, up_w: torch.Tensor,
                         up_s: torch.Tensor, down_w: torch.Tensor, down_s: torch.Tensor,
                         linear=fp8_linear_reference) -> torch.Tensor:
    """The composition (plain PyTorch with the default `linear`)."""
    i = down_w.shape[2]
    h = F.silu(linear(x, gate_w, gate_s)) * linear(x, up_w, up_s)
    if down_w.shape[0] == 1 and i > h.shape[-1]:  # a padded down projection: zero columns past N
        h = F.pad(h, (0, i - h.shape[-1]))
    y = None
    for s in range(down_w.shape[0]):
        part = linear(h[..., s * i:(s + 1) * i], down_w[s], down_s[s])
        y = part if y is None else y + part
    return y


@triton.jit
def _silu_mul_quant_kernel(
    g_ptr, u_ptr, q_ptr, s_ptr, N, KP, stride_gm, stride_um, stride_qm, stride_sm, stride_sk,
    BLOCKS: tl.constexpr,
):
    """Row m, BLOCKS 128-wide blocks per program: h = silu(g) * u rounded as eager PyTorch does in g's dtype,
    quantized per block; columns N..KP are quantized zeros (K padding for cuBLAS)."""
    m = tl.program_id(0)
    kb = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    offs = kb[:, None] * 128 + tl.arange(0, 128)[None, :]
    m64 = m.to(tl.int64)
    mask = offs < N
    g = tl.load(g_ptr + m64 * stride_gm + offs, mask=mask, other=0.0)
    u = tl.load(u_ptr + m64 * stride_um + offs, mask=mask, other=0.0)
    # the routed experts' SwiGLU (silu and the product each rounded to the activation dtype, as eager PyTorch)
    q, s = quantize_tile(_swiglu(g.to(tl.float32), u.to(tl.float32), g.dtype), 1)
    tl.store(q_ptr + m64 * stride_qm + offs, q, mask=offs < KP)
    tl.store(s_ptr + m64 * stride_sm + kb * stride_sk, s, mask=kb < tl.cdiv(KP, 128))


def silu_mul_quant(g: torch.Tensor, u: torch.Tensor, pad_k_blocks_to: int = 1, k_blocks: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """g, u [M, N] (N % 128 == 0) -> (e4m3 [M, Kp], fp32 scales [M, Kp/128] M-major): silu(g) * u quantized per
    1x128 block, K padded with zero blocks to at least `k_blocks` blocks, then to a multiple of `pad_k_blocks_to`."""
    m, n = g.shape
    kbt = cdiv(max(cdiv(n, BLOCK), k_blocks), pad_k_blocks_to) * pad_k_blocks_to
    kp = kbt * BLOCK
    q = torch.empty((m, kp), dtype=FP8_DTYPE, device=g.device)
    s = torch.empty((kbt, m), dtype=torch.float32, device=g.device).t()
    blocks = min(8, next_pow2(kbt))
    wrap_triton(_silu_mul_quant_kernel)[(m, cdiv(kbt, blocks))](
        g, u, q, s, n, kp, g.stride(0), u.stride(0), q.stride(0), s.stride(0), s.stride(1), BLOCKS=blocks,
        num_warps=4,
    )
    return q, s


def _cublas_path(x2: torch.Tensor, gate_w: torch.Tensor, down_w: torch.Tensor) -> bool:
    m = static_int(x2.shape[0])
    if m is not None and m <= GEMV_MAX_M:
        return False  # decode-sized: the GEMV kernels
    return down_w.shape[2] % BLOCK == 0 and scaled_mm_usable(x2, gate_w)  # I: the slots' K blocks concatenate


def fp8_swiglu_triton(x: torch.Tensor, gate_w: torch.Tensor, gate_s: torch.Tensor, up_w: torch.Tensor,
                      up_s: torch.Tensor, down_w: torch.Tensor, down_s: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not _cublas_path(x2, gate_w, down_w):
        return fp8_swiglu_reference(x, gate_w, gate_s, up_w, up_s, down_w, down_s, linear=fp8_linear_triton)
    m = x2.shape[0]
    s, _, i = down_w.shape
    xq, xs = act_quant(x2, pad_rows_to=4, scales_m_major=True, pad_k_blocks_to=scaled_mm_k_blocks(gate_s.shape[1]),
                       pad_k=True)
    g = scaled_mm_quantized(xq, xs, gate_w, gate_s, x.dtype)
    u = scaled_mm_quantized(xq, xs, up_w, up_s, x.dtype)
    kb = s * (i // BLOCK)
    hq, hs = silu_mul_quant(g, u, pad_k_blocks_to=scaled_mm_k_blocks(kb), k_blocks=kb)
    # the S down slots side by side along K: [D, S*I] (a copy, fused with scaled_mm_quantized's K padding by
    # Inductor); S = 1 (one MLP, or slots laid side by side and padded at load) is a view
    w = down_w.view(torch.uint8).permute(1, 0, 2).reshape(d, s * i).view(down_w.dtype)
    ws = down_s.permute(1, 0, 2).reshape(down_s.shape[1], kb)
    y = scaled_mm_quantized(hq, hs, w, ws, x.dtype)
    return y[:m, :d].reshape(*x.shape[:-1], d)


@triton_op("dsv3::fp8_swiglu", mutates_args=())
def fp8_swiglu(x: torch.Tensor, gate_w: torch.Tensor, gate_s: torch.Tensor, up_w: torch.Tensor, up_s: torch.Tensor,
               down_w: torch.Tensor, down_s: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return fp8_swiglu_reference(x, gate_w, gate_s, up_w, up_s, down_w, down_s)
    return fp8_swiglu_triton(x, gate_w, gate_s, up_w, up_s, down_w, down_s)


@fp8_swiglu.register_fake
def _fp8_swiglu_fake(x: torch.Tensor, gate_w: torch.Tensor, gate_s: torch.Tensor, up_w: torch.Tensor,
                     up_s: torch.Tensor, down_w: torch.Tensor, down_s: torch.Tensor) -> torch.Tensor:
    n, (s, _, i) = gate_w.shape[0], down_w.shape
    torch._check(n == s * i or (s == 1 and i > n and i % 128 == 0),
                 lambda: f"fp8_swiglu: gate rows {n} != slots x I {tuple(down_w.shape)} (nor a padded single down "
                         f"projection)")
    return x.new_empty((*x.shape[:-1], down_w.shape[1]))


__all__ = ["fp8_swiglu", "fp8_swiglu_reference", "fp8_swiglu_triton", "silu_mul_quant"]
