"""Kernel benchmarks on the GPU: `python -m dsv3.kernels.bench [--out DIR] [--only linear,mla,moe] [--sweep]`.

Timing: the op is called on N distinct copies of its weights (or latent caches), N chosen so the copies together are
>= 768 MB (many times the 60 MB L2: every call reads its bytes from HBM, as a decode step does), the N calls are
captured back to back in one CUDA graph (as the decode step runs), and the median replay time / N is reported. This
excludes Python/launch overhead, which the runtime's CUDA graphs remove too. Baselines that cannot be captured
(the looped experts sync with the host) are timed with host clocks; the einsum MLA reference with
`triton.testing.do_bench` (L2 flushed). Achieved TB/s = bytes that must move (each weight / cache / activation byte
read once, each output written once) / time; TFLOP/s = useful FLOPs / time. Ceilings measured in the same run:
device-to-device copy (read + write bytes), bf16 matmul 8192^3, FP8 `_scaled_mm` 8192^3 (per-tensor scales).
Baselines: bf16 `F.linear` on dequantized weights, `F.scaled_mm` blockwise (with its activation quantization),
the einsum MLA reference, a Python loop over the selected experts (bf16 weights, host-synced like DeepSeek's MoE).

Writes `bench_kernels.json` under --out (default $OUT or .) after every section and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

import dsv3.kernels  # noqa: F401
from dsv3.kernels import fp8_linear as L
from dsv3.kernels import mla_attention as A
from dsv3.kernels import routed_experts as RE
from dsv3.kernels.fp8_blocks import dequantize_weight, quantize_weight

# (name, N, K) per rank: 671B at TP 8 (column-parallel outputs / row-parallel inputs split by 8; the latent
# projections q_a and kv_a are replicated), and 16B (V2-Lite) unsharded.
LINEARS = {
    "671B-tp8": [("q_a_proj", 1536, 7168), ("q_b_proj", 3072, 1536), ("kv_a_proj", 576, 7168),
                 ("kv_b_proj", 4096, 512), ("o_proj", 7168, 2048), ("mlp.gate/up", 2304, 7168),
                 ("mlp.down", 7168, 2304), ("shared.gate/up", 256, 7168), ("shared.down", 7168, 256)],
    "16B": [("q_proj", 3072, 2048), ("kv_a_proj", 576, 2048), ("kv_b_proj", 4096, 512), ("o_proj", 2048, 2048),
            ("mlp.gate/up", 10944, 2048), ("mlp.down", 2048, 10944), ("shared.gate/up", 2816, 2048),
            ("shared.down", 2048, 2816)],
}
LINEAR_M = (1, 4, 16, 64, 4096)
MLA_CTX = (1024, 8192, 32768)
MLA_BATCH = (1, 8, 32)
MLA_HEADS = (16, 128)
# The shapes, plus the 16B model's own layout: its 2 shared experts ride as slots 64 and 65 that every token
# selects (the slot count MOE_DECODE_TUNED is measured at; the issue shape shares its plans, see _tuned_key).
MOE = {"16B": dict(E=64, D=2048, I=1408, K=6), "16B-model-slots": dict(E=64, D=2048, I=1408, K=6, SHARED=2),
       "671B-rank": dict(E=32, D=7168, I=2048, K=8)}
MOE_T = (1, 8, 32)

RESULTS: list[dict] = []
CEIL: dict[str, float] = {}


def bench(fn: Callable[[], object], warmup: int = 10, rep: int = 40) -> float:
    """Median microseconds per call with do_bench (L2 flushed before every call; includes launch gaps)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3


def n_copies(nbytes: float, budget: float = 768e6, lo: int = 2, hi: int = 64) -> int:
    return int(max(lo, min(hi, -(-budget // max(nbytes, 1)))))


def graph_us(calls: list, reps: int = 7) -> float:
    """Median microseconds per call: `calls` (zero-arg callables, one op invocation each on its own buffers)
    captured back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del g
    times.sort()
    return times[len(times) // 2] * 1e3 / len(calls)


def host_us(fn: Callable[[], object], iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e6


def record(section: str, shape: str, impl: str, us: float, nbytes: float, flops: float, baseline_us=None, **extra):
    tbps = nbytes / us / 1e6
    r = dict(section=section, shape=shape, impl=impl, us=round(us, 2), tb_s=round(tbps, 3),
             pct_copy=round(100 * tbps / CEIL["copy_tb_s"], 1), tflop_s=round(flops / us / 1e6, 1),
             bytes=int(nbytes), flops=int(flops), **extra)
    if baseline_us is not None:
        r["speedup_vs_baseline"] = round(baseline_us / us, 2)
    RESULTS.append(r)
    return r


def ceilings():
    n = 1 << 30  # 2 GiB of bf16
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    CEIL["copy_tb_s"] = 2 * a.numel() * 2 / t / 1e6
    del a, b
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    CEIL["bf16_tflop_s"] = 2 * m ** 3 / bench(lambda: x @ y) / 1e6
    xf, yf = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    CEIL["fp8_tflop_s"] = 2 * m ** 3 / bench(
        lambda: torch._scaled_mm(xf, yf.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e6
    del x, y, xf, yf
    torch.cuda.empty_cache()
    print(f"ceilings: copy {CEIL['copy_tb_s']:.2f} TB/s, bf16 {CEIL['bf16_tflop_s']:.0f} TFLOP/s, "
          f"fp8 {CEIL['fp8_tflop_s']:.0f} TFLOP/s", flush=True)


# ---------------------------------------------------------------------------------------------------------------


def bench_linear(sweep: bool = False):
    for cfg, shapes in LINEARS.items():
        for name, n, k in shapes:
            w0, s0 = quantize_weight(torch.randn(n, k, device="cuda") * 0.05)
            wb0 = dequantize_weight(w0, s0, torch.bfloat16)
            for m in LINEAR_M:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                nbytes = n * k + s0.numel() * 4 + m * k * 2 + m * n * 2
                flops = 2 * m * n * k
                shape = f"{cfg} {name} M={m} N={n} K={k}"
                nc = n_copies(n * k) if m <= 64 else 2
                ws = [(w0.clone(), s0.clone()) for _ in range(nc)]
                wbs = [wb0.clone() for _ in range(n_copies(2 * n * k) if m <= 64 else 2)]
                base = graph_us([lambda wb=wb: F.linear(x, wb) for wb in wbs])
                record("linear", shape, "bf16 F.linear (baseline)", base, nbytes + n * k, flops, cfg=cfg, m=m)
                del wbs
                if L.scaled_mm_usable(x, w0):
                    t_sm = graph_us([lambda w=w, sc=sc: L.fp8_scaled_mm(x, w, sc) for w, sc in ws])
                    record("linear", shape, "F.scaled_mm blockwise + act_quant", t_sm, nbytes, flops, base,
                           cfg=cfg, m=m)
                t = graph_us([lambda w=w, sc=sc: torch.ops.dsv3.fp8_linear(x, w, sc) for w, sc in ws])
                path = "gemv" if m <= L.GEMV_MAX_M else ("scaled_mm" if L.scaled_mm_usable(x, w0) else "triton")
                record("linear", shape, f"dsv3.fp8_linear [{path}]", t, nbytes, flops, base, cfg=cfg, m=m,
                       target=("bw>=75%" if (m <= 16 and cfg == "671B-tp8") else
                               ("tflops>=70%fp8" if m == 4096 else None)))
                if m > L.GEMV_MAX_M:
                    def tri(w, sc):
                        xq, xs = L.act_quant(x)
                        return L.fp8_gemm(xq, xs, w, sc, torch.bfloat16)
                    record("linear", shape, "triton act_quant + tiled GEMM",
                           graph_us([lambda w=w, sc=sc: tri(w, sc) for w, sc in ws]), nbytes, flops, base, cfg=cfg, m=m)
                del ws
            del w0, s0, wb0
            torch.cuda.empty_cache()
    if sweep:
        sweep_linear()


def sweep_linear():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n, k in [(576, 7168), (2304, 7168), (7168, 2048), (7168, 2304)]:
        w0, s0 = quantize_weight(torch.randn(n, k, device="cuda") * 0.05)
        ws = [(w0.clone(), s0.clone()) for _ in range(n_copies(n * k))]
        for m in (1, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nbytes = n * k + s0.numel() * 4 + m * k * 2 + m * n * 2
            best = None
            cfgs = []
            for bn, nw in ((64, 4), (128, 8)):
                base_split, _ = L.gemv_plan(m, n, k, sms, bn)
                for ns in (3, 5):
                    for split in sorted({base_split, max(1, base_split // 2), base_split * 2}):
                        cfgs.append((bn, nw, ns, split, False))
                cfgs.append((bn, nw, 4, base_split, True))
            for bn, nw, ns, split, fused in cfgs:
                try:
                    t = graph_us([lambda w=w, sc=sc: L.fp8_gemv(x, w, sc, torch.bfloat16, block_n=bn, num_warps=nw,
                                                                num_stages=ns, split=split, fused=fused)
                                  for w, sc in ws], reps=5)
                except Exception as exc:  # a config that does not compile is skipped
                    print(f"  sweep gemv bn={bn} nw={nw} ns={ns}: {type(exc).__name__}", flush=True)
                    continue
                r = record("sweep-linear", f"M={m} N={n} K={k}",
                           f"gemv bn={bn} nw={nw} ns={ns} split={split} fused={fused}", t, nbytes, 2 * m * n * k)
                if best is None or t < best["us"]:
                    best = r
            print(f"  sweep M={m} N={n} K={k}: best {best['impl']} {best['us']} us {best['pct_copy']}%", flush=True)
        del ws
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------


def mla_case(b, ctx, h, c=512, r=64):
    q = torch.randn(b, 1, h, c, device="cuda", dtype=torch.bfloat16)
    qp = torch.randn(b, 1, h, r, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(b, ctx, c + r, device="cuda", dtype=torch.bfloat16)
    pos = torch.full((b, 1), ctx - 1, device="cuda", dtype=torch.long)
    nbytes = b * ctx * (c + r) * 2 + b * h * (c + r) * 2 + b * h * c * 2
    flops = b * h * ctx * (2 * (c + r) + 2 * c)
    return (q, qp, cache, pos), nbytes, flops


def bench_mla(sweep: bool = False):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for h in MLA_HEADS:
        for ctx in MLA_CTX:
            for b in MLA_BATCH:
                (q, qp, cache, pos), nbytes, flops = mla_case(b, ctx, h)
                shape = f"B={b} ctx={ctx} H={h}"
                base = bench(lambda: A.mla_attention_reference(q, qp, cache, pos, 0.1352), rep=20)
                record("mla", shape, "einsum reference (baseline)", base, nbytes, flops, b=b, ctx=ctx, h=h)
                caches = [cache] + [cache.clone() for _ in range(n_copies(cache.numel() * 2) - 1)]
                t = graph_us([lambda c=c: torch.ops.dsv3.mla_attention(q, qp, c, pos, 0.1352) for c in caches])
                plan = A.mla_plan(b, 1, h, ctx, 512, sms)
                record("mla", shape, f"dsv3.mla_attention [splits={plan[4]} swap={plan[6]}]", t, nbytes, flops, base,
                       b=b, ctx=ctx, h=h, target=("bw>=75%" if ctx >= 8192 else None))
                del caches, cache
                torch.cuda.empty_cache()
    if sweep:
        for b, ctx, h in [(1, 8192, 16), (32, 8192, 16), (8, 8192, 128), (1, 32768, 16)]:
            (q, qp, cache, pos), nbytes, flops = mla_case(b, ctx, h)
            caches = [cache] + [cache.clone() for _ in range(n_copies(cache.numel() * 2) - 1)]
            best = None
            cfgs = [(False, bt, ns, mc) for bt in (32, 64) for ns in (2, 3) for mc in (128, 256, 512)]
            if h <= 32:
                cfgs += [(True, 64, 2, mc) for mc in (128, 256, 512)]
            for swap, bt, ns, mc in cfgs:
                try:
                    t = graph_us([lambda c=c: A.mla_attention_triton(
                        q, qp, c, pos, 0.1352, block_t=bt, num_stages=ns, min_chunk=mc, swap=swap)
                        for c in caches], reps=5)
                except Exception as exc:
                    print(f"  sweep mla swap={swap} bt={bt} ns={ns}: {type(exc).__name__}", flush=True)
                    continue
                r = record("sweep-mla", f"B={b} ctx={ctx} H={h}", f"swap={swap} bt={bt} ns={ns} min_chunk={mc}", t,
                           nbytes, flops)
                if best is None or t < best["us"]:
                    best = r
            if best:
                print(f"  sweep mla B={b} ctx={ctx} H={h}: best {best['impl']} {best['us']} us {best['pct_copy']}%",
                      flush=True)
            del caches, cache
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------


def moe_case(e, d, i, k, t, shared=0):
    """Random distinct top-k ids of e routed experts per token, then the `shared` slots e.. every token selects."""
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
    if shared:
        idx = torch.cat([idx, torch.arange(e, e + shared, device="cuda").expand(t, shared)], 1)
        e, k = e + shared, k + shared
    wt = torch.rand(t, k, device="cuda")
    q = [quantize_weight(torch.randn(*sh, device="cuda") * 0.05) for sh in ((e, i, d), (e, i, d), (e, d, i))]
    ws = [q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1]]
    n_used = int(torch.unique(idx).numel())
    nbytes = n_used * (3 * i * d + sum(sc.numel() for _, sc in q) // e * 4) + 2 * t * d * 2
    flops = 2 * 3 * i * d * t * k
    return x, idx, wt, ws, n_used, nbytes, flops


def bench_moe(sweep: bool = False):
    for cfg, p in MOE.items():
        e, d, i, k, shared = p["E"], p["D"], p["I"], p["K"], p.get("SHARED", 0)
        for t in MOE_T:
            x, idx, wt, ws, n_used, nbytes, flops = moe_case(e, d, i, k, t, shared)
            e_all = e + shared
            shape = (f"{cfg} T={t} E={e}{f'+{shared} shared' if shared else ''} top{k} D={d} I={i} "
                     f"experts_used={n_used}")
            wb = [dequantize_weight(ws[j], ws[j + 3], torch.bfloat16) for j in range(3)]

            def looped():
                out = torch.zeros(t, d, device="cuda", dtype=torch.float32)
                counts = torch.bincount(idx.flatten(), minlength=e_all).tolist()  # host sync, as the official code
                for ex in range(e_all):
                    if counts[ex] == 0:
                        continue
                    tok, kk = torch.where(idx == ex)
                    xe = x[tok]
                    h = F.silu(F.linear(xe, wb[0][ex])) * F.linear(xe, wb[1][ex])
                    out.index_add_(0, tok, F.linear(h, wb[2][ex]).float() * wt[tok, kk, None])
                return out.to(x.dtype)

            base = host_us(looped, iters=5)
            record("moe", shape, "looped experts, bf16 weights (baseline)", base, nbytes * 2, flops, cfg=cfg, t=t)
            del wb
            torch.cuda.empty_cache()
            sets = [ws] + [[w.clone() for w in ws] for _ in range(n_copies(nbytes, lo=2, hi=8) - 1)]
            tt = graph_us([lambda s=s: torch.ops.dsv3.routed_experts(x, idx, wt, *s) for s in sets])
            record("moe", shape, "dsv3.routed_experts [decode]", tt, nbytes, flops, base, cfg=cfg, t=t,
                   target="bw>=60%")
            if t == 1:  # one token, x and h in bf16 (W8A16): what the model's batch-1 decode runs by default
                ta = graph_us([lambda s=s: torch.ops.dsv3.routed_experts(x, idx, wt, *s, quant_act=False)
                               for s in sets])
                record("moe", shape, "dsv3.routed_experts W8A16 [decode, batch-1 default]", ta, nbytes, flops, base,
                       cfg=cfg, t=t, target="bw>=60%")
            tg = graph_us([lambda s=s: RE.routed_experts_triton(x, idx, wt, *s, grouped=True) for s in sets])
            record("moe", shape, "dsv3 grouped path (prefill kernel)", tg, nbytes, flops, base, cfg=cfg, t=t)
            if sweep:
                best = None
                for bn, nw in ((64, 4), (128, 8)):
                    for ns in (2, 3, 4):
                        try:
                            ts = graph_us([lambda s=s: RE.routed_experts_triton(
                                x, idx, wt, *s, block_n=bn, num_warps=nw, num_stages=ns) for s in sets], reps=5)
                        except Exception as exc:
                            print(f"  sweep moe bn={bn} nw={nw} ns={ns}: {type(exc).__name__}", flush=True)
                            continue
                        r = record("sweep-moe", shape, f"bn={bn} nw={nw} ns={ns}", ts, nbytes, flops)
                        if best is None or ts < best["us"]:
                            best = r
                print(f"  sweep moe {shape}: best {best['impl']} {best['us']} us {best['pct_copy']}%", flush=True)
            del sets, x, idx, wt, ws
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------


def print_table(rows):
    cols = ("section", "shape", "impl", "us", "tb_s", "pct_copy", "tflop_s", "speedup_vs_baseline")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def save_json(path: str, obj) -> None:
    """`obj` as indented JSON at `path`, written to path.tmp first and renamed: a run killed mid-write (a device
    call's time limit) leaves the previous file or none, never half of one. The sweeps and A/B scripts use it too."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def profile_under_ncu(cases: list, run: Callable[..., object], warmup: int = 2) -> None:
    """Nsight Compute's profiled range (`ncu --profile-from-start off`): each (name, args) case runs `warmup` times
    outside it (Triton compiles, caches warm), then once inside `torch.cuda.profiler.start/stop`, in an NVTX range
    named after it. Without ncu it just runs. The scripts/ncu_*.py diagnostics use it."""
    for _, args in cases:
        for _ in range(warmup):
            run(*args)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, args in cases:
        torch.cuda.nvtx.range_push(name)
        run(*args)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled:", ", ".join(n for n, _ in cases))


def write_json(path: str, meta: dict):
    save_json(path, dict(meta=meta, results=RESULTS))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default="linear,mla,moe")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configs on a few shapes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench needs a CUDA device", file=sys.stderr)
        return 2
    import triton
    from torch._library.triton import set_wrap_triton_enabled

    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_kernels.json")
    meta = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(0), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, ceilings=CEIL)
    # Launchers called directly (not through the ops) would otherwise go through the HOP dispatch of wrap_triton,
    # which only tracing needs; the ops themselves already disable it in eager mode.
    with torch.no_grad(), set_wrap_triton_enabled(False):
        ceilings()
        for sec, fn in (("linear", bench_linear), ("mla", bench_mla), ("moe", bench_moe)):
            if sec in args.only.split(","):
                ts = time.time()
                try:
                    fn(args.sweep)
                except Exception as exc:  # keep what was measured; report the failure
                    import traceback

                    traceback.print_exc()
                    RESULTS.append(dict(section=sec, error=f"{type(exc).__name__}: {exc}"))
                print(f"[{sec}] {time.time() - ts:.0f} s", flush=True)
                meta["wall_s"] = round(time.time() - t0)
                write_json(path, meta)
    print_table([r for r in RESULTS if not r.get("section", "").startswith("sweep") and "error" not in r])
    print(json.dumps(meta))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
