"""Time one FP8 linear inside an AOTInductor package (dynamic M) with the cuBLAS path (K padded to a multiple of 512
for v1 `_scaled_mm`) against the Triton GEMM (DSV3_AOTI_SCALED_MM=0), at prefill M, in CUDA events.

    CXX=/usr/bin/g++ python3 scripts/bench_aoti_k.py [--m 4096] [--shapes 2048x1408,1408x2048]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch


class OneLinear(torch.nn.Module):
    def forward(self, x, w, s):
        return torch.ops.dsv3.fp8_linear(x, w, s)


def time_us(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--shapes", default="2048x1408", help="NxK, comma-separated")
    opts = ap.parse_args()
    import dsv3.kernels  # noqa: F401
    from dsv3.kernels.fp8_blocks import quantize_weight

    for shape in opts.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w, s = quantize_weight(torch.randn(n, k, device="cuda") * 0.05)
        x = torch.randn(opts.m, k, device="cuda", dtype=torch.bfloat16)
        outs, times = {}, {}
        for label, flag in (("cublas_padded_k", "1"), ("triton", "0")):
            os.environ["DSV3_AOTI_SCALED_MM"] = flag
            torch._dynamo.reset()
            ep = torch.export.export(OneLinear(), (x, w, s),
                                     dynamic_shapes=({0: torch.export.Dim("m", min=65, max=65536)}, None, None))
            with tempfile.TemporaryDirectory() as d:
                runner = torch._inductor.aoti_load_package(
                    torch._inductor.aoti_compile_and_package(ep, package_path=f"{d}/{label}.pt2"))
                outs[label] = runner(x, w, s)
                times[label] = time_us(lambda: runner(x, w, s))
        diff = ((outs["cublas_padded_k"].float() - outs["triton"].float()).norm() / outs["triton"].float().norm()).item()
        flops = 2 * opts.m * n * k
        print(f"N={n} K={k} M={opts.m}: " + ", ".join(
            f"{lbl} {us:.1f} us ({flops / us / 1e6:.0f} TFLOP/s)" for lbl, us in times.items())
            + f"; rel diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
