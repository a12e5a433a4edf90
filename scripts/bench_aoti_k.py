"""Time one FP8 linear inside an AOTInductor package (dynamic M) at prefill M: the GPU kernels it launches (names
and device time per call, torch.profiler), so the path taken is visible. Run once per setting, each in a fresh
process with its own Inductor cache (the setting is read at trace time):

    CXX=/usr/bin/g++ python3 scripts/bench_aoti_k.py [--m 4096] [--shapes 2048x1408,3072x2048]
    CXX=/usr/bin/g++ DSV3_AOTI_SCALED_MM=0 TORCHINDUCTOR_CACHE_DIR=/tmp/other python3 scripts/bench_aoti_k.py
(default: cuBLAS, K padded to a multiple of 512 for v1 `_scaled_mm`; DSV3_AOTI_SCALED_MM=0: the Triton GEMM)
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
        ep = torch.export.export(OneLinear(), (x, w, s),
                                 dynamic_shapes=({0: torch.export.Dim("m", min=65, max=65536)}, None, None))
        with tempfile.TemporaryDirectory() as d:
            runner = torch._inductor.aoti_load_package(
                torch._inductor.aoti_compile_and_package(ep, package_path=f"{d}/one.pt2"))
            wall = time_us(lambda: runner(x, w, s))
            reps = 20
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    runner(x, w, s)
                torch.cuda.synchronize()
        kernels = sorted(((e.key, e.device_time_total / reps) for e in prof.key_averages() if e.device_time_total > 0),
                         key=lambda kv: -kv[1])
        total = sum(t for _, t in kernels)
        flops = 2 * opts.m * n * k
        print(f"N={n} K={k} M={opts.m} DSV3_AOTI_SCALED_MM={os.environ.get('DSV3_AOTI_SCALED_MM', '1')}: "
              f"{total:.1f} us of kernels per call ({flops / total / 1e6:.0f} TFLOP/s), {wall:.1f} us wall; "
              + "; ".join(f"{name[:60]} {t:.1f}" for name, t in kernels[:4]), flush=True)

if __name__ == "__main__":
    main()
