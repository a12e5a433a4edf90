"""W8A16 one-token routed experts (`routed_experts_pairs(..., quant_act=False)`): launch configs of the row-parallel
up and down kernels at the models' expert shapes (GPU).

    python3 scripts/sweep_moe_a16.py [--json out.json] [--rounds 3]

Why: the batch-1 decode profile of the 16B model (eighteenth session, prof16q) had `_moe_up_rows_kernel` at 17.2 us
per layer with bf16 x, where the W8A8 form of the same kernel ran 13.8 us (fourteenth session): the W8A16 experts
took the W8A8 T = 1 plan's up config (2 rows per program, 4 warps), so each of the 5632 programs re-reads the bf16
x (4 KB: half its own weight bytes) - the effect `scripts/sweep_a16.py` found and fixed for the linears. The down
kernel took A16_DOWN (8 rows, 4 warps) without a sweep either.
Per shape (sweep_moe.py's: 16B with its 2 shared slots, one 671B rank at world size 8, the kernel bench's 16B shape
without shared slots; `--shapes` picks), this times the whole op as
the model runs it (pairs, no combine) over weight copies past the L2 in one CUDA graph: first every up config
(block_n 1-8, 4 / 8 warps, within 256 weight values per thread) with today's down config, then every down config
with the best up config, then today's and the best pair re-timed interleaved (`--rounds`, median). Every config is
checked against the float64 reference with W8A16 numerics (relative error < 3e-2, the GPU tests' bound).
"Today" is what the op launches (`a16_moe_config`). First run (2026-11-24, before A16_MOE_TUNED): 16B 28.45 -> 26.30
us (up 4 rows / 4 warps, down 4 / 4), 671B rank 23.36 -> 22.84 us (up 2 / 4, down 8 / 8): that table now.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_moe import SHAPES, ShapeBench  # noqa: E402  (the same shapes, routing and weight copies)

BLOCK_NS = (1, 2, 4, 8)
WARPS = (4, 8)
TOL = 3e-2


def fits(block_n: int, n_weights: int, k: int, warps: int) -> bool:
    """Weight values each thread holds (the rows kernels load BLOCK_N whole rows at once) within 256."""
    kb_pad = max(2, 1 << (-(-k // 128) - 1).bit_length())
    return n_weights * block_n * kb_pad * 128 // (32 * warps) <= 256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    opts = ap.parse_args()
    shapes = [s for s in opts.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}")
    from dsv3.kernels import routed_experts as R
    from dsv3.kernels.bench import graph_us

    out = {"device": torch.cuda.get_device_name(), "shapes": {}}
    for name in shapes:
        sb = ShapeBench(name, 1, seed=1000 * list(SHAPES).index(name) + 1)  # the same inputs whatever the subset
        ref = R.routed_experts_pairs_reference(sb.x, sb.idx, *sb.w[0], quant_act=False).double()

        def run(cfg, c=0):
            ub, uw, db, dw = cfg
            return R.routed_experts_triton(sb.x, sb.idx, sb.wt, *sb.w[c], combine=False, quant_act=False,
                                           up_block_n=ub, up_num_warps=uw, down_block_n=db, down_num_warps=dw)

        def timed(cfg):
            out_ = run(cfg).double()
            err = ((out_ - ref).norm() / ref.norm()).item()
            if not err < TOL:
                raise SystemExit(f"{name} {cfg}: rel err {err:.2e} vs the float64 reference")
            return graph_us([lambda c=c: run(cfg, c) for c in range(sb.copies)], reps=max(5, -(-200 // sb.copies)))

        now = R.a16_moe_config(sb.e, sb.i, sb.d, R.resolve_moe_decode(1, sb.e, sb.i, sb.d, 132, True))
        down_now = now[2:]
        row = {"today": list(now), "up": {}, "down": {}}
        for ub in BLOCK_NS:
            for uw in WARPS:
                if fits(ub, 2, sb.d, uw):
                    row["up"][f"{ub}/{uw}"] = round(timed((ub, uw, *down_now)), 2)
        best_up = tuple(int(v) for v in min(row["up"], key=row["up"].get).split("/"))
        for db in BLOCK_NS:
            for dw in WARPS:
                if fits(db, 1, sb.i, dw):
                    row["down"][f"{db}/{dw}"] = round(timed((*best_up, db, dw)), 2)
        best_down = tuple(int(v) for v in min(row["down"], key=row["down"].get).split("/"))
        best = (*best_up, *best_down)
        samples = {now: [], best: []}
        for _ in range(opts.rounds):
            for cfg in samples:
                samples[cfg].append(timed(cfg))
        row["best"] = list(best)
        row["today_us"] = round(statistics.median(samples[now]), 2)
        row["best_us"] = round(statistics.median(samples[best]), 2)
        row["mb_per_call"] = round(sb.bytes / 1e6, 1)
        out["shapes"][name] = row
        print(f"{name}: up (block_n/warps, today's down {down_now}) "
              + ", ".join(f"{k} {v}" for k, v in row["up"].items()), flush=True)
        print(f"{name}: down (up {best_up}) " + ", ".join(f"{k} {v}" for k, v in row["down"].items()), flush=True)
        print(f"{name}: today {now} {row['today_us']} us -> best {best} {row['best_us']} us "
              f"({sb.bytes / 1e6:.1f} MB per call: {sb.bytes / row['best_us'] / 1e6:.2f} TB/s), "
              f"median of {opts.rounds} interleaved rounds", flush=True)
        sb.w = []  # free the weight copies before the next shape
        torch.cuda.empty_cache()
    if opts.json:
        from dsv3.kernels.bench import save_json
        save_json(opts.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
