"""A/B the activation-quantization kernels of this tree (`act_quant`, `silu_mul_quant`) against another version of
kernels/fp8_linear.py and kernels/fp8_swiglu.py, side by side in one process on the GPU: outputs compared (e4m3 as
values, scales bitwise), timed in CUDA graphs, interleaved rounds; then this tree's kernels at other launch shapes
(rows and 128-blocks per program, warps) to check the rule (`act_quant_launch`).

    git show REF:kernels/fp8_linear.py > /tmp/old_fp8_linear.py          # on the development machine
    git show REF:kernels/fp8_swiglu.py > /tmp/old_fp8_swiglu.py
    python3 scripts/ab_act_quant.py --old-linear /tmp/old_fp8_linear.py --old-swiglu /tmp/old_fp8_swiglu.py

Shapes: the 16B prefill's cuBLAS inputs at M 300-4096: act_quant of x [M, 2048] in the cuBLAS layout (rows padded
to 4, K blocks to 4, scales M-major: qkv_a's input), silu_mul_quant of the shared experts' gate / up halves
[M, 2816] (column slices of one [M, 5632] GEMM output) and of the dense layer's [M, 10944]. Bytes moved: the
inputs read once, e4m3 and scales written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_grouped_moe import load_old, timed_old_new  # noqa: E402

# (rows, blocks, warps); blocks None: the rule's (min(8, next_pow2(K blocks))). Blocks that divide the padded K
# blocks leave no masked programs: the shared experts' 12 blocks (1408 columns padded to 4 blocks) take 4
LAUNCHES = [(1, None, 4), (2, None, 4), (4, None, 4), (8, None, 4), (4, None, 8), (8, None, 8),
            (2, 4, 4), (4, 4, 4), (8, 4, 4), (8, 4, 8), (16, 4, 8), (4, 2, 4), (8, 2, 4), (16, 2, 8), (1, 16, 4),
            (2, 16, 8)]


def same(a: tuple, b: tuple) -> bool:
    return a[0].shape == b[0].shape and torch.equal(a[0].float(), b[0].float()) and torch.equal(a[1], b[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-linear", required=True)
    ap.add_argument("--old-swiglu", required=True)
    ap.add_argument("--m", default="300,1024,2048,4096")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()

    import dsv3.kernels.fp8_linear as L
    import dsv3.kernels.fp8_swiglu as SW
    from dsv3.kernels.bench import graph_us

    old_l = load_old(args.old_linear, "fp8_linear")
    old_s = load_old(args.old_swiglu, "fp8_swiglu")
    rule = L.act_quant_launch
    g = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for m in (int(v) for v in args.m.split(",")):
        x = torch.randn(m, 2048, device="cuda", generator=g).to(torch.bfloat16)
        cases = {"act_quant x [M, 2048], cuBLAS layout": (
            lambda mod, x=x: mod.act_quant(x, pad_rows_to=4, scales_m_major=True, pad_k_blocks_to=4),
            m * 2048 * 2 + (m + 3) // 4 * 4 * (2048 + 16 * 4))}
        for n in (2816, 10944):
            gu = (torch.randn(m, 2 * n, device="cuda", generator=g) * 2).to(torch.bfloat16)
            kb = -(-n // 128)
            cases[f"silu_mul_quant [M, {n}] halves"] = (
                lambda mod, gu=gu, n=n: mod.silu_mul_quant(gu[:, :n], gu[:, n:], pad_k_blocks_to=4),
                m * n * 4 + m * (-(-kb // 4) * 4) * (128 + 4))
        for name, (fn, nbytes) in cases.items():
            olds = old_l if name.startswith("act") else old_s
            news = L if name.startswith("act") else SW
            equal = same(fn(olds), fn(news))
            ab = timed_old_new({"old": lambda: fn(olds), "new": lambda: fn(news)}, args.rounds, 0.0)
            row = dict(case=name, m=m, equal=equal, old_us=ab["old"]["us"], new_us=ab["new"]["us"],
                       speedup=ab["speedup"], new_tbs=round(nbytes / ab["new"]["us"] / 1e6, 2),
                       rule=list(rule(m, 16, **({} if name.startswith("act") else {"rows": 2}))))
            launches = {}
            try:
                for rows, blocks, warps in LAUNCHES:
                    def pinned(mm, kb, rows=None, pin=(rows, blocks, warps)):  # the kernels' own rows ignored
                        return pin[0], pin[1] or rule(mm, kb)[1], pin[2]
                    L.act_quant_launch = SW.act_quant_launch = pinned
                    ok = same(fn(olds), fn(news))
                    launches[f"{rows}r{blocks or 'rule'}b{warps}w"] = (round(graph_us([lambda: fn(news)] * 3), 1), ok)
            finally:
                L.act_quant_launch = SW.act_quant_launch = rule
            row["launches"] = launches
            results.append(row)
            best = min(launches.items(), key=lambda kv: kv[1][0])
            print(f"{name:40s} M {m:5d}: old {row['old_us']:7.1f} us, new {row['new_us']:7.1f} "
                  f"({row['speedup']:.2f}x, {row['new_tbs']:.2f} TB/s), equal {equal}; best launch {best[0]} "
                  f"{best[1][0]} us; all {launches}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
