"""Row-parallel decode kernels (dsv3.kernels.rows) against the kernels the model launches today, on the GPU.

    python3 scripts/bench_rows.py [--json PATH]

GEMV at M=1 on the 16B and 671B-tp8 weight shapes: `fp8_gemv` as the model calls it (GEMV_TUNED's variant) vs
`gemv_rows` over a grid of (block_n, num_warps, x quantized in-kernel or by act_quant). MoE at T=1 (16B: 6 routed +
2 stacked shared experts; 671B-ep8 rank: 1 local id + 7 ids of other ranks): `routed_experts_triton` vs `moe_rows`
(coordinate search: the up kernel's config, then the down kernel's). Every config is checked against the
reference first (relative error); timing as scripts/sweep_moe.py: C weight copies (>= 256 MB, several times the L2)
called back to back in one CUDA graph, median replay / C.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from dsv3.kernels.bench import graph_us
from dsv3.kernels.fp8_blocks import quantize_weight
from dsv3.kernels.fp8_linear import fp8_gemv, fp8_linear_reference
from dsv3.kernels.routed_experts import routed_experts_reference, routed_experts_triton
from dsv3.kernels.rows import gemv_rows, moe_rows

PEAK = 4.27e12
GEMV_SHAPES = {  # name: (N, K)
    "16B qkv_a": (3648, 2048), "16B o_proj": (2048, 2048), "16B dense.down": (2048, 10944),
    "671B-tp8 qkv_a": (2112, 7168), "671B-tp8 q_b": (3072, 1536), "671B-tp8 o_proj": (7168, 2048),
    "671B-tp8 shared.down": (7168, 256),
}
MOE_SHAPES = {
    "16B": dict(e=66, d=2048, i=1408, ids=lambda g: torch.cat([torch.randperm(64, generator=g)[:6], torch.tensor([64, 65])])),
    "671B-ep8": dict(e=32, d=7168, i=2048, ids=lambda g: torch.cat([torch.randint(0, 32, (1,), generator=g),
                                                                    torch.full((7,), 1000)])),
}


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
        base = timed(lambda c: fp8_gemv(x, ws[c][0], ws[c][1], torch.bfloat16), copies)
        rows = []
        kb_pad = 1 << max(0, math.ceil(math.log2(math.ceil(k / 128))))
        for bn in (1, 2, 4, 8):
            for warps in (2, 4, 8):
                if bn * kb_pad * 128 > 256 * warps * 32:  # > 256 fp32 weight values per thread: spills
                    continue
                for qx in (True, False):
                    try:
                        y = gemv_rows(x, w0, s0, torch.bfloat16, block_n=bn, num_warps=warps, quant_x=qx)
                        err = rel(y, ref)
                        if err > 2e-2:
                            rows.append(dict(bn=bn, warps=warps, quant_x=qx, error=f"rel err {err:.2e}"))
                            continue
                        us = timed(lambda c: gemv_rows(x, ws[c][0], ws[c][1], torch.bfloat16, block_n=bn,
                                                       num_warps=warps, quant_x=qx), copies)
                        rows.append(dict(bn=bn, warps=warps, quant_x=qx, us=us, err=err))
                    except Exception as e:  # noqa: BLE001
                        rows.append(dict(bn=bn, warps=warps, quant_x=qx, error=repr(e)[:200]))
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        best = ok[0]
        print(f"{name:22s} {nbytes / 1e6:6.2f} MB  today {base:6.2f} us ({nbytes / base / 1e6:5.2f} TB/s)  rows best "
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

        cfg = dict(up_block_n=2, up_num_warps=4, down_block_n=2, down_num_warps=4, quant_x=False)
        for key, vals in (("up", [(bn, w) for bn in (1, 2, 4) for w in (2, 4, 8)]),
                          ("down", [(bn, w) for bn in (1, 2, 4, 8) for w in (2, 4, 8)]),
                          ("quant_x", [(True,), (False,)])):
            best = (None, None)
            for v in vals:
                kw = dict(cfg)
                if key == "quant_x":
                    kw["quant_x"] = v[0]
                else:
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--only", choices=("gemv", "moe"))
    args = ap.parse_args()
    results = dict(gemv={}, moe={}, device=torch.cuda.get_device_name())
    if args.only != "moe":
        bench_gemv(results)
    if args.only != "gemv":
        bench_moe(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
