"""Does programmatic dependent launch (PDL) hide the fixed cost of a decode kernel? (GPU measurement, issue 6.)

A batch-1 decode step is a chain of ~16 dependent phases per layer costing ~2-3 us each whatever their bytes
(docs/BENCHMARKS.md, fifth session). With PDL a kernel may start while its predecessor finishes: the work that does
not depend on the predecessor (a GEMV's weight and scale loads: all its bytes but the activation row) runs before
`gdc_wait()`, which returns once the predecessor's writes are visible. This script times a chain of dependent
row-parallel FP8 GEMVs (x [K] bf16 times e4m3 W [N, K] with 128x128 block scales, each consuming the previous
output; a different weight copy per link, so the chain streams from HBM, not L2), captured in one CUDA graph:
  plain  launched normally (as AOTInductor launches our kernels today);
  pdl    launched with launch_pdl=True: weights and scales loaded, then gdc_wait(), then x, then
         gdc_launch_dependents() and the dot product.
It prints us per GEMV for both, the ratio and the bandwidth, and checks that both chains give the same output.
If PDL takes ~1-2 us off each link, the runtime needs its own launch path for decode (AOTInductor's C++
launcher sets no launch attributes); if not, the fixed cost is in the kernels themselves.

    python scripts/bench_pdl.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from dsv3.kernels.bench import graph_us
from dsv3.kernels.fp8_blocks import quantize_weight

SIZES = (1024, 2048, 4096)  # square N = K, so each output feeds the next link
CHAIN = 48
# weight values per program (BLOCK_N rows x K): 128 fp32 per thread at 4 warps, as the GEMV 'rows' configs
# that did not spill (bench_rows.py); so BLOCK_N = 16 / 8 / 4 for K = 1024 / 2048 / 4096
ROW_ELEMS = 16384


def block_n(k: int) -> int:
    return max(1, min(16, ROW_ELEMS // k))


@triton.jit
def _chain_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, K, BLOCK_N: tl.constexpr, KB: tl.constexpr, PDL: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, KB)
    offs_k = offs_b[:, None] * 128 + tl.arange(0, 128)[None, :]
    w = tl.load(w_ptr + offs_n[:, None, None] * K + offs_k[None, :, :]).to(tl.float32)
    s = tl.load(s_ptr + (offs_n // 128)[:, None] * KB + offs_b[None, :])
    if PDL:
        tl.extra.cuda.gdc_wait()  # the predecessor's output (x) is complete and visible from here on
    x = tl.load(x_ptr + offs_k).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next link may start loading its weights
    y = tl.sum(tl.sum(w * x[None, :, :], axis=2) * s, axis=1)
    tl.store(y_ptr + offs_n, y.to(tl.bfloat16))


def run_chain(x, weights, outs, pdl: bool):
    k = x.shape[0]
    src = x
    for (w, s), y in zip(weights, outs):
        bn = block_n(k)
        _chain_gemv_kernel[(k // bn,)](src, w, s, y, k, BLOCK_N=bn, KB=k // 128, PDL=pdl, num_warps=4,
                                       launch_pdl=pdl)
        src = y
    return src


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    results = dict(device=torch.cuda.get_device_name(), chain=CHAIN, sizes={})
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k in SIZES:
        weights = []
        for _ in range(CHAIN):
            # scaled so the activations stay O(1) along the chain
            w = torch.randn(k, k, generator=gen, device="cuda") * (k ** -0.5)
            weights.append(quantize_weight(w))
        x = torch.randn(k, generator=gen, device="cuda").bfloat16()
        outs = {p: [torch.empty(k, device="cuda", dtype=torch.bfloat16) for _ in range(CHAIN)] for p in (False, True)}
        ref = run_chain(x, weights, outs[False], False).clone()
        got = run_chain(x, weights, outs[True], True)
        same = bool(torch.equal(ref, got))
        row = {}
        for pdl in (False, True):
            us = graph_us([lambda p=pdl: run_chain(x, weights, outs[p], p)])
            row["pdl" if pdl else "plain"] = us / CHAIN
        nbytes = k * k + (k // 128) ** 2 * 4
        row.update(bytes=nbytes, same_output=same)
        results["sizes"][k] = row
        print(f"GEMV {k} x {k} ({nbytes / 1e6:.2f} MB) chain of {CHAIN}: plain {row['plain']:.2f} us "
              f"({nbytes / row['plain'] / 1e6:.2f} TB/s), pdl {row['pdl']:.2f} us "
              f"({nbytes / row['pdl'] / 1e6:.2f} TB/s), {row['plain'] / row['pdl']:.2f}x, same output: {same}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
