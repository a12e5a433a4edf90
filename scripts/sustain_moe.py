"""Grouped MoE launch configs timed under sustained load, at the power cap a long prefill runs at (device script).

`scripts/sweep_prefill.py` times each config in a few ~1 ms CUDA-graph replays with the GPU otherwise idle, so at
the full SM clock; a 4095-token prefill runs at the H200's 700 W cap with the clock at 1800-1920 MHz, and 8192^3 FP8
GEMMs back to back settle at ~1350 MHz (`scripts/bench_gemm_power.py`, 2026-11-26). A config that moves fewer bytes
(larger tiles re-read each expert's weights fewer times from L2) may draw less power per FLOP and so keep a higher
clock under the cap, which a short timing cannot show. For each config (16B routed experts, T tokens, the prefill's
form: 64 routed top-6, the shared experts on cuBLAS), this script measures the burst time (`graph_us`) and the
sustained time: a CUDA graph of `--calls` calls replayed back to back for `--seconds`, each replay timed by CUDA
events, the median of the second half reported; configs interleaved over `--rounds` rounds with a pause between runs,
`nvidia-smi` sampling power and SM clock every 20 ms (the median over each sustained run's second half is printed).
Outputs are checked against the default config's (max abs difference <= 1e-2 * max |default|).

    python scripts/sustain_moe.py --json $OUT/sustain_moe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_gemm_power import samples_between, smi_sampling, utc
from sweep_prefill import moe_inputs

from dsv3.runtime.bench import back_to_back

CONFIGS = [
    {},
    {"grouped_block_t": 128, "up_num_warps": 8, "up_num_stages": 3},
    {"grouped_block_t": 128, "up_num_warps": 8, "up_num_stages": 4},
    {"grouped_block_t": 64, "up_num_warps": 8, "up_num_stages": 3},
    {"grouped_block_t": 128, "up_num_warps": 8, "up_num_stages": 3, "down_block_n": 128, "down_num_warps": 8,
     "down_num_stages": 3},
]


def sustained(graph: torch.cuda.CUDAGraph, calls: int, seconds: float) -> tuple[float, str, str]:
    """Replays back to back for `seconds` (`back_to_back`): (median us per call over the second half, its start and
    end UTC)."""
    runs = back_to_back(graph.replay, seconds)
    half = runs[len(runs) // 2:]
    return statistics.median(ms * 1e3 / calls for ms, _ in half), utc(half[0][1]), utc()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, default=4096, help="tokens (default 4096)")
    ap.add_argument("--shape", default="16B-routed", help="sweep_prefill.MOE_SHAPES key (default 16B-routed)")
    ap.add_argument("--calls", type=int, default=8, help="op calls per captured graph (default 8)")
    ap.add_argument("--seconds", type=float, default=1.5, help="sustained run per config and round (default 1.5)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--json", help="write the rows and the nvidia-smi samples here")
    args = ap.parse_args()

    from dsv3.kernels.bench import graph_us
    from dsv3.kernels.routed_experts import GROUPED_BLOCK_T, routed_experts_triton

    x, idx, wt, w, flops = moe_inputs(args.shape, args.t)

    def call(cfg):
        cfg = {"grouped_block_t": GROUPED_BLOCK_T, **cfg}
        return lambda: routed_experts_triton(x, idx, wt, *w, grouped=True, **cfg)

    base = call({})()
    scale = base.float().abs().max().item()
    graphs, rows = {}, []
    for cfg in CONFIGS:
        key = json.dumps(cfg, sort_keys=True)
        try:
            diff = (call(cfg)().float() - base.float()).abs().max().item()
            if not diff <= 1e-2 * scale:
                raise ValueError(f"differs from the default: max abs {diff:.3e}")
            burst = graph_us([call(cfg)] * 3)
            g = torch.cuda.CUDAGraph()
            fn = call(cfg)
            with torch.cuda.graph(g):
                for _ in range(args.calls):
                    fn()
            graphs[key] = (g, burst)
        except Exception as exc:  # a config that does not compile or verify is reported and skipped
            print(f"{key}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    runs = []
    with smi_sampling() as samples:
        for r in range(args.rounds):
            for key, (g, burst) in graphs.items():
                time.sleep(1.0)  # every run starts from a rested GPU
                us, start, end = sustained(g, args.calls, args.seconds)
                runs.append((r, key, burst, us, start, end))
    print(f"grouped MoE {args.shape} T={args.t}: us per call, burst (graph_us) vs sustained ({args.seconds} s, second "
          f"half), TFLOP/s sustained, power / SM clock medians")
    for r, key, burst, us, start, end in runs:
        s = samples_between(samples, start, end)
        rows.append(dict(round=r, cfg=json.loads(key), burst_us=round(burst, 1), sustained_us=round(us, 1),
                         sustained_tflops=round(flops / us / 1e6, 1), **s))
        print(f"  round {r} {key}: burst {burst:7.1f}  sustained {us:7.1f} ({flops / us / 1e6:5.0f} TFLOP/s)  "
              f"{s.get('power_w', float('nan')):.0f} W {s.get('sm_mhz', float('nan')):.0f} MHz", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "t": args.t, "rows": rows, "smi": samples}, f, indent=1)


if __name__ == "__main__":
    main()
