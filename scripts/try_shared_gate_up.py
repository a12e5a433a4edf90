"""The prefill's shared-expert MLP (16B: two stacked shared experts, gate / up 2816 x 2048 each): gate and up as two
cuBLAS block-scaled GEMMs (dsv3.fp8_swiglu today: their rows live in two tensors) against one GEMM over the rows
side by side (a [5632, 2048] prefill copy of the weights), at the prefill buckets' M. Outputs compared bitwise
(each output column is the same dot product either way), timed in CUDA graphs, interleaved rounds.

    python3 scripts/try_shared_gate_up.py [--json F]
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv3.kernels.bench import graph_us
from dsv3.kernels.fp8_blocks import quantize_weight
from dsv3.kernels.fp8_linear import act_quant, scaled_mm_quantized

N, K = 2816, 2048  # 16B: 2 shared experts x moe_intermediate_size 1408, hidden 2048


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="384,1024,2048,4096")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    gw, gs = quantize_weight(torch.randn(N, K, device="cuda", generator=g) * 0.05)
    uw, us = quantize_weight(torch.randn(N, K, device="cuda", generator=g) * 0.05)
    fw, fs = torch.cat([gw.view(torch.uint8), uw.view(torch.uint8)]).view(gw.dtype), torch.cat([gs, us])
    rows = []
    for m in (int(v) for v in args.m.split(",")):
        x = torch.randn(m, K, device="cuda", generator=g).bfloat16()
        xq, xs = act_quant(x, pad_rows_to=4, scales_m_major=True, pad_k=True)

        def two():
            return scaled_mm_quantized(xq, xs, gw, gs, x.dtype), scaled_mm_quantized(xq, xs, uw, us, x.dtype)

        def one():
            return scaled_mm_quantized(xq, xs, fw, fs, x.dtype)

        a, b = two()
        f = one()
        same = torch.equal(f[:, :N], a) and torch.equal(f[:, N:], b)
        best = {}
        for _ in range(5):
            for name, fn in (("two", two), ("one", one)):
                best[name] = min(best.get(name, 1e9), graph_us([fn] * 20))
        flops = 2 * m * 2 * N * K
        row = {"m": m, "two_us": best["two"], "one_us": best["one"], "bitwise": same,
               "two_tflops": flops / best["two"] / 1e6, "one_tflops": flops / best["one"] / 1e6}
        rows.append(row)
        print("M {m:5d}: gate + up as two GEMMs {two_us:7.2f} us ({two_tflops:6.1f} TFLOP/s), one GEMM "
              "{one_us:7.2f} us ({one_tflops:6.1f}); outputs bitwise equal: {bitwise}".format(**row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
