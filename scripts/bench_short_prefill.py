"""What a short prompt's prefill would gain from a static-shape graph: at T tokens (8-256), the routed experts'
grouped path (what the dynamic-T prefill graph runs: tiles of 64 pairs, the prefill plan), the same path with the
sparse-tile plan (tiles of 32 pairs, 3-stage up and down kernels at 4 warps: what a static T with few pairs per
expert takes, `sparse_tiles`) and the decode path (dsv3.routed_experts with its decode plan, what a static T <= DECODE_MAX_T
takes), and the dense FP8 linears' cuBLAS path (act-quant +
block-scaled scaled_mm: a dynamic M) against the decode GEMV (a static M <= GEMV_MAX_M). 16B shapes, each form in
a CUDA graph over weight copies larger than L2, outputs compared.

    python3 scripts/bench_short_prefill.py [--json F]
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv3.kernels import fp8_linear as FL
from dsv3.kernels import routed_experts as RE
from dsv3.kernels.bench import graph_us
from dsv3.kernels.fp8_blocks import quantize_weight

TOKENS = (8, 16, 32, 64, 128, 256)
N_ROUTED, TOP_K, N_SHARED, D, I = 64, 6, 2, 2048, 1408  # 16B: top-6 of 64 + 2 shared experts stacked as slots
LINEARS = {"qkv_a (fused q + kv_a)": (3648, 2048), "o_proj": (2048, 2048)}
# the grouped forms pin their tile (a static T would otherwise take the sparse tiles by itself, `RE.sparse_tiles`):
# 64 pairs with the prefill plan, and the sparse plan's tiles and launch fields as the kernel module defines them
SPARSE = dict(grouped=True, grouped_block_t=RE.SPARSE_TILE_PAIRS,
              **{f: getattr(RE.GROUPED_SPARSE_FP8, f) for f in ("up_num_warps", "up_num_stages", "down_block_n",
                                                                 "down_num_warps", "down_num_stages")})
MOE_FORMS = (("grouped", dict(grouped=True, grouped_block_t=RE.GROUPED_BLOCK_T)), ("sparse", SPARSE),
             ("decode", dict(grouped=False)))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    e = N_ROUTED + N_SHARED
    shapes = ((e, I, D), (e, I, D), (e, D, I))
    copies = 2  # 2 x 570 MB of experts: no replay finds the previous one's weights in L2
    ws = []
    for _ in range(copies):
        q = [quantize_weight(torch.randn(*sh, device="cuda") * 0.05) for sh in shapes]
        ws.append([q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1]])
    lin = {name: [quantize_weight(torch.randn(n, k, device="cuda") * 0.05) for _ in range(8)]
           for name, (n, k) in LINEARS.items()}
    rows = []
    for t in TOKENS:
        routed = torch.stack([torch.randperm(N_ROUTED, device="cuda")[:TOP_K] for _ in range(t)])
        shared = torch.arange(N_ROUTED, e, device="cuda").expand(t, N_SHARED)
        idx = torch.cat([routed, shared], 1)
        wt = torch.rand(idx.shape, device="cuda")
        x = torch.randn(t, D, device="cuda", dtype=torch.bfloat16)
        row = {"t": t}
        outs = {name: RE.routed_experts_triton(x, idx, wt, *ws[0], **kw) for name, kw in MOE_FORMS}
        row["moe_rel"] = rel(outs["decode"], outs["grouped"])
        row["moe_sparse_equal"] = torch.equal(outs["sparse"], outs["grouped"])
        for _ in range(3):
            for name, kw in MOE_FORMS:
                us = graph_us([lambda w=w, kw=kw: RE.routed_experts_triton(x, idx, wt, *w, **kw) for w in ws] * 4)
                row[f"moe_{name}_us"] = min(row.get(f"moe_{name}_us", 1e9), us)
        for name, qs in lin.items():
            key = name.split()[0]
            if t > FL.GEMV_MAX_M:  # the GEMV takes up to GEMV_MAX_M tokens: cuBLAS either way
                row.update({f"{key}_rel": float("nan"), f"{key}_gemv_us": float("nan")})
                row[f"{key}_scaled_mm_us"] = graph_us([lambda q=q: FL.fp8_scaled_mm(x, *q) for q in qs] * 2)
                continue
            a = FL.fp8_scaled_mm(x, *qs[0])
            b = FL.fp8_gemv(x, *qs[0], x.dtype)
            row[f"{key}_rel"] = rel(b, a)
            for _ in range(3):
                for form, fn in (("scaled_mm", lambda q: FL.fp8_scaled_mm(x, *q)),
                                 ("gemv", lambda q: FL.fp8_gemv(x, *q, x.dtype))):
                    us = graph_us([lambda q=q, fn=fn: fn(q) for q in qs] * 2)
                    row[f"{key}_{form}_us"] = min(row.get(f"{key}_{form}_us", 1e9), us)
        rows.append(row)
        print("T {t:3d}: MoE grouped {moe_grouped_us:6.1f} us, sparse tiles {moe_sparse_us:6.1f} (bitwise "
              "{moe_sparse_equal}), decode path {moe_decode_us:6.1f} us (rel {moe_rel:.1e});"
              " qkv_a scaled_mm {qkv_a_scaled_mm_us:5.1f} / gemv {qkv_a_gemv_us:5.1f} us;"
              " o_proj scaled_mm {o_proj_scaled_mm_us:5.1f} / gemv {o_proj_gemv_us:5.1f} us".format(**row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
