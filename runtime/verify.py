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
from dsv3.runtime.artifacts import bind_constants, load_package
from dsv3.runtime.distributed import stub_process_group
from dsv3.model import PREFILL_COPIES
from dsv3.runtime.manifest import read_manifest, verify_files
from dsv3.runtime.parallel import DECODE_ONLY_BUFFERS, ParallelPlan, build_rank_model
from dsv3.runtime.random_weights import fill_random_
from dsv3.runtime.steps import PREFIX, DecodeStep, PrefillStep, constants

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def unread_constants(graph: dict, tensors: dict[str, torch.Tensor]) -> set[str]:
    """The model's tensors a graph (its manifest entry) does not read: a decode graph, the prefill copies of weights
    (Transformer.add_prefill_copies_); a prefill graph, the one-shot all-reduce's scratch buffer (prefill reduces
    through NCCL) and the FP8 kv_b_proj where its dequantized copy is kept (the prefill reads only that); a prefill
    graph of static shape (a short prompt's), also the copies a decode graph leaves (at a static count of at most
    64 tokens the shared experts take the decode kernels, not the packed down projection)."""
    copies = {name for name in tensors if name.rsplit(".", 1)[-1] in PREFILL_COPIES}
    if graph["kind"] == "decode":
        return copies
    unread = {PREFIX + n for n in DECODE_ONLY_BUFFERS} | (copies if "static_shape" in graph else set())
    for name in tensors:
        if name.endswith(".kv_b_dequantized"):
            attn = name.rsplit(".", 1)[0]
            unread |= {f"{attn}.kv_b_proj.weight", f"{attn}.kv_b_proj.weight_scale_inv"}
    return unread


def tolerance(cfg, dtype: str) -> float:
    """The floor of the acceptance bound on the median per-row relative L2 error of the logits."""
    # FP8 activation quantization turns tiny reordering differences into whole e4m3 steps (see tests/test_compile).
    if dtype == "bfloat16":
        return 2e-2
    return 1e-2 if cfg.is_fp8 else 1e-4


# How far the package may sit from the eager model, in units of the eager model's own noise floor.
NOISE_FACTOR = 2.0
MIN_ROWS = 8  # rows of logits compared per graph (decode: trials x batch; prefill: one row per trial)


def _row_errors(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    got, expected = got.float().flatten(0, -2), expected.float().flatten(0, -2)
    return (got - expected).norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-30)


def _perturbed(tensors: list[torch.Tensor], g: torch.Generator) -> None:
    # One unit of rounding of the tensors' dtype, at random: the size of the difference a reordered sum makes.
    for c in tensors:
        eps = torch.finfo(c.dtype).eps
        c.mul_(1 + eps * torch.randn(c.shape, generator=g, device=c.device, dtype=torch.float32).to(c.dtype))


@torch.no_grad()
def verify(directory: str | Path) -> list[dict]:
    """Check every package against the eager model; returns one result dict per graph, raises on a mismatch.

    A graph passes when the median over rows of the relative L2 error of its logits is within
    max(tolerance floor, NOISE_FACTOR x the eager model's own noise floor). The noise floor is measured on the same
    inputs: the eager model rerun on caches perturbed by one rounding unit (the first-chunk graph, which reads no
    cache: on embeddings perturbed so). With FP8 activations and MoE routing,
    a one-ulp difference can move one activation across an e4m3 step or flip one expert choice, which moves
    individual rows a lot; a wrong graph (wrong weights, cache rows or positions) moves every row.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    cfg = load_config_file(directory / "config.json")
    device = "cuda" if manifest["device"] == "cuda" else "cpu"
    ws = manifest["world_size"]
    if ws > 1:
        stub_process_group(ws)
    model = build_rank_model(cfg, ParallelPlan(0, ws).for_artifacts(manifest), dtype=DTYPES[manifest["dtype"]], device=device,
                             max_batch_size=manifest["max_batch_size"], max_seq_len=manifest["max_seq_len"])
    fill_random_(model, seed=1234)
    tensors = constants(model)
    floor = tolerance(cfg, manifest["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    caches = model.latent_caches()
    results = []
    for name, graph in manifest["graphs"].items():
        pkg = load_package(directory, graph, device, single_threaded=False)
        unused = unread_constants(graph, tensors)
        inlined = sorted(set(tensors) - set(pkg.get_constant_fqns()) - unused)
        if inlined:  # a weight or rank buffer baked into the code would ignore the tensors the runtime hands in
            raise SystemExit(f"{name}: tensors compiled in as constants instead of taken at run time: {inlined}")
        bind_constants(pkg, name, tensors)
        errs, noise, finite, top1 = [], [], True, []
        # a first-chunk graph that takes several prompts per call is checked with up to 4 of them (distinct rows)
        static = graph.get("static_shape")  # a first-chunk graph of static (rows, width)
        rows_per_trial = graph["batch"] if graph["kind"] == "decode" else static[0] if static else min(
            graph.get("max_batch", 1), 4)
        for _ in range(-(-MIN_ROWS // rows_per_trial)):
            if graph["kind"] == "decode":
                b = graph["batch"]
                step = DecodeStep(model)
                tokens = torch.randint(0, cfg.vocab_size, (b, 1), generator=g, device=device)
                pos = torch.randint(0, manifest["max_seq_len"], (b, 1), generator=g, device=device)
                args: tuple = (tokens, pos)
            else:  # the eager model's general prefill form, also for the first-chunk graph (then at position 0)
                step = PrefillStep(model)
                s, r = static[1] if static else min(graph["max_chunk"], 7), rows_per_trial
                start = 0 if graph.get("first_chunk") else int(
                    torch.randint(0, manifest["max_seq_len"] - s + 1, (1,), generator=g, device=device))
                args = (torch.randint(0, cfg.vocab_size, (r, s), generator=g, device=device),
                        torch.arange(start, start + s, device=device).unsqueeze(0).repeat(r, 1),
                        manifest["max_batch_size"] - 1 - torch.arange(r, device=device),
                        torch.randint(0, s, (r,), generator=g, device=device))
            for c in caches:  # same cache contents for every run: random history
                c.normal_(generator=g)
            saved = [c.clone() for c in caches]
            expected = step(*args).clone()
            for c, s_ in zip(caches, saved):
                c.copy_(s_)
            # the first-chunk graph reads no cache (nothing precedes position 0): its noise enters through the
            # embeddings, one rounding unit of the activations every layer sees
            emb = model.embed_tokens.weight
            noise_in = [emb] if graph.get("first_chunk") else caches
            emb_saved = emb.clone() if graph.get("first_chunk") else None
            _perturbed(noise_in, g)
            noisy = step(*args).clone()
            for c, s_ in zip(caches, saved):
                c.copy_(s_)
            if emb_saved is not None:
                emb.copy_(emb_saved)
            got = pkg(*args)
            finite = finite and bool(torch.isfinite(got).all())
            errs.append(_row_errors(got, expected))
            noise.append(_row_errors(noisy, expected))
            top1.append((got.flatten(0, -2).argmax(-1) == expected.flatten(0, -2).argmax(-1)).float())
        err, nse = torch.cat(errs), torch.cat(noise)
        bound = max(floor, NOISE_FACTOR * nse.median().item())
        res = {"graph": name, "median_err": err.median().item(), "max_err": err.max().item(),
               "median_noise": nse.median().item(), "max_noise": nse.max().item(), "bound": bound,
               "top1_agree": torch.cat(top1).mean().item(), "rows": err.numel(), "finite": finite}
        res["ok"] = finite and res["median_err"] <= bound
        results.append(res)
        print(f"{name}: rel L2 err median {res['median_err']:.2e} max {res['max_err']:.2e} over {res['rows']} rows; "
              f"eager noise floor median {res['median_noise']:.2e} max {res['max_noise']:.2e}; "
              f"bound {bound:.1e}; top-1 agree {res['top1_agree']:.0%} {'ok' if res['ok'] else 'MISMATCH'}",
              flush=True)
        if not res["ok"]:
            raise SystemExit(f"{name} does not match the eager model"
                             + ("" if finite else " (non-finite logits)"))
    return results


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m dsv3.runtime.verify ARTIFACT_DIR")
    verify(sys.argv[1])


if __name__ == "__main__":
    main()
