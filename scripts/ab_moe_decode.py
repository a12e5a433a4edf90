"""A/B the decode MoE path (a handful of tokens, `routed_experts_triton` without the grouped schedule) of this tree
against another version of kernels/routed_experts.py, side by side in one process on the GPU: outputs compared
bitwise, the whole op timed over weight copies past the L2 in CUDA graphs, interleaved rounds, median; then the
per-kernel device times of each.

    git show REF:kernels/routed_experts.py > ab_old/routed_experts.py      # sent with the tree
    python3 scripts/ab_moe_decode.py --old ab_old/routed_experts.py [--t 2,4,8] [--shapes 16B,671B-ep8] [--json F]

Shapes, routing, weight copies: `sweep_moe.ShapeBench`; each module runs its own plan for the shape and T (the
same MOE_DECODE_TUNED table unless the change is to it). The old file is loaded as `ab_grouped_moe.load_old` does.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_grouped_moe import load_old  # noqa: E402
from sweep_moe import PEAK_TB_S, ShapeBench  # noqa: E402


def per_kernel_us(fns: list, rounds: int = 10) -> dict[str, float]:
    """Mean device microseconds per call of each MoE kernel (torch profiler, eager calls over the copies)."""
    from collections import defaultdict

    for f in fns:
        f()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            for f in fns:
                f()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ("moe" in ev.name or "act_quant" in ev.name):
            total[ev.name.strip("_").removesuffix("_kernel")] += ev.device_time
    return {k: round(v / (rounds * len(fns)), 2) for k, v in total.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="a copy of kernels/routed_experts.py to compare against")
    ap.add_argument("--t", default="2,4,8")
    ap.add_argument("--shapes", default="16B,671B-ep8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    from dsv3.kernels import routed_experts as new
    from dsv3.kernels.bench import graph_us, save_json

    mods = {"old": load_old(opts.old), "new": new}
    rows = []
    for name in opts.shapes.split(","):
        for t in (int(v) for v in opts.t.split(",")):
            sb = ShapeBench(name, t, seed=100 * t + len(name))
            fns = {k: [lambda c=c, m=m: m.routed_experts_triton(sb.x, sb.idx, sb.wt, *sb.w[c])
                       for c in range(sb.copies)] for k, m in mods.items()}
            same = torch.equal(fns["old"][0](), fns["new"][0]())
            times = {k: [] for k in mods}
            reps = max(5, math.ceil(200 / sb.copies))
            for r in range(opts.rounds):
                for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    times[k].append(graph_us(fns[k], reps=reps))
            med = {k: statistics.median(v) for k, v in times.items()}
            kern = {k: per_kernel_us(fns[k]) for k in mods}
            tb = {k: sb.bytes / (med[k] * 1e-6) / 1e12 for k in med}
            rows.append(dict(shape=name, t=t, bytes=sb.bytes, experts_used=sb.n_used, bitwise_equal=same,
                             us={k: round(v, 2) for k, v in med.items()}, rounds=times, kernels_us=kern,
                             speedup=round(med["old"] / med["new"], 3)))
            print(f"{name:9s} T={t}: old {med['old']:7.2f} us ({tb['old']:.2f} TB/s, {100 * tb['old'] / PEAK_TB_S:.1f}%)"
                  f" | new {med['new']:7.2f} us ({tb['new']:.2f} TB/s, {100 * tb['new'] / PEAK_TB_S:.1f}%) | "
                  f"{med['old'] / med['new']:.3f}x | bitwise equal {same} | {sb.n_used} experts, "
                  f"{sb.bytes / 1e6:.1f} MB", flush=True)
            for k in mods:
                print(f"    kernels ({k}): " + "  ".join(f"{n} {v:.2f}" for n, v in kern[k].items()), flush=True)
    if opts.json:
        save_json(opts.json, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows))
    return 0 if all(r["bitwise_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
