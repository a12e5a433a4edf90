"""Where a decode step goes: python scripts/profile_decode.py ARTIFACTS CHECKPOINT OUT_DIR [CONTEXT] [PREFILL] [BATCH]

CHECKPOINT `random`: no checkpoint, weights generated on the GPU for the artifacts' config (as `dsv3c bench
--random-weights`; the kernels' times do not depend on the weight values). Artifacts built for world size > 1:
rank 0's graphs with the collectives stubbed (as `dsv3c bench --stub-collectives`; weights: `random` only).

Loads the artifacts as `dsv3c run` does, fills the cache of BATCH (default 1; a batch size the artifacts have a
decode graph for) sequences to CONTEXT (default 128) tokens, then
1. times replays of the captured decode CUDA graph of that batch (what generation pays per step);
2. profiles the same package called without the CUDA graph (torch.profiler, CUDA activity): every kernel's
   time, grouped by name, and the sum of kernel time per step. Graph replay time minus kernel time is what
   launches and gaps cost; the top kernels are where bandwidth goes.
3. profiles a PREFILL-token prefill (default 4096, in the artifacts' chunks; 0: none) the same way: where prefill
   MFU goes, and how much of the GPU span (first kernel start to last end) is idle between kernels.
Writes OUT_DIR/decode_profile.txt (table) and OUT_DIR/decode_profile.json (per kernel: calls and us per step),
OUT_DIR/decode_sequence.txt (one step's kernels in launch order with the gap before each; called without the CUDA
graph, as in 2., so the gaps are the host's launch gaps, not the graph's), and
OUT_DIR/prefill_profile.txt / .json, OUT_DIR/prefill_sequence.txt (the prefill's kernels in launch order, gaps).
A diagnostic for docs/BENCHMARKS.md, not part of the runtime.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch


def main() -> None:
    if len(sys.argv) < 4 or any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        raise SystemExit(0 if len(sys.argv) > 1 else 2)
    from dsv3.runtime.gemm_env import prefer_static_gemm_schedules

    prefer_static_gemm_schedules()  # as `dsv3c` runs: before the first cuBLASLt GEMM (no per-GEMM memsets)
    artifacts, out = Path(sys.argv[1]), Path(sys.argv[3])
    checkpoint = None if sys.argv[2] == "random" else Path(sys.argv[2])
    context = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    prefill_len = int(sys.argv[5]) if len(sys.argv) > 5 else 4096
    batch = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    out.mkdir(parents=True, exist_ok=True)
    from torch.profiler import ProfilerActivity, profile

    from dsv3.runtime.engine import artifact_stepper
    from dsv3.runtime.parallel import ParallelPlan

    from dsv3.runtime.manifest import read_manifest

    plan = ParallelPlan(0, 1)
    world_size = read_manifest(artifacts)["world_size"]
    if world_size > 1:  # one rank's graphs (e.g. 671B at world size 8) on this GPU: collectives stubbed, as
        # `dsv3c bench --stub-collectives` (the profile shows the stubs' device copies where all-reduces would run:
        # add their measured cost)
        from dsv3.runtime.distributed import stub_process_group

        stub_process_group(world_size)
        plan = ParallelPlan(0, world_size)
    stepper, _ = artifact_stepper(artifacts, checkpoint, plan, "cuda", progress=False)
    if batch not in stepper.decode_fns:
        raise SystemExit(f"no decode graph for batch {batch} in {artifacts} (it has {sorted(stepper.decode_fns)})")
    # distinct random prompts and tokens per row: with identical rows every token of a batch would route to the
    # same experts, and the MoE of a batch > 1 would read a fraction of what `dsv3c bench` (random prompts) reads
    g = torch.Generator().manual_seed(0)
    vocab = stepper.model.cfg.vocab_size
    stepper.prefill([torch.randint(0, vocab, (context,), generator=g).tolist() for _ in range(batch)])
    tok = torch.randint(0, vocab, (batch,), generator=g).to("cuda")
    pos = torch.full((batch,), context, dtype=torch.long, device="cuda")
    for _ in range(10):
        stepper.decode(tok, pos)
    torch.cuda.synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        stepper.decode(tok, pos)
    torch.cuda.synchronize()
    graph_us = (time.perf_counter() - t0) / n * 1e6

    fn = stepper.decode_fns[batch]
    args = (tok.view(batch, 1), pos.view(batch, 1))
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    steps = 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn(*args)
        torch.cuda.synchronize()
    rows = _kernel_rows(prof, steps)
    kernel_us = sum(r[2] for r in rows)
    launches = sum(r[1] for r in rows)
    _write_table(out / "decode_profile", rows, kernel_us, "us/step",
                 f"decode_b{batch} at context {context}: CUDA-graph replay {graph_us:.1f} us/step; kernel time "
                 f"{kernel_us:.1f} us/step over {launches:.0f} kernels ({graph_us - kernel_us:.1f} us/step of gaps "
                 f"between kernels)",
                 {"context": context, "batch": batch, "graph_us_per_step": graph_us, "kernel_us_per_step": kernel_us,
                  "kernels_per_step": launches})

    # one step in launch order, with the idle time before each kernel: which op a kernel belongs to (its neighbours)
    # and where the gaps are
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    _write_sequence(out / "decode_sequence.txt", prof)

    if prefill_len <= 0:  # PREFILL 0: the decode profile only
        return
    # prefill: one prompt of prefill_len tokens (cache row 0), as `dsv3c run` feeds it: chunks of the artifacts' size
    prompt = [1 + i % 1000 for i in range(min(prefill_len, stepper.model.max_seq_len - 1))]
    stepper.prefill([prompt])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        stepper.prefill([prompt])
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / 3 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        stepper.prefill([prompt])
        torch.cuda.synchronize()
    rows = _kernel_rows(prof, 1)
    kernel_us = sum(r[2] for r in rows)
    span_us = _write_sequence(out / "prefill_sequence.txt", prof, f"one prefill of {len(prompt)} tokens")
    # wall = host work before the first kernel and after the last + the GPU span; span = kernels + idle gaps
    _write_table(out / "prefill_profile", rows, kernel_us, "us",
                 f"prefill of {len(prompt)} tokens in chunks of {stepper.prefill_chunk}: {wall_ms:.1f} ms wall; "
                 f"first kernel start to last kernel end {span_us / 1e3:.2f} ms; kernel time {kernel_us / 1e3:.2f} "
                 f"ms over {sum(r[1] for r in rows):.0f} kernels",
                 {"tokens": len(prompt), "chunk": stepper.prefill_chunk, "wall_ms": wall_ms,
                  "span_ms": span_us / 1e3, "kernel_ms": kernel_us / 1e3})


def _write_table(stem: Path, rows: list[tuple[str, float, float]], total_us: float, unit: str, header: str,
                 meta: dict) -> None:
    """Print the top kernels under `header` and write them to STEM.txt, and all of them with `meta` to STEM.json."""
    lines = [header, f"{unit:>9} {'share':>6} {'calls':>6}  kernel"]
    for name, calls, us in rows[:40]:
        lines.append(f"{us:9.1f} {us / total_us:6.1%} {calls:6.0f}  {name[:110]}")
    text = "\n".join(lines)
    print(text)
    stem.with_suffix(".txt").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {**meta, "kernels": [{"name": n, "calls": c, "us": u} for n, c, u in rows]}, indent=1))


def _write_sequence(path: Path, prof, what: str = "one decode step") -> float:
    """Every kernel of one profiled step in start order: start (us from the first), gap before it, duration, name.
    Returns the span from the first kernel's start to the last one's end (us)."""
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    if not events:
        return 0.0
    t0, prev_end = events[0].time_range.start, events[0].time_range.start
    lines = [f"{'start':>9} {'gap':>6} {'us':>7}  kernel ({what}, launch order)"]
    for e in events:
        start, end = e.time_range.start, e.time_range.end
        lines.append(f"{start - t0:9.1f} {start - prev_end:6.2f} {end - start:7.2f}  {e.name[:110]}")
        prev_end = max(prev_end, end)
    path.write_text("\n".join(lines) + "\n")
    return prev_end - t0


def _kernel_rows(prof, steps: int) -> list[tuple[str, float, float]]:
    """(kernel name, calls per step, us per step), largest time first."""
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name].append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    return sorted(((name, len(t) / steps, sum(t) / steps) for name, t in per_kernel.items()), key=lambda r: -r[2])


if __name__ == "__main__":
    main()
