"""`torch.ops.dsv3.mla_attention_out`: absorbed MLA attention and its W_UV output absorption, as one op.

At decode each MLA layer runs, after the attention inputs are ready, three dependent launches: the flash-decoding
split kernel of `dsv3.mla_attention` (`_mla_fwd_kernel`: fp32 partials and (m, l) per split), its combine
(`_mla_combine_kernel`: o_latent [B, S, H, C] in the activation dtype) and `dsv3.mla_absorb(..., output=True)`
(o_latent @ W_UV^T per head, W_UV read in FP8 from kv_b_proj). Each launch in a CUDA graph has a fixed cost
whatever its bytes (the combine and the absorb move ~0.1-1 MB), so this op merges the last two: the split kernel,
then `_mla_combine_absorb_o_kernel`. Two launches instead of three (measured: about break-even, see below).

Contract
- q_latent: [B, S, H, C], q_pe: [B, S, H, R], latent_cache: [B, T, C + R], input_pos: [B, S] int64, softmax_scale:
  as `dsv3.mla_attention`; kv_b_weight / kv_b_scale: kv_b_proj ([H * (Dn + Dv), C], FP8 with 128x128 block scales
  [ceil(rows/128), ceil(C/128)] fp32, or a dense weight in the activation dtype with scale None); nope_dim = Dn,
  v_dim = Dv.
- Returns exactly `mla_absorb(mla_attention(q_latent, q_pe, latent_cache, input_pos, softmax_scale), kv_b_weight,
  kv_b_scale, nope_dim, v_dim, True)`: [B, S, H, Dv], contiguous, in q_latent.dtype. That is: the attention output
  o_latent rounded to q_latent.dtype, then out[b, s, h, d] = sum_c o_latent[b, s, h, c] * W[h*(Dn+Dv) + Dn + d, c]
  with W dequantized and rounded to the activation dtype, fp32 accumulation.

Implementations (branch taken at trace time)
- CPU, unsupported dtypes (anything but bf16/fp16 activations and cache, FP8-with-scales or same-dtype dense
  weights), shapes outside decode (S > DECODE_MAX_S, B*S > mla_absorb's DECODE_MAX_M, B, S or T dynamic), or
  DSV3_ATTN_OUT=torch: `mla_attention_out_reference`, the composition of the two ops themselves (what the model
  ran before this op; under torch.compile Inductor traces into it: the split, combine and absorb kernels).
- CUDA otherwise with DSV3_ATTN_OUT=fused (opt-in; the default is `torch`, see the end-to-end A/B below):
  `_mla_fwd_kernel` launched by `mla_attention`'s own launcher
  (`mla_fwd_launch`: same plan, same launch arguments) with SPLIT forced on, so it always writes partials, even
  when the plan has one split; then `_mla_combine_absorb_o_kernel`, grid (H, cdiv(Dv, BLOCK_D), B*S). Program
  (h, d block, token): the combine of `_mla_combine_kernel` for the token's row s*H + h (split bounds recomputed
  from the positions with the same `_block_bounds`; max of the active splits' m, then the rescaled sum of their
  partials over all C, BLOCK_S splits at a time as [BLOCK_S, C] fp32 tiles held as [BLOCK_S, KB, 128]), o = num /
  den rounded to the activation dtype, then the W_UV rows of `_absorb_o_rows_kernel` ([BLOCK_D, KB, 128] FP8
  tile, one scale per row and 128-block, so heads need not align with the 128-row scale blocks; dequantized and
  rounded to the activation dtype) times o with fp32 products and sums; 4 warps. `attn_out_plan`: BLOCK_D = 16
  (ATTN_OUT_BLOCK_D) at one token, 32 up to 4, 64 above; BLOCK_S = the combine's (min(64, next_pow2(n_splits)));
  a row with at most SMALL_S = 8 active splits (short context: the split count is static, the active count is
  read on the device) takes a run-time branch with one [8, C] tile instead. The rounding points are the
  composition's, so outputs differ from it only in the order of fp32 sums (the small-tile branch's split sum; the
  MMA absorb kernel the composition uses above ABSORB_ROWS_MAX_M tokens); without the small branch and at <= 4
  tokens they are the same operations (bit-equal under the interpreter, and on the H200 at batch 1 in the bench).

Why / trade-off, measured (H200, H = 16, C = 512, FP8 kv_b, cache capacity 4096, one CUDA graph of 8-64 calls on
distinct caches/weights, us per call, noise ~0.5 us; batch 1 and 8 at ctx 128 / 4032 from scripts/bench_rows.py
--only attn_out, the rest from a one-off sweep of the same kernel code, 2026-11-23)
- Saves one launch per layer and step and o_latent's round trip through memory. But each of the Dv / BLOCK_D
  programs of a (token, head) re-reads that row's partials (n_active x C x 4 bytes: 4 KB at context 128, 126 KB
  at 4k with ~63 splits at batch 1), and each token's programs re-read the head's W_UV slice (64 KB FP8), where
  the separate combine reads each partial once and the MMA absorb reads W_UV once for all tokens. And its programs
  are a longer chain of dependent loads (positions -> (m, l) -> partials -> W_UV) than either kernel's.
- Result: about break-even. Composition -> fused (default plan):
      batch 1: ctx 128 12.3 -> 11.6, ctx 1024 13.0 -> 13.9, ctx 4032 15.9 -> 15.5
      batch 2: ctx 128 13.0 -> 12.1, ctx 1024 13.6 -> 14.3, ctx 4032 17.9 -> 17.5
      batch 4: ctx 128 14.2 -> 13.6, ctx 1024 15.8 -> 16.6, ctx 4032 22.5 -> 23.3
      batch 8: ctx 128 15.4 -> 15.5, ctx 1024 18.2 -> 18.9, ctx 4032 32.2 -> 32.6-33.1
  (mla_attention alone, split + combine: 9.3 us at batch 1 ctx 128, so the combine and the absorb together cost
  ~3 us as two launches, ~2-2.5 us as one at short context.) BLOCK_D 8/16/32/64 at batch 1: 12.7/11.6/12.2/13.4
  us (ctx 128); at batch 8: 38.2/23.3/20.3/15.7 (ctx 128), 62.0/44.3/42.0/32.6 (ctx 4032). The first plan
  (BLOCK_D 16 everywhere, 8 splits per combine step) was much worse at long context / batch 8 (24.3 vs 15.8 us at
  batch 1 ctx 4032, 50.3 vs 31.8 at batch 8): steps of 8 splits make 8 dependent partial loads per program at 63
  splits, and 8 programs per head and token ran in several waves at batch 8.
- The whole model (scripts/gpu_check.sh ab16, 16B FP8 at 8 layers, 2026-11-23, two runs of 5 and 8 round-robin
  rounds): with the fused path 0.59 / 0.77 us per layer SLOWER at batch 1 than the composition, +0.26 / -0.44 at
  batch 8 (noise ~1-2 us per layer at batch 8). Profile: the fused kernel 5.2 us per call against 3.4 (combine)
  + 2.2 (absorb). Not adopted: the default is `torch` (ATTN_OUT_DEFAULT); the op stays for H = 128 per rank and
  fp16, not measured.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, env_switch, next_pow2, static_int
from dsv3.kernels.fp8_linear import k_blocks
from dsv3.kernels.mla_absorb import DECODE_MAX_M, mla_absorb
from dsv3.kernels.mla_attention import DECODE_MAX_S, _block_bounds, mla_attention, mla_fwd_launch

ATTN_OUT_DEFAULT = "torch"  # measured: no gain end to end (the docstring's A/B)
ATTN_OUT_BLOCK_D = 16  # output channels of one head per program of the combine+absorb kernel, at one token
ATTN_OUT_SMALL_S = 8  # rows with <= this many active splits combine them in one [8, C] tile (see attn_out_plan)
ATTN_OUT_WARPS = 4


def mla_attention_out_reference(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    softmax_scale: float, kv_b_weight: torch.Tensor, kv_b_scale: Optional[torch.Tensor], nope_dim: int, v_dim: int,
) -> torch.Tensor:
    """The contract itself: the two ops (their registered objects: a call is torch.ops.dsv3.mla_attention /
    mla_absorb), as the model called them before this op existed."""
    o_latent = mla_attention(q_latent, q_pe, latent_cache, input_pos, softmax_scale)
    return mla_absorb(o_latent, kv_b_weight, kv_b_scale, nope_dim, v_dim, True)


@triton.jit
def _combine_row(part_ptr, ml_ptr, b64, row, S, H, N_SPLITS, n_active, offs_k, k_mask,
                 C_PAD: tl.constexpr, KB_PAD: tl.constexpr, BS: tl.constexpr):
    """`_mla_combine_kernel`'s two passes for one row over all C, BS splits at a time ([BS, C] fp32 tiles held as
    [BS, KB_PAD, 128], the W_UV tile's layout): the max of the active splits' maxima, then the rescaled sums.
    Returns (num [KB_PAD, 128], den)."""
    offs_s = tl.arange(0, BS)
    m_vec = tl.full((BS,), -1.0e30, dtype=tl.float32)
    for s0 in range(0, n_active, BS):
        sp = s0 + offs_s
        base = (b64 * N_SPLITS + sp) * (S * H) + row
        m_vec = tl.maximum(m_vec, tl.load(ml_ptr + base * 2, mask=sp < n_active, other=-1.0e30))
    m_max = tl.max(m_vec, axis=0)
    den_vec = tl.zeros((BS,), dtype=tl.float32)
    num = tl.zeros((KB_PAD, 128), dtype=tl.float32)
    for s0 in range(0, n_active, BS):
        sp = s0 + offs_s
        s_mask = sp < n_active
        base = (b64 * N_SPLITS + sp) * (S * H) + row
        m_s = tl.load(ml_ptr + base * 2, mask=s_mask, other=-1.0e30)
        l_s = tl.load(ml_ptr + base * 2 + 1, mask=s_mask, other=0.0)
        wt = tl.exp2(m_s - m_max)
        den_vec += wt * l_s
        a = tl.load(part_ptr + base[:, None, None] * C_PAD + offs_k[None, :, :],
                    mask=s_mask[:, None, None] & k_mask[None, :, :], other=0.0)
        num += tl.sum(a * wt[:, None, None], axis=0)
    return num, tl.sum(den_vec, axis=0)


@triton.jit
def _mla_combine_absorb_o_kernel(
    part_ptr, ml_ptr, pos_ptr, w_ptr, s_ptr, out_ptr,
    S, H, C, N_SPLITS, DN, DV, ROWS_PER_HEAD,
    stride_posb, stride_poss, stride_wr, stride_sr, stride_sc, stride_ob, stride_os, stride_oh,
    HAS_SCALE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, C_PAD: tl.constexpr,
    MIN_CHUNK_: tl.constexpr, BLOCK_S: tl.constexpr, SMALL_S: tl.constexpr, BLOCK_D: tl.constexpr,
    KB_PAD: tl.constexpr,
):
    """Program (head h, output block, token b*S + s): `_mla_combine_kernel` over all C of row s*H + h of sequence b
    (the fwd kernel's row layout), rounded to the activation dtype, times the BLOCK_D rows of W_UV[h].
    SMALL_S > 0: rows with at most SMALL_S active splits (short contexts) combine them in one [SMALL_S, C] tile
    instead of the [BLOCK_S, C] one (a run-time branch)."""
    h = tl.program_id(0)
    db = tl.program_id(1)
    tok = tl.program_id(2)
    b = tok // S
    s = tok - b * S
    row = s * H + h
    # the fwd kernel's split bounds for this row's block (L = 1 + max position over the block's rows)
    _rows, _row_mask, _pos, length, chunk = _block_bounds(
        pos_ptr, b, row // BLOCK_H, S, H, stride_posb, stride_poss, N_SPLITS, MIN_CHUNK_, BLOCK_H, BLOCK_T)
    n_active = tl.minimum(tl.cdiv(length, chunk), N_SPLITS)
    b64 = b.to(tl.int64)
    dt = out_ptr.dtype.element_ty
    offs_b, offs_k, k_mask, kb_mask = k_blocks(C, KB_PAD)  # C as [KB_PAD, 128]: the W_UV tile's layout
    if SMALL_S > 0:
        if n_active <= SMALL_S:
            num, den = _combine_row(part_ptr, ml_ptr, b64, row, S, H, N_SPLITS, n_active, offs_k, k_mask, C_PAD,
                                    KB_PAD, SMALL_S)
        else:
            num, den = _combine_row(part_ptr, ml_ptr, b64, row, S, H, N_SPLITS, n_active, offs_k, k_mask, C_PAD,
                                    KB_PAD, BLOCK_S)
    else:
        num, den = _combine_row(part_ptr, ml_ptr, b64, row, S, H, N_SPLITS, n_active, offs_k, k_mask, C_PAD, KB_PAD,
                                BLOCK_S)
    o = (num / tl.where(den > 0, den, 1.0)).to(dt).to(tl.float32)  # o_latent as the composition stores it
    # absorb: `_absorb_o_rows_kernel`'s weight tile, times o
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < DV
    wrows = h * ROWS_PER_HEAD + DN + offs_d
    w = tl.load(w_ptr + wrows[:, None, None] * stride_wr + offs_k[None, :, :],
                mask=d_mask[:, None, None] & k_mask[None, :, :], other=0.0).to(tl.float32)
    if HAS_SCALE:
        sc = tl.load(s_ptr + (wrows // 128)[:, None] * stride_sr + offs_b[None, :] * stride_sc,
                     mask=d_mask[:, None] & kb_mask[None, :], other=0.0)
        w = (w * sc[:, :, None]).to(dt).to(tl.float32)  # the reference's W: dequantized, rounded to the act. dtype
    else:
        w = w.to(dt).to(tl.float32)
    acc = tl.sum(tl.sum(w * o[None, :, :], axis=2), axis=1)
    tl.store(out_ptr + b64 * stride_ob + s * stride_os + h * stride_oh + offs_d, acc.to(dt), mask=d_mask)


def attn_out_plan(tokens: int, n_splits: int, block_d: Optional[int] = None, block_s: Optional[int] = None,
                  small_s: Optional[int] = None) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_S, SMALL_S) of the combine+absorb kernel for B*S = `tokens` and the split kernel's static
    split count; None = the measured default (H200, H = 16, 2026-11-24, see the module docstring):
    BLOCK_D = ATTN_OUT_BLOCK_D (16) at one token, 32 up to 4 tokens, 64 above (more programs per head re-read the
    partials and W_UV once per token: fewer, wider ones at batch 8); BLOCK_S as `_mla_combine_kernel`'s
    (min(64, next_pow2(n_splits))), SMALL_S = ATTN_OUT_SMALL_S (0 = no small-tile path; only where < BLOCK_S)."""
    if block_d is None:
        block_d = ATTN_OUT_BLOCK_D if tokens <= 1 else 32 if tokens <= 4 else 64
    if block_s is None:
        block_s = min(64, max(2, next_pow2(n_splits)))
    if small_s is None:
        small_s = ATTN_OUT_SMALL_S
    if small_s >= block_s:
        small_s = 0
    assert block_d == next_pow2(block_d) and block_s == next_pow2(block_s) and small_s in (0, next_pow2(small_s))
    return block_d, block_s, small_s


def mla_attention_out_triton(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    softmax_scale: float, kv_b_weight: torch.Tensor, kv_b_scale: Optional[torch.Tensor], nope_dim: int, v_dim: int,
    block_d: Optional[int] = None, block_s: Optional[int] = None, small_s: Optional[int] = None,
    num_warps: int = ATTN_OUT_WARPS, block_h: Optional[int] = None, block_t: Optional[int] = None,
    n_splits: Optional[int] = None, min_chunk: Optional[int] = None, swap: Optional[bool] = None,
    attn_warps: Optional[int] = None, num_stages: int = 2,
) -> torch.Tensor:
    """The fused path: two launches. block_d, block_s, small_s (`attn_out_plan`; powers of two, small_s 0 = off)
    and num_warps configure the combine+absorb kernel; block_h, block_t, n_splits, min_chunk, swap, attn_warps
    (its num_warps) and num_stages go to `mla_plan` / the split kernel as `mla_attention_triton` takes them."""
    bsz, seqlen, heads, c = q_latent.shape
    part, ml, (block_h, block_t, c_pad, n_splits, min_chunk) = mla_fwd_launch(
        q_latent, q_pe, latent_cache, input_pos, softmax_scale, None, True, block_h, block_t, n_splits, num_stages,
        min_chunk, swap, attn_warps)
    out = torch.empty((bsz, seqlen, heads, v_dim), dtype=q_latent.dtype, device=q_latent.device)
    has_scale = kv_b_scale is not None
    s = kv_b_scale if has_scale else kv_b_weight  # unused without scales
    s_strides = (s.stride(0), s.stride(1)) if has_scale else (0, 0)
    block_d, block_s, small_s = attn_out_plan(bsz * seqlen, n_splits, block_d, block_s, small_s)
    wrap_triton(_mla_combine_absorb_o_kernel)[(heads, cdiv(v_dim, block_d), bsz * seqlen)](
        part, ml, input_pos, kv_b_weight, s, out,
        seqlen, heads, c, n_splits, nope_dim, v_dim, nope_dim + v_dim,
        input_pos.stride(0), input_pos.stride(1), kv_b_weight.stride(0), *s_strides,
        out.stride(0), out.stride(1), out.stride(2),
        HAS_SCALE=has_scale, BLOCK_H=block_h, BLOCK_T=block_t, C_PAD=c_pad, MIN_CHUNK_=min_chunk,
        BLOCK_S=block_s, SMALL_S=small_s, BLOCK_D=block_d, KB_PAD=next_pow2(cdiv(c, 128)), num_warps=num_warps,
    )
    return out


def _triton_ok(q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, kv_b_weight: torch.Tensor,
               kv_b_scale: Optional[torch.Tensor]) -> bool:
    dt = q_latent.dtype
    if dt not in (torch.bfloat16, torch.float16) or q_pe.dtype != dt or latent_cache.dtype != dt:
        return False
    if kv_b_weight.stride(-1) != 1:
        return False
    if kv_b_weight.dtype != (torch.float8_e4m3fn if kv_b_scale is not None else dt):
        return False
    b, s, t = (static_int(v) for v in (q_latent.shape[0], q_latent.shape[1], latent_cache.shape[1]))
    if b is None or s is None or t is None:
        return False
    return 0 < s <= DECODE_MAX_S and 0 < b * s <= DECODE_MAX_M


def attn_out_choice() -> str:
    return env_switch("DSV3_ATTN_OUT", ATTN_OUT_DEFAULT, ("fused", "torch"))


@triton_op("dsv3::mla_attention_out", mutates_args=())
def mla_attention_out(
    q_latent: torch.Tensor, q_pe: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor,
    softmax_scale: float, kv_b_weight: torch.Tensor, kv_b_scale: Optional[torch.Tensor], nope_dim: int, v_dim: int,
) -> torch.Tensor:
    args = (q_latent, q_pe, latent_cache, input_pos, softmax_scale, kv_b_weight, kv_b_scale, nope_dim, v_dim)
    if (q_latent.device.type == "cpu" or attn_out_choice() == "torch"
            or not _triton_ok(q_latent, q_pe, latent_cache, kv_b_weight, kv_b_scale)):
        return mla_attention_out_reference(*args)
    return mla_attention_out_triton(*args)


@mla_attention_out.register_fake
def _mla_attention_out_fake(q_latent, q_pe, latent_cache, input_pos, softmax_scale, kv_b_weight, kv_b_scale,
                            nope_dim, v_dim):
    bsz, seqlen, heads, c = q_latent.shape
    torch._check(kv_b_weight.shape[0] == heads * (nope_dim + v_dim),
                 lambda: f"mla_attention_out: kv_b_weight has {kv_b_weight.shape[0]} rows, expected {heads} heads x "
                         f"({nope_dim} + {v_dim})")
    torch._check(kv_b_weight.shape[1] == c,
                 lambda: f"mla_attention_out: kv_b_weight {tuple(kv_b_weight.shape)} does not match C = {c}")
    for i in range(3):
        torch._check(q_pe.shape[i] == q_latent.shape[i],
                     lambda: f"mla_attention_out: q_pe {tuple(q_pe.shape)} vs q_latent {tuple(q_latent.shape)}")
    torch._check(latent_cache.shape[-1] == c + q_pe.shape[-1],
                 lambda: f"mla_attention_out: cache width {latent_cache.shape[-1]} != C {c} + R {q_pe.shape[-1]}")
    for got, want in zip(input_pos.shape, (bsz, seqlen)):
        torch._check(got == want,
                     lambda: f"mla_attention_out: input_pos {tuple(input_pos.shape)} vs [B, S] = [{bsz}, {seqlen}]")
    return q_latent.new_empty((bsz, seqlen, heads, v_dim))


__all__ = ["mla_attention_out", "mla_attention_out_reference", "mla_attention_out_triton", "attn_out_choice",
           "attn_out_plan"]
