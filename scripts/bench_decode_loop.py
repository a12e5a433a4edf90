"""Decode per token, four ways, on one set of artifacts (weights generated on the GPU), interleaved in rounds:

    python scripts/bench_decode_loop.py ART_DIR [--batches 1,8] [--context 128] [--steps 64] [--rounds 5]

- replay: the logits graph replayed back to back (what `profile_decode.py` reports as the step);
- sync, logits graph: the former `dsv3c bench` step: copy the inputs in, replay, argmax outside, sync;
- sync, loop graph: today's `dsv3c bench` step (`GraphStepper.decode_loop`: argmax and next inputs in the graph);
- generate(), eager loop / loop graph: `dsv3.generate.generate` over `--steps` tokens with the stepper's loop graph
  hidden (decode + argmax per step, the former path) and with it.
- generate(), sampled (temperature 0.6, top-p 0.95, seed 0), decode + sample / the sampled loop graph: the same
  with the sampling ops and their random draws outside and inside the graph (`--sampled` adds these rows).
Tokens of both generate() paths are compared (they must be equal: the batch fills its bucket, so the sampled loop
draws the numbers decode + sample draws). Medians over the rounds, spread next to them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv3.generate import PlainSteps, SamplingParams, decode_loop, generate
from dsv3.runtime.engine import artifact_stepper
from dsv3.runtime.parallel import ParallelPlan

SAMPLED = SamplingParams(temperature=0.6, top_p=0.95)  # DeepSeek's recommended settings for V3


def replay_ms(replay, n: int = 50) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def sync_steps(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sampled", action="store_true", help="also time sampled generate() on both paths")
    args = ap.parse_args()
    stepper, _ = artifact_stepper(args.artifacts, None, ParallelPlan(0, 1), "cuda", progress=False)
    vocab = stepper.model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [torch.randint(0, vocab, (args.context,), generator=g).tolist() for _ in range(b)]
        pos = torch.full((b,), args.context, dtype=torch.long, device="cuda")
        rows: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            tokens = stepper.prefill(prompts).argmax(-1)
            stepper.decode(tokens, pos)  # the logits graph's inputs: these rows at these positions
            rows.setdefault("replay, logits graph", []).append(replay_ms(stepper.graphs[stepper._bucket(b)][0].replay))
            decode_loop(stepper, tokens, pos, SamplingParams())  # the loop graph's: the same, advancing
            rows.setdefault("replay, loop graph", []).append(replay_ms(stepper.loop_graphs[stepper._bucket(b)].replay))
            rows.setdefault("sync, logits graph + argmax", []).append(
                sync_steps(lambda: stepper.decode(tokens, pos).argmax(-1), args.steps))
            loop = decode_loop(stepper, tokens, pos, SamplingParams())
            rows.setdefault("sync, loop graph", []).append(sync_steps(loop.step, args.steps))
            old, old_stats = generate(PlainSteps(stepper), prompts, max_new_tokens=args.steps + 1)
            new, new_stats = generate(stepper, prompts, max_new_tokens=args.steps + 1)
            assert [c.tokens for c in old] == [c.tokens for c in new], "the two generate() paths differ"
            rows.setdefault("generate(), decode + argmax", []).append(old_stats.ms_per_token)
            rows.setdefault("generate(), loop graph", []).append(new_stats.ms_per_token)
            if args.sampled:
                old, old_stats = generate(PlainSteps(stepper), prompts, max_new_tokens=args.steps + 1,
                                          sampling=SAMPLED, seed=0)
                new, new_stats = generate(stepper, prompts, max_new_tokens=args.steps + 1, sampling=SAMPLED, seed=0)
                assert [c.tokens for c in old] == [c.tokens for c in new], "the two sampled generate() paths differ"
                rows.setdefault("generate(), decode + sample", []).append(old_stats.ms_per_token)
                rows.setdefault("generate(), sampled loop graph", []).append(new_stats.ms_per_token)
        print(f"batch {b}, context {args.context}, {args.steps} steps, {args.rounds} rounds (ms per token, median "
              f"[spread]); generate() tokens equal on both paths")
        for name, v in rows.items():
            print(f"  {name:<34} {statistics.median(v):8.4f}  [{max(v) - min(v):.4f}]")


if __name__ == "__main__":
    main()
