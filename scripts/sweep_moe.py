"""Sweep the FP8 decode launch plan of `dsv3.routed_experts` on the GPU and suggest `moe_decode_plan` values.

    python3 scripts/sweep_moe.py --json $OUT/sweep_moe.json              # ~1 min on an H200
    python3 scripts/sweep_moe.py --quick --shapes 16B --t 1               # a smaller grid, one shape
    python3 scripts/sweep_moe.py --up-bn 16,32 --warps 2,4 --stages 6,8,10 # another grid
    python3 scripts/sweep_moe.py --t 1,2,4,8 --json $OUT/sweep_moe.json  # every row of MOE_DECODE_TUNED (~2 min)

Needs the package installed (`pip install -e .`, or `bash scripts/gpu_check.sh env` on the device).

Shapes (FP8 weights, bf16 activations, T = 1 and 8 tokens):
- 16B: 64 routed experts + the 2 shared experts stacked as slots 64, 65 (E = 66), D = 2048, I = 1408; per token 6
  distinct random routed ids plus 64 and 65 (K = 8).
- 671B-ep8: one rank of 671B at world size 8: 32 local experts, D = 7168, I = 2048; per token 1 local id and 7 ids
  outside [0, 32) (the other ranks' experts, which contribute nothing), K = 8 (on average 1 of the 8 global top-8
  ids falls on a rank).
Plans (`dsv3.kernels.routed_experts.MoeDecodePlan`): the default (what the op launches today: `moe_decode_plan` /
DSV3_MOE_DECODE), every (up block_n, down block_n, num_warps, num_stages) of a grid with the same warps and stages for
both kernels (up block_n 16/32/64/128, down block_n 32/64/128, warps 4/8, stages 3/4/6; at T = 1 also the
row-parallel up kernel with the row-parallel down kernel, `one_token_plans`), then a coordinate search
from the best of those: the up kernel's (warps, stages) with the down kernel fixed, then the down kernel's (stages
also 8 and 10 there). The fastest plans and the default are then re-timed twice more, interleaved, and ranked by
the median (`--confirm`).
Every plan is first run eagerly and checked against the default plan's output (bitwise, or max abs difference
< 1e-2 * max |default|; the default itself against `routed_experts_reference`, relative error < 3e-2); plans that
fail to compile, launch or verify are recorded and skipped.
Timing: C copies of all experts' weights (C * bytes read per call >= 256 MB, several times the 50 MB L2), the C
calls of one plan captured back to back in one CUDA graph (dsv3.kernels.bench.graph_us), replayed until >= 200
calls ran; median replay / C. Bytes: gate, up and down weights (and block scales) of the distinct experts the
routing selects (each read once per call) + x and the output in bf16; TB/s and % of the H200's 4.27 TB/s.
Per-kernel device times (torch.profiler, eager calls over the copies) of the default, the best plan and the best
plan of each up block_n show where the time goes (`--no-profile` skips them).

All kernels of the grid are compiled up front by a pool of processes (Triton's on-disk cache then serves the timing
process); `--no-precompile` compiles lazily instead. Output: a ranked table per shape and T, the suggested
`MOE_DECODE_TUNED` table for kernels/routed_experts.py (plus DSV3_MOE_DECODE strings to try a plan in a whole
model), and with `--json PATH` every measurement (rewritten after each shape, so a timeout keeps what ran).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from typing import Optional

import torch

PEAK_TB_S = 4.27  # H200 HBM3e
SHAPES = {
    # E slots = e_routed + n_shared; per token: k_local distinct ids in [0, e_routed), the n_shared always-on
    # slots, n_invalid ids outside [0, E)
    "16B": dict(e_routed=64, n_shared=2, d=2048, i=1408, k_local=6, n_invalid=0),
    "671B-ep8": dict(e_routed=32, n_shared=0, d=7168, i=2048, k_local=1, n_invalid=7),
    # the kernel bench's (issue 3's) 16B shape: 64 routed experts, top-6, no stacked shared slots
    "16B-routed": dict(e_routed=64, n_shared=0, d=2048, i=1408, k_local=6, n_invalid=0),
}
TS = (1, 8)
GRID = dict(up_bn=(16, 32, 64, 128), down_bn=(32, 64, 128), warps=(4, 8), stages=(3, 4, 6))
QUICK_GRID = dict(up_bn=(16, 32, 128), down_bn=(64, 128), warps=(4, 8), stages=(4,))
ERR_TOL = 1e-2    # max |out - default| / max |default|
REF_TOL = 3e-2    # default vs routed_experts_reference (relative Frobenius), the GPU tests' FP8 bound
WIN = 1.03        # suggest a plan only when it beats the default by this factor
REFINE_STAGES = (8, 10)  # extra num_stages the coordinate search tries (the first H200 runs: 671B T=1 liked 10)
CONFIRM_TOP = 6   # plans re-timed (with the default) by the confirmation rounds


def log(msg: str) -> None:
    print(msg, flush=True)


def plan_str(p) -> str:
    return (f"up {p.up_block_n:3d}/{p.up_num_warps}w/{p.up_num_stages}s  "
            f"down {p.down_block_n:3d}/{p.down_num_warps}w/{p.down_num_stages}s")


def env_str(p) -> str:
    return ":".join(str(v) for v in p)


def grid_plans(grid: dict) -> list:
    from dsv3.kernels.routed_experts import MoeDecodePlan

    return [MoeDecodePlan(ub, w, s, db, w, s)
            for ub, db, w, s in itertools.product(grid["up_bn"], grid["down_bn"], grid["warps"], grid["stages"])]


def one_token_plans() -> list:
    """T = 1 only: the row-parallel up kernel with the row-parallel down kernel (ROWS_DOWN_BLOCK_NS, opt-in until
    timed) next to the MMA down kernel the table uses."""
    from dsv3.kernels.routed_experts import ROWS_DOWN_BLOCK_NS, ROWS_UP_BLOCK_NS, MoeDecodePlan

    return [MoeDecodePlan(ub, 4, 1, db, w, 1) for ub in ROWS_UP_BLOCK_NS[:2] for db in ROWS_DOWN_BLOCK_NS
            for w in (4, 8)]


def refine_plans(best, grid: dict, kernel: str) -> list:
    """Coordinate-search neighbours of `best`: one kernel's ('up' or 'down') (warps, stages) over the grid's warps
    and the grid's stages plus REFINE_STAGES (deeper pipelines, compiled lazily), the other kernel fixed."""
    stages = sorted(set(grid["stages"]) | set(REFINE_STAGES))
    return [best._replace(**{f"{kernel}_num_warps": w, f"{kernel}_num_stages": s})
            for w in grid["warps"] for s in stages]


def make_idx(t: int, sh: dict, gen: torch.Generator) -> torch.Tensor:
    """[T, K] routing as the model produces it: k_local distinct ids in [0, e_routed), then the shared slots
    (e_routed ..), then n_invalid ids outside [0, E) (other ranks' experts under expert parallelism)."""
    e = sh["e_routed"] + sh["n_shared"]
    rows = []
    for _ in range(t):
        local = torch.randperm(sh["e_routed"], generator=gen)[:sh["k_local"]]
        shared = torch.arange(sh["e_routed"], e)
        bad = torch.randint(e, 8 * e, (sh["n_invalid"],), generator=gen)
        bad = torch.where(torch.rand(sh["n_invalid"], generator=gen) < 0.5, bad, -bad)  # lower and higher ranks
        rows.append(torch.cat([local, shared, bad]))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------------
# parallel precompilation (Triton's on-disk cache is shared by the processes)
# ---------------------------------------------------------------------------------------------------------------


class _WarmupLaunch:
    """Stands in for `wrap_triton(kernel)`: `[grid](*args, **kw)` compiles for these arguments, launches nothing."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kw: self.kernel.warmup(*args, grid=grid, **kw)


def _empty_operands(name: str, t: int, device="cuda"):
    sh = SHAPES[name]
    e, d, i = sh["e_routed"] + sh["n_shared"], sh["d"], sh["i"]
    k = sh["k_local"] + sh["n_shared"] + sh["n_invalid"]
    f8 = torch.float8_e4m3fn
    x = torch.empty(t, d, device=device, dtype=torch.bfloat16)
    idx = torch.zeros(t, k, device=device, dtype=torch.int64)
    wt = torch.empty(t, k, device=device)
    wg, wu = (torch.empty(e, i, d, device=device, dtype=f8) for _ in range(2))
    wd = torch.empty(e, d, i, device=device, dtype=f8)
    sg, su = (torch.empty(e, -(-i // 128), -(-d // 128), device=device) for _ in range(2))
    sd = torch.empty(e, -(-d // 128), -(-i // 128), device=device)
    return x, idx, wt, [wg, wu, wd, sg, su, sd]


def _precompile_group(task: tuple) -> list[tuple[tuple, Optional[str]]]:
    from dsv3.kernels import fp8_linear as L
    from dsv3.kernels import routed_experts as RE

    name, t, plans = task
    RE.wrap_triton = _WarmupLaunch
    L.wrap_triton = _WarmupLaunch
    x, idx, wt, w = _empty_operands(name, t)
    out = []
    for p in plans:
        try:
            RE.routed_experts_triton(x, idx, wt, *w, **RE.MoeDecodePlan(*p)._asdict())
            out.append(((name, t, tuple(p)), None))
        except Exception as exc:  # recorded; the timing process retries and records the config
            out.append(((name, t, tuple(p)), f"{type(exc).__name__}: {str(exc)[:200]}"))
    return out


def precompile(tasks: list[tuple], workers: int) -> dict[tuple, str]:
    """Compile every (shape, T, plan) in `workers` spawned processes; returns {(shape, T, plan): error}."""
    import multiprocessing as mp

    chunks = []
    for name, t, plans in tasks:  # a few chunks per (shape, T): each process allocates that shape's operands once
        n = max(1, math.ceil(len(plans) / max(1, workers // max(1, len(tasks)))))
        chunks += [(name, t, [tuple(p) for p in plans[j:j + n]]) for j in range(0, len(plans), n)]
    failed: dict[tuple, str] = {}
    with mp.get_context("spawn").Pool(workers) as pool:
        for res in pool.imap_unordered(_precompile_group, chunks):
            for key, err in res:
                if err is not None:
                    failed[key] = err
    return failed


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------


class ShapeBench:
    """C copies of one expert shape's FP8 weights on the device, one routing; times plans over the copies."""

    def __init__(self, name: str, t: int, seed: int):
        from dsv3.kernels.fp8_blocks import quantize_weight

        sh = SHAPES[name]
        self.name, self.t = name, t
        self.e, self.d, self.i = sh["e_routed"] + sh["n_shared"], sh["d"], sh["i"]
        gen = torch.Generator().manual_seed(seed)
        self.idx = make_idx(t, sh, gen).cuda()
        self.k = self.idx.shape[1]
        self.wt = torch.rand(self.idx.shape, generator=gen).cuda()
        self.x = torch.randn(t, self.d, generator=gen).to(device="cuda", dtype=torch.bfloat16)
        ggen = torch.Generator(device="cuda").manual_seed(seed)
        shapes = ((self.e, self.i, self.d), (self.e, self.i, self.d), (self.e, self.d, self.i))
        q = [quantize_weight(torch.randn(*s, device="cuda", generator=ggen) * 0.05) for s in shapes]
        w0 = [q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1]]
        valid = self.idx[(self.idx >= 0) & (self.idx < self.e)]
        self.n_used = int(torch.unique(valid).numel())
        per_expert = sum(a[0].numel() // self.e + a[1].numel() // self.e * 4 for a in q)
        self.bytes = self.n_used * per_expert + 2 * t * self.d * 2
        self.copies = int(max(2, min(16, math.ceil(256e6 / self.bytes))))
        self.w = [w0] + [[a.clone() for a in w0] for _ in range(self.copies - 1)]
        self.base: Optional[torch.Tensor] = None

    def run(self, plan, c: int = 0) -> torch.Tensor:
        from dsv3.kernels.routed_experts import routed_experts_triton

        return routed_experts_triton(self.x, self.idx, self.wt, *self.w[c], **plan._asdict())

    def check_default(self) -> float:
        from dsv3.kernels.routed_experts import routed_experts_reference, routed_experts_triton

        self.base = routed_experts_triton(self.x, self.idx, self.wt, *self.w[0])
        ref = routed_experts_reference(self.x, self.idx, self.wt, *self.w[0])
        assert torch.isfinite(self.base).all(), "default plan: non-finite output"
        return ((self.base.double() - ref.double()).norm() / ref.double().norm()).item()

    def diff(self, out: torch.Tensor) -> tuple[bool, float]:
        """(bitwise equal, max |out - default| / max |default|)."""
        if torch.equal(out, self.base):
            return True, 0.0
        if not torch.isfinite(out).all():
            return False, float("inf")
        return False, ((out.float() - self.base.float()).abs().max() / self.base.float().abs().max()).item()

    def time(self, plan) -> float:
        from dsv3.kernels.bench import graph_us

        calls = [lambda c=c: self.run(plan, c) for c in range(self.copies)]
        return graph_us(calls, reps=max(5, math.ceil(200 / self.copies)))


def kernel_times(sb: ShapeBench, plan, rounds: int = 10) -> dict[str, float]:
    """Mean device microseconds per call of each kernel the plan launches (torch.profiler, eager calls)."""
    from collections import defaultdict

    for c in range(sb.copies):
        sb.run(plan, c)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            for c in range(sb.copies):
                sb.run(plan, c)
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ("moe" in ev.name or "act_quant" in ev.name):
            total[ev.name.strip("_").removesuffix("_kernel")] += ev.device_time
    return {k: round(v / (rounds * sb.copies), 2) for k, v in total.items()}


def profile_best(sb: ShapeBench, rows: list[dict]) -> None:
    """Per-kernel times of the default, the best plan and the best plan of each up block_n (into their rows)."""
    from dsv3.kernels.routed_experts import MoeDecodePlan

    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    pick = [r for r in ok if r["label"] == "default"][:1] + ok[:1]
    for ub in sorted({r["plan"][0] for r in ok}):
        pick += [r for r in ok if r["plan"][0] == ub][:1]
    seen = set()
    for r in pick:
        if id(r) in seen:
            continue
        seen.add(id(r))
        try:
            r["kernels_us"] = kernel_times(sb, MoeDecodePlan(*r["plan"]))
        except Exception as exc:  # the profiler is a diagnostic: never fail the sweep on it
            log(f"  profiler failed: {type(exc).__name__}: {exc}")
            return
        parts = "  ".join(f"{k} {v:.2f}" for k, v in r["kernels_us"].items())
        log(f"  kernels of {plan_str(MoeDecodePlan(*r['plan']))} ({r['label']}, {r['us']:.2f} us in the graph): "
            f"{parts}")


def measure(sb: ShapeBench, plan, label: str, failed: dict) -> dict:
    rec = dict(shape=sb.name, t=sb.t, e=sb.e, d=sb.d, i=sb.i, k=sb.k, experts_used=sb.n_used, bytes=sb.bytes,
               copies=sb.copies, label=label, plan=list(plan), env=env_str(plan),
               up_programs=min(sb.e, sb.t * sb.k) * -(-sb.i // plan.up_block_n),
               down_programs=min(sb.e, sb.t * sb.k) * -(-sb.d // plan.down_block_n))
    pre = failed.get((sb.name, sb.t, tuple(plan)))
    try:
        bitwise, err = sb.diff(sb.run(plan))
        rec.update(bitwise=bitwise, max_rel_diff=err)
        if not err < ERR_TOL:
            rec["error"] = f"mismatch vs default: max rel diff {err:.3g}"
            return rec
        us = sb.time(plan)
        rec.update(us=round(us, 3), tb_s=round(sb.bytes / us / 1e6, 3),
                   pct_peak=round(100 * sb.bytes / us / 1e6 / PEAK_TB_S, 1))
    except Exception as exc:  # compile / launch failure (shared memory, registers, ...)
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if pre:
            rec["precompile_error"] = pre
    return rec


def confirm(sb: ShapeBench, rows: list[dict], rounds: int) -> None:
    """Re-time the CONFIRM_TOP fastest plans and the default `rounds` more times, interleaved (clock and thermal
    drift hit them alike); their `us` becomes the median of all their timings."""
    from dsv3.kernels.routed_experts import MoeDecodePlan

    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    pick = ok[:CONFIRM_TOP] + [r for r in ok[CONFIRM_TOP:] if r["label"] == "default"]
    for r in pick:
        r["us_runs"] = [r["us"]]
    for _ in range(rounds):
        for r in pick:
            r["us_runs"].append(round(sb.time(MoeDecodePlan(*r["plan"])), 3))
    for r in pick:
        us = statistics.median(r["us_runs"])
        r.update(us=round(us, 3), tb_s=round(sb.bytes / us / 1e6, 3),
                 pct_peak=round(100 * sb.bytes / us / 1e6 / PEAK_TB_S, 1))


def print_table(rows: list[dict], top: int) -> None:
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    dflt = next((r for r in ok if r["label"] == "default"), None)
    log(f"  {'rank':>4s}  {'plan':44s} {'us':>8s} {'TB/s':>6s} {'%peak':>6s} {'vs dflt':>8s}  {'progs up/down':>13s}"
        f"  check")
    shown = ok[:top] + ([dflt] if dflt is not None and dflt not in ok[:top] else [])
    from dsv3.kernels.routed_experts import MoeDecodePlan

    for r in shown:
        speed = f"{dflt['us'] / r['us']:.3f}x" if dflt else ""
        check = "bitwise" if r.get("bitwise") else f"{r.get('max_rel_diff', 0):.1e}"
        tag = " (default)" if r["label"] == "default" else ""
        log(f"  {ok.index(r) + 1:4d}  {plan_str(MoeDecodePlan(*r['plan'])):44s} {r['us']:8.2f} {r['tb_s']:6.2f} "
            f"{r['pct_peak']:6.1f} {speed:>8s}  {r['up_programs']:6d}/{r['down_programs']:<6d}  {check}{tag}")
    bad = [r for r in rows if "error" in r]
    if bad:
        log(f"  {len(bad)} plans failed or mismatched, e.g. {plan_str(MoeDecodePlan(*bad[0]['plan']))}: "
            f"{bad[0]['error']}")


def suggest(rows: list[dict]) -> None:
    """The best plan per (shape, T) and the MOE_DECODE_TUNED table to paste: the current table with the swept rows
    replaced or added (rows at T values or shapes this run did not sweep are kept, and marked)."""
    from dsv3.kernels.routed_experts import MOE_DECODE_TUNED, MoeDecodePlan

    table: dict[tuple, dict[int, MoeDecodePlan]] = {}
    log("\nbest plan per shape (speedup over the default plan):")
    for name in SHAPES:
        for t in sorted({r["t"] for r in rows if r["shape"] == name}):
            ok = [r for r in rows if r["shape"] == name and r["t"] == t and "us" in r]
            dflt = next((r for r in ok if r["label"] == "default"), None)
            if not ok or dflt is None:
                continue
            best = min(ok, key=lambda r: r["us"])
            gain = dflt["us"] / best["us"]
            # no clear win: keep what the op launches now (the current table's plan, or MOE_DECODE_DEFAULT)
            chosen = MoeDecodePlan(*(best if gain >= WIN else dflt)["plan"])
            key = (best["e"], best["i"], best["d"])
            table.setdefault(key, {})[t] = chosen
            log(f"  {name:9s} T={t}: default {dflt['us']:7.2f} us ({dflt['tb_s']:.2f} TB/s) -> best "
                f"{plan_str(MoeDecodePlan(*best['plan']))} {best['us']:7.2f} us ({best['tb_s']:.2f} TB/s, "
                f"{gain:.3f}x); DSV3_MOE_DECODE={best['env']}")
    log(f"\nsuggested table for kernels/routed_experts.py (plans that beat the default by >= {WIN:.2f}x, else the"
        f" default; T between"
        " two rows takes the larger row's plan, T past the last row the default):")
    log("MOE_DECODE_TUNED: dict[tuple[int, int, int], tuple[tuple[int, MoeDecodePlan], ...]] = {")
    for key in list(table) + [k for k in MOE_DECODE_TUNED if k not in table]:
        current = dict(MOE_DECODE_TUNED.get(key, ()))
        swept = table.get(key, {})
        kept = sorted(set(current) - set(swept))
        merged = {**current, **swept}
        body = ", ".join(f"({t}, MoeDecodePlan({', '.join(str(v) for v in merged[t])}))" for t in sorted(merged))
        note = f"  # kept from the current table (not swept): T={','.join(map(str, kept))}" if kept else ""
        log(f"    {key}: ({body},),{note}")
    log("}")


def write_json(path: Optional[str], rows: list[dict], meta: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--shapes", default="16B,671B-ep8",
                    help=f"comma-separated subset of {', '.join(SHAPES)} (default: the models' layouts)")
    ap.add_argument("--t", default=",".join(str(t) for t in TS), help="token counts (decode: <= 64)")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    for key, what in (("up_bn", "up block_n"), ("down_bn", "down block_n"), ("warps", "num_warps"),
                      ("stages", "num_stages")):
        ap.add_argument("--" + key.replace("_", "-"), default=None,
                        help=f"comma-separated {what} values of the grid (default {','.join(map(str, GRID[key]))})")
    ap.add_argument("--no-refine", action="store_true", help="skip the per-kernel warps/stages search")
    ap.add_argument("--top", type=int, default=12, help="rows of each ranked table")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel times")
    ap.add_argument("--confirm", type=int, default=2,
                    help=f"extra timing rounds of the {CONFIRM_TOP} fastest plans and the default (median)")
    ap.add_argument("--no-precompile", action="store_true", help="compile lazily in the timing process")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    opts = ap.parse_args(argv)
    if not torch.cuda.is_available():
        log("sweep_moe needs a CUDA device")
        return 2
    import triton
    from torch._library.triton import set_wrap_triton_enabled

    from dsv3.kernels.routed_experts import DECODE_MAX_T, MoeDecodePlan, resolve_moe_decode
    from dsv3.kernels._launch import num_sms

    names = [s for s in opts.shapes.split(",") if s]
    for s in names:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}")
    ts = [int(v) for v in opts.t.split(",") if v]
    if any(not 1 <= t <= DECODE_MAX_T for t in ts):
        ap.error(f"T must be in [1, {DECODE_MAX_T}] (the decode path)")
    grid = dict(QUICK_GRID if opts.quick else GRID)
    for key in GRID:
        if getattr(opts, key) is not None:
            grid[key] = tuple(int(v) for v in getattr(opts, key).split(",") if v)
    dev = torch.device("cuda")
    sms = num_sms(dev)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), device=torch.cuda.get_device_name(0), sms=sms,
                torch=torch.__version__, triton=triton.__version__, grid=grid,
                env_override=os.environ.get("DSV3_MOE_DECODE"))
    log(f"{meta['device']} ({sms} SMs), torch {torch.__version__}, triton {triton.__version__}; grid {grid}")
    t0 = time.time()
    plans = grid_plans(grid)
    failed: dict[tuple, str] = {}
    if not opts.no_precompile:
        tasks = []
        for name in names:
            sh = SHAPES[name]
            for t in ts:
                dflt = resolve_moe_decode(t, sh["e_routed"] + sh["n_shared"], sh["i"], sh["d"], sms, True)
                tasks.append((name, t, [dflt] + plans + (one_token_plans() if t == 1 else [])))
        failed = precompile(tasks, opts.workers)
        log(f"precompiled {sum(len(p) for *_, p in tasks)} plans in {time.time() - t0:.0f} s "
            f"({len(failed)} failed to compile)")
    rows: list[dict] = []
    with torch.no_grad(), set_wrap_triton_enabled(False):
        for n_shape, name in enumerate(names):
            for t in ts:
                ts0 = time.time()
                sb = ShapeBench(name, t, seed=1000 * n_shape + t)
                err = sb.check_default()
                dflt = resolve_moe_decode(t, sb.e, sb.i, sb.d, sms, True)
                log(f"\n{name} T={t}: E={sb.e} D={sb.d} I={sb.i} K={sb.k}, {sb.n_used} experts read, "
                    f"{sb.bytes / 1e6:.1f} MB per call, {sb.copies} weight copies; default plan "
                    f"{plan_str(dflt)}: rel err vs reference {err:.2e}")
                if not err < REF_TOL:
                    log(f"  DEFAULT PLAN DISAGREES WITH THE REFERENCE ({err:.3g} >= {REF_TOL}); skipping the shape")
                    rows.append(dict(shape=name, t=t, label="default", plan=list(dflt),
                                     error=f"rel err vs reference {err:.3g}"))
                    continue
                here = [measure(sb, MoeDecodePlan(*dflt), "default", failed)]
                seen = {tuple(dflt)}
                for p in plans + (one_token_plans() if t == 1 else []):
                    if tuple(p) not in seen:
                        seen.add(tuple(p))
                        here.append(measure(sb, p, "grid", failed))
                for kernel in () if opts.no_refine else ("up", "down"):
                    ok = [r for r in here if "us" in r]
                    if not ok:
                        break
                    best = MoeDecodePlan(*min(ok, key=lambda r: r["us"])["plan"])
                    for p in refine_plans(best, grid, kernel):
                        if tuple(p) not in seen:
                            seen.add(tuple(p))
                            here.append(measure(sb, p, "refine", failed))
                if opts.confirm > 0:
                    confirm(sb, here, opts.confirm)
                rows += here
                print_table(here, opts.top)
                if not opts.no_profile:
                    profile_best(sb, here)
                log(f"  [{time.time() - ts0:.0f} s]")
                meta["wall_s"] = round(time.time() - t0)
                write_json(opts.json, rows, meta)
                del sb
                torch.cuda.empty_cache()
    suggest(rows)
    bad = [r for r in rows if "error" in r]
    log(f"\n{len(rows)} measurements, {len(bad)} plans failed or mismatched; {time.time() - t0:.0f} s")
    meta["wall_s"] = round(time.time() - t0)
    write_json(opts.json, rows, meta)
    if opts.json:
        log(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
