"""Does the FP8 GEMM peak that prefill MFU is quoted against hold under sustained load? (device script)

`dsv3c bench` measures its FP8 peak as a ~15 ms burst of 20 n^3 `torch._scaled_mm` calls (`fp8_gemm_peak`); a
4095-token 16B prefill (~40 ms) runs at the H200's 700 W power cap with the SM clock at 1800-1920 MHz
(docs/BENCHMARKS.md, thirty-fourth session). This script times the same GEMM, and cuBLAS's block-scaled form the
model's dense projections use (`scaled_mm_quantized`: 1x128 activation and 128x128 weight scales), first as that
burst and then back to back for `--seconds`, in windows of `--window` calls timed with CUDA events, while
`nvidia-smi` samples SM clock, power and the clock event reasons every 20 ms. It prints each phase's TFLOP/s
(burst, first window, median and last windows of the sustained run) next to the samples' median power and clock,
and writes everything as JSON (`--json`).

    python scripts/bench_gemm_power.py --seconds 3 --json $OUT/gemm_power.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from dsv3.runtime.bench import back_to_back

SMI_FIELDS = "timestamp,clocks.sm,power.draw,clocks_event_reasons.active,temperature.gpu"


def per_tensor_gemm(n: int):
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def block_scaled_gemm(n: int):
    """The model's cuBLAS path at M = N = K = n: e4m3 operands, activation scales per 1x128 (M-major), weight
    scales per 128x128 block."""
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    w = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    xs = torch.rand(n // 128, n, device="cuda").add_(0.5).t()  # [M, K/128], strides (1, M)
    ws = torch.rand(n // 128, n // 128, device="cuda").add_(0.5)
    return lambda: F.scaled_mm(a, w.t(), xs, F.ScalingType.BlockWise1x128, ws.t(), F.ScalingType.BlockWise128x128,
                               output_dtype=torch.bfloat16)


def utc(t: float | None = None) -> str:
    """nvidia-smi's timestamp format, in UTC, for time.time() value `t` (default: now)."""
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]


def run_phase(gemm, flop: float, window: int, seconds: float) -> dict:
    """A burst of `window` calls, then windows of `window` calls back to back for `seconds` (`back_to_back`: no host
    sync between windows, the GPU never idles)."""
    gemm()
    torch.cuda.synchronize()
    start = utc()
    t0 = time.perf_counter()
    for _ in range(window):
        gemm()
    torch.cuda.synchronize()
    burst = flop * window / (time.perf_counter() - t0) / 1e12
    burst_end = utc()
    time.sleep(0.5)  # let the clock recover, so the sustained run starts as the burst did
    sustained_start = utc()
    runs = back_to_back(lambda: [gemm() for _ in range(window)], seconds)
    rates = [flop * window / (ms / 1e3) / 1e12 for ms, _ in runs]
    return {"burst_utc": start, "burst_end_utc": burst_end, "sustained_utc": sustained_start, "end_utc": utc(),
            "burst_tflops": burst, "windows_tflops": rates}


@contextmanager
def smi_sampling():
    """`nvidia-smi` samples (SMI_FIELDS) every 20 ms while the block runs; the yielded list holds them, parsed,
    once the block has ended."""
    samples: list[dict] = []
    smi_file = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False)
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader", "-lms", "20"],
                           stdout=smi_file, stderr=subprocess.DEVNULL)
    try:
        yield samples
    finally:
        time.sleep(0.3)
        smi.terminate()
        smi.wait()
        smi_file.close()
        samples.extend(parse_smi(smi_file.name))


def samples_between(samples: list[dict], start: str, end: str) -> dict:
    sel = [s for s in samples if start <= s["utc"] <= end]
    if not sel:
        return {}
    return {"n": len(sel), "power_w": statistics.median(s["power"] for s in sel),
            "sm_mhz": statistics.median(s["sm"] for s in sel), "reasons": sorted({s["reasons"] for s in sel})}


def parse_smi(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 5:
                continue
            try:
                out.append({"utc": parts[0].replace("-", "/"), "sm": float(parts[1].split()[0]),
                            "power": float(parts[2].split()[0]), "reasons": parts[3], "temp": float(parts[4])})
            except ValueError:
                continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192, help="M = N = K of the GEMM (default 8192, as dsv3c bench)")
    ap.add_argument("--window", type=int, default=20, help="calls per timed window (default 20, dsv3c bench's burst)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each sustained run (default 3)")
    ap.add_argument("--json", help="write the phases, windows and nvidia-smi samples here")
    args = ap.parse_args()
    flop = 2.0 * args.n ** 3
    with smi_sampling() as samples:
        time.sleep(1.0)
        idle = (utc(), None)
        time.sleep(0.5)
        idle = (idle[0], utc())
        phases = {}
        for name, make in (("per-tensor", per_tensor_gemm), ("block-scaled", block_scaled_gemm)):
            phases[name] = run_phase(make(args.n), flop, args.window, args.seconds)
            time.sleep(1.0)
    print(f"idle: {samples_between(samples, *idle)}")
    for name, p in phases.items():
        w = p["windows_tflops"]
        print(f"{name} {args.n}^3: burst of {args.window} {p['burst_tflops']:.0f} TFLOP/s "
              f"{samples_between(samples, p['burst_utc'], p['burst_end_utc'])}")
        print(f"  sustained {args.seconds:.1f} s, {len(w)} windows: first {w[0]:.0f}, "
              f"median {statistics.median(w):.0f}, "
              f"min {min(w):.0f}, last quarter median {statistics.median(w[3 * len(w) // 4:]):.0f} TFLOP/s "
              f"{samples_between(samples, p['sustained_utc'], p['end_utc'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "window": args.window, "phases": phases, "smi": samples}, f, indent=1)


if __name__ == "__main__":
    main()
