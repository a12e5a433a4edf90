"""Grouped FP8 MoE kernels for prefill with the operands swapped: tokens as the MMA's M, weight rows as its N
(GPU experiment, issue 6 / issue 3; not used by the model).

Why: the production grouped kernels (`_moe_up_kernel`, `_moe_down_kernel`) compute acc[weight rows, tokens], so at
BLOCK_T = 64 each warpgroup issues m64 n64 wgmmas with both operands in shared memory: 32 MACs per shared-memory
byte, which is what the tensor cores need at FP8 peak with no slack (ncu: tensor pipe 24%, one 8-warp CTA per SM,
0.44 eligible warps per scheduler; docs/BENCHMARKS.md, ninth session). Here the up kernel's tile is [64 tokens,
128 gate rows | 128 up rows] in ONE dot (each warpgroup m64 n128: 43 MACs per byte) with the same registers
(acc + the per-128-block partial: 2 x 64 x 256 fp32 over 256 threads), and the down kernel's tile is [64 tokens,
BLOCK_N rows of D]. Same arithmetic as the production kernels (fp32 partial per 128-deep K block times the
x-scale x weight-scale product), same outputs up to the MMA's summation order.

Prints us per call (CUDA graph, median of interleaved rounds) for the production kernels and the swapped ones at
the 16B prefill shape (T = 4096, 64 routed top-6 + 2 shared slots), TFLOP/s, and the max differences.

    python scripts/try_grouped_swap.py [--t 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from dsv3.kernels._launch import cdiv, next_pow2
from dsv3.kernels.fp8_linear import act_quant, pick_scale, pick_scales
from dsv3.kernels.routed_experts import (
    GROUPED_BLOCK_T, MOE_GROUPED_FP8, _moe_down_kernel, _moe_up_kernel, grouped_schedule,
)


@triton.jit
def _up_swapped_kernel(
    x_ptr, xs_ptr, sched_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, hs_ptr, dt_ptr,
    K, I, D, n_sched,
    stride_xt, stride_xst, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_h, stride_hs,
    BLOCK_T: tl.constexpr, KB_PAD: tl.constexpr, NO_SCALE: tl.constexpr = False,
):
    """NO_SCALE (timing bound only, wrong values): one fp32 accumulator fed by the MMA, no per-block partial.
    acc[token, r], r < 128: gate row pid_n*128 + r, r >= 128: up row pid_n*128 + r - 128; h quantized per token
    over the program's 128 channels (the production kernel's QUANT_H)."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    e = tl.load(sched_ptr + slot)
    start = tl.load(sched_ptr + n_sched + slot)
    end = tl.load(sched_ptr + 2 * n_sched + slot)
    if start < end:
        col_mask = (start + offs_t) < end
        pair = tl.load(sched_ptr + 3 * n_sched + start + offs_t, mask=col_mask, other=0)
        token64 = (pair // K).to(tl.int64)
        pair64 = pair.to(tl.int64)
        e64 = e.to(tl.int64)
        offs_r = tl.arange(0, 256)
        is_up = offs_r >= 128
        n = pid_n * 128 + (offs_r % 128)
        n_mask = n < I
        offs_d = tl.arange(0, 128)
        row_off = e64 * stride_we + n.to(tl.int64) * stride_wn
        w_rows = tl.where(is_up, wu_ptr + row_off, wg_ptr + row_off)
        w_ptrs = w_rows[:, None] + offs_d[None, :]
        x_ptrs = x_ptr + token64[:, None] * stride_xt + offs_d[None, :]
        srow = e64 * stride_se + pid_n * stride_sn
        offs_kb = tl.arange(0, KB_PAD)
        kb_mask = offs_kb < tl.cdiv(D, 128)
        xs_all = tl.load(xs_ptr + token64[:, None] * stride_xst + offs_kb[None, :],
                         mask=col_mask[:, None] & kb_mask[None, :], other=1.0)
        sg_all = tl.load(sg_ptr + srow + offs_kb * stride_sk, mask=kb_mask, other=0.0)
        su_all = tl.load(su_ptr + srow + offs_kb * stride_sk, mask=kb_mask, other=0.0)
        acc = tl.zeros((BLOCK_T, 256), dtype=tl.float32)
        for kb in range(0, tl.cdiv(D, 128)):
            d_mask = (kb * 128 + offs_d) < D
            wv = tl.load(w_ptrs + kb * 128, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            xv = tl.load(x_ptrs + kb * 128, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            xs_k = pick_scales(xs_all, offs_kb, kb)
            s_row = tl.where(is_up, pick_scale(su_all, offs_kb, kb), pick_scale(sg_all, offs_kb, kb))
            if NO_SCALE:
                acc = tl.dot(xv, tl.trans(wv), acc)
            else:
                acc += tl.dot(xv, tl.trans(wv)) * (xs_k[:, None] * s_row[None, :])
        gu = tl.permute(tl.reshape(acc, (BLOCK_T, 2, 128)), (0, 2, 1))
        acc_g, acc_u = tl.split(gu)
        odt = dt_ptr.dtype.element_ty
        g = acc_g.to(odt).to(tl.float32)
        u = acc_u.to(odt).to(tl.float32)
        sl = (g / (1.0 + tl.exp(-g))).to(odt).to(tl.float32)
        hf = (sl * u).to(odt).to(tl.float32)
        amax = tl.max(tl.abs(hf), axis=1)
        hsc = tl.div_rn(tl.maximum(amax, 1e-4), 448.0)
        hq = tl.minimum(tl.maximum(tl.div_rn(hf, hsc[:, None]), -448.0), 448.0).to(tl.float8e4nv)
        offs_c = pid_n * 128 + tl.arange(0, 128)
        tl.store(h_ptr + pair64[:, None] * stride_h + offs_c[None, :], hq,
                 mask=col_mask[:, None] & (offs_c < I)[None, :])
        tl.store(hs_ptr + pair64 * stride_hs + pid_n, hsc, mask=col_mask)


@triton.jit
def _down_swapped_kernel(
    h_ptr, hs_ptr, sched_ptr, wd_ptr, sd_ptr, y_ptr,
    K, I, D, n_sched,
    stride_h, stride_hs, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_y,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, KB_PAD: tl.constexpr,
):
    """acc[token, r] for D rows pid_n*BLOCK_N + r (BLOCK_N 128 or 256: one or two 128-row weight blocks)."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    e = tl.load(sched_ptr + slot)
    start = tl.load(sched_ptr + n_sched + slot)
    end = tl.load(sched_ptr + 2 * n_sched + slot)
    if start < end:
        col_mask = (start + offs_t) < end
        pair64 = tl.load(sched_ptr + 3 * n_sched + start + offs_t, mask=col_mask, other=0).to(tl.int64)
        e64 = e.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < D
        offs_i = tl.arange(0, 128)
        w_ptrs = wd_ptr + e64 * stride_we + offs_n[:, None] * stride_wn + offs_i[None, :]
        h_ptrs = h_ptr + pair64[:, None] * stride_h + offs_i[None, :]
        nb0 = (pid_n * BLOCK_N) // 128
        offs_kb = tl.arange(0, KB_PAD)
        kb_mask = offs_kb < tl.cdiv(I, 128)
        s0_all = tl.load(sd_ptr + e64 * stride_se + nb0 * stride_sn + offs_kb * stride_sk, mask=kb_mask, other=0.0)
        if BLOCK_N == 256:
            s1_all = tl.load(sd_ptr + e64 * stride_se + (nb0 + 1) * stride_sn + offs_kb * stride_sk,
                             mask=kb_mask & ((offs_kb * 0 + (nb0 + 1) * 128) < D), other=0.0)
        hs_all = tl.load(hs_ptr + pair64[:, None] * stride_hs + offs_kb[None, :],
                         mask=col_mask[:, None] & kb_mask[None, :], other=1.0)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(I, 128)):
            i_mask = (kb * 128 + offs_i) < I
            w = tl.load(w_ptrs + kb * 128, mask=n_mask[:, None] & i_mask[None, :], other=0.0)
            hv = tl.load(h_ptrs + kb * 128, mask=col_mask[:, None] & i_mask[None, :], other=0.0)
            hs = pick_scales(hs_all, offs_kb, kb)
            if BLOCK_N == 256:
                s_row = tl.where(tl.arange(0, BLOCK_N) >= 128, pick_scale(s1_all, offs_kb, kb),
                                 pick_scale(s0_all, offs_kb, kb))
                acc += tl.dot(hv, tl.trans(w)) * (hs[:, None] * s_row[None, :])
            else:
                acc += tl.dot(hv, tl.trans(w)) * (hs[:, None] * pick_scale(s0_all, offs_kb, kb))
        tl.store(y_ptr + pair64[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=col_mask[:, None] & n_mask[None, :])


def graph_us_rounds(fns: dict, rounds: int) -> dict:
    from dsv3.kernels.bench import graph_us
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            samples[k].append(graph_us([f] * 3))
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    from dsv3.kernels.fp8_blocks import quantize_weight

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    t, e_routed, n_shared, k_routed, d, i = args.t, 64, 2, 6, 2048, 1408
    e = e_routed + n_shared
    routed = torch.stack([torch.randperm(e_routed, device=dev, generator=g)[:k_routed] for _ in range(t)])
    idx = torch.cat([routed, torch.arange(e_routed, e, device=dev).expand(t, n_shared)], 1).contiguous()
    k = idx.shape[1]
    p = t * k
    x = torch.randn(t, d, device=dev, generator=g).bfloat16()
    (wg, sg), (wu, su), (wd, sd) = (quantize_weight(torch.randn(*s, device=dev, generator=g) * 0.05)
                                    for s in ((e, i, d), (e, i, d), (e, d, i)))
    xq, xs = act_quant(x)
    block_t = GROUPED_BLOCK_T
    sched, n_slots = grouped_schedule(idx, e, block_t)
    plan = MOE_GROUPED_FP8
    kb_up, kb_down = (max(2, next_pow2(cdiv(n, 128))) for n in (d, i))
    common = dict(IS_FP8=True, GROUPED=True, QUANT_H=True, BLOCK_T=block_t, BLOCK_K=max(2, next_pow2(k)),
                  BLOCK_P=2, BLOCK_E=2)
    h0 = torch.full((p, i), float("nan"), device=dev).to(torch.float8_e4m3fn)
    hs0 = torch.full((p, cdiv(i, 128)), float("nan"), device=dev)
    y0 = torch.full((p, d), float("nan"), device=dev, dtype=torch.bfloat16)
    h1, hs1, y1 = h0.clone(), hs0.clone(), y0.clone()

    def up_prod(**extra):
        _moe_up_kernel[(n_slots, cdiv(i, plan.up_block_n))](
            xq, xs, idx, sched, wg, wu, sg, su, h0, hs0, y0, t, k, e, i, d, n_slots,
            xq.stride(0), xs.stride(0), wg.stride(0), wg.stride(1), sg.stride(0), sg.stride(1), sg.stride(2),
            h0.stride(0), hs0.stride(0), BLOCK_N=plan.up_block_n, KB_PAD=kb_up, PRELOAD=True,
            **{"num_warps": plan.up_num_warps, "num_stages": plan.up_num_stages, **common, **extra})

    def down_prod():
        _moe_down_kernel[(n_slots, cdiv(d, plan.down_block_n))](
            h0, hs0, idx, sched, wd, sd, y0, t, k, e, i, d, n_slots,
            h0.stride(0), hs0.stride(0), wd.stride(0), wd.stride(1), sd.stride(0), sd.stride(1), sd.stride(2),
            y0.stride(0), BLOCK_N=plan.down_block_n, KB_PAD=kb_down, PRELOAD=True,
            num_warps=plan.down_num_warps, num_stages=plan.down_num_stages, **common)

    def up_swap(warps, stages, **extra):
        def f():
            _up_swapped_kernel[(n_slots, cdiv(i, 128))](
                xq, xs, sched, wg, wu, sg, su, h1, hs1, y1, k, i, d, n_slots,
                xq.stride(0), xs.stride(0), wg.stride(0), wg.stride(1), sg.stride(0), sg.stride(1), sg.stride(2),
                h1.stride(0), hs1.stride(0), BLOCK_T=block_t, KB_PAD=kb_up, num_warps=warps, num_stages=stages,
                **extra)
        return f

    def down_swap(bn, warps, stages):
        def f():
            _down_swapped_kernel[(n_slots, cdiv(d, bn))](
                h0, hs0, sched, wd, sd, y1, k, i, d, n_slots,
                h0.stride(0), hs0.stride(0), wd.stride(0), wd.stride(1), sd.stride(0), sd.stride(1), sd.stride(2),
                y1.stride(0), BLOCK_T=block_t, BLOCK_N=bn, KB_PAD=kb_down, num_warps=warps, num_stages=stages)
        return f

    up_prod()
    down_prod()
    torch.cuda.synchronize()
    h0f = h0.float() * hs0.repeat_interleave(128, 1)[:, :i]
    results = {"t": t, "up": {}, "down": {}}
    up_flops, down_flops = 2 * 2 * d * i * p, 2 * d * i * p
    ups = {"production": up_prod}
    # production at a 128-register cap and 2 stages: two 8-warp CTAs per SM (spills instead)
    try:
        up_prod(maxnreg=128, num_stages=2)
        ups["production maxnreg128 s2"] = lambda: up_prod(maxnreg=128, num_stages=2)
    except Exception as exc:  # noqa: BLE001
        results["up"]["production maxnreg128 s2"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    variants = {f"swap w{w} s{s}": up_swap(w, s) for w, s in ((8, 3), (8, 4), (8, 2), (4, 3))}
    variants["swap w8 s2 maxnreg128"] = up_swap(8, 2, maxnreg=128)
    for name, f in variants.items():
        try:
            h1.fill_(float("nan"))
            f()
            torch.cuda.synchronize()
            h1f = h1.float() * hs1.repeat_interleave(128, 1)[:, :i]
            diff = ((h1f - h0f).abs().max() / h0f.abs().max()).item()
            results["up"][name] = {"max_rel_diff": diff}
            ups[name] = f
        except Exception as exc:  # noqa: BLE001
            results["up"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    try:
        f = up_swap(8, 3, NO_SCALE=True)
        f()
        ups["swap w8 s3 no-scale (bound, wrong values)"] = f
    except Exception as exc:  # noqa: BLE001
        results["up"]["swap no-scale"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    downs = {"production": down_prod}
    for bn, w, s in ((128, 4, 3), (128, 8, 3), (256, 8, 3), (256, 8, 4), (128, 4, 4)):
        f = down_swap(bn, w, s)
        try:
            y1.fill_(float("nan"))
            f()
            torch.cuda.synchronize()
            diff = ((y1.float() - y0.float()).abs().max() / y0.float().abs().max()).item()
            results["down"][f"swap bn{bn} w{w} s{s}"] = {"max_rel_diff": diff}
            downs[f"swap bn{bn} w{w} s{s}"] = f
        except Exception as exc:  # noqa: BLE001
            results["down"][f"swap bn{bn} w{w} s{s}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    for part, fns, flops in (("up", ups, up_flops), ("down", downs, down_flops)):
        for name, us in graph_us_rounds(fns, args.rounds).items():
            results[part].setdefault(name, {}).update(us=round(us, 1), tflops=round(flops / us / 1e6, 1))
    for part in ("up", "down"):
        for name, r in results[part].items():
            print(f"{part:5s} {name:22s} {r}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
