"""Time the decode router (`route_triton`: `_router_logits_kernel` + `_router_select_kernel`) at serving batches
(T = 16 / 32 / 64) on the 16B (64 experts, D 2048) and 671B (256 experts, D 7168) shapes: today's `logits_plan`
against the fp32 FMA tiles of before (at T > 8 they capped the fp32 partials at 1/4 of the weight's bytes, which
left the 16B router at T = 32 eight splits: 32 programs of 16 serial 16-wide D chunks, 7.35 us per layer in a
batch-32 decode profile) and other tensor-core (DOT) tiles and D splits. CUDA graphs of back-to-back calls on
distinct inputs (dsv3.kernels.bench.graph_us); the chosen experts compared with the default plan's (the logits move
at rounding level with the split).

    python3 scripts/sweep_router_splits.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv3.kernels import router as R
from dsv3.kernels._launch import cdiv, next_pow2
from dsv3.kernels.bench import graph_us

SHAPES = {  # name -> (E, D, route kwargs)
    "16B": (64, 2048, dict(top_k=6, n_group=1, topk_group=1, sigmoid=False, group_top2=False, norm_topk_prob=False,
                           routed_scaling_factor=1.0)),
    "671B": (256, 7168, dict(top_k=8, n_group=8, topk_group=4, sigmoid=True, group_top2=True, norm_topk_prob=True,
                             routed_scaling_factor=2.5)),
}


def fma_plan(block_e: int, splits: int | None):
    """A logits_plan stand-in with the fp32 FMA tiles (no tensor cores; the plan before the DOT tiles): BLOCK_E as
    given (BLOCK_D from the accumulator budget), `splits` D slices (None: that plan's own count)."""
    def plan(t, e, d, sms, dot=False):
        p = DEFAULT_PLAN(t, e, d, sms)
        if p["FLAT"]:
            return p
        bd = max(16, min(512, R.LOGITS_ACC_ELEMS // (p["BLOCK_T"] * block_e), next_pow2(d)))
        chunks = cdiv(d, bd)
        per = cdiv(chunks, splits or p["splits"])
        return dict(p, BLOCK_E=block_e, BLOCK_D=bd, STAGES=1 if per == 1 else 3, splits=cdiv(chunks, per),
                    d_per_split=per * bd, num_warps=4 if p["BLOCK_T"] * block_e * bd <= R.LOGITS_ACC_ELEMS else 8)
    return plan


def dot_plan(block_e: int, block_d: int, splits: int | None):
    """The DOT tiles with BLOCK_E x BLOCK_D, `splits` D slices (None: `_dot_plan`'s rule)."""
    return lambda t, e, d, sms, dot=False: R._dot_plan(t, e, d, sms, block_e, block_d, splits)


DEFAULT_PLAN = R.logits_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    default_plan = DEFAULT_PLAN
    for name, (e, d, kw) in SHAPES.items():
        w = torch.randn(e, d, device="cuda", generator=g).to(torch.bfloat16) * 0.02
        bias = torch.rand(e, device="cuda", generator=g) * 0.1 if kw["sigmoid"] else None
        for t in (16, 32, 64):
            xs = [torch.randn(t, d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(32)]
            variants = [("default", None), ("fma (before)", fma_plan(16, None)), ("fma E8 s16", fma_plan(8, 16))]
            variants += [(f"dot E{be} D{bd}" + (f" s{s}" if s else ""), dot_plan(be, bd, s))
                         for be in (32, 64) for bd in (64, 128, 256) for s in (None, 8)]
            ref = None
            for label, plan in variants:
                R.logits_plan = plan or default_plan
                try:
                    p = R.logits_plan(t, e, d, 132, dot=True)
                    outs = [R.route_triton(x, w, bias, **kw) for x in xs[:4]]
                    us = graph_us([lambda x=x: R.route_triton(x, w, bias, **kw) for x in xs])
                finally:
                    R.logits_plan = default_plan
                idx = torch.stack([o[0] for o in outs])
                ref = idx if ref is None else ref
                same = (idx.sort(-1).values == ref.sort(-1).values).all(-1).float().mean().item()
                row = dict(shape=name, t=t, variant=label, us=round(us, 2), splits=p["splits"],
                           block_e=p["BLOCK_E"], block_d=p["BLOCK_D"], warps=p["num_warps"], same_experts=same)
                rows.append(row)
                print(f"{name:5s} T={t:3d} {label:18s} {us:7.2f} us  splits {p['splits']:3d} E {p['BLOCK_E']:2d} "
                      f"D {p['BLOCK_D']:3d} warps {p['num_warps']}  rows with the default's experts {same:.3f}"
                      + ("  <- default" if plan is None else ""), flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
