"""Where the artifact cold start goes: python scripts/profile_load.py ARTIFACTS CHECKPOINT

Times, in one process: importing torch._inductor, loading this rank's weights, then per package the
aoti_load_package call, binding the constants, and its first run (lazy kernel loading), with the GPU memory
each step takes. A diagnostic for docs/BENCHMARKS.md, not part of the runtime.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def main() -> None:
    artifacts, checkpoint = Path(sys.argv[1]), Path(sys.argv[2])
    t0 = time.perf_counter()
    import torch._inductor  # noqa: F401

    print(f"import torch._inductor: {time.perf_counter() - t0:.2f}s")
    from dsv3.runtime.artifacts import bind_constants, load_package
    from dsv3.runtime.engine import load_rank_model
    from dsv3.runtime.manifest import read_manifest
    from dsv3.runtime.parallel import ParallelPlan
    from dsv3.runtime.steps import constants, decode_inputs, prefill_inputs

    m = read_manifest(artifacts)
    torch.cuda.init()
    free0 = torch.cuda.mem_get_info()[0]
    t0 = time.perf_counter()
    model = load_rank_model(checkpoint, ParallelPlan(0, 1), dtype=torch.bfloat16, device="cuda",
                            max_batch_size=m["max_batch_size"], max_seq_len=m["max_seq_len"], progress=False)
    torch.cuda.synchronize()
    free1 = torch.cuda.mem_get_info()[0]
    print(f"weights: {time.perf_counter() - t0:.2f}s, {(free0 - free1) / 2**30:.2f} GiB")
    tensors = constants(model)
    for name, graph in m["graphs"].items():
        a = torch.cuda.mem_get_info()[0]
        import cProfile
        import pstats

        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        pkg = load_package(artifacts, graph, "cuda", single_threaded=graph["kind"] == "decode")
        prof.disable()
        t1 = time.perf_counter()
        if t1 - t0 > 1.0:  # where the Python side of a slow load goes
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        b = torch.cuda.mem_get_info()[0]
        bind_constants(pkg, name, tensors)
        t2 = time.perf_counter()
        c = torch.cuda.mem_get_info()[0]
        args = decode_inputs(graph["batch"], "cuda") if graph["kind"] == "decode" else prefill_inputs(16, "cuda")
        with torch.inference_mode():
            pkg(*args)
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            pkg(*args)
            torch.cuda.synchronize()
        t4 = time.perf_counter()
        print(f"{name}: load {t1 - t0:.2f}s (+{(a - b) / 2**30:.2f} GiB), bind {t2 - t1:.2f}s "
              f"(+{(b - c) / 2**30:.2f} GiB), first run {t3 - t2:.2f}s, second run {(t4 - t3) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
