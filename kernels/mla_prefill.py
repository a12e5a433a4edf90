"""Prefill attention for MLA: `torch.ops.dsv3.mla_prefix_attention` and `torch.ops.dsv3.mla_prefill_attention`.

Why a second form: absorbed attention (dsv3.mla_attention) scores each (query, key) pair in the 576-wide latent
space for every head, 2 * (576 + 512) FLOPs per pair and head. Prefill has as many keys as queries, so it pays
that for every pair of the prompt. The naive form decompresses the chunk's own keys and values once (kv_b_proj:
k_nope [Dn], v [Dv] per head) and then costs 2 * (Dn + R + Dv) = 640 FLOPs per pair and head on V2/V3 shapes:
3.4x less (DeepSeek's own inference code and the serving stacks prefill this way too). A prefill chunk that
continues a sequence also sees the rows already in the latent cache (the prefix). By default
(`cached_prefill_choice`) those are decompressed again for every chunk, `mla_cached_prefill_attention` below: one
causal attention over the cache rows up to the chunk's last position. Otherwise (DSV3_PREFILL_PREFIX=absorbed, or a
cache too large for the decompressed rows' buffer) the prefix is attended in absorbed form and merged with the
chunk's keys through its log-sum-exp, the first two ops below (the halves of one attention; the model calls the
first, absorbs its output with W_UV, then the second; see `dsv3.model.MLA`).

`mla_prefix_attention(q_latent, q_pe, latent_cache, input_pos, softmax_scale) -> (out, lse)`
- As `dsv3.mla_attention` (same shapes and scores), but every query of sequence b sees exactly the cache rows
  t < input_pos[b, 0] (the rows before the chunk). out: [B, S, H, C] in q_latent.dtype, zeros where the prefix is
  empty; lse: [B, S, H] float32, the natural log of the softmax denominator over the prefix, -inf where empty.
- CPU / fp32: reference (masked einsum). CUDA: `_mla_fwd_kernel` of dsv3.kernels.mla_attention with PREFIX=True
  (one split; rows past the prefix never read; a program whose prefix is empty writes zeros and -inf).

`mla_prefill_attention(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale, prefix_out, prefix_lse) -> out`
- q_nope, k_nope: [B, S, H, Dn]; q_pe: [B, S, H, R] (roped); k_pe: [B, S, R] (roped, shared by the heads);
  v: [B, S, H, Dv]; input_pos: [B, S] int64, strictly increasing along S (consecutive positions of a chunk);
  prefix_out: [B, S, H, Dv] (the prefix attention output already multiplied by W_UV), prefix_lse: [B, S, H] fp32;
  both None (together): no prefix (a chunk at position 0; the model's first-chunk prefill graph), the softmax runs
  over the chunk's own keys only.
- score(i, j) = (q_nope[i] . k_nope[j] + q_pe[i] . k_pe[j]) * softmax_scale for chunk tokens with
  input_pos[j] <= input_pos[i]; the prefix enters the same softmax as one more key of logit prefix_lse[i] and
  value prefix_out[i] (exact: that is what merging two softmax partitions is).
  out[i] = softmax(...) . values, fp32 statistics, returned as [B, S, H, Dv] in q_nope.dtype.
- CPU / fp32: reference. CUDA: `_mha_prefill_kernel`, flash attention: one program per (head, BLOCK_M queries,
  sequence), the longest blocks first within groups of PREFILL_HEAD_GROUP heads; its online-softmax state starts
  from the prefix (m = lse, l = 1, acc = prefix_out; empty without one: HAS_PREFIX=False reads nothing), then walks
  the chunk's key blocks up to its causal bound (exp2 arithmetic, P rounded to v's dtype for the P.V product).
- Head dims that are not powers of two (tests) are padded to >= 16 with masks.

`mla_cached_prefill_attention(q_nope, q_pe, latent_cache, input_pos, kv_b_weight, softmax_scale, nope_dim, v_dim,
cache_rows) -> out`
- latent_cache [Bc, T, C + R]: the model's whole cache (row t of a sequence holds position t), the chunk's rows already
  written; sequence b of the batch is cache sequence cache_rows[b] ([B] int64), or b when cache_rows is None (then
  Bc >= B). kv_b_weight [H*(Dn+Dv), C] in the cache's dtype (kv_b_proj dequantized: per head Dn rows of W_UK then Dv
  of W_UV); input_pos [B, S] increasing along S. out[b, s] = softmax over rows t <= input_pos[b, s] of
  (q_nope . k_nope[t] + q_pe . k_pe[t]) * softmax_scale, times v, with (k_nope, v) = kv_b_weight @ cache[row, t, :C]
  per head and k_pe = cache[row, t, C:]; [B, S, H, Dv] in q_nope.dtype.
- CPU / fp32: reference (every row decompressed, masked). CUDA: `_kv_decompress_tma_kernel` (persistent, TMA; or its
  pointer form `_kv_decompress_kernel`: rows up to each sequence's last position, whole KEY_TILE_ROWS tiles, read
  from the sequence's own cache row: no gathered copy of the cache, into a [B, T, H*(Dn+Dv) + R] buffer with k_pe
  copied after the heads), then `_mha_prefill_kernel` with KEYS_CACHED.
  `mla_cached_prefill_attention_o_proj(..., o_weight, o_scale)`: the same followed by the FP8 o_proj, fused as
  `mla_prefill_attention_o_proj` below.

`mla_prefill_attention_o_proj(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale, o_weight, o_scale,
prefix_out, prefix_lse) -> [B, S, N]`
- Exactly dsv3.fp8_linear(mla_prefill_attention(...).reshape(B, S, H * Dv), o_weight, o_scale): the model's prefill
  attention and o_proj with FP8 o_proj weights [N, H * Dv] and their 128x128 block scales.
- CUDA where o_proj would run on cuBLAS (`prefill_o_proj_fused`; Dv = 128): `_mha_prefill_kernel` with QUANT_OUT
  writes o_proj's input already quantized in cuBLAS's layout, then the block-scaled GEMM (no act-quant launch).
  Elsewhere the two ops.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import (
    cdiv, env_switch, exceeds, launch_with_descriptors, next_pow2, num_sms, static_int, tma_descriptor_ok,
)
from dsv3.kernels.fp8_blocks import BLOCK, FP8_DTYPE
from dsv3.kernels.fp8_linear import (
    GEMV_MAX_M, _aot_compiling, fp8_gemm_mode, fp8_linear, quantize_tile_rcp, scaled_mm_quantized, scaled_mm_usable,
)
from dsv3.kernels.mla_attention import LOG2E, _mla_fwd_kernel
from dsv3.kernels.tiles import load_tile


# ----------------------------------------------------------------------------------------------------------------
# References (fp32 math; float64 inputs stay float64, for the exactness tests)
# ----------------------------------------------------------------------------------------------------------------


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def mla_prefix_attention_reference(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    c = q_latent.shape[-1]
    kv = _wide(latent_cache[..., :c])
    pe = _wide(latent_cache[..., c:])
    scores = torch.einsum("bshc,btc->bsht", _wide(q_latent), kv) + torch.einsum("bshr,btr->bsht", _wide(q_pe), pe)
    scores = scores * softmax_scale
    t = torch.arange(latent_cache.shape[1], device=latent_cache.device)
    visible = t[None, None, None, :] < input_pos[:, :1, None, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                    # -inf where the prefix is empty
    probs = torch.where(visible, torch.exp(scores - lse.unsqueeze(-1).clamp_min(-1e30)), 0.0)
    out = torch.einsum("bsht,btc->bshc", probs, kv).to(q_latent.dtype)
    return out, lse


def mla_prefill_attention_reference(
    q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
    input_pos: torch.Tensor, softmax_scale: float, prefix_out: Optional[torch.Tensor] = None,
    prefix_lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    scores = (torch.einsum("bshd,bthd->bhst", _wide(q_nope), _wide(k_nope))
              + torch.einsum("bshr,btr->bhst", _wide(q_pe), _wide(k_pe))) * softmax_scale
    visible = input_pos[:, None, None, :] <= input_pos[:, None, :, None]   # [B, 1, S (query), S (key)]
    scores = scores.masked_fill(~visible, float("-inf"))
    if prefix_out is None:  # no prefix: every query sees at least its own key
        out = torch.einsum("bhst,bthd->bhsd", torch.softmax(scores, dim=-1), _wide(v))
        return out.permute(0, 2, 1, 3).to(q_nope.dtype).contiguous()
    # the prefix is one more key per query: logit prefix_lse, value prefix_out
    lse = prefix_lse.to(scores.dtype).permute(0, 2, 1).unsqueeze(-1)       # [B, H, S, 1]
    probs = torch.softmax(torch.cat([lse, scores], dim=-1), dim=-1)
    out = probs[..., :1] * _wide(prefix_out).permute(0, 2, 1, 3) + torch.einsum(
        "bhst,bthd->bhsd", probs[..., 1:], _wide(v))
    return out.permute(0, 2, 1, 3).to(q_nope.dtype).contiguous()


def cache_sequences(latent_cache: torch.Tensor, bsz: int, cache_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The batch's sequences of the cache: cache_rows' (a gathered copy), else the first bsz (a view)."""
    return latent_cache[:bsz] if cache_rows is None else latent_cache.index_select(0, cache_rows)


def mla_cached_prefill_attention_reference(
    q_nope: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    kv_b_weight: torch.Tensor, softmax_scale: float, nope_dim: int, v_dim: int,
    cache_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    kv_lora_rank = kv_b_weight.shape[1]
    latent_cache = cache_sequences(latent_cache, q_nope.shape[0], cache_rows)
    kv = F.linear(latent_cache[..., :kv_lora_rank], kv_b_weight.to(latent_cache.dtype))
    k_nope, v = kv.view(*kv.shape[:2], q_nope.shape[2], nope_dim + v_dim).split([nope_dim, v_dim], dim=-1)
    k_pe = latent_cache[..., kv_lora_rank:]
    scores = (torch.einsum("bshd,bthd->bhst", _wide(q_nope), _wide(k_nope))
              + torch.einsum("bshr,btr->bhst", _wide(q_pe), _wide(k_pe))) * softmax_scale
    t = torch.arange(latent_cache.shape[1], device=latent_cache.device)
    visible = t[None, None, None, :] <= input_pos[:, None, :, None]          # [B, 1, S (query), T (cache row)]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("bhst,bthd->bhsd", torch.softmax(scores, dim=-1), _wide(v))
    return out.permute(0, 2, 1, 3).to(q_nope.dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel (the prefix half runs dsv3.kernels.mla_attention's kernel)
# ----------------------------------------------------------------------------------------------------------------


# Heads per group of the prefill attention's schedule (`_mha_prefill_kernel`: a group's query blocks start longest
# first across its heads). H200, 4096 tokens, no prefix, bitwise the same output as query blocks fastest
# (scripts/ab_prefill_attn.py, 2026-11-26): 16 heads 221.7 -> 179.7 us per call, 32 heads 1.096x, 128 heads 1.031x
# in groups of 16; all 128 heads as one group 0.936x (every head's keys in flight at once, past the L2).
PREFILL_HEAD_GROUP = 16


class PrefillAttnConfig(NamedTuple):
    block_m: int  # queries per program
    block_n: int  # keys per step of the online softmax
    num_warps: int
    num_stages: int


# Launch configs by chunk length (scripts/sweep_prefill.py --only attention, H200, 16 heads, causal, no prefix).
# Long chunks: 128 x 64 blocks, 8 warps, 3 stages: at 4096 tokens 245.5 us against 311.5 at 2 stages, 128 x 128 and
# 64 x 64 blocks ~270 (2026-11-23); with the longest-first schedule still the best of 20, 179.1 us (480 TFLOP/s; next
# 64 x 64 blocks, 4 warps, 2 stages 197.0; 2026-11-26). 128-key blocks need > 227 KB of shared memory at 3 stages.
# Short chunks: 64 x 64 blocks, 4 warps, 3 stages, where the long config's programs fit in one wave. There its
# programs all start at once and the causal work is uneven: at 16 heads x 1024 tokens, 128 programs (8 query blocks
# per head) whose longest does 8 units of work against a mean of 4.5, so the wave lasts as long as its longest
# program. 64-row programs are twice as many and half the size, two per SM, so the longest shares an SM with a short
# one. 16 heads, us per call (scripts/ab_prefill_attn.py, 2026-11-26): 256 tokens 13.1 -> 9.3 us, 512 17.9 -> 12.6,
# 768 22.7 -> 16.1, 1024 27.7 -> 22.3; from 1280 tokens (160 programs) the two tie (1280, 1536, 2048), and past a
# wave the long one wins: 128 heads x 1024 tokens (1024 programs) 137.8 us long, 160.5 short.
PREFILL_ATTN_LONG = PrefillAttnConfig(128, 64, 8, 3)
PREFILL_ATTN_SHORT = PrefillAttnConfig(64, 64, 4, 3)


def prefill_attention_launches(seqlen, heads: int, bsz, sms: int) -> list[tuple[PrefillAttnConfig, int]]:
    """The prefill attention's launches for `bsz` chunks of `seqlen` tokens and `heads` heads on `sms` SMs:
    [(config, query blocks per head)]. PREFILL_ATTN_SHORT where PREFILL_ATTN_LONG's programs (heads x bsz x query
    blocks) fit in one wave, else PREFILL_ATTN_LONG. Static sizes (eager calls, graphs of static shape) take the
    one launch. Dynamic ones (the prefill packages' chunk length and rows, SymInts at trace time) cannot choose at
    trace time: both launches go into the graph and the one the rule does not pick at the run's sizes gets zero
    query blocks (`exceeds`: no launch, no guard), so a run pays one launch, the one the static rule would pick."""
    long_programs = heads * bsz * cdiv(seqlen, PREFILL_ATTN_LONG.block_m)
    if static_int(long_programs) is not None:
        cfg = PREFILL_ATTN_SHORT if static_int(long_programs) <= sms else PREFILL_ATTN_LONG
        return [(cfg, cdiv(static_int(seqlen), cfg.block_m))]
    long = exceeds(long_programs, sms)
    return [(PREFILL_ATTN_LONG, cdiv(seqlen, PREFILL_ATTN_LONG.block_m) * long),
            (PREFILL_ATTN_SHORT, cdiv(seqlen, PREFILL_ATTN_SHORT.block_m) * (1 - long))]


@triton.jit
def _mha_prefill_block(
    q, qpe, acc, m_i, l_i, pos_q, n0, kn_ptr, kp_ptr, v_ptr, pos_ptr, b, h, KR,
    s_kn_b, s_kn_s, s_kn_h, s_kp_b, s_kp_s, s_v_b, s_v_s, s_v_h, s_pos_b, s_pos_s, scale_f32,
    offs_n0, offs_dn, offs_r, offs_dv, dn_mask, r_mask, dv_mask, MASKED: tl.constexpr, EXACT_D: tl.constexpr,
    KV_DESC: tl.constexpr, KEYS_CACHED: tl.constexpr, BLOCK_N: tl.constexpr, DN_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
):
    """One key block of the online softmax. KR: key rows per sequence. MASKED=False: every key of the block is
    before every query of the program (positions strictly increase along S), so no position test, and every key row
    exists (the block ends before the program's first query), so no row mask. EXACT_D: the head dims are their
    padded sizes (no column masks). KV_DESC: kn / kp / v are TMA descriptors over the [B*KR, ...] row views (see the
    kernel). KEYS_CACHED: key row t is position t (the kernel's KEYS_CACHED), so no position load."""
    offs_n = n0 + offs_n0
    n_mask = offs_n < KR
    if KV_DESC:
        row = (b * KR + n0).to(tl.int32)
        kn = kn_ptr.load([row, h, 0]).reshape(BLOCK_N, DN_PAD)
        kp = kp_ptr.load([row, 0])
        vv = v_ptr.load([row, h, 0]).reshape(BLOCK_N, DV_PAD)
    else:
        kn = load_tile(kn_ptr + b * s_kn_b + offs_n[:, None] * s_kn_s + h * s_kn_h + offs_dn[None, :], n_mask,
                       dn_mask, MASKED, not EXACT_D)
        kp = load_tile(kp_ptr + b * s_kp_b + offs_n[:, None] * s_kp_s + offs_r[None, :], n_mask, r_mask,
                       MASKED, not EXACT_D)
        vv = load_tile(v_ptr + b * s_v_b + offs_n[:, None] * s_v_s + h * s_v_h + offs_dv[None, :], n_mask, dv_mask,
                       MASKED, not EXACT_D)
    # the rope part's MMA accumulates onto the nope part's (one fp32 tile, no add); the scale goes into the
    # exponent's FFMA: max(raw) * scale == max(raw * scale) for scale > 0 (rounding is monotone)
    raw = tl.dot(qpe, tl.trans(kp), tl.dot(q, tl.trans(kn)))       # [BLOCK_M, BLOCK_N] unscaled scores
    if MASKED:
        if KEYS_CACHED:
            pos_k = offs_n
        else:
            pos_k = tl.load(pos_ptr + b * s_pos_b + offs_n * s_pos_s, mask=n_mask, other=0)
        visible = (pos_k[None, :] <= pos_q[:, None]) & n_mask[None, :]
        raw = tl.where(visible, raw, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(raw, axis=1) * scale_f32)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(raw * scale_f32 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _mha_prefill_kernel(
    qn_ptr, qp_ptr, kn_ptr, kp_ptr, v_ptr, pos_ptr, po_ptr, plse_ptr, out_ptr, oq_ptr, os_ptr,
    S, KR, H, DN, R, DV, scale_log2, n_rows, pad_rows, n_groups,
    s_qn_b, s_qn_s, s_qn_h, s_qp_b, s_qp_s, s_qp_h, s_kn_b, s_kn_s, s_kn_h, s_kp_b, s_kp_s,
    s_v_b, s_v_s, s_v_h, s_pos_b, s_pos_s, s_po_b, s_po_s, s_po_h, s_o_b, s_o_s, s_o_h, s_oq, s_os_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DN_PAD: tl.constexpr, R_PAD: tl.constexpr,
    DV_PAD: tl.constexpr, HAS_PREFIX: tl.constexpr, EXACT_D: tl.constexpr, KV_DESC: tl.constexpr,
    QUANT_OUT: tl.constexpr, HEAD_GROUP: tl.constexpr, KEYS_CACHED: tl.constexpr,
):
    """Causal flash attention over a chunk's own keys (module docstring); KR = S key rows per sequence.
    KEYS_CACHED (dsv3.mla_cached_prefill_attention): the keys are KR rows per sequence indexed by position (row t
    is position t: the decompressed latent cache, prefix and chunk), each query sees rows t <= its position; the
    walk starts at row 0 and ends at the block's last position. KV_DESC (the launcher's choice, with
    EXACT_D): kn_ptr, kp_ptr and v_ptr are TMA tensor descriptors over the keys' row views k_nope [B*S, H, DN], k_pe
    [B*S, R] and v [B*S, H, DV] with boxes [BLOCK_N, 1, DN], [BLOCK_N, R], [BLOCK_N, 1, DV]: one copy instruction per
    tile instead of each thread's 64-bit address and mask arithmetic (and the registers that holds). Rows past a
    sequence's S are then the next sequence's rows (or zeros past the last): finite, and masked out of the scores
    exactly as the pointer tiles' zeros.
    QUANT_OUT (DV = 128: one quantization block per head and token): instead of out, the output rounded to out's
    dtype and quantized for the o_proj GEMM as `act_quant(out.view(B*S, H*DV), pad_rows_to=4, scales_m_major=True)`
    would: e4m3 rows b*S + s of oq [n_rows + pad_rows, H*DV] (row stride s_oq), scales at os[h * s_os_h + row];
    the pad_rows rows past n_rows = B*S quantized zeros, written by the last sequence's last query block."""
    # Grid (HEAD_GROUP heads, query blocks, head groups x sequences), heads fastest: within a group of heads,
    # programs start in order of decreasing causal work (the last query block of every head first), the
    # longest-first schedule, so the short blocks fill the tail. With query blocks fastest, each head's blocks ran
    # long to short in turn and the last head's longest block started near the end (a list-scheduling model of 16
    # heads x 32 blocks on 132 SMs: 82 work units against 65 for this order and 64 ideal). Groups bound the keys in
    # flight (16 heads x 4096 tokens: ~33 MB, inside the L2; all 128 heads at once measured slower).
    h = tl.program_id(2) % n_groups * HEAD_GROUP + tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (tl.program_id(2) // n_groups).to(tl.int64)
    if h >= H:  # the last group's heads past H
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < S
    offs_dn = tl.arange(0, DN_PAD)
    offs_r = tl.arange(0, R_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    dn_mask = offs_dn < DN
    r_mask = offs_r < R
    dv_mask = offs_dv < DV
    pos_q = tl.load(pos_ptr + b * s_pos_b + offs_m * s_pos_s, mask=m_mask, other=-1)  # -1: sees no key
    q = tl.load(qn_ptr + b * s_qn_b + offs_m[:, None] * s_qn_s + h * s_qn_h + offs_dn[None, :],
                mask=m_mask[:, None] & dn_mask[None, :], other=0.0)
    qpe = tl.load(qp_ptr + b * s_qp_b + offs_m[:, None] * s_qp_s + h * s_qp_h + offs_r[None, :],
                  mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    # Inductor passes Python floats as fp64: keep the softmax arithmetic in fp32.
    scale_f32 = tl.cast(scale_log2, tl.float32)
    if HAS_PREFIX:
        # Online-softmax state seeded with the prefix: m = its lse (log2 units), l = 1, acc = its normalized output.
        lse = tl.load(plse_ptr + (b * S + offs_m) * H + h, mask=m_mask, other=float("-inf")) * 1.4426950408889634
        has_prefix = lse > -1.0e30
        m_i = tl.where(has_prefix, lse, -1.0e30)
        l_i = tl.where(has_prefix, 1.0, 0.0)
        acc = tl.load(po_ptr + b * s_po_b + offs_m[:, None] * s_po_s + h * s_po_h + offs_dv[None, :],
                      mask=m_mask[:, None] & dv_mask[None, :] & has_prefix[:, None], other=0.0).to(tl.float32)
    else:  # empty state: the chunk's first key block sets m
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, DV_PAD), dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    # Key blocks wholly before the first query of this program: visible to all its queries (unmasked loop).
    # From there to the last query (causal bound), the position test.
    if KEYS_CACHED:
        # (the first position loaded here, in the kernel's body: see docs/KERNELS.md on what Inductor takes as
        # written) query m is at position >= start + m, so rows before start + the block's first query are
        # visible to all of its queries; the last one it sees is its largest position
        start = tl.load(pos_ptr + b * s_pos_b)
        lo = ((start + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(KR, tl.max(pos_q, axis=0) + 1)
    else:
        lo = (pid_m * BLOCK_M // BLOCK_N) * BLOCK_N
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, lo, BLOCK_N):
        acc, m_i, l_i = _mha_prefill_block(
            q, qpe, acc, m_i, l_i, pos_q, n0, kn_ptr, kp_ptr, v_ptr, pos_ptr, b, h, KR,
            s_kn_b, s_kn_s, s_kn_h, s_kp_b, s_kp_s, s_v_b, s_v_s, s_v_h, s_pos_b, s_pos_s, scale_f32,
            offs_n0, offs_dn, offs_r, offs_dv, dn_mask, r_mask, dv_mask, False, EXACT_D, KV_DESC, KEYS_CACHED,
            BLOCK_N, DN_PAD, DV_PAD)
    for n0 in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _mha_prefill_block(
            q, qpe, acc, m_i, l_i, pos_q, n0, kn_ptr, kp_ptr, v_ptr, pos_ptr, b, h, KR,
            s_kn_b, s_kn_s, s_kn_h, s_kp_b, s_kp_s, s_v_b, s_v_s, s_v_h, s_pos_b, s_pos_s, scale_f32,
            offs_n0, offs_dn, offs_r, offs_dv, dn_mask, r_mask, dv_mask, True, EXACT_D, KV_DESC, KEYS_CACHED,
            BLOCK_N, DN_PAD, DV_PAD)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if QUANT_OUT:
        # (`quantize_tile_rcp`: act_quant's scales bit for bit, its e4m3 values up to the sign of a zero)
        oq, osc = quantize_tile_rcp(o.to(out_ptr.dtype.element_ty).to(tl.float32))
        rows = b * S + offs_m
        tl.store(oq_ptr + rows[:, None] * s_oq + h * DV + offs_dv[None, :], oq, mask=m_mask[:, None])
        tl.store(os_ptr + h * s_os_h + rows, osc, mask=m_mask)
        if (b == tl.num_programs(2) // n_groups - 1) & (pid_m == tl.num_programs(1) - 1):
            offs_p = tl.arange(0, 4)
            zq, zs = quantize_tile_rcp(tl.zeros((4, DV_PAD), dtype=tl.float32))
            prow = n_rows + offs_p
            tl.store(oq_ptr + prow[:, None] * s_oq + h * DV + offs_dv[None, :], zq,
                     mask=(offs_p < pad_rows)[:, None])
            tl.store(os_ptr + h * s_os_h + prow, zs, mask=offs_p < pad_rows)
    else:
        tl.store(out_ptr + b * s_o_b + offs_m[:, None] * s_o_s + h * s_o_h + offs_dv[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def mla_prefix_attention_triton(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    softmax_scale: float, block_h: int = 64, block_t: int = 64, num_warps: int = 8, num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, seqlen, heads, c = q_latent.shape
    r = q_pe.shape[-1]
    out = torch.empty_like(q_latent)
    lse = torch.empty((bsz, seqlen, heads), dtype=torch.float32, device=q_latent.device)
    if q_latent.stride(-1) != 1:
        q_latent = q_latent.contiguous()
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    if latent_cache.stride(-1) != 1:
        latent_cache = latent_cache.contiguous()
    c_pad = max(16, next_pow2(c))
    wrap_triton(_mla_fwd_kernel)[(cdiv(seqlen * heads, block_h), 1, bsz)](
        q_latent, q_pe, latent_cache, input_pos, out, out, lse, lse,
        seqlen, heads, c, r, 1, float(softmax_scale) * LOG2E,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        latent_cache.stride(0), latent_cache.stride(1), input_pos.stride(0), input_pos.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        BLOCK_H=block_h, BLOCK_T=block_t, C_PAD=c_pad, R_PAD=max(16, next_pow2(r)), MIN_CHUNK_=block_t,
        SPLIT=False, SWAP=False, PREFIX=True, num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def mla_prefill_attention_triton(
    q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
    input_pos: torch.Tensor, softmax_scale: float, prefix_out: Optional[torch.Tensor] = None,
    prefix_lse: Optional[torch.Tensor] = None, block_m: Optional[int] = None, block_n: Optional[int] = None,
    num_warps: Optional[int] = None, num_stages: Optional[int] = None, quant_out: bool = False,
    keys_cached: bool = False,
):
    """Launch config: by size (`prefill_attention_launches`), unless a field is given (sweeps, tests): then one
    launch of PREFILL_ATTN_LONG with the given fields replaced.
    keys_cached (no prefix_out / prefix_lse): k_nope [B, T, H, Dn], k_pe [B, T, R] and v [B, T, H, Dv] hold
    positions 0 .. T-1 (a decompressed latent cache: `mla_cached_prefill_attention`); query (b, s) sees rows
    t <= input_pos[b, s]. Rows a query could see must hold finite values up to the key block's end.
    quant_out (Dv = 128): returns (oq, os), the output quantized for a cuBLAS block-scaled GEMM: oq e4m3
    [Mp, H * Dv] with Mp = B * S rounded up to 4 (the extra rows quantized zeros), os fp32 [Mp, H] M-major
    (strides (1, Mp)): what `act_quant(out.view(B * S, H * Dv), pad_rows_to=4, scales_m_major=True)` returns."""
    bsz, seqlen, heads, dn = q_nope.shape
    r = q_pe.shape[-1]
    dv = v.shape[-1]
    n_rows = bsz * seqlen
    if quant_out:
        if dv != BLOCK:
            raise ValueError(f"mla_prefill_attention_triton(quant_out=True): v_head_dim {dv}, must be {BLOCK} (one "
                             "quantization block per head)")
        mp = (n_rows + 3) // 4 * 4
        oq = torch.empty((mp, heads * dv), dtype=FP8_DTYPE, device=q_nope.device)
        os_ = torch.empty((heads, mp), dtype=torch.float32, device=q_nope.device).t()
        out = q_nope.new_empty((1, 1, 1, 1))  # only its dtype is read (the rounding before quantization)
    else:
        oq = os_ = out = torch.empty((bsz, seqlen, heads, dv), dtype=q_nope.dtype, device=q_nope.device)
        mp = n_rows
    has_prefix = prefix_out is not None
    if keys_cached and has_prefix:
        raise ValueError("mla_prefill_attention_triton: keys_cached takes every key from the cache, no prefix_out")
    if not has_prefix:  # the kernel reads neither (HAS_PREFIX=False): any tensor serves as the pointer
        prefix_out, prefix_lse = out, out
    q_nope, q_pe, k_nope, k_pe, v, prefix_out = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (q_nope, q_pe, k_nope, k_pe, v, prefix_out))
    prefix_lse = prefix_lse.contiguous()
    dn_pad, r_pad, dv_pad = (max(16, next_pow2(n)) for n in (dn, r, dv))
    exact_d = (dn, r, dv) == (dn_pad, r_pad, dv_pad)
    # the keys through TMA descriptors over their [B*S, ...] row views, where those are views (see the kernel); not
    # while tracing keys of static shape: there torch 2.11's AOTInductor writes the descriptors' views of Inductor
    # buffers as C++ expressions (`reinterpret_tensor_wrapper(buf, ..., 512L)`) into the Python block that compiles
    # the package's kernels, which then fails to parse. Seen in a short prompt's first-chunk graph at 16 tokens
    # (static shapes throughout; the descriptors would save nothing measurable there) and with keys_cached, whose
    # keys are a [B, T, ...] buffer of static shape in the graphs of dynamic chunk length too ("invalid decimal
    # literal" in the 16B prefill package's build, 2026-11-26)
    static_keys = type(k_nope) is not torch.Tensor and all(static_int(n) is not None for n in k_nope.shape[:2])
    kv_desc = exact_d and prefill_attn_tma() and not static_keys and all(
        tma_descriptor_ok(t) and statically_known_true(t.stride(0) == t.shape[1] * t.stride(1))
        for t in (k_nope, k_pe, v))
    keys = dict(kn_ptr=k_nope, kp_ptr=k_pe, v_ptr=v)
    group = min(heads, PREFILL_HEAD_GROUP)  # heads whose query blocks are scheduled together (see the kernel)
    n_groups = cdiv(heads, group)
    if kv_desc:
        keys = {name: t.flatten(0, 1) for name, t in keys.items()}
    pinned = {k: v for k, v in dict(block_m=block_m, block_n=block_n, num_warps=num_warps,
                                    num_stages=num_stages).items() if v is not None}
    if pinned:
        cfg = PREFILL_ATTN_LONG._replace(**pinned)
        launches = [(cfg, cdiv(seqlen, cfg.block_m))]
    else:
        launches = prefill_attention_launches(seqlen, heads, bsz, num_sms(q_nope.device))
    for cfg, query_blocks in launches:
        bn = cfg.block_n
        descriptors = {"kn_ptr": [bn, 1, dn_pad], "kp_ptr": [bn, r_pad], "v_ptr": [bn, 1, dv_pad]} if kv_desc else {}
        launch_with_descriptors(
            _mha_prefill_kernel, (group, query_blocks, n_groups * bsz), descriptors,
            qn_ptr=q_nope, qp_ptr=q_pe, **keys, pos_ptr=input_pos, po_ptr=prefix_out, plse_ptr=prefix_lse, out_ptr=out,
            oq_ptr=oq, os_ptr=os_, S=seqlen, KR=k_nope.shape[1] if keys_cached else seqlen, H=heads, DN=dn, R=r,
            DV=dv, scale_log2=float(softmax_scale) * LOG2E,
            n_rows=n_rows, pad_rows=mp - n_rows, n_groups=n_groups,
            s_qn_b=q_nope.stride(0), s_qn_s=q_nope.stride(1), s_qn_h=q_nope.stride(2),
            s_qp_b=q_pe.stride(0), s_qp_s=q_pe.stride(1), s_qp_h=q_pe.stride(2),
            s_kn_b=k_nope.stride(0), s_kn_s=k_nope.stride(1), s_kn_h=k_nope.stride(2),
            s_kp_b=k_pe.stride(0), s_kp_s=k_pe.stride(1), s_v_b=v.stride(0), s_v_s=v.stride(1), s_v_h=v.stride(2),
            s_pos_b=input_pos.stride(0), s_pos_s=input_pos.stride(1),
            s_po_b=prefix_out.stride(0), s_po_s=prefix_out.stride(1), s_po_h=prefix_out.stride(2),
            s_o_b=out.stride(0), s_o_s=out.stride(1), s_o_h=out.stride(2), s_oq=oq.stride(0), s_os_h=os_.stride(1),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DN_PAD=dn_pad, R_PAD=r_pad, DV_PAD=dv_pad, HAS_PREFIX=has_prefix,
            EXACT_D=exact_d, KV_DESC=kv_desc, QUANT_OUT=quant_out, HEAD_GROUP=group, KEYS_CACHED=keys_cached,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return (oq, os_) if quant_out else out


# Decompression tiles (`_kv_decompress_kernel`): 128 cache rows x 128 output channels, K (the latent) in steps of 64.
# A row tile is computed whole (its rows past the last position too, finite values of the zero-initialized cache),
# so the attention's last key block (KEY_TILE_ROWS is a multiple of its BLOCK_N) reads only computed rows.
KEY_TILE_ROWS = 128
DECOMPRESS_BLOCK_N = 128
DECOMPRESS_BLOCK_K = 64


@triton.jit
def _kv_decompress_kernel(
    c_ptr, rows_ptr, pos_ptr, w_ptr, out_ptr, T, C, N, R, S, s_c_b, s_c_t, s_rows, s_pos_b, s_pos_s, s_w_n, s_o_b,
    s_o_t, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    """out[b, t, n] = sum_k c[row, t, k] * w[n, k] (fp32 accumulation, rounded to out's dtype) for n < N, and
    out[b, t, N + r] = c[row, t, C + r] for r < R (k_pe, copied by the programs of the first column block), for the
    row tiles that start before sequence b's last position + 1 (its chunk's last query, read on the device); later
    tiles exit at once. row: cache sequence rows[b] (HAS_ROWS; loaded here, in the kernel's body: see
    docs/KERNELS.md on what Inductor takes as written), else b. Grid (N / BLOCK_N, T / BLOCK_T, B): a row tile's
    programs run together and share its cache rows in L2."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    limit = tl.load(pos_ptr + b * s_pos_b + (S - 1) * s_pos_s) + 1  # positions increase along the chunk
    t0 = pid_t * BLOCK_T
    if t0 >= limit:
        return
    if HAS_ROWS:
        row = tl.load(rows_ptr + b * s_rows).to(tl.int64)
    else:
        row = b
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N
    if pid_n == 0:
        offs_r = tl.arange(0, R_PAD)
        rt_mask = t_mask[:, None] & (offs_r < R)[None, :]
        k_pe = tl.load(c_ptr + row * s_c_b + offs_t[:, None] * s_c_t + C + offs_r[None, :], mask=rt_mask)
        tl.store(out_ptr + b * s_o_b + offs_t[:, None] * s_o_t + N + offs_r[None, :], k_pe, mask=rt_mask)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < C
        a = tl.load(c_ptr + row * s_c_b + offs_t[:, None] * s_c_t + offs_k[None, :],
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * s_w_n + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)
    tl.store(out_ptr + b * s_o_b + offs_t[:, None] * s_o_t + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def _kv_decompress_tma_kernel(
    a_desc, w_desc, o_desc, c_ptr, rows_ptr, pos_ptr, T, C, N, R, S, s_c_b, s_c_t, s_rows, s_pos_b, s_pos_s, progs,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, O_BOX: tl.constexpr,
    HAS_ROWS: tl.constexpr, GROUP_T: tl.constexpr,
):
    """`_kv_decompress_kernel`'s output, persistent, through TMA: grid (progs, B), sequence b's programs stride over
    its [BLOCK_T, BLOCK_N] output tiles that start before its last position + 1 (row tiles of BLOCK_T = 128: the
    same rows), in groups of GROUP_T row tiles per weight tile (consecutive tiles share the weight tile in L2). The
    tile loop and the K loop are one flattened loop, so the next tile's loads are in flight while a tile is stored.
    a_desc: the whole cache [Bc, T, C + R], box [1, BLOCK_T, BLOCK_K] (C a multiple of BLOCK_K: no box reaches the
    rope columns); w_desc [N, C], box [BLOCK_N, BLOCK_K]; o_desc: the whole output [B, T, N + R], box [1, BLOCK_T,
    O_BOX] (N a multiple of BLOCK_N: no tile reaches k_pe's columns), each tile stored as BLOCK_N / O_BOX = 4
    column blocks. Every box's inner side is at most 128 bytes (O_BOX, BLOCK_K: 64 bf16 values): AOTInductor's
    generated code builds each descriptor with the whole box and a 128-byte swizzle, which the driver refuses for a
    wider box ("CUDA driver error: invalid argument" at the package's first run; Triton's own launcher splits such
    boxes). k_pe's columns first: loaded as [BLOCK_T, O_BOX] pointer tiles (zeros past R <= O_BOX) and stored
    through o_desc at column N, the box clipped at the row's end (the output is written through the descriptor
    alone: passed as a second, pointer argument too, torch's analysis of the launch would take both as written, and
    a compiled graph may then copy each back over the other). The launcher checks the sizes; descriptors over whole
    tensors, not views (see mla_prefill_attention_triton)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # (positions and rows loaded here, in the kernel's body: docs/KERNELS.md on what Inductor takes as written)
    limit = tl.load(pos_ptr + b * s_pos_b + (S - 1) * s_pos_s).to(tl.int32) + 1
    if HAS_ROWS:
        row = tl.load(rows_ptr + b * s_rows).to(tl.int64)
    else:
        row = b
    tl.static_assert(BLOCK_N == 4 * O_BOX)
    n_t = tl.minimum(tl.cdiv(limit, BLOCK_T), tl.cdiv(T, BLOCK_T))
    offs_r = tl.arange(0, O_BOX)
    b32 = b.to(tl.int32)
    for pt in range(pid, n_t, progs):
        offs_t = pt * BLOCK_T + tl.arange(0, BLOCK_T)
        k_pe = tl.load(c_ptr + row * s_c_b + offs_t[:, None] * s_c_t + C + offs_r[None, :],
                       mask=(offs_t < T)[:, None] & (offs_r < R)[None, :], other=0.0)
        o_desc.store([b32, pt * BLOCK_T, N], k_pe.reshape(1, BLOCK_T, O_BOX))
    row32 = row.to(tl.int32)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_T * n_n
    for tile in tl.range(pid, n_t * n_n, progs, flatten=True):
        first_t = (tile // per_group) * GROUP_T
        size = tl.minimum(n_t - first_t, GROUP_T)
        t0 = (first_t + (tile % per_group) % size) * BLOCK_T
        n0 = ((tile % per_group) // size) * BLOCK_N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            a = a_desc.load([row32, t0, k0]).reshape(BLOCK_T, BLOCK_K)
            acc = tl.dot(a, w_desc.load([n0, k0]).T, acc)
        # column c = i * 2 * O_BOX + j * O_BOX + k of the tile -> [BLOCK_T, O_BOX] block i * 2 + j
        even, odd = acc.reshape(BLOCK_T, 2, 2, O_BOX).permute(0, 3, 1, 2).split()  # j = 0, 1
        q0, q2 = even.split()
        q1, q3 = odd.split()
        o_desc.store([b32, t0, n0], q0.to(o_desc.dtype).reshape(1, BLOCK_T, O_BOX))
        o_desc.store([b32, t0, n0 + O_BOX], q1.to(o_desc.dtype).reshape(1, BLOCK_T, O_BOX))
        o_desc.store([b32, t0, n0 + 2 * O_BOX], q2.to(o_desc.dtype).reshape(1, BLOCK_T, O_BOX))
        o_desc.store([b32, t0, n0 + 3 * O_BOX], q3.to(o_desc.dtype).reshape(1, BLOCK_T, O_BOX))


# The persistent TMA decompression's launch (the best of scripts/try_decompress.py's variants, H200, 16B shapes: N
# 4096, C 512): 128 x 256 tiles, K steps of 64, 3 stages, 8 warps, groups of 8 row tiles, one program per SM per
# sequence. Against `_kv_decompress_kernel` (scripts/sweep_decompress.py, 2026-11-26): 8192 rows 77.3 -> 58.8 us,
# 32768 rows 279.0 -> 223.6 (cuBLAS on the same rows 55.1 / 208.8).
DECOMPRESS_TMA_BLOCK_N = 256
DECOMPRESS_TMA_GROUP_T = 8


def decompress_choice() -> str:
    """DSV3_PREFILL_DECOMPRESS=tma (default) / pointer: `_kv_decompress_tma_kernel` where its descriptors are
    possible, or always `_kv_decompress_kernel` (the A/B baseline). Read at trace time."""
    return env_switch("DSV3_PREFILL_DECOMPRESS", "tma", ("tma", "pointer"))


def _decompress_tma_ok(latent_cache: torch.Tensor, w: torch.Tensor, out: torch.Tensor, c: int, n: int,
                       r: int) -> bool:
    return (decompress_choice() == "tma" and latent_cache.element_size() == 2 and c % DECOMPRESS_BLOCK_K == 0
            and n % DECOMPRESS_TMA_BLOCK_N == 0 and r <= DECOMPRESS_TMA_BLOCK_N // 4
            and all(tma_descriptor_ok(t) for t in (latent_cache, w, out)))


def kv_decompress_triton(latent_cache: torch.Tensor, input_pos: torch.Tensor, w: torch.Tensor,
                         cache_rows: Optional[torch.Tensor] = None, block_n: Optional[int] = None,
                         block_k: int = DECOMPRESS_BLOCK_K, num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """[Bc, T, C + R] cache, [B, S] positions, [N, C] kv_b_proj weight (the cache's dtype), cache_rows [B] (None:
    sequences 0..B-1) -> [B, T, N + R]: each sequence's rows up to its last position decompressed (columns < N) with
    their k_pe after them (whole KEY_TILE_ROWS tiles), later rows left unwritten. `_kv_decompress_tma_kernel` where
    `_decompress_tma_ok`, else `_kv_decompress_kernel`. The keyword arguments after cache_rows are for sweeps of the
    pointer kernel (scripts/sweep_decompress.py; block_n given: that kernel)."""
    t_cap, cr = latent_cache.shape[1:]
    bsz = input_pos.shape[0]
    n, c = w.shape
    r = cr - c
    out = torch.empty((bsz, t_cap, n + r), dtype=latent_cache.dtype, device=latent_cache.device)
    if w.stride(-1) != 1:
        w = w.contiguous()
    rows = input_pos if cache_rows is None else cache_rows  # (not read without HAS_ROWS)
    if block_n is None and _decompress_tma_ok(latent_cache, w, out, c, n, r):
        progs = max(1, num_sms(latent_cache.device) // bsz)
        bn = DECOMPRESS_TMA_BLOCK_N
        launch_with_descriptors(
            _kv_decompress_tma_kernel, (progs, bsz),
            {"a_desc": [1, KEY_TILE_ROWS, DECOMPRESS_BLOCK_K], "w_desc": [bn, DECOMPRESS_BLOCK_K],
             "o_desc": [1, KEY_TILE_ROWS, bn // 4]},
            a_desc=latent_cache, w_desc=w, o_desc=out, c_ptr=latent_cache, rows_ptr=rows, pos_ptr=input_pos,
            T=t_cap, C=c, N=n, R=r, S=input_pos.shape[1], s_c_b=latent_cache.stride(0), s_c_t=latent_cache.stride(1),
            s_rows=rows.stride(0), s_pos_b=input_pos.stride(0), s_pos_s=input_pos.stride(1), progs=progs,
            BLOCK_T=KEY_TILE_ROWS, BLOCK_N=bn, BLOCK_K=DECOMPRESS_BLOCK_K, O_BOX=bn // 4,
            HAS_ROWS=cache_rows is not None, GROUP_T=DECOMPRESS_TMA_GROUP_T, num_warps=8, num_stages=3,
        )
        return out
    block_n = block_n or DECOMPRESS_BLOCK_N
    wrap_triton(_kv_decompress_kernel)[(cdiv(n, block_n), cdiv(t_cap, KEY_TILE_ROWS), bsz)](
        latent_cache, rows, input_pos, w, out, t_cap, c, n, r, input_pos.shape[1], latent_cache.stride(0),
        latent_cache.stride(1), rows.stride(0), input_pos.stride(0), input_pos.stride(1), w.stride(0), out.stride(0),
        out.stride(1), BLOCK_T=KEY_TILE_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, R_PAD=max(16, next_pow2(r)),
        HAS_ROWS=cache_rows is not None, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _cached_keys(kv: torch.Tensor, heads: int, nope_dim: int, v_dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_nope [B, T, H, Dn], k_pe [B, T, R], v [B, T, H, Dv]): views of kv_decompress_triton's [B, T, N + R]."""
    bsz, t_cap = kv.shape[:2]
    n = heads * (nope_dim + v_dim)
    k_nope, v = kv[..., :n].view(bsz, t_cap, heads, nope_dim + v_dim).split([nope_dim, v_dim], dim=-1)
    return k_nope, kv[..., n:], v


def prefill_attn_tma() -> bool:
    """DSV3_PREFILL_ATTN_TMA=on (default) / off: whether the prefill attention kernel may read its keys through TMA
    descriptors (off: pointer tiles; the A/B baseline). Read at trace time."""
    return env_switch("DSV3_PREFILL_ATTN_TMA", "on", ("on", "off")) == "on"


def _triton_ok(*tensors: torch.Tensor) -> bool:
    return tensors[0].dtype in (torch.bfloat16, torch.float16) and all(t.dtype == tensors[0].dtype for t in tensors)


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------


@triton_op("dsv3::mla_prefix_attention", mutates_args=())
def mla_prefix_attention(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if q_latent.device.type == "cpu" or not _triton_ok(q_latent, q_pe, latent_cache):
        return mla_prefix_attention_reference(q_latent, q_pe, latent_cache, input_pos, softmax_scale)
    return mla_prefix_attention_triton(q_latent, q_pe, latent_cache, input_pos, softmax_scale)


@mla_prefix_attention.register_fake
def _mla_prefix_attention_fake(q_latent, q_pe, latent_cache, input_pos, softmax_scale):
    b, s, h, _ = q_latent.shape
    return torch.empty_like(q_latent), q_latent.new_empty((b, s, h), dtype=torch.float32)


@triton_op("dsv3::mla_prefill_attention", mutates_args=())
def mla_prefill_attention(
    q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
    input_pos: torch.Tensor, softmax_scale: float, prefix_out: Optional[torch.Tensor] = None,
    prefix_lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    torch._check((prefix_out is None) == (prefix_lse is None),
                 lambda: "mla_prefill_attention: give prefix_out and prefix_lse together, or neither")
    dense = (q_nope, q_pe, k_nope, k_pe, v) + (() if prefix_out is None else (prefix_out,))
    if q_nope.device.type == "cpu" or not _triton_ok(*dense):
        return mla_prefill_attention_reference(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale,
                                               prefix_out, prefix_lse)
    return mla_prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale, prefix_out,
                                        prefix_lse)


@mla_prefill_attention.register_fake
def _mla_prefill_attention_fake(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale, prefix_out=None,
                                prefix_lse=None):
    torch._check((prefix_out is None) == (prefix_lse is None),
                 lambda: "mla_prefill_attention: give prefix_out and prefix_lse together, or neither")
    torch._check(k_pe.shape[-1] == q_pe.shape[-1], lambda: "mla_prefill_attention: q_pe and k_pe rope dims differ")
    b, s, h, _ = q_nope.shape
    return q_nope.new_empty((b, s, h, v.shape[-1]))


def prefill_o_quant() -> bool:
    """DSV3_PREFILL_O_QUANT=on (default) / off: whether dsv3.mla_prefill_attention_o_proj may quantize o_proj's
    input in the attention kernel (off: the attention op then dsv3.fp8_linear; the A/B baseline). Trace time."""
    return env_switch("DSV3_PREFILL_O_QUANT", "on", ("on", "off")) == "on"


def prefill_o_proj_fused(q_nope: torch.Tensor, v: torch.Tensor, dense: tuple, o_weight: torch.Tensor) -> bool:
    """Whether dsv3.mla_prefill_attention_o_proj takes its fused path (decided at trace time from static facts):
    the attention's Triton kernel applies (CUDA, bf16), Dv = 128 (a head's output is one quantization block),
    o_proj is FP8 with K = H * Dv and dsv3.fp8_linear would take cuBLAS for it (`scaled_mm_usable`, a token count
    that is dynamic or above GEMV_MAX_M, DSV3_FP8_GEMM auto or scaled_mm), and inside AOTInductor compilation
    K / 128 is a multiple of 4 (the v1 `_scaled_mm` there; fp8_scaled_mm would pad K)."""
    bsz, seqlen, heads, _ = q_nope.shape
    m = static_int(bsz * seqlen)
    # (scaled_mm_usable looks at the activation's device and dtype only: q_nope's are o_proj's input's)
    return (_triton_ok(*dense) and scaled_mm_usable(q_nope, o_weight) and v.shape[-1] == BLOCK
            and o_weight.dtype == FP8_DTYPE and o_weight.shape[1] == heads * BLOCK
            and (m is None or m > GEMV_MAX_M) and fp8_gemm_mode() in ("auto", "scaled_mm")
            and not (_aot_compiling() and heads % 4) and prefill_o_quant())


@triton_op("dsv3::mla_prefill_attention_o_proj", mutates_args=())
def mla_prefill_attention_o_proj(
    q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
    input_pos: torch.Tensor, softmax_scale: float, o_weight: torch.Tensor, o_scale: torch.Tensor,
    prefix_out: Optional[torch.Tensor] = None, prefix_lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """o_proj(mla_prefill_attention(...)) for FP8 o_proj weights (o_weight [N, H * Dv] e4m3, o_scale its 128x128
    block scales): returns [B, S, N], exactly `dsv3.fp8_linear(dsv3.mla_prefill_attention(...).reshape(B, S,
    H * Dv), o_weight, o_scale)`. Fused path (`prefill_o_proj_fused`): the attention kernel writes its output
    quantized per token and head in the layout cuBLAS takes (QUANT_OUT), so o_proj's activation quantization (one
    launch reading the bf16 output, ~11 us per layer at 4095 tokens on the H200) is not run and the attention
    writes half the bytes; the same e4m3 values and scales, hence the same GEMM. Elsewhere the two ops."""
    bsz, seqlen, heads, _ = q_nope.shape
    dense = (q_nope, q_pe, k_nope, k_pe, v) + (() if prefix_out is None else (prefix_out,))
    if prefill_o_proj_fused(q_nope, v, dense, o_weight):
        oq, os_ = mla_prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale, prefix_out,
                                               prefix_lse, quant_out=True)
        y = scaled_mm_quantized(oq, os_, o_weight, o_scale, q_nope.dtype)
        return y[:bsz * seqlen, :o_weight.shape[0]].reshape(bsz, seqlen, o_weight.shape[0])
    o = mla_prefill_attention(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale, prefix_out, prefix_lse)
    return fp8_linear(o.reshape(bsz, seqlen, heads * v.shape[-1]), o_weight, o_scale)


@mla_prefill_attention_o_proj.register_fake
def _mla_prefill_attention_o_proj_fake(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale, o_weight, o_scale,
                                       prefix_out=None, prefix_lse=None):
    torch._check(o_weight.shape[1] == q_nope.shape[2] * v.shape[-1],
                 lambda: f"mla_prefill_attention_o_proj: o_weight {tuple(o_weight.shape)} does not take "
                         f"{q_nope.shape[2]} heads x v_head_dim {v.shape[-1]}")
    _mla_prefill_attention_fake(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale, prefix_out, prefix_lse)
    b, s = q_nope.shape[:2]
    return q_nope.new_empty((b, s, o_weight.shape[0]))


CACHED_PREFILL_MAX_BYTES = 4 << 30


def prefill_prefix_choice() -> str:
    """DSV3_PREFILL_PREFIX=decompressed (default) / absorbed: how a continued prompt's chunk attends its prefix (the
    A/B baseline and an escape hatch). Read at trace time."""
    return env_switch("DSV3_PREFILL_PREFIX", "decompressed", ("decompressed", "absorbed"))


def cached_prefill_choice(latent_cache: torch.Tensor, bsz, heads: int, nope_dim: int, v_dim: int) -> bool:
    """Whether a prefill chunk of `bsz` sequences that continues them runs `dsv3.mla_cached_prefill_attention` (its
    prefix decompressed) rather than the absorbed prefix (dsv3.mla_prefix_attention): read at trace time. Yes
    unless DSV3_PREFILL_PREFIX=absorbed, or the decompressed rows of [bsz, T] (T: the cache's rows per sequence)
    would take more than CACHED_PREFILL_MAX_BYTES (the op allocates [B, T, H*(Dn+Dv) + R] for them: 16B at 32768
    rows 273 MB per sequence, 671B's full 163840 at 16 heads per rank 1.4 GB; counted here with the cache's whole
    row width for R), or B / T are dynamic."""
    if prefill_prefix_choice() != "decompressed":
        return False
    b, t = static_int(bsz), static_int(latent_cache.shape[1])
    width = heads * (nope_dim + v_dim) + latent_cache.shape[-1]
    return (b is not None and t is not None
            and b * t * width * latent_cache.element_size() <= CACHED_PREFILL_MAX_BYTES)


@triton_op("dsv3::mla_cached_prefill_attention", mutates_args=())
def mla_cached_prefill_attention(
    q_nope: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    kv_b_weight: torch.Tensor, softmax_scale: float, nope_dim: int, v_dim: int,
    cache_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if q_nope.device.type == "cpu" or not _triton_ok(q_nope, q_pe, latent_cache, kv_b_weight):
        return mla_cached_prefill_attention_reference(q_nope, q_pe, latent_cache, input_pos, kv_b_weight,
                                                      softmax_scale, nope_dim, v_dim, cache_rows)
    kv = kv_decompress_triton(latent_cache, input_pos, kv_b_weight, cache_rows)
    k_nope, k_pe, v = _cached_keys(kv, q_nope.shape[2], nope_dim, v_dim)
    return mla_prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale, keys_cached=True)


def _check_cached(q_nope, q_pe, latent_cache, input_pos, kv_b_weight, nope_dim, v_dim, cache_rows) -> None:
    heads, c = q_nope.shape[2], kv_b_weight.shape[1]
    torch._check(kv_b_weight.shape[0] == heads * (nope_dim + v_dim) and q_nope.shape[-1] == nope_dim,
                 lambda: f"mla_cached_prefill_attention: kv_b_weight {tuple(kv_b_weight.shape)} does not give "
                         f"{heads} heads of nope {nope_dim} + v {v_dim} (q_nope {tuple(q_nope.shape)})")
    torch._check(latent_cache.shape[-1] == c + q_pe.shape[-1],
                 lambda: f"mla_cached_prefill_attention: cache rows of {latent_cache.shape[-1]} are not kv_lora_rank "
                         f"{c} + rope {q_pe.shape[-1]}")
    if cache_rows is None:
        torch._check(input_pos.shape[0] <= latent_cache.shape[0],
                     lambda: f"mla_cached_prefill_attention: {input_pos.shape[0]} sequences, the cache holds "
                             f"{latent_cache.shape[0]} (pass cache_rows to choose them)")
    else:
        torch._check(cache_rows.shape == (input_pos.shape[0],),
                     lambda: f"mla_cached_prefill_attention: cache_rows {tuple(cache_rows.shape)}, want one row per "
                             f"sequence ({input_pos.shape[0]})")


@mla_cached_prefill_attention.register_fake
def _mla_cached_prefill_attention_fake(q_nope, q_pe, latent_cache, input_pos, kv_b_weight, softmax_scale, nope_dim,
                                       v_dim, cache_rows=None):
    _check_cached(q_nope, q_pe, latent_cache, input_pos, kv_b_weight, nope_dim, v_dim, cache_rows)
    b, s, h, _ = q_nope.shape
    return q_nope.new_empty((b, s, h, v_dim))


@triton_op("dsv3::mla_cached_prefill_attention_o_proj", mutates_args=())
def mla_cached_prefill_attention_o_proj(
    q_nope: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    kv_b_weight: torch.Tensor, softmax_scale: float, nope_dim: int, v_dim: int, o_weight: torch.Tensor,
    o_scale: torch.Tensor, cache_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exactly dsv3.fp8_linear(mla_cached_prefill_attention(...).reshape(B, S, H * Dv), o_weight, o_scale), with the
    attention kernel quantizing o_proj's input where `prefill_o_proj_fused` says (as mla_prefill_attention_o_proj)."""
    bsz, seqlen, heads, _ = q_nope.shape
    if q_nope.device.type == "cpu" or not _triton_ok(q_nope, q_pe, latent_cache, kv_b_weight):
        o = mla_cached_prefill_attention_reference(q_nope, q_pe, latent_cache, input_pos, kv_b_weight, softmax_scale,
                                                   nope_dim, v_dim, cache_rows)
        return fp8_linear(o.reshape(bsz, seqlen, heads * v_dim), o_weight, o_scale)
    kv = kv_decompress_triton(latent_cache, input_pos, kv_b_weight, cache_rows)
    k_nope, k_pe, v = _cached_keys(kv, heads, nope_dim, v_dim)
    if prefill_o_proj_fused(q_nope, v, (q_nope, q_pe, k_nope, k_pe, v), o_weight):
        oq, os_ = mla_prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale,
                                               quant_out=True, keys_cached=True)
        y = scaled_mm_quantized(oq, os_, o_weight, o_scale, q_nope.dtype)
        return y[:bsz * seqlen, :o_weight.shape[0]].reshape(bsz, seqlen, o_weight.shape[0])
    o = mla_prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v, input_pos, softmax_scale, keys_cached=True)
    return fp8_linear(o.reshape(bsz, seqlen, heads * v_dim), o_weight, o_scale)


@mla_cached_prefill_attention_o_proj.register_fake
def _mla_cached_prefill_attention_o_proj_fake(q_nope, q_pe, latent_cache, input_pos, kv_b_weight, softmax_scale,
                                              nope_dim, v_dim, o_weight, o_scale, cache_rows=None):
    _check_cached(q_nope, q_pe, latent_cache, input_pos, kv_b_weight, nope_dim, v_dim, cache_rows)
    torch._check(o_weight.shape[1] == q_nope.shape[2] * v_dim,
                 lambda: f"mla_cached_prefill_attention_o_proj: o_weight {tuple(o_weight.shape)} does not take "
                         f"{q_nope.shape[2]} heads x v_head_dim {v_dim}")
    b, s = q_nope.shape[:2]
    return q_nope.new_empty((b, s, o_weight.shape[0]))


__all__ = ["mla_prefix_attention", "mla_prefill_attention", "mla_prefill_attention_o_proj",
           "mla_prefix_attention_reference", "mla_prefill_attention_reference", "mla_prefix_attention_triton",
           "mla_prefill_attention_triton", "prefill_attention_launches", "prefill_o_proj_fused",
           "mla_cached_prefill_attention", "mla_cached_prefill_attention_o_proj",
           "mla_cached_prefill_attention_reference", "kv_decompress_triton", "cached_prefill_choice", "cache_sequences",
           "prefill_prefix_choice"]
