"""`torch.ops.dsv3.mla_attention`: absorbed multi-head latent attention over the static latent cache.

Contract
- q_latent: [B, S, H, C] (queries already multiplied by W_UK, C = kv_lora_rank), q_pe: [B, S, H, R] (roped),
  latent_cache: [B, T, C + R] (per token: kv_norm(c_kv) then roped k_pe; head-free; T = cache capacity),
  input_pos: [B, S] int64, the absolute position of each query token; softmax_scale: float (YaRN mscale included).
- Query (b, s) attends to cache rows t <= input_pos[b, s] (causal; rows past a sequence's length are never read,
  so stale or padding entries there are harmless).
  score = (q_latent . cache[..., :C] + q_pe . cache[..., C:]) * softmax_scale, softmax in fp32,
  out[b, s, h] = sum_t p[t] * cache[b, t, :C].
- Returns [B, S, H, C] in q_latent.dtype (the caller applies W_UV).

Implementations (branch taken at trace time)
- CPU, or fp32 inputs: `mla_attention_reference` (einsum over the whole cache, masked).
- CUDA, bf16/fp16: one Triton kernel for every S, `_mla_fwd_kernel`. Rows are the (s, h) pairs of one sequence
  (s-major), BLOCK_H of them per program, so each cache tile is loaded once for BLOCK_H heads (the cache is
  head-free). A program walks cache rows [0, L) with L = 1 + max input_pos over its rows, read on the device (no
  host sync, no dependence on the cache capacity), with an online softmax (exp2, fp32 statistics; P is rounded to
  the cache dtype for the P.V product, as in flash attention). Causality is a per-row mask t <= input_pos[row].
  * Decode / speculative verify (S statically <= 16: few rows, long context): flash-decoding. The grid has a
    static number of splits per (sequence, row block), sized to fill the GPU; each program takes an equal share
    of [0, L) (at least min_chunk = 128 rows), splits past L exit at once, and
    `_mla_combine_kernel` (one program per query row and 32 channels, or the whole row at >= 128 rows over <= 16
    splits: `combine_config`; splits reduced up to 64 at a time) merges the partials of the splits that ran (it
    recomputes L the same way). Partials are unnormalized split outputs in fp32 (`mla_partials`; bf16 halves their
    bytes), statistics (max, sum) in fp32.
  * Blocks hold min(64, next_pow2(S*H)) rows (>= 16). H = 16 per rank at decode: 16-row blocks, 8 warps
    (mma.sync); H = 128 or prefill: 64-row blocks, 8 warps (wgmma). BLOCK_T = 64 cache rows per step, 2 stages.
    At H = 16 (`mla_plan`): 128-row steps over caches of 8192+ rows where a split is one step; 64-row steps in 3
    stages wherever a split covers several steps at a full cache.
    `swap=True` selects a transposed formulation (cache rows on the MMA's M side, q in shared memory); it is
    tested but not the default: on the H200 it was no faster (2026-11-22 sweep, docs/KERNELS.md).
  * Prefill (S larger or dynamic): one split; rows of a block are consecutive query positions, so the loop stops
    at the block's causal bound. No [S, T] score tensor is ever materialized.
- Small head dims (C=72, R=8 in tests) are padded to powers of two (>= 16) with masks.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, env_switch, next_pow2, num_sms, static_int

DECODE_MAX_S = 16
LOG2E = 1.4426950408889634


def mla_attention_reference(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    c = q_latent.shape[-1]
    kv = latent_cache[..., :c].float()
    pe = latent_cache[..., c:].float()
    scores = torch.einsum("bshc,btc->bsht", q_latent.float(), kv) + torch.einsum("bshr,btr->bsht", q_pe.float(), pe)
    scores = scores * softmax_scale
    t = torch.arange(latent_cache.shape[1], device=latent_cache.device)
    visible = t[None, None, None, :] <= input_pos[:, :, None, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bsht,btc->bshc", probs, kv).to(q_latent.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _split_chunk(pos, N_SPLITS, MIN_CHUNK_: tl.constexpr, BLOCK_T: tl.constexpr):
    """From a row block's positions (loaded by the caller: see `_mla_fwd_kernel`): L = 1 + max position and the
    split chunk length."""
    length = tl.max(pos, axis=0) + 1
    chunk = tl.cdiv(tl.cdiv(length, N_SPLITS), BLOCK_T) * BLOCK_T
    chunk = tl.maximum(chunk, MIN_CHUNK_)
    return length, chunk


@triton.jit
def _mla_fwd_kernel(
    q_ptr, qpe_ptr, cache_ptr, pos_ptr, out_ptr, part_ptr, ml_ptr, lse_ptr,
    S, H, C, R, N_SPLITS, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_pb_, stride_ps_, stride_ph_,
    stride_cb, stride_ct, stride_posb, stride_poss,
    stride_ob, stride_os, stride_oh, stride_oc,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, C_PAD: tl.constexpr, R_PAD: tl.constexpr,
    MIN_CHUNK_: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr, PREFIX: tl.constexpr,
):
    """PREFIX (dsv3.mla_prefix_attention; one split, not SWAP): every row of sequence b sees exactly the cache rows
    t < input_pos[b, 0], and the program also writes each row's log-sum-exp (natural log; -inf and zeros when
    that prefix is empty) to lse_ptr ([B, S, H] fp32)."""
    rb = tl.program_id(0)  # row blocks first: prefill can have more than 65535 of them
    sp = tl.program_id(1)
    b = tl.program_id(2)
    # the positions loaded here, not in a helper: Inductor's mutation analysis of the TTIR takes every argument of a
    # called function whose result addresses a store as written, and took input_pos as written (a copy in compiled
    # graphs) when a helper loaded them
    rows = rb * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < S * H
    pos = tl.load(pos_ptr + b * stride_posb + (rows // H) * stride_poss, mask=row_mask, other=-1)
    length, chunk = _split_chunk(pos, N_SPLITS, MIN_CHUNK_, BLOCK_T)
    if PREFIX:
        length = tl.load(pos_ptr + b * stride_posb)
        pos = tl.where(row_mask, length - 1, -1)
        chunk = tl.maximum(length, 1)
    start = sp * chunk
    if start < length:
        end = tl.minimum(start + chunk, length)
        s_idx = rows // H
        h_idx = rows % H
        offs_c = tl.arange(0, C_PAD)
        offs_r = tl.arange(0, R_PAD)
        c_mask = offs_c < C
        r_mask = offs_r < R
        b64 = b.to(tl.int64)
        q = tl.load(q_ptr + b64 * stride_qb + s_idx[:, None] * stride_qs + h_idx[:, None] * stride_qh + offs_c[None, :],
                    mask=row_mask[:, None] & c_mask[None, :], other=0.0)
        qpe = tl.load(qpe_ptr + b64 * stride_pb_ + s_idx[:, None] * stride_ps_ + h_idx[:, None] * stride_ph_
                      + offs_r[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        cache_b = cache_ptr + b64 * stride_cb
        m_i = tl.full((BLOCK_H,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
        offs_t = tl.arange(0, BLOCK_T)
        # Inductor passes Python floats as fp64: keep the softmax arithmetic in fp32.
        scale_f32 = tl.cast(scale_log2, tl.float32)
        if SWAP:
            # Few rows (decode, H <= 32 per rank): transposed problem, cache rows on the MMA's M side, so the
            # tensor cores see M = BLOCK_T / C instead of M = 16 rows, and q stays in shared memory.
            q_t = tl.trans(q)
            qpe_t = tl.trans(qpe)
            acc_t = tl.zeros((C_PAD, BLOCK_H), dtype=tl.float32)
            for t0 in range(start, end, BLOCK_T):
                t = t0 + offs_t
                t_mask = t < end
                row_ptr = cache_b + t.to(tl.int64)[:, None] * stride_ct
                kv = tl.load(row_ptr + offs_c[None, :], mask=t_mask[:, None] & c_mask[None, :], other=0.0)
                pe = tl.load(row_ptr + C + offs_r[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)
                sc = tl.dot(kv, q_t) + tl.dot(pe, qpe_t)                        # [BLOCK_T, BLOCK_H]
                sc = sc * scale_f32
                visible = (t[:, None] <= pos[None, :]) & t_mask[:, None]
                sc = tl.where(visible, sc, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sc, axis=0))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(sc - m_new[None, :])
                l_i = l_i * alpha + tl.sum(p, axis=0)
                acc_t = tl.dot(tl.trans(kv), p.to(kv.dtype), acc_t * alpha[None, :])  # [C_PAD, BLOCK_H]
                m_i = m_new
            if SPLIT:
                base = (b64 * N_SPLITS + sp) * (S * H) + rows
                tl.store(part_ptr + base[None, :] * C_PAD + offs_c[:, None], acc_t.to(part_ptr.dtype.element_ty),
                         mask=row_mask[None, :])
                tl.store(ml_ptr + base * 2, m_i, mask=row_mask)
                tl.store(ml_ptr + base * 2 + 1, l_i, mask=row_mask)
            else:
                o_t = acc_t / tl.where(l_i > 0, l_i, 1.0)[None, :]
                o_ptrs = (out_ptr + b64 * stride_ob + s_idx[None, :] * stride_os + h_idx[None, :] * stride_oh
                          + offs_c[:, None] * stride_oc)
                tl.store(o_ptrs, o_t.to(out_ptr.dtype.element_ty), mask=row_mask[None, :] & c_mask[:, None])
        else:
            acc = tl.zeros((BLOCK_H, C_PAD), dtype=tl.float32)
            for t0 in range(start, end, BLOCK_T):
                t = t0 + offs_t
                t_mask = t < end
                row_ptr = cache_b + t.to(tl.int64)[:, None] * stride_ct
                kv = tl.load(row_ptr + offs_c[None, :], mask=t_mask[:, None] & c_mask[None, :], other=0.0)
                pe = tl.load(row_ptr + C + offs_r[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)
                sc = tl.dot(q, tl.trans(kv)) + tl.dot(qpe, tl.trans(pe))          # [BLOCK_H, BLOCK_T]
                sc = sc * scale_f32
                visible = (t[None, :] <= pos[:, None]) & t_mask[None, :]
                sc = tl.where(visible, sc, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sc, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(sc - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None])  # accumulate in place: one acc in registers
                m_i = m_new
            if SPLIT:
                base = (b64 * N_SPLITS + sp) * (S * H) + rows
                tl.store(part_ptr + base[:, None] * C_PAD + offs_c[None, :], acc.to(part_ptr.dtype.element_ty),
                         mask=row_mask[:, None])
                tl.store(ml_ptr + base * 2, m_i, mask=row_mask)
                tl.store(ml_ptr + base * 2 + 1, l_i, mask=row_mask)
            else:
                o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
                o_ptrs = (out_ptr + b64 * stride_ob + s_idx[:, None] * stride_os + h_idx[:, None] * stride_oh
                          + offs_c[None, :] * stride_oc)
                tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & c_mask[None, :])
                if PREFIX:
                    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453,
                                   float("-inf"))
                    tl.store(lse_ptr + b64 * (S * H) + rows, lse, mask=row_mask)
    elif PREFIX:  # empty prefix: nothing to attend to
        s_idx = rows // H
        h_idx = rows % H
        offs_c = tl.arange(0, C_PAD)
        o_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + s_idx[:, None] * stride_os + h_idx[:, None] * stride_oh
                  + offs_c[None, :] * stride_oc)
        tl.store(o_ptrs, tl.zeros((BLOCK_H, C_PAD), dtype=out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (offs_c < C)[None, :])
        tl.store(lse_ptr + b.to(tl.int64) * (S * H) + rows, tl.full((BLOCK_H,), float("-inf"), tl.float32),
                 mask=row_mask)


@triton.jit
def split_maxima(ml_ptr, b64, row, ROWS, N_SPLITS, NS_PAD: tl.constexpr):
    """Every split's running max for query row `row` (fp32 statistics of `_mla_fwd_kernel`), as (split ids [NS_PAD],
    values), loaded without waiting for the positions: the split index is clamped instead of masked, so the load
    has no predicate and the compiler issues it with the first loads (sm_90 SASS, triton 3.6), one dependent L2
    round trip before the merge less. Splits that did not run hold stale values: take `active_max`."""
    offs_s = tl.arange(0, NS_PAD)
    return offs_s, tl.load(ml_ptr + ((b64 * N_SPLITS + tl.minimum(offs_s, N_SPLITS - 1)) * ROWS + row) * 2)


@triton.jit
def active_max(offs_s, m_all, n_active):
    """The largest running max over the n_active splits that ran (`split_maxima`'s values)."""
    return tl.max(tl.where(offs_s < n_active, m_all, -1.0e30), axis=0)


@triton.jit
def combine_channels(part_ptr, ml_ptr, b64, row, n_active, m_max, offs_c, ROWS, N_SPLITS, C_PAD: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    """Channels offs_c (1-D; those past C_PAD read as zeros) of query row `row` merged over its splits, BLOCK_S
    splits at a time (vector loads): (the rescaled numerator, the denominator); the output is their quotient."""
    offs_s = tl.arange(0, BLOCK_S)
    den_vec = tl.zeros((BLOCK_S,), dtype=tl.float32)
    num = tl.zeros(offs_c.shape, dtype=tl.float32)
    for s0 in range(0, n_active, BLOCK_S):
        sp = s0 + offs_s
        s_mask = sp < n_active
        base = (b64 * N_SPLITS + sp) * ROWS + row
        m_s = tl.load(ml_ptr + base * 2, mask=s_mask, other=-1.0e30)
        l_s = tl.load(ml_ptr + base * 2 + 1, mask=s_mask, other=0.0)
        w = tl.exp2(m_s - m_max)
        den_vec += w * l_s
        a = tl.load(part_ptr + base[:, None] * C_PAD + offs_c[None, :],
                    mask=s_mask[:, None] & (offs_c < C_PAD)[None, :], other=0.0).to(tl.float32)
        num += tl.sum(a * w[:, None], axis=0)
    return num, tl.sum(den_vec, axis=0)


@triton.jit
def active_splits(pos_ptr, b, row, S, H, stride_posb, stride_poss, N_SPLITS, MIN_CHUNK_: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr):
    """How many splits of query row `row`'s block ran (recomputed as `_mla_fwd_kernel` computed them)."""
    rows = (row // BLOCK_H) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = tl.load(pos_ptr + b * stride_posb + (rows // H) * stride_poss, mask=rows < S * H, other=-1)
    length, chunk = _split_chunk(pos, N_SPLITS, MIN_CHUNK_, BLOCK_T)
    return tl.minimum(tl.cdiv(length, chunk), N_SPLITS)


@triton.jit
def _mla_combine_kernel(
    part_ptr, ml_ptr, pos_ptr, out_ptr,
    S, H, C, N_SPLITS,
    stride_posb, stride_poss, stride_ob, stride_os, stride_oh, stride_oc,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, C_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
    MIN_CHUNK_: tl.constexpr, BLOCK_S: tl.constexpr, NS_PAD: tl.constexpr,
):
    """One query row x BLOCK_C channels per program; splits are reduced BLOCK_S at a time (vector loads), in two
    passes: the max of the split maxima (`split_maxima`, loaded with the positions), then the rescaled sums.
    NS_PAD: N_SPLITS padded to a power of two."""
    row = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_s, m_all = split_maxima(ml_ptr, b64, row, S * H, N_SPLITS, NS_PAD)
    n_active = active_splits(pos_ptr, b, row, S, H, stride_posb, stride_poss, N_SPLITS, MIN_CHUNK_, BLOCK_H, BLOCK_T)
    m_max = active_max(offs_s, m_all, n_active)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    num, den = combine_channels(part_ptr, ml_ptr, b64, row, n_active, m_max, offs_c, S * H, N_SPLITS, C_PAD, BLOCK_S)
    o = num / tl.where(den > 0, den, 1.0)
    s_idx = row // H
    h_idx = row % H
    o_ptrs = out_ptr + b64 * stride_ob + s_idx * stride_os + h_idx * stride_oh + offs_c * stride_oc
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=offs_c < C)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


LONG_CACHE_ROWS = 8192


class MlaPlan(NamedTuple):
    block_h: int
    block_t: int
    c_pad: int
    num_warps: int
    n_splits: int
    min_chunk: int
    swap: bool
    num_stages: int


MLA_DEPTH_DEFAULT = "deep"


def mla_depth() -> str:
    """How `mla_plan` pipelines splits of several key blocks (read at trace time): 'deep' (default): 64-row blocks,
    3 stages; 'shallow': the blocks of before with 2 stages (one kv buffer). DSV3_MLA_DEPTH pins one (A/B runs)."""
    return env_switch("DSV3_MLA_DEPTH", MLA_DEPTH_DEFAULT, ("deep", "shallow"))


def mla_plan(b: Optional[int], s: Optional[int], h: int, t_cap: Optional[int], c: int, sms: int,
             block_h: Optional[int] = None, block_t: Optional[int] = None, n_splits: Optional[int] = None,
             min_chunk: Optional[int] = None, swap: Optional[bool] = None,
             num_stages: Optional[int] = None) -> MlaPlan:
    """The launch plan from static shapes (None = dynamic); arguments given are kept as they are.
    swap: <= 32 query rows per block run the transposed formulation (see `_mla_fwd_kernel`).
    A split never covers fewer than `min_chunk` cache rows, so its fp32 partial (BLOCK_H x C x 4 bytes) stays
    small next to the cache bytes it reads."""
    auto_depth = block_t is None and num_stages is None and min_chunk is None
    rows = None if s is None else s * h
    if block_h is None:
        block_h = 64 if rows is None else min(64, max(16, next_pow2(rows)))
    if swap is None:
        swap = False  # measured on the H200 (2026-11-22): the plain layout was as fast or faster at H=16
    c_pad = max(16, next_pow2(c))
    decode = not (b is None or s is None or t_cap is None or s > DECODE_MAX_S)
    if block_t is None:
        # 128-row key blocks (and splits of >= 128 rows) for one-token decode over long caches: at H 16 on the H200
        # (scripts/sweep_mla_splits.py, 2026-11-24) 16-20% faster at 8k-32k context (batch 32 at 32k 457 -> 364
        # us, batch 8 128 -> 108, batch 1 32.3 -> 30.5) and +0.4 to +1.9 us per call below 1k context (batch 1 / 8
        # at context 128 in a 32k cache 9.8 -> 11.6 / 12.0 -> 13.8 us). The plan sees only the cache length, so
        # caches of LONG_CACHE_ROWS or more (deployments that expect long contexts) take them. 16-row blocks only:
        # wider ones (128 heads: 64 rows) ran out of shared memory.
        block_t = 128 if decode and block_h == 16 and t_cap >= LONG_CACHE_ROWS else 64
    if min_chunk is None:
        # Decode at H = 16 (16B; 671B per rank at world size 8), scripts/sweep_mla.py on the H200 (2026-11-23):
        # 64-row splits with 8 warps took 9.4-11.8 us against 12.3-14.8 us for 128-row splits with 4 warps at
        # context <= 2k (batch 1 and 8), and were best at batch 8 up to 8k; batch 1 at 8k is 8% slower (18.2 vs
        # 16.8 us). A split's latency (its serial loop) is the cost at short context, not the bytes.
        min_chunk = max(block_t, 64 if decode else 128)
    if decode and not swap:
        num_warps = 8
    else:
        num_warps = 8 if (not swap and block_h * c_pad >= 64 * 512) else 4
    if n_splits is None:
        if not decode:
            n_splits = 1
        else:
            # whole waves: floor(SMs / programs per split). ceil() made 136 programs at batch 8 and 160 at batch 32
            # on 132 SMs, one wave plus a few programs a second wave ran alone (scripts/sweep_mla_splits.py, H200,
            # 2026-11-24: H 16 batch 8 at 32k 171.7 -> 131.7 us, batch 32 at 8k / 32k 182.2 -> 133.0 / 660.9 ->
            # 458.0 us, H 128 batch 8 / 32 at 8k 136.4 -> 99.9 / 428.3 -> 312.1 us; 2-3x whole waves were no better)
            n_rb = cdiv(rows, block_h)
            n_splits = max(1, min(sms // (b * n_rb), cdiv(t_cap, min_chunk)))
    if num_stages is None:
        num_stages = 2
    if (auto_depth and decode and block_h == 16 and not swap and cdiv(t_cap, n_splits) > block_t
            and mla_depth() == "deep"):
        # A full cache gives each split several key blocks (batch >= 4 at 4096 rows, long caches): with 2 stages
        # Triton keeps one kv buffer, refilled only after the step's math; 64-row blocks in 3 stages (two buffers,
        # 147 KB) overlap the next block's load with it. Same split count; splits of >= 64 rows, so a short context
        # in a long cache still spreads over a few programs. scripts/sweep_mla_pipeline.py, H200, 2026-11-24, op
        # us (splits + combine), 2-stage plan -> this: 4096-row cache at context 4032 batch 4 18.7 -> 17.4, batch 8
        # 27.1 -> 22.0, batch 32 74.6 -> 57.4; at context 128 batch 4 / 8 10.2 / 10.4 -> 10.6 / 10.8; full caches of
        # 8k / 32k rows batch 8 39.8 -> 32.5 / 107.3 -> 90.7, batch 32 at 32k 358.4 -> 321.6, batch 1 at 32k 30.3 ->
        # 27.2; context 128 in a 32k cache batch 1 / 8 11.7 -> 10.1 / 14.5 -> 13.5. One key block per split (batch 1-2
        # at 4096 rows, batch 1 at 8192) keeps the 2-stage plan: 3 stages gained nothing there.
        block_t, min_chunk, num_stages = 64, 64, 3
    return MlaPlan(block_h, block_t, c_pad, num_warps, n_splits, min_chunk, swap, num_stages)


# bf16 partials, H200 (2026-11-24, scripts/sweep_mla_pipeline.py / sweep_attn_out.py): this op (split + combine)
# 1-3% faster (batch 1 at 4032 10.88 -> 10.58 us, batch 32 at 32k 325.3 -> 318.7), the fused attention-out kernel
# the model runs at batch 1-8 0.1-1.4 us slower, error against float64 1.8e-3 -> 2.4e-3: fp32 stays the default.
MLA_PARTIALS_DEFAULT = "fp32"
_PARTIAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mla_partials() -> torch.dtype:
    """The dtype of flash-decoding's unnormalized split outputs (read at trace time): fp32 (default) or bf16 (half
    the bytes the split kernel stores and every merge reads; fp32 statistics either way). DSV3_MLA_PARTIALS pins one."""
    return _PARTIAL_DTYPES[env_switch("DSV3_MLA_PARTIALS", MLA_PARTIALS_DEFAULT, tuple(_PARTIAL_DTYPES))]


class SplitAttention(NamedTuple):
    """What `mla_attention_split` leaves for a combine: the output tensor (already final when n_splits == 1), the
    partials [B, n_splits, S*H, C_PAD] (`mla_partials()`'s dtype) and running (max, sum) [B, n_splits, S*H, 2] fp32
    (None without splits), and the plan fields a combine kernel recomputes the active splits from."""
    out: torch.Tensor
    part: Optional[torch.Tensor]
    ml: Optional[torch.Tensor]
    n_splits: int
    block_h: int
    block_t: int
    c_pad: int
    min_chunk: int

    @property
    def ns_pad(self) -> int:
        """n_splits padded to a power of two (the merge kernels' NS_PAD: `split_maxima` loads that many maxima)."""
        return max(2, next_pow2(self.n_splits))


def mla_attention_split(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    softmax_scale: float, block_h: Optional[int] = None, block_t: Optional[int] = None,
    n_splits: Optional[int] = None, num_stages: Optional[int] = None, min_chunk: Optional[int] = None,
    swap: Optional[bool] = None, num_warps: Optional[int] = None, partial_dtype: Optional[torch.dtype] = None,
) -> SplitAttention:
    """`_mla_fwd_kernel` alone: with one split the attention output, else the splits' partials to be combined
    (`_mla_combine_kernel` here, or the W_UV absorption kernel of dsv3.kernels.mla_attention_out), in
    partial_dtype (default `mla_partials()`)."""
    bsz, seqlen, heads, c = q_latent.shape
    r = q_pe.shape[-1]
    # Same layout as the fake impl (empty_like), so compiled graphs see the strides they were promised.
    out = torch.empty_like(q_latent)
    if q_latent.stride(-1) != 1:
        q_latent = q_latent.contiguous()
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    if latent_cache.stride(-1) != 1:
        latent_cache = latent_cache.contiguous()
    block_h, block_t, c_pad, plan_warps, n_splits, min_chunk, swap, num_stages = mla_plan(
        static_int(bsz), static_int(seqlen), heads, static_int(latent_cache.shape[1]), c,
        num_sms(q_latent.device), block_h, block_t, n_splits, min_chunk, swap, num_stages)
    num_warps = num_warps or plan_warps
    r_pad = max(16, next_pow2(r))
    n_rb = cdiv(seqlen * heads, block_h)
    split = n_splits > 1
    if split:
        part = torch.empty((bsz, n_splits, seqlen * heads, c_pad), dtype=partial_dtype or mla_partials(),
                           device=q_latent.device)
        ml = torch.empty((bsz, n_splits, seqlen * heads, 2), dtype=torch.float32, device=q_latent.device)
    else:
        part = ml = out  # unused
    wrap_triton(_mla_fwd_kernel)[(n_rb, n_splits, bsz)](
        q_latent, q_pe, latent_cache, input_pos, out, part, ml, ml,
        seqlen, heads, c, r, n_splits, float(softmax_scale) * LOG2E,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        latent_cache.stride(0), latent_cache.stride(1), input_pos.stride(0), input_pos.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        BLOCK_H=block_h, BLOCK_T=block_t, C_PAD=c_pad, R_PAD=r_pad, MIN_CHUNK_=min_chunk, SPLIT=split, SWAP=swap,
        PREFIX=False,
        num_warps=num_warps, num_stages=num_stages,
    )
    return SplitAttention(out, part if split else None, ml if split else None, n_splits, block_h, block_t, c_pad,
                          min_chunk)


def combine_block_s(n_splits: int) -> int:
    """Splits merged per step of a combine loop (one vector load each)."""
    return min(64, max(2, next_pow2(n_splits)))


def mla_attention_triton(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    softmax_scale: float, block_h: Optional[int] = None, block_t: Optional[int] = None,
    n_splits: Optional[int] = None, num_stages: Optional[int] = None, min_chunk: Optional[int] = None,
    swap: Optional[bool] = None, num_warps: Optional[int] = None, combine_block_c: Optional[int] = None,
    combine_warps: Optional[int] = None, partial_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    sa = mla_attention_split(q_latent, q_pe, latent_cache, input_pos, softmax_scale, block_h, block_t, n_splits,
                             num_stages, min_chunk, swap, num_warps, partial_dtype)
    return sa.out if sa.part is None else combine_splits(sa, q_latent, input_pos, combine_block_c, combine_warps)


# Channels per combine program and its warps. One program per query row and COMBINE_BLOCK_C channels; 128 channels
# made 64 programs at batch 1 (16 heads), each over up to 132 splits' partials, and the combine cost nearly what the
# attention did at 8k-32k (Nsight Compute, 2026-11-24). 32 channels in 2 warps (256 programs at batch 1),
# scripts/sweep_mla_pipeline.py on the H200, 2026-11-24, op us (splits + combine) 128 / 4 warps -> 32 / 2: batch 1
# 4096-row cache context 128 / 1024 / 4032 9.71 / 10.77 / 13.59 -> 8.87 / 9.38 / 10.80, batch 1 full 8k / 32k
# caches 16.15 / 27.06 -> 13.63 / 21.25, batch 8 at 4032 22.36 -> 21.99, batch 32 at 32k 322.9 -> 316.7; the best
# combine variant at every case but two (batch 8 at context 128: 10.5-11.0 us either way; batch 8 at 32k: 64 / 4).
COMBINE_BLOCK_C = 32
COMBINE_WARPS = 2
# ... except where many query rows share few splits: there one program merges a whole row (C_PAD channels, 8 warps),
# so a row's split maxima and active-split count are loaded and recomputed once instead of C_PAD / 32 times, and
# 16x fewer programs run. scripts/sweep_mla_pipeline.py on the H200 (2026-11-26, 16 heads, a 4096-row cache, op us,
# 32 / 2 -> whole rows): batch 32 (4 splits) at context 128 / 1024 / 4032 16.64 / 27.24 / 56.15 -> 12.78 / 23.24 /
# 52.91, batch 8 (16 splits) at 128 10.58 -> 9.64, at 4032 21.22 -> 21.25 (256 channels in 8 warps: 17.63 / 27.65 /
# 57.90 / 10.60 / 21.88; 128 in 4: 17.73 / 27.22 / 56.00 / 10.62 / 21.79). Batch 1 (16 rows, 64 splits) keeps 32 / 2.
COMBINE_ROW_MIN_ROWS = 128
COMBINE_ROW_MAX_SPLITS = 16
COMBINE_ROW_WARPS = 8


def combine_config(rows: int, n_splits: int, c_pad: int) -> tuple[int, int]:
    """(channels per program, warps) of `_mla_combine_kernel` for `rows` query rows (B * S * H) over n_splits."""
    if rows >= COMBINE_ROW_MIN_ROWS and n_splits <= COMBINE_ROW_MAX_SPLITS:
        return c_pad, COMBINE_ROW_WARPS
    return COMBINE_BLOCK_C, COMBINE_WARPS


def combine_splits(sa: SplitAttention, q_latent: torch.Tensor, input_pos: torch.Tensor,
                   block_c: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """`_mla_combine_kernel` over the partials of `mla_attention_split`: the attention output (in sa.out).
    block_c: channels per program (a power of two >= 16), num_warps: default `combine_config`'s."""
    bsz, seqlen, heads, c = q_latent.shape
    out = sa.out
    auto_c, auto_warps = combine_config(bsz * seqlen * heads, sa.n_splits, sa.c_pad)
    block_c = min(sa.c_pad, block_c or auto_c)
    num_warps = num_warps or (auto_warps if block_c == auto_c else COMBINE_WARPS)
    if block_c & (block_c - 1) or block_c < 16:
        raise ValueError(f"combine block_c={block_c}: a power of two >= 16")
    wrap_triton(_mla_combine_kernel)[(seqlen * heads, sa.c_pad // block_c, bsz)](
        sa.part, sa.ml, input_pos, out, seqlen, heads, c, sa.n_splits,
        input_pos.stride(0), input_pos.stride(1), out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        BLOCK_H=sa.block_h, BLOCK_T=sa.block_t, C_PAD=sa.c_pad, BLOCK_C=block_c, MIN_CHUNK_=sa.min_chunk,
        BLOCK_S=combine_block_s(sa.n_splits), NS_PAD=sa.ns_pad,
        num_warps=num_warps,
    )
    return out


def _triton_ok(q_latent: torch.Tensor, latent_cache: torch.Tensor) -> bool:
    return q_latent.dtype in (torch.bfloat16, torch.float16) and latent_cache.dtype == q_latent.dtype


@triton_op("dsv3::mla_attention", mutates_args=())
def mla_attention(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    if q_latent.device.type == "cpu" or not _triton_ok(q_latent, latent_cache):
        return mla_attention_reference(q_latent, q_pe, latent_cache, input_pos, softmax_scale)
    return mla_attention_triton(q_latent, q_pe, latent_cache, input_pos, softmax_scale)


@mla_attention.register_fake
def _mla_attention_fake(q_latent, q_pe, latent_cache, input_pos, softmax_scale):
    return torch.empty_like(q_latent)


__all__ = [
    "MlaPlan", "mla_attention", "mla_attention_reference", "mla_attention_triton", "mla_depth", "mla_plan", "math",
]
