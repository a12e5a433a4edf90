"""Time `dsv3.mla_attention_out` (flash-decoding partials merged in the W_UV kernel) against the two ops it replaces,
over its launch block (W_UV rows per program) and warps, on the GPU.

    python3 scripts/sweep_attn_out.py --json $OUT/sweep_attn_out.json      # ~1 min on an H200

Shapes: 16 query heads (16B; 671B per rank at world size 8), C 512, R 64, Dn = Dv = 128, FP8 kv_b_proj, a 4096-row
cache (the 16B bench's), batch 1 and 8, the last query at context 128 / 1024 / 4031. Each variant is first checked
against the two-op composition (relative error < 4e-3), then timed as dsv3.kernels.bench.graph_us does: C copies
of the cache (>= 256 MB together, past the L2) and C calls captured in one CUDA graph, median replay / C.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

import dsv3.kernels  # noqa: F401  (registers the ops the fused path calls on one split)
from dsv3.kernels.bench import graph_us
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
    variants = [("two_ops", None, None, None)] + [
        (f"fused_d{d}_w{nw}_s{bs}", d, nw, bs) for d, nw, bs in itertools.product([4, 8, 16, 32, 64], [2, 4, 8], [8, 16])]
    rows = []
    for b, ctx in itertools.product([1, 8], [128, 1024, 4031]):
        copies = max(2, min(32, (256 << 20) // (b * t_cap * (c + r) * 2)))
        g = torch.Generator(device=dev).manual_seed(b * 10000 + ctx)
        caches = [torch.randn(b, t_cap, c + r, device=dev, generator=g).bfloat16() for _ in range(copies)]
        q = torch.randn(b, 1, heads, c, device=dev, generator=g).bfloat16()
        qpe = torch.randn(b, 1, heads, r, device=dev, generator=g).bfloat16()
        pos = torch.full((b, 1), ctx, device=dev, dtype=torch.long)

        def two(cache):
            return mla_absorb_triton(mla_attention_triton(q, qpe, cache, pos, scale), w, ws, dn, dv, True)

        ref = two(caches[0])
        for name, block_d, nw, bs in variants:
            if block_d is None:
                fn = two
            else:
                def fn(cache, block_d=block_d, nw=nw, bs=bs):
                    return mla_attention_out_triton(q, qpe, cache, pos, scale, w, ws, dn, dv, block_d=block_d,
                                                    num_warps=nw, block_s=bs)
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
    # the op's own plan: 16 W_UV rows per program at <= ATTN_OUT_ROWS_SMALL_M query rows, 64 above; 4 warps; 16
    # splits per merge step
    default = [x for x in rows if x["variant"] == f"fused_d{16 if x['b'] <= 4 else 64}_w4_s16"]
    print("default (d16 at batch <= 4, else d64; 4 warps, 16 splits per step): "
          + ", ".join(f"b{x['b']} ctx{x['ctx']} {x.get('us')}" for x in default))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
