"""Decode-step time of ONE rank's compiled graphs, on one GPU, with the collectives stubbed out.

    python scripts/rank_timing.py --json OUT.json [--full-layers 61] ART_DIR [ART_DIR ...]

Each ART_DIR is a `dsv3c compile --world-size W --num-layers L` artifact directory (W > 1 allowed: rank 0's
tensor/expert-parallel shard). The rank's model is built with random weights (dsv3.runtime.random_weights), every
decode package is bound and captured in a CUDA graph, and the replay is timed (median of 200 replays,
dsv3.kernels.bench.graph_us).
Under the stand-in process group (as in dsv3.runtime.verify) an all-reduce returns its input without moving data,
so the number is the rank's compute and memory time per step: add the measured collective latency separately
(scripts/allreduce_latency.py) to estimate the real step.

With two directories of the same config at different layer counts, the slope gives the per-layer time and the
script extrapolates to the config's full depth: t(full) = t(L1) + (N - L1) * (t(L2) - t(L1)) / (L2 - L1), valid
when the extra layers are all of one kind (MoE layers past first_k_dense_replace).
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
def time_artifacts(directory: Path) -> dict:
    manifest = read_manifest(directory)
    cfg = load_config_file(directory / "config.json")
    ws = manifest["world_size"]
    model = build_rank_model(cfg, ParallelPlan(0, ws), dtype=DTYPES[manifest["dtype"]], device="cuda",
                             max_batch_size=manifest["max_batch_size"], max_seq_len=manifest["max_seq_len"])
    fill_random_(model, seed=7)
    for c in model.latent_caches():
        c.normal_()
    tensors = constants(model)
    out = {"dir": str(directory), "layers": cfg.num_hidden_layers, "world_size": ws,
           "weight_bytes_rank": sum(t.numel() * t.element_size() for t in tensors.values()), "decode_us": {}}
    for name, graph in manifest["graphs"].items():
        if graph["kind"] != "decode":
            continue
        pkg = load_package(directory, graph, "cuda", single_threaded=True)
        bind_constants(pkg, name, tensors)
        tokens, pos = decode_inputs(graph["batch"], "cuda")
        pos.fill_(min(1024, manifest["max_seq_len"] - 1))  # some history in the cache
        how = "CUDA graph replay"
        try:
            us = graph_us([lambda: pkg(tokens, pos)], reps=200)
        except RuntimeError as e:  # e.g. a stand-in collective that cannot be captured
            print(f"{name}: capture failed ({str(e).splitlines()[0][:200]}); timing plain calls", flush=True)
            how = "plain calls (host launch included: upper bound)"
            us = launch_us(pkg, (tokens, pos))
        out["decode_us"][str(graph["batch"])] = round(us, 1)
        out.setdefault("timed_as", {})[str(graph["batch"])] = how
        print(f"{directory.name}: {cfg.num_hidden_layers} layers, world size {ws}, decode batch {graph['batch']}: "
              f"{us:.1f} us/step, {how}, collectives stubbed", flush=True)
    del model, tensors
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, type=Path, help="report file")
    ap.add_argument("--full-layers", type=int, default=61, help="depth to extrapolate to (671B: 61)")
    ap.add_argument("dirs", nargs="+", type=Path, help="artifact directories (one world size)")
    opts = ap.parse_args()
    worlds = {read_manifest(d)["world_size"] for d in opts.dirs}
    if len(worlds) != 1:
        raise SystemExit(f"all artifact directories must share one world size, got {sorted(worlds)}")
    ws = worlds.pop()
    if ws > 1:
        stub_process_group(ws)
    runs = sorted((time_artifacts(d) for d in opts.dirs), key=lambda r: r["layers"])
    report: dict = {"runs": runs, "device": torch.cuda.get_device_name(0)}
    if len(runs) >= 2 and runs[-1]["layers"] > runs[0]["layers"]:
        a, b = runs[0], runs[-1]
        report["extrapolated"] = {}
        for batch in a["decode_us"]:
            per_layer = (b["decode_us"][batch] - a["decode_us"][batch]) / (b["layers"] - a["layers"])
            total = a["decode_us"][batch] + (opts.full_layers - a["layers"]) * per_layer
            report["extrapolated"][batch] = {"per_layer_us": round(per_layer, 1), "layers": opts.full_layers,
                                             "step_us_without_collectives": round(total, 1)}
            print(f"batch {batch}: {per_layer:.1f} us per extra layer -> {opts.full_layers} layers {total:.0f} "
                  f"us/step without collectives", flush=True)
    opts.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
