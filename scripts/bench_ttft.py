"""Where a short prompt's time to first token goes, on one set of artifacts (weights generated on the GPU):

    python scripts/bench_ttft.py ART_DIR [--lengths 5,14,30,100,300,1000,2000] [--batches 1,2,8] [--repeats 5]

For each prompt length and batch (fresh random prompts of that length each call), in this order:
- plain, first call: `GraphStepper.prefill` with the short-prefill CUDA graphs set aside, the first call at this
  length (what a request at a new length paid before the graphs);
- plain, again: the same path, median of the repeats;
- plain, host: the same call's time to return on the host, before the device finished (host-bound if this is
  close to the synced time);
- graphs: the short-prefill graphs replayed (a bucket: rows and width padded), the first call at this length and
  the median of the repeats after it;
- dynamic graph: for a bucket where the artifacts have a first-chunk graph of static shape (--short-prefill), the
  same bucket replayed from a CUDA graph of the dynamic first-chunk graph instead (what it ran before), median;
- ttft: what `generate` counts as time to first token (prefill, the first token's argmax, sync) on the default
  path (graphs where a bucket fits);
- logits vs plain: the same prompts prefilled both ways, the largest relative L2 difference of a row's logits and
  how many rows' argmax agree (a row's logits depend on the batch around it at rounding level, as a plain call of
  several prompts differs from each prompt alone: scripts/check_batch_invariance.py; a random 16B amplifies such
  differences, see the compile-time verification's noise floor); and whether the replay equals, bitwise, a
  direct call of the package on the bucket's padded inputs (None: no bucket, or more than one call).
First, the first requests after load (14 tokens; the largest batch first): prefill and the argmax timed apart.
`--extra-widths`: one-prompt buckets the runtime does not make (it stops at 2048 tokens), captured the same way, so
that the graphs column shows what a CUDA graph would save a longer prompt (padding to the bucket included).
`--idle-ms MS`: the GPU left idle MS before each timed call of the rows (requests arriving at a rested GPU).
`--sustain N`: then N plain prefills of the longest length back to back, each timed with its UTC start (to line up
with `nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw ... -lms 20` sampled alongside): whether a long
prefill slows down as it keeps the GPU busy (clocks, power).
Prints one line per case; `--json PATH` writes them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch

from dsv3.generate import SamplingParams, sample
from dsv3.runtime.engine import _ShortPrefill, artifact_stepper
from dsv3.runtime.gemm_env import prefer_static_gemm_schedules
from dsv3.runtime.parallel import ParallelPlan


def timed(fn, idle_s: float = 0.0) -> tuple[float, float]:
    """(ms until fn returned, ms until the device finished); the GPU left idle for idle_s first."""
    torch.cuda.synchronize()
    if idle_s:
        time.sleep(idle_s)
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    del out
    return 1e3 * (t1 - t0), 1e3 * (t2 - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts")
    ap.add_argument("--lengths", default="5,14,30,100,300,1000,2000")
    ap.add_argument("--batches", default="1,2,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--extra-widths", default="",
                    help="one-prompt buckets beyond the runtime's (e.g. 4096): CUDA graphs of the first-chunk "
                         "graph captured here too, to time a long prompt's replay against its plain call")
    ap.add_argument("--sustain", type=int, default=0,
                    help="then this many plain prefills of the longest length back to back, each timed")
    ap.add_argument("--idle-ms", type=float, default=0.0,
                    help="leave the GPU idle this long before each timed prefill of the length x batch rows (a "
                         "request arriving at a rested GPU: a long prefill runs into the 700 W power cap, and "
                         "back-to-back calls start from a hotter, slower clock)")
    ap.add_argument("--json")
    args = ap.parse_args()
    prefer_static_gemm_schedules()  # as dsv3c does, before the first GEMM
    stepper, timings = artifact_stepper(args.artifacts, None, ParallelPlan(0, 1), "cuda", progress=False)
    for w in sorted((int(x) for x in args.extra_widths.split(",") if x), reverse=True):  # largest first (the pool)
        stepper.short_prefill[(1, w)] = _ShortPrefill(stepper.prefill_first_fn, 1, w, stepper.device, stepper.pool)
    graphs = dict(stepper.short_prefill)
    print(f"load: {json.dumps({k: round(v, 3) for k, v in timings.items()})}; short-prefill buckets "
          f"{sorted(graphs)} (captured: {all(g.graph is not None for g in graphs.values())})", flush=True)
    # the static-shape buckets also as CUDA graphs of the dynamic first-chunk graph, for the side-by-side column
    dynamic = {rw: _ShortPrefill(stepper.prefill_first_fn, *rw, stepper.device, stepper.pool)
               for rw in stepper.static_first_fns if rw in graphs}
    vocab = stepper.model.cfg.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompts(length: int, batch: int) -> list[list[int]]:
        return [torch.randint(1, vocab, (length,), generator=gen).tolist() for _ in range(batch)]

    # the first request after load, as `dsv3c run` meets it: its prefill and its first token's argmax timed apart
    cold = {}
    for batch in sorted((int(x) for x in args.batches.split(",")), reverse=True):
        first_logits = []
        pre = timed(lambda: first_logits.append(stepper.prefill(prompts(14, batch))))[1]
        arg = timed(lambda: sample(first_logits[0], SamplingParams()))[1]
        again = timed(lambda: sample(stepper.prefill(prompts(14, batch)), SamplingParams()))[1]
        cold[batch] = {"prefill_ms": pre, "argmax_ms": arg, "again_ttft_ms": again}
        print(f"first request after load, batch {batch}, 14 tokens: prefill {pre:.2f} ms, argmax {arg:.2f} ms; "
              f"the next request {again:.2f} ms", flush=True)
    rows, idle = [], args.idle_ms / 1e3
    for length in (int(x) for x in args.lengths.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            if length * batch > 4 * stepper.prefill_chunk or length >= stepper.max_seq_len:
                continue
            stepper.short_prefill.clear()
            first = timed(lambda: stepper.prefill(prompts(length, batch)), idle)[1]
            plain = [timed(lambda: stepper.prefill(prompts(length, batch)), idle) for _ in range(args.repeats)]
            stepper.short_prefill.update(graphs)
            replayed = [timed(lambda: stepper.prefill(prompts(length, batch)), idle)[1] for _ in range(args.repeats + 1)]
            ttft = [timed(lambda: sample(stepper.prefill(prompts(length, batch)), SamplingParams()), idle)[1]
                    for _ in range(args.repeats)]
            bucket = next((rw for rw, g in graphs.items() if g is stepper._short_prefill_for(batch, max(2, length))),
                          None)
            dyn_ms = None
            if bucket in dynamic:
                stepper.short_prefill[bucket] = dynamic[bucket]
                dyn_ms = statistics.median(timed(lambda: stepper.prefill(prompts(length, batch)), idle)[1]
                                           for _ in range(args.repeats))
                stepper.short_prefill[bucket] = graphs[bucket]
            same = prompts(length, batch)  # the same prompts both ways: the replayed logits against the plain call's
            replayed_logits = stepper.prefill(same).clone()
            entry = stepper._short_prefill_for(batch, max(2, length))
            bitwise = None  # the replay against a direct call of the package on the bucket's padded inputs
            if entry is not None and len(stepper._first_chunk_groups(same)) == 1:
                direct = entry.fn(entry.tokens, entry.positions, entry.cache_rows, entry.logits_index)[:batch]
                bitwise = torch.equal(direct, replayed_logits)
            stepper.short_prefill.clear()
            plain_logits = stepper.prefill(same)
            stepper.short_prefill.update(graphs)
            rel = ((replayed_logits - plain_logits).norm(dim=-1) / plain_logits.norm(dim=-1)).max().item()
            top1 = (replayed_logits.argmax(-1) == plain_logits.argmax(-1)).float().mean().item()
            row = {"length": length, "batch": batch, "rel_l2_vs_plain": rel, "top1_agree": top1,
                   "replay_bitwise_direct": bitwise, "plain_first_ms": first,
                   "plain_ms": statistics.median(p[1] for p in plain),
                   "plain_host_ms": statistics.median(p[0] for p in plain),
                   "graphs_first_ms": replayed[0], "graphs_ms": statistics.median(replayed[1:]),
                   "ttft_ms": statistics.median(ttft), "bucket": bucket, "dynamic_graph_ms": dyn_ms}
            rows.append(row)
            print(f"length {length:5d} batch {batch}: plain first call {first:7.2f} ms, again "
                  f"{row['plain_ms']:7.2f} ms (host returns at {row['plain_host_ms']:6.2f}), graphs "
                  f"{row['graphs_ms']:7.2f} ms ({row['plain_ms'] / row['graphs_ms']:.2f}x; first {replayed[0]:.2f})"
                  + (f" [static {bucket[0]}x{bucket[1]}; the dynamic graph's replay {dyn_ms:.2f} ms]" if dyn_ms else "")
                  + ", ttft "
                  f"{row['ttft_ms']:7.2f} ms; logits vs plain: rel L2 {rel:.1e}, top-1 agree {top1:.0%}; replay == direct "
                  f"call on the padded inputs: {bitwise}", flush=True)
    sustained = []
    if args.sustain:
        length = max(int(x) for x in args.lengths.split(","))
        stepper.short_prefill.clear()
        for _ in range(args.sustain):
            start = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
            sustained.append({"utc": start, "ms": timed(lambda: stepper.prefill(prompts(length, 1)))[1]})
        ms = [r["ms"] for r in sustained]
        print(f"sustained: {args.sustain} plain {length}-token prefills back to back from {sustained[0]['utc']}: "
              f"first 5 {[round(x, 2) for x in ms[:5]]}, last 5 {[round(x, 2) for x in ms[-5:]]}, "
              f"min {min(ms):.2f} median {statistics.median(ms):.2f} max {max(ms):.2f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timings": timings, "first_requests": cold, "rows": rows, "sustained": sustained}, f, indent=1)


if __name__ == "__main__":
    main()
