"""Time the router's select kernel (`_router_select_kernel`) on the H200: 671B's grouping (256 experts, 8 groups of
32, group top-2, sigmoid + bias) scored on the [groups, per group] view (GROUP_VIEW) against the [groups, experts]
membership grid, at T = 1 / 8 tokens, one and two warps; outputs compared bitwise. CUDA graphs of back-to-back calls
on distinct logits (dsv3.kernels.bench.graph_us).

    python3 scripts/bench_select.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv3.kernels import router as R
from dsv3.kernels.bench import graph_us

ARGS = dict(top_k=8, n_group=8, topk_group=4, sigmoid=True, group_top2=True, norm_topk_prob=True,
            routed_scaling_factor=2.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for t in (1, 8):
        copies = 64
        logits = [torch.randn(1, t, 256, device="cuda", generator=g) for _ in range(copies)]
        bias = torch.rand(256, device="cuda", generator=g) * 0.1
        outs = {}
        for view in (True, False):
            for warps in (1, 2, 4):
                idx = [torch.empty(t, 8, dtype=torch.int64, device="cuda") for _ in range(copies)]
                wt = [torch.empty(t, 8, dtype=torch.float32, device="cuda") for _ in range(copies)]

                def call(i, view=view, warps=warps, idx=idx, wt=wt):
                    R.select_from_partials(logits[i], bias, idx[i], wt[i], **ARGS, select_warps=warps,
                                           group_view=view)

                us = graph_us([lambda i=i: call(i) for i in range(copies)], reps=9)
                outs[(view, warps)] = (torch.stack(idx), torch.stack(wt))
                rows.append(dict(t=t, group_view=view, warps=warps, us=round(us, 3)))
                print(f"T={t} group_view={view!s:5} warps={warps}: {us:6.2f} us per call", flush=True)
        base = outs[(False, 1)]
        same = all(torch.equal(o[0], base[0]) and torch.equal(o[1], base[1]) for o in outs.values())
        print(f"T={t}: outputs of every variant bitwise equal: {same}", flush=True)
        rows.append(dict(t=t, bitwise_equal=same))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
