"""Row-parallel one-token kernels (the GEMV variant 'rows', and an MoE prototype) against the serial-K ones, on the GPU.

    python3 scripts/bench_rows.py [--json PATH]

GEMV at M=1 on the 16B and 671B-tp8 weight shapes: `fp8_gemv` with the split-K default ('splitk', GEMV_DEFAULT) vs
the 'rows' / 'rows_prequant' variants over a grid of (block_n, num_warps). MoE at T=1 (16B: 6 routed +
2 stacked shared experts; 671B-ep8 rank: 1 local id + 7 ids of other ranks): `routed_experts_triton` vs `moe_rows`
(coordinate search: the up kernel's config, then the down kernel's). Every config is checked against the
reference first (relative error); timing as scripts/sweep_moe.py: C weight copies (>= 256 MB, several times the L2)
called back to back in one CUDA graph, median replay / C.

The MoE part: `routed_experts_triton` (today's plan) vs the row-parallel pipeline at one token: x quantized,
`routed_experts._moe_up_rows_kernel` (the op launches it at T = 1 since fa463f8), h quantized, then this script's
own `_moe_down_rows_kernel` (grid cdiv(D, BLOCK_N): each program owns BLOCK_N output channels and walks all K slots,
rounds each expert's output to x.dtype and adds it times topk_weight[0, k] in fp32: the combine fused, no [K, D]
buffer). H200, 2026-11-23: that down kernel 12.8 us vs the op's down + combine 9.5 + 2.2 us on 16B, 31.5 us on the
671B-ep8 rank (its static loop over 8 slots, 7 of them another rank's): not adopted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from dsv3.kernels._launch import cdiv, next_pow2
from dsv3.kernels.bench import graph_us
from dsv3.kernels.fp8_blocks import quantize_weight
from dsv3.kernels.fp8_linear import act_quant, dot_rows, fp8_gemv, fp8_linear_reference, k_blocks
from dsv3.kernels.routed_experts import _moe_up_rows_kernel, routed_experts_reference, routed_experts_triton

PEAK = 4.27e12
GEMV_SHAPES = {  # name: (N, K)
    "16B qkv_a": (3648, 2048), "16B o_proj": (2048, 2048), "16B dense.down": (2048, 10944),
    "671B-tp8 qkv_a": (2112, 7168), "671B-tp8 q_b": (3072, 1536), "671B-tp8 o_proj": (7168, 2048),
    "671B-tp8 shared.down": (7168, 256),
}
MOE_SHAPES = {
    "16B": dict(e=66, d=2048, i=1408, ids=lambda g: torch.cat([torch.randperm(64, generator=g)[:6],
                                                               torch.tensor([64, 65])])),
    "671B-ep8": dict(e=32, d=7168, i=2048, ids=lambda g: torch.cat([torch.randint(0, 32, (1,), generator=g),
                                                                    torch.full((7,), 1000)])),
}


@triton.jit
def _moe_down_rows_kernel(
    hq_ptr, hs_ptr, idx_ptr, wt_ptr, wd_ptr, sd_ptr, out_ptr,
    E, I, D, stride_hq, stride_hs, stride_we, stride_wn, stride_se, stride_sn,
    N_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, KB_PAD: tl.constexpr,
):
    """hq/hs: h quantized per slot (act_quant of [K, I]); out [D] in the activation dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    offs_b, offs_k, k_mask, kb_mask = k_blocks(I, KB_PAD)
    odt = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for slot in tl.static_range(N_SLOTS):
        e = tl.load(idx_ptr + slot)
        valid = (e >= 0) & (e < E)
        e64 = tl.where(valid, e, 0).to(tl.int64)
        wgt = tl.load(wt_ptr + slot)
        # an id outside [0, E) (another rank's expert) reads nothing: the masks carry `valid` per element
        ok_n = n_mask & ((offs_n * 0 + e) >= 0) & ((offs_n * 0 + e) < E)
        ok_b = kb_mask & ((offs_b * 0 + e) >= 0) & ((offs_b * 0 + e) < E)
        w = tl.load(wd_ptr + e64 * stride_we + offs_n[:, None, None] * stride_wn + offs_k[None, :, :],
                    mask=ok_n[:, None, None] & k_mask[None, :, :], other=0.0).to(tl.float32)
        sd = tl.load(sd_ptr + e64 * stride_se + (offs_n // 128)[:, None] * stride_sn + offs_b[None, :],
                     mask=ok_n[:, None] & ok_b[None, :], other=0.0)
        hq = tl.load(hq_ptr + slot * stride_hq + offs_k, mask=k_mask & ok_b[:, None], other=0.0).to(tl.float32)
        hs = tl.load(hs_ptr + slot * stride_hs + offs_b, mask=ok_b, other=0.0)
        y = dot_rows(w, sd, hq, hs).to(odt).to(tl.float32)  # the reference rounds each expert's output
        acc += tl.where(valid, y * wgt, 0.0)
    tl.store(out_ptr + offs_n, acc.to(odt), mask=n_mask)


def _kb_pad(k: int) -> int:
    return max(1, next_pow2(cdiv(k, 128)))


def moe_rows(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
             gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
             gate_scale_inv: torch.Tensor, up_scale_inv: torch.Tensor, down_scale_inv: torch.Tensor,
             up_block_n: int = 2, up_num_warps: int = 4, down_block_n: int = 2, down_num_warps: int = 4,
             ) -> torch.Tensor:
    """`routed_experts` for one token ([1, D]) with FP8 weights: 4 launches (x quantization, up, h quantization,
    down with the combine)."""
    t, d = x.shape
    assert t == 1
    k = topk_idx.shape[1]
    e, i, _ = gate_proj.shape
    idx = topk_idx.contiguous()
    wt = topk_weight.contiguous().float()
    xq, xs = act_quant(x)
    h = torch.empty((k, i), dtype=x.dtype, device=x.device)
    sg = gate_scale_inv
    wrap_triton(_moe_up_rows_kernel)[(k, cdiv(i, up_block_n))](
        xq, xs, idx, gate_proj, up_proj, sg, up_scale_inv, h,
        e, i, d, gate_proj.stride(0), gate_proj.stride(1), sg.stride(0), sg.stride(1), h.stride(0),
        BLOCK_N=up_block_n, KB_PAD=_kb_pad(d), num_warps=up_num_warps,
    )
    hq, hs = act_quant(h)
    out = torch.empty_like(x)
    sd = down_scale_inv
    wrap_triton(_moe_down_rows_kernel)[(cdiv(d, down_block_n),)](
        hq, hs, idx, wt, down_proj, sd, out,
        e, i, d, hq.stride(0), hs.stride(0), down_proj.stride(0), down_proj.stride(1), sd.stride(0), sd.stride(1),
        N_SLOTS=k, BLOCK_N=down_block_n, KB_PAD=_kb_pad(i), num_warps=down_num_warps,
    )
    return out


def gemv_rows(x, w, s, block_n, num_warps, quant_x):
    return fp8_gemv(x, w, s, torch.bfloat16, variant="rows" if quant_x else "rows_prequant", block_n=block_n,
                    num_warps=num_warps, num_stages=1)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def rand_fp8(shape, gen):
    w = torch.randn(*shape, generator=gen) * 0.05
    if len(shape) == 2:
        return [t.cuda() for t in quantize_weight(w)]
    ws, ss = zip(*(quantize_weight(w[j]) for j in range(shape[0])))
    return [torch.stack(ws).cuda(), torch.stack(ss).cuda()]


def timed(fn_of_copy, copies):
    return graph_us([lambda c=c: fn_of_copy(c) for c in range(copies)], reps=max(5, math.ceil(200 / copies)))


def bench_gemv(results):
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in GEMV_SHAPES.items():
        w0, s0 = rand_fp8((n, k), gen)
        nbytes = n * k + s0.numel() * 4
        copies = int(max(2, min(64, math.ceil(256e6 / nbytes))))
        ws = [(w0, s0)] + [(w0.clone(), s0.clone()) for _ in range(copies - 1)]
        x = torch.randn(1, k, generator=gen).bfloat16().cuda()
        ref = fp8_linear_reference(x, w0, s0)
        base = timed(lambda c: fp8_gemv(x, ws[c][0], ws[c][1], torch.bfloat16, variant="splitk"), copies)
        rows = []
        kb_pad = 1 << max(0, math.ceil(math.log2(math.ceil(k / 128))))
        for bn in (1, 2, 4, 8):
            for warps in (2, 4, 8):
                if bn * kb_pad * 128 > 256 * warps * 32:  # > 256 fp32 weight values per thread: spills
                    continue
                for qx in (True, False):
                    try:
                        y = gemv_rows(x, w0, s0, bn, warps, qx)
                        err = rel(y, ref)
                        if err > 2e-2:
                            rows.append(dict(bn=bn, warps=warps, quant_x=qx, error=f"rel err {err:.2e}"))
                            continue
                        us = timed(lambda c: gemv_rows(x, ws[c][0], ws[c][1], bn, warps, qx), copies)
                        rows.append(dict(bn=bn, warps=warps, quant_x=qx, us=us, err=err))
                    except Exception as e:  # noqa: BLE001
                        rows.append(dict(bn=bn, warps=warps, quant_x=qx, error=repr(e)[:200]))
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        best = ok[0]
        print(f"{name:22s} {nbytes / 1e6:6.2f} MB  split-K {base:6.2f} us ({nbytes / base / 1e6:5.2f} TB/s)  rows best "
              f"{best['us']:6.2f} us ({nbytes / best['us'] / 1e6:5.2f} TB/s, {base / best['us']:.2f}x) bn={best['bn']} "
              f"warps={best['warps']} quant_x={best['quant_x']}; next: "
              + ", ".join(f"{r['bn']}/{r['warps']}/{'q' if r['quant_x'] else 'p'} {r['us']:.2f}" for r in ok[1:5]),
              flush=True)
        bad = [r for r in rows if "error" in r]
        if bad:
            print(f"  {len(bad)} configs failed, e.g. {bad[0]}")
        results["gemv"][name] = dict(n=n, k=k, bytes=nbytes, today_us=base, rows=rows)


def bench_moe(results):
    gen = torch.Generator().manual_seed(1)
    for name, sh in MOE_SHAPES.items():
        e, d, i = sh["e"], sh["d"], sh["i"]
        gw = rand_fp8((e, i, d), gen)
        uw = rand_fp8((e, i, d), gen)
        dw = rand_fp8((e, d, i), gen)
        ids = sh["ids"](gen).view(1, -1).cuda()
        wt = torch.rand(ids.shape, generator=gen).cuda()
        x = torch.randn(1, d, generator=gen).bfloat16().cuda()
        n_read = int(((ids >= 0) & (ids < e)).sum())
        nbytes = n_read * 3 * i * d
        copies = int(max(2, min(16, math.ceil(256e6 / (e * 3 * i * d)))))
        wsets = [(gw, uw, dw)] + [tuple([t.clone() for t in m] for m in (gw, uw, dw)) for _ in range(copies - 1)]
        ref = routed_experts_reference(x, ids, wt, gw[0], uw[0], dw[0], gw[1], uw[1], dw[1])

        def today(c):
            g, u, dd = wsets[c]
            return routed_experts_triton(x, ids, wt, g[0], u[0], dd[0], g[1], u[1], dd[1])

        def new(c, **kw):
            g, u, dd = wsets[c]
            return moe_rows(x, ids, wt, g[0], u[0], dd[0], g[1], u[1], dd[1], **kw)

        base = timed(today, copies)
        base_err = rel(today(0), ref)
        rows = []

        def run(kw):
            try:
                err = rel(new(0, **kw), ref)
                if err > 3e-2:
                    rows.append(dict(kw, error=f"rel err {err:.2e}"))
                    return None
                us = timed(lambda c: new(c, **kw), copies)
                rows.append(dict(kw, us=us, err=err))
                return us
            except Exception as ex:  # noqa: BLE001
                rows.append(dict(kw, error=repr(ex)[:200]))
                return None

        cfg = dict(up_block_n=2, up_num_warps=4, down_block_n=2, down_num_warps=4)
        for key, vals in (("up", [(bn, w) for bn in (1, 2, 4) for w in (2, 4, 8)]),
                          ("down", [(bn, w) for bn in (1, 2, 4, 8) for w in (2, 4, 8)])):
            best = (None, None)
            for v in vals:
                kw = dict(cfg)
                kw[f"{key}_block_n"], kw[f"{key}_num_warps"] = v
                us = run(kw)
                if us is not None and (best[0] is None or us < best[0]):
                    best = (us, kw)
            if best[1] is not None:
                cfg = best[1]
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        b = ok[0]
        print(f"MoE {name} T=1: {nbytes / 1e6:.1f} MB  today {base:.2f} us ({nbytes / base / 1e6:.2f} TB/s, err "
              f"{base_err:.1e})  rows best {b['us']:.2f} us ({nbytes / b['us'] / 1e6:.2f} TB/s, {base / b['us']:.2f}x, "
              f"err {b['err']:.1e}) {({k: v for k, v in b.items() if k not in ('us', 'err')})}", flush=True)
        bad = [r for r in rows if "error" in r]
        if bad:
            print(f"  {len(bad)} configs failed, e.g. {bad[0]}")
        # per-kernel split of the best config (profiler, eager over the copies)
        from torch.profiler import ProfilerActivity, profile
        kw = {k: v for k, v in b.items() if k not in ("us", "err")}
        for c in range(copies):
            new(c, **kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for c in range(copies):
                new(c, **kw)
            torch.cuda.synchronize()
        per = {}
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" or getattr(ev, "device_time_total", 0):
                per[ev.key[:40]] = round(getattr(ev, "device_time_total", 0) / copies, 2)
        print("  kernels (us per call):", {k: v for k, v in per.items() if v > 0})
        results["moe"][name] = dict(bytes=nbytes, today_us=base, today_err=base_err, rows=rows, kernels=per)


def bench_absorb(results):
    """mla_absorb at M = 1 on the 16B / 671B-tp8 rank shape (16 heads, Dn = Dv = 128, C = 512, FP8 kv_b_proj):
    the MMA kernels vs the CUDA-core ones over (output channels per program, warps)."""
    from dsv3.kernels import mla_absorb as AB
    gen = torch.Generator().manual_seed(2)
    h, dn, dv, c = 16, 128, 128, 512
    w0, s0 = rand_fp8((h * (dn + dv), c), gen)
    copies = 64
    ws = [(w0, s0)] + [(w0.clone(), s0.clone()) for _ in range(copies - 1)]
    for output in (False, True):
        x = torch.randn(1, 1, h, c if output else dn, generator=gen).bfloat16().cuda()
        ref = AB.mla_absorb_reference(x.double(), w0, s0, dn, dv, output)
        run = lambda cc, **kw: AB.mla_absorb_triton(x, ws[cc][0], ws[cc][1], dn, dv, output, **kw)  # noqa: E731
        mma = timed(lambda cc: run(cc, rows=False), copies)
        rows = []
        for rb in ((8, 16, 32, 64) if not output else (2, 4, 8, 16)):
            for nw in (1, 2, 4, 8):
                try:
                    err = rel(run(0, rows=True, rows_block=rb, rows_warps=nw), ref)
                    if err > 6e-3:
                        rows.append(dict(block=rb, warps=nw, error=f"rel err {err:.2e}"))
                        continue
                    rows.append(dict(block=rb, warps=nw, err=err,
                                     us=timed(lambda cc: run(cc, rows=True, rows_block=rb, rows_warps=nw), copies)))
                except Exception as ex:  # noqa: BLE001
                    rows.append(dict(block=rb, warps=nw, error=repr(ex)[:200]))
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        name = "absorb_o" if output else "absorb_q"
        print(f"{name} M=1 H=16: MMA {mma:.2f} us; rows best {ok[0]['us']:.2f} us ({mma / ok[0]['us']:.2f}x) "
              f"block={ok[0]['block']} warps={ok[0]['warps']}; next: "
              + ", ".join(f"{r['block']}/{r['warps']} {r['us']:.2f}" for r in ok[1:6]), flush=True)
        results.setdefault("absorb", {})[name] = dict(mma_us=mma, rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--only", choices=("gemv", "moe", "absorb"))
    args = ap.parse_args()
    results = dict(gemv={}, moe={}, device=torch.cuda.get_device_name())
    if args.only in (None, "gemv"):
        bench_gemv(results)
    if args.only in (None, "moe"):
        bench_moe(results)
    if args.only in (None, "absorb"):
        bench_absorb(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
