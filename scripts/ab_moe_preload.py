"""The FP8 decode MoE kernels (`_moe_up_kernel`, `_moe_down_kernel`) with their block scales preloaded before the
K loop (DSV3_MOE_DECODE_PRELOAD=on, the default at <= 16 K blocks) against loaded in every iteration (off), side
by side in one process on the GPU: outputs compared bitwise, the whole op timed over weight copies in CUDA graphs
(sweep_moe.py's shapes, routing and copies), interleaved rounds, median; then per-kernel device times.

    python3 scripts/ab_moe_preload.py [--t 2,4,8] [--shapes 16B,671B-ep8] [--rounds 5] [--json out.json]

Why: the sm_90 SASS of the T = 8 up kernel (triton 3.6, offline) had six synchronous scale loads (x per token, gate
and up block scales) inside the K loop, issued after the stage's cp.async wait and consumed right after the
wgmma: a global-load round trip per 128-wide K block that the BF16 kernels do not have (their batch-8 MoE kernels
streamed 87-95% of copy bandwidth in the twenty-first session's profile, the FP8 ones 73-76%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_moe import PEAK_TB_S, ShapeBench, kernel_times  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", default="2,4,8")
    ap.add_argument("--shapes", default="16B,671B-ep8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    from dsv3.kernels.routed_experts import resolve_moe_decode
    from dsv3.kernels._launch import num_sms

    rows = []
    for name in opts.shapes.split(","):
        for t in (int(v) for v in opts.t.split(",")):
            sb = ShapeBench(name, t, seed=100 * t + len(name))
            plan = resolve_moe_decode(t, sb.e, sb.i, sb.d, num_sms(sb.x.device), True)
            outs, times = {}, {"on": [], "off": []}
            for mode in ("on", "off"):
                os.environ["DSV3_MOE_DECODE_PRELOAD"] = mode
                outs[mode] = sb.run(plan)
            same = torch.equal(outs["on"], outs["off"])
            for r in range(opts.rounds):
                for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    os.environ["DSV3_MOE_DECODE_PRELOAD"] = mode
                    times[mode].append(sb.time(plan))
            med = {m: statistics.median(v) for m, v in times.items()}
            kern = {}
            for mode in ("on", "off"):
                os.environ["DSV3_MOE_DECODE_PRELOAD"] = mode
                kern[mode] = kernel_times(sb, plan)
            os.environ.pop("DSV3_MOE_DECODE_PRELOAD", None)
            row = dict(shape=name, t=t, plan=list(plan), bytes=sb.bytes, experts_used=sb.n_used, bitwise_equal=same,
                       us=med, rounds=times, kernels_us=kern)
            rows.append(row)
            tb = {m: sb.bytes / (med[m] * 1e-6) / 1e12 for m in med}
            print(f"{name:9s} T={t}: preload {med['on']:7.2f} us ({tb['on']:.2f} TB/s, {100 * tb['on'] / PEAK_TB_S:.1f}%)"
                  f" | per-iteration loads {med['off']:7.2f} us ({tb['off']:.2f} TB/s) | off/on {med['off'] / med['on']:.3f}"
                  f" | bitwise equal {same} | {sb.n_used} experts, {sb.bytes / 1e6:.1f} MB", flush=True)
            for mode in ("on", "off"):
                print(f"    kernels ({mode}): " + "  ".join(f"{k} {v:.2f}" for k, v in kern[mode].items()), flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0 if all(r["bitwise_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
