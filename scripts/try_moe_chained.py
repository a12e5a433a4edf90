"""The W8A16 one-token experts in one launch (`_moe_rows_chained_kernel`) against today's two (GPU).

    python3 scripts/try_moe_chained.py [--json out.json] [--rounds 5]

Why: in the 16B batch-1 profile (2026-11-24) the MoE up kernel takes 14.3 us per layer for 46 MB (~77% of copy
bandwidth) and the down kernel 10.0 us for 23 MB (~54%): each kernel pays its own ramp-up and tail, and the down
kernel's weights (which depend only on the routing, known before either kernel starts) wait for the up kernel to
end. In the chained form the down programs (dispatched as up programs retire) load their weight rows first and only
then wait for their slot's up programs (counter per slot, release / acquire at GPU scope). Prediction: the two
weight streams overlap, ~2-4 us per MoE layer less (69 MB at ~80% of copy bandwidth is ~20 us against 24.3).
The hand-off through L2 counters cost about what a launch does in the attention-output experiment (nineteenth
session): the gain, if any, has to come from the overlap.

Variants per shape (sweep_moe's: 16B with its 2 shared slots; one 671B rank at world size 8), the whole op as the
model runs it (pairs, no combine) over weight copies past the L2 in one CUDA graph, `--rounds` interleaved rounds,
median: 'two' (today's launches, A16_MOE_TUNED), 'chained' (a zeroed counter buffer per call: the op's default form,
one small fill more in the graph), 'chained-reset' (one buffer the kernel leaves zero: the fill's cost removed), and
chained with the down kernel's rows / the warps changed. Every output is checked against 'two': bitwise where the
launch fields are the same, else within 1e-3 (other rows per program or warps sum in another order: a last-bit bf16
flip here and there, ~3e-5 measured).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_moe import SHAPES, ShapeBench  # noqa: E402  (the same shapes, routing and weight copies)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    opts = ap.parse_args()
    from dsv3.kernels import routed_experts as R
    from dsv3.kernels.bench import graph_us, save_json

    out = {"device": torch.cuda.get_device_name(), "shapes": {}}
    for n_shape, name in enumerate(SHAPES):
        sb = ShapeBench(name, 1, seed=1000 * n_shape + 1)
        ub, uw, db, dw = R.a16_moe_config(sb.e, sb.i, sb.d, R.resolve_moe_decode(1, sb.e, sb.i, sb.d, 132, True))
        sync = torch.zeros(2, sb.k, dtype=torch.int32, device="cuda")
        variants = {
            "two": dict(a16_form="two"),
            "chained": dict(a16_form="chained"),
            "chained-reset": dict(a16_form="chained", a16_sync=sync),
            f"chained-reset down {db // 2}": dict(a16_form="chained", a16_sync=sync, down_block_n=db // 2),
            f"chained-reset {8 if uw == 4 else 4} warps": dict(a16_form="chained", a16_sync=sync,
                                                               up_num_warps=8 if uw == 4 else 4),
        }
        for ns in (100, 400):
            variants[f"chained-reset spin {ns} ns"] = dict(a16_form="chained", a16_sync=sync, spin_ns=ns)
        if db < 8:
            variants["chained-reset down 8"] = dict(a16_form="chained", a16_sync=sync, down_block_n=8)

        def run(kw, c=0):
            kw = dict(kw)
            os.environ["DSV3_MOE_CHAIN_SPIN_NS"] = str(kw.pop("spin_ns", 0))  # read at launch (eager)
            return R.routed_experts_triton(sb.x, sb.idx, None, *sb.w[c], combine=False, quant_act=False, **kw)

        valid = ((sb.idx[0] >= 0) & (sb.idx[0] < sb.e)).nonzero().flatten()
        base = run(variants["two"])[0, valid]
        checks = {}
        for label, kw in variants.items():
            got = run(kw)[0, valid]
            same = torch.equal(got, base)
            err = 0.0 if same else ((got.double() - base.double()).norm() / base.double().norm()).item()
            if not (err < 1e-3 and torch.isfinite(got).all()) or sync.any():
                raise SystemExit(f"{name} {label}: differs from 'two' (rel {err:.2e}) or left the counters nonzero")
            checks[label] = "bitwise" if same else f"{err:.1e}"
        reps = max(5, -(-200 // sb.copies))
        samples = {label: [] for label in variants}
        for _ in range(opts.rounds):
            for label, kw in variants.items():
                samples[label].append(graph_us([lambda c=c, kw=kw: run(kw, c) for c in range(sb.copies)], reps=reps))
        row = {label: {"us": round(statistics.median(v), 2), "check": checks[label]} for label, v in samples.items()}
        row["today_config"] = [ub, uw, db, dw]
        row["mb_per_call"] = round(sb.bytes / 1e6, 1)
        out["shapes"][name] = row
        two_us = row["two"]["us"]
        print(f"{name} ({sb.bytes / 1e6:.1f} MB per call; today up {ub}/{uw} down {db}/{dw}): "
              + ", ".join(f"{label} {row[label]['us']} us ({checks[label]})" for label in variants)
              + f"; best chained / two = {min(row[k]['us'] for k in variants if k != 'two') / two_us:.3f}", flush=True)
        sb.w = []
        torch.cuda.empty_cache()
    if opts.json:
        save_json(opts.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
