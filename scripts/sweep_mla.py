"""Sweep the decode launch plan of `dsv3.mla_attention` (flash-decoding over the latent cache) on the GPU.

    python3 scripts/sweep_mla.py --json $OUT/sweep_mla.json      # ~1-2 min on an H200

Shapes: 16 query heads (16B; also 671B per rank at world size 8), batch 1 and 8, context 128 .. 8192 (filled up to
the position, in a 8192-row cache). Plans: the default (`mla_plan`) and every (min_chunk, block_t, num_warps) of a
small grid. Each plan is first checked against `mla_attention_reference` (max abs error < 2e-2 on O(1) outputs),
then timed: C copies of the cache (>= 256 MB together, past the L2), the C calls captured in one CUDA graph, median
replay / C (dsv3.kernels.bench.graph_us). Bytes: the cache rows each sequence reads up to its position.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from dsv3.kernels.bench import graph_us
from dsv3.kernels.mla_attention import mla_attention_reference, mla_attention_triton, mla_plan
from dsv3.kernels._launch import num_sms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    dev = torch.device("cuda")
    heads, c, r, t_cap = 16, 512, 64, 8192
    scale = 0.1
    grid = list(itertools.product([32, 64, 128, 256], [32, 64], [4, 8]))
    rows = []
    for b, ctx in itertools.product([1, 8], [128, 512, 2048, 8191]):
        copies = max(2, min(32, (256 << 20) // (b * t_cap * (c + r) * 2)))
        g = torch.Generator(device=dev).manual_seed(b * 10000 + ctx)
        caches = [torch.randn(b, t_cap, c + r, device=dev, generator=g).bfloat16() for _ in range(copies)]
        q = torch.randn(b, 1, heads, c, device=dev, generator=g).bfloat16()
        qpe = torch.randn(b, 1, heads, r, device=dev, generator=g).bfloat16()
        pos = torch.full((b, 1), ctx - 1, device=dev, dtype=torch.long)
        ref = mla_attention_reference(q, qpe, caches[0], pos, scale).float()
        nbytes = b * ctx * (c + r) * 2
        default = mla_plan(b, 1, heads, t_cap, c, num_sms(dev))
        plans = [("default", {})] + [(f"mc{mc}_bt{bt}_w{w}", dict(min_chunk=mc, block_t=bt, num_warps=w))
                                      for mc, bt, w in grid if mc >= bt]
        for name, kw in plans:
            try:
                out = mla_attention_triton(q, qpe, caches[0], pos, scale, **kw).float()
                err = (out - ref).abs().max().item()
                if not err < 2e-2:
                    rows.append({"b": b, "ctx": ctx, "plan": name, "error": f"max abs err {err:.3g}"})
                    continue
                us = graph_us([lambda cc=cc: mla_attention_triton(q, qpe, cc, pos, scale, **kw) for cc in caches])
            except Exception as e:  # a config that does not compile or launch (shared memory, registers)
                rows.append({"b": b, "ctx": ctx, "plan": name, "error": str(e).splitlines()[0][:160]})
                continue
            rows.append({"b": b, "ctx": ctx, "plan": name, "us": round(us, 2), "tb_s": round(nbytes / us / 1e6, 3),
                         "max_abs_err": err})
        ok = [x for x in rows if x["b"] == b and x["ctx"] == ctx and "us" in x]
        best = min(ok, key=lambda x: x["us"])
        dflt = next(x for x in ok if x["plan"] == "default")
        print(f"b={b} ctx={ctx:5d}: default {dflt['us']:7.2f} us (plan {default[1]=}, splits {default[4]}, "
              f"min_chunk {default[5]}) | best {best['plan']} {best['us']:7.2f} us ({best['tb_s']} TB/s)", flush=True)
        for x in sorted(ok, key=lambda x: x["us"])[:4]:
            print(f"    {x['plan']:16s} {x['us']:7.2f} us", flush=True)
        del caches
    bad = [x for x in rows if "error" in x]
    print(f"{len(rows)} measurements, {len(bad)} configs failed or mismatched", flush=True)
    for x in bad[:10]:
        print("   ", x, flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
