"""dsv3::fp8_swiglu: a SwiGLU MLP with FP8 block-scaled weights, down(silu(gate(x)) * up(x)), for prefill-sized M.

Contract:
    x [..., D] bf16/fp32; gate_w, up_w [N, D] e4m3 with gate_s, up_s [N/128, D/128] fp32 (N = S * I);
    or up_w, up_s None (together) and gate_w [2N, D] the gate rows then the up rows (N a multiple of 128), gate_s
    its [2N/128, D/128] scales: a fused gate / up weight, one GEMM on the cuBLAS path instead of two (16B shared
    experts, N 2816: 17.9 -> 9.5 us at M 384, 90.9 -> 81.3 at 4096 on the H200, scripts/try_shared_gate_up.py);
    elsewhere split into its halves, so the result is the two halves' bit for bit.
    down_w [S, D, I] e4m3 with down_s [S, D/128, ceil(I/128)]: S down projections, one per I-column slice of
    h = silu(g) * u, summed. S = 1 is a plain MLP (dense layers, an unstacked shared MLP); S > 1 the stacked shared
    experts of world size 1 (their gate/up rows are consecutive rows of one matrix, their down projections separate
    slots). Returns [..., D] in x's dtype: sum_s fp8_linear(h[:, s*I:(s+1)*I], down_w[s], down_s[s]).
    Or S = 1 with I > N, a multiple of 128: the down projection's columns past N are zero padding (weights and
    scales), h is taken as padded with zeros: the stacked shared experts' down projections laid side by side and
    padded once at load (RoutedExperts.add_prefill_copies_), so no call copies them.
    x_q, x_scale (optional, together): x already quantized in the layout the cuBLAS path takes, exactly
    `act_quant(x.reshape(-1, D), pad_rows_to=4, scales_m_major=True, pad_k=True, pad_k_blocks_to=P)` with P =
    QUANTIZED_X_K_BLOCKS (or any P the call's cuBLAS path takes), as `dsv3.add_rms_norm_quant_cublas` writes it
    (its y_q, y_scale_cublas); read on the cuBLAS path (`takes_quantized_x`), ignored elsewhere (they equal what is
    computed there).

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

from dsv3.kernels._launch import cdiv, env_switch, static_int
from dsv3.kernels.fp8_blocks import BLOCK, FP8_DTYPE
from dsv3.kernels.fp8_linear import (
    GEMV_MAX_M,
    act_quant,
    act_quant_launch,
    fp8_linear_reference,
    fp8_linear_triton,
    quantize_tile_rcp,
    scaled_mm_k_blocks,
    scaled_mm_hardware,
    scaled_mm_quantized,
    scaled_mm_usable,
)
from dsv3.kernels.routed_experts import _swiglu


def _gate_rows(gate_w: torch.Tensor, up_w: torch.Tensor | None, up_s: torch.Tensor | None) -> int:
    """N, the gate projection's rows: all of gate_w's, or half of a fused gate / up weight's (up_w None)."""
    torch._check((up_w is None) == (up_s is None), lambda: "fp8_swiglu: give up_w and up_s together (or neither)")
    if up_w is not None:
        return gate_w.shape[0]
    rows = gate_w.shape[0]
    # whole 128-row blocks per half: the scale rows split between gate and up
    torch._check(rows % (2 * BLOCK) == 0, lambda: f"fp8_swiglu: a fused gate / up weight (up_w None) needs 2N rows "
                                                  f"with N a multiple of {BLOCK}, got {rows}")
    return rows // 2


def _split_gate_up(gate_w: torch.Tensor, gate_s: torch.Tensor, up_w: torch.Tensor | None,
                   up_s: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(gate_w, gate_s, up_w, up_s), a fused gate / up weight (up_w None) as its two halves (views)."""
    if up_w is not None:
        return gate_w, gate_s, up_w, up_s
    n = _gate_rows(gate_w, up_w, up_s)
    return gate_w[:n], gate_s[:n // BLOCK], gate_w[n:], gate_s[n // BLOCK:]


def fp8_swiglu_reference(x: torch.Tensor, gate_w: torch.Tensor, gate_s: torch.Tensor, up_w: torch.Tensor | None,
                         up_s: torch.Tensor | None, down_w: torch.Tensor, down_s: torch.Tensor,
                         linear=fp8_linear_reference) -> torch.Tensor:
    """The composition (plain PyTorch with the default `linear`); a fused gate / up weight as its two halves."""
    gate_w, gate_s, up_w, up_s = _split_gate_up(gate_w, gate_s, up_w, up_s)
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
    g_ptr, u_ptr, q_ptr, s_ptr, M, N, KP, stride_gm, stride_um, stride_qm, stride_sm, stride_sk,
    ROWS: tl.constexpr, BLOCKS: tl.constexpr,
):
    """ROWS rows x BLOCKS 128-wide blocks per program: h = silu(g) * u rounded as eager PyTorch does in g's dtype,
    quantized per block (one division per block: `quantize_tile_rcp`); columns N..KP are quantized zeros (K padding
    for cuBLAS)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kb = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    cols = kb[:, None] * 128 + tl.arange(0, 128)[None, :]  # [BLOCKS, 128]
    r64 = rows.to(tl.int64)[:, None, None]
    row_ok = (rows < M)[:, None, None]
    mask = row_ok & (cols < N)[None, :, :]
    g = tl.load(g_ptr + r64 * stride_gm + cols[None, :, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + r64 * stride_um + cols[None, :, :], mask=mask, other=0.0)
    # the routed experts' SwiGLU (silu and the product each rounded to the activation dtype, as eager PyTorch)
    h = _swiglu(g.to(tl.float32), u.to(tl.float32), g.dtype)
    q, s = quantize_tile_rcp(tl.reshape(h, (ROWS * BLOCKS, 128)))
    tl.store(q_ptr + r64 * stride_qm + cols[None, :, :], tl.reshape(q, (ROWS, BLOCKS, 128)),
             mask=row_ok & (cols < KP)[None, :, :])
    tl.store(s_ptr + rows.to(tl.int64)[:, None] * stride_sm + kb[None, :] * stride_sk, tl.reshape(s, (ROWS, BLOCKS)),
             mask=(rows < M)[:, None] & (kb < tl.cdiv(KP, 128))[None, :])


def silu_mul_quant(g: torch.Tensor, u: torch.Tensor, pad_k_blocks_to: int = 1, k_blocks: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """g, u [M, N] (N % 128 == 0) -> (e4m3 [M, Kp], fp32 scales [M, Kp/128] M-major): silu(g) * u quantized per
    1x128 block, K padded with zero blocks to at least `k_blocks` blocks, then to a multiple of `pad_k_blocks_to`."""
    m, n = g.shape
    kbt = cdiv(max(cdiv(n, BLOCK), k_blocks), pad_k_blocks_to) * pad_k_blocks_to
    kp = kbt * BLOCK
    q = torch.empty((m, kp), dtype=FP8_DTYPE, device=g.device)
    s = torch.empty((kbt, m), dtype=torch.float32, device=g.device).t()
    # 2 rows per program past decode sizes: [M, 2816] halves 22.8 -> 19.4 us at M 4096, [M, 10944] 70.9 -> 61.6
    # (4 rows measured no better than the old kernel at M >= 1024; H200, scripts/ab_act_quant.py, 2026-11-26)
    rows, blocks, warps = act_quant_launch(m, kbt, rows=2)
    wrap_triton(_silu_mul_quant_kernel)[(cdiv(m, rows), cdiv(kbt, blocks))](
        g, u, q, s, m, n, kp, g.stride(0), u.stride(0), q.stride(0), s.stride(0), s.stride(1), ROWS=rows,
        BLOCKS=blocks, num_warps=warps,
    )
    return q, s


def _cublas_shapes(x2: torch.Tensor, down_w: torch.Tensor) -> bool:
    m = static_int(x2.shape[0])
    if m is not None and m <= GEMV_MAX_M:
        return False  # decode-sized: the GEMV kernels
    return down_w.shape[2] % BLOCK == 0  # I: the slots' K blocks concatenate


def _cublas_path(x2: torch.Tensor, gate_w: torch.Tensor, down_w: torch.Tensor) -> bool:
    return _cublas_shapes(x2, down_w) and scaled_mm_usable(x2, gate_w)


def prefill_norm_quant_choice() -> str:
    """DSV3_PREFILL_NORM_QUANT (read at trace time): 'on' lets the MoE layer's post-attention norm quantize x for
    this op in cuBLAS's layout (`takes_quantized_x`); 'off' keeps this op's own act_quant launch (A/B baseline)."""
    return env_switch("DSV3_PREFILL_NORM_QUANT", "on", ("on", "off"))


# K blocks of a pre-quantized x padded to a multiple of this: what AOTInductor's v1 `_scaled_mm` needs when K/128 is
# not a multiple of 4 (`scaled_mm_k_blocks`), and what the eager call takes as well (it pads the weight's columns to
# match; no copy when K/128 is a multiple of 4, as on the 16B, 236B and 671B): the model asks for the layout while
# dynamo traces it, before anything can tell whether AOTInductor will compile the graph.
QUANTIZED_X_K_BLOCKS = 4


def takes_quantized_x(x: torch.Tensor, down_w: torch.Tensor) -> bool:
    """Whether a call on x (or a tensor of x's shape, dtype and device) can read a pre-quantized x_q / x_scale: the
    cuBLAS path (`_cublas_path` less its AOTInductor switch, which model code traced by dynamo cannot read) unless
    DSV3_PREFILL_NORM_QUANT=off; their layout is `dsv3.add_rms_norm_quant_cublas(...,
    pad_k_blocks_to=QUANTIZED_X_K_BLOCKS)`'s. Inside AOTInductor with DSV3_AOTI_SCALED_MM=0 the op then takes its
    Triton path and ignores them."""
    if prefill_norm_quant_choice() == "off":
        return False
    return _cublas_shapes(x.reshape(-1, x.shape[-1]), down_w) and scaled_mm_hardware(x)


def _check_quantized_x(xq: torch.Tensor, xs: torch.Tensor, m: int, gate_s: torch.Tensor) -> None:
    mp, kb, kbt = cdiv(m, 4) * 4, gate_s.shape[1], xs.shape[1]
    torch._check(xq.shape[0] == mp and xs.shape[0] == mp and xq.shape[1] == kbt * BLOCK and kbt >= kb
                 and kbt % scaled_mm_k_blocks(kb) == 0 and xq.dtype == FP8_DTYPE and xs.dtype == torch.float32,
                 lambda: f"fp8_swiglu: x_q {tuple(xq.shape)} {xq.dtype} / x_scale {tuple(xs.shape)} {xs.dtype} are not "
                         f"a cuBLAS layout of {m} rows x {kb} blocks (takes_quantized_x)")
    torch._check(xs.stride(0) == 1 and xs.stride(1) == mp, lambda: "fp8_swiglu: x_scale must be M-major")


def fp8_swiglu_triton(x: torch.Tensor, gate_w: torch.Tensor, gate_s: torch.Tensor, up_w: torch.Tensor | None,
                      up_s: torch.Tensor | None, down_w: torch.Tensor, down_s: torch.Tensor,
                      x_q: torch.Tensor | None = None, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not _cublas_path(x2, gate_w, down_w):
        return fp8_swiglu_reference(x, gate_w, gate_s, up_w, up_s, down_w, down_s, linear=fp8_linear_triton)
    m = x2.shape[0]
    s, _, i = down_w.shape
    if x_q is not None:  # quantized by the producer of x (add_rms_norm_quant's cuBLAS layout)
        _check_quantized_x(x_q, x_scale, m, gate_s)
        xq, xs = x_q, x_scale
    else:
        xq, xs = act_quant(x2, pad_rows_to=4, scales_m_major=True,
                           pad_k_blocks_to=scaled_mm_k_blocks(gate_s.shape[1]), pad_k=True)
    if up_w is None:  # a fused gate / up weight: one GEMM, [Mp, 2N] (2N whole 128-blocks: no row padding)
        n = _gate_rows(gate_w, up_w, up_s)
        gu = scaled_mm_quantized(xq, xs, gate_w, gate_s, x.dtype)
        g, u = gu[:, :n], gu[:, n:]  # column slices: silu_mul_quant reads them through their row strides
    else:
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
def fp8_swiglu(x: torch.Tensor, gate_w: torch.Tensor, gate_s: torch.Tensor, up_w: torch.Tensor | None,
               up_s: torch.Tensor | None, down_w: torch.Tensor, down_s: torch.Tensor, x_q: torch.Tensor | None = None,
               x_scale: torch.Tensor | None = None) -> torch.Tensor:
    torch._check((x_q is None) == (x_scale is None), lambda: "fp8_swiglu: give x_q and x_scale together")
    _gate_rows(gate_w, up_w, up_s)
    if x.device.type == "cpu":
        return fp8_swiglu_reference(x, gate_w, gate_s, up_w, up_s, down_w, down_s)
    return fp8_swiglu_triton(x, gate_w, gate_s, up_w, up_s, down_w, down_s, x_q, x_scale)


@fp8_swiglu.register_fake
def _fp8_swiglu_fake(x: torch.Tensor, gate_w: torch.Tensor, gate_s: torch.Tensor, up_w: torch.Tensor | None,
                     up_s: torch.Tensor | None, down_w: torch.Tensor, down_s: torch.Tensor, x_q=None, x_scale=None
                     ) -> torch.Tensor:
    n, (s, _, i) = _gate_rows(gate_w, up_w, up_s), down_w.shape
    torch._check(n == s * i or (s == 1 and i > n and i % 128 == 0),
                 lambda: f"fp8_swiglu: gate rows {n} != slots x I {tuple(down_w.shape)} (nor a padded single down "
                         f"projection)")
    torch._check((x_q is None) == (x_scale is None), lambda: "fp8_swiglu: give x_q and x_scale together")
    return x.new_empty((*x.shape[:-1], down_w.shape[1]))


__all__ = ["QUANTIZED_X_K_BLOCKS", "fp8_swiglu", "fp8_swiglu_reference", "fp8_swiglu_triton", "silu_mul_quant",
           "takes_quantized_x"]
