"""Time `dsv3.mla_attention_out` (flash-decoding partials merged in the W_UV kernel) against the two ops it replaces,
over its launch block (W_UV rows per program) and warps, on the GPU.

    python3 scripts/sweep_attn_out.py --json $OUT/sweep_attn_out.json      # ~1 min on an H200

Shapes: 16 query heads (16B; 671B per rank at world size 8), C 512, R 64, Dn = Dv = 128, FP8 kv_b_proj, a 4096-row
cache (the 16B bench's), batch 1 and 8 with the last query at context 128 / 1024 / 2048 / 4031, batch 32 at 128 / 4031.
Variants: the op as the model calls it, the two ops, the fused kernel (`mla_attention_out_triton`) at 16 / 32 / 64
W_UV rows per program, each with fp32 and bf16 partials. (Timed here before: other warps and merge steps, fewer
attention splits; a chained kernel, branch experiment/mla-chained; a one-pass path, branch experiment/mla-one-pass.)
Each variant is first checked against the two-op composition (relative error < 4e-3), then timed as
dsv3.kernels.bench.graph_us does: C copies of the cache (>= 256 MB together, past the L2) and C calls captured in one
CUDA graph, median replay / C.
"""

from __future__ import annotations

import argparse

import torch

import dsv3.kernels  # noqa: F401  (registers the ops the fused path calls on one split)
from dsv3.kernels.bench import graph_us, save_json
from dsv3.kernels.fp8_blocks import quantize_weight
from dsv3.kernels.mla_absorb import mla_absorb_triton
from dsv3.kernels.mla_attention import mla_attention_triton
from dsv3.kernels.mla_attention_out import mla_attention_out_triton


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    dev = torch.device("cuda")
    heads, c, r, dn, dv, t_cap, scale = 16, 512, 64, 128, 128, 4096, 0.1
    w, ws = quantize_weight(torch.randn(heads * (dn + dv), c) * 0.05)
    w, ws = w.to(dev), ws.to(dev)
    # (name, kind, launch fields): the op as the model calls it (its own choice), the two ops, the fused kernel at the
    # blocks the op picks (16 W_UV rows per program at batch 1, 64 at batch 8; 4 warps) and at 32, each with fp32 and
    # with bf16 partials (mla_partials / DSV3_MLA_PARTIALS: half the bytes the split kernel stores and each W_UV
    # program re-merges). Earlier sweeps here: other warps and merge steps, fewer attention splits (slower), a chained
    # kernel (branch experiment/mla-chained), a one-pass short-context path (branch experiment/mla-one-pass).
    variants = [("op", "op", {}), ("two_ops", "two", {}), ("two_ops_bf16part", "two_bf16", {})]
    variants += [(f"fused_d{d}_w4{tag}", "fused", dict(block_d=d, num_warps=4, partial_dtype=dt))
                 for d in (16, 32, 64) for tag, dt in (("", torch.float32), ("_bf16part", torch.bfloat16))]
    rows = []
    for b, ctx in [(b, ctx) for b in (1, 8) for ctx in (128, 1024, 2048, 4031)] + [(32, 128), (32, 4031)]:
        copies = max(2, min(32, (256 << 20) // (b * t_cap * (c + r) * 2)))
        g = torch.Generator(device=dev).manual_seed(b * 10000 + ctx)
        caches = [torch.randn(b, t_cap, c + r, device=dev, generator=g).bfloat16() for _ in range(copies)]
        q = torch.randn(b, 1, heads, c, device=dev, generator=g).bfloat16()
        qpe = torch.randn(b, 1, heads, r, device=dev, generator=g).bfloat16()
        pos = torch.full((b, 1), ctx, device=dev, dtype=torch.long)

        def two(cache):
            return mla_absorb_triton(mla_attention_triton(q, qpe, cache, pos, scale), w, ws, dn, dv, True)

        ref = two(caches[0])
        for name, kind, kw in variants:
            if kind == "fused" and b > 8:  # above ATTN_OUT_FUSED_MAX_M the op runs the two ops (measured)
                continue
            if kind == "op":
                def fn(cache):
                    return torch.ops.dsv3.mla_attention_out(q, qpe, cache, pos, scale, w, ws, dn, dv)
            elif kind == "two":
                fn = two
            elif kind == "two_bf16":
                def fn(cache):
                    o = mla_attention_triton(q, qpe, cache, pos, scale, partial_dtype=torch.bfloat16)
                    return mla_absorb_triton(o, w, ws, dn, dv, True)
            else:
                def fn(cache, kw=kw):
                    return mla_attention_out_triton(q, qpe, cache, pos, scale, w, ws, dn, dv, **kw)
            try:
                err = rel(fn(caches[0]), ref)
                if not err < 4e-3:
                    rows.append({"b": b, "ctx": ctx, "variant": name, "error": f"rel err {err:.3g}"})
                    continue
                us = graph_us([lambda cc=cc: fn(cc) for cc in caches])
            except Exception as e:  # a config that does not compile or launch
                rows.append({"b": b, "ctx": ctx, "variant": name, "error": str(e).splitlines()[0][:160]})
                continue
            rows.append({"b": b, "ctx": ctx, "variant": name, "us": round(us, 2), "rel_err": err})
        ok = [x for x in rows if x["b"] == b and x["ctx"] == ctx and "us" in x]
        base = next((x["us"] for x in ok if x["variant"] == "two_ops"), None)
        best = sorted(ok, key=lambda x: x["us"])[:4]
        print(f"b={b} ctx={ctx}: two ops {base} us; best " +
              ", ".join(f"{x['variant']} {x['us']}" for x in best), flush=True)
    for x in rows:
        if "error" in x:
            print(f"  b={x['b']} ctx={x['ctx']} {x['variant']}: {x['error']}")
    print("op (the model's choice): " + ", ".join(f"b{x['b']} ctx{x['ctx']} {x.get('us')}" for x in rows
                                                  if x["variant"] == "op"))
    if opts.json:
        save_json(opts.json, rows)


if __name__ == "__main__":
    main()
