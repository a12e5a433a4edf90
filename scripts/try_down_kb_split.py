"""Does the row-parallel MoE down kernel gain from I in two power-of-two parts? (GPU A/B; issue 6.)

    python3 scripts/try_down_kb_split.py [--json out.json] [--rounds 5]

Why: in the 16B batch-1 profile (2026-11-24) the W8A16 up kernel streams its 46 MB at ~77% of copy bandwidth
(14.0 us per layer) and the down kernel its 23 MB at ~54% (10.0 us). Their programs have the same form (BLOCK_N
whole weight rows in one load, the token re-read per program); one difference: the up kernel's K (D = 2048) is
16 128-blocks, the down kernel's (I = 1408) 11, padded to 16 in the tile, so 5 of every 16 lanes of each load are
masked. `kb_split` loads 8 + 4 blocks instead (ROWS_DOWN_KB_SPLIT). Prediction: the down kernel towards the up
kernel's rate, ~2 us per layer; and 16 rows per program (192 live weight values per thread) become possible.
Times the whole W8A16 op (pairs, no combine) as sweep_moe_a16.py does, over weight copies past the L2 in one CUDA
graph, 16B shape only (671B's I = 2048 has no padding): the op's config with the split off / on, and a few down
configs with it on, interleaved rounds, median; every run checked against the float64 reference (< 3e-2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_moe import ShapeBench  # noqa: E402  (the shapes, routing and weight copies of the MoE sweeps)

TOL = 3e-2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    opts = ap.parse_args()
    from dsv3.kernels import routed_experts as R
    from dsv3.kernels.bench import graph_us

    sb = ShapeBench("16B", 1, seed=1)
    ref = R.routed_experts_pairs_reference(sb.x, sb.idx, *sb.w[0], quant_act=False).double()
    now = R.a16_moe_config(sb.e, sb.i, sb.d, R.resolve_moe_decode(1, sb.e, sb.i, sb.d, 132, True))
    ub, uw = now[:2]
    # (name, ROWS_DOWN_KB_SPLIT, down BLOCK_N, down warps)
    variants = [("today_unsplit", False, *now[2:]), ("today_split", True, *now[2:])]
    variants += [(f"split_{db}_{dw}", True, db, dw) for db, dw in ((4, 4), (8, 8), (16, 4), (16, 8))]

    def run(split, db, dw, c=0):
        R.ROWS_DOWN_KB_SPLIT = split  # read by the launcher at each eager call
        return R.routed_experts_triton(sb.x, sb.idx, sb.wt, *sb.w[c], combine=False, quant_act=False,
                                       up_block_n=ub, up_num_warps=uw, down_block_n=db, down_num_warps=dw)

    samples = {v[0]: [] for v in variants}
    errors = {}
    for _ in range(opts.rounds):
        for name, split, db, dw in variants:
            if name in errors:
                continue
            try:
                out = run(split, db, dw).double()
                err = ((out - ref).norm() / ref.norm()).item()
                if not err < TOL:
                    errors[name] = f"rel err {err:.2e}"
                    continue
                samples[name].append(graph_us([lambda c=c: run(split, db, dw, c) for c in range(sb.copies)],
                                              reps=max(5, -(-200 // sb.copies))))
            except Exception as e:  # a config that does not compile (BLOCK_N 16 outside ROWS_DOWN_BLOCK_NS)
                errors[name] = str(e).splitlines()[0][:160]
    R.ROWS_DOWN_KB_SPLIT = True
    res = {k: round(statistics.median(v), 2) for k, v in samples.items() if v}
    print(f"16B W8A16 op (up {ub}/{uw}), median of {opts.rounds} interleaved rounds, us: "
          + ", ".join(f"{k} {v}" for k, v in res.items()), flush=True)
    for k, v in errors.items():
        print(f"  {k}: {v}")
    if opts.json:
        with open(opts.json + ".tmp", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "us": res, "errors": errors,
                       "mb_per_call": round(sb.bytes / 1e6, 1)}, f, indent=1)
        os.replace(opts.json + ".tmp", opts.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
