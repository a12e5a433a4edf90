"""`torch.ops.dsv3.route`: the DeepSeekMoE router (gate GEMV, scoring, group limiting, top-k, combine weights).

Contract
- x: [T, D] tokens, bfloat16/float16/float32. weight: [E, D] router weight, bfloat16/float32. bias: [E] float32
  `e_score_correction_bias` (V3) or None.
- Scalars: top_k; n_group, topk_group (group limiting applies when n_group > 1 and topk_group < n_group; E must be
  a multiple of n_group, any multiple: 160 / 8 = 20 experts per group is fine); sigmoid (else softmax);
  group_top2 (a group's score is the sum of its best two choices, V3 `noaux_tc`; else its best one, V2);
  norm_topk_prob; routed_scaling_factor. `route_args(cfg)` maps a ModelConfig to these.
- n_shared (default 0): always-on experts stacked after the E routed ones (the shared experts, when the runtime
  stores them as extra experts of the routed-experts tensors): the outputs get n_shared more columns naming
  experts E .. E + n_shared - 1 with weight 1.0 for every token, so one routed-experts op computes both.
- Returns (topk_idx int64 [T, top_k + n_shared], topk_weight float32 [T, top_k + n_shared]), exactly
  `select_experts_reference(F.linear(x.float(), weight.float()), bias, ...)` plus those columns:
  logits in fp32; scores = softmax(logits) or sigmoid(logits); choice = scores (+ bias); with group limiting, the
  topk_group best groups are kept and every other expert's choice is -inf; the top_k experts by choice, in
  descending order; their weights gathered from the UNSHIFTED scores; if norm_topk_prob divided by (sum + 1e-20);
  times routed_scaling_factor.
- Ties: the Triton kernels take the lowest expert (group) index first. The reference uses torch.topk, which makes
  no promise, so the two branches may differ on exact ties (and, through fp32 rounding, on near-ties) only.

Implementations (branch taken at trace time from the device and the static shapes)
- CPU: `route_reference` (plain torch, out-of-place, ONNX-exportable; Inductor fuses it when compiled on CPU).
- CUDA, T larger or dynamic (prefill): logits from `torch.mm(..., out_dtype=float32)` (16-bit operands, fp32
  accumulation: the same products, exact in fp32), then, for E <= 512, the decode path's `_router_select_kernel`
  over them (one program per token; `select_logits`) in place of the reference's torch.topk / gather / softmax
  kernels (DSV3_ROUTE_PREFILL=torch keeps those); fp32 weights: the reference.
- CUDA, T statically <= 64 (decode), E <= 512: two Triton kernels, no host sync:
  1. `_router_logits_kernel`, grid (E / BLOCK_E, splits): each program owns BLOCK_E experts and one slice of D,
     computes all T tokens (padded to a power of two) with fp32 multiply-accumulate of both operands converted to
     fp32 (no tl.dot: the result is true fp32, as cuBLAS's fp32 GEMM, never TF32), and writes fp32 partial logits
     [splits, T, E]. D is split so that a program streams one chunk of D at batch 1 (`logits_plan`): the weight
     read (E * D * 2 bytes, 3.7 MB on 671B) is then spread over a few programs per SM, each one load round trip.
     Above 8 tokens with x and weight both bf16 (the model's decode at batch 16-64) the products go through the
     tensor cores instead (DOT): a product of two bf16 values is exact in fp32 and the MMA accumulates in fp32, as
     the prefill path's torch.mm(out_dtype=float32) does; only the order of the fp32 sums differs. The FMA tiles
     there spent 7.6 / 18 us per call on the 16B / 671B routers at T = 32 (scripts/sweep_router_splits.py).
  2. `_router_select_kernel`, one program per token: sums the partials in a fixed order, scores, bias, group
     limiting (group of expert e = e // (E / n_group), on a [G_PAD, E_PAD] masked matrix), then TOP_K rounds of
     argmax-and-mask on 64-bit keys (order-preserving fp32 bits << 32 | reversed index: one reduction per round,
     lowest index on ties), gathers the weights, normalises, scales, writes idx (int64) and weights.
- CUDA, E > 512 (no shipped config): the reference's selection, on cuBLAS logits for 16-bit operands.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, env_switch, next_pow2, num_sms, static_int

DECODE_MAX_T = 64
SELECT_MAX_E = 512
# Elements of the per-program fp32 accumulator of the logits kernel (64 per thread at 4 warps): the products are
# accumulated element-wise and reduced over D once at the end, so the loop is loads and FMAs only.
LOGITS_ACC_ELEMS = 8192
# DOT tiles (T > 8, bf16 x and weight): experts per program and D per step. scripts/sweep_router_splits.py on the
# H200 (2026-11-26, route op us at T = 16 / 32 / 64, 12 DOT tiles and splits): 32 x 128 with >= 2 steps per program
# 16B 4.84 / 5.15 / 5.07 (64 x 128, one step: 5.41 / 5.68 / 5.96), 671B 7.42 / 7.87 / 7.86 (7.92 / 8.43 / 8.82);
# the FMA tiles of before 6.01 / 7.56 / 20.26 and 13.26 / 17.97 / 32.32.
DOT_BLOCK_E = 32
DOT_BLOCK_D = 128


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain torch)
# ----------------------------------------------------------------------------------------------------------------


def select_experts_reference(
    logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int,
    sigmoid: bool, group_top2: bool, norm_topk_prob: bool, routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] (fp32) -> (expert ids [T, top_k] int64, combine weights [T, top_k] fp32).
    Out-of-place ops only, so the same code exports to ONNX (dsv3.export)."""
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    choice = scores if bias is None else scores + bias
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(-1, n_group, logits.shape[-1] // n_group)
        if group_top2:
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # V3: sum of each group's best two
        else:
            group_score = grouped.amax(-1)  # V2: each group's best expert
        keep = group_score.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape_as(choice)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    topk_idx = choice.topk(top_k, dim=-1).indices
    topk_weight = scores.gather(1, topk_idx)
    if norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
    return topk_idx, topk_weight * routed_scaling_factor


def with_shared_columns(idx: torch.Tensor, weight: torch.Tensor, n_experts: int, n_shared: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Append n_shared always-on columns (experts n_experts .. n_experts + n_shared - 1, weight 1.0)."""
    if n_shared == 0:
        return idx, weight
    t = idx.shape[0]
    ids = torch.arange(n_experts, n_experts + n_shared, dtype=idx.dtype, device=idx.device).expand(t, n_shared)
    ones = torch.ones((t, n_shared), dtype=weight.dtype, device=weight.device)
    return torch.cat([idx, ids], dim=1), torch.cat([weight, ones], dim=1)


def route_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int,
    sigmoid: bool, group_top2: bool, norm_topk_prob: bool, routed_scaling_factor: float, n_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's definition: fp32 logits (as HF, so near-ties resolve as the reference model does), then selection."""
    return route_from_logits(F.linear(x.float(), weight.float()), bias, top_k, n_group, topk_group, sigmoid,
                             group_top2, norm_topk_prob, routed_scaling_factor, n_shared)


def route_from_logits(
    logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int, sigmoid: bool,
    group_top2: bool, norm_topk_prob: bool, routed_scaling_factor: float, n_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [T, E] -> the op's outputs: `select_experts_reference` plus the n_shared always-on columns."""
    idx, wt = select_experts_reference(logits, bias, top_k, n_group, topk_group, sigmoid, group_top2,
                                       norm_topk_prob, routed_scaling_factor)
    return with_shared_columns(idx, wt, logits.shape[-1], n_shared)


def route_args(cfg: Any) -> dict:
    """A ModelConfig's routing as the op's scalar arguments (group limiting folded into n_group = 1 when off)."""
    limited = cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    return dict(
        top_k=int(cfg.num_experts_per_tok),
        n_group=int(cfg.n_group) if limited else 1,
        topk_group=int(cfg.topk_group) if limited else 1,
        sigmoid=cfg.scoring_func == "sigmoid",
        group_top2=cfg.topk_method == "noaux_tc",
        norm_topk_prob=bool(cfg.norm_topk_prob),
        routed_scaling_factor=float(cfg.routed_scaling_factor),
    )


def _check_args(n_experts: int, top_k: int, n_group: int, topk_group: int, group_top2: bool, n_shared: int = 0
                ) -> None:
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"route: top_k={top_k} must be in [1, {n_experts}]")
    if n_shared < 0:
        raise ValueError(f"route: n_shared={n_shared} must be >= 0")
    if n_group > 1 and topk_group < n_group:
        per_group = n_experts // n_group
        if n_experts % n_group:
            raise ValueError(f"route: {n_experts} experts do not split into n_group={n_group} groups")
        if topk_group < 1:
            raise ValueError(f"route: topk_group={topk_group} must be >= 1")
        if group_top2 and per_group < 2:
            raise ValueError("route: group_top2 needs at least 2 experts per group")
        if top_k > topk_group * per_group:
            raise ValueError(f"route: top_k={top_k} exceeds the {topk_group * per_group} experts of the kept groups")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _router_logits_kernel(
    x_ptr, w_ptr, part_ptr, T, E, D, D_PER_SPLIT, stride_xt, stride_we,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, FLAT: tl.constexpr, DOT: tl.constexpr,
    STAGES: tl.constexpr,
):
    """part[split, t, e] = sum over this split's slice of D of x[t, d] * w[e, d]: fp32 FMAs (no tensor cores; DOT
    below is the exception) into an element-wise accumulator, reduced over D once at the end.
    FLAT (T <= 8): the tile's rows are (expert, token) pairs, so weight and x tiles are plain 2D loads in the
    accumulator's own layout (a weight row repeats for each token: merged in the same load or served by L1).
    DOT (16-bit x and weight of one dtype, BLOCK_T >= 16): acc[t, e] += tl.dot(x tile, weight tile^T), fp32
    accumulation of exact products (see the module docstring).
    Otherwise a [BLOCK_T, BLOCK_E, BLOCK_D] accumulator reuses each loaded x element for BLOCK_E experts and each
    weight element for BLOCK_T tokens, at the price of a layout conversion of the tiles per trip."""
    pid_e = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d0 = pid_s * D_PER_SPLIT
    d1 = tl.minimum(d0 + D_PER_SPLIT, D)
    if FLAT:
        r = tl.arange(0, BLOCK_E * BLOCK_T)
        offs_e = pid_e * BLOCK_E + r // BLOCK_T
        offs_t = r % BLOCK_T
        row_ok = (offs_e < E) & (offs_t < T)
        w_ptrs = w_ptr + offs_e.to(tl.int64)[:, None] * stride_we + offs_d[None, :]
        x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_d[None, :]
        acc = tl.zeros((BLOCK_E * BLOCK_T, BLOCK_D), dtype=tl.float32)
        for d in tl.range(d0, d1, BLOCK_D, num_stages=STAGES):
            mask = row_ok[:, None] & ((d + offs_d) < d1)[None, :]
            w = tl.load(w_ptrs + d, mask=mask, other=0.0).to(tl.float32)
            xv = tl.load(x_ptrs + d, mask=mask, other=0.0).to(tl.float32)
            acc += xv * w
        tl.store(part_ptr + (pid_s * T + offs_t) * E + offs_e, tl.sum(acc, axis=1), mask=row_ok)
    else:  # [BLOCK_T tokens, BLOCK_E experts] tiles (DOT and FMA forms resolved at compile time)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_t = tl.arange(0, BLOCK_T)
        e_mask = offs_e < E
        t_mask = offs_t < T
        w_ptrs = w_ptr + offs_e.to(tl.int64)[:, None] * stride_we + offs_d[None, :]
        x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_d[None, :]
        if DOT:
            acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_T, BLOCK_E, BLOCK_D), dtype=tl.float32)
        for d in tl.range(d0, d1, BLOCK_D, num_stages=STAGES):
            d_mask = (d + offs_d) < d1
            w = tl.load(w_ptrs + d, mask=e_mask[:, None] & d_mask[None, :], other=0.0)
            xv = tl.load(x_ptrs + d, mask=t_mask[:, None] & d_mask[None, :], other=0.0)
            if DOT:
                acc = tl.dot(xv, tl.trans(w), acc)
            else:
                acc += xv.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if DOT:
            logits = acc
        else:
            logits = tl.sum(acc, axis=2)
        p_ptrs = part_ptr + (pid_s * T + offs_t)[:, None] * E + offs_e[None, :]
        tl.store(p_ptrs, logits, mask=t_mask[:, None] & e_mask[None, :])


@triton.jit
def _order_key(v, offs, E_PAD: tl.constexpr):
    """int64 keys ordered as (v ascending, index descending): max() is the best value at its lowest index.
    The fp32 bits are made order-preserving as signed ints (negative floats: flip the magnitude bits)."""
    b = v.to(tl.int32, bitcast=True)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    return (b.to(tl.int64) << 32) | (E_PAD - 1 - offs).to(tl.int64)


@triton.jit
def _key_value(key):
    b = (key >> 32).to(tl.int32)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)  # the bit map is its own inverse
    return b.to(tl.float32, bitcast=True)


@triton.jit
def select_top_k(
    logits, bias_ptr, E, PER_GROUP, N_GROUP, TOPK_GROUP, scale,
    HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, GROUPED: tl.constexpr, GROUP_TOP2: tl.constexpr,
    NORM: tl.constexpr, TOP_K: tl.constexpr, E_PAD: tl.constexpr, G_PAD: tl.constexpr, K_PAD: tl.constexpr,
    GROUP_VIEW: tl.constexpr,
):
    """One token's fp32 logits [E_PAD] (entries past E ignored) -> (expert ids [K_PAD] int32, their weights [K_PAD]
    fp32; entries past TOP_K are 0): `_router_select_kernel`'s selection, also callable from other kernels.
    GROUP_VIEW (E = E_PAD = G_PAD groups x PER_GROUP experts, both powers of two, e.g. 671B's 8 x 32): the group
    scores come from a [G_PAD, E / G_PAD] view of the experts (reductions over E values), else from a [G_PAD, E_PAD]
    membership grid (G_PAD x the work; any grouping). Same keys and maxima either way: the same selection."""
    # Below every real key, including -inf choices (masked groups), so removed/padded experts are never picked.
    REMOVED: tl.constexpr = -(1 << 62)
    offs_e = tl.arange(0, E_PAD)
    valid = offs_e < E
    if SIGMOID:
        scores = tl.div_rn(tl.full((E_PAD,), 1.0, tl.float32), 1.0 + tl.exp(-logits))
    else:
        lg = tl.where(valid, logits, float("-inf"))
        p = tl.exp(lg - tl.max(lg, axis=0))
        scores = tl.div_rn(p, tl.zeros_like(p) + tl.sum(p, axis=0))
    scores = tl.where(valid, scores, 0.0)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + offs_e, mask=valid, other=0.0).to(tl.float32)
    if GROUPED:
        offs_g = tl.arange(0, G_PAD)
        if GROUP_VIEW:
            gk = tl.reshape(_order_key(choice, offs_e, E_PAD), (G_PAD, E_PAD // G_PAD))
        else:
            member = ((offs_e // PER_GROUP)[None, :] == offs_g[:, None]) & valid[None, :]  # [G_PAD, E_PAD]
            gk = tl.where(member, _order_key(choice, offs_e, E_PAD)[None, :], REMOVED)
        if GROUP_TOP2:
            k1 = tl.max(gk, axis=1)
            k2 = tl.max(tl.where(gk == k1[:, None], REMOVED, gk), axis=1)  # keys are unique: drops exactly one
            gscore = _key_value(k1) + _key_value(k2)
        elif GROUP_VIEW:
            gscore = tl.max(tl.reshape(choice, (G_PAD, E_PAD // G_PAD)), axis=1)
        else:
            gscore = tl.max(tl.where(member, choice[None, :], float("-inf")), axis=1)
        gscore = tl.where(offs_g < N_GROUP, gscore, float("-inf"))
        # rank of each group = groups strictly ahead of it (better score, or equal score and lower index)
        ahead = (gscore[None, :] > gscore[:, None]) | (
            (gscore[None, :] == gscore[:, None]) & (offs_g[None, :] < offs_g[:, None]))
        rank = tl.sum(ahead.to(tl.int32), axis=1)
        keep = (rank < TOPK_GROUP) & (offs_g < N_GROUP)
        if GROUP_VIEW:
            allowed = tl.reshape(tl.broadcast_to(keep[:, None], (G_PAD, E_PAD // G_PAD)), (E_PAD,))
        else:
            allowed = tl.max((member & keep[:, None]).to(tl.int32), axis=0) > 0
        choice = tl.where(allowed, choice, float("-inf"))
    keys = tl.where(valid, _order_key(choice, offs_e, E_PAD), REMOVED)
    offs_k = tl.arange(0, K_PAD)
    sel = tl.zeros((K_PAD,), dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(keys, axis=0)
        i = E_PAD - 1 - (best & 0xFFFF).to(tl.int32)
        sel = tl.where(offs_k == k, i, sel)
        keys = tl.where(offs_e == i, REMOVED, keys)
    k_mask = offs_k < TOP_K
    w = tl.sum(tl.where(offs_e[None, :] == sel[:, None], scores[None, :], 0.0), axis=1)
    w = tl.where(k_mask, w, 0.0)
    if NORM:
        w = tl.div_rn(w, tl.zeros_like(w) + (tl.sum(w, axis=0) + 1e-20))
    return sel, w * scale


@triton.jit
def _router_select_kernel(
    part_ptr, bias_ptr, idx_ptr, wt_ptr,
    T, E, SPLITS, PER_GROUP, N_GROUP, TOPK_GROUP, scale,
    HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, GROUPED: tl.constexpr, GROUP_TOP2: tl.constexpr,
    NORM: tl.constexpr, TOP_K: tl.constexpr, E_PAD: tl.constexpr, G_PAD: tl.constexpr, K_PAD: tl.constexpr,
    N_SHARED: tl.constexpr, S_PAD: tl.constexpr, GROUP_VIEW: tl.constexpr,
):
    """One token per program: its logits summed over the D splits of the partials (fixed order: the result does not
    depend on scheduling), `select_top_k`, then ids and weights stored, followed by the always-on shared slots."""
    t = tl.program_id(0)
    offs_e = tl.arange(0, E_PAD)
    valid = offs_e < E
    logits = tl.zeros((E_PAD,), dtype=tl.float32)
    for s in range(0, SPLITS):
        logits += tl.load(part_ptr + (s * T + t) * E + offs_e, mask=valid, other=0.0)
    sel, w = select_top_k(logits, bias_ptr, E, PER_GROUP, N_GROUP, TOPK_GROUP, scale, HAS_BIAS, SIGMOID, GROUPED,
                          GROUP_TOP2, NORM, TOP_K, E_PAD, G_PAD, K_PAD, GROUP_VIEW)
    offs_k = tl.arange(0, K_PAD)
    k_mask = offs_k < TOP_K
    row = t.to(tl.int64) * (TOP_K + N_SHARED)
    tl.store(idx_ptr + row + offs_k, sel.to(tl.int64), mask=k_mask)
    tl.store(wt_ptr + row + offs_k, w, mask=k_mask)
    if N_SHARED > 0:  # always-on experts E .. E + N_SHARED - 1, weight 1
        offs_s = tl.arange(0, S_PAD)
        s_mask = offs_s < N_SHARED
        tl.store(idx_ptr + row + TOP_K + offs_s, (E + offs_s).to(tl.int64), mask=s_mask)
        tl.store(wt_ptr + row + TOP_K + offs_s, tl.full((S_PAD,), 1.0, tl.float32), mask=s_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launcher (host side; shapes are static at trace time)
# ----------------------------------------------------------------------------------------------------------------


def logits_plan(t: int, e: int, d: int, sms: int, dot: bool = False) -> dict:
    """Launch plan of the logits kernel: tile, D split, warps, pipelining (all from static shapes).
    - dot (x and weight bf16) and T > 8: DOT tiles of T (padded to 16..64) tokens x DOT_BLOCK_E experts x DOT_BLOCK_D,
      D split into >= 2 steps per program, <= 1 program per SM, fp32 partials no larger than the weight (`_dot_plan`).
    - T <= 8: FLAT tiles of 8 experts x T tokens; else 3D tiles of 16 experts x T (padded to 16..64) tokens.
    - BLOCK_D: as wide as an accumulator of LOGITS_ACC_ELEMS allows (long contiguous weight rows), 16 to 512.
    - D is split so that each program streams as few chunks as possible (one, at batch 1: the latency is then one
      load round trip; up to 4 programs per SM give the memory parallelism), with the fp32 partials
      (splits * T * E * 4 bytes, read back from L2 by the select kernel) under 1/4 of the bf16 weight's bytes.
    - Programs with several chunks pipeline their loads (cp.async, 3 stages); single-chunk ones need no buffers."""
    flat = next_pow2(t) <= 8
    if dot and not flat:
        return _dot_plan(t, e, d, sms, DOT_BLOCK_E, DOT_BLOCK_D)
    block_t = next_pow2(t) if flat else max(16, next_pow2(t))
    block_e = 8 if flat else 16
    block_d = max(16, min(512, LOGITS_ACC_ELEMS // (block_t * block_e), next_pow2(d)))
    n_e = cdiv(e, block_e)
    chunks = cdiv(d, block_d)
    target = max(1, min(chunks, (4 * sms) // n_e, d // (8 * t)))
    per = cdiv(chunks, target)
    return dict(
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d, FLAT=flat, DOT=False, STAGES=1 if per == 1 else 3,
        splits=cdiv(chunks, per), d_per_split=per * block_d,
        num_warps=4 if block_t * block_e * block_d <= LOGITS_ACC_ELEMS else 8,
    )


def _dot_plan(t: int, e: int, d: int, sms: int, block_e: int, block_d: int, splits: Optional[int] = None) -> dict:
    """The DOT tiles' plan (`logits_plan`); `splits` pins the D split (sweeps)."""
    block_e = min(block_e, max(16, next_pow2(e)))
    n_e = cdiv(e, block_e)
    chunks = cdiv(d, block_d)
    # >= 2 D steps per program, <= 1 program per SM, partials no larger than the weight
    target = splits or max(1, min(cdiv(chunks, 2), sms // n_e, d // (2 * t)))
    per = cdiv(chunks, target)
    return dict(BLOCK_T=max(16, next_pow2(t)), BLOCK_E=block_e, BLOCK_D=block_d, FLAT=False, DOT=True,
                STAGES=1 if per == 1 else 3, splits=cdiv(chunks, per), d_per_split=per * block_d, num_warps=4)


def route_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int,
    sigmoid: bool, group_top2: bool, norm_topk_prob: bool, routed_scaling_factor: float, n_shared: int = 0,
    splits: Optional[int] = None, select_warps: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode path (T <= 64, E <= 512). `splits` overrides the plan's D split (tests, sweeps)."""
    t, d = x.shape
    e = weight.shape[0]
    _check_args(e, top_k, n_group, topk_group, group_top2, n_shared)
    assert t <= DECODE_MAX_T and e <= SELECT_MAX_E
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    idx = torch.empty((t, top_k + n_shared), dtype=torch.int64, device=x.device)
    wt = torch.empty((t, top_k + n_shared), dtype=torch.float32, device=x.device)
    if t == 0:
        return idx, wt
    plan = logits_plan(t, e, d, num_sms(x.device), dot=x.dtype == weight.dtype == torch.bfloat16)
    n_split, per = plan.pop("splits"), plan.pop("d_per_split")
    if splits is not None:
        chunks = cdiv(cdiv(d, plan["BLOCK_D"]), splits)
        per = chunks * plan["BLOCK_D"]
        n_split = cdiv(d, per)
        plan["STAGES"] = 1 if chunks == 1 else 3
    part = torch.empty((n_split, t, e), dtype=torch.float32, device=x.device)
    wrap_triton(_router_logits_kernel)[(cdiv(e, plan["BLOCK_E"]), n_split)](
        x, weight, part, t, e, d, per, x.stride(0), weight.stride(0), **plan,
    )
    select_from_partials(part, bias, idx, wt, top_k, n_group, topk_group, sigmoid, group_top2, norm_topk_prob,
                         routed_scaling_factor, n_shared, select_warps)
    return idx, wt


def select_from_partials(
    part: torch.Tensor, bias: Optional[torch.Tensor], idx: torch.Tensor, wt: torch.Tensor, top_k: int, n_group: int,
    topk_group: int, sigmoid: bool, group_top2: bool, norm_topk_prob: bool, routed_scaling_factor: float,
    n_shared: int = 0, select_warps: Optional[int] = None, group_view: Optional[bool] = None,
) -> None:
    """`_router_select_kernel` over fp32 logit partials part [splits, T, E] (summed in split order) into idx / wt
    ([T, top_k + n_shared]); also the second half of dsv3.add_rms_norm_quant_route."""
    n_split, t, e = part.shape
    grouped = n_group > 1 and topk_group < n_group
    e_pad = max(2, next_pow2(e))
    has_bias = bias is not None
    g_pad = max(2, next_pow2(n_group if grouped else 1))
    if group_view is None:  # (tests and sweeps pass False: the membership grid on the same inputs)
        group_view = grouped and e == e_pad and n_group == g_pad
    if select_warps is None and group_view:
        # 671B's grouping on the H200 (scripts/bench_select.py, 2026-11-24, us per call at T = 1, outputs bitwise
        # equal): membership grid 7.27 (1 warp) / 5.85 (4 warps), group view 3.83 / 3.54
        select_warps = 4
    elif select_warps is None:
        # One token per program is a chain of ~TOP_K + 10 reductions: in one warp they are shuffles only (sm_90
        # build of triton 3.9: 2 barriers and no spills at E = 256 or 512, against 33 barriers with 2 warps).
        select_warps = 1
    wrap_triton(_router_select_kernel)[(t,)](
        part, bias if has_bias else part, idx, wt,
        t, e, n_split, e // n_group if grouped else e, n_group if grouped else 1, topk_group if grouped else 1,
        float(routed_scaling_factor),
        HAS_BIAS=has_bias, SIGMOID=bool(sigmoid), GROUPED=grouped, GROUP_TOP2=bool(group_top2),
        NORM=bool(norm_topk_prob), TOP_K=top_k, E_PAD=e_pad, G_PAD=g_pad,
        K_PAD=max(2, next_pow2(top_k)), N_SHARED=n_shared, S_PAD=max(2, next_pow2(n_shared)),
        GROUP_VIEW=bool(group_view), num_warps=select_warps,
    )


ROUTE_PREFILL_DEFAULT = "kernel"


def route_prefill_choice() -> str:
    """How prefill-sized T selects experts from the cuBLAS logits (read at trace time): 'kernel' (default):
    `_router_select_kernel`; 'torch': the reference's selection. DSV3_ROUTE_PREFILL pins one."""
    return env_switch("DSV3_ROUTE_PREFILL", ROUTE_PREFILL_DEFAULT, ("kernel", "torch"))


def select_logits(
    logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int, sigmoid: bool,
    group_top2: bool, norm_topk_prob: bool, routed_scaling_factor: float, n_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [T, E] (any T, E <= SELECT_MAX_E) -> the op's outputs, by `_router_select_kernel`."""
    t, e = logits.shape
    _check_args(e, top_k, n_group, topk_group, group_top2, n_shared)
    logits = logits if logits.is_contiguous() else logits.contiguous()
    idx = torch.empty((t, top_k + n_shared), dtype=torch.int64, device=logits.device)
    wt = torch.empty((t, top_k + n_shared), dtype=torch.float32, device=logits.device)
    select_from_partials(logits.unsqueeze(0), bias, idx, wt, top_k, n_group, topk_group, sigmoid, group_top2,
                         norm_topk_prob, routed_scaling_factor, n_shared)
    return idx, wt


@triton_op("dsv3::route", mutates_args=())
def route(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int,
    sigmoid: bool, group_top2: bool, norm_topk_prob: bool, routed_scaling_factor: float, n_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    # The device branch is resolved at trace time (compile_stack.md §1, pattern (a)): plain torch on CPU, Triton
    # kernels compiled into the graph on CUDA for decode-sized batches.
    args = (top_k, n_group, topk_group, sigmoid, group_top2, norm_topk_prob, routed_scaling_factor, n_shared)
    t = static_int(x.shape[0])
    if x.device.type != "cuda":
        return route_reference(x, weight, bias, *args)
    if t is None or t > DECODE_MAX_T or weight.shape[0] > SELECT_MAX_E:
        if x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype:
            # Prefill-sized T: cuBLAS on the 16-bit operands with fp32 accumulation and output instead of an fp32
            # GEMM on upcast copies (an FFMA kernel: 0.92 ms per 4095-token prefill of the 16B model, H200). A
            # product of two bf16 / fp16 values is exact in fp32, so these are the reference's logits up to the
            # order of the fp32 sums.
            logits = torch.mm(x, weight.t(), out_dtype=torch.float32)
            if weight.shape[0] <= SELECT_MAX_E and route_prefill_choice() == "kernel":
                # one select kernel where torch's top-k, sort, gather and softmax took ~30 us per layer (16B
                # prefill of 4095 tokens, H200)
                return select_logits(logits, bias, *args)
            return route_from_logits(logits, bias, *args)
        return route_reference(x, weight, bias, *args)
    return route_triton(x, weight, bias, *args)


@route.register_fake
def _route_fake(x, weight, bias, top_k, n_group, topk_group, sigmoid, group_top2, norm_topk_prob,
                routed_scaling_factor, n_shared=0):
    torch._check(x.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"route: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    _check_args(weight.shape[0], top_k, n_group, topk_group, group_top2, n_shared)
    t, k = x.shape[0], top_k + n_shared
    return (x.new_empty((t, k), dtype=torch.int64), x.new_empty((t, k), dtype=torch.float32))


__all__ = ["route", "route_reference", "route_from_logits", "route_triton", "route_args", "select_from_partials",
           "select_logits", "route_prefill_choice",
           "select_experts_reference", "logits_plan", "DECODE_MAX_T", "SELECT_MAX_E"]
