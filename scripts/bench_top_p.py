"""Time top-p filtering of a sampled decode step on the GPU: the eager sort path of dsv3.generate.sample_scores
(logits / T, sort, softmax, cumsum, scatter mask, masked_fill, softmax, probs / noise) against
`torch.ops.dsv3.top_p_scores` (dsv3.kernels.top_p, sort-free radix select), at V = 102400 (16B / V2 vocab) and
B = 1, 8. Each is timed in a CUDA graph of back-to-back calls on distinct inputs (dsv3.kernels.bench.graph_us; the
noise is drawn outside, the same for both). Then, on fresh logits (randn * 3 and peaked rows) and noise, the
argmax tokens of both are compared: a disagreement counts as explained when either token is within fp32 rounding
of the top-p boundary (dsv3.kernels.top_p.near_boundary on float64 probabilities) or the two tokens' float64
scores are within 1e-5 of each other.

    python3 scripts/bench_top_p.py [--batch 1,8] [--vocab 102400] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv3.kernels import top_p as TP
from dsv3.kernels.bench import graph_us


def eager_top_p_scores(logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The top-p part of dsv3.generate.sample_scores (as of this script), with the noise given."""
    logits = logits / temperature
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return probs / noise


def make_logits(b: int, v: int, kind: str, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(b, v, device="cuda", generator=g) * 3
    if kind == "peaked":  # a few dominant tokens, as a confident model gives
        x[:, torch.randint(0, v, (8,), device="cuda", generator=g)] += 18.0
    return x


def agreement(b: int, v: int, temperature: float, top_p: float, steps: int, g: torch.Generator) -> dict:
    res = dict(steps=steps * 2 * b, disagree=0, unexplained=0)
    for kind in ("randn3", "peaked"):
        for _ in range(steps):
            logits = make_logits(b, v, kind, g)
            noise = torch.empty_like(logits).exponential_(generator=g)
            a = eager_top_p_scores(logits, noise, temperature, top_p).argmax(-1)
            o = torch.ops.dsv3.top_p_scores(logits, noise, temperature, top_p).argmax(-1)
            for r in (a != o).nonzero().flatten().tolist():
                res["disagree"] += 1
                p64 = torch.softmax(logits[r:r + 1].double() / temperature, -1)
                amb = TP.near_boundary(p64, top_p)[0]
                s64 = TP.top_p_scores_reference(logits[r:r + 1].double(), noise[r:r + 1].double(), temperature,
                                                top_p)[0]
                ta, to = int(a[r]), int(o[r])
                close = abs(s64[ta] - s64[to]) <= 1e-5 * s64.max()
                if not (amb[ta] or amb[to] or close):
                    res["unexplained"] += 1
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--vocab", type=int, default=102400)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--copies", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16, help="agreement draws per logits kind")
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    v, temp, top_p = opts.vocab, opts.temperature, opts.top_p
    rows = []
    for b in (int(x) for x in opts.batch.split(",")):
        logits = [make_logits(b, v, "randn3", g) for _ in range(opts.copies)]
        noise = [torch.empty_like(x).exponential_(generator=g) for x in logits]
        eager = graph_us([lambda i=i: eager_top_p_scores(logits[i], noise[i], temp, top_p)
                          for i in range(opts.copies)])
        op = graph_us([lambda i=i: torch.ops.dsv3.top_p_scores(logits[i], noise[i], temp, top_p)
                       for i in range(opts.copies)])
        agree = agreement(b, v, temp, top_p, opts.steps, g)
        c, ch = TP.top_p_plan(b, v)
        row = dict(b=b, v=v, temperature=temp, top_p=top_p, eager_us=round(eager, 2), op_us=round(op, 2),
                   speedup=round(eager / op, 2), chunks=c, chunk_len=ch, **agree)
        rows.append(row)
        print(f"B={b} V={v} T={temp} top_p={top_p}: eager sort path {eager:7.2f} us, dsv3.top_p_scores {op:6.2f} us "
              f"({eager / op:.1f}x; {c} chunks of {ch}); argmax disagreements {agree['disagree']} of "
              f"{agree['steps']} draws, unexplained {agree['unexplained']}", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
