"""The grouped MoE path's tile schedule on the GPU: the torch reference (stable radix sort, searchsorted, cumsum)
against the two-launch counting sort (dsv3.kernels.moe_schedule), each in a CUDA graph, checked bitwise; and the
whole grouped op (dsv3.routed_experts at prefill-sized T, 16B shapes) with either schedule. With --sweep: the
Triton schedule's launch (pairs per program, warps) at the prefill buckets' T, each checked bitwise against the
reference and timed in CUDA graphs, interleaved rounds. With --decode: decode batches' few pairs, the one-program
schedule (`_schedule_one_kernel`) at 1-8 warps against the two launches.

    python3 scripts/bench_schedule.py [--sweep | --decode] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from dsv3.kernels import moe_schedule as MS
from dsv3.kernels import routed_experts as RE
from dsv3.kernels.bench import graph_us
from dsv3.kernels.fp8_blocks import quantize_weight

CASES = [  # T, K, E (16B prefill: 66 slots; 671B-ep8 rank: 32 local experts, ~7 of 8 ids elsewhere)
    (4095, 6, 66, 0.0), (1024, 6, 66, 0.0), (14, 6, 66, 0.0), (4096, 8, 32, 0.875), (14, 8, 32, 0.875),
]


SWEEP_CASES = [  # T, K, E, invalid share: the 16B prefill's routed ids (64 of 66 slots; the shared slots run as an
    # MLP at prefill), its buckets' T; the 671B-ep8 rank
    (384, 6, 66, 0.0), (1024, 6, 66, 0.0), (2048, 6, 66, 0.0), (4096, 6, 66, 0.0), (4096, 8, 32, 0.875),
]
SWEEP_CHUNKS = (128, 256, 512, 1024)
SWEEP_WARPS = (1, 2, 4, 8)


def routing_ids(t: int, k: int, e: int, invalid: float, n_valid: int | None = None) -> torch.Tensor:
    idx = torch.randint(0, n_valid or e, (t, k), device="cuda")
    return torch.where(torch.rand(t, k, device="cuda") < invalid, idx + e, idx)


def sweep(rounds: int = 3) -> list[dict]:
    rows = []
    for t, k, e, invalid in SWEEP_CASES:
        idx = routing_ids(t, k, e, invalid, 64 if e == 66 else None)
        want, _ = MS.grouped_schedule_reference(idx, e, RE.GROUPED_BLOCK_T)
        cfgs = [(c, w) for c in SWEEP_CHUNKS for w in SWEEP_WARPS]
        times: dict = {}
        for cfg in cfgs:
            got, _ = MS.grouped_schedule_triton(idx, e, RE.GROUPED_BLOCK_T, *cfg)
            if not torch.equal(got, want):
                raise SystemExit(f"T {t} E {e}: chunk {cfg[0]} warps {cfg[1]} differs from the reference")
        for _ in range(rounds):
            for cfg in cfgs:
                us = graph_us([lambda cfg=cfg: MS.grouped_schedule_triton(idx, e, RE.GROUPED_BLOCK_T, *cfg)] * 20)
                times[cfg] = min(times.get(cfg, 1e9), us)
        before = (MS.CHUNK, MS.SCHEDULE_WARPS)  # the one launch of before SCHEDULE_LAUNCHES
        (rule,) = [c[:2] for c in MS.schedule_launches(t * k)]
        best = min(times, key=times.get)
        print(f"T {t:5d} K {k} E {e:3d}: chunk {before[0]} / {before[1]} warps (before) {times[before]:6.2f} us; the "
              f"rule's {rule[0]} / {rule[1]} {times[rule]:6.2f} us; best {best[0]} / {best[1]} {times[best]:6.2f} us; "
              "all bitwise equal", flush=True)
        print("   " + "  ".join(f"{c}/{w}: {times[(c, w)]:.2f}" for c, w in cfgs), flush=True)
        rows.append({"t": t, "k": k, "e": e, "invalid": invalid,
                     "us": {f"{c}/{w}": times[(c, w)] for c, w in cfgs}, "best": list(best)})
    return rows


DECODE_CASES = [(8, 8, 66), (16, 8, 66), (32, 8, 66), (64, 8, 66)]  # 16B decode batches' pairs (sparse tiles: 32)
DECODE_WARPS = (1, 2, 4, 8)


def decode(rounds: int = 3) -> list[dict]:
    """Decode-sized P: the one-program schedule at each warp count against the two launches of the rule."""
    rows = []
    for t, k, e in DECODE_CASES:
        idx = routing_ids(t, k, e, 0.0)
        want, _ = MS.grouped_schedule_reference(idx, e, RE.SPARSE_TILE_PAIRS)
        forms = {"two launches": dict(one=False)} | {f"one program, {w} warps": dict(one=True, num_warps=w)
                                                      for w in DECODE_WARPS}
        for name, kw in forms.items():
            if not torch.equal(MS.grouped_schedule_triton(idx, e, RE.SPARSE_TILE_PAIRS, **kw)[0], want):
                raise SystemExit(f"T {t}: {name} differs from the reference")
        times: dict = {}
        for _ in range(rounds):
            for name, kw in forms.items():
                us = graph_us([lambda kw=kw: MS.grouped_schedule_triton(idx, e, RE.SPARSE_TILE_PAIRS, **kw)] * 20)
                times[name] = min(times.get(name, 1e9), us)
        print(f"T {t:3d} K {k} E {e} (P {t * k}): " + ", ".join(f"{n} {u:.2f} us" for n, u in times.items())
              + "; all bitwise equal", flush=True)
        rows.append({"t": t, "k": k, "e": e, "us": times})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="the Triton schedule's launch configs (see above)")
    ap.add_argument("--decode", action="store_true", help="decode-sized P: one program against two launches")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.sweep or args.decode:
        rows = sweep() if args.sweep else decode()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = []
    for t, k, e, invalid in CASES:
        idx = routing_ids(t, k, e, invalid)
        want, _ = MS.grouped_schedule_reference(idx, e, RE.GROUPED_BLOCK_T)
        got, _ = MS.grouped_schedule_triton(idx, e, RE.GROUPED_BLOCK_T)
        same = torch.equal(got, want)
        times = {}
        for _ in range(3):  # interleaved rounds, best median
            for name, fn in (("torch", MS.grouped_schedule_reference), ("triton", MS.grouped_schedule_triton)):
                us = graph_us([lambda fn=fn: fn(idx, e, RE.GROUPED_BLOCK_T)] * 20)
                times[name] = min(times.get(name, 1e9), us)
        row = {"t": t, "k": k, "e": e, "schedule_torch_us": times["torch"], "schedule_triton_us": times["triton"],
               "bitwise": same}
        if e == 66:  # the whole grouped op at 16B shapes with either schedule
            d, i = 2048, 1408
            x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
            shapes = ((e, i, d), (e, i, d), (e, d, i))
            q = [quantize_weight(torch.randn(*sh, device="cuda") * 0.05) for sh in shapes]
            w = [q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1]]
            wt = torch.rand(t, k, device="cuda")
            outs = {}
            for name in ("torch", "triton"):
                os.environ["DSV3_MOE_SCHEDULE"] = name
                outs[name] = RE.routed_experts_triton(x, idx, wt, *w, grouped=True)
                row[f"op_{name}_us"] = graph_us([lambda: RE.routed_experts_triton(x, idx, wt, *w, grouped=True)] * 5)
            os.environ.pop("DSV3_MOE_SCHEDULE")
            row["op_bitwise"] = torch.equal(outs["torch"], outs["triton"])
        rows.append(row)
        print("T {t:5d} K {k} E {e:3d}: schedule torch {schedule_torch_us:7.1f} us, triton {schedule_triton_us:6.1f} us"
              " (bitwise {bitwise})".format(**row)
              + ("; grouped op torch {op_torch_us:8.1f} us, triton {op_triton_us:8.1f} us (bitwise {op_bitwise})"
                 .format(**row) if "op_torch_us" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
