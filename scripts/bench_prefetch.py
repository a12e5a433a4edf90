"""Does warming L2 during a latency-bound window make the MoE after it faster?

    python3 scripts/bench_prefetch.py [--json out.json]      # ~1 min on an H200

The decode step of one 16B MoE layer, reduced to what matters here, per weight copy c (8 copies, 4.6 GB: no copy
is in L2 when its turn comes):
    [prefetch of copy c's shared-expert slots (gate, up, down) and o_proj]  (one launch, or none)
    a latency window: torch.cuda._sleep (stands for decode prep + attention + combine + absorb, ~15 us at batch 1)
    o_proj: dsv3.fp8_linear at M = 1 (2048 x 2048 FP8)
    dsv3.routed_experts at T = 1 (64 routed + 2 shared slots, 6 random routed ids + the 2 shared)
all captured in one CUDA graph (dsv3.kernels.bench.graph_us), us per copy. Variants: no prefetch, prefetch spread
over P programs, the window alone (subtracted: what o_proj + MoE cost after it), an oracle that also prefetches the
selected routed experts (everything the MoE reads in L2), and prefetch without a window (what the requests cost when
nothing hides them). Outputs of every variant are checked bitwise against the no-prefetch run.

The warm-up kernels (below): `cp.async.bulk.prefetch.L2.global` (sm_90+: one instruction asks the memory system for
a whole byte range and returns nothing, so a few programs issue the requests and exit), `prefetch.global.L2` per
128-byte line, and plain loads (evict_last; the kernel ends when the bytes arrived), on the stream or on a parallel
branch of the graph. Measured on the H200 (2026-11-23, docs/BENCHMARKS.md): none made o_proj + MoE faster; the
layer run twice in a row (its weights just read) takes as long as cold. A diagnostic, not part of the runtime.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl

from bench_rows import rand_fp8  # (scripts/: run from the repository root or scripts/)
from dsv3.kernels.bench import graph_us
from dsv3.kernels.routed_experts import routed_experts_triton

E_ROUTED, N_SHARED, D, I = 64, 2, 2048, 1408
COPIES = 8

PREFETCH_CHUNK = 16384  # bytes per bulk request
PREFETCH_ISSUES = 32    # requests issued at once by a program (one per lane of a warp)


@triton.jit
def _bulk_prefetch(ptrs, sizes, valid):
    # one bulk L2 prefetch per element (predicated off where not valid); the int32 result is a dummy
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; }\n\tmov.u32 $0, 0;",
        "=r,l,r,r", [ptrs, sizes, valid], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _line_prefetch(ptrs, valid):
    # one L2 prefetch of the 128-byte line holding each address (predicated off where not valid)
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; }\n\tmov.u32 $0, 0;",
        "=r,l,r", [ptrs, valid], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_range_part(base_ptr, nbytes, part, n_parts, CHUNK: tl.constexpr, ISSUES: tl.constexpr,
                        LINES: tl.constexpr = False):
    """Program `part` of `n_parts` asks for its share of the byte range [base_ptr, base_ptr + nbytes) in CHUNK-byte
    requests (consecutive chunks per part). base_ptr: any pointer (bytes from its address)."""
    n_chunks = tl.cdiv(nbytes, CHUNK)
    per = tl.cdiv(n_chunks, n_parts)
    c0 = part * per
    c1 = tl.minimum(c0 + per, n_chunks)
    base = base_ptr.to(tl.pointer_type(tl.uint8), bitcast=True)
    for c in range(c0, c1, ISSUES):
        offs = c + tl.arange(0, ISSUES)
        start = offs.to(tl.int64) * CHUNK
        size = (tl.minimum(nbytes - start, CHUNK) // 16 * 16).to(tl.int32)
        valid = ((offs < c1) & (size > 0)).to(tl.int32)
        if LINES:  # CHUNK = 128: one line per request
            _line_prefetch(base + start, valid)
        else:
            _bulk_prefetch(base + start, size, valid)


@triton.jit
def _l2_prefetch_kernel(p0, n0, p1, n1, p2, n2, p3, n3, N_PARTS, CHUNK: tl.constexpr, ISSUES: tl.constexpr,
                        LINES: tl.constexpr):
    """Grid (N_PARTS, 4): program (part, r) prefetches its part of range r (size 0: nothing)."""
    part = tl.program_id(0)
    r = tl.program_id(1)
    if r == 0:
        prefetch_range_part(p0, n0, part, N_PARTS, CHUNK, ISSUES, LINES)
    elif r == 1:
        prefetch_range_part(p1, n1, part, N_PARTS, CHUNK, ISSUES, LINES)
    elif r == 2:
        prefetch_range_part(p2, n2, part, N_PARTS, CHUNK, ISSUES, LINES)
    else:
        prefetch_range_part(p3, n3, part, N_PARTS, CHUNK, ISSUES, LINES)


def l2_prefetch(tensors, n_parts: int = 32, chunk: int = PREFETCH_CHUNK, lines: bool = False) -> None:
    """Ask for up to four tensors' bytes (each contiguous) to be brought into L2; returns at once (one launch)."""
    assert 0 < len(tensors) <= 4
    for t in tensors:
        assert t.is_contiguous() and t.data_ptr() % 16 == 0, "prefetch ranges must be contiguous, 16-byte aligned"
    args = []
    for j in range(4):
        t = tensors[j] if j < len(tensors) else tensors[0]
        args += [t, t.numel() * t.element_size() if j < len(tensors) else 0]
    if lines:
        _l2_prefetch_kernel[(n_parts, 4)](*args, n_parts, CHUNK=128, ISSUES=128, LINES=True,
                                          num_warps=4)
    else:
        _l2_prefetch_kernel[(n_parts, 4)](*args, n_parts, CHUNK=chunk, ISSUES=PREFETCH_ISSUES,
                                          LINES=False, num_warps=1)


@triton.jit
def _l2_load_kernel(p0, n0, p1, n1, p2, n2, p3, n3, sink_ptr, N_PARTS, BLOCK: tl.constexpr):
    """Grid (N_PARTS, 4): loads (not prefetches) its part of range r as int64 words, evict_last; writes an XOR to
    sink so nothing is dead code. Bytes beyond a multiple of 8 are skipped."""
    part = tl.program_id(0)
    r = tl.program_id(1)
    if r == 0:
        p, n = p0, n0
    elif r == 1:
        p, n = p1, n1
    elif r == 2:
        p, n = p2, n2
    else:
        p, n = p3, n3
    words = n // 8
    per = tl.cdiv(tl.cdiv(words, BLOCK), N_PARTS) * BLOCK
    w0 = part * per
    base = p.to(tl.pointer_type(tl.int64), bitcast=True)
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for w in range(w0, tl.minimum(w0 + per, words), BLOCK):
        offs = w + tl.arange(0, BLOCK)
        acc ^= tl.load(base + offs, mask=offs < words, other=0, eviction_policy="evict_last")
    tl.store(sink_ptr + (r * N_PARTS + part) * BLOCK + tl.arange(0, BLOCK), acc)


def l2_load(tensors, sink, n_parts: int = 132) -> None:
    """Bring up to four tensors' bytes into L2 by loading them (the kernel ends when they arrived). sink: int64
    [4 * n_parts * 1024] scratch."""
    args = []
    for j in range(4):
        t = tensors[j] if j < len(tensors) else tensors[0]
        args += [t, t.numel() * t.element_size() if j < len(tensors) else 0]
    _l2_load_kernel[(n_parts, 4)](*args, sink, n_parts, BLOCK=1024, num_warps=4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--window-us", type=float, default=15.0, help="latency window to hide the prefetch in")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    e = E_ROUTED + N_SHARED
    g0, u0, d0 = rand_fp8((e, I, D), gen), rand_fp8((e, I, D), gen), rand_fp8((e, D, I), gen)
    o0 = rand_fp8((D, D), gen)
    copies = [(g0, u0, d0, o0)] + [tuple([t.clone() for t in m] for m in (g0, u0, d0, o0)) for _ in range(COPIES - 1)]
    x = torch.randn(1, D, generator=gen).bfloat16().cuda()
    routed = torch.randperm(E_ROUTED, generator=gen)[:6]
    ids = torch.cat([routed, torch.arange(E_ROUTED, e)]).view(1, -1).cuda()
    wt = torch.rand(ids.shape, generator=gen).cuda()
    clock_hz = torch.cuda.get_device_properties(0).clock_rate * 1e3 if hasattr(
        torch.cuda.get_device_properties(0), "clock_rate") else 1.98e9
    cycles = int(args.window_us * 1e-6 * clock_hz)
    outs = {}
    sink = torch.empty(4 * 132 * 1024, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()

    def warm(c, how, parts):
        (g, gs), (u, us), (dd, ds), (ow, os_) = copies[c]
        ranges = [g[E_ROUTED:], u[E_ROUTED:], dd[E_ROUTED:], ow]
        if how == "bulk":
            l2_prefetch(ranges, n_parts=parts)
        elif how == "lines":
            l2_prefetch(ranges, n_parts=parts, lines=True)
        elif how == "load":
            l2_load(ranges, sink, n_parts=parts)

    def step(c, how=None, parts=32, window=True, layer_work=True, twice=False, side_stream=False, oracle=False,
             key=None):
        (g, gs), (u, us), (dd, ds), (ow, os_) = copies[c]

        def layer():
            y = torch.ops.dsv3.fp8_linear(x, ow, os_)
            return routed_experts_triton(y, ids, wt, g, u, dd, gs, us, ds)

        if twice:
            layer()
        if side_stream:  # the warm-up on a parallel branch of the graph, joined before the layer's work
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                warm(c, how, parts)
        elif how:
            warm(c, how, parts)
            if oracle:
                for j in routed.tolist():
                    l2_prefetch([g[j], u[j], dd[j]], n_parts=parts)
        if window:
            torch.cuda._sleep(cycles)
        if side_stream:
            torch.cuda.current_stream().wait_stream(side)
        if layer_work:
            out = layer()
            if key is not None and c == 0:
                outs[key] = out

    def timed(name, **kw):
        step(0, key=name, **kw)
        torch.cuda.synchronize()
        return graph_us([lambda c=c: step(c, **kw) for c in range(COPIES)], reps=max(5, math.ceil(300 / COPIES)))

    variants = [("window only", dict(layer_work=False)),
                ("no prefetch", {}),
                ("bulk prefetch, 32 parts", dict(how="bulk", parts=32)),
                ("bulk prefetch, 132 parts", dict(how="bulk", parts=132)),
                ("line prefetch, 132 parts", dict(how="lines", parts=132)),
                ("oracle: bulk, routed too", dict(how="bulk", parts=32, oracle=True)),
                ("load (serial), 132 parts", dict(how="load", parts=132)),
                ("load on a side stream", dict(how="load", parts=132, side_stream=True)),
                ("hot: layer run twice", dict(twice=True)),
                ("no window: bulk prefetch only", dict(how="bulk", parts=32, window=False, layer_work=False)),
                ("no window: line prefetch only", dict(how="lines", parts=132, window=False, layer_work=False)),
                ("no window: load only", dict(how="load", parts=132, window=False, layer_work=False)),
                ("no window, no prefetch", dict(window=False)),
                ("no window: layer run twice", dict(window=False, twice=True))]
    rows = {}
    for rnd in range(3):  # interleaved rounds: the median over rounds is reported
        for name, kw in variants:
            rows.setdefault(name, []).append(timed(name, **kw))
    ref = outs["no prefetch"]
    for name, out in outs.items():
        assert torch.equal(out, ref), f"{name}: output differs from the run without prefetch"
    med = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    win = med["window only"]
    shared_mb = (3 * N_SHARED * I * D + D * D) / 1e6
    print(f"window {args.window_us:.1f} us ({cycles} cycles): measured {win:.2f} us per copy; prefetched per copy: "
          f"shared slots + o_proj = {shared_mb:.1f} MB")
    print("after window: o_proj + MoE after the window (hot: the second run of the layer)")
    print(f"{'variant':32s} {'us/copy':>8s} {'after window':>13s} {'rounds':>24s}")
    for k, v in med.items():
        after = v - win if not k.startswith("no window") and k != "window only" else float("nan")
        if k.startswith("hot"):
            after = v - med["no prefetch"]  # the second run of the layer (the first costs what "no prefetch" does)
        if k == "no window: layer run twice":
            after = v - med["no window, no prefetch"]
        print(f"{k:32s} {v:8.2f} {after:13.2f}   {' '.join(f'{t:.2f}' for t in rows[k])}")
    print("outputs bitwise equal across variants: yes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(window_us=args.window_us, cycles=cycles, rounds=rows, median=med), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
