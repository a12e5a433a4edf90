"""Spike: one-token routed experts (W8A16, the batch-1 decode form) as ONE launch, the down projection split over
h's channels inside the up kernel, against today's two launches (`_moe_up_rows_kernel` + `_moe_down_rows_kernel`).

Question: at batch 1 each decode kernel pays ~2.5 us of launch, first-byte latency and tail before and after its
bytes (docs/BENCHMARKS.md, tenth session), and the experts are two such kernels per layer (16B: up 14.0 us for
46 MB, down 10.0 us for 23 MB). A program that owns C channels of h (slot s, channels c) can finish its own share
of the down projection at once: partial[s, c-block, :] = sum over its channels of h[c] * W_down[:, c], from the
down weights stored transposed ([I, D] per expert, each channel's column a contiguous row: a layout the runtime
would make at load). The partials (fp32, slots x I/C x D) are then summed in a fixed order by the kernel after it
(here a small reduce launch; in the model the combine + residual + norm kernel that already reads the pair rows),
so the result is deterministic. Prediction: ~3-4 us per MoE layer (one kernel's fixed cost), if the fused kernel
streams its 69 MB as fast as the up kernel streams its 46.

    python3 scripts/try_moe_fused_down.py --json $OUT/try_moe_fused_down.json

Shape: sweep_moe.py's `16B` (64 routed + 2 shared slots, top-6 + 2, D 2048, I 1408), its routing and weight
copies (past the L2). Timed in one CUDA graph over the copies (`dsv3.kernels.bench.graph_us`): today's op as the
model runs it (pairs, no combine) against the fused kernel + the reduce, both producing the pair rows y [8, D].
Checked against `routed_experts_pairs_reference(quant_act=False)` (float64).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_moe import ShapeBench  # noqa: E402  (the shapes, routing and weight copies of the decode sweeps)


@triton.jit
def _up_down_split_kernel(
    x_ptr, idx_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, wdt_ptr, sdt_ptr, part_ptr,
    E, stride_we, stride_wn, stride_se, stride_sn, stride_te, stride_tse, stride_tsn,
    D: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
):
    """Program (slot, channel block): h for C channels of the slot's expert (gate and up rows over the whole D, bf16
    x, W8A16), then partial[slot, block, :] = sum_c h[c] * W_down[:, c] from the transposed down weights wdt [E, I,
    D] (scales sdt [E, I/128, D/128]). C divides 128: a block's channels share one weight-scale row."""
    slot = tl.program_id(0)
    cb = tl.program_id(1)
    n_cb = tl.num_programs(1)
    e = tl.load(idx_ptr + slot)
    if (e >= 0) & (e < E):
        e64 = e.to(tl.int64)
        rows = cb * C + tl.arange(0, C)
        srow = (cb * C) // 128
        acc_g = tl.zeros((C,), dtype=tl.float32)
        acc_u = tl.zeros((C,), dtype=tl.float32)
        for k0 in range(0, D, BK):
            offs_k = k0 + tl.arange(0, BK)
            xv = tl.load(x_ptr + offs_k).to(tl.float32)
            wg = tl.load(wg_ptr + e64 * stride_we + rows[:, None] * stride_wn + offs_k[None, :]).to(tl.float32)
            wu = tl.load(wu_ptr + e64 * stride_we + rows[:, None] * stride_wn + offs_k[None, :]).to(tl.float32)
            sg = tl.load(sg_ptr + e64 * stride_se + srow * stride_sn + offs_k // 128)
            su = tl.load(su_ptr + e64 * stride_se + srow * stride_sn + offs_k // 128)
            acc_g += tl.sum(wg * (xv * sg)[None, :], axis=1)
            acc_u += tl.sum(wu * (xv * su)[None, :], axis=1)
        g = acc_g.to(tl.bfloat16).to(tl.float32)
        u = acc_u.to(tl.bfloat16).to(tl.float32)
        h = ((g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32) * u).to(tl.bfloat16).to(tl.float32)
        out = part_ptr + (slot * n_cb + cb).to(tl.int64) * D
        for d0 in range(0, D, BK):
            offs_d = d0 + tl.arange(0, BK)
            w = tl.load(wdt_ptr + e64 * stride_te + rows[:, None] * D + offs_d[None, :]).to(tl.float32)
            s = tl.load(sdt_ptr + e64 * stride_tse + srow * stride_tsn + offs_d // 128)
            tl.store(out + offs_d, tl.sum(w * h[:, None], axis=0) * s)


@triton.jit
def _reduce_kernel(part_ptr, y_ptr, n_cb, D: tl.constexpr, BD: tl.constexpr, NCB_PAD: tl.constexpr):
    """y[slot, d] = sum over the channel blocks of partial[slot, block, d] (one [blocks, BD] tile at once: every
    load in flight together), rounded to bf16."""
    slot = tl.program_id(0)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    blocks = tl.arange(0, NCB_PAD)
    tile = tl.load(part_ptr + (slot * n_cb + blocks[:, None]).to(tl.int64) * D + offs[None, :],
                   mask=(blocks < n_cb)[:, None], other=0.0)
    tl.store(y_ptr + slot * D + offs, tl.sum(tile, axis=0).to(tl.bfloat16))


def fused(x, idx, wg, wu, sg, su, wdt, sdt, c: int, bk: int, warps: int, bd: int = 64, part=None,
          stage: str = "both"):
    """stage: "both", "fused" (the up + split down kernel alone, into `part`) or "reduce" (the reduce alone)."""
    slots = idx.shape[1]
    e, i, d = wg.shape
    n_cb = i // c
    if part is None:
        part = torch.empty(slots, n_cb, d, dtype=torch.float32, device=x.device)
    y = torch.empty(slots, d, dtype=torch.bfloat16, device=x.device)
    if stage in ("both", "fused"):
        _up_down_split_kernel[(slots, n_cb)](
            x, idx, wg, wu, sg, su, wdt, sdt, part, e, wg.stride(0), wg.stride(1), sg.stride(0), sg.stride(1),
            wdt.stride(0), sdt.stride(0), sdt.stride(1), D=d, C=c, BK=bk, num_warps=warps)
    if stage in ("both", "reduce"):
        _reduce_kernel[(slots, d // bd)](part, y, n_cb, D=d, BD=bd, NCB_PAD=triton.next_power_of_2(n_cb),
                                         num_warps=4)
    return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    from dsv3.kernels import routed_experts as R
    from dsv3.kernels.bench import graph_us

    sb = ShapeBench("16B", 1, seed=1)
    idx = sb.idx.to(torch.int32).contiguous()
    x = sb.x.reshape(-1).contiguous()
    ref = R.routed_experts_pairs_reference(sb.x, sb.idx, *sb.w[0], quant_act=False).double()
    # per copy: (wg, wu, sg, su, wd^T [E, I, D], sd^T [E, I/128, D/128])
    fused_w = [(w[0], w[1], w[3], w[4], w[2].transpose(1, 2).contiguous(), w[5].transpose(1, 2).contiguous())
               for w in sb.w]

    def today(cpy):
        return R.routed_experts_triton(sb.x, sb.idx, sb.wt, *sb.w[cpy], combine=False, quant_act=False)

    def err(y):
        y = y.double().reshape(ref.shape)
        return ((y - ref).norm() / ref.norm()).item()

    variants = {"today": (today, err(today(0)))}
    for c in (16, 32, 64, 128):
        for bk in (256, 512, 1024, 2048):
            for warps in (4, 8):
                if c * bk // (32 * warps) > 256:  # weight values per thread of one tile
                    continue
                name = f"fused C {c} BK {bk} warps {warps}"

                def call(cpy, c=c, bk=bk, warps=warps):
                    return fused(x, idx, *fused_w[cpy], c=c, bk=bk, warps=warps)

                try:
                    variants[name] = (call, err(call(0)))
                except Exception as exc:  # a config that does not compile or launch
                    print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                # the two launches alone (the reduce over a fixed partials buffer: in the model it would live in
                # the next kernel)
                part = torch.zeros(idx.shape[1], sb.i // c, sb.d, device=x.device)
                for stage in ("fused", "reduce"):
                    variants[f"{name} [{stage} alone]"] = (
                        lambda cpy, c=c, bk=bk, warps=warps, stage=stage, part=part: fused(
                            x, idx, *fused_w[cpy], c=c, bk=bk, warps=warps, part=part, stage=stage), 0.0)
    rows = {}
    for name, (fn, e) in variants.items():
        if not e < 3e-2:
            print(f"{name}: rel err {e:.2e} against float64: skipped", flush=True)
            continue
        rows[name] = dict(rel_err=e, us=[])
    for _ in range(opts.rounds):
        for name in rows:
            fn = variants[name][0]
            rows[name]["us"].append(graph_us([lambda c=c, fn=fn: fn(c) for c in range(sb.copies)],
                                             reps=max(5, -(-200 // sb.copies))))
    base = statistics.median(rows["today"]["us"])
    for name, r in sorted(rows.items(), key=lambda kv: statistics.median(kv[1]["us"])):
        us = statistics.median(r["us"])
        r["median_us"] = round(us, 2)
        print(f"{name}: {us:7.2f} us ({sb.bytes / us / 1e6:.2f} TB/s over {sb.bytes / 1e6:.1f} MB), "
              f"{base / us:.3f}x today, rel err {r['rel_err']:.1e}", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
