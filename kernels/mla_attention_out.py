"""`torch.ops.dsv3.mla_attention_out`: absorbed MLA attention at decode with its output taken back through W_UV,
`mla_absorb(mla_attention(...), kv_b_weight, kv_b_scale, nope_dim, v_dim, output=True)` as one op.

Why: flash-decoding (dsv3.kernels.mla_attention) writes each split's fp32 partial output; a combine kernel merges
them into the [B, S, H, C] latent output, and the W_UV absorption kernel (dsv3.kernels.mla_absorb) reads that back.
At batch-1 decode both are a few KB of work behind a dependent launch of ~2-3 us each (H200). Here the absorption
kernel merges the partials itself: one launch less per layer and step.

Contract
- q_latent [B, S, H, C], q_pe [B, S, H, R], latent_cache [B, T, C + R], input_pos [B, S], softmax_scale: as
  `dsv3.mla_attention`; kv_b_weight [H * (Dn + Dv), C] (float8_e4m3fn with kv_b_scale [ceil(rows/128),
  ceil(C/128)] fp32, or dense with kv_b_scale None), nope_dim = Dn, v_dim = Dv: as `dsv3.mla_absorb`.
- Returns [B, S, H, Dv] in q_latent.dtype: the composition of the two ops. The attention output is rounded to
  q_latent.dtype before W_UV (as mla_attention returns it), W_UV is dequantized and rounded to that dtype, fp32
  accumulation (as mla_absorb computes).

Implementations (branch taken at trace time)
- CPU, shapes or dtypes either op's kernels do not take, a single split (the attention kernel then writes its
  output directly: nothing to merge), or DSV3_ATTN_OUT=two: the two ops.
- CUDA decode: `_mla_fwd_kernel` (the splits' partials, as mla_attention) then `_mla_combine_absorb_kernel`, grid
  (S*H query rows, Dv / BLOCK_D, B). Each program first loads its BLOCK_D rows of W_UV over the whole C (as
  mla_absorb's CUDA-core kernel `_absorb_o_rows_kernel` does): they do not depend on the attention, so the load
  overlaps the dependent chain that follows (positions and, loaded with them, every split's running max
  (`split_maxima`) -> partials). It then merges its row's partials over all C at once with mla_attention's combine
  code (`combine_channels`), rounds them as mla_attention's output is rounded, and sums per 128-block as
  `_absorb_o_rows_kernel` does. The D blocks of one row each merge the row's partials (n_active x C x 4 bytes from
  L2): BLOCK_D trades that against programs in flight. A first form that merged 128 channels and then loaded that
  block's W_UV, four times over, was slower than the two ops (docs/KERNELS.md).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, env_switch, next_pow2, static_int
from dsv3.kernels.mla_absorb import mla_absorb_reference, w_uv_rows
from dsv3.kernels.mla_attention import (
    DECODE_MAX_S, _triton_ok as attention_triton_ok, active_max, active_splits, combine_block_s, combine_channels,
    combine_splits, mla_attention_reference, mla_attention_split, split_maxima,
)

ATTN_OUT_DEFAULT = "fused"
# W_UV rows per program (by batch), warps, splits per merge step.
# scripts/sweep_attn_out.py on the H200 (2026-11-24; 16 heads, FP8 kv_b_proj, a 4096-row cache, us per call against
# the two ops at context 128 / 1024 / 4031): batch 1 with 16 rows per program 9.45 / 10.74 / 14.16 vs 11.49 / 13.21 /
# 15.69 (16 rows re-merge each row 8 times; 4 rows: 512 programs, slower past context 128); batch 8 with 64 rows
# 13.33 / 22.23 / 30.88 vs 15.04 / 23.49 / 32.48 (16 rows there: 14.93 / 25.42 / 32.41).
ATTN_OUT_ROWS_SMALL_M = 4  # query rows (B * S) up to which the small-batch ladder below applies
ATTN_OUT_WARPS = 4
ATTN_OUT_BLOCK_S = 16
# Every D block of a row merges the row's partials again: Dv / BLOCK_D reads of rows x splits x C x 4 bytes (from L2)
# where the combine kernel read them once. Bounded by the largest measured case (16 heads, batch 1, a 4096-row cache:
# 64 splits at 16 rows per program, 16 MiB at full length, still faster than the two ops); a plan above it takes the
# next block of the ladder (batch 1 with 32 rows measured 0.96-1.0x of the two ops at 1k-4k; 64 rows there up to 1.11x
# slower, so not on its ladder), or the two ops: e.g. a cache of more than 8448 rows at 16 heads (132 splits), or 64
# heads per rank (671B at world size 2): unmeasured, kept on the previous path.
ATTN_OUT_MERGE_BYTES_MAX = 16 << 20
ATTN_OUT_BLOCK_D_LADDER = {True: (16, 32), False: (64,)}
# Query tokens (B * S) above which the two ops run: at batch 32 (16 heads, 4096-row cache, 4 splits) every fused
# configuration was slower, 29.0 / 68.8 us at context 128 / 4031 at best against 22.6 / 62.3 for the two ops (the
# split kernel plus combine, then the W_UV MMA kernel: 512 rows are an MMA's work); at batch 8 the fused kernel
# still wins, 13.3 / 25.4 vs 14.8 / 26.8 (scripts/sweep_attn_out.py, H200, 2026-11-24). Between 8 and 32: unmeasured.
ATTN_OUT_FUSED_MAX_M = 8


def mla_attention_out_reference(q_latent, q_pe, latent_cache, input_pos, softmax_scale: float,
                                kv_b_weight, kv_b_scale, nope_dim: int, v_dim: int) -> torch.Tensor:
    o_latent = mla_attention_reference(q_latent, q_pe, latent_cache, input_pos, softmax_scale)
    return mla_absorb_reference(o_latent, kv_b_weight, kv_b_scale, nope_dim, v_dim, True)


def _two_ops(q_latent, q_pe, latent_cache, input_pos, softmax_scale, kv_b_weight, kv_b_scale, nope_dim, v_dim):
    o_latent = torch.ops.dsv3.mla_attention(q_latent, q_pe, latent_cache, input_pos, softmax_scale)
    return torch.ops.dsv3.mla_absorb(o_latent, kv_b_weight, kv_b_scale, nope_dim, v_dim, True)


@triton.jit
def _mla_combine_absorb_kernel(
    part_ptr, ml_ptr, pos_ptr, w_ptr, s_ptr, out_ptr,
    S, H, C, DN, DV, ROWS_PER_HEAD, N_SPLITS,
    stride_posb, stride_poss, stride_wr, stride_sr, stride_sc, stride_ob, stride_os, stride_oh,
    HAS_SCALE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, C_PAD: tl.constexpr,
    KB_PAD: tl.constexpr, MIN_CHUNK_: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    NS_PAD: tl.constexpr,
):
    """out[b, s, h, d-block] = merge(splits of row (s, h))[:C] @ W_UV[h][d-block, :]^T. NS_PAD: N_SPLITS padded to a
    power of two."""
    row = tl.program_id(0)
    db = tl.program_id(1)
    b = tl.program_id(2)
    odt = out_ptr.dtype.element_ty
    b64 = b.to(tl.int64)
    offs_s, m_all = split_maxima(ml_ptr, b64, row, S * H, N_SPLITS, NS_PAD)  # issued with the first loads
    # This program's W_UV rows over the whole C first, as `_absorb_o_rows_kernel` loads them (`w_uv_rows`): they do
    # not depend on the attention, so their load overlaps the dependent chain below (positions, with the splits'
    # maxima beside them -> partials) instead of following it.
    h_idx = row % H
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < DV
    _, _, w = w_uv_rows(w_ptr, s_ptr, h_idx * ROWS_PER_HEAD + DN + offs_d, d_mask, C, stride_wr, stride_sr, stride_sc,
                        HAS_SCALE, KB_PAD, odt)
    # The row's merged attention output over all C at once (mla_attention's combine, `combine_channels`: the same
    # splits, weights and order per channel), rounded as mla_attention returns it.
    n_active = active_splits(pos_ptr, b, row, S, H, stride_posb, stride_poss, N_SPLITS, MIN_CHUNK_, BLOCK_H, BLOCK_T)
    m_max = active_max(offs_s, m_all, n_active)
    num, den = combine_channels(part_ptr, ml_ptr, b64, row, n_active, m_max, tl.arange(0, KB_PAD * 128), S * H,
                                N_SPLITS, C_PAD, BLOCK_S)
    num = tl.reshape(num, (KB_PAD, 128))
    o = (num / tl.where(den > 0, den, 1.0)).to(odt).to(tl.float32)
    acc = tl.sum(tl.sum(w * o[None, :, :], axis=2), axis=1)
    s_idx = row // H
    tl.store(out_ptr + b64 * stride_ob + s_idx * stride_os + h_idx * stride_oh + offs_d, acc.to(odt), mask=d_mask)


def fused_block_d(m: int, heads: int, n_splits: int, c: int, v_dim: int) -> Optional[int]:
    """The W_UV rows per program of the fused kernel for m query tokens (B * S) of `heads` heads over `n_splits`
    splits, or None (the two ops) above ATTN_OUT_FUSED_MAX_M tokens or where every block of its ladder would re-read
    more partial bytes than ATTN_OUT_MERGE_BYTES_MAX."""
    if m > ATTN_OUT_FUSED_MAX_M:
        return None
    rows = m * heads
    for block_d in ATTN_OUT_BLOCK_D_LADDER[m <= ATTN_OUT_ROWS_SMALL_M]:
        block_d = min(block_d, max(2, next_pow2(v_dim)))
        if cdiv(v_dim, block_d) * rows * n_splits * c * 4 <= ATTN_OUT_MERGE_BYTES_MAX:
            return block_d
    return None


def mla_attention_out_triton(q_latent, q_pe, latent_cache, input_pos, softmax_scale: float, kv_b_weight,
                             kv_b_scale, nope_dim: int, v_dim: int, block_d: Optional[int] = None,
                             num_warps: Optional[int] = None, block_s: Optional[int] = None,
                             **attention_plan) -> torch.Tensor:
    """The CUDA path; `attention_plan` overrides mla_attention's launch plan (tests, sweeps)."""
    bsz, seqlen, heads, c = q_latent.shape
    sa = mla_attention_split(q_latent, q_pe, latent_cache, input_pos, softmax_scale, **attention_plan)
    if sa.part is None:  # one split: the attention output is final, nothing to merge
        return torch.ops.dsv3.mla_absorb(sa.out, kv_b_weight, kv_b_scale, nope_dim, v_dim, True)
    if block_d is None:
        block_d = fused_block_d(bsz * seqlen, heads, sa.n_splits, c, v_dim)
        if block_d is None:  # many query rows, or too much re-merging for this plan: the combine kernel, then W_UV
            return torch.ops.dsv3.mla_absorb(combine_splits(sa, q_latent, input_pos), kv_b_weight, kv_b_scale, nope_dim,
                                             v_dim, True)
    out = torch.empty((bsz, seqlen, heads, v_dim), dtype=q_latent.dtype, device=q_latent.device)
    has_scale = kv_b_scale is not None
    s = kv_b_scale if has_scale else kv_b_weight  # unused without scales
    s_strides = (s.stride(0), s.stride(1)) if has_scale else (0, 0)
    # splits per merge step: the [BLOCK_S, C] partial tile shares the registers with the W_UV tile
    block_s = block_s or min(ATTN_OUT_BLOCK_S, combine_block_s(sa.n_splits))
    wrap_triton(_mla_combine_absorb_kernel)[(seqlen * heads, cdiv(v_dim, block_d), bsz)](
        sa.part, sa.ml, input_pos, kv_b_weight, s, out,
        seqlen, heads, c, nope_dim, v_dim, nope_dim + v_dim, sa.n_splits,
        input_pos.stride(0), input_pos.stride(1), kv_b_weight.stride(0), *s_strides,
        out.stride(0), out.stride(1), out.stride(2),
        HAS_SCALE=has_scale, BLOCK_H=sa.block_h, BLOCK_T=sa.block_t, C_PAD=sa.c_pad,
        KB_PAD=max(1, next_pow2(cdiv(c, 128))), MIN_CHUNK_=sa.min_chunk, BLOCK_S=block_s, BLOCK_D=block_d,
        NS_PAD=sa.ns_pad, num_warps=num_warps or ATTN_OUT_WARPS,
    )
    return out


def attention_out_choice() -> str:
    return env_switch("DSV3_ATTN_OUT", ATTN_OUT_DEFAULT, ("fused", "two"))


def _fusable(q_latent, latent_cache, kv_b_weight, kv_b_scale) -> bool:
    """Decode shapes (static B, S <= DECODE_MAX_S) whose attention and W_UV both run on the Triton kernels."""
    s = static_int(q_latent.shape[1])
    if s is None or s > DECODE_MAX_S or static_int(q_latent.shape[0]) is None:
        return False
    if not attention_triton_ok(q_latent, latent_cache) or kv_b_weight.stride(-1) != 1:
        return False
    if kv_b_scale is not None:
        return kv_b_weight.dtype == torch.float8_e4m3fn
    return kv_b_weight.dtype == q_latent.dtype


@triton_op("dsv3::mla_attention_out", mutates_args=())
def mla_attention_out(q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor,
                      input_pos: torch.Tensor, softmax_scale: float, kv_b_weight: torch.Tensor,
                      kv_b_scale: Optional[torch.Tensor], nope_dim: int, v_dim: int) -> torch.Tensor:
    args = (q_latent, q_pe, latent_cache, input_pos, softmax_scale, kv_b_weight, kv_b_scale, nope_dim, v_dim)
    if q_latent.device.type == "cpu":
        return mla_attention_out_reference(*args)
    if attention_out_choice() == "two" or not _fusable(q_latent, latent_cache, kv_b_weight, kv_b_scale):
        return _two_ops(*args)
    return mla_attention_out_triton(*args)


@mla_attention_out.register_fake
def _mla_attention_out_fake(q_latent, q_pe, latent_cache, input_pos, softmax_scale, kv_b_weight, kv_b_scale,
                            nope_dim, v_dim):
    heads = q_latent.shape[2]
    torch._check(kv_b_weight.shape[0] == heads * (nope_dim + v_dim),
                 lambda: f"mla_attention_out: kv_b_weight has {kv_b_weight.shape[0]} rows, expected {heads} heads x "
                         f"({nope_dim} + {v_dim})")
    torch._check(q_latent.shape[-1] == kv_b_weight.shape[1],
                 lambda: f"mla_attention_out: q_latent {tuple(q_latent.shape)} does not match kv_b_weight "
                         f"{tuple(kv_b_weight.shape)}")
    return q_latent.new_empty((*q_latent.shape[:-1], v_dim))


__all__ = ["mla_attention_out", "mla_attention_out_reference", "mla_attention_out_triton", "attention_out_choice"]
