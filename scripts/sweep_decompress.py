"""The default decompression of dsv3.mla_cached_prefill_attention (`_kv_decompress_tma_kernel`, persistent, TMA) and
launch configs of its pointer form `_kv_decompress_kernel`, against cuBLAS on the same rows (GPU measurement). 16B
shapes: 16 heads x (128 + 128) outputs from the 512-wide latent, a 32768-row cache, a later chunk ending at row 8192
/ 16384 / 32768. Each config is checked against F.linear on the rows it must
compute, then timed as CUDA-graph replays of 20 calls (median of 5).

    python3 scripts/sweep_decompress.py [--json out.json]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dsv3.kernels.bench import graph_us as bench_graph_us, save_json
from dsv3.kernels.mla_prefill import KEY_TILE_ROWS, kv_decompress_triton

CONFIGS = [  # (BLOCK_N, BLOCK_K, warps, stages); the first is the default
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3), (256, 64, 8, 4),
    (64, 64, 4, 3), (128, 32, 4, 4),
]


def graph_us(fn, calls: int = 20) -> float:
    """Median microseconds per call of fn, replayed as `calls` back-to-back calls in one CUDA graph."""
    return bench_graph_us([fn] * calls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    t_cap, c, n = 32768, 512, 16 * 256
    cache = torch.randn(1, t_cap, c + 64, device=dev, generator=g).bfloat16()
    w = (torch.randn(n, c, device=dev, generator=g) * c ** -0.5).bfloat16()
    rows = []
    for end in (8192, 16384, 32768):
        pos = (end - 4096 + torch.arange(4096, device=dev))[None]
        want = F.linear(cache[0, :end, :c], w)
        flops = 2 * end * n * c
        base = graph_us(lambda: F.linear(cache[0, :end, :c], w))
        print(f"rows {end}: cuBLAS {base:.1f} us ({flops / base / 1e6:.0f} TFLOP/s)")
        for bn, bk, warps, stages in [(None, None, None, None)] + CONFIGS:  # None: the default launch
            cfg = {} if bn is None else dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
            out = kv_decompress_triton(cache, pos, w, **cfg)
            err = ((out[0, :end, :n].float() - want.float()).norm() / want.float().norm()).item()
            us = graph_us(lambda: kv_decompress_triton(cache, pos, w, **cfg))
            rows.append(dict(rows=end, block_n=bn, block_k=bk, warps=warps, stages=stages, us=round(us, 2),
                             cublas_us=round(base, 2), rel_err=err))
            label = "default (TMA, persistent)" if bn is None else f"{bn:3d} x {bk:3d}, {warps} warps, {stages} stages"
            print(f"  {label}: {us:8.1f} us "
                  f"({flops / us / 1e6:4.0f} TFLOP/s, {base / us:.2f}x cuBLAS), rel err {err:.1e}")
    assert KEY_TILE_ROWS == 128
    if args.json:
        save_json(args.json, rows)


if __name__ == "__main__":
    main()
