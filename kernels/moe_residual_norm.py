"""`torch.ops.dsv3.moe_residual_norm_quant`: a prefill MoE layer's output added to the residual stream, the next
block's input RMSNorm and its FP8 quantization for the attention's input projection, in one kernel.

Why: at prefill the MoE layer's last steps were one Inductor kernel (the weighted sum of each token's routed pair
outputs, the shared experts' output, the residual add and the next block's input RMSNorm, writing h and the normed
x in bf16) and then `act_quant` of x in cuBLAS's layout for the fused q / kv_a GEMM. x in bf16 was written and read
back only to be quantized: this op writes h and x's e4m3 values and scales instead, one launch less per MoE layer.
(Used where `Block.defer_moe_add` is set: world size 1, FP8 weights, the shared experts stacked, prefill-sized T.)

Contract
- h: [..., D] the residual stream (bfloat16/float16/float32); pairs: [T, K, D] in h.dtype, pair (t, k) the output
  of expert topk_idx[t, k] for token t (`dsv3.routed_experts_pairs`; rows whose id is outside [0, n_experts) are
  never read into the sum, so they may hold anything); topk_idx [T, K] int; topk_weight [T, K] float; shared:
  [..., D] the shared experts' output (h's shape and dtype); weight: [D] the norm's weight; eps: float;
  pad_k_blocks_to: the cuBLAS layout's K padding (`QUANTIZED_X_K_BLOCKS`). T = the number of rows of h.
- Returns (h_out, x_q, x_scale):
  - moe = (combine_pairs(pairs, topk_idx, topk_weight, n_experts) + shared) in h.dtype: the routed sum in fp32
    rounded to h.dtype, then the shared output added and rounded, as the model's `experts(...) + slots_as_mlp(...)`;
  - h_out = h + moe in h.dtype; x = the model's RMSNorm of h_out (`rms_norm_rounded`);
  - (x_q [Mp, Kp] e4m3, x_scale [Mp, Kp/128] fp32 with strides (1, Mp)) = exactly `act_quant(x.reshape(-1, D),
    pad_rows_to=4, scales_m_major=True, pad_k=True, pad_k_blocks_to=pad_k_blocks_to)`, what `scaled_mm_quantized`
    takes (Mp = T rounded up to 4, padding rows and columns quantized zeros): the same layout as
    `dsv3.add_rms_norm_quant_cublas`'s (y_q, y_scale_cublas).
  The reference is `add_rms_norm_quant_cublas_reference(h, moe, ...)`'s h_out, y_q and y_scale_cublas: one formula
  for both ops. The kernel reproduces every rounding point above; the order of the sum of squares and the
  reciprocal square root are `add_rms_norm_tile`'s (an ulp of x may differ from the CPU reference, the e4m3 values
  are then exactly those of the kernel's own x).

Implementations (branch taken at trace time)
- CPU, or h not bfloat16/float16: the reference (plain torch; Inductor fuses it when compiled on CPU).
- CUDA: `_moe_residual_norm_quant_kernel`, one program per row of x_q (T rows, then the padding rows), the row in
  registers as a [KB_PAD, 128] tile as `_add_rms_norm_quant_kernel` holds it; the K pair rows of the token are read
  with the static K unrolled, so all of the row's loads are in flight at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, env_switch, next_pow2, static_int
from dsv3.kernels.fp8_blocks import BLOCK
from dsv3.kernels.fp8_linear import quantize_tile_rcp
from dsv3.kernels.rms_norm import add_rms_norm_quant_cublas_reference, add_rms_norm_tile, cublas_layout, norm_num_warps
from dsv3.kernels.routed_experts import combine_pairs

# DSV3_MOE_RESIDUAL (read at trace time): 'fused' lets the model hand a prefill MoE layer's output to the next block
# unadded (this op), 'torch' keeps the add in the MoE block (Inductor's kernel + act_quant: the A/B baseline).
MOE_RESIDUAL_DEFAULT = "fused"


def moe_residual_choice() -> str:
    return env_switch("DSV3_MOE_RESIDUAL", MOE_RESIDUAL_DEFAULT, ("fused", "torch"))


def moe_residual_norm_quant_reference(
    h: torch.Tensor, pairs: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, shared: torch.Tensor,
    n_experts: int, weight: torch.Tensor, eps: float, pad_k_blocks_to: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch: the model's combine and add, then `add_rms_norm_quant_cublas`'s reference."""
    moe = combine_pairs(pairs, topk_idx, topk_weight, n_experts).view(h.shape) + shared
    h_out, _, y_q, _, y_scale_cublas = add_rms_norm_quant_cublas_reference(h, moe, weight, eps, pad_k_blocks_to)
    return h_out, y_q, y_scale_cublas


@triton.jit
def _moe_residual_norm_quant_kernel(
    h_ptr, p_ptr, idx_ptr, tw_ptr, sh_ptr, w_ptr, ho_ptr, q_ptr, sc_ptr,
    M, D, KP, N_EXPERTS, eps, stride_h, stride_p, stride_i, stride_tw, stride_sh, stride_q, stride_scm, stride_sck,
    K: tl.constexpr, KB_PAD: tl.constexpr,
):
    """Row `program_id(0)` (module docstring); rows M.. (cuBLAS's padding) load nothing and write quantized zeros.
    The pair rows of token t are rows t * K + k of pairs viewed as [T * K, D] (row stride stride_p)."""
    row = tl.program_id(0).to(tl.int64)
    offs_b = tl.arange(0, KB_PAD)
    offs = offs_b[:, None] * 128 + tl.arange(0, 128)[None, :]
    live = row < M
    d_row = tl.where(live, D, 0)
    mask = offs < d_row
    dt = ho_ptr.dtype.element_ty
    # combine_pairs: acc = term_0 + term_1 + ... in fp32, term_k = topk_weight * pair where the id is valid, else 0
    # (a select: an invalid pair's row was never written and may hold NaN)
    acc = tl.zeros((KB_PAD, 128), dtype=tl.float32)
    for k in tl.static_range(K):
        e = tl.load(idx_ptr + row * stride_i + k, mask=live, other=-1)
        wk = tl.load(tw_ptr + row * stride_tw + k, mask=live, other=0.0).to(tl.float32)
        pv = tl.load(p_ptr + (row * K + k) * stride_p + offs, mask=mask, other=0.0).to(tl.float32)
        term = tl.where((e >= 0) & (e < N_EXPERTS), pv * wk, 0.0)
        if k == 0:
            acc = term
        else:
            acc = acc + term
    sv = tl.load(sh_ptr + row * stride_sh + offs, mask=mask, other=0.0).to(tl.float32)
    moe = (acc.to(dt).to(tl.float32) + sv).to(dt).to(tl.float32)  # routed rounded, + shared rounded
    hv = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ho, y = add_rms_norm_tile(hv, moe, w, D, eps, dt)
    tl.store(ho_ptr + row * stride_h + offs, ho, mask=mask)
    q, s = quantize_tile_rcp(y.to(tl.float32))
    tl.store(q_ptr + row * stride_q + offs, q, mask=offs < KP)
    tl.store(sc_ptr + row * stride_scm + offs_b * stride_sck, s, mask=offs_b < tl.cdiv(KP, 128))


def moe_residual_norm_quant_triton(
    h: torch.Tensor, pairs: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, shared: torch.Tensor,
    n_experts: int, weight: torch.Tensor, eps: float, pad_k_blocks_to: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = static_int(h.shape[-1])
    assert d is not None, "moe_residual_norm_quant: the hidden size must be static"
    k = static_int(pairs.shape[1])
    assert k is not None, "moe_residual_norm_quant: the pairs per token must be static"
    # (no-op copies for the model's tensors; h, shared and h_out then share the row stride D)
    h2, p2, sh2 = h.reshape(-1, d).contiguous(), pairs.reshape(-1, d).contiguous(), shared.reshape(-1, d).contiguous()
    weight, topk_idx, topk_weight = weight.contiguous(), topk_idx.contiguous(), topk_weight.contiguous()
    h_out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    x_q, x_scale = cublas_layout(h.shape, h.device, pad_k_blocks_to)
    m = h2.shape[0]
    kp = x_q.shape[1]
    wrap_triton(_moe_residual_norm_quant_kernel)[(x_q.shape[0],)](
        h2, p2, topk_idx, topk_weight, sh2, weight, h_out, x_q, x_scale,
        m, d, kp, n_experts, eps, d, p2.stride(0), topk_idx.stride(0), topk_weight.stride(0), d, kp,
        x_scale.stride(0), x_scale.stride(1),
        K=k, KB_PAD=next_pow2(cdiv(kp, BLOCK)), num_warps=norm_num_warps(d),
    )
    return h_out, x_q, x_scale


def _check_args(h, pairs, topk_idx, topk_weight, shared, weight) -> None:
    torch._check(pairs.dim() == 3 and pairs.shape[-1] == h.shape[-1] and pairs.dtype == h.dtype,
                 lambda: f"moe_residual_norm_quant: pairs {tuple(pairs.shape)} {pairs.dtype} vs h {tuple(h.shape)}")
    torch._check(topk_idx.shape == pairs.shape[:2] and topk_weight.shape == pairs.shape[:2],
                 lambda: f"moe_residual_norm_quant: topk_idx {tuple(topk_idx.shape)} / topk_weight "
                         f"{tuple(topk_weight.shape)} vs pairs {tuple(pairs.shape)}")
    torch._check(shared.shape == h.shape and shared.dtype == h.dtype,
                 lambda: f"moe_residual_norm_quant: shared {tuple(shared.shape)} {shared.dtype} vs h {tuple(h.shape)}")
    torch._check(weight.dim() == 1 and weight.shape[0] == h.shape[-1] and weight.dtype == h.dtype,
                 lambda: f"moe_residual_norm_quant: weight {tuple(weight.shape)} {weight.dtype} vs h {tuple(h.shape)}")


@triton_op("dsv3::moe_residual_norm_quant", mutates_args=())
def moe_residual_norm_quant(
    h: torch.Tensor, pairs: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, shared: torch.Tensor,
    n_experts: int, weight: torch.Tensor, eps: float, pad_k_blocks_to: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the reference on CPU, the kernel on CUDA (device branch resolved at trace time, as the other ops)
    _check_args(h, pairs, topk_idx, topk_weight, shared, weight)
    args = (h, pairs, topk_idx, topk_weight, shared, n_experts, weight, eps, pad_k_blocks_to)
    if h.device.type == "cpu" or h.dtype not in (torch.bfloat16, torch.float16):
        return tuple(t.contiguous() if i == 0 else t for i, t in enumerate(moe_residual_norm_quant_reference(*args)))
    return moe_residual_norm_quant_triton(*args)


@moe_residual_norm_quant.register_fake
def _moe_residual_norm_quant_fake(h, pairs, topk_idx, topk_weight, shared, n_experts, weight, eps, pad_k_blocks_to):
    _check_args(h, pairs, topk_idx, topk_weight, shared, weight)
    x_q, x_scale = cublas_layout(h.shape, h.device, pad_k_blocks_to)
    return h.new_empty(h.shape), x_q, x_scale


__all__ = ["moe_residual_choice", "moe_residual_norm_quant", "moe_residual_norm_quant_reference",
           "moe_residual_norm_quant_triton"]
