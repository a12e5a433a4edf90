"""The prefill's FP8 GEMMs at short-prompt M (300-1024 tokens): cuBLAS's block-scaled GEMM (the model's path,
`scaled_mm_quantized` on an activation already quantized for it) against the Triton tiled GEMM (`fp8_gemm`) over a
grid of tile shapes, warps and stages, on the 16B prefill's dense shapes.

Why: the thirty-seventh session's 300-token profile showed these GEMMs at ~10 us per call (133 calls, 1.32 ms of a
7.95 ms prefill). At M 384 cuBLAS's 128x128 tiles make 3 x 16 = 48 CTAs for o_proj and 3 x 29 = 87 for qkv_a on 132
SMs: under one wave. Smaller row tiles make more programs. Each Triton config is checked against a float64 GEMM of
the same quantized operands (both paths within the FP8 bound), timed in CUDA graphs of 20 calls, best of 3
interleaved rounds.

    python3 scripts/sweep_small_m_gemm.py [--m 300,384,512,1024] [--json F]
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv3.kernels.bench import graph_us
from dsv3.kernels.fp8_blocks import dequantize_activation, dequantize_weight, quantize_weight
from dsv3.kernels.fp8_linear import act_quant, fp8_gemm, scaled_mm_quantized

SHAPES = {  # name: (N, K), 16B at world size 1
    "qkv_a (q 3072 + kv_a 576)": (3648, 2048),
    "o_proj": (2048, 2048),
    "shared gate_up (one GEMM)": (5632, 2048),
    "shared down (2 slots packed)": (2048, 3072),
}
CONFIGS = [(bm, bn, w, s) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (3, 4, 5)
           if not (bm == 128 and bn == 128 and w == 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="300,384,512,1024")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        w, s = quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.05)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            xq, xs = act_quant(x, pad_rows_to=4, scales_m_major=True, pad_k=True)
            ref = (dequantize_activation(xq[:m].contiguous(), xs[:m].contiguous()).double()
                   @ dequantize_weight(w, s).double().t())

            def rel(out):
                out = out[:m, :n].double()
                return ((out - ref).norm() / ref.norm()).item()

            calls = {"cublas": lambda: scaled_mm_quantized(xq, xs, w, s, torch.bfloat16)}
            for bm, bn, nw, ns in CONFIGS:
                calls[f"triton {bm}x{bn} w{nw} s{ns}"] = (
                    lambda bm=bm, bn=bn, nw=nw, ns=ns: fp8_gemm(xq[:m], xs[:m], w, s, torch.bfloat16, block_m=bm,
                                                                block_n=bn, num_warps=nw, num_stages=ns))
            errs = {}
            for key, fn in list(calls.items()):
                try:
                    errs[key] = rel(fn())
                except Exception as exc:  # a config Triton cannot compile (shared memory): skipped, said so
                    print(f"  {name} M {m}: {key} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    del calls[key]
                    continue
                if not errs[key] < 1e-2:
                    raise SystemExit(f"{name} M {m}: {key} rel err {errs[key]:.2e} against float64")
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for key, fn in calls.items():
                    best[key] = min(best.get(key, 1e9), graph_us([fn] * 20))
            top = min((key for key in best if key != "cublas"), key=best.get)
            flops = 2 * m * n * k
            row = {"shape": name, "n": n, "k": k, "m": m, "cublas_us": best["cublas"], "best_triton": top,
                   "best_triton_us": best[top], "us": best, "rel_err": errs}
            rows.append(row)
            print(f"{name:30s} M {m:5d}: cuBLAS {best['cublas']:7.2f} us ({flops / best['cublas'] / 1e6:6.1f} "
                  f"TFLOP/s), best Triton {top} {best[top]:7.2f} us ({flops / best[top] / 1e6:6.1f}): "
                  f"{best['cublas'] / best[top]:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
