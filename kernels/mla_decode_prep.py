"""`torch.ops.dsv3.mla_decode_prep`: everything between MLA's input projections and absorbed attention, at decode.

After the input projections a decode step of absorbed MLA has four small, independent pieces of work that depend
only on the projections' outputs: RMSNorm of the compressed kv (kv_a_layernorm), RoPE of the key's rope part,
the write of the new latent row (both of those) into the cache, RoPE of the queries' rope parts, and the query
absorption q_nope @ W_UK. Compiled as plain torch they are four Inductor kernels plus the absorb kernel, five
dependent launches of ~1-3 us each whose bytes are negligible (per layer at batch 1: a 576-wide row, 16-128 query
heads, a 1-8 MB slice of kv_b_proj). This op does them in ONE launch: its programs take different roles (the
absorb tiles, then one program per token for the latent row and the query rope), so five phases become one.

Contract
- q: [B, S, H, Dn + R] (the query projection's output per head, not roped; any strides with a unit last dim),
  kv_a: [B, S, C + R] (kv_a_proj_with_mqa's output: compressed kv, then the key's rope part, not roped),
  kv_norm_weight: [C] (kv_a_layernorm.weight), cos / sin: [B, S, R/2] fp32 (rope tables at each token's
  position, YaRN factor included), latent_cache: [B_max, T, C + R] (MUTATED: row input_pos[b, s] of sequence b is
  overwritten for every token; rows b < B), input_pos: [B, S] int64 (< T), kv_b_weight / kv_b_scale: kv_b_proj
  (FP8 with block scales, or dense with scale None), eps: the RMSNorm epsilon, nope_dim = Dn, v_dim = Dv.
- latent_cache[b, input_pos[b, s]] = cat(RMSNorm(c_kv) * weight, rope(k_pe)) in the cache dtype, with the model's
  rounding (dsv3.model.RMSNorm: normalise in fp32, round to the activation dtype, times the weight;
  dsv3.rope.apply_rope: fp32 rotation of interleaved pairs, de-interleaved output, rounded).
- Returns (q_latent [B, S, H, C] = q_nope @ W_UK per head as `dsv3.mla_absorb(..., output=False)`,
           q_pe [B, S, H, R] = rope(q[..., Dn:])), contiguous, in q.dtype.

Implementations (branch taken at trace time)
- CPU, unsupported shapes or dtypes, or DSV3_DECODE_PREP=torch: `mla_decode_prep_reference`, the model's own
  composition of torch ops plus `dsv3.mla_absorb`; under torch.compile Inductor traces into it, so this path is
  exactly the graph the model had before this op existed (four Inductor kernels + the absorb kernel on CUDA).
- CUDA, bf16/fp16, B*S <= 64 tokens: `_mla_decode_prep_kernel`, one launch, 1-D grid: the first H * ceil(C/BLOCK_C)
  programs are the absorb tiles of `dsv3.mla_absorb`'s MMA kernel (`absorb_q_tile`, identical code and launch
  config), the next B*S programs one token each: kv RMSNorm over the whole C row in registers, RoPE of k_pe and
  of all H query rope parts, two stores into the cache row and one of q_pe. No program waits on another.
  DSV3_DECODE_PREP=fused|torch (read at trace time) pins a path. Default: `fused`, since it was timed side by side
  on the H200 (scripts/gpu_check.sh ab16, 2026-11-23: 16B at 8 layers, batch 1 703.4 -> 659.4 us per step, 5.5 us
  per layer less; predicted ~4).

`torch.ops.dsv3.mla_prefill_prep(q, kv_a, kv_norm_weight, cos, sin, latent_cache, input_pos, cache_rows, eps,
nope_dim) -> (q_pe, latent)`: the prefill's share of the same work (the prefill attention decompresses the chunk's
keys instead of absorbing the queries): the latent rows into the cache (row cache_rows[b] of sequence b, or b when
cache_rows is None) and returned ([B, S, C + R] in q.dtype: the naive attention's input), and q_pe roped. CPU, other
dtypes or DSV3_PREFILL_PREP=torch: `mla_prefill_prep_reference` (the composition the prefill graph had before:
Inductor made it four kernels, ~40 us per 16B layer at 4095 tokens, the q rope alone ~26). CUDA:
`_mla_prefill_prep_kernel`, programs of (BLOCK_T tokens, a block of query heads), the first head block's also
writing the latent rows. It replaced programs of one token, running the decode kernel's per-token code
(`prep_latent_row`, `rope_query_heads`) in one warp, whose outputs it reproduces bit for bit (see the kernel):
~16.6 us at 16B's 4095 tokens for ~31 MB moved (~1.9 TB/s), the rope pairs read by two stride-2 gathers (half of
each sector per load instruction) and ~7 KB per program. Here the rope parts are contiguous tiles split into the
pairs' halves in registers, the kv RMSNorm covers BLOCK_T rows at once, and each program moves BLOCK_T times more
(`prefill_prep_launch` picks the launch). H200, 4095 tokens, bitwise equal to the one-token kernel at every launch
swept (scripts/ab_prep.py, 2026-11-26): 16 heads 17.17 -> 8.37 us, 128 heads 89.38 -> 43.71 us.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, env_switch, next_pow2, static_int
from dsv3.kernels.mla_absorb import DECODE_MAX_M, absorb_q_tile  # (also registers dsv3.mla_absorb)
from dsv3.kernels.rms_norm import rms_norm_rounded, rms_scale
from dsv3.rope import apply_rope

DECODE_PREP_DEFAULT = "fused"
# `mla_prefill_prep`: DSV3_PREFILL_PREP=fused|torch pins a path (read at trace time); torch is the composition the
# prefill graph had before the op (Inductor's q rope, kv norm, latent cat and cache-write kernels).
PREFILL_PREP_DEFAULT = "fused"
# `prefill_prep_launch`'s defaults: ~13 KB read and ~17 KB written per program of 4 tokens x 16 heads (1024 programs
# at 4095 tokens, ~8 per SM), where the one-token programs moved ~7 KB. Measured (scripts/ab_prep.py, H200,
# 2026-11-26, 4095 tokens, BLOCK_T 2-16 x 1-8 warps x head blocks 16 / 32): within 0.2% of the sweep's best at 16
# heads (8.37 vs 8.32 us) and at 128 heads (43.71 vs 43.64); BLOCK_T 16 or 1 warp per program 3-9% slower.
PREFILL_PREP_HEADS = 16  # query heads per program (a head block)
PREFILL_PREP_BLOCK_T = 4  # tokens per program
PREFILL_PREP_WARPS = 4
PREFILL_PREP_MAX_TILE = 64  # BLOCK_T * head block at most: a [BLOCK_T, heads, 64] query tile and its fp32 halves


def mla_prefill_prep_reference(
    q: torch.Tensor, kv_a: torch.Tensor, kv_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    latent_cache: torch.Tensor, input_pos: torch.Tensor, cache_rows: Optional[torch.Tensor], eps: float,
    nope_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's torch composition: roped q_pe, and the latent rows (RMSNorm'd c_kv, roped k_pe) written into cache
    row cache_rows[b] (or b) at input_pos and returned."""
    bsz, seqlen = q.shape[:2]
    kv_rank = kv_norm_weight.shape[0]
    q_pe = apply_rope(q[..., nope_dim:], cos, sin)
    c_kv, k_pe = kv_a.split([kv_rank, kv_a.shape[-1] - kv_rank], dim=-1)
    latent = torch.cat([rms_norm_rounded(c_kv, kv_norm_weight, eps), apply_rope(k_pe, cos, sin)], dim=-1)
    rows = torch.arange(bsz, device=q.device) if cache_rows is None else cache_rows
    latent_cache.index_put_((rows.unsqueeze(1).expand(bsz, seqlen), input_pos), latent.to(latent_cache.dtype))
    return q_pe.contiguous(), latent


def mla_decode_prep_reference(
    q: torch.Tensor, kv_a: torch.Tensor, kv_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    latent_cache: torch.Tensor, input_pos: torch.Tensor, kv_b_weight: torch.Tensor,
    kv_b_scale: Optional[torch.Tensor], eps: float, nope_dim: int, v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill op's work (into cache rows 0..B-1) plus the query absorption."""
    q_pe, _ = mla_prefill_prep_reference(q, kv_a, kv_norm_weight, cos, sin, latent_cache, input_pos, None, eps,
                                         nope_dim)
    q_latent = torch.ops.dsv3.mla_absorb(q[..., :nope_dim], kv_b_weight, kv_b_scale, nope_dim, v_dim, False)
    return q_latent, q_pe


@triton.jit
def _mla_decode_prep_kernel(
    q_ptr, kv_ptr, nw_ptr, cos_ptr, sin_ptr, cache_ptr, pos_ptr, w_ptr, s_ptr, qlat_ptr, qpe_ptr,
    M, S, H, C, DN, R_HALF, ROWS_PER_HEAD, N_CB, T, eps,
    stride_qm, stride_qh, stride_kvm, stride_csb, stride_css, stride_cb, stride_ct, stride_pb, stride_ps,
    stride_wr, stride_sr, stride_sc, stride_lm, stride_lh, stride_em, stride_eh,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_C: tl.constexpr,
    C_PAD: tl.constexpr, RH_PAD: tl.constexpr, H_PAD: tl.constexpr,
):
    """Programs [0, H * N_CB): absorb tiles (head, channel block). Programs [H * N_CB, H * N_CB + M): token m =
    b * S + s: the latent row into the cache and the query rope of all heads."""
    pid = tl.program_id(0)
    n_absorb = H * N_CB
    if pid < n_absorb:
        absorb_q_tile(q_ptr, w_ptr, s_ptr, qlat_ptr, pid // N_CB, pid % N_CB, M, C, DN, ROWS_PER_HEAD,
                      stride_qm, stride_qh, stride_wr, stride_sr, stride_sc, stride_lm, stride_lh,
                      HAS_SCALE, BLOCK_M, BLOCK_DN, BLOCK_C)
    else:
        m = pid - n_absorb
        b = m // S
        s = m - b * S
        b = b.to(tl.int64)  # b * stride_cb: a cache of 2^31 elements per layer is not reachable today, but cheap
        prep_latent_row(kv_ptr, nw_ptr, cos_ptr, sin_ptr, cache_ptr, pos_ptr, kv_ptr, m, b, s, b, C, R_HALF, T, eps,
                        stride_kvm, stride_csb, stride_css, stride_cb, stride_ct, stride_pb, stride_ps, 0,
                        False, C_PAD, RH_PAD)
        rope_query_heads(q_ptr, cos_ptr, sin_ptr, qpe_ptr, m, b, s, 0, H, DN, R_HALF, stride_qm, stride_qh,
                         stride_csb, stride_css, stride_em, stride_eh, RH_PAD, H_PAD)


@triton.jit
def prep_latent_row(
    kv_ptr, nw_ptr, cos_ptr, sin_ptr, cache_ptr, pos_ptr, lat_ptr, m, b, s, row, C, R_HALF, T, eps,
    stride_kvm, stride_csb, stride_css, stride_cb, stride_ct, stride_pb, stride_ps, stride_am,
    LATENT_OUT: tl.constexpr, C_PAD: tl.constexpr, RH_PAD: tl.constexpr,
):
    """Token m = b * S + s of kv_a: its latent row (kv RMSNorm, roped k_pe) into cache row `row` at position
    input_pos[b, s] and, LATENT_OUT, into lat[m]."""
    dt = kv_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps)
    row_ptr = cache_ptr + row * stride_cb + pos * stride_ct
    # kv_a_layernorm over the C compressed channels, with RMSNorm's rounding points
    offs_c = tl.arange(0, C_PAD)
    c_mask = offs_c < C
    pos_c = pos + tl.zeros_like(offs_c)  # the contract says 0 <= pos < T; never write outside the cache anyway
    c_store = c_mask & (pos_c >= 0) & (pos_c < T)  # (a vector: the interpreter rejects block & scalar masks)
    x = tl.load(kv_ptr + m * stride_kvm + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    inv = rms_scale(tl.sum(x * x, axis=0), C, eps)
    normed = (x * inv).to(dt).to(tl.float32)
    w = tl.load(nw_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    c_kv = (w * normed).to(dt)
    tl.store(row_ptr + offs_c, c_kv.to(cache_ptr.dtype.element_ty), mask=c_store)
    if LATENT_OUT:
        tl.store(lat_ptr + m * stride_am + offs_c, c_kv, mask=c_mask)
    # RoPE of interleaved pairs (x[2j], x[2j+1]) -> (x1 cos - x2 sin, x2 cos + x1 sin) de-interleaved
    offs_j = tl.arange(0, RH_PAD)
    j_mask = offs_j < R_HALF
    pos_j = pos + tl.zeros_like(offs_j)
    j_store = j_mask & (pos_j >= 0) & (pos_j < T)
    cs = tl.load(cos_ptr + b * stride_csb + s * stride_css + offs_j, mask=j_mask, other=0.0)
    sn = tl.load(sin_ptr + b * stride_csb + s * stride_css + offs_j, mask=j_mask, other=0.0)
    k1 = tl.load(kv_ptr + m * stride_kvm + C + 2 * offs_j, mask=j_mask, other=0.0).to(tl.float32)
    k2 = tl.load(kv_ptr + m * stride_kvm + C + 2 * offs_j + 1, mask=j_mask, other=0.0).to(tl.float32)
    ce = cache_ptr.dtype.element_ty
    k_lo = (k1 * cs - k2 * sn).to(dt)
    k_hi = (k2 * cs + k1 * sn).to(dt)
    tl.store(row_ptr + C + offs_j, k_lo.to(ce), mask=j_store)
    tl.store(row_ptr + C + R_HALF + offs_j, k_hi.to(ce), mask=j_store)
    if LATENT_OUT:
        tl.store(lat_ptr + m * stride_am + C + offs_j, k_lo, mask=j_mask)
        tl.store(lat_ptr + m * stride_am + C + R_HALF + offs_j, k_hi, mask=j_mask)


@triton.jit
def rope_query_heads(
    q_ptr, cos_ptr, sin_ptr, qpe_ptr, m, b, s, h0, H, DN, R_HALF,
    stride_qm, stride_qh, stride_csb, stride_css, stride_em, stride_eh, RH_PAD: tl.constexpr, H_PAD: tl.constexpr,
):
    """Token m's query rope parts of heads [h0, h0 + H_PAD) (those < H) into qpe[m], as `apply_rope`."""
    dt = q_ptr.dtype.element_ty
    offs_j = tl.arange(0, RH_PAD)
    j_mask = offs_j < R_HALF
    cs = tl.load(cos_ptr + b * stride_csb + s * stride_css + offs_j, mask=j_mask, other=0.0)
    sn = tl.load(sin_ptr + b * stride_csb + s * stride_css + offs_j, mask=j_mask, other=0.0)
    offs_h = h0 + tl.arange(0, H_PAD)
    hj_mask = (offs_h < H)[:, None] & j_mask[None, :]
    q_base = q_ptr + m * stride_qm + offs_h[:, None] * stride_qh + DN + 2 * offs_j[None, :]
    q1 = tl.load(q_base, mask=hj_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_base + 1, mask=hj_mask, other=0.0).to(tl.float32)
    e_base = qpe_ptr + m * stride_em + offs_h[:, None] * stride_eh + offs_j[None, :]
    tl.store(e_base, (q1 * cs[None, :] - q2 * sn[None, :]).to(dt), mask=hj_mask)
    tl.store(e_base + R_HALF, (q2 * cs[None, :] + q1 * sn[None, :]).to(dt), mask=hj_mask)


def _token_rows(q: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' views of their inputs: q as [M, H, Dn + R] and kv_a as [M, C + R] (views of the model's layouts:
    tokens, then heads at a fixed stride; copied only without a unit last stride), cos / sin as [B, S, R/2] with one
    layout for both."""
    bsz, seqlen, heads, qdim = q.shape
    m = bsz * seqlen
    q3 = q.reshape(m, heads, qdim)
    kv2 = kv_a.reshape(m, kv_a.shape[-1])
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    if kv2.stride(-1) != 1:
        kv2 = kv2.contiguous()
    cos, sin = cos.expand(bsz, seqlen, rope // 2), sin.expand(bsz, seqlen, rope // 2)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return q3, kv2, cos, sin


def mla_decode_prep_triton(
    q: torch.Tensor, kv_a: torch.Tensor, kv_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    latent_cache: torch.Tensor, input_pos: torch.Tensor, kv_b_weight: torch.Tensor,
    kv_b_scale: Optional[torch.Tensor], eps: float, nope_dim: int, v_dim: int, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, seqlen, heads, qdim = q.shape
    rope = qdim - nope_dim
    kv_rank = kv_norm_weight.shape[0]
    m = bsz * seqlen
    q3, kv2, cos, sin = _token_rows(q, kv_a, cos, sin, rope)
    c = kv_b_weight.shape[1]
    q_latent = torch.empty((bsz, seqlen, heads, c), dtype=q.dtype, device=q.device)
    q_pe = torch.empty((bsz, seqlen, heads, rope), dtype=q.dtype, device=q.device)
    lat3, pe3 = q_latent.view(m, heads, c), q_pe.view(m, heads, rope)
    has_scale = kv_b_scale is not None
    s = kv_b_scale if has_scale else kv_b_weight  # unused without scales
    s_strides = (s.stride(0), s.stride(1)) if has_scale else (0, 0)
    block_c = min(128, max(16, next_pow2(c)))  # as mla_absorb's MMA kernel
    n_cb = cdiv(c, block_c)
    wrap_triton(_mla_decode_prep_kernel)[(heads * n_cb + m,)](
        q3, kv2, kv_norm_weight, cos, sin, latent_cache, input_pos, kv_b_weight, s, lat3, pe3,
        m, seqlen, heads, c, nope_dim, rope // 2, nope_dim + v_dim, n_cb, latent_cache.shape[1], float(eps),
        q3.stride(0), q3.stride(1), kv2.stride(0), cos.stride(0), cos.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), input_pos.stride(0), input_pos.stride(1),
        kv_b_weight.stride(0), *s_strides, lat3.stride(0), lat3.stride(1), pe3.stride(0), pe3.stride(1),
        HAS_SCALE=has_scale, BLOCK_M=max(16, next_pow2(m)), BLOCK_DN=max(16, next_pow2(nope_dim)), BLOCK_C=block_c,
        C_PAD=next_pow2(kv_rank), RH_PAD=max(2, next_pow2(rope // 2)), H_PAD=max(2, next_pow2(heads)),
        num_warps=num_warps,
    )
    return q_latent, q_pe


def _triton_ok(q: torch.Tensor, kv_a: torch.Tensor, latent_cache: torch.Tensor, kv_b_weight: torch.Tensor,
               kv_b_scale: Optional[torch.Tensor]) -> bool:
    if q.dtype not in (torch.bfloat16, torch.float16) or kv_a.dtype != q.dtype or latent_cache.dtype != q.dtype:
        return False
    if latent_cache.stride(-1) != 1 or kv_b_weight.stride(-1) != 1:
        return False
    m = static_int(q.shape[0] * q.shape[1])
    if m is None or not 0 < m <= DECODE_MAX_M:
        return False
    if kv_b_scale is not None:
        return kv_b_weight.dtype == torch.float8_e4m3fn
    return kv_b_weight.dtype == q.dtype


def decode_prep_choice() -> str:
    return env_switch("DSV3_DECODE_PREP", DECODE_PREP_DEFAULT, ("fused", "torch"))


@triton_op("dsv3::mla_decode_prep", mutates_args=("latent_cache",))
def mla_decode_prep(
    q: torch.Tensor, kv_a: torch.Tensor, kv_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    latent_cache: torch.Tensor, input_pos: torch.Tensor, kv_b_weight: torch.Tensor,
    kv_b_scale: Optional[torch.Tensor], eps: float, nope_dim: int, v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, kv_a, kv_norm_weight, cos, sin, latent_cache, input_pos, kv_b_weight, kv_b_scale, eps, nope_dim, v_dim)
    if (q.device.type == "cpu" or decode_prep_choice() == "torch"
            or not _triton_ok(q, kv_a, latent_cache, kv_b_weight, kv_b_scale)):
        return mla_decode_prep_reference(*args)
    return mla_decode_prep_triton(*args)


@mla_decode_prep.register_fake
def _mla_decode_prep_fake(q, kv_a, kv_norm_weight, cos, sin, latent_cache, input_pos, kv_b_weight, kv_b_scale,
                          eps, nope_dim, v_dim):
    bsz, seqlen, heads, qdim = q.shape
    torch._check(kv_b_weight.shape[0] == heads * (nope_dim + v_dim),
                 lambda: f"mla_decode_prep: kv_b_weight has {kv_b_weight.shape[0]} rows, expected {heads} heads x "
                         f"({nope_dim} + {v_dim})")
    torch._check(kv_a.shape[-1] == kv_norm_weight.shape[0] + qdim - nope_dim,
                 lambda: f"mla_decode_prep: kv_a width {kv_a.shape[-1]} != kv_lora_rank {kv_norm_weight.shape[0]} "
                         f"+ rope dim {qdim - nope_dim}")
    return (q.new_empty((bsz, seqlen, heads, kv_b_weight.shape[1])),
            q.new_empty((bsz, seqlen, heads, qdim - nope_dim)))


# ----------------------------------------------------------------------------------------------------------------
# Prefill: the same per-token work without the absorption (the prefill attention decompresses the keys instead)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _mla_prefill_prep_kernel(
    q_ptr, kv_ptr, nw_ptr, cos_ptr, sin_ptr, cache_ptr, pos_ptr, rows_ptr, qpe_ptr, lat_ptr,
    M, S, H, C, DN, R_HALF, T, eps,
    stride_qm, stride_qh, stride_kvm, stride_csb, stride_css, stride_cb, stride_ct, stride_pb, stride_ps,
    stride_em, stride_eh, stride_am,
    HAS_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, H_PAD: tl.constexpr, RH_PAD: tl.constexpr,
    RED_N: tl.constexpr, RED_L: tl.constexpr, RED_V: tl.constexpr, LOG2_RED_L: tl.constexpr, FUSED_ROPE: tl.constexpr,
):
    """Grid (token blocks, head blocks): program (i, j) ropes the query heads [j * H_PAD, (j + 1) * H_PAD) of tokens
    m = i * BLOCK_T + [0, BLOCK_T) (m = b * S + s, those < M; a block may straddle two sequences), and the programs
    of head block 0 also write those tokens' latent rows (cache row cache_rows[b] (HAS_ROWS) or b, and lat[m]).

    Bitwise what the one-token kernel it replaced (`prep_latent_row` + `rope_query_heads` per program) computed on
    the GPU, which takes more than the same source operations. The kv sum of squares: in that kernel's reduction
    order, spelled out (`_row_sum_sq`). The rope: with Triton's default fp fusion LLVM contracts a product of
    x1 * cos - x2 * sin and of x2 * cos + x1 * sin into an FMA. In a difference it fuses the first product, here as
    there; in a sum it picks by its operands' ranks, which follow the order of the loads, and the loads differ here:
    Triton 3.6's sm_90 PTX of that kernel fuses x2 * cos into the query sum and x1 * sin into the key sum, and
    FUSED_ROPE spells those out with `tl.fma`. Without FUSED_ROPE (the interpreter, which contracts nothing) the
    plain products, as the torch reference computes them."""
    m0 = tl.program_id(0) * BLOCK_T
    h0 = tl.program_id(1) * H_PAD
    # the query rope first and done (stores are not waited for): the latent rows' loads then follow without keeping
    # the query tile's registers live through them (Triton issues loads and stores in program order)
    q = _prefill_query_tile(q_ptr, m0, M, h0, H, DN, R_HALF, stride_qm, stride_qh, BLOCK_T, H_PAD, RH_PAD)
    _prefill_query_rope(q, cos_ptr, sin_ptr, qpe_ptr, m0, M, S, h0, H, R_HALF, stride_csb, stride_css, stride_em,
                        stride_eh, BLOCK_T, H_PAD, RH_PAD, FUSED_ROPE)
    if tl.program_id(1) == 0:
        _prefill_latent_rows(kv_ptr, nw_ptr, cos_ptr, sin_ptr, cache_ptr, pos_ptr, rows_ptr, lat_ptr, m0, M, S, C,
                             R_HALF, T, eps, stride_kvm, stride_csb, stride_css, stride_cb, stride_ct, stride_pb,
                             stride_ps, stride_am, HAS_ROWS, BLOCK_T, RH_PAD, FUSED_ROPE, RED_N, RED_L, RED_V,
                             LOG2_RED_L)


@triton.jit
def _prefill_latent_rows(
    kv_ptr, nw_ptr, cos_ptr, sin_ptr, cache_ptr, pos_ptr, rows_ptr, lat_ptr, m0, M, S, C, R_HALF, T, eps,
    stride_kvm, stride_csb, stride_css, stride_cb, stride_ct, stride_pb, stride_ps, stride_am,
    HAS_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, RH_PAD: tl.constexpr, FUSED_ROPE: tl.constexpr,
    RED_N: tl.constexpr, RED_L: tl.constexpr, RED_V: tl.constexpr, LOG2_RED_L: tl.constexpr,
):
    """`prep_latent_row` for tokens [m0, m0 + BLOCK_T) at once, with the same operations and rounding points; all
    loads before the first store."""
    dt = kv_ptr.dtype.element_ty
    ce = cache_ptr.dtype.element_ty
    # The C_PAD channels as RED_N pieces of RED_L * RED_V (256 at C = 512: 16-byte vectors over the 32 lanes of a
    # warp), piece n of token t in tile row n * BLOCK_T + t. Rows exactly one warp wide put the warps on tokens (a
    # [BLOCK_T, C_PAD] tile would split each token's channels over two warps), so a lane holds all RED_N pieces of
    # its tokens in registers, as in `prep_latent_row`'s one warp.
    m = m0 + tl.arange(0, BLOCK_T)
    t_ok = m < M
    b = m // S
    s = m - b * S
    b = b.to(tl.int64)  # b * stride_cb: a cache of 2^31 elements per layer is not reachable today, but cheap
    # Loaded here, not in a helper returning the row offsets: Inductor's mutation analysis of the kernel's TTIR takes
    # every argument of a called function whose result addresses a store as written, and compiled graphs then cloned
    # input_pos and cache_rows around the launch.
    pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps, mask=t_ok, other=-1)
    if HAS_ROWS:
        row = tl.load(rows_ptr + b, mask=t_ok, other=0)
    else:
        row = b
    row_off = row * stride_cb + pos * stride_ct  # token t's cache row at input_pos[b, s]
    w_ok = t_ok & (pos >= 0) & (pos < T)  # written only inside the cache, as `prep_latent_row`
    i = tl.arange(0, RED_N * BLOCK_T)
    mi = m0 + i % BLOCK_T
    ti_ok = mi < M
    row_off_i = tl.reshape(tl.broadcast_to(row_off[None, :], [RED_N, BLOCK_T]), [RED_N * BLOCK_T])  # per tile row
    w_ok_i = tl.reshape(tl.broadcast_to(w_ok[None, :], [RED_N, BLOCK_T]), [RED_N * BLOCK_T])
    offs_c = (i // BLOCK_T)[:, None] * (RED_L * RED_V) + tl.arange(0, RED_L * RED_V)[None, :]
    x_ok = ti_ok[:, None] & (offs_c < C)
    x = tl.load(kv_ptr + mi[:, None] * stride_kvm + offs_c, mask=x_ok, other=0.0)
    w = tl.load(nw_ptr + offs_c, mask=offs_c < C, other=0.0)
    # k_pe: one contiguous load of the interleaved pairs, split in registers (not two stride-2 gathers)
    offs_r = tl.arange(0, 2 * RH_PAD)
    k = tl.load(kv_ptr + m[:, None] * stride_kvm + C + offs_r[None, :],
                mask=t_ok[:, None] & (offs_r < 2 * R_HALF)[None, :], other=0.0)
    offs_j = tl.arange(0, RH_PAD)
    tj_ok = t_ok[:, None] & (offs_j < R_HALF)[None, :]
    cs_off = (b * stride_csb + s * stride_css)[:, None] + offs_j[None, :]
    cs = tl.load(cos_ptr + cs_off, mask=tj_ok, other=0.0)
    sn = tl.load(sin_ptr + cs_off, mask=tj_ok, other=0.0)

    x = x.to(tl.float32)
    inv = rms_scale(_row_sum_sq(x * x, BLOCK_T, RED_N, RED_L, RED_V, LOG2_RED_L), C, eps)
    inv = tl.reshape(tl.broadcast_to(inv[None, :], [RED_N, BLOCK_T]), [RED_N * BLOCK_T])  # per tile row
    normed = (x * inv[:, None]).to(dt).to(tl.float32)
    c_kv = (w.to(tl.float32) * normed).to(dt)
    tl.store(cache_ptr + row_off_i[:, None] + offs_c, c_kv.to(ce), mask=x_ok & w_ok_i[:, None])
    tl.store(lat_ptr + mi[:, None] * stride_am + offs_c, c_kv, mask=x_ok)

    k1, k2 = tl.split(tl.reshape(k, [BLOCK_T, RH_PAD, 2]))
    k1 = k1.to(tl.float32)
    k2 = k2.to(tl.float32)
    k_lo = (k1 * cs - k2 * sn).to(dt)
    if FUSED_ROPE:
        k_hi = tl.fma(k1, sn, k2 * cs).to(dt)
    else:
        k_hi = (k2 * cs + k1 * sn).to(dt)
    j_store = tj_ok & w_ok[:, None]
    k_row = cache_ptr + row_off[:, None] + C + offs_j[None, :]
    tl.store(k_row, k_lo.to(ce), mask=j_store)
    tl.store(k_row + R_HALF, k_hi.to(ce), mask=j_store)
    k_lat = lat_ptr + m[:, None] * stride_am + C + offs_j[None, :]
    tl.store(k_lat, k_lo, mask=tj_ok)
    tl.store(k_lat + R_HALF, k_hi, mask=tj_ok)


@triton.jit
def _row_sum_sq(sq, BLOCK_T: tl.constexpr, RED_N: tl.constexpr, RED_L: tl.constexpr, RED_V: tl.constexpr,
                LOG2_RED_L: tl.constexpr):
    """Per token, the sum of its squares sq [RED_N * BLOCK_T, RED_L * RED_V] (`_prefill_latent_rows`' tile) in the
    order `prep_latent_row`'s `tl.sum` has in a one-warp program (Triton 3.6 on sm_90, C = 512, 16-byte aligned
    rows: lane l folds its registers, channels n * RED_L * RED_V + l * RED_V + v for n, then v, left to right; then a
    butterfly over the lanes, halves first), spelled out so that it cannot depend on this kernel's layout (warps,
    tokens per program) or compiler version: every step is a two-operand add, or the pick of one element (the
    others -0.0, which adds exactly). Squares of 16-bit floats are exact in fp32: FMAs fused from them change
    nothing."""
    E: tl.constexpr = RED_N * RED_V
    per_lane = tl.reshape(tl.permute(tl.reshape(sq, [RED_N, BLOCK_T, RED_L, RED_V]), (1, 2, 0, 3)),
                          [BLOCK_T, RED_L, E])
    e_idx = tl.arange(0, E)[None, None, :]
    acc = tl.sum(tl.where(e_idx == 0, per_lane, -0.0), axis=2)
    for e in tl.static_range(1, E):
        acc += tl.sum(tl.where(e_idx == e, per_lane, -0.0), axis=2)
    for k in tl.static_range(LOG2_RED_L):  # lane l + half onto lane l
        acc = tl.sum(tl.reshape(acc, [BLOCK_T, 2, RED_L >> (k + 1)]), axis=1)
    return tl.reshape(acc, [BLOCK_T])


@triton.jit
def _prefill_query_tile(q_ptr, m0, M, h0, H, DN, R_HALF, stride_qm, stride_qh,
                        BLOCK_T: tl.constexpr, H_PAD: tl.constexpr, RH_PAD: tl.constexpr):
    """The rope parts of query heads [h0, h0 + H_PAD) of tokens [m0, m0 + BLOCK_T) as one contiguous
    [BLOCK_T, H_PAD, R] tile (R = 64: 128 bytes per head), where `rope_query_heads`' two stride-2 gathers used half of
    each sector per load instruction."""
    m = m0 + tl.arange(0, BLOCK_T)
    offs_h = h0 + tl.arange(0, H_PAD)
    offs_r = tl.arange(0, 2 * RH_PAD)
    ok = (m < M)[:, None, None] & (offs_h < H)[None, :, None] & (offs_r < 2 * R_HALF)[None, None, :]
    return tl.load(q_ptr + m[:, None, None] * stride_qm + offs_h[None, :, None] * stride_qh + DN
                   + offs_r[None, None, :], mask=ok, other=0.0)


@triton.jit
def _prefill_query_rope(
    q, cos_ptr, sin_ptr, qpe_ptr, m0, M, S, h0, H, R_HALF, stride_csb, stride_css, stride_em, stride_eh,
    BLOCK_T: tl.constexpr, H_PAD: tl.constexpr, RH_PAD: tl.constexpr, FUSED_ROPE: tl.constexpr,
):
    """`rope_query_heads` for the tile of `_prefill_query_tile`: its pairs split in registers, the same fp32
    operations in the same order."""
    dt = q.dtype
    m = m0 + tl.arange(0, BLOCK_T)
    b = m // S
    s = m - b * S
    b = b.to(tl.int64)
    t_ok = m < M
    offs_h = h0 + tl.arange(0, H_PAD)
    offs_j = tl.arange(0, RH_PAD)
    tj_ok = t_ok[:, None] & (offs_j < R_HALF)[None, :]
    cs_off = (b * stride_csb + s * stride_css)[:, None] + offs_j[None, :]
    cs = tl.load(cos_ptr + cs_off, mask=tj_ok, other=0.0)[:, None, :]
    sn = tl.load(sin_ptr + cs_off, mask=tj_ok, other=0.0)[:, None, :]
    q1, q2 = tl.split(tl.reshape(q, [BLOCK_T, H_PAD, RH_PAD, 2]))
    q1 = q1.to(tl.float32)
    q2 = q2.to(tl.float32)
    e_ok = t_ok[:, None, None] & (offs_h < H)[None, :, None] & (offs_j < R_HALF)[None, None, :]
    # the halves as split leaves them, half the load's vector per thread: stores of that width need no exchange
    offs_e = tl.max_contiguous(offs_j, 4)
    e_ptr = qpe_ptr + m[:, None, None] * stride_em + offs_h[None, :, None] * stride_eh + offs_e[None, None, :]
    tl.store(e_ptr, (q1 * cs - q2 * sn).to(dt), mask=e_ok)
    if FUSED_ROPE:
        hi = tl.fma(q2, cs, q1 * sn)
    else:
        hi = q2 * cs + q1 * sn
    tl.store(e_ptr + R_HALF, hi.to(dt), mask=e_ok)


def _fp_fusion(t: torch.Tensor) -> bool:
    """Whether Triton contracts a kernel's multiply-adds on t's device (its default, TRITON_DEFAULT_FP_FUSION)."""
    if t.device.type != "cuda":
        return False
    language = getattr(getattr(triton, "knobs", None), "language", None)
    return bool(getattr(language, "default_fp_fusion", True)) and not getattr(language, "force_disable_fp_fusion",
                                                                              False)


def prefill_prep_launch(m, heads: int, block_t: Optional[int] = None, head_block: Optional[int] = None,
                        num_warps: Optional[int] = None) -> tuple[int, int, int]:
    """(BLOCK_T, H_PAD, num_warps) of `_mla_prefill_prep_kernel` for m = B * S tokens (an int, or a SymInt when the
    token count is dynamic: then never read, so no guard) and `heads` query heads; values given are kept. Heads in
    blocks of PREFILL_PREP_HEADS (one block at 16 heads, 8 at 128: the rope of all 128 in one program serialized,
    1.5-1.8x slower than the composition when the kernel had one token per program); PREFILL_PREP_BLOCK_T tokens,
    fewer where the query tile would pass PREFILL_PREP_MAX_TILE (token, head) pairs or a known token count is
    smaller; PREFILL_PREP_WARPS, at most one per token (more would put a warp on a token's second channel piece in
    `_prefill_latent_rows`, where the sum of squares then crosses warps)."""
    h_pad = head_block or min(PREFILL_PREP_HEADS, max(2, next_pow2(heads)))
    bt = block_t or max(1, min(PREFILL_PREP_BLOCK_T, PREFILL_PREP_MAX_TILE // h_pad))
    static_m = static_int(m)
    if block_t is None and static_m is not None:
        bt = min(bt, next_pow2(max(1, static_m)))
    return bt, h_pad, num_warps or min(PREFILL_PREP_WARPS, bt)


def mla_prefill_prep_triton(
    q: torch.Tensor, kv_a: torch.Tensor, kv_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    latent_cache: torch.Tensor, input_pos: torch.Tensor, cache_rows: Optional[torch.Tensor], eps: float,
    nope_dim: int, num_warps: Optional[int] = None, block_t: Optional[int] = None, head_block: Optional[int] = None,
    fused_rope: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_mla_prefill_prep_kernel` with `prefill_prep_launch`'s (BLOCK_T, head block, warps), or the ones given
    (scripts/ab_prep.py sweeps them). fused_rope: the kernel's FUSED_ROPE; by default where Triton compiles with fp
    fusion (CUDA, unless TRITON_DEFAULT_FP_FUSION=0), not in the interpreter (tests set it to check that path)."""
    bsz, seqlen, heads, qdim = q.shape
    rope = qdim - nope_dim
    kv_rank = kv_norm_weight.shape[0]
    m = bsz * seqlen
    q3, kv2, cos, sin = _token_rows(q, kv_a, cos, sin, rope)
    q_pe = torch.empty((bsz, seqlen, heads, rope), dtype=q.dtype, device=q.device)
    latent = torch.empty((bsz, seqlen, kv_a.shape[-1]), dtype=q.dtype, device=q.device)
    pe3, lat2 = q_pe.view(m, heads, rope), latent.view(m, kv_a.shape[-1])
    rows = cache_rows if cache_rows is not None else input_pos  # unread without HAS_ROWS
    block_t, h_pad, num_warps = prefill_prep_launch(m, heads, block_t, head_block, num_warps)
    # `_row_sum_sq`'s split of the C_PAD channels: 16-byte vectors over up to 32 lanes, the rest in registers
    c_pad = next_pow2(kv_rank)
    red_v = min(16 // kv_a.element_size(), c_pad)
    red_l = min(32, c_pad // red_v)
    wrap_triton(_mla_prefill_prep_kernel)[(cdiv(m, block_t), cdiv(heads, h_pad))](
        q3, kv2, kv_norm_weight, cos, sin, latent_cache, input_pos, rows, pe3, lat2,
        m, seqlen, heads, kv_rank, nope_dim, rope // 2, latent_cache.shape[1], float(eps),
        q3.stride(0), q3.stride(1), kv2.stride(0), cos.stride(0), cos.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), input_pos.stride(0), input_pos.stride(1),
        pe3.stride(0), pe3.stride(1), lat2.stride(0),
        HAS_ROWS=cache_rows is not None, BLOCK_T=block_t, H_PAD=h_pad, RH_PAD=max(2, next_pow2(rope // 2)),
        RED_N=c_pad // (red_v * red_l), RED_L=red_l, RED_V=red_v, LOG2_RED_L=red_l.bit_length() - 1,
        FUSED_ROPE=_fp_fusion(q) if fused_rope is None else fused_rope, num_warps=num_warps,
    )
    return q_pe, latent


def prefill_prep_choice() -> str:
    return env_switch("DSV3_PREFILL_PREP", PREFILL_PREP_DEFAULT, ("fused", "torch"))


@triton_op("dsv3::mla_prefill_prep", mutates_args=("latent_cache",))
def mla_prefill_prep(
    q: torch.Tensor, kv_a: torch.Tensor, kv_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    latent_cache: torch.Tensor, input_pos: torch.Tensor, cache_rows: Optional[torch.Tensor], eps: float,
    nope_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, kv_a, kv_norm_weight, cos, sin, latent_cache, input_pos, cache_rows, eps, nope_dim)
    usable = (q.dtype in (torch.bfloat16, torch.float16) and kv_a.dtype == q.dtype
              and latent_cache.dtype == q.dtype and latent_cache.stride(-1) == 1)
    if q.device.type == "cpu" or prefill_prep_choice() == "torch" or not usable:
        return mla_prefill_prep_reference(*args)
    return mla_prefill_prep_triton(*args)


@mla_prefill_prep.register_fake
def _mla_prefill_prep_fake(q, kv_a, kv_norm_weight, cos, sin, latent_cache, input_pos, cache_rows, eps, nope_dim):
    bsz, seqlen, heads, qdim = q.shape
    torch._check(kv_a.shape[-1] == kv_norm_weight.shape[0] + qdim - nope_dim,
                 lambda: f"mla_prefill_prep: kv_a width {kv_a.shape[-1]} != kv_lora_rank {kv_norm_weight.shape[0]} "
                         f"+ rope dim {qdim - nope_dim}")
    return q.new_empty((bsz, seqlen, heads, qdim - nope_dim)), q.new_empty((bsz, seqlen, kv_a.shape[-1]))


__all__ = ["mla_decode_prep", "mla_decode_prep_reference", "mla_decode_prep_triton", "mla_prefill_prep",
           "mla_prefill_prep_reference", "mla_prefill_prep_triton"]
