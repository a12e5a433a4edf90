"""Pipeline depth of the MLA decode kernel: key block size, stages, warps at a fixed split count (GPU, issues 3 and 6).

The sm_90 code of `_mla_fwd_kernel` (triton 3.6, compiled on the CPU) keeps one kv buffer at num_stages = 2: the
next key block's load starts only after the step's math. The first run of this script (2026-11-24) timed early
loads of q / k_pe (branch experiment/mla-early-loads: no faster) and a grid of (block_t, min_chunk, num_stages,
num_warps) with the plan's split count rule: 64-row blocks in 3 stages were best wherever a split has several key
blocks, now `mla_plan`'s default ('deep'; DSV3_MLA_DEPTH=shallow gives the plan of before). The second run added
32- / 64-row blocks at the plan's split count and other combine programs (Nsight Compute, 2026-11-24: at batch 1
the combine's 64 programs of 128 channels took nearly as long as the attention at 8k-32k, `scripts/ncu_mla.py`; 32
channels in 2 warps became the default, COMBINE_BLOCK_C); those grids run with MLA_PIPE_GRID=1. By default this
times, per case (H = 16: 16B, and 671B per rank at world size 8), the op (splits + combine) with the plan, with
bf16 partials (`mla_partials`: half the bytes the split kernel stores and the combine reads; third run: 1-3%
faster, not the default) and the plan of before;
every variant checked against `mla_attention_reference` (max abs error < 2e-2), timed as the kernel
bench does (cache copies past the L2, the calls captured in one CUDA graph, median replay / copies).

    python3 scripts/sweep_mla_pipeline.py [--json out.json]     # MLA_PIPE_GRID=1: also the earlier runs' grids
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from dsv3.kernels._launch import num_sms
from dsv3.kernels.mla_attention import mla_attention_reference, mla_plan
from dsv3.kernels.bench import save_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_mla_splits import timed_variant  # noqa: E402  (the same check and timing)

# (batch, context, cache rows): the 16B bench's cache (4096 rows) at short and full contexts, short contexts in a
# long cache, the long contexts
CASES = ([(b, ctx, 4096) for b in (1, 2, 4, 8) for ctx in (128, 1024, 4032)]
         + [(1, 128, 32768), (8, 128, 32768), (1, 8192, 8192), (1, 32768, 32768), (8, 8192, 8192), (8, 32768, 32768),
            (32, 4032, 4096), (32, 32768, 32768)])


def variants(plan, shallow):
    yield "plan", {}
    yield "plan_bf16part", dict(partial_dtype=torch.bfloat16)
    yield "shallow", dict(block_t=shallow.block_t, min_chunk=shallow.min_chunk, num_stages=2)
    if os.environ.get("MLA_PIPE_GRID"):  # the grids of the first two runs (their results: docs/BENCHMARKS.md)
        # the combine kernel's channels per program and warps (default `combine_config`'s: 32 / 2, or whole rows /
        # 8 at >= 128 query rows over <= 16 splits since 2026-11-26; 128 / 4 before 2026-11-24), with the plan
        for bc, cw in ((512, 8), (256, 8), (128, 4), (64, 4), (32, 4), (16, 2)):
            yield f"combine_bc{bc}_w{cw}", dict(combine_block_c=bc, combine_warps=cw)
        for bt, mc, stages, warps in ((32, 32, 2, 4), (32, 32, 3, 4), (32, 32, 4, 4), (32, 32, 3, 8), (32, 64, 3, 4),
                                      (64, 64, 3, 8), (64, 128, 3, 8)):
            yield f"bt{bt}_mc{mc}_s{stages}_w{warps}", dict(block_t=bt, min_chunk=mc, num_stages=stages,
                                                              num_warps=warps, n_splits=plan.n_splits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cases", default=None,
                    help="B:CONTEXT:CACHE_ROWS,... instead of CASES (e.g. 32:128:4096,32:1024:4096)")
    opts = ap.parse_args()
    cases = CASES if not opts.cases else [tuple(int(v) for v in c.split(":")) for c in opts.cases.split(",")]
    dev = torch.device("cuda")
    sms = num_sms(dev)
    heads, c, r, scale = 16, 512, 64, 0.1
    rows = []
    for b, ctx, t_cap in cases:
        size = b * ctx * (c + r) * 2
        copies = max(2, min(24, (512 << 20) // (b * t_cap * (c + r) * 2)))
        g = torch.Generator(device=dev).manual_seed(b * 100000 + ctx)
        caches = [torch.randn(b, t_cap, c + r, device=dev, generator=g).bfloat16() for _ in range(copies)]
        q = torch.randn(b, 1, heads, c, device=dev, generator=g).bfloat16()
        qpe = torch.randn(b, 1, heads, r, device=dev, generator=g).bfloat16()
        pos = torch.full((b, 1), ctx - 1, device=dev, dtype=torch.long)
        ref = mla_attention_reference(q, qpe, caches[0], pos, scale).float()
        plan = mla_plan(b, 1, heads, t_cap, c, sms)
        shallow = mla_plan(b, 1, heads, t_cap, c, sms, num_stages=2)
        res = {}
        for name, kw in variants(plan, shallow):
            res[name] = timed_variant(q, qpe, caches, pos, scale, ref, size, **kw)
        ok = sorted((v["us"], k) for k, v in res.items() if "us" in v)
        p, o = (res[k].get("us", res[k].get("error")) for k in ("plan", "shallow"))
        print(f"B={b:2d} ctx={ctx:5d} cache={t_cap:5d} plan bt{plan.block_t} mc{plan.min_chunk} s{plan.num_stages} "
              f"splits {plan.n_splits}: {p} us, shallow {o} us; best "
              + ", ".join(f"{k} {u:.2f}" for u, k in ok[:3]), flush=True)
        rows.append(dict(b=b, ctx=ctx, t_cap=t_cap, plan=plan._asdict(), results=res))
        del caches
    bad = sum("error" in v for x in rows for v in x["results"].values())
    print(f"{sum(len(x['results']) for x in rows)} variants timed or tried, {bad} failed or mismatched", flush=True)
    if opts.json:
        save_json(opts.json, rows)


if __name__ == "__main__":
    main()
