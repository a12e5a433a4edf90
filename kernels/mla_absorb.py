"""`torch.ops.dsv3.mla_absorb`: multiply per-head activations by W_UK or W_UV^T, read straight from `kv_b_proj`.

Absorbed MLA multiplies each query head's nope part by W_UK (into the 512-wide latent space) and each head's
attention output by W_UV^T (back to v_head_dim). Both matrices are slices of the checkpoint's `kv_b_proj.weight`
([H * (Dn + Dv), C], rows of head h: Dn rows of W_UK then Dv rows of W_UV), FP8 with 128x128 block scales in V3.

Contract
- x: [..., H, Dn] (output=False) or [..., H, C] (output=True), bfloat16/float16/float32.
- weight: [H * (Dn + Dv), C] float8_e4m3fn with weight_scale_inv [ceil(rows/128), ceil(C/128)] fp32, or a dense
  weight with weight_scale_inv None. nope_dim = Dn, v_dim = Dv.
- output=False: out[..., h, c] = sum_d x[..., h, d] * W[h*(Dn+Dv) + d, c]            -> [..., H, C]
  output=True:  out[..., h, d] = sum_c x[..., h, c] * W[h*(Dn+Dv) + Dn + d, c]       -> [..., H, Dv]
  with W the weight dequantized and rounded to x.dtype (as the model's reference einsum uses it), fp32
  accumulation, result in x.dtype.

Implementations (branch taken at trace time)
- CPU, fp32, or more than 64 rows (prefill): `mla_absorb_reference`: dequantize the whole weight once, einsum
  (for prefill the dequantized weight is reused across many tokens, so this is the efficient form).
- CUDA, decode (prod(x.shape[:-2]) statically <= 64): one Triton kernel per direction. Each program owns one
  head and a block of output channels, reads its FP8 weight tile once, dequantizes it in registers (scales
  gathered per element, so heads need not align with the 128-row scale blocks) and runs a tensor-core dot against
  all rows of x (padded to 16). Replaces, per layer and step, a dequantize kernel that wrote the whole weight in
  bf16 and two batched GEMMs that read it back: the weight is read once, in FP8.
  Up to ABSORB_ROWS_MAX_M rows (batch-1 decode), CUDA-core kernels instead (`_absorb_q_rows_kernel`,
  `_absorb_o_rows_kernel`): each program owns a few output channels of one head and loads its whole weight tile at
  once, so hundreds of small programs are in flight rather than 32-64 MMA tiles walking C serially.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, next_pow2, static_int
from dsv3.kernels.fp8_blocks import dequantize_weight
from dsv3.kernels.fp8_linear import k_blocks

DECODE_MAX_M = 64
# Up to this many rows of x (tokens), the CUDA-core kernels (`_absorb_*_rows_kernel`): one weight tile per program
# in one load, many programs. Their launch config per direction (output=False, output=True): output channels per
# program and warps.
ABSORB_ROWS_MAX_M = 4
ABSORB_ROWS_BLOCK = {False: 16, True: 4}
ABSORB_ROWS_WARPS = {False: 4, True: 4}


def mla_absorb_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: Optional[torch.Tensor],
                         nope_dim: int, v_dim: int, output: bool) -> torch.Tensor:
    heads = x.shape[-2]
    w = weight.to(x.dtype) if weight_scale_inv is None else dequantize_weight(weight, weight_scale_inv, x.dtype)
    w = w.view(heads, nope_dim + v_dim, -1)
    if output:
        out = torch.einsum("...hc,hdc->...hd", x, w[:, nope_dim:])
    else:
        out = torch.einsum("...hd,hdc->...hc", x, w[:, :nope_dim])
    return out.contiguous()  # einsum may return a permuted layout; the contract (and the fake) is contiguous


@triton.jit
def _weight_tile(w_ptr, s_ptr, rows, cols, col_block, row_mask, mask, stride_wr, stride_sr, stride_sc,
                 HAS_SCALE: tl.constexpr, dt):
    """Weight elements (rows x cols), dequantized and rounded to the activation dtype `dt` (the reference's W).
    The column tile lies inside one 128-wide scale block (`col_block`), so the scales are one per row: an
    element-wise scale gather needs a 64-bit address per element and spilled registers (27 us per call on the H200)."""
    w = tl.load(w_ptr + rows[:, None] * stride_wr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = tl.load(s_ptr + (rows // 128) * stride_sr + col_block * stride_sc, mask=row_mask, other=0.0)
        w = w * s[:, None]
    return w.to(dt)


@triton.jit
def absorb_q_tile(
    x_ptr, w_ptr, s_ptr, out_ptr, h, cb, M, C, DN, ROWS_PER_HEAD,
    stride_xm, stride_xh, stride_wr, stride_sr, stride_sc, stride_om, stride_oh,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[m, h, c-block cb] = x[m, h, :Dn] @ W_UK[h][:, c-block cb] for all M rows (padded to BLOCK_M >= 16 for
    the tensor cores), Dn in one tile. The body of `_absorb_q_kernel`, shared with the fused decode-prep kernel."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DN)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + h * stride_xh + offs_d[None, :],
                mask=(offs_m < M)[:, None] & (offs_d < DN)[None, :], other=0.0)
    rows = h * ROWS_PER_HEAD + offs_d
    col_block = (cb * BLOCK_C) // 128  # BLOCK_C divides 128
    w = _weight_tile(w_ptr, s_ptr, rows, offs_c, col_block, offs_d < DN,
                     (offs_d < DN)[:, None] & (offs_c < C)[None, :], stride_wr, stride_sr, stride_sc, HAS_SCALE,
                     x.dtype)
    acc = tl.dot(x, w)
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + h * stride_oh + offs_c[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_c < C)[None, :])


@triton.jit
def _absorb_q_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, M, C, DN, ROWS_PER_HEAD,
    stride_xm, stride_xh, stride_wr, stride_sr, stride_sc, stride_om, stride_oh,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[m, h, c-block] = x[m, h, :Dn] @ W_UK[h][:, c-block]; one program per (head, c block), Dn in one tile."""
    absorb_q_tile(x_ptr, w_ptr, s_ptr, out_ptr, tl.program_id(0), tl.program_id(1), M, C, DN, ROWS_PER_HEAD,
                  stride_xm, stride_xh, stride_wr, stride_sr, stride_sc, stride_om, stride_oh,
                  HAS_SCALE, BLOCK_M, BLOCK_DN, BLOCK_C)


@triton.jit
def _absorb_o_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, M, C, DN, DV, ROWS_PER_HEAD,
    stride_xm, stride_xh, stride_wr, stride_sr, stride_sc, stride_om, stride_oh,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[m, h, d-block] = x[m, h, :] @ W_UV[h][d-block, :]^T; one program per (head, d block), loop over C."""
    h = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    rows = h * ROWS_PER_HEAD + DN + offs_d
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + h * stride_xh + cols[None, :],
                    mask=(offs_m < M)[:, None] & (cols < C)[None, :], other=0.0)
        w = _weight_tile(w_ptr, s_ptr, rows, cols, c0 // 128, offs_d < DV,
                         (offs_d < DV)[:, None] & (cols < C)[None, :], stride_wr, stride_sr, stride_sc, HAS_SCALE,
                         x.dtype)
        acc = tl.dot(x, tl.trans(w), acc)
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_d < DV)[None, :])


@triton.jit
def _absorb_q_rows_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, C, DN, ROWS_PER_HEAD,
    stride_xm, stride_xh, stride_wr, stride_sr, stride_sc, stride_om, stride_oh,
    HAS_SCALE: tl.constexpr, M: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """`_absorb_q_kernel` for M <= ABSORB_ROWS_MAX_M tokens on CUDA cores: one program per (head, BLOCK_C output
    channels) with its [Dn, BLOCK_C] weight tile in one load; many small programs instead of a few MMA tiles."""
    h = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_DN)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d_mask = offs_d < DN
    c_mask = offs_c < C
    rows = h * ROWS_PER_HEAD + offs_d
    w = _weight_tile(w_ptr, s_ptr, rows, offs_c, (tl.program_id(1) * BLOCK_C) // 128, d_mask,
                     d_mask[:, None] & c_mask[None, :], stride_wr, stride_sr, stride_sc, HAS_SCALE,
                     x_ptr.dtype.element_ty).to(tl.float32)
    for m in tl.static_range(M):
        x = tl.load(x_ptr + m * stride_xm + h * stride_xh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        acc = tl.sum(w * x[:, None], axis=0)
        tl.store(out_ptr + m * stride_om + h * stride_oh + offs_c, acc.to(out_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def w_uv_rows(w_ptr, s_ptr, rows, d_mask, C, stride_wr, stride_sr, stride_sc, HAS_SCALE: tl.constexpr,
              KB_PAD: tl.constexpr, dt):
    """Weight rows `rows` over the whole C as [BLOCK_D, KB, 128] in one load (one scale per row and 128-block),
    dequantized and rounded to the activation dtype `dt` (the reference's W), in fp32; with the C layout
    (offs_k [KB, 128], its mask) that the activation row is loaded in."""
    offs_b, offs_k, k_mask, kb_mask = k_blocks(C, KB_PAD)
    w = tl.load(w_ptr + rows[:, None, None] * stride_wr + offs_k[None, :, :],
                mask=d_mask[:, None, None] & k_mask[None, :, :], other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = tl.load(s_ptr + (rows // 128)[:, None] * stride_sr + offs_b[None, :] * stride_sc,
                    mask=d_mask[:, None] & kb_mask[None, :], other=0.0)
        w = w * s[:, :, None]
    return offs_k, k_mask, w.to(dt).to(tl.float32)


@triton.jit
def _absorb_o_rows_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, C, DN, DV, ROWS_PER_HEAD,
    stride_xm, stride_xh, stride_wr, stride_sr, stride_sc, stride_om, stride_oh,
    HAS_SCALE: tl.constexpr, M: tl.constexpr, BLOCK_D: tl.constexpr, KB_PAD: tl.constexpr,
):
    """`_absorb_o_kernel` for M <= ABSORB_ROWS_MAX_M tokens on CUDA cores: one program per (head, BLOCK_D output
    channels), its [BLOCK_D, C] rows of W_UV in one load ([BLOCK_D, KB, 128], one scale per row and 128-block)."""
    h = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < DV
    offs_k, k_mask, w = w_uv_rows(w_ptr, s_ptr, h * ROWS_PER_HEAD + DN + offs_d, d_mask, C, stride_wr, stride_sr,
                                  stride_sc, HAS_SCALE, KB_PAD, x_ptr.dtype.element_ty)
    for m in tl.static_range(M):
        x = tl.load(x_ptr + m * stride_xm + h * stride_xh + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        acc = tl.sum(tl.sum(w * x[None, :, :], axis=2), axis=1)
        tl.store(out_ptr + m * stride_om + h * stride_oh + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


def mla_absorb_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: Optional[torch.Tensor],
                      nope_dim: int, v_dim: int, output: bool, block: int = 64, num_warps: int = 4,
                      rows: Optional[bool] = None, rows_block: Optional[int] = None,
                      rows_warps: Optional[int] = None) -> torch.Tensor:
    """The Triton path. `rows` (default: output=True and M <= ABSORB_ROWS_MAX_M): the CUDA-core kernels with `rows_block` output
    channels per program (default ABSORB_ROWS_BLOCK[output]) and `rows_warps` warps; else the MMA kernels with
    `block` and `num_warps`."""
    *lead, heads, k = x.shape
    c = weight.shape[1]
    x3 = x.reshape(-1, heads, k)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    m = x3.shape[0]
    n_out = v_dim if output else c
    out = torch.empty((m, heads, n_out), dtype=x.dtype, device=x.device)
    has_scale = weight_scale_inv is not None
    s = weight_scale_inv if has_scale else weight  # unused without scales
    s_strides = (s.stride(0), s.stride(1)) if has_scale else (0, 0)
    block_m = max(16, next_pow2(m))
    rows_per_head = nope_dim + v_dim
    if rows is None:  # the q direction stays on the MMA kernel: measured faster there (2.97 vs 3.15 us at M=1)
        rows = output and m <= ABSORB_ROWS_MAX_M
    if rows:
        assert m <= ABSORB_ROWS_MAX_M
        rb = rows_block or ABSORB_ROWS_BLOCK[output]
        nw = rows_warps or ABSORB_ROWS_WARPS[output]
        if output:
            wrap_triton(_absorb_o_rows_kernel)[(heads, cdiv(v_dim, rb))](
                x3, weight, s, out, c, nope_dim, v_dim, rows_per_head,
                x3.stride(0), x3.stride(1), weight.stride(0), *s_strides, out.stride(0), out.stride(1),
                HAS_SCALE=has_scale, M=m, BLOCK_D=rb, KB_PAD=next_pow2(cdiv(c, 128)), num_warps=nw,
            )
        else:
            assert 128 % rb == 0
            wrap_triton(_absorb_q_rows_kernel)[(heads, cdiv(c, rb))](
                x3, weight, s, out, c, nope_dim, rows_per_head,
                x3.stride(0), x3.stride(1), weight.stride(0), *s_strides, out.stride(0), out.stride(1),
                HAS_SCALE=has_scale, M=m, BLOCK_DN=max(16, next_pow2(nope_dim)), BLOCK_C=rb, num_warps=nw,
            )
        return out.view(*lead, heads, n_out)
    if output:
        block_d = min(block, max(16, next_pow2(v_dim)))
        wrap_triton(_absorb_o_kernel)[(heads, cdiv(v_dim, block_d))](
            x3, weight, s, out, m, c, nope_dim, v_dim, rows_per_head,
            x3.stride(0), x3.stride(1), weight.stride(0), *s_strides, out.stride(0), out.stride(1),
            HAS_SCALE=has_scale, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_C=128, num_warps=num_warps,
        )
    else:
        block_c = min(128, max(16, next_pow2(c)))
        wrap_triton(_absorb_q_kernel)[(heads, cdiv(c, block_c))](
            x3, weight, s, out, m, c, nope_dim, rows_per_head,
            x3.stride(0), x3.stride(1), weight.stride(0), *s_strides, out.stride(0), out.stride(1),
            HAS_SCALE=has_scale, BLOCK_M=block_m, BLOCK_DN=max(16, next_pow2(nope_dim)), BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return out.view(*lead, heads, n_out)


def _triton_ok(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: Optional[torch.Tensor]) -> bool:
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.stride(-1) != 1:
        return False
    m = static_int(x.numel() // (x.shape[-1] * x.shape[-2])) if x.shape[-1] * x.shape[-2] else None
    if m is None or m == 0 or m > DECODE_MAX_M:
        return False
    return weight.dtype == torch.float8_e4m3fn if weight_scale_inv is not None else weight.dtype == x.dtype


@triton_op("dsv3::mla_absorb", mutates_args=())
def mla_absorb(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: Optional[torch.Tensor], nope_dim: int,
               v_dim: int, output: bool) -> torch.Tensor:
    if x.device.type == "cpu" or not _triton_ok(x, weight, weight_scale_inv):
        return mla_absorb_reference(x, weight, weight_scale_inv, nope_dim, v_dim, output)
    return mla_absorb_triton(x, weight, weight_scale_inv, nope_dim, v_dim, output)


@mla_absorb.register_fake
def _mla_absorb_fake(x, weight, weight_scale_inv, nope_dim, v_dim, output):
    heads = x.shape[-2]
    torch._check(weight.shape[0] == heads * (nope_dim + v_dim),
                 lambda: f"mla_absorb: weight has {weight.shape[0]} rows, expected {heads} heads x "
                         f"({nope_dim} + {v_dim})")
    torch._check(x.shape[-1] == (weight.shape[1] if output else nope_dim),
                 lambda: f"mla_absorb: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    return x.new_empty((*x.shape[:-1], v_dim if output else weight.shape[1]))


__all__ = ["mla_absorb", "mla_absorb_reference", "mla_absorb_triton"]
