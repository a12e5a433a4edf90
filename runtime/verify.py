"""`python -m dsv3.runtime.verify ARTIFACT_DIR`: load every package in this (fresh) process with random weights
and compare its outputs with the eager model on the same weights, caches and inputs.

At world size > 1 this checks rank 0's graph under a stand-in process group (collectives return their input on
both sides), i.e. that each package computes what the eager per-rank model computes. That the ranks together
equal world size 1 is tested separately (tests/test_parallel.py, the runtime's multi-rank runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dsv3.config import load_config_file
from dsv3.model import Transformer
from dsv3.runtime.artifacts import bind_constants, load_package
from dsv3.runtime.manifest import read_manifest, verify_files
from dsv3.runtime.parallel import ParallelPlan, apply_parallel
from dsv3.runtime.random_weights import fill_random_
from dsv3.runtime.steps import DecodeStep, PrefillStep, constants

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def tolerance(cfg, dtype: str) -> float:
    # FP8 activation quantization turns tiny reordering differences into whole e4m3 steps (see tests/test_compile).
    if dtype == "bfloat16":
        return 3e-2
    return 1e-2 if cfg.is_fp8 else 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def verify(directory: str | Path) -> list[tuple[str, float]]:
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    cfg = load_config_file(directory / "config.json")
    device = "cuda" if manifest["device"] == "cuda" else "cpu"
    ws = manifest["world_size"]
    if ws > 1:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ws)
    model = Transformer(cfg, dtype=DTYPES[manifest["dtype"]], max_batch_size=manifest["max_batch_size"],
                        max_seq_len=manifest["max_seq_len"], device=device)
    apply_parallel(model, ParallelPlan(0, ws))
    fill_random_(model, seed=1234)
    tensors = constants(model)
    tol = tolerance(cfg, manifest["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    results = []
    for name, graph in manifest["graphs"].items():
        pkg = load_package(directory, graph, device, single_threaded=False)
        inlined = sorted(set(tensors) - set(pkg.get_constant_fqns()))
        if inlined:  # a weight or rank buffer baked into the code would ignore the tensors the runtime hands in
            raise SystemExit(f"{name}: tensors compiled in as constants instead of taken at run time: {inlined}")
        bind_constants(pkg, name, tensors)
        if graph["kind"] == "decode":
            b = graph["batch"]
            step = DecodeStep(model)
            tokens = torch.randint(0, cfg.vocab_size, (b, 1), generator=g, device=device)
            pos = torch.randint(0, manifest["max_seq_len"], (b, 1), generator=g, device=device)
            args: tuple = (tokens, pos)
        else:
            step = PrefillStep(model)
            s = min(graph["max_chunk"], 7)
            start = int(torch.randint(0, manifest["max_seq_len"] - s + 1, (1,), generator=g, device=device))
            args = (torch.randint(0, cfg.vocab_size, (1, s), generator=g, device=device),
                    torch.arange(start, start + s, device=device).unsqueeze(0),
                    torch.tensor([manifest["max_batch_size"] - 1], device=device),
                    torch.tensor([s - 1], device=device))
        for c in model.latent_caches():  # same cache contents for both: random history
            c.normal_(generator=g)
        expected = step(*args).clone()
        got = pkg(*args)
        err = _rel(got, expected)
        results.append((name, err))
        status = "ok" if err <= tol else "MISMATCH"
        print(f"{name}: max rel err {err:.2e} (tolerance {tol:.0e}) {status}", flush=True)
        if err > tol or not torch.isfinite(got).all():
            raise SystemExit(f"{name} does not match the eager model")
    return results


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m dsv3.runtime.verify ARTIFACT_DIR")
    verify(sys.argv[1])


if __name__ == "__main__":
    main()
