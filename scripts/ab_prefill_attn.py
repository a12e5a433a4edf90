"""A/B the prefill attention kernel of this tree (`dsv3.mla_prefill_attention`'s Triton path) against another
version of kernels/mla_prefill.py, side by side in one process on the GPU: outputs compared, timed in CUDA graphs,
interleaved rounds.

    git show REF:kernels/mla_prefill.py > /tmp/old_mla_prefill.py      # on the development machine
    python3 scripts/ab_prefill_attn.py --old /tmp/old_mla_prefill.py [--rounds 5] [--json out.json]

Shapes: a first chunk (no prefix, positions 0..S-1, causal), q/k = [nope 128 | rope 64], v 128, bf16: 16 heads
(16B; 671B per rank at world size 8) at S = 1024 and 4096, 128 heads (671B on one GPU) at 4096. Each round times
both modules (`dsv3.kernels.bench.graph_us`, 3 calls per graph), alternating which goes first; medians with
TFLOP/s (causal: 2 x H x S(S+1)/2 x (192 + 128)). Errors: each output against the other and against float64 on
the last 256 queries (`sweep_prefill._attention_tail_reference`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_grouped_moe import load_old, timed_old_new  # noqa: E402
from sweep_prefill import _attention_tail_reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="a copy of kernels/mla_prefill.py to compare against")
    ap.add_argument("--cases", default="16:1024,16:4096,128:4096", help="comma-separated HEADS:S")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    from dsv3.kernels import mla_prefill as new

    old = load_old(opts.old, "mla_prefill")
    dev = torch.device("cuda")
    rows = []
    for case in opts.cases.split(","):
        h, s = (int(v) for v in case.split(":"))
        g = torch.Generator(device=dev).manual_seed(h * 100000 + s)
        rnd = lambda *shape: torch.randn(*shape, device=dev, generator=g).bfloat16()  # noqa: E731
        q_nope, q_pe, k_nope, k_pe, v = rnd(1, s, h, 128), rnd(1, s, h, 64), rnd(1, s, h, 128), rnd(1, s, 64), \
            rnd(1, s, h, 128)
        pos = torch.arange(s, device=dev)[None]
        scale = 0.1147
        args = (q_nope, q_pe, k_nope, k_pe, v, pos, scale)
        calls = {k: (lambda m=m: m.mla_prefill_attention_triton(*args)) for k, m in (("old", old), ("new", new))}
        outs = {k: c().float() for k, c in calls.items()}
        tail = min(256, s)
        ref = _attention_tail_reference(q_nope, q_pe, k_nope, k_pe, v, scale, tail)
        errs = {k: ((o[0, -tail:].double() - ref).norm() / ref.norm()).item() for k, o in outs.items()}
        diff = ((outs["new"] - outs["old"]).norm() / outs["old"].norm()).item()
        flops = 2 * h * s * (s + 1) // 2 * (192 + 128)
        row = dict(h=h, s=s, new_vs_old_rel=diff, ref_rel_err=errs, **timed_old_new(calls, opts.rounds, flops))
        rows.append(row)
        print(f"H={h} S={s}: old {row['old']['us']} us ({row['old']['tflops']} TFLOP/s), new {row['new']['us']} us "
              f"({row['new']['tflops']} TFLOP/s): {row['speedup']}x; new vs old {diff:.1e}; vs float64 (last {tail} "
              f"queries) old {errs['old']:.1e} new {errs['new']:.1e}", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
