"""Decode-step time of ONE rank's compiled graphs, on one GPU, with the collectives stubbed out.

    python scripts/rank_timing.py --json OUT.json [--full-layers 61] [--repeats 3] ART_DIR [ART_DIR ...]

Each ART_DIR is a `dsv3c compile --world-size W --num-layers L` artifact directory (W > 1 allowed: rank 0's
tensor/expert-parallel shard). The rank's model is built with random weights (dsv3.runtime.random_weights), every
decode package is bound and captured in a CUDA graph, and the replay is timed (median of 100 replays,
dsv3.kernels.bench.graph_us). All directories are loaded first and then timed round-robin, `--repeats` rounds, so
slow drifts of the machine (clocks, neighbours) fall on every directory alike; each number is the median over the
rounds, with the spread (max - min) next to it.
Under the stand-in process group (as in dsv3.runtime.verify) an all-reduce returns its input without moving data,
so the number is the rank's compute and memory time per step: add the measured collective latency separately
(scripts/allreduce_latency.py) to estimate the real step.

- Directories of one config at different layer counts: a least-squares line through every (layers, time) sample
  gives the per-layer time and its standard error, and the extrapolation to the config's full depth,
  t(N) = intercept + N * slope, valid when the extra layers are all of one kind (MoE layers past
  first_k_dense_replace). Two layer counts (the old method) moved by +-10% between runs; three or more with repeats
  show how well the line fits.
- Directories at the SAME layer count (an A/B of build options, e.g. `DSV3_DECODE_PREP=fused` vs the default):
  every directory's time is also given as a ratio to the first directory's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from dsv3.config import load_config_file
from dsv3.kernels.bench import graph_us
from dsv3.runtime.artifacts import bind_constants, load_package
from dsv3.runtime.distributed import stub_process_group
from dsv3.runtime.manifest import read_manifest
from dsv3.runtime.parallel import ParallelPlan, build_rank_model
from dsv3.runtime.random_weights import fill_random_
from dsv3.runtime.steps import constants, decode_inputs

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def launch_us(fn, args, reps: int = 50) -> float:
    """Without a CUDA graph (if capture fails): per-call time including the host launch work (an upper bound)."""
    for _ in range(5):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


@torch.no_grad()
def load_artifacts(directory: Path) -> dict:
    """The rank model with random weights and every decode package bound to it, ready to time."""
    manifest = read_manifest(directory)
    cfg = load_config_file(directory / "config.json")
    ws = manifest["world_size"]
    model = build_rank_model(cfg, ParallelPlan(0, ws).for_artifacts(manifest), dtype=DTYPES[manifest["dtype"]], device="cuda",
                             max_batch_size=manifest["max_batch_size"], max_seq_len=manifest["max_seq_len"])
    fill_random_(model, seed=7)
    for c in model.latent_caches():
        c.normal_()
    tensors = constants(model)
    run = {"dir": str(directory), "layers": cfg.num_hidden_layers, "world_size": ws,
           "kernel_overrides": manifest.get("kernel_overrides", {}),
           "weight_bytes_rank": sum(t.numel() * t.element_size() for t in tensors.values()),
           "samples_us": {}, "timed_as": {}}
    steps = {}
    for name, graph in manifest["graphs"].items():
        if graph["kind"] != "decode":
            continue
        pkg = load_package(directory, graph, "cuda", single_threaded=True)
        bind_constants(pkg, name, tensors)
        tokens, pos = decode_inputs(graph["batch"], "cuda")
        pos.fill_(min(1024, manifest["max_seq_len"] - 1))  # some history in the cache
        steps[str(graph["batch"])] = (pkg, tokens, pos)
    return {"run": run, "steps": steps, "keep": (model, tensors)}


@torch.no_grad()
def time_round(loaded: dict) -> None:
    run = loaded["run"]
    for batch, (pkg, tokens, pos) in loaded["steps"].items():
        how = "CUDA graph replay"
        try:
            us = graph_us([lambda: pkg(tokens, pos)], reps=100)
        except RuntimeError as e:  # e.g. a stand-in collective that cannot be captured
            print(f"{run['dir']}: capture failed ({str(e).splitlines()[0][:200]}); timing plain calls", flush=True)
            how = "plain calls (host launch included: upper bound)"
            us = launch_us(pkg, (tokens, pos))
        run["samples_us"].setdefault(batch, []).append(round(us, 1))
        run["timed_as"][batch] = how


def line_fit(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Least squares t = a + b * layers: (intercept, slope, standard error of the slope)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    intercept = my - slope * mx
    resid = sum((y - intercept - slope * x) ** 2 for x, y in points)
    stderr = (resid / (n - 2) / sxx) ** 0.5 if n > 2 else float("nan")
    return intercept, slope, stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, type=Path, help="report file")
    ap.add_argument("--full-layers", type=int, default=61, help="depth to extrapolate to (671B: 61)")
    ap.add_argument("--repeats", type=int, default=3, help="timing rounds over all directories (round-robin)")
    ap.add_argument("dirs", nargs="+", type=Path, help="artifact directories (one world size)")
    opts = ap.parse_args()
    worlds = {read_manifest(d)["world_size"] for d in opts.dirs}
    if len(worlds) != 1:
        raise SystemExit(f"all artifact directories must share one world size, got {sorted(worlds)}")
    ws = worlds.pop()
    if ws > 1:
        stub_process_group(ws)
    loaded = [load_artifacts(d) for d in opts.dirs]
    for _ in range(max(1, opts.repeats)):
        for one in loaded:
            time_round(one)
    runs = [one["run"] for one in loaded]
    for run in runs:
        run["decode_us"] = {b: round(statistics.median(v), 1) for b, v in run["samples_us"].items()}
        for b, v in run["samples_us"].items():
            print(f"{Path(run['dir']).name}: {run['layers']} layers, world size {ws}, decode batch {b}: "
                  f"{run['decode_us'][b]:.1f} us/step (spread {max(v) - min(v):.1f} over {len(v)} rounds), "
                  f"{run['timed_as'][b]}, collectives stubbed", flush=True)
    report: dict = {"runs": runs, "device": torch.cuda.get_device_name(0), "repeats": opts.repeats}
    first = runs[0]
    same = [r for r in runs[1:] if r["layers"] == first["layers"]]
    for run in same:  # an A/B at one layer count
        for b, us in run["decode_us"].items():
            if b in first["decode_us"]:
                ratio = us / first["decode_us"][b]
                run.setdefault("ratio_to_first", {})[b] = round(ratio, 4)
                per_layer = (us - first["decode_us"][b]) / run["layers"]
                print(f"batch {b}: {Path(run['dir']).name} / {Path(first['dir']).name} = {ratio:.3f} "
                      f"({per_layer:+.2f} us per layer)", flush=True)
    if len({r["layers"] for r in runs}) >= 2:
        report["extrapolated"] = {}
        for batch in first["decode_us"]:
            points = [(r["layers"], us) for r in runs for us in r["samples_us"].get(batch, [])]
            intercept, slope, stderr = line_fit(points)
            total = intercept + opts.full_layers * slope
            report["extrapolated"][batch] = {
                "per_layer_us": round(slope, 1), "per_layer_stderr_us": round(stderr, 2),
                "intercept_us": round(intercept, 1), "layers_fit": sorted({x for x, _ in points}),
                "layers": opts.full_layers, "step_us_without_collectives": round(total, 1)}
            print(f"batch {batch}: {slope:.1f} +- {stderr:.1f} us per extra layer (fit over layers "
                  f"{sorted({x for x, _ in points})}) -> {opts.full_layers} layers {total:.0f} us/step without "
                  f"collectives", flush=True)
    opts.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
