"""Time the grouped (prefill) path of `dsv3.routed_experts` at prompt-sized T on the GPU: tiles of 64 vs 128
(token, expert) pairs, checked against each other and the reference on a slice. Prints TFLOP/s (2 x 3 x D x I per
(token, expert) pair) and the share of the FP8 peak measured in the same run.

    python3 scripts/bench_grouped_moe.py [--t 4096] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

SHAPES = {  # routed + stacked shared slots, top-k + always-on shared ids
    "16B": dict(e_routed=64, n_shared=2, k=6, d=2048, i=1408),
    "671B-ws8-rank": dict(e_routed=32, n_shared=0, k=1, d=7168, i=2048),  # ~1 of the top-8 ids local per token
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    from dsv3.kernels.bench import graph_us
    from dsv3.kernels.fp8_blocks import quantize_weight
    from dsv3.kernels.routed_experts import routed_experts_reference, routed_experts_triton
    from dsv3.runtime.bench import fp8_gemm_peak

    dev = torch.device("cuda")
    peak = fp8_gemm_peak(dev) / 1e12
    print(f"FP8 GEMM peak in this run: {peak:.0f} TFLOP/s")
    rows = []
    for name, sh in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        e, t, d, i = sh["e_routed"] + sh["n_shared"], opts.t, sh["d"], sh["i"]
        routed = torch.stack([torch.randperm(sh["e_routed"], device=dev, generator=g)[:sh["k"]] for _ in range(t)])
        shared = torch.arange(sh["e_routed"], e, device=dev).expand(t, sh["n_shared"])
        idx = torch.cat([routed, shared], 1)
        wt = torch.rand(idx.shape, device=dev, generator=g)
        x = torch.randn(t, d, device=dev, generator=g).bfloat16()
        q = [quantize_weight(torch.randn(*s, device=dev, generator=g) * 0.05) for s in ((e, i, d), (e, i, d), (e, d, i))]
        w = [q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1]]
        flops = 2 * 3 * d * i * idx.numel()
        outs = {}
        for bt in (64, 128):
            try:
                outs[bt] = routed_experts_triton(x, idx, wt, *w, grouped=True, grouped_block_t=bt)
                us = graph_us([lambda bt=bt: routed_experts_triton(x, idx, wt, *w, grouped=True, grouped_block_t=bt)])
            except Exception as ex:  # a config that does not compile (registers, shared memory)
                rows.append(dict(shape=name, t=t, block_t=bt, error=str(ex).splitlines()[0][:200]))
                print(f"{name} T={t} block_t={bt}: {rows[-1]['error']}")
                continue
            rows.append(dict(shape=name, t=t, block_t=bt, us=round(us, 1), tflops=round(flops / us / 1e6, 1),
                             share_of_peak=round(flops / us / 1e6 / peak, 3)))
            print(f"{name} T={t} block_t={bt}: {us / 1e3:.3f} ms, {flops / us / 1e6:.0f} TFLOP/s "
                  f"({flops / us / 1e6 / peak:.1%} of peak)")
        if len(outs) == 2:
            diff = ((outs[64].float() - outs[128].float()).abs().max() / outs[64].float().abs().max()).item()
            ref = routed_experts_reference(x[:64], idx[:64], wt[:64], *w)
            err = ((outs[128][:64].double() - ref.double()).norm() / ref.double().norm()).item()
            print(f"  block_t 128 vs 64: max rel diff {diff:.1e}; first 64 tokens vs reference: rel err {err:.1e}")
            rows.append(dict(shape=name, t=t, max_rel_diff_128_vs_64=diff, ref_rel_err_128=err))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(peak_tflops=peak, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
