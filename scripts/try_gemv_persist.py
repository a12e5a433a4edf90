"""Prototype: a persistent row-parallel FP8 GEMV at M = 1 that loads its next row block while it computes the current.

    python3 scripts/try_gemv_persist.py [--json out.json]     # ~2-3 min on an H200

Why: the row-parallel GEMV (`_fp8_gemv_rows_kernel`, one row block per program, every byte in one load) runs the
decode GEMVs at 1.1-1.8 TB/s. Its programs load, wait, compute and exit: with 2-4 waves of them, each wave pays the
full memory latency and nothing overlaps the compute. Here a grid of P programs per SM walks the row blocks with a
stride, and issues the next block's load (registers, raw e4m3) before computing the current one, so the memory
system always has a block per program in flight. x is quantized once per program (in the kernel, as 'rows').

Compared side by side (CUDA graphs over weight copies > 256 MB, as scripts/bench_rows.py): today's choice
(`fp8_gemv`, the GEMV_TUNED table) and the prototype over BLOCK_N x warps x programs per SM; every config checked
against `fp8_linear_reference` (relative error < 2e-2) before timing.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl

from dsv3.kernels._launch import cdiv, next_pow2, num_sms
from dsv3.kernels.bench import graph_us
from dsv3.kernels.fp8_blocks import quantize_weight
from dsv3.kernels.fp8_linear import dot_rows, fp8_gemv, fp8_linear_reference, k_blocks, load_x_row

SHAPES = {  # (N, K) of the decode GEMVs at M = 1
    "16B qkv_a": (3648, 2048), "16B o_proj": (2048, 2048), "16B dense.down": (2048, 10944),
    "671B-tp8 qkv_a": (2112, 7168), "671B-tp8 q_b": (3072, 1536), "671B-tp8 o_proj": (7168, 2048),
}


@triton.jit
def _load_raw(w_ptr, ws_ptr, blk, N, offs_b, offs_k, k_mask, kb_mask, stride_wn, stride_wsn, BLOCK_N: tl.constexpr):
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + offs_k[None, :, :],
                mask=n_mask[:, None, None] & k_mask[None, :, :], other=0.0)
    ws = tl.load(ws_ptr + (offs_n // 128)[:, None] * stride_wsn + offs_b[None, :],
                 mask=n_mask[:, None] & kb_mask[None, :], other=0.0)
    return w, ws


@triton.jit
def _gemv_persist_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, N, K, stride_wn, stride_wsn,
                         QUANT_X: tl.constexpr, BLOCK_N: tl.constexpr, KB_PAD: tl.constexpr):
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    offs_b, offs_k, k_mask, kb_mask = k_blocks(K, KB_PAD)
    w, ws = _load_raw(w_ptr, ws_ptr, pid, N, offs_b, offs_k, k_mask, kb_mask, stride_wn, stride_wsn, BLOCK_N)
    xq, xs = load_x_row(x_ptr, xs_ptr, offs_k, k_mask, offs_b, kb_mask, QUANT_X)
    for blk in range(pid, n_blocks, n_progs):
        # the next block's bytes are requested before this block's arithmetic (all-masked past the end)
        w_next, ws_next = _load_raw(w_ptr, ws_ptr, blk + n_progs, N, offs_b, offs_k, k_mask, kb_mask, stride_wn,
                                    stride_wsn, BLOCK_N)
        y = dot_rows(w.to(tl.float32), ws, xq, xs)
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)
        w, ws = w_next, ws_next


def gemv_persist(x, w, s, block_n, num_warps, per_sm):
    n, k = w.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    grid = min(cdiv(n, block_n), num_sms(x.device) * per_sm)
    _gemv_persist_kernel[(grid,)](x, x, w, s, out, n, k, w.stride(0), s.stride(0), QUANT_X=True, BLOCK_N=block_n,
                                  KB_PAD=next_pow2(cdiv(k, 128)), num_warps=num_warps)
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    results = {}
    for name, (n, k) in SHAPES.items():
        w0, s0 = (t.cuda() for t in quantize_weight(torch.randn(n, k, generator=gen) * 0.05))
        nbytes = n * k + s0.numel() * 4 + 2 * (k + n)
        copies = int(max(2, min(64, math.ceil(256e6 / nbytes))))
        ws = [(w0, s0)] + [(w0.clone(), s0.clone()) for _ in range(copies - 1)]
        x = torch.randn(1, k, generator=gen).bfloat16().cuda()
        ref = fp8_linear_reference(x, w0, s0)
        reps = max(5, math.ceil(200 / copies))
        base = [graph_us([lambda c=c: fp8_gemv(x, ws[c][0], ws[c][1], torch.bfloat16) for c in range(copies)], reps)]
        rows = []
        kb_pad = next_pow2(cdiv(k, 128))
        configs = [(bn, nw, ps) for bn in (1, 2, 4, 8) for nw in (4, 8) for ps in (1, 2, 4)
                   if bn * kb_pad * 128 <= 128 * nw * 32]  # raw tile <= 128 bytes per thread (two in flight)
        for bn, nw, ps in configs:
            try:
                err = rel(gemv_persist(x, w0, s0, bn, nw, ps), ref)
                if err > 2e-2:
                    rows.append(dict(bn=bn, warps=nw, per_sm=ps, error=f"rel err {err:.2e}"))
                    continue
                us = graph_us([lambda c=c: gemv_persist(x, ws[c][0], ws[c][1], bn, nw, ps) for c in range(copies)],
                              reps)
                rows.append(dict(bn=bn, warps=nw, per_sm=ps, us=us, err=err))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(bn=bn, warps=nw, per_sm=ps, error=repr(e)[:200]))
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        # confirm: the best three and today's choice again, interleaved
        for _ in range(2):
            base.append(graph_us([lambda c=c: fp8_gemv(x, ws[c][0], ws[c][1], torch.bfloat16)
                                  for c in range(copies)], reps))
            for r in ok[:3]:
                r.setdefault("again", []).append(graph_us(
                    [lambda c=c: gemv_persist(x, ws[c][0], ws[c][1], r["bn"], r["warps"], r["per_sm"])
                     for c in range(copies)], reps))
        for r in ok[:3]:
            r["median"] = sorted([r["us"]] + r["again"])[1]
        best = min(ok[:3], key=lambda r: r["median"]) if ok else None
        b_us = sorted(base)[1]
        line = f"{name:18s} {nbytes / 1e6:6.2f} MB  today {b_us:6.2f} us ({nbytes / b_us / 1e6:4.2f} TB/s)"
        if best:
            line += (f"  persistent {best['median']:6.2f} us ({nbytes / best['median'] / 1e6:4.2f} TB/s, "
                     f"{b_us / best['median']:.2f}x) bn={best['bn']} warps={best['warps']} per_sm={best['per_sm']}"
                     f" err {best['err']:.1e}")
        print(line, flush=True)
        print("   " + ", ".join(f"{r['bn']}/{r['warps']}/{r['per_sm']} {r['us']:.2f}" for r in ok[:8]), flush=True)
        bad = [r for r in rows if "error" in r]
        if bad:
            print(f"   {len(bad)} configs failed, e.g. {bad[0]}")
        results[name] = dict(n=n, k=k, bytes=nbytes, today_us=base, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
