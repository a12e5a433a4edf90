"""MLA prep ops side by side on the GPU: `dsv3.mla_decode_prep` of this tree against another version of
kernels/mla_decode_prep.py, and `dsv3.mla_prefill_prep`'s kernel against the composition it replaced.

    git show REF:kernels/mla_decode_prep.py > ab_old/mla_decode_prep.py    # on the development machine
    python3 scripts/ab_prep.py --old ab_old/mla_decode_prep.py [--rounds 5] [--json out.json]

16B shapes (16 heads, Dn 128, R 64, Dv 128, C 512, FP8 kv_b_proj, a 4096-row cache; --prefill-heads for the prefill
cases, e.g. 16,64,128: one rank of 671B at tensor parallel 8, 2, 1). Decode: batch 1 and 8, one
token each, old vs new module (outputs and cache compared bitwise). Prefill: one 4095-token chunk into cache row 1:
the reference composition compiled by Inductor (what the prefill graph ran before the op: q rope, kv norm, latent
cat, cache write) against the op's kernel at 1, 2, 4 and 8 warps (outputs within one bf16 ulp of the composition's).
Timing: `dsv3.kernels.bench.graph_us` (3 calls per CUDA graph), interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_grouped_moe import load_old, timed_old_new  # noqa: E402


def inputs(b: int, s: int, seed: int, dev: torch.device, h: int = 16):
    from dsv3.kernels.fp8_blocks import quantize_weight

    g = torch.Generator(device=dev).manual_seed(seed)
    dn, r, dv, c, t = 128, 64, 128, 512, 4096
    proj = torch.randn(b, s, h * (dn + r) + c + r, device=dev, generator=g).bfloat16()
    q = proj[..., :h * (dn + r)].view(b, s, h, dn + r)
    kv_a = proj[..., h * (dn + r):]
    norm_w = (1 + 0.1 * torch.randn(c, device=dev, generator=g)).bfloat16()
    pos = (torch.arange(s, device=dev) + (t - s) // 2)[None].expand(b, s).contiguous()
    ang = torch.rand(b, s, r // 2, device=dev, generator=g) * 6.0
    cache = torch.randn(max(b, 2), t, c + r, device=dev, generator=g).bfloat16()
    w, ws = quantize_weight(torch.randn(h * (dn + dv), c, device=dev, generator=g) * 0.1)
    return dict(q=q, kv_a=kv_a, norm_w=norm_w, cos=ang.cos(), sin=ang.sin(), cache=cache, pos=pos, w=w, ws=ws,
                eps=1e-6, dn=dn, dv=dv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="a copy of kernels/mla_decode_prep.py to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--prefill-heads", default="16", help="comma-separated query heads of the prefill cases")
    opts = ap.parse_args()
    from dsv3.kernels import mla_decode_prep as new
    from dsv3.kernels.bench import graph_us

    old = load_old(opts.old, "mla_decode_prep")
    dev = torch.device("cuda")
    rows = []
    for b in (1, 8):
        a = inputs(b, 1, b, dev)
        caches = {k: a["cache"].clone() for k in ("old", "new")}

        def args(k):
            return (a["q"], a["kv_a"], a["norm_w"], a["cos"], a["sin"], caches[k], a["pos"], a["w"], a["ws"],
                    a["eps"], a["dn"], a["dv"])

        calls = {k: (lambda k=k, m=m: m.mla_decode_prep_triton(*args(k))) for k, m in (("old", old), ("new", new))}
        outs = {k: c() for k, c in calls.items()}
        same = all(torch.equal(x, y) for x, y in zip(outs["old"], outs["new"])) and torch.equal(*caches.values())
        row = dict(op="mla_decode_prep", batch=b, bitwise_equal=same, **timed_old_new(calls, opts.rounds, 0.0))
        rows.append(row)
        print(f"decode prep batch {b}: old {row['old']['us']} us, new {row['new']['us']} us ({row['speedup']}x); "
              f"outputs and cache bitwise equal: {same}", flush=True)

    for heads in (int(v) for v in opts.prefill_heads.split(",")):
        rows.append(prefill_case(new, graph_us, dev, heads, opts.rounds))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


def prefill_case(new, graph_us, dev: torch.device, heads: int, rounds: int) -> dict:
    a = inputs(1, 4095, 7, dev, heads)
    cache_rows = torch.tensor([1], device=dev)
    composition = torch.compile(new.mla_prefill_prep_reference, fullgraph=True, dynamic=False)
    caches = {}

    def prefill_call(name, warps=None):
        caches.setdefault(name, a["cache"].clone())
        args = (a["q"], a["kv_a"], a["norm_w"], a["cos"], a["sin"], caches[name], a["pos"], cache_rows, a["eps"],
                a["dn"])
        if warps is None:
            return lambda: composition(*args)
        return lambda: new.mla_prefill_prep_triton(*args, num_warps=warps)

    calls = {"composition (Inductor)": prefill_call("ref")}
    calls.update({f"kernel, {w} warps": prefill_call(f"w{w}", w) for w in (1, 2, 4, 8)})
    ref_pe, ref_lat = calls["composition (Inductor)"]()
    errs = {}
    for k, c in calls.items():
        pe, lat = c()
        ulp = ((lat.float() - ref_lat.float()).abs() / ref_lat.float().abs().clamp_min(1e-30)).max().item()
        errs[k] = dict(q_pe_equal=torch.equal(pe, ref_pe), latent_max_rel=ulp)
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, c in calls.items():
            times[k].append(graph_us([c] * 3))
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(f"prefill prep, 4095 tokens, {heads} heads: " + ", ".join(f"{k} {v} us" for k, v in med.items()),
          flush=True)
    print("  checks against the composition: " + "; ".join(
        f"{k}: q_pe equal {e['q_pe_equal']}, latent max rel {e['latent_max_rel']:.1e}" for k, e in errs.items()))
    return dict(op="mla_prefill_prep", tokens=4095, heads=heads, us=med, checks=errs)


if __name__ == "__main__":
    main()
