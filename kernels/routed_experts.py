"""`torch.ops.dsv3.routed_experts`: the routed-expert half of a DeepSeekMoE layer, with routing given on the device.

Contract
- x: [T, D] tokens (already normed). topk_idx: [T, K] int64 expert ids; topk_weight: [T, K] float32 combine weights
  (routing already applied: scoring, groups, renormalisation, routed_scaling_factor).
- gate_proj, up_proj: [E, I, D]; down_proj: [E, D, I]. Either all bfloat16/float32 (scales None) or all
  float8_e4m3fn with block scales [E, ceil(I/128), ceil(D/128)] and [E, ceil(D/128), ceil(I/128)].
- Ids outside [0, E) contribute nothing: an expert-parallel rank passes global ids minus its first expert id.
- y[t] = sum_k topk_weight[t, k] * down(silu(gate(x[t])) * up(x[t])) for expert topk_idx[t, k], with each FP8
  projection computed as `dsv3.fp8_linear` does (activations quantized per token per 128 channels).
- x_q, x_scale (optional, not mutated, last two arguments): x already quantized, by contract exactly
  `dsv3.kernels.fp8_blocks.quantize_activation(x)` (float8_e4m3fn [T, D], float32 [T, ceil(D/128)]), e.g. the
  y_q / y_scale of `dsv3.add_rms_norm_quant`, whose kernel produced x. Give both or neither; with FP8 weights the
  Triton paths then read them instead of quantizing x (step 0 disappears); bf16/fp16 weights and the reference
  ignore them (they equal what the reference computes). x_q may also be a larger [Mp >= T, Kp >= D] buffer whose
  [:T, :D] part is that (`dsv3.add_rms_norm_quant_cublas`'s cuBLAS-padded y_q): only that part is read.
- Returns [T, D] in x.dtype. No host synchronisation: the amount of work never depends on the routing values.

Implementations (branch taken at trace time)
- CPU, or fp32 weights: `routed_experts_reference` (dense over experts).
- CUDA, FP8 or bf16/fp16 weights: Triton kernels, no host sync, each selected expert's weights read once per
  token tile and unselected experts never read:
  0. (FP8) `_act_quant_kernel` quantizes x once (per token per 128 channels, exact), unless x_q / x_scale are
     given (then no launch: the producer of x quantized it, `dsv3.add_rms_norm_quant`). Quantizing each x tile
     inside the up kernel instead (one launch less) measured slower on the H200 (16B T=1 34.6 vs 33.6 us, 671B
     rank 65.3 vs 47.3 us, 2026-11-23: the work sits in the serial K loop) and was removed.
  1. `_moe_up_kernel`, grid (slot, I/BLOCK_N): gate and up GEMVs of one expert (FP8 wgmma, fp32 accumulation per
     128-block with both scales), fused SiLU*up with the reference's rounding points (gate, up, silu and product
     each rounded to x.dtype). FP8 with BLOCK_N = 128 (QUANT_H): the program owns one 128-channel block of h and
     writes it already quantized (e4m3 + per-token scale, exactly `quantize_activation(h)`), so the down kernel
     streams e4m3. FP8 decode with BLOCK_N in {16, 32, 64} (more programs to fill the GPU): h is written in x.dtype.
     FP8 decode of ONE token with up BLOCK_N in {1, 2, 4, 8} (ROWS_UP_BLOCK_NS): `_moe_up_rows_kernel` instead, grid
     (K slots, I/BLOCK_N), CUDA cores, each program's gate and up rows loaded over the whole D at once (many small
     programs in flight instead of 88 MMA tiles walking D serially: 16B T=1 14.1 vs 17.7 us on the H200); h is
     written in x.dtype and quantized by one `_act_quant_kernel` launch, so the down kernel streams e4m3 as with
     QUANT_H.
  2. `_moe_down_kernel`, grid (slot, D/BLOCK_N): down GEMV, writes the unweighted expert output per (token, k) pair,
     rounded to x.dtype like the reference's per-expert output. FP8 without QUANT_H: each program quantizes the
     [tokens, 128] h tile it is about to use (`quantize_tile_rcp`: the scales of `quantize_activation(h)` bit for
     bit and its e4m3 values up to the sign of a zero, which no product or fp32 sum can see, hence the same result
     as with QUANT_H). Not `quantize_tile`: its per-element IEEE division made the 16B down kernel 4x slower
     (9.4 -> 40.6 us at T=1 on an H200; 12.4 us with the reciprocal).
     FP8, one token, after the row-parallel up kernel, with down BLOCK_N in {1, 2, 4, 8} (ROWS_DOWN_BLOCK_NS;
     the 671B-ws8 rank's T=1 plan; on 16B no faster than the MMA kernel): `_moe_down_rows_kernel` instead, grid
     (K slots, D/BLOCK_N), each program's down rows loaded over the whole I at once, the output per slot as
     `_moe_down_kernel` writes it.
  3. `_moe_combine_kernel`: y[t] = sum_k w[t,k] * out[t,k] in fp32 over valid pairs, cast to x.dtype.
     `dsv3.routed_experts_pairs` stops before it and returns the [T, K, D] pair outputs; the model sums them with
     `combine_pairs` (torch ops, which Inductor fuses into the residual add + next RMSNorm: on the H200, 16B at 8
     layers, 1.65 us per layer less at batch 1 and 4.54 at batch 8 than this kernel, scripts/gpu_check.sh ab16,
     2026-11-23; DSV3_MOE_COMBINE=kernel keeps the kernel in the model).
  Slot -> expert mapping:
  * decode (T statically <= `decode_max_t`: 64, or 16 for the expert shapes of GROUPED_SPARSE_SHAPES): slot j is
    the j-th smallest expert id present in topk_idx, found in-kernel
    (min(E, T*K) slots, the extra ones exit at once); the program computes all T tokens (masked to the ones routed
    to its expert; tokens padded to 16 for the tensor cores).
  * prefill (T larger or dynamic): grouped. The (token, k) pairs are sorted by expert on the device
    (dsv3.kernels.moe_schedule: a fixed number of tiles, cdiv(T*K, 64) + E, empty ones exit), each program takes a tile
    of up to 64 pairs of one expert (other tiles and launch fields: `grouped_block_t`, up_* / down_*; timed by
    scripts/sweep_prefill.py, docs/KERNELS.md). A static T with few pairs per expert (a short prompt's graph of
    static shape, a decode batch of 17-64 on the 16B) takes sparse tiles instead (`sparse_tiles`: 32 pairs,
    GROUPED_SPARSE_FP8). With FP8 weights the grouped path runs `_moe_up_grouped_kernel` and
    `_moe_down_grouped_kernel` in place of steps 1-2: the same arithmetic with the tokens as the MMA's M and
    the weight rows as its N (gate and up rows in one 256-wide dot), which keeps more MACs per shared-memory byte
    than the decode kernels' orientation (16B at T=4096 on the H200: up 874 -> 755 us, down 467 -> 394 us, bitwise
    the same outputs).
  Decode launch config (trace time): `MoeDecodePlan` (BLOCK_N, num_warps, num_stages of the up and of the down
  kernel) from `moe_decode_plan(t, e_slots, i, d, sms)` (a table, `MOE_DECODE_TUNED`, measured by
  `scripts/sweep_moe.py`; shapes not listed get MOE_DECODE_DEFAULT: up 128/8 warps/4 stages, down 64/4/4), pinned by
  `DSV3_MOE_DECODE=UP_BN:UP_WARPS:UP_STAGES:DOWN_BN:DOWN_WARPS:DOWN_STAGES` (FP8 decode path; an empty field keeps
  the plan's), and overridden per call by `routed_experts_triton`'s keyword arguments.
  The intermediate buffers are [T*K, I] and [T*K, D] in x.dtype (prefill of 4096 tokens on 671B shapes: ~0.6 GB).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import (
    cdiv, env_choice, env_switch, exceeds, launch_with_descriptors, next_pow2, num_sms, static_int,
    tma_descriptor_ok,
)
from dsv3.kernels.moe_schedule import grouped_schedule
from dsv3.kernels.tiles import load_tile
from dsv3.kernels.fp8_linear import (
    act_quant, dot_rows, fp8_linear_a16_reference, fp8_linear_reference, k_blocks, load_weight_rows, load_x_act,
    load_x_row, pick_scale, pick_scales, quantize_tile, quantize_tile_rcp,
)

DECODE_MAX_T = 64
GROUPED_BLOCK_T = 64
# Sparse tiles: the grouped FP8 path for a static T whose pairs fill at most SPARSE_TILE_PAIRS per expert on average
# (T * K <= 32 * E), where nearly every tile is one expert's only, mostly empty one and the kernels stream weights.
# Measured on the H200 (2026-11-25, scripts/bench_short_prefill.py, 16B shapes with the 2 shared slots stacked, us
# per call, over weight copies larger than L2): T = 8 / 16 / 32 / 64: grouped (64-pair tiles, the prefill plan)
# 157.4 / 215.8 / 244.4 / 250.0, sparse tiles 123.9 / 159.9 / 184.5 / 187.9, the decode path 96.4 / 149.0 / 223.0
# / 313.7; the 64 routed experts alone (scripts/sweep_prefill.py --t 128,512): T = 128 243.9 -> 188.7 with sparse
# tiles, T = 512 (48 pairs per expert) best on the prefill plan. GROUPED_SPARSE_SHAPES: the expert shapes (D, I)
# measured, each with the largest static T that keeps the decode path (above it, sparse grouped tiles).
SPARSE_TILE_PAIRS = 32
GROUPED_SPARSE_SHAPES = {(2048, 1408): 16}


def _project(x: torch.Tensor, w: torch.Tensor, s: Optional[torch.Tensor], quant_act: bool = True) -> torch.Tensor:
    if s is None:
        return F.linear(x, w)
    return fp8_linear_reference(x, w, s) if quant_act else fp8_linear_a16_reference(x, w, s)


def _expert_output(x: torch.Tensor, e: int, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                   gate_scale_inv: Optional[torch.Tensor], up_scale_inv: Optional[torch.Tensor],
                   down_scale_inv: Optional[torch.Tensor], quant_act: bool = True) -> torch.Tensor:
    """Expert e applied to every token (the references' SwiGLU, h rounded to x.dtype before down)."""
    pick = lambda w: None if w is None else w[e]  # noqa: E731
    h = (F.silu(_project(x, gate_proj[e], pick(gate_scale_inv), quant_act))
         * _project(x, up_proj[e], pick(up_scale_inv), quant_act))
    return _project(h.to(x.dtype), down_proj[e], pick(down_scale_inv), quant_act)


def routed_experts_reference(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
    gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
    gate_scale_inv: Optional[torch.Tensor], up_scale_inv: Optional[torch.Tensor],
    down_scale_inv: Optional[torch.Tensor], x_q: Optional[torch.Tensor] = None,
    x_scale: Optional[torch.Tensor] = None, quant_act: bool = True,
) -> torch.Tensor:
    """Dense over experts (every expert sees every token, then a select): simple and sync-free, fine on CPU.
    x_q / x_scale are ignored: by contract they are quantize_activation(x), which fp8_linear_reference computes.
    quant_act=False: the FP8 projections without activation quantization (fp8_linear_a16_reference)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    weights = (gate_proj, up_proj, down_proj, gate_scale_inv, up_scale_inv, down_scale_inv)
    for e in range(gate_proj.shape[0]):
        hit = topk_idx == e                                     # [T, K]
        weight = (topk_weight * hit).sum(-1, keepdim=True)     # [T, 1]
        y = _expert_output(x, e, *weights, quant_act)
        # where(), not a multiply: an unselected token's expert output must not leak in even if it is not finite.
        out = out + torch.where(hit.any(-1, keepdim=True), y.float() * weight, 0.0)
    return out.to(x.dtype)


def routed_experts_pairs_reference(
    x: torch.Tensor, topk_idx: torch.Tensor,
    gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
    gate_scale_inv: Optional[torch.Tensor], up_scale_inv: Optional[torch.Tensor],
    down_scale_inv: Optional[torch.Tensor], x_q: Optional[torch.Tensor] = None,
    x_scale: Optional[torch.Tensor] = None, quant_act: bool = True,
) -> torch.Tensor:
    """[T, K, D]: pair (t, k) holds expert topk_idx[t, k]'s output for token t in x.dtype (zeros for ids outside
    [0, E)); dense over experts as `routed_experts_reference`."""
    t, k = topk_idx.shape
    pairs = torch.zeros((t, k, x.shape[1]), dtype=x.dtype, device=x.device)
    weights = (gate_proj, up_proj, down_proj, gate_scale_inv, up_scale_inv, down_scale_inv)
    for e in range(gate_proj.shape[0]):
        y = _expert_output(x, e, *weights, quant_act).to(x.dtype)
        pairs = torch.where((topk_idx == e)[:, :, None], y[:, None, :], pairs)
    return pairs


MOE_COMBINE_DEFAULT = "graph"


def moe_combine_choice() -> str:
    """Where the model's MoE sums each token's expert outputs (read at trace time): 'graph' (default):
    `routed_experts_pairs` + `combine_pairs` in the model's graph; 'kernel': `routed_experts` (its combine kernel).
    DSV3_MOE_COMBINE pins one."""
    return env_switch("DSV3_MOE_COMBINE", MOE_COMBINE_DEFAULT, ("graph", "kernel"))


def combine_pairs(pairs: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int
                  ) -> torch.Tensor:
    """y[t] = sum_k topk_weight[t, k] * pairs[t, k] in fp32 over the pairs whose id is in [0, n_experts), cast to
    pairs.dtype: `_moe_combine_kernel`'s arithmetic in plain torch ops, for ids without repeats within a token (the
    router's top-k and the stacked shared slots; the routed-experts op also handles repeats). Written out over the
    static K (pointwise ops only, no reduction), so that Inductor fuses it into the kernel that consumes y (the
    residual add and the next RMSNorm): one launch less per MoE layer than the op's own combine kernel. Rows of
    pairs with other ids are never read into the sum (torch.where), so the op may leave them unwritten."""
    valid = (topk_idx >= 0) & (topk_idx < n_experts)
    w = topk_weight.float()
    acc = None
    for j in range(pairs.shape[1]):
        term = torch.where(valid[:, j, None], pairs[:, j].float() * w[:, j, None], 0.0)
        acc = term if acc is None else acc + term
    return acc.to(pairs.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_tile(sched_ptr, slot, K, n_sched, BLOCK_T: tl.constexpr):
    """Tile `slot` of the grouped schedule (`grouped_schedule`): its expert (-1: empty tile), the pair rows
    (t*K + k), their tokens and the mask of the BLOCK_T columns in use."""
    offs = tl.arange(0, BLOCK_T)
    e = tl.load(sched_ptr + slot)
    start = tl.load(sched_ptr + n_sched + slot)
    end = tl.load(sched_ptr + 2 * n_sched + slot)
    col_mask = (start + offs) < end
    pair = tl.load(sched_ptr + 3 * n_sched + start + offs, mask=col_mask, other=0)
    return tl.where(start < end, e, -1), pair, pair // K, col_mask


@triton.jit
def _swiglu(acc_g, acc_u, odt: tl.constexpr):
    """silu(gate) * up in fp32 with the reference's rounding points: gate, up, silu and the product each rounded
    to the activation dtype `odt`."""
    g = acc_g.to(odt).to(tl.float32)
    u = acc_u.to(odt).to(tl.float32)
    sl = (g / (1.0 + tl.exp(-g))).to(odt).to(tl.float32)
    return (sl * u).to(odt).to(tl.float32)


@triton.jit
def _expert_columns(flat, ids, slot, T, K, E, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """The decode path's expert of program `slot` (-1: nothing to do) and its columns: pair row (t*K + k), token,
    mask; from the routing ids the caller loaded (flat: ids [T * K] padded with -1; ids: [BLOCK_T, BLOCK_K] padded
    with -1). The loads stay in the kernels: Inductor's mutation analysis of the TTIR takes every argument of a
    called function whose result addresses a store as written, and took idx as written when they were made here."""
    # slot j -> j-th smallest expert id present among the T*K valid ids (ids outside [0, E) never match).
    e = slot * 0 - 1
    base = slot * 0
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        hit = (flat[None, :] == offs_e[:, None]) & (offs_e < E)[:, None]
        present = tl.max(hit.to(tl.int32), axis=1)
        rank = tl.cumsum(present, axis=0) + base
        e = tl.maximum(e, tl.max(tl.where((present > 0) & (rank == slot + 1), offs_e, -1), axis=0))
        base += tl.sum(present, axis=0)
    # tokens routed to e, and for each the first k that names it (its pair row)
    offs = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    match = ids == e
    col_mask = tl.max(match.to(tl.int32), axis=1) > 0
    kk = tl.min(tl.where(match, offs_k[None, :], BLOCK_K), axis=1)
    kk = tl.where(col_mask, kk, 0)
    return e, offs * K + kk, offs, col_mask


@triton.jit
def _moe_up_kernel(
    x_ptr, xs_ptr, idx_ptr, sched_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, hs_ptr, dt_ptr,
    T, K, E, I, D, n_sched,
    stride_xt, stride_xst, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_h, stride_hs,
    IS_FP8: tl.constexpr, GROUPED: tl.constexpr, QUANT_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr, W_DESC: tl.constexpr,
):
    """acc[weight rows, tokens]: the decode path (FP8 or bf16/fp16) and the grouped bf16/fp16 path (FP8 grouped:
    `_moe_up_grouped_kernel`). W_DESC: wg_ptr / wu_ptr are TMA descriptors of the gate / up weights [E, I, D] with
    box [1, BLOCK_N, 128] (out-of-range rows and columns read as zeros, as the masked loads' `other`).
    FP8: x is pre-quantized (e4m3 + scales [T, D/128]); BLOCK_N divides 128, so the program's weight rows share
    one row of block scales. QUANT_H (FP8, BLOCK_N == 128): this program owns one 128-channel block of h and writes
    it quantized (e4m3 + one scale per token), exactly as quantize_activation(h) would; otherwise h is written in
    the activation dtype (the down kernel quantizes it).
    dt_ptr: any tensor of the activation dtype (only its element type is used: the reference's rounding points)."""
    BLOCK_D: tl.constexpr = 128
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUPED:
        e, pair, token, col_mask = _grouped_tile(sched_ptr, slot, K, n_sched, BLOCK_T)
    else:  # the routing ids loaded here, not in a helper (see `_expert_columns`)
        offs_p = tl.arange(0, BLOCK_P)
        flat = tl.load(idx_ptr + offs_p, mask=offs_p < T * K, other=-1)
        offs_t = tl.arange(0, BLOCK_T)
        offs_k = tl.arange(0, BLOCK_K)
        ids = tl.load(idx_ptr + offs_t[:, None] * K + offs_k[None, :],
                      mask=(offs_t < T)[:, None] & (offs_k < K)[None, :], other=-1)
        e, pair, token, col_mask = _expert_columns(flat, ids, slot, T, K, E, BLOCK_T, BLOCK_K, BLOCK_E)
    if e >= 0:
        e64 = e.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_mask = offs_n < I
        if not W_DESC:
            wg_ptrs = wg_ptr + e64 * stride_we + offs_n[:, None] * stride_wn + offs_d[None, :]
            wu_ptrs = wu_ptr + e64 * stride_we + offs_n[:, None] * stride_wn + offs_d[None, :]
        token64 = token.to(tl.int64)
        x_ptrs = x_ptr + token64[:, None] * stride_xt + offs_d[None, :]
        srow = e64 * stride_se + ((pid_n * BLOCK_N) // 128) * stride_sn
        acc_g = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for kb in range(0, tl.cdiv(D, BLOCK_D)):
            d_mask = (kb * BLOCK_D + offs_d) < D
            if W_DESC:
                wg = wg_ptr.load([e, pid_n * BLOCK_N, kb * BLOCK_D]).reshape(BLOCK_N, BLOCK_D)
                wu = wu_ptr.load([e, pid_n * BLOCK_N, kb * BLOCK_D]).reshape(BLOCK_N, BLOCK_D)
            else:
                wmask = n_mask[:, None] & d_mask[None, :]
                wg = tl.load(wg_ptrs + kb * BLOCK_D, mask=wmask, other=0.0)
                wu = tl.load(wu_ptrs + kb * BLOCK_D, mask=wmask, other=0.0)
            xv = tl.load(x_ptrs + kb * BLOCK_D, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            if IS_FP8:
                # decode: scales loaded per K block (preloading them measured slower here: 671B-ep8 T=1 up 23 ->
                # 62 us, H200; again 2026-11-24 at 16B T = 8 with the six loads gone from the loop's SASS: 110.0 ->
                # 112.7 us per op, branch experiment/moe-decode-preload)
                xs = tl.load(xs_ptr + token64 * stride_xst + kb, mask=col_mask, other=1.0)
                xqt = tl.trans(xv)
                sg = tl.load(sg_ptr + srow + kb * stride_sk)
                su = tl.load(su_ptr + srow + kb * stride_sk)
                acc_g += tl.dot(wg, xqt) * (xs[None, :] * sg)
                acc_u += tl.dot(wu, xqt) * (xs[None, :] * su)
            else:
                xt = tl.trans(xv.to(wg.dtype))
                acc_g = tl.dot(wg, xt, acc_g)
                acc_u = tl.dot(wu, xt, acc_u)
        odt = dt_ptr.dtype.element_ty
        hf = _swiglu(acc_g, acc_u, odt)
        h_ptrs = h_ptr + pair.to(tl.int64)[None, :] * stride_h + offs_n[:, None]
        if QUANT_H:  # per token (column) over this 128-channel block (rows past I are zeros, as padding is)
            hq, hsc = quantize_tile(hf, 0)
            tl.store(h_ptrs, hq, mask=n_mask[:, None] & col_mask[None, :])
            tl.store(hs_ptr + pair.to(tl.int64) * stride_hs + pid_n, hsc, mask=col_mask)
        else:
            tl.store(h_ptrs, hf.to(odt), mask=n_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_up_rows_kernel(
    x_ptr, xs_ptr, idx_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr,
    E, I, D, stride_we, stride_wn, stride_se, stride_sn, stride_h,
    ACT16: tl.constexpr, BLOCK_N: tl.constexpr, KB_PAD: tl.constexpr,
):
    """x: e4m3 with scales xs (act_quant), or with ACT16 x in its dtype (W8A16; xs unused). One token (T = 1),
    row-parallel on CUDA cores: grid (K slots, cdiv(I, BLOCK_N)); slot k computes expert topk_idx[0, k] (ids outside
    [0, E) do nothing) for BLOCK_N rows of gate and up, each loaded over the whole D at once (`load_weight_rows`),
    then SiLU(gate) * up with the reference's rounding points (`_swiglu`), written in h's dtype to h[k] (pair row
    k)."""
    slot = tl.program_id(0)
    e = tl.load(idx_ptr + slot)
    if (e >= 0) & (e < E):
        e64 = e.to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < I
        offs_b, offs_k, k_mask, kb_mask = k_blocks(D, KB_PAD)
        wg, sg = load_weight_rows(wg_ptr + e64 * stride_we, sg_ptr + e64 * stride_se, offs_n, n_mask, offs_b, offs_k,
                                  k_mask, kb_mask, stride_wn, stride_sn)
        wu, su = load_weight_rows(wu_ptr + e64 * stride_we, su_ptr + e64 * stride_se, offs_n, n_mask, offs_b, offs_k,
                                  k_mask, kb_mask, stride_wn, stride_sn)
        if ACT16:
            xq, xs = load_x_act(x_ptr, offs_k, k_mask, offs_b)
        else:
            xq, xs = load_x_row(x_ptr, xs_ptr, offs_k, k_mask, offs_b, kb_mask, False)
        odt = h_ptr.dtype.element_ty
        hf = _swiglu(dot_rows(wg, sg, xq, xs), dot_rows(wu, su, xq, xs), odt)
        tl.store(h_ptr + slot * stride_h + offs_n, hf.to(odt), mask=n_mask)


@triton.jit
def _moe_down_kernel(
    h_ptr, hs_ptr, idx_ptr, sched_ptr, wd_ptr, sd_ptr, y_ptr,
    T, K, E, I, D, n_sched,
    stride_h, stride_hs, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_y,
    IS_FP8: tl.constexpr, GROUPED: tl.constexpr, QUANT_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr, EVEN: tl.constexpr, W_DESC: tl.constexpr,
):
    """acc[weight rows, tokens], the paths of `_moe_up_kernel` (FP8 grouped: `_moe_down_grouped_kernel`).
    W_DESC: wd_ptr is a TMA descriptor of the down weights [E, D, I] with box [1, BLOCK_N, 128].
    FP8 with QUANT_H: h is e4m3 with scales hs [pairs, I/128] (the up kernel quantized it). FP8 without:
    h is in the activation dtype and each [tokens, 128] tile is quantized here (`quantize_tile_rcp`, exactly
    quantize_activation(h) up to the sign of a zero: columns past I and tokens not routed here load as zeros, as its
    padding is). EVEN (`even_blocks`): whole K and row blocks, the weight loads unmasked (at T = 2 / 4 the down
    kernel 0.2-1.6 us faster per call on the 16B and 671B-ep8 shapes, bitwise equal; the up kernel measured no gain
    and keeps its masks: scripts/ab_moe_decode.py, H200, 2026-11-24)."""
    BLOCK_I: tl.constexpr = 128
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUPED:
        e, pair, token, col_mask = _grouped_tile(sched_ptr, slot, K, n_sched, BLOCK_T)
    else:  # the routing ids loaded here, not in a helper (see `_expert_columns`)
        offs_p = tl.arange(0, BLOCK_P)
        flat = tl.load(idx_ptr + offs_p, mask=offs_p < T * K, other=-1)
        offs_t = tl.arange(0, BLOCK_T)
        offs_k = tl.arange(0, BLOCK_K)
        ids = tl.load(idx_ptr + offs_t[:, None] * K + offs_k[None, :],
                      mask=(offs_t < T)[:, None] & (offs_k < K)[None, :], other=-1)
        e, pair, token, col_mask = _expert_columns(flat, ids, slot, T, K, E, BLOCK_T, BLOCK_K, BLOCK_E)
    if e >= 0:
        e64 = e.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_i = tl.arange(0, BLOCK_I)
        n_mask = offs_n < D
        pair64 = pair.to(tl.int64)
        if not W_DESC:
            w_ptrs = wd_ptr + e64 * stride_we + offs_n[:, None] * stride_wn + offs_i[None, :]
        h_ptrs = h_ptr + pair64[:, None] * stride_h + offs_i[None, :]
        srow = e64 * stride_se + ((pid_n * BLOCK_N) // 128) * stride_sn
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for kb in range(0, tl.cdiv(I, BLOCK_I)):
            i_mask = (kb * BLOCK_I + offs_i) < I  # EVEN (`even_blocks`): whole blocks, only the tokens' mask
            if W_DESC:
                w = wd_ptr.load([e, pid_n * BLOCK_N, kb * BLOCK_I]).reshape(BLOCK_N, BLOCK_I)
            else:
                w = load_tile(w_ptrs + kb * BLOCK_I, n_mask, i_mask, not EVEN, not EVEN)
            hv = load_tile(h_ptrs + kb * BLOCK_I, col_mask, i_mask, True, not EVEN)
            if IS_FP8:
                if QUANT_H:
                    hs = tl.load(hs_ptr + pair64 * stride_hs + kb, mask=col_mask, other=1.0)
                else:
                    hv, hs = quantize_tile_rcp(hv.to(tl.float32))
                sd = tl.load(sd_ptr + srow + kb * stride_sk)
                acc += tl.dot(w, tl.trans(hv)) * (hs[None, :] * sd)
            else:
                acc = tl.dot(w, tl.trans(hv.to(w.dtype)), acc)
        y_ptrs = y_ptr + pair64[None, :] * stride_y + offs_n[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_down_rows_kernel(
    h_ptr, hs_ptr, idx_ptr, wd_ptr, sd_ptr, y_ptr,
    E, I, D, stride_h, stride_hs, stride_we, stride_wn, stride_se, stride_sn, stride_y,
    ACT16: tl.constexpr, BLOCK_N: tl.constexpr, KB_PAD: tl.constexpr,
):
    """One token (T = 1), FP8, after the row-parallel up kernel (h e4m3 with scales hs [K, I/128], act_quant's;
    with ACT16 h in the activation dtype, not quantized: W8A16, hs unused):
    grid (K slots, cdiv(D, BLOCK_N)), slot k computes expert topk_idx[0, k] (ids outside [0, E) do nothing) for
    BLOCK_N rows of down, each loaded over the whole I at once, and writes them rounded to the activation dtype to
    y[k] (pair row k) for `_moe_combine_kernel`: the row-parallel form of `_moe_down_kernel` (whose MMA tiles pad the
    token to 16 and walk I serially)."""
    slot = tl.program_id(0)
    e = tl.load(idx_ptr + slot)
    if (e >= 0) & (e < E):
        e64 = e.to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < D
        offs_b, offs_k, k_mask, kb_mask = k_blocks(I, KB_PAD)
        w, sd = load_weight_rows(wd_ptr + e64 * stride_we, sd_ptr + e64 * stride_se, offs_n, n_mask, offs_b,
                                 offs_k, k_mask, kb_mask, stride_wn, stride_sn)
        if ACT16:
            hq, hsv = load_x_act(h_ptr + slot * stride_h, offs_k, k_mask, offs_b)
        else:
            hq, hsv = load_x_row(h_ptr + slot * stride_h, hs_ptr + slot * stride_hs, offs_k, k_mask, offs_b,
                                 kb_mask, False)
        y = dot_rows(w, sd, hq, hsv)
        tl.store(y_ptr + slot * stride_y + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _moe_up_grouped_kernel(
    x_ptr, xs_ptr, sched_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, hs_ptr, dt_ptr,
    K, I, D, n_sched,
    stride_xt, stride_xst, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_h, stride_hs,
    BLOCK_T: tl.constexpr, KB_PAD: tl.constexpr, PRELOAD: tl.constexpr, TWO_DOTS: tl.constexpr,
    EVEN: tl.constexpr, W_DESC: tl.constexpr,
):
    """FP8 grouped (prefill) up kernel, grid (tiles, cdiv(I, 128)): one tile of BLOCK_T (token, expert) pairs of
    one expert (`grouped_schedule`) times 128 gate rows and the same 128 up rows, as ONE [BLOCK_T, 256] dot per
    128-deep K block: acc[token, r] is gate row pid_n*128 + r for r < 128, up row pid_n*128 + r - 128 after.
    Tokens are the MMA's M: each warpgroup issues m64 n128 wgmmas (43 MACs per shared-memory byte), where the
    decode kernel's orientation (weight rows as M, tokens as N) gives m64 n64 (32, the FP8 peak's need with no
    slack): 16B at T=4096 on the H200, 874 -> 755 us, bitwise the same h (scripts/try_grouped_swap.py at commit
    7915e45, 2026-11-23).
    Same arithmetic as `_moe_up_kernel` (fp32 partial per K block times x scale x weight block scale, then the
    SwiGLU rounding points); h is written quantized per token over the program's 128 channels.
    (The timings above predate its `quantize_tile_rcp` epilogue.)
    KB_PAD: a power of two >= ceil(D / 128). PRELOAD: the program's block scales are loaded before its K loop and
    picked out of registers (`pick_scale`: Triton does not pipeline the scale loads), else loaded per K block; the
    launcher decides (`preload_scales`).
    TWO_DOTS (the launcher sets it for 4 warps): the gate and the up rows as two [BLOCK_T, 128] dots into two
    accumulators, same products and sums. One warpgroup then holds 2 x 64 accumulator values and one 64-value
    partial per thread (the 256-wide dot would need 2 x 128 and spill), and at 2 stages (82 KB of shared memory)
    two CTAs share an SM, so one CTA's scale multiplies overlap the other's MMAs.
    EVEN (`even_blocks`): every K block and row block is whole, so the loop's loads go unmasked; the tile's unused
    columns (pairs past its end, 0 from `_grouped_tile`) then load token 0's row, whose results are never stored
    (every reduction of the epilogue is per token).
    W_DESC (TWO_DOTS only): wg_ptr / wu_ptr are TMA descriptors of the gate / up weights [E, I, D], box
    [1, 128, 128]."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, pair, token, col_mask = _grouped_tile(sched_ptr, slot, K, n_sched, BLOCK_T)
    if e >= 0:
        e64 = e.to(tl.int64)
        token64 = token.to(tl.int64)
        offs_d = tl.arange(0, 128)
        x_ptrs = x_ptr + token64[:, None] * stride_xt + offs_d[None, :]
        srow = e64 * stride_se + pid_n * stride_sn
        if PRELOAD:
            offs_kb = tl.arange(0, KB_PAD)
            kb_mask = offs_kb < tl.cdiv(D, 128)
            xs_all = tl.load(xs_ptr + token64[:, None] * stride_xst + offs_kb[None, :],
                             mask=col_mask[:, None] & kb_mask[None, :], other=1.0)
            sg_all = tl.load(sg_ptr + srow + offs_kb * stride_sk, mask=kb_mask, other=0.0)
            su_all = tl.load(su_ptr + srow + offs_kb * stride_sk, mask=kb_mask, other=0.0)
        if TWO_DOTS:
            rows = pid_n * 128 + tl.arange(0, 128)
            r_mask = rows < I
            if not W_DESC:
                row_off = e64 * stride_we + rows.to(tl.int64) * stride_wn
                wg_ptrs = wg_ptr + row_off[:, None] + offs_d[None, :]
                wu_ptrs = wu_ptr + row_off[:, None] + offs_d[None, :]
            acc_g = tl.zeros((BLOCK_T, 128), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_T, 128), dtype=tl.float32)
            for kb in range(0, tl.cdiv(D, 128)):
                # EVEN (`even_blocks`): whole blocks, no masks; the tile's unused columns read token 0's row
                d_mask = (kb * 128 + offs_d) < D
                if W_DESC:
                    wgv = wg_ptr.load([e, pid_n * 128, kb * 128]).reshape(128, 128)
                    wuv = wu_ptr.load([e, pid_n * 128, kb * 128]).reshape(128, 128)
                else:
                    wgv = load_tile(wg_ptrs + kb * 128, r_mask, d_mask, not EVEN, not EVEN)
                    wuv = load_tile(wu_ptrs + kb * 128, r_mask, d_mask, not EVEN, not EVEN)
                xv = load_tile(x_ptrs + kb * 128, col_mask, d_mask, not EVEN, not EVEN)
                if PRELOAD:
                    xs = pick_scales(xs_all, offs_kb, kb)
                    sg = pick_scale(sg_all, offs_kb, kb)
                    su = pick_scale(su_all, offs_kb, kb)
                else:
                    xs = tl.load(xs_ptr + token64 * stride_xst + kb, mask=col_mask, other=1.0)
                    sg = tl.load(sg_ptr + srow + kb * stride_sk)
                    su = tl.load(su_ptr + srow + kb * stride_sk)
                acc_g += tl.dot(xv, tl.trans(wgv)) * (xs * sg)[:, None]
                acc_u += tl.dot(xv, tl.trans(wuv)) * (xs * su)[:, None]
        else:
            offs_r = tl.arange(0, 256)
            is_up = offs_r >= 128
            rows = pid_n * 128 + (offs_r % 128)
            r_mask = rows < I
            row_off = e64 * stride_we + rows.to(tl.int64) * stride_wn
            w_ptrs = tl.where(is_up, wu_ptr + row_off, wg_ptr + row_off)[:, None] + offs_d[None, :]
            # every row starts 16-byte aligned and runs 128 contiguous bytes (the strides are multiples of 16):
            # Triton 3.6 proves it through the pointer select, 3.9 does not and loads this tile byte by byte,
            # unpipelined (sm_90 PTX compiled on the CPU, 2026-11-24); the hint restores 3.6's code
            w_ptrs = tl.max_contiguous(tl.multiple_of(w_ptrs, [16, 16]), [1, 16])
            acc = tl.zeros((BLOCK_T, 256), dtype=tl.float32)
            for kb in range(0, tl.cdiv(D, 128)):
                d_mask = (kb * 128 + offs_d) < D
                wv = tl.load(w_ptrs + kb * 128, mask=r_mask[:, None] & d_mask[None, :], other=0.0)
                xv = tl.load(x_ptrs + kb * 128, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
                if PRELOAD:
                    xs = pick_scales(xs_all, offs_kb, kb)
                    s_row = tl.where(is_up, pick_scale(su_all, offs_kb, kb), pick_scale(sg_all, offs_kb, kb))
                else:
                    xs = tl.load(xs_ptr + token64 * stride_xst + kb, mask=col_mask, other=1.0)
                    s_row = tl.where(is_up, tl.load(su_ptr + srow + kb * stride_sk),
                                     tl.load(sg_ptr + srow + kb * stride_sk))
                acc += tl.dot(xv, tl.trans(wv)) * (xs[:, None] * s_row[None, :])
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_T, 2, 128)), (0, 2, 1)))
        # one division per token, not per element (`quantize_tile_rcp`: the same e4m3 values and scales)
        hq, hsc = quantize_tile_rcp(_swiglu(acc_g, acc_u, dt_ptr.dtype.element_ty))
        offs_c = pid_n * 128 + tl.arange(0, 128)
        pair64 = pair.to(tl.int64)
        tl.store(h_ptr + pair64[:, None] * stride_h + offs_c[None, :], hq,
                 mask=col_mask[:, None] & (offs_c < I)[None, :])
        tl.store(hs_ptr + pair64 * stride_hs + pid_n, hsc, mask=col_mask)


@triton.jit
def _moe_down_grouped_kernel(
    h_ptr, hs_ptr, sched_ptr, wd_ptr, sd_ptr, y_ptr,
    K, I, D, n_sched,
    stride_h, stride_hs, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_y,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, KB_PAD: tl.constexpr, PRELOAD: tl.constexpr,
    EVEN: tl.constexpr,
):
    """FP8 grouped (prefill) down kernel, grid (tiles, cdiv(D, BLOCK_N)): acc[token, r] for D rows
    pid_n*BLOCK_N + r, tokens as the MMA's M as in `_moe_up_grouped_kernel` (16B at T=4096 on the H200, BLOCK_N
    256: 467 -> 394 us against `_moe_down_kernel`, bitwise the same output). BLOCK_N 128 or 256 (one or two
    128-row weight blocks); h e4m3 with scales hs [pairs, I/128] from the up kernel; writes each pair's output
    rounded to the activation dtype. KB_PAD, PRELOAD, EVEN as in the up kernel (over I)."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, pair, token, col_mask = _grouped_tile(sched_ptr, slot, K, n_sched, BLOCK_T)
    if e >= 0:
        e64 = e.to(tl.int64)
        pair64 = pair.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_N)
        offs_n = pid_n * BLOCK_N + offs_r
        n_mask = offs_n < D
        offs_i = tl.arange(0, 128)
        w_ptrs = wd_ptr + e64 * stride_we + offs_n[:, None] * stride_wn + offs_i[None, :]
        h_ptrs = h_ptr + pair64[:, None] * stride_h + offs_i[None, :]
        # the weight-scale rows of the program's first and (BLOCK_N 256) second 128-row block; past D the second
        # is the first again (its rows are masked), so every scale read stays inside the tensor
        s0 = sd_ptr + e64 * stride_se + ((pid_n * BLOCK_N) // 128) * stride_sn
        s1 = s0 + tl.where((pid_n * BLOCK_N + 128) < D, stride_sn, 0)
        second = offs_r >= 128
        if PRELOAD:
            offs_kb = tl.arange(0, KB_PAD)
            kb_mask = offs_kb < tl.cdiv(I, 128)
            hs_all = tl.load(hs_ptr + pair64[:, None] * stride_hs + offs_kb[None, :],
                             mask=col_mask[:, None] & kb_mask[None, :], other=1.0)
            s0_all = tl.load(s0 + offs_kb * stride_sk, mask=kb_mask, other=0.0)
            if BLOCK_N == 256:
                s1_all = tl.load(s1 + offs_kb * stride_sk, mask=kb_mask, other=0.0)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(I, 128)):
            # EVEN (`even_blocks`): whole blocks, no masks; the tile's unused columns read pair 0's row
            i_mask = (kb * 128 + offs_i) < I
            w = load_tile(w_ptrs + kb * 128, n_mask, i_mask, not EVEN, not EVEN)
            hv = load_tile(h_ptrs + kb * 128, col_mask, i_mask, not EVEN, not EVEN)
            if PRELOAD:
                hs = pick_scales(hs_all, offs_kb, kb)
                sd0 = pick_scale(s0_all, offs_kb, kb)
                if BLOCK_N == 256:
                    sd1 = pick_scale(s1_all, offs_kb, kb)
            else:
                hs = tl.load(hs_ptr + pair64 * stride_hs + kb, mask=col_mask, other=1.0)
                sd0 = tl.load(s0 + kb * stride_sk)
                if BLOCK_N == 256:
                    sd1 = tl.load(s1 + kb * stride_sk)
            if BLOCK_N == 256:
                acc += tl.dot(hv, tl.trans(w)) * (hs[:, None] * tl.where(second, sd1, sd0)[None, :])
            else:
                acc += tl.dot(hv, tl.trans(w)) * (hs * sd0)[:, None]
        tl.store(y_ptr + pair64[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=col_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_combine_kernel(
    y_ptr, idx_ptr, wt_ptr, out_ptr, K, E, D, stride_y, stride_ot, stride_od,
    FIRST_ONLY: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    t64 = t.to(tl.int64)
    ids = tl.load(idx_ptr + t64 * K + offs_k, mask=k_mask, other=-1)
    wts = tl.load(wt_ptr + t64 * K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    valid = (ids >= 0) & (ids < E) & k_mask
    if FIRST_ONLY:
        # decode kernels computed each (token, expert) once, at the first k naming it: weight = sum over its ks.
        offs_k2 = tl.arange(0, BLOCK_K)
        ids2 = tl.load(idx_ptr + t64 * K + offs_k2, mask=offs_k2 < K, other=-1)
        wts2 = tl.load(wt_ptr + t64 * K + offs_k2, mask=offs_k2 < K, other=0.0).to(tl.float32)
        same = ids[:, None] == ids2[None, :]
        earlier = same & (offs_k2[None, :] < offs_k[:, None])
        valid = valid & (tl.max(earlier.to(tl.int32), axis=1) == 0)
        wts = tl.sum(tl.where(same, wts2[None, :], 0.0), axis=1)
    rows = t64 * K + offs_k
    yv = tl.load(y_ptr + rows[:, None] * stride_y + offs_d[None, :],
                 mask=valid[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
    acc = tl.sum(tl.where(valid[:, None], yv * wts[:, None], 0.0), axis=0)
    tl.store(out_ptr + t64 * stride_ot + offs_d * stride_od, acc.to(out_ptr.dtype.element_ty), mask=offs_d < D)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


class MoeDecodePlan(NamedTuple):
    """Launch config of the decode (not grouped) kernels. FP8: up_block_n in {16, 32, 64, 128}; 128 quantizes h in
    the up kernel, smaller ones leave that to the down kernel; {1, 2, 4, 8} (one token only) selects the
    row-parallel up kernel (its up_num_stages is unused). down_block_n: 16..128, a power of two (each program's
    rows must share one row of 128x128 weight scales)."""
    up_block_n: int
    up_num_warps: int
    up_num_stages: int
    down_block_n: int
    down_num_warps: int
    down_num_stages: int


# Today's FP8 decode config: one up program per 128-channel block of h (it quantizes h), 8 warps; down 64 rows.
MOE_DECODE_DEFAULT = MoeDecodePlan(128, 8, 4, 64, 4, 4)
# bf16/fp16 weights (decode): not tuned by the table.
MOE_DECODE_BF16 = MoeDecodePlan(64, 4, 4, 64, 4, 4)
# Measured per expert shape: (E slots, I, D) -> ((max T, MoeDecodePlan(...)), ...) in ascending max T; the first
# row with T <= max T applies. Paste what `scripts/sweep_moe.py` prints (H200, 132 SMs). Shapes not listed, and T
# above a shape's last row, get MOE_DECODE_DEFAULT. Every plan below gave bitwise the default plan's output.
MOE_DECODE_TUNED: dict[tuple[int, int, int], tuple[tuple[int, MoeDecodePlan], ...]] = {
    # 16B (64 routed + 2 shared slots, top-6 + 2), H200, sweep_moe of 2026-11-23, us per layer (default -> plan):
    # T=1 34.0 (the default is the fastest measured), T=2 55.5 -> 46.5, T=4 75.4 -> 68.0, T=8 121.0 -> 109.8
    # (T=3 and T=5..7 unmeasured: they take the next row's plan).
    # T=1 since 2026-11-23 (fourth session): the row-parallel up kernel (scripts/bench_rows.py: up 14.1 vs 17.7 us).
    # The row-parallel down kernel quantizing h in its programs instead (no act_quant launch) measured 1.6 us per
    # layer slower (ab16, 2026-11-24; branch experiment/moe-down-quant).
    (66, 1408, 2048): ((1, MoeDecodePlan(2, 4, 1, 64, 4, 4)), (2, MoeDecodePlan(64, 4, 3, 128, 8, 3)),
                       (4, MoeDecodePlan(64, 4, 3, 128, 4, 3)), (8, MoeDecodePlan(128, 8, 3, 128, 8, 4))),
    # 671B at world size 8, one rank (32 local experts, ~1 of the top-8 ids local): T=1 51.6 -> 45.3 (the up kernel
    # of the one expert: 34.3 -> 23.4 us), T=2 51.4 -> 49.7, T=4 61.8 -> 60.6, T=8 98.3 -> 98.0.
    # T=1 since the fourth session: the row-parallel up kernel (bench_rows.py: 14.4 us vs 23.4 for the one expert);
    # since the ninth, the row-parallel down kernel behind it (sweep_moe --quick --shapes 671B-ep8 --t 1, 3 confirm
    # rounds: 33.61 -> 30.16 us per call, down 11.53 -> 7.63 us; the MMA down kernel had 56 programs for the one
    # expert, under half a wave). The rows kernels ignore num_stages (1 here).
    (32, 2048, 7168): ((1, MoeDecodePlan(1, 4, 1, 8, 4, 1)), (8, MoeDecodePlan(128, 4, 4, 64, 4, 4))),
}
# The grouped (prefill) path: one config for every shape unless the call passes up_* / down_* fields
# (scripts/sweep_prefill.py times others). Tiles of GROUPED_BLOCK_T (token, expert) pairs, one of GROUPED_BLOCK_TS.
# bf16 weights: 2 x 32 KB weight tiles + the token tile per stage; 3 stages would exceed 227 KB of smem.
# FP8 (the grouped kernels, tokens as the MMA's M): 16B at T=4096 on the H200 (scripts/try_grouped_swap.py at
# 7915e45, 2026-11-23), up 8 warps 3 / 4 stages 761 / 755 us (2 stages 1100, 4 warps 2306); down BLOCK_N 256 8 warps 4
# stages 394 us (3 stages 405; BLOCK_N 128: 403-431).
MOE_GROUPED_FP8 = MoeDecodePlan(128, 8, 4, 256, 8, 4)
# Grouped FP8 plans by (D, I) where another one measured faster on the H200 (2026-11-24, T=4096, whole op, outputs
# equal): the 16B shapes with the up kernel at 4 warps and 2 stages (its TWO_DOTS form, scales loaded per K block),
# 1296.0 -> 1233.0 us (scripts/try_grouped_twodot.py at commit 382b3fb) and 1292.5 -> 1231.5 us
# (scripts/ab_grouped_moe.py); the 671B-ws8 rank shape (D 7168, I 2048) stays on the default (1108.9 vs 1142.8 us).
GROUPED_FP8_TUNED = {(2048, 1408): MOE_GROUPED_FP8._replace(up_num_warps=4, up_num_stages=2)}
# ... up to this many tokens per call a tuned shape's up kernel keeps MOE_GROUPED_FP8's warps and stages (8 warps, 4
# stages: the TMA-fed form): with few tiles per expert the tuned form's two CTAs per SM have less to overlap. 16B
# routed experts on the H200, whole op, bitwise the same output (scripts/ab_grouped_moe.py, 2026-11-26): T = 384
# 218.8 -> 200.4 us, 1024 338.6 -> 305.4, 2048 524.7 -> 494.8; at T = 4096 the tuned form is the faster one (above;
# the sweep's best at 384 and 1024 too). `grouped_up_configs`.
GROUPED_FP8_SHORT_T = 2048
GROUPED_DOWN_BLOCK_NS_FP8 = (128, 256)
# Sparse tiles (see SPARSE_TILE_PAIRS): up 4 warps (TWO_DOTS) at 3 stages, down BLOCK_N 256 at 4 warps, 3 stages: the
# best of scripts/sweep_prefill.py's grid at T = 128 (16B routed experts, 2026-11-25).
GROUPED_SPARSE_FP8 = MoeDecodePlan(128, 4, 3, 256, 4, 3)
# ... and at decode batches (T <= DECODE_MAX_T: batch 32 and 64 steps of the 16B config) the up kernel in 4 stages:
# scripts/sweep_prefill.py --sparse on the H200 (2026-11-26, 16B with its 2 shared slots, whole op, bitwise the same
# output, 3 interleaved rounds): T = 32 179.5 -> 176.6 us, T = 64 187.2 -> 184.4 (8 warps: 190-236; down configs
# other than 256 / 4 / 3 no faster). Short prompts (T 65-264) keep the plan above (measured at T = 128 only).
GROUPED_SPARSE_DECODE_FP8 = GROUPED_SPARSE_FP8._replace(up_num_stages=4)
MOE_GROUPED_BF16 = MoeDecodePlan(128, 8, 2, 128, 8, 2)
GROUPED_BLOCK_TS = (32, 64, 128)
UP_BLOCK_NS_FP8 = (16, 32, 64, 128)
ROWS_UP_BLOCK_NS = (1, 2, 4, 8)  # FP8, T = 1: `_moe_up_rows_kernel`
# FP8, T = 1, after the row-parallel up kernel: down_block_n in these selects `_moe_down_rows_kernel`. Opt-in
# (DSV3_MOE_DECODE=:::BN:WARPS:, scripts/sweep_moe.py times it at T=1). Timed on the H200 (2026-11-23, ninth
# session): 16B 9.65 us against the MMA down kernel's 9.36 (BLOCK_N 64, 256 programs): not used there; 671B-ws8 rank
# (one local expert, D 7168) 7.63 against 11.53 us (56 programs): its T=1 table row uses it.
# (The fourth session's prototype that also did the combine in its programs measured slower: 12.8 vs 9.5 + 2.2 us.)
ROWS_DOWN_BLOCK_NS = (1, 2, 4, 8)
# W8A16 (quant_act=False, one token) launch fields (BLOCK_N, num_warps) of shapes without an A16_MOE_TUNED row, where
# the T = 1 plan does not run the rows kernels: the 16B row's up config and the 671B row's down config (both hold
# <= 128 weight values per thread).
A16_UP = (2, 4)
A16_DOWN = (8, 4)
# Measured W8A16 one-token configs per expert shape (E slots, I, D) -> (up BLOCK_N, up warps, down BLOCK_N, down
# warps); scripts/sweep_moe_a16.py on the H200 (2026-11-24), whole op (pairs) over weight copies. Before, the W8A8
# T = 1 plan's up config (2 rows, 4 warps: each of 5632 programs re-read the bf16 x, half its own weight bytes) and
# A16_DOWN. 16B: up 4 rows / 4 warps 28.13 -> 24.80 us with the same down; the sweep's down 4 / 4 (25.47 vs 25.70 us
# for 8 / 4, within its noise) ran 10.9 us per call in the model's profile against 10.0 for 8 / 4: 8 / 4 kept.
# 671B rank: 23.36 -> 22.84 us (median of 3 interleaved rounds).
A16_MOE_TUNED: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (66, 1408, 2048): (4, 4, 8, 4),
    (32, 2048, 7168): (2, 4, 8, 8),
}


def moe_decode_plan(t: int, e_slots: int, i: int, d: int, sms: int) -> MoeDecodePlan:
    """The FP8 decode launch config for T tokens over `e_slots` experts of [I, D] gate/up and [D, I] down weights
    on a device with `sms` multiprocessors: the one place the default is decided (trace time, static shapes)."""
    for max_t, plan in MOE_DECODE_TUNED.get(_tuned_key(e_slots, i, d), ()):
        if t <= max_t:
            return MoeDecodePlan(*plan)
    return MOE_DECODE_DEFAULT


def _tuned_key(e_slots: int, i: int, d: int, table: Optional[dict] = None) -> tuple[int, int, int]:
    """The row of `table` (MOE_DECODE_TUNED by default) for (e_slots, I, D): its own, else the same expert shape's
    row with the nearest slot count within a factor of 2 (the 16B issue shape, 64 routed experts, takes the model's
    66-slot row: a plan's cost follows how many experts the T tokens touch, which barely moves from 64 to 66 slots).
    Farther slot counts (an EP shard of another world size) keep the default until swept."""
    table = MOE_DECODE_TUNED if table is None else table
    if (e_slots, i, d) in table:
        return (e_slots, i, d)
    near = [k for k in table if k[1:] == (i, d) and k[0] <= 2 * e_slots and e_slots <= 2 * k[0]]
    return min(near, key=lambda k: (abs(k[0] - e_slots), k[0])) if near else (e_slots, i, d)


def a16_moe_config(e_slots: int, i: int, d: int, plan: MoeDecodePlan) -> tuple[int, int, int, int]:
    """(up BLOCK_N, up warps, down BLOCK_N, down warps) of the W8A16 one-token kernels: the A16_MOE_TUNED row unless
    DSV3_MOE_DECODE pins a plan; otherwise the T = 1 plan's row-parallel fields, A16_UP / A16_DOWN where it has none."""
    row = A16_MOE_TUNED.get(_tuned_key(e_slots, i, d, A16_MOE_TUNED))
    if row is not None and env_choice("DSV3_MOE_DECODE", "auto") == "auto":
        return row
    rows_up = plan.up_block_n in ROWS_UP_BLOCK_NS
    up = (plan.up_block_n, plan.up_num_warps) if rows_up else A16_UP
    down = ((plan.down_block_n, plan.down_num_warps) if rows_up and plan.down_block_n in ROWS_DOWN_BLOCK_NS
            else A16_DOWN)
    return (*up, *down)


def parse_moe_plan(spec: str, base: MoeDecodePlan) -> MoeDecodePlan:
    """'32:4:4:64:4:4' -> MoeDecodePlan(32, 4, 4, 64, 4, 4) (the DSV3_MOE_DECODE syntax); an empty field keeps
    `base`'s value ('32:4::::' changes the up kernel's block_n and warps only)."""
    fields = spec.strip().split(":")
    if len(fields) != len(MoeDecodePlan._fields):
        raise ValueError(f"MoE decode plan {spec!r}: expected UP_BN:UP_WARPS:UP_STAGES:DOWN_BN:DOWN_WARPS:DOWN_STAGES")
    return MoeDecodePlan(*(b if f.strip() == "" else int(f) for f, b in zip(fields, base)))


def check_moe_plan(plan: MoeDecodePlan, is_fp8: bool, t: Optional[int] = None) -> None:
    """Raise ValueError naming the bad field. `t`: the token count the plan is for (the row-parallel up kernel,
    up_block_n < 16, takes one token)."""
    rows_up = is_fp8 and plan.up_block_n in ROWS_UP_BLOCK_NS
    rows_down = is_fp8 and plan.down_block_n in ROWS_DOWN_BLOCK_NS
    if rows_down and not rows_up:
        raise ValueError(f"MoE decode plan {plan}: down_block_n {plan.down_block_n} (the row-parallel down kernel) "
                         f"needs the row-parallel up kernel (up_block_n in {ROWS_UP_BLOCK_NS})")
    for name in ("up_block_n", "down_block_n"):
        bn = getattr(plan, name)
        rows = rows_up if name == "up_block_n" else rows_down
        if not (16 <= bn <= 128 and bn & (bn - 1) == 0) and not rows:
            raise ValueError(f"MoE decode plan {plan}: {name} must be a power of two in [16, 128]"
                             + (f" (FP8 up_block_n also {ROWS_UP_BLOCK_NS} for one token)" if is_fp8 else ""))
    if is_fp8 and plan.up_block_n not in UP_BLOCK_NS_FP8 + ROWS_UP_BLOCK_NS:
        raise ValueError(f"MoE decode plan {plan}: FP8 up_block_n must be one of {UP_BLOCK_NS_FP8 + ROWS_UP_BLOCK_NS}")
    if rows_up and t is not None and t != 1:
        raise ValueError(f"MoE decode plan {plan}: up_block_n {plan.up_block_n} (the row-parallel up kernel) is for "
                         f"one token, not {t}")
    _check_warps_stages(plan)


def _check_warps_stages(plan: MoeDecodePlan) -> None:
    for name in ("up_num_warps", "down_num_warps"):
        if getattr(plan, name) not in (1, 2, 4, 8, 16):
            raise ValueError(f"MoE plan {plan}: {name} must be a power of two <= 16")
    if plan.up_num_stages < 1 or plan.down_num_stages < 1:
        raise ValueError(f"MoE plan {plan}: num_stages must be >= 1")


def resolve_moe_decode(
    t: int, e_slots: int, i: int, d: int, sms: int, is_fp8: bool, block_n: Optional[int] = None,
    num_warps: Optional[int] = None, num_stages: Optional[int] = None, **fields: Optional[int],
) -> MoeDecodePlan:
    """The config the decode path launches. FP8: DSV3_MOE_DECODE if set, else `moe_decode_plan`; bf16/fp16:
    MOE_DECODE_BF16. Then the per-call overrides: legacy `block_n` / `num_warps` set the down kernel's (and with
    bf16 weights the up kernel's too), `num_stages` both kernels' (their meaning before the plan existed);
    explicit `up_*` / `down_*` fields (MoeDecodePlan's names) win over those."""
    if is_fp8:
        plan = moe_decode_plan(t, e_slots, i, d, sms)
        spec = env_choice("DSV3_MOE_DECODE", "auto")
        if spec != "auto":
            plan = parse_moe_plan(spec, plan)
    else:
        plan = MOE_DECODE_BF16
    legacy: dict[str, Optional[int]] = dict(down_block_n=block_n, down_num_warps=num_warps,
                                            up_num_stages=num_stages, down_num_stages=num_stages)
    if not is_fp8:
        legacy.update(up_block_n=block_n, up_num_warps=num_warps)
    unknown = set(fields) - set(MoeDecodePlan._fields)
    if unknown:
        raise TypeError(f"unknown MoE launch parameters {sorted(unknown)}")
    changes = {k: v for k, v in legacy.items() if v is not None}
    changes.update({k: v for k, v in fields.items() if v is not None})
    plan = plan._replace(**changes)
    check_moe_plan(plan, is_fp8, t)
    return plan


def decode_max_t(is_fp8: bool, d: int, i: int) -> int:
    """The largest static T that takes the decode path: DECODE_MAX_T, or for FP8 expert shapes (D, I) in
    GROUPED_SPARSE_SHAPES their measured bound (above it sparse grouped tiles are faster)."""
    sparse = GROUPED_SPARSE_SHAPES.get((static_int(d), static_int(i))) if is_fp8 else None
    return DECODE_MAX_T if sparse is None else sparse


def sparse_tiles(is_fp8: bool, t: Optional[int], k: int, e: int, d: int, i: int) -> bool:
    """Whether a grouped call takes sparse tiles (SPARSE_TILE_PAIRS pairs, GROUPED_SPARSE_FP8): FP8, a measured expert
    shape (GROUPED_SPARSE_SHAPES), T static with at most SPARSE_TILE_PAIRS pairs per expert on average."""
    return (is_fp8 and t is not None and (static_int(d), static_int(i)) in GROUPED_SPARSE_SHAPES
            and t * k <= SPARSE_TILE_PAIRS * e)


def grouped_plan(is_fp8: bool, d: Optional[int] = None, i: Optional[int] = None, sparse: bool = False,
                 t: Optional[int] = None, **fields: Optional[int]) -> MoeDecodePlan:
    """The grouped path's launch config: GROUPED_SPARSE_FP8 for sparse tiles (`sparse_tiles`; at a static T <=
    DECODE_MAX_T GROUPED_SPARSE_DECODE_FP8), else
    GROUPED_FP8_TUNED[(d, i)] or MOE_GROUPED_FP8 (bf16: MOE_GROUPED_BF16), with the given up_* / down_* fields
    replaced."""
    # (static_int: under torch.compile with dynamic shapes a size may be a SymInt, which does not hash)
    base = GROUPED_FP8_TUNED.get((static_int(d), static_int(i)), MOE_GROUPED_FP8) if is_fp8 else MOE_GROUPED_BF16
    if sparse and is_fp8:
        base = GROUPED_SPARSE_DECODE_FP8 if t is not None and t <= DECODE_MAX_T else GROUPED_SPARSE_FP8
    plan = base._replace(**{k: v for k, v in fields.items() if v is not None})
    if is_fp8:  # `_moe_up_grouped_kernel` / `_moe_down_grouped_kernel`
        if plan.up_block_n != 128:
            raise ValueError(f"grouped FP8 MoE plan {plan}: up_block_n must be 128 (each program owns one "
                             "128-channel block of h, gate and up)")
        if plan.down_block_n not in GROUPED_DOWN_BLOCK_NS_FP8:
            raise ValueError(f"grouped FP8 MoE plan {plan}: down_block_n must be one of {GROUPED_DOWN_BLOCK_NS_FP8}")
        _check_warps_stages(plan)
    else:
        check_moe_plan(plan, is_fp8)
        if plan.up_block_n < 16:
            raise ValueError(f"grouped MoE plan {plan}: up_block_n must be >= 16")
    return plan


def grouped_up_configs(plan: MoeDecodePlan, d, i, t, pinned: bool) -> list[tuple[int, int, object]]:
    """The grouped FP8 up kernel's launches for a call of `t` tokens: [(warps, stages, tile factor)], the grid's
    tile count multiplied by the factor. A plan with the up kernel of GROUPED_FP8_TUNED for (d, i) (not pinned by
    the call's own up_* fields; its down fields do not matter) keeps MOE_GROUPED_FP8's warps and stages up to
    GROUPED_FP8_SHORT_T tokens; a static T takes one launch, a dynamic one both, the one not picked at the run's T
    with zero tiles (`exceeds`: no launch, no guard)."""
    own = (plan.up_num_warps, plan.up_num_stages)
    tuned = GROUPED_FP8_TUNED.get((static_int(d), static_int(i)))
    if pinned or tuned is None or own != (tuned.up_num_warps, tuned.up_num_stages):
        return [own + (1,)]
    short = (MOE_GROUPED_FP8.up_num_warps, MOE_GROUPED_FP8.up_num_stages)
    n = static_int(t)
    if n is not None:
        return [(short if n <= GROUPED_FP8_SHORT_T else own) + (1,)]
    long = exceeds(t, GROUPED_FP8_SHORT_T)
    return [own + (long,), short + (1 - long,)]


# The most K blocks (padded) whose scales a program preloads: the picks scale with it (one [T, KB] select and sum
# per K step). Grouped MoE at T=4096 on the H200 (then scripts/bench_grouped_moe.py, 2026-11-23): 16B shapes (D=2048,
# 16 blocks) 1.892 -> 1.591 ms with preloading; 671B-rank shapes (D=7168, 64 blocks in the up kernel) 1.426 ->
# 2.188 ms. Decode (a handful of tokens, short K steps) measured slower with it: 671B-ep8 T=1 up 23 -> 62 us.
# (Those timings are of the decode-orientation kernels; the grouped kernels keep the rule, not re-timed without it.)
PRELOAD_MAX_KB = 16


def preload_scales(kb_pad: int) -> bool:
    """Whether a grouped FP8 kernel preloads its block scales (see PRELOAD_MAX_KB): few K blocks."""
    return kb_pad <= PRELOAD_MAX_KB


def even_blocks(k: int, n: int, block_n: int) -> bool:
    """Whether an MoE kernel may run its K loop unmasked (EVEN: the grouped FP8 kernels, the decode down kernel):
    whole 128-deep K blocks and whole `block_n`-row blocks. The masks cost issue slots next to the MMA: the 16B
    grouped down kernel at T = 4096 on the H200 369.9 -> 351.8 us, the 671B-ws8 rank's 254.4 -> 241.4 (2026-11-24,
    scripts/try_grouped_lag.py on branch experiment/grouped-scale-lag; outputs equal). The grouped up kernel's
    256-wide form measured no gain (671B rank 482.0 -> 493.6 us) and keeps its masks; its TWO_DOTS form (the 16B
    plan) takes EVEN: the whole 16B op 1217.8 -> 1154.6 us (scripts/ab_grouped_moe.py). The decode up kernel keeps
    its masks too (see `_moe_down_kernel`)."""
    ks, ns = static_int(k), static_int(n)
    return ks is not None and ns is not None and ks % 128 == 0 and ns % block_n == 0


def grouped_up_tma(up_num_warps: int) -> bool:
    """DSV3_MOE_UP_TMA=auto (default) / on / off: whether the grouped FP8 up kernel reads its gate / up weights
    through TMA descriptors (then in its TWO_DOTS form). auto: for 8-warp plans. H200, T=4096, whole op, bitwise
    equal (scripts/ab_grouped_moe.py, 2026-11-25): the 671B-ws8 rank's 8-warp plan 1091.5 -> 1067.3 us (1.023x, the
    one 256-wide pointer dot against two descriptor-fed dots); the 16B's 4-warp TWO_DOTS plan 1151.1 -> 1411.1 us
    (0.816x: two 4-warp CTAs per SM already overlap one's scale arithmetic with the other's MMAs). Read at trace
    time."""
    choice = env_switch("DSV3_MOE_UP_TMA", "auto", ("auto", "on", "off"))
    return choice == "on" or (choice == "auto" and up_num_warps > 4)


def moe_decode_tma() -> bool:
    """DSV3_MOE_DECODE_TMA=on (default) / off: whether the FP8 decode MoE kernels with MMA tiles (`_moe_up_kernel`,
    `_moe_down_kernel`; T = 2..64) read their weights through TMA descriptors where the layout takes one (off: the
    pointer tiles, the A/B baseline). Whole op on the H200 (scripts/ab_moe_decode.py, 2026-11-25, bitwise equal):
    16B T = 2 / 4 / 8 / 16 / 32 1.003 / 1.029 / 1.009 / 1.000 / 1.020x, 671B-ep8 rank 1.055 / 1.021 / 1.008 / 1.002 /
    1.036x. Read at trace time."""
    return env_switch("DSV3_MOE_DECODE_TMA", "on", ("on", "off")) == "on"


def routed_experts_triton(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
    gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
    gate_scale_inv: Optional[torch.Tensor], up_scale_inv: Optional[torch.Tensor],
    down_scale_inv: Optional[torch.Tensor], grouped: Optional[bool] = None,
    block_n: Optional[int] = None, num_warps: Optional[int] = None, num_stages: Optional[int] = None,
    up_block_n: Optional[int] = None, up_num_warps: Optional[int] = None, up_num_stages: Optional[int] = None,
    down_block_n: Optional[int] = None, down_num_warps: Optional[int] = None, down_num_stages: Optional[int] = None,
    grouped_block_t: Optional[int] = None, x_q: Optional[torch.Tensor] = None,
    x_scale: Optional[torch.Tensor] = None, combine: bool = True, quant_act: bool = True,
) -> torch.Tensor:
    """The Triton path (module docstring). quant_act=False (FP8 weights, one token, `a16_supported`): W8A16, the
    row-parallel up and down kernels on x and h in the activation dtype (no quantization launch; x_q / x_scale
    unused); their launch fields from `a16_moe_config` (A16_MOE_TUNED), then this call's up_* / down_* fields.
    combine=False: the [T, K, D] pair outputs (`routed_experts_pairs`'s
    contract) instead of their weighted sum: no combine launch. Decode launch config: `resolve_moe_decode` (the
    plan, DSV3_MOE_DECODE, then these keyword arguments; None keeps the plan's value). The grouped path starts
    from `grouped_plan` (GROUPED_FP8_TUNED for its (D, I), else MOE_GROUPED_FP8 / _BF16) and takes only the
    explicit up_* / down_* fields. `grouped_block_t`: (token, expert) pairs per tile of the grouped path (default
    GROUPED_BLOCK_T; one of GROUPED_BLOCK_TS). `x_q` / `x_scale`: quantize_activation(x),
    given by the caller (FP8 weights: no act_quant launch)."""
    t, d = x.shape
    k = topk_idx.shape[1]
    e, i, _ = gate_proj.shape
    odt = x.dtype  # the output's (x may be cast to bf16/fp16 weights' dtype below)
    t_static = static_int(t)
    if t_static == 0:
        return torch.empty_like(x) if combine else x.new_empty((t, k, d))
    is_fp8 = gate_scale_inv is not None
    if grouped is None:
        grouped = t_static is None or t_static > decode_max_t(is_fp8, d, i)
    if not is_fp8 and x.dtype != gate_proj.dtype:
        x = x.to(gate_proj.dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    idx = topk_idx.contiguous()
    wt = topk_weight.contiguous() if combine else None
    gate_proj, up_proj, down_proj = (w if w.stride(-1) == 1 else w.contiguous() for w in (gate_proj, up_proj, down_proj))
    if is_fp8:
        sg, su, sd = gate_scale_inv, up_scale_inv, down_scale_inv
        assert sg.stride() == su.stride(), "gate/up scales must share a layout"
    else:
        sg = su = sd = gate_proj  # unused
    p = t * k
    y = torch.empty((p, d), dtype=odt, device=x.device)
    block_k = max(2, next_pow2(k))
    if grouped:
        # sparse tiles for a static T with few pairs per expert, unless the call pins the tile
        sparse = grouped_block_t is None and sparse_tiles(is_fp8, t_static, k, e, d, i)
        block_t = grouped_block_t or (SPARSE_TILE_PAIRS if sparse else GROUPED_BLOCK_T)
        if block_t not in GROUPED_BLOCK_TS:
            raise ValueError(f"grouped_block_t={block_t}: one of {GROUPED_BLOCK_TS}")
        sched, n_slots = grouped_schedule(idx, e, block_t)
        block_p = block_e = 2  # unused
        n_sched = n_slots
        plan = grouped_plan(is_fp8, d, i, sparse, t_static, up_block_n=up_block_n, up_num_warps=up_num_warps,
                            up_num_stages=up_num_stages, down_block_n=down_block_n, down_num_warps=down_num_warps,
                            down_num_stages=down_num_stages)
    else:
        block_t = max(16, next_pow2(t_static))
        n_slots = min(e, p)
        # Unused here. Not idx: while the kernels took their columns from a helper given both pointers, torch's
        # wrap_triton analysis took both as written, and one tensor passed as two such arguments was copied before
        # the kernel (a launch per MoE layer; scripts/inductor_mutations.py). A private empty buffer costs nothing.
        sched = torch.empty(1, dtype=torch.int32, device=x.device)
        n_sched = 0
        block_p = max(2, next_pow2(p))
        block_e = min(64, max(2, next_pow2(e)))
        plan = resolve_moe_decode(
            t_static, e, i, d, num_sms(x.device), is_fp8, block_n, num_warps, num_stages,
            up_block_n=up_block_n, up_num_warps=up_num_warps, up_num_stages=up_num_stages,
            down_block_n=down_block_n, down_num_warps=down_num_warps, down_num_stages=down_num_stages)
    # FP8: the up kernel quantizes h when each of its programs owns a whole 128-channel block of h, one act-quant
    # launch after the row-parallel up kernel, else the down kernel
    a16 = not quant_act
    if a16:
        assert is_fp8 and not grouped and t_static == 1, "W8A16 experts: FP8 weights and one token (a16_supported)"
        fields = dict(zip(("up_block_n", "up_num_warps", "down_block_n", "down_num_warps"),
                          a16_moe_config(e, i, d, plan)))
        given = dict(up_block_n=up_block_n, up_num_warps=up_num_warps, down_block_n=down_block_n,
                     down_num_warps=down_num_warps)  # this call's own fields win (tests, sweeps)
        fields.update({k: v for k, v in given.items() if v is not None})
        if fields["up_block_n"] not in ROWS_UP_BLOCK_NS or fields["down_block_n"] not in ROWS_DOWN_BLOCK_NS:
            raise ValueError(f"W8A16 experts run the row-parallel kernels: up_block_n in {ROWS_UP_BLOCK_NS} and "
                             f"down_block_n in {ROWS_DOWN_BLOCK_NS}, got {fields['up_block_n']} and "
                             f"{fields['down_block_n']}")
        plan = plan._replace(**fields)
        check_moe_plan(plan, is_fp8, t_static)
    rows_up = is_fp8 and not grouped and plan.up_block_n in ROWS_UP_BLOCK_NS
    rows_down = rows_up and plan.down_block_n in ROWS_DOWN_BLOCK_NS  # (check_moe_plan: only behind rows_up)
    quant_h = is_fp8 and (plan.up_block_n == 128 or rows_up)
    if a16:
        xq, xs = x, x                             # x as it is (xs unused)
    elif is_fp8 and x_q is not None and x_scale is not None:
        xq = x_q if x_q.stride(-1) == 1 else x_q.contiguous()          # quantized by the producer of x
        xs = x_scale if x_scale.stride(-1) == 1 else x_scale.contiguous()
    elif is_fp8:
        xq, xs = act_quant(x)                     # once; the expert programs stream e4m3 tiles
    else:
        xq, xs = x, x                             # xs unused
    if rows_up:
        h = hs = None                             # act_quant of the row-parallel kernel's output, below
    elif quant_h:
        h = torch.empty((p, i), dtype=torch.float8_e4m3fn, device=x.device)
        hs = torch.empty((p, cdiv(i, 128)), dtype=torch.float32, device=x.device)
    else:
        h = torch.empty((p, i), dtype=odt, device=x.device)
        hs = h                                    # unused
    # FP8 decode, the MMA kernels: the weights through TMA descriptors where their layout takes one
    decode_desc = is_fp8 and not grouped and moe_decode_tma()
    common = dict(IS_FP8=is_fp8, GROUPED=grouped, QUANT_H=quant_h, BLOCK_T=block_t, BLOCK_K=block_k,
                  BLOCK_P=block_p, BLOCK_E=block_e)
    kb_pad_up, kb_pad_down = (max(2, next_pow2(cdiv(n, 128))) for n in (d, i))
    if rows_up:  # one token: h[k] for slot k, then h quantized as the QUANT_H up kernel would have
        h_act = torch.empty((p, i), dtype=odt, device=x.device)
        wrap_triton(_moe_up_rows_kernel)[(p, cdiv(i, plan.up_block_n))](
            xq, xs, idx, gate_proj, up_proj, sg, su, h_act,
            e, i, d, gate_proj.stride(0), gate_proj.stride(1), sg.stride(0), sg.stride(1), h_act.stride(0),
            ACT16=a16, BLOCK_N=plan.up_block_n, KB_PAD=kb_pad_up, num_warps=plan.up_num_warps,
        )
        h, hs = (h_act, h_act) if a16 else act_quant(h_act)
        if rows_down:  # and the row-parallel down kernel, then the combine below
            assert sd.stride(-1) == 1, "the row-parallel down kernel reads each row's block scales contiguously"
            wrap_triton(_moe_down_rows_kernel)[(p, cdiv(d, plan.down_block_n))](
                h, hs, idx, down_proj, sd, y,
                e, i, d, h.stride(0), hs.stride(0), down_proj.stride(0), down_proj.stride(1),
                sd.stride(0), sd.stride(1), y.stride(0),
                ACT16=a16, BLOCK_N=plan.down_block_n, KB_PAD=kb_pad_down, num_warps=plan.down_num_warps,
            )
    elif grouped and is_fp8:  # tokens as the MMA's M (`_moe_up_grouped_kernel`)
        pinned = up_num_warps is not None or up_num_stages is not None
        for up_warps, up_stages, tiles in grouped_up_configs(plan, d, i, t, pinned):
            # the weights through TMA descriptors (DSV3_MOE_UP_TMA): the TWO_DOTS form at any warp count
            up_desc = grouped_up_tma(up_warps) and all(tma_descriptor_ok(w) for w in (gate_proj, up_proj))
            two_dots = up_warps <= 4 or up_desc  # (registers: see the kernel)
            launch_with_descriptors(
                _moe_up_grouped_kernel, (n_slots * tiles, cdiv(i, 128)),
                {"wg_ptr": [1, 128, 128], "wu_ptr": [1, 128, 128]} if up_desc else {},
                x_ptr=xq, xs_ptr=xs, sched_ptr=sched, wg_ptr=gate_proj, wu_ptr=up_proj, sg_ptr=sg, su_ptr=su,
                h_ptr=h, hs_ptr=hs, dt_ptr=y, K=k, I=i, D=d, n_sched=n_sched, stride_xt=xq.stride(0),
                stride_xst=xs.stride(0), stride_we=gate_proj.stride(0), stride_wn=gate_proj.stride(1),
                stride_se=sg.stride(0), stride_sn=sg.stride(1), stride_sk=sg.stride(2), stride_h=h.stride(0),
                stride_hs=hs.stride(0), BLOCK_T=block_t, KB_PAD=kb_pad_up,
                PRELOAD=preload_scales(kb_pad_up) and not two_dots, TWO_DOTS=two_dots,
                EVEN=two_dots and even_blocks(d, i, 128), W_DESC=up_desc, num_warps=up_warps, num_stages=up_stages,
            )
    else:
        up_desc = decode_desc and all(tma_descriptor_ok(w) for w in (gate_proj, up_proj))
        launch_with_descriptors(
            _moe_up_kernel, (n_slots, cdiv(i, plan.up_block_n)),
            {"wg_ptr": [1, plan.up_block_n, 128], "wu_ptr": [1, plan.up_block_n, 128]} if up_desc else {},
            x_ptr=xq, xs_ptr=xs, idx_ptr=idx, sched_ptr=sched, wg_ptr=gate_proj, wu_ptr=up_proj, sg_ptr=sg,
            su_ptr=su, h_ptr=h, hs_ptr=hs, dt_ptr=y, T=t, K=k, E=e, I=i, D=d, n_sched=n_sched,
            stride_xt=xq.stride(0), stride_xst=xs.stride(0), stride_we=gate_proj.stride(0),
            stride_wn=gate_proj.stride(1), stride_se=sg.stride(0), stride_sn=sg.stride(1),
            stride_sk=sg.stride(2) if sg.dim() == 3 else 0, stride_h=h.stride(0), stride_hs=hs.stride(0),
            BLOCK_N=plan.up_block_n, W_DESC=up_desc, num_warps=plan.up_num_warps, num_stages=plan.up_num_stages,
            **common,
        )
    if grouped and is_fp8:
        wrap_triton(_moe_down_grouped_kernel)[(n_slots, cdiv(d, plan.down_block_n))](
            h, hs, sched, down_proj, sd, y,
            k, i, d, n_sched,
            h.stride(0), hs.stride(0), down_proj.stride(0), down_proj.stride(1),
            sd.stride(0), sd.stride(1), sd.stride(2), y.stride(0),
            BLOCK_T=block_t, BLOCK_N=plan.down_block_n, KB_PAD=kb_pad_down, PRELOAD=preload_scales(kb_pad_down),
            EVEN=even_blocks(i, d, plan.down_block_n), num_warps=plan.down_num_warps, num_stages=plan.down_num_stages,
        )
    elif not rows_down:
        down_desc = decode_desc and tma_descriptor_ok(down_proj)
        launch_with_descriptors(
            _moe_down_kernel, (n_slots, cdiv(d, plan.down_block_n)),
            {"wd_ptr": [1, plan.down_block_n, 128]} if down_desc else {},
            h_ptr=h, hs_ptr=hs, idx_ptr=idx, sched_ptr=sched, wd_ptr=down_proj, sd_ptr=sd, y_ptr=y,
            T=t, K=k, E=e, I=i, D=d, n_sched=n_sched, stride_h=h.stride(0), stride_hs=hs.stride(0),
            stride_we=down_proj.stride(0), stride_wn=down_proj.stride(1), stride_se=sd.stride(0),
            stride_sn=sd.stride(1), stride_sk=sd.stride(2) if sd.dim() == 3 else 0, stride_y=y.stride(0),
            BLOCK_N=plan.down_block_n, EVEN=even_blocks(i, d, plan.down_block_n), W_DESC=down_desc,
            num_warps=plan.down_num_warps, num_stages=plan.down_num_stages, **common,
        )
    if not combine:
        return y.view(t, k, d)
    out = torch.empty((t, d), dtype=odt, device=x.device)
    block_d = 512
    wrap_triton(_moe_combine_kernel)[(t, cdiv(d, block_d))](
        y, idx, wt, out, k, e, d, y.stride(0), out.stride(0), out.stride(1),
        FIRST_ONLY=not grouped, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    return out


def a16_supported(x: torch.Tensor, gate_scale_inv: Optional[torch.Tensor]) -> bool:
    """quant_act=False (W8A16) runs the Triton kernels for FP8 weights and statically one token (the model's batch-1
    decode); other calls take the reference (correct, dense over experts: not for hot paths)."""
    return gate_scale_inv is not None and static_int(x.shape[0]) == 1


def _triton_ok(x: torch.Tensor, gate_proj: torch.Tensor, gate_scale_inv: Optional[torch.Tensor]) -> bool:
    if x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if gate_scale_inv is not None:
        return gate_proj.dtype == torch.float8_e4m3fn
    return gate_proj.dtype in (torch.bfloat16, torch.float16)


@triton_op("dsv3::routed_experts", mutates_args=())
def routed_experts(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
    gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
    gate_scale_inv: Optional[torch.Tensor], up_scale_inv: Optional[torch.Tensor],
    down_scale_inv: Optional[torch.Tensor], x_q: Optional[torch.Tensor] = None,
    x_scale: Optional[torch.Tensor] = None, quant_act: bool = True,
) -> torch.Tensor:
    torch._check((x_q is None) == (x_scale is None), lambda: "routed_experts: give x_q and x_scale together")
    if (x.device.type == "cpu" or not _triton_ok(x, gate_proj, gate_scale_inv)
            or not (quant_act or a16_supported(x, gate_scale_inv))):
        return routed_experts_reference(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj,
                                        gate_scale_inv, up_scale_inv, down_scale_inv, x_q, x_scale, quant_act)
    return routed_experts_triton(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj,
                                 gate_scale_inv, up_scale_inv, down_scale_inv, x_q=x_q, x_scale=x_scale,
                                 quant_act=quant_act)


@routed_experts.register_fake
def _routed_experts_fake(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj,
                         gate_scale_inv, up_scale_inv, down_scale_inv, x_q=None, x_scale=None, quant_act=True):
    torch._check((x_q is None) == (x_scale is None), lambda: "routed_experts: give x_q and x_scale together")
    return torch.empty_like(x)


@triton_op("dsv3::routed_experts_pairs", mutates_args=())
def routed_experts_pairs(
    x: torch.Tensor, topk_idx: torch.Tensor,
    gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
    gate_scale_inv: Optional[torch.Tensor], up_scale_inv: Optional[torch.Tensor],
    down_scale_inv: Optional[torch.Tensor], x_q: Optional[torch.Tensor] = None,
    x_scale: Optional[torch.Tensor] = None, quant_act: bool = True,
) -> torch.Tensor:
    """`routed_experts` without its last step: [T, K, D], pair (t, k) = expert topk_idx[t, k]'s output for token t
    in x.dtype, defined for ids in [0, E) (at decode only the first k naming a repeated id); other rows are
    unspecified (the Triton path does not write them). With no repeated id within a token,
    routed_experts == combine_pairs(routed_experts_pairs(...))."""
    torch._check((x_q is None) == (x_scale is None), lambda: "routed_experts_pairs: give x_q and x_scale together")
    if (x.device.type == "cpu" or not _triton_ok(x, gate_proj, gate_scale_inv)
            or not (quant_act or a16_supported(x, gate_scale_inv))):
        return routed_experts_pairs_reference(x, topk_idx, gate_proj, up_proj, down_proj,
                                              gate_scale_inv, up_scale_inv, down_scale_inv, x_q, x_scale, quant_act)
    return routed_experts_triton(x, topk_idx, None, gate_proj, up_proj, down_proj,
                                 gate_scale_inv, up_scale_inv, down_scale_inv, x_q=x_q, x_scale=x_scale, combine=False,
                                 quant_act=quant_act)


@routed_experts_pairs.register_fake
def _routed_experts_pairs_fake(x, topk_idx, gate_proj, up_proj, down_proj,
                               gate_scale_inv, up_scale_inv, down_scale_inv, x_q=None, x_scale=None, quant_act=True):
    torch._check((x_q is None) == (x_scale is None), lambda: "routed_experts_pairs: give x_q and x_scale together")
    return x.new_empty((x.shape[0], topk_idx.shape[1], x.shape[1]))
