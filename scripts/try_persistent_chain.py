"""Would a persistent decode kernel beat one launch per phase? A chain of dependent M = 1 FP8 GEMVs, three ways.

The batch-1 decode step is a chain of ~10 dependent kernels per layer, each costing ~2.5 us of launch, first-byte
latency and tail on top of its bytes (docs/BENCHMARKS.md: L2 warming, PDL and a software-pipelined GEMV did not move
that part). A persistent ("mega") kernel replaces the kernel boundaries with grid barriers and can issue the next
phase's weight loads before it waits (weights do not depend on the previous phase), so their latency overlaps the
barrier. Before building one for the model, this measures the idea on the simplest chain: CHAIN links y = W x of
e4m3 W [K, K] with 128x128 block scales (a different weight per link, so the chain streams from HBM), x in bf16,
each link's output the next one's input (as `scripts/bench_pdl.py`):

  launched     one `bench_pdl._chain_gemv_kernel` launch per link (BLOCK_N rows per program), in one CUDA graph;
  persistent   one launch for the whole chain: K / BLOCK_N programs (<= the SM count, all resident), each computing
               its BLOCK_N rows of every link; after a link it stores its rows and arrives at a grid barrier (an
               atomic counter, release), and waits for every program's arrival (acquire) before reading x;
  prefetch     the same with each link's weight rows and scales loaded before the wait.

Same BLOCK_N, warps and reduction shape in all three, so the outputs must be bitwise equal. A spin limit turns a
barrier that never completes (programs not co-resident) into a reported failure instead of a hung GPU. Prints us
per link and TB/s per variant. If `prefetch` takes ~1.5-2 us off each link against `launched`, a persistent layer
kernel is worth building (~10 phases per layer: ~0.4-0.5 ms per 16B token); if not, the fixed cost is inside the
phases, not between them.

    python scripts/try_persistent_chain.py [--sizes 1024,2048] [--chain 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pdl import _chain_gemv_kernel  # noqa: E402

SPIN_LIMIT = tl.constexpr(1 << 20)  # polls (~1 s) of the barrier counter before a program gives up and flags it


@triton.jit
def _grid_wait(bar_ptr, err_ptr, target):
    """Spin until the counter reaches target (acquire), at most SPIN_LIMIT polls; past that, flag err and go on."""
    cnt = tl.atomic_add(bar_ptr, 0, sem="acquire")
    polls = tl.full((), 0, tl.int32)
    while (cnt < target) & (polls < SPIN_LIMIT):
        cnt = tl.atomic_add(bar_ptr, 0, sem="acquire")
        polls += 1
    if cnt < target:
        tl.atomic_xchg(err_ptr, 1)
    tl.debug_barrier()  # every thread of the program reads x after the acquire


@triton.jit
def _chain_persistent_kernel(x_ptr, w_ptr, s_ptr, y_ptr, bar_ptr, err_ptr, K, CHAIN, stride_wl, stride_sl,
                             BLOCK_N: tl.constexpr, KB: tl.constexpr, PREFETCH: tl.constexpr):
    nprog = tl.num_programs(0)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, KB)
    offs_k = offs_b[:, None] * 128 + tl.arange(0, 128)[None, :]
    w_off = offs_n[:, None, None] * K + offs_k[None, :, :]
    s_off = (offs_n // 128)[:, None] * KB + offs_b[None, :]
    src = x_ptr
    for link in range(CHAIN):
        if PREFETCH:  # weights and scales in flight while this program waits for the others (used after it)
            w = tl.load(w_ptr + link * stride_wl + w_off)
            s = tl.load(s_ptr + link * stride_sl + s_off)
            _grid_wait(bar_ptr, err_ptr, link * nprog)
        else:
            _grid_wait(bar_ptr, err_ptr, link * nprog)
            w = tl.load(w_ptr + link * stride_wl + w_off)
            s = tl.load(s_ptr + link * stride_sl + s_off)
        # x from L2 (.cg): another SM wrote it, and this SM's L1 may hold the same addresses from an earlier replay
        x = tl.load(src + offs_k, cache_modifier=".cg").to(tl.float32)
        y = tl.sum(tl.sum(w.to(tl.float32) * x[None, :, :], axis=2) * s, axis=1)
        dst = y_ptr + link * K
        tl.store(dst + offs_n, y.to(tl.bfloat16))
        tl.debug_barrier()  # every thread's store before the arrival
        tl.atomic_add(bar_ptr, 1, sem="release")
        src = dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,2048")
    ap.add_argument("--chain", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    from dsv3.kernels.bench import graph_us
    from dsv3.kernels.fp8_blocks import quantize_weight

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = dict(device=torch.cuda.get_device_name(), chain=args.chain, sms=sms, sizes={})
    for k in (int(v) for v in args.sizes.split(",")):
        # rows per program so that K / BLOCK_N programs fit on the SMs at once (the barrier needs them resident)
        bn = max(1, triton.next_power_of_2(-(-k // sms)))
        warps = 4 if bn * k <= 16384 else 8
        ws, ss = zip(*(quantize_weight(torch.randn(k, k, generator=gen, device="cuda") * (k ** -0.5))
                       for _ in range(args.chain)))
        w, s = torch.stack(ws), torch.stack(ss)  # [CHAIN, K, K] e4m3, [CHAIN, K/128, K/128]
        x = torch.randn(k, generator=gen, device="cuda").bfloat16()
        outs = {v: torch.empty(args.chain, k, device="cuda", dtype=torch.bfloat16)
                for v in ("launched", "persistent", "prefetch")}
        bar = torch.zeros(1, dtype=torch.int32, device="cuda")
        err = torch.zeros(1, dtype=torch.int32, device="cuda")

        def launched():
            src = x
            for link in range(args.chain):
                _chain_gemv_kernel[(k // bn,)](src, w[link], s[link], outs["launched"][link], k, BLOCK_N=bn,
                                               KB=k // 128, PDL=False, num_warps=warps)
                src = outs["launched"][link]

        def persistent(prefetch: bool):
            bar.zero_()  # one memset node per chain in the graph
            _chain_persistent_kernel[(k // bn,)](
                x, w, s, outs["prefetch" if prefetch else "persistent"], bar, err, k, args.chain, w.stride(0),
                s.stride(0), BLOCK_N=bn, KB=k // 128, PREFETCH=prefetch, num_warps=warps)

        calls = {"launched": launched, "persistent": lambda: persistent(False), "prefetch": lambda: persistent(True)}
        for fn in calls.values():
            fn()
        torch.cuda.synchronize()
        row = dict(block_n=bn, programs=k // bn, warps=warps, barrier_failed=bool(err.item()))
        row["same_output"] = {v: bool(torch.equal(outs[v], outs["launched"])) for v in ("persistent", "prefetch")}
        nbytes = k * k + (k // 128) ** 2 * 4
        if row["barrier_failed"]:  # programs not all resident: timing it would only spin
            print(f"K {k}: a grid barrier never completed ({k // bn} programs); not timed", flush=True)
            results["sizes"][k] = row
            continue
        for name, fn in calls.items():
            us = graph_us([fn]) / args.chain
            row[name] = dict(us=round(us, 3), tbs=round(nbytes / us / 1e6, 2))
        row["barrier_failed"] = row["barrier_failed"] or bool(err.item())
        results["sizes"][k] = row
        print(f"K {k} ({nbytes / 1e6:.2f} MB per link, {k // bn} programs x {bn} rows, {warps} warps), chain of "
              f"{args.chain}: " + ", ".join(f"{n} {row[n]['us']:.2f} us ({row[n]['tbs']:.2f} TB/s)" for n in calls)
              + f"; launched / prefetch {row['launched']['us'] / row['prefetch']['us']:.2f}x; bitwise equal "
              f"{row['same_output']}; barrier failed {row['barrier_failed']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
