"""How long a prefill call's inputs take to reach the GPU: the runtime's staged form against the one it replaced.

A 4095-token prefill's profile (H200, 2026-11-26) showed ~0.3 ms of host work before the first kernel: the tokens
built by torch.tensor from a Python list and four copies from pageable memory (tokens, an arange + repeat for the
positions, the cache rows, the logits index), each holding the host. `dsv3.runtime.engine._staged` converts the
lists through numpy and sends everything in one asynchronous copy from pinned memory; `_ShortPrefill.run` (the
CUDA-graph buckets) does one copy into the graph's static inputs instead of three.

For each prompt length, us per call (median of --reps, each call synchronized):
  plain old / new   the plain call's inputs (the path past the graph buckets and for later chunks);
  bucket old / new  a graph bucket's static inputs filled (the short-prompt path);
with the host's own time (until the call returns, before the device finishes) in parentheses.

    python scripts/try_prefill_inputs.py [--lengths 14,300,1000,2048,4095] [--reps 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from dsv3.runtime.engine import _int64_rows, _packed, _staged
from dsv3.runtime.steps import prefill_inputs


def plain_old(prompt: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    width = len(prompt)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    pos = torch.arange(width, device=device).unsqueeze(0).repeat(1, 1)
    return tokens, pos, torch.tensor([0], device=device), torch.tensor([width - 1], device=device)


def plain_new(prompt: list[int], device: torch.device) -> list[torch.Tensor]:
    width = len(prompt)
    return _staged([_int64_rows([prompt], width), np.broadcast_to(np.arange(width), (1, width)),
                    np.asarray([0], dtype=np.int64), np.asarray([width - 1], dtype=np.int64)], device)[1]


class Bucket:
    """A graph bucket's static inputs, filled both ways (`_ShortPrefill.run` before and after the change)."""

    def __init__(self, width: int, device: torch.device):
        tokens, _, rows, last = prefill_inputs(width, device, 1)
        self.width = width
        self.inputs, (self.tokens, self.rows, self.last) = _staged(
            [t.cpu().numpy() for t in (tokens, rows, last)], device)

    def old(self, prompt: list[int]) -> None:
        tokens = torch.zeros(1, self.width, dtype=torch.long)
        tokens[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.tokens.copy_(tokens)
        self.rows.copy_(torch.tensor([0], dtype=torch.long))
        self.last.copy_(torch.tensor([len(prompt) - 1], dtype=torch.long))

    def new(self, prompt: list[int]) -> None:
        host, _ = _packed([_int64_rows([prompt], self.width), np.asarray([0], dtype=np.int64),
                           np.asarray([len(prompt) - 1], dtype=np.int64)], pinned=self.inputs.is_cuda)
        self.inputs.copy_(host, non_blocking=True)


def timed(fn, reps: int) -> tuple[float, float]:
    """(median us until the call returned, median us until the device finished)."""
    host, full = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append(1e6 * (t1 - t0))
        full.append(1e6 * (t2 - t0))
    return statistics.median(host), statistics.median(full)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="14,300,1000,2048,4095")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        prompt = torch.randint(1, 100000, (length,), generator=gen).tolist()
        old, new = plain_old(prompt, device), plain_new(prompt, device)
        assert all(torch.equal(a, b) for a, b in zip(old, new)), "the staged inputs differ from the old ones"
        bucket = Bucket(-(-length // 128) * 128, device)
        bucket.old(prompt)
        want = bucket.inputs.clone()
        bucket.new(prompt)
        assert torch.equal(bucket.inputs, want), "the bucket's staged inputs differ from the old ones"
        row = {"length": length}
        for name, fn in (("plain_old", lambda: plain_old(prompt, device)),
                         ("plain_new", lambda: plain_new(prompt, device)),
                         ("bucket_old", lambda: bucket.old(prompt)), ("bucket_new", lambda: bucket.new(prompt))):
            timed(fn, 5)  # warm-up (the pinned allocator's first blocks)
            row[name] = timed(fn, args.reps)
        rows.append(row)
        print(f"length {length:5d}: plain old {row['plain_old'][1]:6.1f} us (host {row['plain_old'][0]:6.1f}), new "
              f"{row['plain_new'][1]:6.1f} (host {row['plain_new'][0]:6.1f}); bucket old {row['bucket_old'][1]:6.1f} "
              f"(host {row['bucket_old'][0]:6.1f}), new {row['bucket_new'][1]:6.1f} (host {row['bucket_new'][0]:6.1f})",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
