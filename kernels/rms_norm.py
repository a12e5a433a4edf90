"""`torch.ops.dsv3.add_rms_norm_quant`: residual add + RMSNorm + FP8 activation quantization in one kernel.

Contract
- h: [..., D] the residual stream, bfloat16/float16/float32. delta: [..., D] the sublayer output to add, same shape
  and dtype. weight: [D] the norm's weight, same dtype as h. eps: float.
- Returns (h_out, y, y_q, y_scale):
  - h_out = h + delta in h.dtype (as torch's add: fp32 sum rounded once to h.dtype);
  - y = exactly the model's RMSNorm (`dsv3.model.RMSNorm`, HF rounding) of h_out:
    `xf = h_out.float(); xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps); y = weight * xf.to(h.dtype)`
    (the last product is one of two h.dtype tensors: computed in fp32, rounded to h.dtype);
  - y_q, y_scale = `dsv3.kernels.fp8_blocks.quantize_activation(y)`: float8_e4m3fn [..., D] and float32
    [..., ceil(D/128)], per token per 128 channels (amax/448 with the 1e-4 floor, correctly rounded division,
    RTNE cast; D need not be a multiple of 128: the last block is partial). By contract these are what
    `dsv3.routed_experts` (its optional x_q / x_scale) and the FP8 GEMVs would compute from y themselves.
  All outputs are new contiguous tensors. A caller that only needs h_out and y (the attention side, whose
  projections quantize x inside their GEMV programs) ignores y_q / y_scale: they still cost one write of D bytes +
  D/32 bytes per token, nothing at decode next to the ~2 us a separate launch costs.

`torch.ops.dsv3.add_rms_norm_quant_cublas(h, delta, weight, eps, pad_k_blocks_to)`: the same kernel for a
prefill-sized FP8 MoE layer whose shared experts run on cuBLAS (`dsv3.fp8_swiglu`, `takes_quantized_x`), so x is
quantized once, by the norm, for both kinds of expert (fp8_swiglu's own act_quant launch gone: the 16B's MoE layer
at 4095 tokens 7.6 us faster on the H200, scripts/ab_prefill_norm_quant.py). Returns (h_out, y, y_q, y_scale,
y_scale_cublas): h_out, y as above; y_q [Mp, Kp] e4m3 with y_q[:M, :D] the values above (M = rows, Mp = M rounded
up to 4, Kp = ceil(D/128) blocks rounded up to pad_k_blocks_to blocks; padding rows and columns quantized zeros);
y_scale [..., ceil(D/128)] as above (the routed experts read it: per token its blocks are adjacent, which their
scale loads need); y_scale_cublas [Mp, Kp/128] fp32 with strides (1, Mp). (y_q, y_scale_cublas) is exactly
`act_quant(y.reshape(-1, D), pad_rows_to=4, scales_m_major=True, pad_k=True, pad_k_blocks_to=pad_k_blocks_to)`, what
`scaled_mm_quantized` takes.

Implementations (branch taken at trace time)
- CPU, or h not bfloat16/float16: `add_rms_norm_quant_reference` (plain torch; Inductor fuses it when the model is
  compiled on CPU).
- CUDA, bfloat16/float16, DSV3_NORM_QUANT=torch: `add_rms_norm_quant_torch`, the add and the norm as torch ops (one
  Inductor kernel) and `_act_quant_kernel`: the kernels the model ran before this op (the A/B baseline).
- CUDA, bfloat16/float16, DSV3_NORM_QUANT=fused (the default since timed on the H200, 2026-11-23: 1.3 us per MoE
  layer less at batch 1, 2.1 at batch 8; scripts/gpu_check.sh ab16): `_add_rms_norm_quant_kernel`, one program per token row (grid = number of rows, static
  or dynamic: 1-8 at decode, thousands at prefill), the whole row in registers as a [KB_PAD, 128] tile (D padded to
  a power-of-two number of 128-blocks, masked; 16B D=2048: 16 blocks, 671B D=7168: 64), so the 128-channel blocks
  of y are the tile's rows and `quantize_tile_rcp` quantizes them with no reshape (one division per 128-block, an
  FMA-corrected product per element: `quantize_activation`'s values and scales, see its docstring; the exact
  `quantize_tile` divides per element, which KERNELS.md measured as slow inside a decode kernel). The kernel reproduces the
  reference's rounding points explicitly: h_out rounded to h.dtype before it is squared, the mean a correctly
  rounded division by D, x * r rounded to h.dtype, the weight product in fp32 rounded once. Two per-row fp32
  values are the kernel's own: the order of the sum of squares (torch's is unspecified: CPU and CUDA differ) and
  the reciprocal square root, RN(1 / RN(sqrt(.))) (torch's is not correctly rounded either: MKL on CPU for larger
  tensors, rsqrtf on CUDA; Triton's `rsqrt` is an approximation too). Where either rounds differently y may differ
  from the reference by an ulp; y_q / y_scale are always exactly `quantize_activation` of the kernel's own y.
  Offline sm_90 compile (triton 3.9, ptxas of CUDA 13.4): 89 registers at D=2048 / 4 warps, 145 at D=7168 /
  8 warps, no spills.

Why: at batch-1 decode every launch in the CUDA graph costs ~2 us whatever its bytes. Per MoE layer the model ran
an Inductor kernel for the residual add + RMSNorm and, inside `dsv3.routed_experts`, an `_act_quant_kernel` launch
on the same row; both only read a few KB already in flight, so they merge into one launch and the MoE op takes the
quantized x as given (docs/KERNELS.md, "Not done").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, env_switch, next_pow2, static_int
from dsv3.kernels.fp8_blocks import BLOCK, FP8_DTYPE, quantize_activation
from dsv3.kernels.fp8_linear import act_quant, quantize_tile_rcp

# DSV3_NORM_QUANT (read at trace time): 'fused' runs the one-kernel path on CUDA (the default: faster on the H200,
# scripts/gpu_check.sh ab16), 'torch' the kernels it replaced.
NORM_QUANT_DEFAULT = "fused"
# Above this D the kernel runs 8 warps (see `norm_num_warps`).
NORM_WARPS4_MAX_D = 2048


def rms_norm_rounded(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm arithmetic (HF rounding): normalise in fp32, round to x.dtype, times the weight (a product
    of two x.dtype tensors: fp32, rounded once). dsv3.model.RMSNorm and every op reference use this one function."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_quant_reference(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch, the contract's formulas verbatim (the model's RMSNorm, then fp8_blocks' quantization)."""
    h_out = h + delta
    y = rms_norm_rounded(h_out, weight, eps)
    y_q, y_scale = quantize_activation(y)
    return h_out, y, y_q, y_scale


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def rms_scale(sum_sq, n, eps):
    """1 / sqrt(sum_sq / n + eps) for a row's fp32 sum of squares, with torch's rounding points: a correctly rounded
    mean, eps (fp64 when Inductor passes it) rounded to fp32, RN(1 / RN(sqrt(.))) (Triton's `rsqrt` is an
    approximation)."""
    ms = tl.div_rn(sum_sq, tl.cast(n, tl.float32)) + tl.cast(eps, tl.float32)
    return tl.div_rn(tl.full((), 1.0, tl.float32), tl.sqrt_rn(ms))


@triton.jit
def add_rms_norm_tile(hv, dv, w, D, eps, dt: tl.constexpr):
    """h + delta and its RMSNorm for one row held as an fp32 tile (elements past D zero), with the model's rounding
    points: the sum rounded to `dt` (h_out), normalised in fp32, rounded to `dt`, times the weight, rounded again
    (y). Shared by this module's kernel and dsv3.kernels.norm_route's."""
    ho = (hv + dv).to(dt)
    xf = ho.to(tl.float32)
    # squares of 16-bit floats are exact in fp32; only the order of this sum is the kernel's own
    r = rms_scale(tl.sum(tl.sum(xf * xf, axis=1), axis=0), D, eps)
    return ho, (w * (xf * r).to(dt).to(tl.float32)).to(dt)


@triton.jit
def _add_rms_norm_quant_kernel(
    h_ptr, d_ptr, w_ptr, ho_ptr, y_ptr, q_ptr, s_ptr, sc_ptr,
    M, D, KP, eps, stride_h, stride_d, stride_ho, stride_y, stride_q, stride_s, stride_scm, stride_sck,
    CUBLAS: tl.constexpr, KB_PAD: tl.constexpr,
):
    """Row `program_id(0)`: h_out, y (h's dtype), y_q (e4m3) and y_scale [ceil(D/128)] (fp32). The row is one
    [KB_PAD, 128] tile (KB_PAD >= ceil(KP/128), a power of two); elements past D load as zeros, so the padding
    adds nothing to the sum of squares and quantizes as quantize_activation's zero padding does. y_q is written up
    to column KP >= D. CUBLAS: the scales again at sc_ptr (M-major for cuBLAS, every block of KP), and rows M.. of
    the grid (cuBLAS's row padding) load nothing and write only y_q and those scales: quantized zeros, as
    `act_quant`'s padding rows. `eps` may arrive as fp64 (Inductor passes Python floats so): rounded to fp32 here,
    as torch rounds the scalar it adds."""
    row = tl.program_id(0).to(tl.int64)
    offs_b = tl.arange(0, KB_PAD)
    offs = offs_b[:, None] * 128 + tl.arange(0, 128)[None, :]
    d_row = tl.where(row < M, D, 0)  # a padding row: nothing to load or store but its quantized zeros
    mask = offs < d_row
    dt = ho_ptr.dtype.element_ty
    hv = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    dv = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ho, y = add_rms_norm_tile(hv, dv, w, D, eps, dt)
    tl.store(ho_ptr + row * stride_ho + offs, ho, mask=mask)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)
    q, s = quantize_tile_rcp(y.to(tl.float32))
    tl.store(q_ptr + row * stride_q + offs, q, mask=offs < KP)
    tl.store(s_ptr + row * stride_s + offs_b, s, mask=offs_b < tl.cdiv(d_row, 128))
    if CUBLAS:
        tl.store(sc_ptr + row * stride_scm + offs_b * stride_sck, s, mask=offs_b < tl.cdiv(KP, 128))


def norm_num_warps(d: int) -> int:
    """4 warps up to D = 2048 (16B: 16 values of each [KB_PAD, 128] tile per thread, 16-byte loads), 8 above
    (671B, D = 7168 padded to 8192: 32 per thread instead of 64, which keeps h, delta, weight and the fp32 row
    within registers with no spills). At decode each row is one program on one SM, so more warps also mean more
    loads in flight for that row."""
    return 4 if d <= NORM_WARPS4_MAX_D else 8


def _launch(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, y_q: torch.Tensor,
            y_scale: torch.Tensor, y_scale_cublas: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One `_add_rms_norm_quant_kernel` launch into y_q [rows (or Mp), Kp] and the scales; returns (h_out, y)."""
    d = static_int(h.shape[-1])
    assert d is not None, "add_rms_norm_quant: the hidden size must be static"
    h2 = h.reshape(-1, d)
    d2 = delta.reshape(-1, d)
    h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
    d2 = d2 if d2.stride(-1) == 1 else d2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    h_out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    y = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    m = h2.shape[0]
    if static_int(m) == 0:
        return h_out, y
    q2 = y_q.view(-1, y_q.shape[-1])
    kp = q2.shape[1]
    # without CUBLAS sc_ptr is unused: a private empty tensor, not y_scale a second time (torch's wrap_triton
    # analysis may take a tensor passed as two arguments that one kernel writes to need a copy first)
    sc = torch.empty((1, 1), dtype=torch.float32, device=h.device) if y_scale_cublas is None else y_scale_cublas
    wrap_triton(_add_rms_norm_quant_kernel)[(q2.shape[0],)](
        h2, d2, weight, h_out, y, q2, y_scale, sc,
        m, d, kp, eps, h2.stride(0), d2.stride(0), d, d, kp, y_scale.shape[-1], sc.stride(-2), sc.stride(-1),
        CUBLAS=y_scale_cublas is not None, KB_PAD=next_pow2(cdiv(kp, BLOCK)), num_warps=norm_num_warps(d),
    )
    return h_out, y


def add_rms_norm_quant_triton(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA path (bfloat16/float16 h): one `_add_rms_norm_quant_kernel` launch, one program per row."""
    y_q = torch.empty(h.shape, dtype=FP8_DTYPE, device=h.device)
    y_scale = torch.empty((*h.shape[:-1], cdiv(h.shape[-1], BLOCK)), dtype=torch.float32, device=h.device)
    return (*_launch(h, delta, weight, eps, y_q, y_scale, None), y_q, y_scale)


def cublas_outputs(shape, device: torch.device, pad_k_blocks_to: int) -> tuple[torch.Tensor, ...]:
    """Empty (y_q [Mp, Kp], y_scale [..., ceil(D/128)], y_scale_cublas [Mp, Kp/128] M-major) of
    `add_rms_norm_quant_cublas` for h of `shape`."""
    y_q, y_scale_cublas = cublas_layout(shape, device, pad_k_blocks_to)
    y_scale = torch.empty((*shape[:-1], cdiv(shape[-1], BLOCK)), dtype=torch.float32, device=device)
    return y_q, y_scale, y_scale_cublas


def cublas_layout(shape, device: torch.device, pad_k_blocks_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (x_q [Mp, Kp] e4m3, x_scale [Mp, Kp/128] fp32 M-major): act_quant's cuBLAS layout for an activation of
    `shape` (rows padded to 4, K blocks to a multiple of pad_k_blocks_to)."""
    m = 1
    for n in shape[:-1]:
        m = m * n
    mp, kb = cdiv(m, 4) * 4, cdiv(shape[-1], BLOCK)
    kbt = cdiv(kb, pad_k_blocks_to) * pad_k_blocks_to
    return (torch.empty((mp, kbt * BLOCK), dtype=FP8_DTYPE, device=device),
            torch.empty((kbt, mp), dtype=torch.float32, device=device).t())


def add_rms_norm_quant_cublas_triton(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, pad_k_blocks_to: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`add_rms_norm_quant_cublas` on CUDA: the same kernel, one program per row and per padding row."""
    y_q, y_scale, y_scale_cublas = cublas_outputs(h.shape, h.device, pad_k_blocks_to)
    return (*_launch(h, delta, weight, eps, y_q, y_scale, y_scale_cublas), y_q, y_scale, y_scale_cublas)


def add_rms_norm_quant_cublas_reference(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, pad_k_blocks_to: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: the reference, then quantize_activation of y padded with zero rows and columns."""
    h_out, y, _, y_scale = add_rms_norm_quant_reference(h, delta, weight, eps)
    y_q, y_scale_cublas = cublas_layout(h.shape, h.device, pad_k_blocks_to)
    y2 = y.reshape(-1, y.shape[-1])
    q, s = quantize_activation(F.pad(y2, (0, y_q.shape[1] - y2.shape[1], 0, y_q.shape[0] - y2.shape[0])))
    y_q.copy_(q)
    y_scale_cublas.copy_(s)
    return h_out.contiguous(), y.contiguous(), y_q, y_scale.contiguous(), y_scale_cublas


def _check_args(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> None:
    torch._check(delta.dim() == h.dim() and delta.dtype == h.dtype,
                 lambda: f"add_rms_norm_quant: delta {tuple(delta.shape)} {delta.dtype} vs h {tuple(h.shape)} {h.dtype}")
    torch._check(weight.dim() == 1 and weight.shape[0] == h.shape[-1] and weight.dtype == h.dtype,
                 lambda: f"add_rms_norm_quant: weight {tuple(weight.shape)} {weight.dtype} vs h {tuple(h.shape)} {h.dtype}")


def add_rms_norm_quant_torch(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA without the fused kernel: the add and the norm as torch ops (Inductor fuses them into one kernel, as it
    did before this op existed) and the quantization as `_act_quant_kernel`, the launch routed_experts made itself:
    the same kernels and numerics as the model had, so the fused kernel can be timed against exactly this."""
    h_out = h + delta
    y = rms_norm_rounded(h_out, weight, eps)
    y_q, y_scale = act_quant(y.reshape(-1, y.shape[-1]))
    return h_out, y, y_q.view(y.shape), y_scale.view(*y.shape[:-1], y_scale.shape[-1])


def norm_quant_choice() -> str:
    return env_switch("DSV3_NORM_QUANT", NORM_QUANT_DEFAULT, ("fused", "torch"))


@triton_op("dsv3::add_rms_norm_quant", mutates_args=())
def add_rms_norm_quant(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Device branch resolved at trace time, as the other ops: plain torch on CPU; on CUDA the fused kernel when
    # DSV3_NORM_QUANT=fused, else the torch ops + act-quant launch it replaces.
    _check_args(h, delta, weight)
    if h.device.type == "cpu" or h.dtype not in (torch.bfloat16, torch.float16):
        return tuple(t.contiguous() for t in add_rms_norm_quant_reference(h, delta, weight, eps))
    if norm_quant_choice() == "torch":
        return add_rms_norm_quant_torch(h, delta, weight, eps)
    return add_rms_norm_quant_triton(h, delta, weight, eps)


@triton_op("dsv3::add_rms_norm_quant_cublas", mutates_args=())
def add_rms_norm_quant_cublas(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, pad_k_blocks_to: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # the reference on CPU, the kernel on CUDA (the model does not call this op with DSV3_NORM_QUANT=torch, whose
    # baseline is the earlier kernels: MoE.quantizes_x_for_cublas)
    _check_args(h, delta, weight)
    if h.device.type == "cpu" or h.dtype not in (torch.bfloat16, torch.float16):
        return add_rms_norm_quant_cublas_reference(h, delta, weight, eps, pad_k_blocks_to)
    return add_rms_norm_quant_cublas_triton(h, delta, weight, eps, pad_k_blocks_to)


@add_rms_norm_quant_cublas.register_fake
def _add_rms_norm_quant_cublas_fake(h, delta, weight, eps, pad_k_blocks_to):
    _check_args(h, delta, weight)
    return (h.new_empty(h.shape), h.new_empty(h.shape), *cublas_outputs(h.shape, h.device, pad_k_blocks_to))


@add_rms_norm_quant.register_fake
def _add_rms_norm_quant_fake(h, delta, weight, eps):
    _check_args(h, delta, weight)
    shape = h.shape
    return (h.new_empty(shape), h.new_empty(shape), h.new_empty(shape, dtype=FP8_DTYPE),
            h.new_empty((*shape[:-1], cdiv(shape[-1], BLOCK)), dtype=torch.float32))


__all__ = ["add_rms_norm_quant", "add_rms_norm_quant_cublas", "add_rms_norm_quant_cublas_reference",
           "add_rms_norm_quant_cublas_triton", "add_rms_norm_quant_reference", "add_rms_norm_quant_triton",
           "cublas_layout", "cublas_outputs", "norm_num_warps"]
