"""A/B the MLA decode op (`mla_attention_triton`: split kernel + combine, each module's own plan) of this tree against
another version of kernels/mla_attention.py, side by side in one process on the GPU: outputs compared bitwise, timed
over cache copies past the L2 in CUDA graphs, interleaved rounds, median.

    git show REF:kernels/mla_attention.py > ab_old/mla_attention.py      # sent with the tree
    python3 scripts/ab_mla.py --old ab_old/mla_attention.py [--cases 16:1:1024,...] [--rounds 5] [--json F]

Cases HEADS:BATCH:CONTEXT (one query token per sequence, every sequence at that context, a cache of exactly that
many rows; kv_lora_rank 512 + rope 64, bf16), default the issue's decode grid at 16 heads and batch 1 / 8 / 32 at
1k / 8k / 32k plus 128 heads at 8k. Bytes per call: the cache rows read (576 x 2 bytes per row and sequence);
TB/s against the 4.27 TB/s copy bandwidth. The old file is loaded as `ab_grouped_moe.load_old` does.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_grouped_moe import load_old  # noqa: E402

PEAK_TB_S = 4.27
DEFAULT_CASES = ("16:1:1024,16:1:8192,16:1:32768,16:8:1024,16:8:8192,16:8:32768,16:32:8192,16:32:32768,"
                 "128:1:8192")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="a copy of kernels/mla_attention.py to compare against")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated HEADS:BATCH:CONTEXT")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    from dsv3.kernels import mla_attention as new
    from dsv3.kernels.bench import graph_us, save_json

    mods = {"old": load_old(opts.old, "mla_attention"), "new": new}
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for case in opts.cases.split(","):
        h, b, ctx = (int(v) for v in case.split(":"))
        q = torch.randn(b, 1, h, 512, device=dev, generator=gen).bfloat16()
        qp = torch.randn(b, 1, h, 64, device=dev, generator=gen).bfloat16()
        pos = torch.full((b, 1), ctx - 1, device=dev, dtype=torch.int64)
        nbytes = b * ctx * 576 * 2
        copies = int(max(1, min(8, math.ceil(256e6 / nbytes))))
        caches = [torch.randn(b, ctx, 576, device=dev, generator=gen).bfloat16() for _ in range(copies)]
        fns = {k: [lambda c=c, m=m: m.mla_attention_triton(q, qp, caches[c], pos, 0.1) for c in range(copies)]
               for k, m in mods.items()}
        same = torch.equal(fns["old"][0](), fns["new"][0]())
        times = {k: [] for k in mods}
        reps = max(5, math.ceil(100 / copies))
        for r in range(opts.rounds):
            for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                times[k].append(graph_us(fns[k], reps=reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        tb = {k: nbytes / (v * 1e-6) / 1e12 for k, v in med.items()}
        rows.append(dict(heads=h, batch=b, context=ctx, bytes=nbytes, bitwise_equal=same,
                         us={k: round(v, 2) for k, v in med.items()}, rounds=times,
                         share_of_copy={k: round(v / PEAK_TB_S, 3) for k, v in tb.items()},
                         speedup=round(med["old"] / med["new"], 3)))
        print(f"H={h:3d} B={b:2d} ctx={ctx:5d}: old {med['old']:8.2f} us ({100 * tb['old'] / PEAK_TB_S:5.1f}% of copy)"
              f" | new {med['new']:8.2f} us ({100 * tb['new'] / PEAK_TB_S:5.1f}%) | {med['old'] / med['new']:.3f}x"
              f" | bitwise equal {same}", flush=True)
    if opts.json:
        save_json(opts.json, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows))
    return 0 if all(r["bitwise_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
