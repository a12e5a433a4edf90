"""W8A16 one-token GEMV (`dsv3.fp8_linear_a16`) launch configs against the W8A8 op at the models' shapes (GPU).

    python scripts/sweep_a16.py [--json out.json] [--calls 24] [--m 1]

Why: the row-parallel kernel re-reads x in every program. With bf16 x (W8A16) that traffic is twice the e4m3 x's,
and at 2 rows per program over K = 7168 it equals the weight's own bytes: in the 671B rank profile (seventeenth session,
docs/BENCHMARKS.md) the qkv_a and dense gate/up GEMVs ran 0.6-2.8 us slower as W8A16 than
W8A8's act-quant + rows kernel, while the others ran faster. For each shape this times, in CUDA graphs of `--calls`
calls on distinct weight copies (streamed from HBM, not L2), the W8A8 op as the model runs it (`fp8_linear`'s
dispatch: its table config, with its act-quant launch where it has one) and `fp8_gemv_a16` at every legal
(block_n, num_warps), checks each against float64, and prints the best W8A16 config per shape as a table
(A16_TUNED rows) with the ratio to W8A8. `--m`: tokens per call (default 1, the batch-1 step; the W8A16 op takes up
to A16_ROWS_MAX_M, M_TILE tokens per program), e.g. 8 for a batch-8 step, which runs W8A8 today.
"""

from __future__ import annotations

import argparse

import torch

from dsv3.kernels import fp8_linear as L
from dsv3.kernels.bench import graph_us, save_json
from dsv3.kernels.fp8_blocks import dequantize_weight, quantize_weight

# (name, N, K): 16B at world size 1, 671B at world size 8 (one rank's shards), as the models run them at batch 1
SHAPES = [
    ("16B qkv_a", 3648, 2048), ("16B o_proj", 2048, 2048), ("16B dense gate", 10944, 2048),
    ("16B dense down", 2048, 10944),
    ("671B-tp8 qkv_a", 2112, 7168), ("671B-tp8 q_b", 3072, 1536), ("671B-tp8 o_proj", 7168, 2048),
    ("671B-tp8 dense gate/up", 4608, 7168), ("671B-tp8 dense down", 7168, 2304),
    ("671B-tp8 shared gate/up", 512, 7168), ("671B-tp8 shared down", 7168, 256),
]
BLOCK_NS = (1, 2, 4, 8)
WARPS = (4, 8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--calls", type=int, default=24)
    ap.add_argument("--m", type=int, default=1, help=f"tokens per call (1..{L.A16_ROWS_MAX_M})")
    ap.add_argument("--shapes", default=None, help="comma-separated name prefixes of SHAPES (default all)")
    args = ap.parse_args()
    if not 1 <= args.m <= L.A16_ROWS_MAX_M:
        ap.error(f"--m {args.m}: 1..{L.A16_ROWS_MAX_M}")
    shapes = [sh for sh in SHAPES if args.shapes is None or any(sh[0].startswith(p) for p in args.shapes.split(","))]
    out = {"device": torch.cuda.get_device_name(), "shapes": {}}
    table = {}
    out["m"] = args.m
    for name, n, k in shapes:
        copies = [quantize_weight(torch.randn(n, k, device="cuda") * 0.05) for _ in range(args.calls)]
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ dequantize_weight(*copies[0]).double().t()
        w8a8 = graph_us([lambda w=w, s=s: torch.ops.dsv3.fp8_linear(x, w, s) for w, s in copies])
        row = {"w8a8_us": round(w8a8, 2), "a16": {}}
        kb_pad = L.next_pow2(L.cdiv(k, 128))
        for bn in BLOCK_NS:
            for nw in WARPS:
                if bn * kb_pad * 128 // (32 * nw) > 256:  # past twice the per-thread budget: spills for sure
                    continue
                y = L.fp8_gemv_a16(x, *copies[0], block_n=bn, num_warps=nw)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                if not err < 4e-3:
                    raise SystemExit(f"{name} a16 {bn}/{nw}: rel err {err:.2e}")
                us = graph_us([lambda w=w, s=s: L.fp8_gemv_a16(x, w, s, block_n=bn, num_warps=nw)
                               for w, s in copies])
                row["a16"][f"{bn}/{nw}"] = round(us, 2)
        default = L.gemv_a16_config(args.m, n, k)
        row["a16_default"] = f"{default[0]}/{default[1]}"
        best = min(row["a16"], key=row["a16"].get)
        row["a16_best"] = best
        table[(n, k)] = tuple(int(v) for v in best.split("/"))
        print(f"{name:26s} M {args.m} N {n:5d} K {k:5d}  W8A8 {w8a8:6.2f} us | W8A16 default {row['a16_default']} "
              f"{row['a16'].get(row['a16_default'], float('nan')):6.2f} us, best {best} {row['a16'][best]:6.2f} us "
              f"(x{w8a8 / row['a16'][best]:.2f} vs W8A8)", flush=True)
        out["shapes"][name] = row
        del copies
        torch.cuda.empty_cache()
    print("A16_TUNED = {")
    for (n, k), (bn, nw) in table.items():
        print(f"    ({n}, {k}): ({bn}, {nw}),")
    print("}")
    out["table"] = {f"{n},{k}": list(v) for (n, k), v in table.items()}
    if args.json:
        save_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
