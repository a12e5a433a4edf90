"""Whether cuBLASLt's workspace size changes the prefill's block-scaled FP8 GEMMs (and their memsets).

A 4095-token prefill of the 16B model (H200, 2026-11-26 profile) runs 136 cuBLAS block-scaled GEMMs, each preceded
by a ~0.8 us `Memset` that cuBLASLt issues itself, with a kernel boundary (~1.8 us of idle GPU) on each side. torch
passes cuBLASLt a workspace whose size the environment variable CUBLASLT_WORKSPACE_SIZE (KiB) sets; algorithms that
need one (stream-K / split-K schedules with counters the memset zeroes) are out without it. For each setting, in a
fresh process (the size is read once): one prompt's prefill through the runtime on artifacts with weights
generated on the GPU, the plain call (graph buckets set aside) and the runtime's default path, alternated, median of
--reps ms each; then one profiled plain call: memsets, cuBLAS kernels (count, us), all kernels (us).

    python scripts/try_cublaslt_workspace.py ART_DIR [--length 4095] [--reps 9] [--sizes default,0,0+VAR=VALUE]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(artifacts: str, length: int, reps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dsv3.runtime.engine import artifact_stepper
    from dsv3.runtime.parallel import ParallelPlan

    stepper, _ = artifact_stepper(artifacts, None, ParallelPlan(0, 1), "cuda", progress=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, stepper.model.cfg.vocab_size, (length,), generator=g).tolist()
    buckets, later = dict(stepper.short_prefill), stepper.later_prefill

    def plain():
        stepper.short_prefill.clear()
        stepper.later_prefill = None
        try:
            return stepper.prefill([prompt])
        finally:
            stepper.short_prefill.update(buckets)
            stepper.later_prefill = later

    def default():
        return stepper.prefill([prompt])

    times: dict[str, list[float]] = {"plain": [], "default": []}
    for fn in (plain, default):
        fn()
    torch.cuda.synchronize()
    for _ in range(reps):
        for name, fn in (("plain", plain), ("default", default)):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(1e3 * (time.perf_counter() - t0))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        plain()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    def us(e) -> float:
        return e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total

    memsets = [e for e in events if "memset" in e.name.lower()]
    ordered = sorted(events, key=lambda e: e.time_range.start)
    after = {ordered[i + 1].name[:90] for i, e in enumerate(ordered[:-1]) if "memset" in e.name.lower()}
    cublas = [e for e in events if any(k in e.name for k in ("nvjet", "xmma", "cutlass", "gemm", "Gemm"))
              and "triton" not in e.name]
    return {"plain_ms": statistics.median(times["plain"]), "default_ms": statistics.median(times["default"]),
            "memsets": len(memsets), "memset_us": sum(map(us, memsets)), "cublas_kernels": len(cublas),
            "cublas_us": sum(map(us, cublas)), "kernels": len(events) - len(memsets),
            "kernel_us": sum(us(e) for e in events if e not in memsets),
            "cublas_names": sorted({e.name[:90] for e in cublas})[:8], "after_memsets": sorted(after)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts")
    ap.add_argument("--length", type=int, default=4095)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--sizes", default="default,0,64,1024",
                    help="CUBLASLT_WORKSPACE_SIZE values (KiB; default: unset), each optionally with more VAR=VALUE "
                         "settings after '+' (0+CUBLAS_WORKSPACE_CONFIG=:0:0)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.artifacts, args.length, args.reps)), flush=True)
        return
    rows = []
    for size in args.sizes.split(","):
        env = dict(os.environ)
        env.pop("CUBLASLT_WORKSPACE_SIZE", None)
        kib, *extra = size.split("+")
        if kib != "default":
            env["CUBLASLT_WORKSPACE_SIZE"] = kib
        env.update(kv.split("=", 1) for kv in extra)
        res = subprocess.run([sys.executable, __file__, args.artifacts, "--length", str(args.length), "--reps",
                              str(args.reps), "--child"], env=env, capture_output=True, text=True)
        line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"workspace {size}: failed (rc {res.returncode})\n{res.stderr[-2000:]}", flush=True)
            continue
        row = {"workspace_kib": size, **json.loads(line[7:])}
        rows.append(row)
        print(f"workspace {size}: plain {row['plain_ms']:.2f} ms, default path {row['default_ms']:.2f} | profiled "
              f"plain call: {row['memsets']} memsets ({row['memset_us']:.0f} us), {row['cublas_kernels']} cuBLAS "
              f"kernels {row['cublas_us']:.0f} us, {row['kernels']} kernels {row['kernel_us']:.0f} us", flush=True)
        print("   cuBLAS kernels: " + "; ".join(row["cublas_names"]), flush=True)
        print("   after a memset: " + "; ".join(row["after_memsets"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
