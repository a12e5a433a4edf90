"""Spike: the grouped FP8 MoE up projection on an expert-contiguous layout, both operands through TMA descriptors,
with and without Triton's warp specialization (`tl.range(..., warp_specialize=True)`), against the production
`_moe_up_grouped_kernel` (pointer-gathered token rows) at the 16B prefill shape.

Question: the production up kernel runs ~570 TFLOP/s at T = 4096 (64-pair tiles; 128-pair tiles measured 47%
slower: one 8-warp CTA cannot overlap its block-scale arithmetic with its MMAs, where two 4-warp CTAs per SM do).
Does a layout in which every operand is a TMA tile (tokens permuted into expert-contiguous rows, padded per expert
to the tile) let Triton's warp specialization (a producer warp issuing the loads, consumer warpgroups the MMAs)
run larger tiles faster? Not wired into the model; the permutation's own cost (~50 MB written and read per layer)
is not counted here.

    python3 scripts/try_moe_ws.py --json $OUT/try_moe_ws.json

Timing: each kernel's mean device time over 10 calls from the torch profiler (no launch gaps), production and
spike alike. Check: each variant's h (bf16, before quantization) against a float32 reference on 4 tiles.

Outcome on the H200 (2026-11-26, triton 3.6; docs/BENCHMARKS.md, thirty-sixth session): production 491.4 us; the
contiguous TMA layout 611.5-691.6 us without warp specialization (1679.6 at 128 pairs / 4 warps); with it NaN output
at 64 pairs, and the 128-pair forms did not finish within 300 s. Refuted; kept as the record of the attempt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_moe_decode import per_kernel_us  # noqa: E402  (mean device time per call of each MoE kernel, profiler)

E, K, D, I = 64, 6, 2048, 1408  # the 16B routed experts


@triton.jit
def _moe_up_contiguous_kernel(
    x_desc, xs_ptr, wg_desc, wu_desc, sg_ptr, su_ptr, tile_e_ptr, h_ptr,
    stride_xs, stride_se, stride_sn, stride_h,
    KB: tl.constexpr, BLOCK_T: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + tile)
    if e >= 0:
        row0 = tile * BLOCK_T
        rows = row0 + tl.arange(0, BLOCK_T)
        srow = e * stride_se + pid_n * stride_sn
        acc_g = tl.zeros((BLOCK_T, 128), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_T, 128), dtype=tl.float32)
        for kb in tl.range(0, KB, num_stages=STAGES, warp_specialize=WS):
            xv = x_desc.load([row0, kb * 128])
            wg = wg_desc.load([e, pid_n * 128, kb * 128]).reshape(128, 128)
            wu = wu_desc.load([e, pid_n * 128, kb * 128]).reshape(128, 128)
            xs = tl.load(xs_ptr + rows * stride_xs + kb)
            sg = tl.load(sg_ptr + srow + kb)
            su = tl.load(su_ptr + srow + kb)
            acc_g += tl.dot(xv, tl.trans(wg)) * (xs * sg)[:, None]
            acc_u += tl.dot(xv, tl.trans(wu)) * (xs * su)[:, None]
        g = acc_g.to(tl.bfloat16).to(tl.float32)
        u = acc_u.to(tl.bfloat16).to(tl.float32)
        hv = ((g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32) * u).to(tl.bfloat16)
        offs_c = pid_n * 128 + tl.arange(0, 128)
        tl.store(h_ptr + rows[:, None] * stride_h + offs_c[None, :], hv)


def contiguous_layout(xq, xs, idx, pad: int):
    """Token rows permuted into expert order, each expert's rows padded to a multiple of `pad`: (x [P, D] e4m3,
    scales [P, D/128], the expert of each `pad`-row tile (-1 past the end), (expert, first row, rows) per expert)."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    padded = [-(-c // pad) * pad for c in counts]
    total = sum(padded)
    xp = torch.zeros(total, D, dtype=xq.dtype, device=xq.device)
    sp = torch.ones(total, D // 128, dtype=xs.dtype, device=xq.device)
    tile_e, segs, start, src = [], [], 0, 0
    for e in range(E):
        tok = order[src:src + counts[e]] // K
        xp[start:start + counts[e]] = xq[tok]
        sp[start:start + counts[e]] = xs[tok]
        segs.append((e, start, counts[e]))
        tile_e += [e] * (padded[e] // pad)
        start += padded[e]
        src += counts[e]
    return xp, sp, torch.tensor(tile_e, dtype=torch.int32, device=xq.device), segs


def up_contiguous(xp, sp, tile_e, wg, wu, sg, su, block_t, warps, stages, ws):
    from triton.tools.tensor_descriptor import TensorDescriptor

    h = torch.empty(xp.shape[0], I, dtype=torch.bfloat16, device=xp.device)
    x_desc = TensorDescriptor.from_tensor(xp, [block_t, 128])
    wg_desc = TensorDescriptor.from_tensor(wg, [1, 128, 128])
    wu_desc = TensorDescriptor.from_tensor(wu, [1, 128, 128])
    _moe_up_contiguous_kernel[(tile_e.shape[0], I // 128)](
        x_desc, sp, wg_desc, wu_desc, sg, su, tile_e, h, sp.stride(0), sg.stride(0), sg.stride(1), h.stride(0),
        KB=D // 128, BLOCK_T=block_t, STAGES=stages, WS=ws, num_warps=warps)
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    from dsv3.kernels.fp8_blocks import quantize_weight
    from dsv3.kernels.fp8_linear import act_quant
    from dsv3.kernels.routed_experts import routed_experts_triton

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    t = opts.t
    idx = torch.stack([torch.randperm(E, device=dev, generator=g)[:K] for _ in range(t)])
    wt = torch.rand(idx.shape, device=dev, generator=g)
    x = torch.randn(t, D, device=dev, generator=g).bfloat16()
    (wg, sg), (wu, su), (wd, sd) = (quantize_weight(torch.randn(*s, device=dev, generator=g) * 0.05)
                                    for s in ((E, I, D), (E, I, D), (E, D, I)))
    flops_up = 2 * 2 * D * I * idx.numel()
    rows = []

    prod = lambda: routed_experts_triton(x, idx, wt, wg, wu, wd, sg, su, sd, grouped=True)  # noqa: E731
    us = per_kernel_us([prod])["moe_up_grouped"]
    rows.append(dict(kernel="production _moe_up_grouped_kernel (64-pair tiles, gathered rows)", us=round(us, 1),
                     tflops=round(flops_up / us / 1e6, 1)))
    print(f"{rows[-1]['kernel']}: {us:.1f} us, {flops_up / us / 1e6:.0f} TFLOP/s", flush=True)

    xq, xs = act_quant(x)
    xs = xs.contiguous()
    xp, sp, tile_e128, segs = contiguous_layout(xq, xs, idx, 128)
    ref_tiles = [segs[e] for e in (0, 17, 40, 63)]

    def reference(e, start, n):
        xd = (xp[start:start + n].float().view(n, D // 128, 128) * sp[start:start + n, :, None]).view(n, D)

        def deq(w, s):
            return (w[e].float().view(I // 128, 128, D // 128, 128) * s[e][:, None, :, None]).view(I, D)

        gg = (xd @ deq(wg, sg).T).bfloat16().float()
        uu = (xd @ deq(wu, su).T).bfloat16().float()
        return ((gg / (1 + torch.exp(-gg))).bfloat16().float() * uu).bfloat16().float()

    refs = [reference(*s) for s in ref_tiles]
    for block_t, warps, stages, ws in [(64, 4, 2, False), (64, 4, 3, False), (128, 8, 3, False), (128, 8, 4, False),
                                       (128, 4, 3, False), (64, 4, 3, True), (64, 4, 4, True), (128, 4, 3, True),
                                       (128, 8, 3, True), (128, 8, 4, True), (128, 4, 4, True)]:
        tile_e = tile_e128 if block_t == 128 else tile_e128.repeat_interleave(2)
        label = f"contiguous TMA block_t {block_t} warps {warps} stages {stages} ws {ws}"
        try:
            fn = lambda: up_contiguous(xp, sp, tile_e, wg, wu, sg, su, block_t, warps, stages, ws)  # noqa: E731
            h = fn().float()
            err = max(((h[s:s + n] - r).norm() / r.norm()).item() for (e, s, n), r in zip(ref_tiles, refs))
            us = per_kernel_us([fn])["moe_up_contiguous"]
        except Exception as exc:  # a config that does not compile or launch
            print(f"{label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            rows.append(dict(kernel=label, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            continue
        rows.append(dict(kernel=label, us=round(us, 1), tflops=round(flops_up / us / 1e6, 1), rel_err=err,
                         padded_rows=xp.shape[0]))
        print(f"{label}: {us:.1f} us, {flops_up / us / 1e6:.0f} TFLOP/s (real pairs), rel err {err:.1e}", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
