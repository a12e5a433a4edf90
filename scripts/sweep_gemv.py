"""Sweep the decode GEMV variants of `torch.ops.dsv3.fp8_linear` on the GPU and suggest a `gemv_choice` table.

    python3 scripts/sweep_gemv.py --json $OUT/sweep_gemv.json            # ~2-3 min on an H200
    python3 scripts/sweep_gemv.py --quick --json $OUT/sweep_gemv.json    # M in {1, 8}, smaller grids (~45 s)
    python3 scripts/sweep_gemv.py --quick --models 671B-tp4,671B-tp2 --ms 1,4,16 ...  # other rank layouts

Needs the package installed (`pip install -e .`, or `bash scripts/gpu_check.sh env` on the device).

What it measures, per decode linear (16B unsharded; 671B at TP 8, per-rank shards) and M (1, 4, 8; 16 for 671B):
- every variant of `dsv3.kernels.fp8_linear.fp8_gemv` ('splitk' = today's path, 'nosplit', 'fused_nosplit', 'cc',
  'cc_prequant', 'rows', 'rows_prequant'; the cc and rows ones at M <= 4, see --cc-max-m)
  over a small grid of (block_n, num_warps, num_stages): a coordinate search (all block_n x num_warps at a middle
  num_stages, then every num_stages at the best pair; `--full` times the whole grid);
- the op as dispatched today (`torch.ops.dsv3.fp8_linear`, i.e. `gemv_choice` / DSV3_GEMV_VARIANT), `F.linear` in
  bf16 on the dequantized weight (baseline), `_act_quant_kernel` alone, and cuBLAS's block-scaled GEMM with its
  activation quantization (`fp8_scaled_mm`, the path above GEMV_MAX_M tokens; Hopper only);
- once: an empty Triton kernel as a CUDA-graph node (the per-launch floor) and a device-to-device copy (TB/s).
Timing: C distinct copies of the weights and activations (C * weight bytes >= 256 MB, several times the L2, as a
decode step reads every layer's weights from HBM), the C calls of one config captured back to back in one CUDA graph
(no launch overhead, as in production), replayed until >= 200 calls ran; median replay / C. Every config is first
run eagerly on copy 0 and checked against the float64 GEMM of the identically quantized operands (relative Frobenius
error < 1e-2); configs that fail to compile, launch, or verify are recorded and skipped.
TB/s = (N*K weight bytes + weight scales + M*K*2 activation bytes) / time; % of the H200's 4.27 TB/s.

All kernels of the grid are compiled up front by a pool of processes (Triton's on-disk cache then serves the timing
process); `--no-precompile` compiles lazily instead. Output: a table per shape, a suggested `GEMV_TUNED` table for
kernels/fp8_linear.py (and a per-shape-class summary), and with `--json PATH` every measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import triton

from dsv3.kernels import bench as kbench

PEAK_TB_S = 4.27  # H200 HBM3e
# The GEMVs of the runtime's rank layout (runtime.parallel): q_proj / q_a_proj and kv_a_proj_with_mqa as one linear
# (qkv_a), 16B's shared experts inside the routed-experts op (no GEMV); 671B at TP 8 keeps its shared expert.
LINEARS = {
    "16B": [("qkv_a_proj", 3648, 2048), ("o_proj", 2048, 2048), ("dense.gate/up", 10944, 2048),
            ("dense.down", 2048, 10944)],
    "671B-tp8": [("qkv_a_proj", 2112, 7168), ("q_b_proj", 3072, 1536), ("o_proj", 7168, 2048),
                 ("shared.gate/up", 256, 7168), ("shared.down", 7168, 256), ("dense.gate/up", 2304, 7168),
                 ("dense.down", 7168, 2304)],
}
# Not in the table's default run (--models picks them): the bench shapes that the rank layout merges or does
# not run at decode (q_a and kv_a alone, kv_b, 16B's shared MLP as a GEMV), and 671B's GEMVs at TP 4 and 2 (the
# 4- and 2-GPU runs; q_a / kv_a are replicated, so qkv_a is TP 8's shape).
EXTRA_LINEARS = {
    "16B-bench": [("q_proj", 3072, 2048), ("kv_a_proj", 576, 2048), ("kv_b_proj", 4096, 512),
                  ("shared.gate/up", 2816, 2048), ("shared.down", 2048, 2816)],
    "671B-tp8-bench": [("q_a_proj", 1536, 7168), ("kv_a_proj", 576, 7168)],
    "671B-tp4": [("q_b_proj", 6144, 1536), ("o_proj", 7168, 4096), ("shared.gate/up", 512, 7168),
                 ("shared.down", 7168, 512), ("dense.gate/up", 4608, 7168), ("dense.down", 7168, 4608)],
    "671B-tp2": [("q_b_proj", 12288, 1536), ("o_proj", 7168, 8192), ("shared.gate/up", 1024, 7168),
                 ("shared.down", 7168, 1024), ("dense.gate/up", 9216, 7168), ("dense.down", 7168, 9216)],
}
MS = {"16B": (1, 4, 8), "671B-tp8": (1, 4, 8, 16), "16B-bench": (1, 4, 16), "671B-tp8-bench": (1, 4, 16),
      "671B-tp4": (1, 4, 8, 16), "671B-tp2": (1, 4, 8, 16)}
ALL_LINEARS = {**LINEARS, **EXTRA_LINEARS}
CC_MAX_M = 4  # cc variants do M x the CUDA-core work (8x slower than split-K at M=8 in a first H200 run): --cc-max-m

# variant -> (block_n values, num_warps values, num_stages values, num_stages used while searching bn x nw).
# cc: a loop without tl.dot streams NUM_STAGES - 1 small tiles per program, hence deeper pipelines.
GRIDS = {
    "splitk": ((32, 64, 128), (4, 8), (3, 5), 5),
    "splitk_fused": ((32, 64, 128), (4, 8), (3, 5), 5),
    "nosplit": ((16, 32, 64), (2, 4, 8), (2, 3, 4, 6), 4),
    "fused_nosplit": ((16, 32, 64), (2, 4, 8), (2, 3, 4, 6), 4),
    "cc": ((8, 16, 32, 64), (1, 2, 4, 8), (3, 5, 8, 12), 8),
    "cc_prequant": ((8, 16, 32, 64), (1, 2, 4, 8), (3, 5, 8, 12), 8),
    # the row-parallel kernels load a program's rows over the whole K at once (num_stages unused: 1)
    "rows": ((1, 2, 4, 8, 16), (2, 4, 8), (1,), 1),
    "rows_prequant": ((1, 2, 4, 8, 16), (2, 4, 8), (1,), 1),
}
QUICK_GRIDS = {
    "splitk": ((64,), (4,), (5,), 5),
    "splitk_fused": ((32, 64), (4,), (5,), 5),
    "nosplit": ((16, 32), (4,), (3, 4), 4),
    "fused_nosplit": ((16, 32), (4,), (3, 4), 4),
    "cc": ((16, 32), (2, 4), (5, 8), 8),
    "cc_prequant": ((16, 32), (2, 4), (5, 8), 8),
    "rows": ((2, 4, 8), (4, 8), (1,), 1),
    "rows_prequant": ((2, 4, 8), (4, 8), (1,), 1),
}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def variant_ms(variant: str, ms: tuple[int, ...]) -> tuple[int, ...]:
    """The cc and rows variants redo their weight tile's work per token: timed at M <= --cc-max-m only."""
    return tuple(m for m in ms if not variant.startswith(("cc", "rows")) or m <= CC_MAX_M)


def set_cc_max_m(m: int) -> None:
    global CC_MAX_M
    CC_MAX_M = m


def grid_configs(grid) -> list[tuple[int, int, int]]:
    bns, nws, nss, _ = grid
    return [(bn, nw, ns) for bn in bns for nw in nws for ns in nss]


def n_copies(nbytes: int) -> int:
    """Enough copies of a shape's buffers that one graph replay streams ~256 MB (past the L2)."""
    return kbench.n_copies(nbytes, budget=256e6, lo=4, hi=128)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def graph_us(calls: list[Callable[[], object]], min_calls: int = 200) -> float:
    """dsv3.kernels.bench.graph_us (calls back to back in one CUDA graph), replayed until at least `min_calls`
    calls ran (and at least 5 times)."""
    return kbench.graph_us(calls, reps=max(5, math.ceil(min_calls / len(calls))))


# ---------------------------------------------------------------------------------------------------------------
# parallel precompilation (Triton's on-disk cache is shared by the processes)
# ---------------------------------------------------------------------------------------------------------------


class _WarmupLaunch:
    """Stands in for `wrap_triton(kernel)`: `[grid](*args, **kw)` compiles for these arguments, launches nothing."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kw: self.kernel.warmup(*args, grid=grid, **kw)


def _precompile_group(group: list[tuple]) -> list[tuple[tuple, Optional[str]]]:
    from dsv3.kernels import fp8_linear as L
    from dsv3.kernels.fp8_blocks import FP8_DTYPE

    L.wrap_triton = _WarmupLaunch
    results = []
    for task in group:
        variant, (bn, nw, ns), m, n, k = task
        try:
            x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.empty(n, k, device="cuda", dtype=FP8_DTYPE)
            s = torch.empty(-(-n // 128), -(-k // 128), device="cuda", dtype=torch.float32)
            L.fp8_gemv(x, w, s, torch.bfloat16, variant=variant, block_n=bn, num_warps=nw, num_stages=ns)
            results.append((task, None))
        except Exception as exc:  # recorded; the timing process skips the config
            results.append((task, f"{type(exc).__name__}: {str(exc)[:200]}"))
    return results


def precompile(tasks: list[tuple], workers: int) -> dict[tuple, str]:
    """Compile every (variant, config, m, n, k) in `workers` spawned processes; returns {task: error}."""
    import multiprocessing as mp

    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for t in tasks:  # one group per compiled kernel family: the same config at the same M, over the shapes
        groups[(t[0], t[1], t[2])].append(t)
    failed: dict[tuple, str] = {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for res in pool.imap_unordered(_precompile_group, list(groups.values())):
            for task, err in res:
                if err is not None:
                    failed[task] = err
    return failed


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _empty_kernel(p):
    pass


def empty_node_us() -> float:
    buf = torch.empty(1, device="cuda")
    return graph_us([lambda: _empty_kernel[(1,)](buf)] * 400, min_calls=2000)


def copy_tb_s() -> float:
    a = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    b = torch.empty_like(a)
    us = graph_us([lambda: b.copy_(a)] * 4, min_calls=20)
    return 2 * (1 << 30) / us / 1e6


class ShapeBench:
    """C copies of one linear's operands on the device; times callables over the copies."""

    def __init__(self, n: int, k: int, m: int, seed: int):
        from dsv3.kernels.fp8_blocks import dequantize_activation, dequantize_weight, quantize_activation, \
            quantize_weight

        gen = torch.Generator(device="cuda").manual_seed(seed)
        w0, s0 = quantize_weight(torch.randn(n, k, device="cuda", generator=gen) * 0.05)
        self.copies = n_copies(n * k)
        self.w = [w0] + [w0.clone() for _ in range(self.copies - 1)]
        self.s = [s0] + [s0.clone() for _ in range(self.copies - 1)]
        self.x = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(self.copies)]
        xq, xs = quantize_activation(self.x[0])
        self.ref = dequantize_activation(xq, xs).double() @ dequantize_weight(w0, s0).double().t()
        self.m, self.n, self.k = m, n, k
        self.bytes = n * k + s0.numel() * 4 + m * k * 2
        self._dequant = lambda: dequantize_weight(w0, s0, torch.bfloat16)

    def tb_s(self, us: float) -> float:
        return self.bytes / us / 1e6

    def time_op(self, fn: Callable) -> tuple[float, float]:
        """(us per call, error of copy 0's result); fn(x, w, s) -> [M, N]."""
        err = rel_err(fn(self.x[0], self.w[0], self.s[0]), self.ref)
        if not err < 1e-2:
            return float("nan"), err
        us = graph_us([lambda i=i: fn(self.x[i], self.w[i], self.s[i]) for i in range(self.copies)])
        return us, err

    def time_bf16_linear(self) -> float:
        wb0 = self._dequant()
        nb = n_copies(2 * self.n * self.k)
        wbs = [wb0] + [wb0.clone() for _ in range(nb - 1)]
        xs = [self.x[i % self.copies] for i in range(nb)]
        return graph_us([lambda i=i: F.linear(xs[i], wbs[i]) for i in range(nb)])


def run_variant(sb: ShapeBench, variant: str, grid, full: bool, failed: dict, shape_key: tuple) -> list[dict]:
    from dsv3.kernels import fp8_linear as L

    trials: dict[tuple, dict] = {}

    def trial(cfg):
        if cfg in trials:
            return trials[cfg]
        bn, nw, ns = cfg
        rec = dict(variant=variant, block_n=bn, num_warps=nw, num_stages=ns)
        err = failed.get((variant, cfg) + shape_key)
        if err is None:
            try:
                us, e = sb.time_op(lambda x, w, s: L.fp8_gemv(x, w, s, torch.bfloat16, variant=variant, block_n=bn,
                                                                 num_warps=nw, num_stages=ns))
                if math.isnan(us):
                    err = f"wrong result: rel err {e:.3g}"
                else:
                    rec.update(us=round(us, 3), tb_s=round(sb.tb_s(us), 3), err=e)
            except Exception as exc:
                err = f"{type(exc).__name__}: {str(exc)[:200]}"
        if err is not None:
            rec["error"] = err
        trials[cfg] = rec
        return rec

    bns, nws, nss, ns_mid = grid
    if full:
        for cfg in grid_configs(grid):
            trial(cfg)
    else:
        for bn in bns:
            for nw in nws:
                trial((bn, nw, ns_mid))
        ok = [r for r in trials.values() if "us" in r]
        if ok:
            best = min(ok, key=lambda r: r["us"])
            for ns in nss:
                trial((best["block_n"], best["num_warps"], ns))
    return list(trials.values())


def fmt_cfg(r: dict) -> str:
    return f"bn={r['block_n']:<3} nw={r['num_warps']} ns={r['num_stages']:<2}"


# ---------------------------------------------------------------------------------------------------------------
# suggestions
# ---------------------------------------------------------------------------------------------------------------


def suggest(results: list[dict]) -> tuple[dict, str, list[str]]:
    """Per (N, K): rows (max M, variant, bn, nw, ns) from the best config at each swept M (consecutive equal rows
    merged); returned as data, as Python source for GEMV_TUNED, and as a per-shape-class summary."""
    per_shape: dict[tuple[int, int], list[tuple[int, tuple, str]]] = defaultdict(list)
    classes: dict[tuple[int, str], list[tuple[str, float]]] = defaultdict(list)
    for r in results:
        best = r.get("best")
        if best is None:
            continue
        cfg = (best["variant"], best["block_n"], best["num_warps"], best["num_stages"])
        per_shape[(r["n"], r["k"])].append((r["m"], cfg, f"{r['model']} {r['name']}"))
        mb = r["n"] * r["k"] / 1e6
        size = "<2MB" if mb < 2 else ("2-8MB" if mb < 8 else ">=8MB")
        speedup = r["op_us"] / best["us"] if r.get("op_us") else float("nan")
        classes[(r["m"], size)].append((best["variant"], speedup))
    table: dict[tuple[int, int], list[tuple]] = {}
    lines = ["GEMV_TUNED: dict[tuple[int, int], tuple[tuple[int, str, int, int, int], ...]] = {"]
    for (n, k), rows in sorted(per_shape.items()):
        rows.sort()
        merged: list[list] = []
        for m, cfg, _ in rows:
            if merged and merged[-1][1:] == list(cfg):
                merged[-1][0] = m
            else:
                merged.append([m, *cfg])
        table[(n, k)] = [tuple(r) for r in merged]
        names = ", ".join(sorted({name for _, _, name in rows}))
        body = ", ".join(f'({r[0]}, "{r[1]}", {r[2]}, {r[3]}, {r[4]})' for r in merged)
        lines.append(f"    ({n}, {k}): ({body},),  # {names}")
    lines.append("}")
    summary = []
    for (m, size), items in sorted(classes.items(), key=lambda kv: (kv[0][0], ["<2MB", "2-8MB", ">=8MB"].index(
            kv[0][1]))):
        votes = Counter(v for v, _ in items).most_common()
        sp = [s for _, s in items if not math.isnan(s)]
        summary.append(f"  M={m:<3} weights {size:>6}: best variant " + ", ".join(f"{v} x{c}" for v, c in votes)
                       + (f"; speedup vs today's op: median {statistics.median(sp):.2f}x" if sp else ""))
    return {f"{n},{k}": rows for (n, k), rows in table.items()}, "\n".join(lines), summary


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--quick", action="store_true", help="M in {1, 8} and smaller grids")
    ap.add_argument("--full", action="store_true", help="time the whole grid instead of the coordinate search")
    ap.add_argument("--models", default=",".join(LINEARS), help="comma list of: " + ", ".join(ALL_LINEARS))
    ap.add_argument("--variants", default="splitk,splitk_fused,nosplit,fused_nosplit,cc,cc_prequant")
    ap.add_argument("--ms", default=None, help="comma list of M (default: per model, see MS)")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                    help="precompilation processes")
    ap.add_argument("--no-precompile", action="store_true")
    ap.add_argument("--cc-max-m", type=int, default=CC_MAX_M, help="largest M the cc variants are timed at")
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="past this many seconds the remaining shapes are timed at the search's first stage only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_gemv.py needs a CUDA device")
    set_cc_max_m(args.cc_max_m)
    os.environ.pop("DSV3_GEMV_VARIANT", None)  # the op's row shows the built-in choice
    t_start = time.time()
    from dsv3.kernels import fp8_linear as L  # (importing dsv3.kernels registers torch.ops.dsv3.*)

    grids = QUICK_GRIDS if args.quick else GRIDS
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        assert v in L.GEMV_VARIANTS, v
    models = [mdl for mdl in args.models.split(",") if mdl]
    plan = []  # (model, name, n, k, m)
    for mdl in models:
        ms = MS[mdl]
        if args.ms:
            ms = tuple(int(v) for v in args.ms.split(","))
        elif args.quick:
            ms = tuple(m for m in ms if m in (1, 8))
        for name, n, k in ALL_LINEARS[mdl]:
            for m in ms:
                plan.append((mdl, name, n, k, m))
    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name}, {props.multi_processor_count} SMs; {len(plan)} shape x M cases; variants {variants}")

    failed: dict[tuple, str] = {}
    if not args.no_precompile:
        tasks = []
        for _, _, n, k, m in plan:
            for v in variants:
                if m in variant_ms(v, (m,)):
                    tasks += [(v, cfg, m, n, k) for cfg in grid_configs(grids[v])]
        tasks += [("splitk", L.GEMV_VARIANT_DEFAULTS["splitk"], m, n, k) for _, _, n, k, m in plan]
        t0 = time.time()
        try:
            failed = precompile(sorted(set(tasks)), args.workers)
            log(f"precompiled {len(set(tasks))} (variant, config, shape) launches in {time.time() - t0:.1f} s with "
                f"{args.workers} processes; {len(failed)} failed to compile")
        except Exception as exc:  # fall back to compiling lazily in this process
            log(f"precompilation failed ({type(exc).__name__}: {exc}); compiling lazily")
            failed = {}

    floor = empty_node_us()
    copy = copy_tb_s()
    log(f"empty Triton kernel as a CUDA-graph node: {floor:.2f} us; device-to-device copy {copy:.2f} TB/s "
        f"({copy / PEAK_TB_S:.0%} of {PEAK_TB_S} TB/s)")

    results = []
    for i, (mdl, name, n, k, m) in enumerate(plan):
        over_budget = time.time() - t_start > args.budget_s
        sb = ShapeBench(n, k, m, seed=i)
        rec = dict(model=mdl, name=name, n=n, k=k, m=m, bytes=sb.bytes, copies=sb.copies, variants={})
        rec["bf16_linear_us"] = round(sb.time_bf16_linear(), 3)
        op_us, _ = sb.time_op(lambda x, w, s: torch.ops.dsv3.fp8_linear(x, w, s))
        rec["op_us"] = round(op_us, 3)
        rec["op_choice"] = list(L.resolve_gemv(m, n, k, props.multi_processor_count))
        rec["scaled_mm_us"] = None  # cuBLAS block-scaled GEMM with its activation quantization (the M > 64 path)
        if L.scaled_mm_hardware_for(sb.x[0].device, torch.bfloat16):
            sm_us, _ = sb.time_op(L.fp8_scaled_mm)
            rec["scaled_mm_us"] = round(sm_us, 3)
        aq_us = float("nan")
        try:
            aq_us = graph_us([lambda i=i: L.act_quant(sb.x[i]) for i in range(sb.copies)])
        except Exception:
            pass
        rec["act_quant_us"] = round(aq_us, 3)
        shape_key = (m, n, k)
        best_all = None
        for v in variants:
            if m not in variant_ms(v, (m,)):
                continue
            grid = grids[v]
            if over_budget:  # block_n x num_warps at the middle num_stages only
                grid = (grid[0], grid[1], (grid[3],), grid[3])
            trials = run_variant(sb, v, grid, args.full and not over_budget, failed, shape_key)
            ok = [t for t in trials if "us" in t]
            best = min(ok, key=lambda t: t["us"]) if ok else None
            rec["variants"][v] = dict(best=best, trials=trials)
            if best and (best_all is None or best["us"] < best_all["us"]):
                best_all = best
        rec["best"] = best_all
        results.append(rec)
        mb = sb.bytes / 1e6
        log(f"\n{mdl} {name} N={n} K={k} M={m}: {mb:.2f} MB, {sb.copies} copies; bf16 F.linear "
            f"{rec['bf16_linear_us']:.2f} us; op today ({'/'.join(map(str, rec['op_choice']))}) {op_us:.2f} us "
            f"({sb.tb_s(op_us) / PEAK_TB_S:.0%}); act_quant alone {aq_us:.2f} us; cuBLAS block-scaled (with "
            f"act_quant) {rec['scaled_mm_us'] or float('nan'):.2f} us"
            + ("  [over budget: first search stage only]" if over_budget else ""))
        for v, vr in rec["variants"].items():
            b = vr["best"]
            nbad = sum("error" in t for t in vr["trials"])
            if b is None:
                log(f"   {v:<14} no valid config ({nbad} failed: {vr['trials'][0].get('error', '')[:100]})")
                continue
            log(f"   {v:<14} {fmt_cfg(b)}  {b['us']:8.2f} us  {b['tb_s']:5.2f} TB/s  {b['tb_s'] / PEAK_TB_S:6.1%}"
                f"  x{op_us / b['us']:.2f} vs op" + (f"  ({nbad} configs failed)" if nbad else ""))
        sb = None  # free the copies before the next shape's
        torch.cuda.empty_cache()
        if args.json:
            dump(args.json, props, floor, copy, results, None)

    table, src, summary = suggest(results)
    log("\nSuggested table for kernels/fp8_linear.py (best measured config per weight shape and M; rows apply "
        "to M <= max M, larger M falls back to GEMV_DEFAULT):\n")
    log(src)
    log("\nPer shape class (M, weight bytes): winning variants; median speedup of the best config vs today's op:")
    log("\n".join(summary))
    if args.json:
        dump(args.json, props, floor, copy, results, dict(table=table, source=src, summary=summary))
        log(f"\nwrote {args.json}")
    log(f"total {time.time() - t_start:.0f} s")


def dump(path, props, floor, copy, results, suggestion) -> None:
    with open(path, "w") as f:
        json.dump(dict(device=props.name, sms=props.multi_processor_count, peak_tb_s=PEAK_TB_S,
                       empty_graph_node_us=floor, copy_tb_s=copy, results=results, suggestion=suggestion), f,
                  indent=1)


if __name__ == "__main__":
    main()
