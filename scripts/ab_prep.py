"""MLA prep ops side by side on the GPU: this tree's `dsv3.mla_decode_prep` and `dsv3.mla_prefill_prep` kernels
against another version of kernels/mla_decode_prep.py, outputs compared bit for bit.

    git show 1dbe012:kernels/mla_decode_prep.py > ab_old/mla_decode_prep.py    # on the development machine
    python3 scripts/ab_prep.py --old ab_old/mla_decode_prep.py --prefill-heads 16,128 --json $OUT/ab_prep.json

(1dbe012: the last commit with the one-token prefill kernel, programs of (token, 16 query heads) and one warp.)
16B shapes (16 heads, Dn 128, R 64, Dv 128, C 512, FP8 kv_b_proj, a 4096-row cache; q and kv_a column slices of
one projection output, as the model's fused qkv_a projection gives them). Decode: batch 1 and 8, one token each,
old vs new module. Prefill, per --prefill-heads count (16: 16B, and 671B's rank at tensor parallel 8; 128: 671B on
one GPU): one 4095-token chunk into cache row 1: the old module's kernel at its default launch, the new kernel at
its default launch (`prefill_prep_launch`) and at every candidate (BLOCK_T 2-16, head block, warps 1-8) of
`candidates`, each checked bit for bit against the old one (q_pe, the latent returned, the whole cache);
--composition adds the reference composition compiled by Inductor (what the prefill graph ran before the op).
Timing: `dsv3.kernels.bench.graph_us` (3 calls per CUDA graph), interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_grouped_moe import timed_old_new  # noqa: E402


def load_old_module(path: str):
    """All kernels and launchers of an old copy of kernels/mla_decode_prep.py, its op registrations dropped
    (`@triton_op` and `.register_fake` decorators: the ops are this tree's), so its functions are plain ones."""
    src = open(path).read()
    if "def mla_prefill_prep_triton(" not in src:
        raise SystemExit(f"{path}: no mla_prefill_prep_triton; is it a copy of kernels/mla_decode_prep.py?")
    src = re.sub(r"^@(triton_op\(.*\)|\w+\.register_fake)\n", "", src, flags=re.M)
    fd, tmp = tempfile.mkstemp(prefix="ab_old_mla_decode_prep_", suffix=".py")
    with os.fdopen(fd, "w") as f:  # triton.jit reads kernel sources from a real file
        f.write(src)
    spec = importlib.util.spec_from_file_location("ab_old_mla_decode_prep", tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def inputs(b: int, s: int, seed: int, dev: torch.device, h: int = 16):
    from dsv3.kernels.fp8_blocks import quantize_weight

    g = torch.Generator(device=dev).manual_seed(seed)
    dn, r, dv, c, t = 128, 64, 128, 512, 4096
    proj = torch.randn(b, s, h * (dn + r) + c + r, device=dev, generator=g).bfloat16()
    q = proj[..., :h * (dn + r)].view(b, s, h, dn + r)
    kv_a = proj[..., h * (dn + r):]
    norm_w = (1 + 0.1 * torch.randn(c, device=dev, generator=g)).bfloat16()
    pos = (torch.arange(s, device=dev) + (t - s) // 2)[None].expand(b, s).contiguous()
    ang = torch.rand(b, s, r // 2, device=dev, generator=g) * 6.0
    cache = torch.randn(max(b, 2), t, c + r, device=dev, generator=g).bfloat16()
    w, ws = quantize_weight(torch.randn(h * (dn + dv), c, device=dev, generator=g) * 0.1)
    return dict(q=q, kv_a=kv_a, norm_w=norm_w, cos=ang.cos(), sin=ang.sin(), cache=cache, pos=pos, w=w, ws=ws,
                eps=1e-6, dn=dn, dv=dv)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)  # equal bits, not just values (-0.0 != +0.0)


def candidates(heads: int) -> list[tuple[int, int, int]]:
    """(BLOCK_T, head block, warps) to time: head blocks of 16 and 32 (fewer at fewer heads), BLOCK_T 2-16, warps
    1-8 with at most one warp per token (more cross warps in the kv sum of squares) and at most 64 (token, head)
    pairs per warp (more spill registers: ptxas, sm_90)."""
    from dsv3.kernels._launch import next_pow2

    out = []
    for hb in sorted({min(16, max(2, next_pow2(heads))), min(32, max(2, next_pow2(heads)))}):
        out += [(bt, hb, w) for bt in (2, 4, 8, 16) for w in (1, 2, 4, 8) if w <= bt and bt * hb <= 64 * w]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="a copy of kernels/mla_decode_prep.py to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--prefill-heads", default="16,128", help="comma-separated query heads of the prefill cases")
    ap.add_argument("--composition", action="store_true", help="also time the Inductor-compiled composition")
    opts = ap.parse_args()
    from dsv3.kernels import mla_decode_prep as new

    old = load_old_module(opts.old)
    dev = torch.device("cuda")
    rows = []
    for b in (1, 8):
        a = inputs(b, 1, b, dev)
        caches = {k: a["cache"].clone() for k in ("old", "new")}

        def args(k):
            return (a["q"], a["kv_a"], a["norm_w"], a["cos"], a["sin"], caches[k], a["pos"], a["w"], a["ws"],
                    a["eps"], a["dn"], a["dv"])

        calls = {k: (lambda k=k, m=m: m.mla_decode_prep_triton(*args(k))) for k, m in (("old", old), ("new", new))}
        outs = {k: c() for k, c in calls.items()}
        same = all(torch.equal(x, y) for x, y in zip(outs["old"], outs["new"])) and torch.equal(*caches.values())
        row = dict(op="mla_decode_prep", batch=b, bitwise_equal=same, **timed_old_new(calls, opts.rounds, 0.0))
        rows.append(row)
        print(f"decode prep batch {b}: old {row['old']['us']} us, new {row['new']['us']} us ({row['speedup']}x); "
              f"outputs and cache bitwise equal: {same}", flush=True)

    for heads in (int(v) for v in opts.prefill_heads.split(",")):
        rows.append(prefill_case(old, new, dev, heads, opts.rounds, opts.composition))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


def prefill_case(old, new, dev: torch.device, heads: int, rounds: int, composition: bool) -> dict:
    from dsv3.kernels.bench import graph_us

    tokens = 4095
    a = inputs(1, tokens, 7, dev, heads)
    cache_rows = torch.tensor([1], device=dev)
    caches = {}

    def call(name, fn, **kw):
        caches[name] = a["cache"].clone()
        args = (a["q"], a["kv_a"], a["norm_w"], a["cos"], a["sin"], caches[name], a["pos"], cache_rows, a["eps"],
                a["dn"])
        return lambda: fn(*args, **kw)

    default = f"new default {new.prefill_prep_launch(tokens, heads)}"
    calls = {"old": call("old", old.mla_prefill_prep_triton), default: call(default, new.mla_prefill_prep_triton)}
    for bt, hb, w in candidates(heads):
        name = f"new {(bt, hb, w)}"
        calls[name] = call(name, new.mla_prefill_prep_triton, block_t=bt, head_block=hb, num_warps=w)
    if composition:
        compiled = torch.compile(new.mla_prefill_prep_reference, fullgraph=True, dynamic=False)
        calls["composition (Inductor)"] = call("composition (Inductor)", compiled)
    outs = {k: c() for k, c in calls.items()}
    torch.cuda.synchronize()
    ref_pe, ref_lat = outs["old"]
    equal = {}
    for k, (pe, lat) in outs.items():
        equal[k] = (torch.equal(bits(pe), bits(ref_pe)) and torch.equal(bits(lat), bits(ref_lat))
                    and torch.equal(bits(caches[k]), bits(caches["old"])))
    times = {k: [] for k in calls}
    names = list(calls)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(graph_us([calls[k]] * 3))
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(f"prefill prep, {tokens} tokens, {heads} heads (us; bitwise equal to old):", flush=True)
    for k in sorted(med, key=med.get):
        print(f"  {k:32s} {med[k]:8.2f}  {'equal' if equal[k] else 'DIFFERENT'}  {med['old'] / med[k]:.2f}x")
    new_keys = [k for k in med if k.startswith("new")]
    best = min(new_keys, key=med.get)
    print(f"  best new: {best} {med[best]} us ({med['old'] / med[best]:.2f}x old); all new bitwise equal to old: "
          f"{all(equal[k] for k in new_keys)}", flush=True)
    return dict(op="mla_prefill_prep", tokens=tokens, heads=heads, us=med, bitwise_equal_to_old=equal,
                rounds={k: [round(v, 2) for v in t] for k, t in times.items()}, best=best)


if __name__ == "__main__":
    main()
