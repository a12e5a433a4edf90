"""Do TMA tensor-descriptor loads speed up the grouped (prefill) FP8 MoE kernels? (GPU experiment, issue 6.)

The grouped kernels of kernels/routed_experts.py load every weight tile as a [128, 128] pointer tensor with masks:
per K step a few hundred integer instructions per thread for addresses and bounds, issued next to the per-K-block
scale multiplies that already compete with the MMAs for issue slots. A tensor descriptor moves the tile with one
TMA instruction (bounds handled by the copy engine, out-of-range elements zero, as the masks' `other=0`). This
script times, on one layer of the 16B and 671B-ws8-rank shapes at T=4096 (`sweep_prefill.moe_inputs`):

  up    `_moe_up_grouped_kernel` (the plan's launch) vs `_up_tma_kernel` (gate/up weights through 3-D descriptors
        [E, I, D], box [1, 128, 128]; x, scales, epilogue unchanged), several warps/stages;
  down  `_moe_down_grouped_kernel` vs `_down_tma_kernel` (down weights through a descriptor [E, D, I], box
        [1, BLOCK_N, 128]) and `H_SORTED` (h also through a descriptor, when the up kernel writes h in the
        schedule's sorted order instead of by pair: its tiles are then contiguous rows).

Outcome (2026-11-24, H200, torch 2.11, triton 3.6, T=4096; us per call, median of 5 interleaved rounds):
- down, host-side descriptors: BLOCK_N 128 / 4 warps / 3 stages 16B 390 -> 325 and 379 -> 319 us (1.19-1.20x),
  671B-ws8 rank 269 -> 217 and 260 -> 217 (1.20-1.24x), bitwise the same y; other plans slower or equal; h in
  sorted order (descriptor loads for h too) no further gain.
- up, host-side descriptors: 16B 0.82x (4 warps / 2 stages), 1.00x (8 / 3), 1.03x (8 / 4); 671B rank 1.03-1.14x.
- Not adoptable: torch's wrap_triton does not take a host-side descriptor through a `triton_op` ("TMA descriptor
  capturing not yet supported in non-dynamo tracing", torch 2.11 and 2.13: torch.compile and AOTInductor fail). A
  descriptor made in the kernel (`tl.make_tensor_descriptor`, branch experiment/moe-down-tma) compiles, but each
  program then builds its own: down 384 -> 411 us on 16B (0.93x), 1.05x on the 671B rank; and inside an
  AOTInductor package with a dynamic token count its output was non-finite on the second size (the package's
  global-scratch handling for user kernels, torch 2.11). The production kernels stay pointer tiles.
- 2026-11-25: `dsv3.kernels._launch.launch_with_descriptors` now passes host-side descriptors through a triton_op,
  but against today's kernels (unmasked EVEN loops, preloaded scales; this script's baselines keep EVEN=False) the
  down kernel's descriptor form is no faster: 1163 vs 1159 us for the whole 16B op (branch
  experiment/moe-down-tma-op, scripts/sweep_down_tma.py there).

Each variant's output is compared bit for bit with the production kernel's on the same inputs (h, hs for up; y for
down; the sorted-h variant gets the production h permuted into sorted order). Timing: `dsv3.kernels.bench.graph_us`
(3 calls per CUDA graph), interleaved rounds, median. CPU: `TRITON_INTERPRET=1 ... --t 40 --shapes tiny` checks
bit-equality only.

    python3 scripts/try_grouped_tma.py [--t 4096] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_prefill import MOE_SHAPES, moe_inputs  # noqa: E402

from dsv3.kernels._launch import cdiv, next_pow2  # noqa: E402
from dsv3.kernels.fp8_linear import act_quant, quantize_tile_rcp  # noqa: E402
from dsv3.kernels.routed_experts import (  # noqa: E402
    GROUPED_BLOCK_T, _grouped_tile, _moe_down_grouped_kernel, _moe_up_grouped_kernel, _swiglu, grouped_plan,
    grouped_schedule, preload_scales,
)


@triton.jit
def _up_tma_kernel(
    x_ptr, xs_ptr, sched_ptr, wg_desc, wu_desc, sg_ptr, su_ptr, h_ptr, hs_ptr, dt_ptr,
    K, I, D, n_sched,
    stride_xt, stride_xst, stride_se, stride_sn, stride_sk, stride_h, stride_hs,
    BLOCK_T: tl.constexpr, H_SORTED: tl.constexpr,
):
    """`_moe_up_grouped_kernel`'s TWO_DOTS form with the gate and up tiles loaded through tensor descriptors.
    H_SORTED: h row = the pair's position in the schedule's sorted order (start + column) instead of its pair id."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, pair, token, col_mask = _grouped_tile(sched_ptr, slot, K, n_sched, BLOCK_T)
    if e >= 0:
        token64 = token.to(tl.int64)
        offs_d = tl.arange(0, 128)
        x_ptrs = x_ptr + token64[:, None] * stride_xt + offs_d[None, :]
        srow = e.to(tl.int64) * stride_se + pid_n * stride_sn
        acc_g = tl.zeros((BLOCK_T, 128), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_T, 128), dtype=tl.float32)
        for kb in range(0, tl.cdiv(D, 128)):
            d_mask = (kb * 128 + offs_d) < D
            wgv = wg_desc.load([e, pid_n * 128, kb * 128]).reshape(128, 128)
            wuv = wu_desc.load([e, pid_n * 128, kb * 128]).reshape(128, 128)
            xv = tl.load(x_ptrs + kb * 128, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            xs = tl.load(xs_ptr + token64 * stride_xst + kb, mask=col_mask, other=1.0)
            sg = tl.load(sg_ptr + srow + kb * stride_sk)
            su = tl.load(su_ptr + srow + kb * stride_sk)
            acc_g += tl.dot(xv, tl.trans(wgv)) * (xs * sg)[:, None]
            acc_u += tl.dot(xv, tl.trans(wuv)) * (xs * su)[:, None]
        hq, hsc = quantize_tile_rcp(_swiglu(acc_g, acc_u, dt_ptr.dtype.element_ty))
        offs_c = pid_n * 128 + tl.arange(0, 128)
        if H_SORTED:
            row = (tl.load(sched_ptr + n_sched + slot) + tl.arange(0, BLOCK_T)).to(tl.int64)
        else:
            row = pair.to(tl.int64)
        tl.store(h_ptr + row[:, None] * stride_h + offs_c[None, :], hq, mask=col_mask[:, None] & (offs_c < I)[None, :])
        tl.store(hs_ptr + row * stride_hs + pid_n, hsc, mask=col_mask)


@triton.jit
def _down_tma_kernel(
    h_ptr, h_desc, hs_ptr, sched_ptr, wd_desc, sd_ptr, y_ptr,
    K, I, D, n_sched,
    stride_h, stride_hs, stride_se, stride_sn, stride_sk, stride_y,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, H_SORTED: tl.constexpr,
):
    """`_moe_down_grouped_kernel` (scales per K block) with the down tiles through a descriptor; H_SORTED: h (and
    hs) in sorted order, h tiles through `h_desc` too."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, pair, token, col_mask = _grouped_tile(sched_ptr, slot, K, n_sched, BLOCK_T)
    if e >= 0:
        e64 = e.to(tl.int64)
        pair64 = pair.to(tl.int64)
        start = tl.load(sched_ptr + n_sched + slot)
        row = (start + tl.arange(0, BLOCK_T)).to(tl.int64) if H_SORTED else pair64
        offs_r = tl.arange(0, BLOCK_N)
        offs_n = pid_n * BLOCK_N + offs_r
        n_mask = offs_n < D
        offs_i = tl.arange(0, 128)
        h_ptrs = h_ptr + row[:, None] * stride_h + offs_i[None, :]
        s0 = sd_ptr + e64 * stride_se + ((pid_n * BLOCK_N) // 128) * stride_sn
        s1 = s0 + tl.where((pid_n * BLOCK_N + 128) < D, stride_sn, 0)
        second = offs_r >= 128
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(I, 128)):
            i_mask = (kb * 128 + offs_i) < I
            w = wd_desc.load([e, pid_n * BLOCK_N, kb * 128]).reshape(BLOCK_N, 128)
            if H_SORTED:
                hv = h_desc.load([start, kb * 128])
            else:
                hv = tl.load(h_ptrs + kb * 128, mask=col_mask[:, None] & i_mask[None, :], other=0.0)
            hs = tl.load(hs_ptr + row * stride_hs + kb, mask=col_mask, other=1.0)
            sd0 = tl.load(s0 + kb * stride_sk)
            if BLOCK_N == 256:
                sd1 = tl.load(s1 + kb * stride_sk)
                acc += tl.dot(hv, tl.trans(w)) * (hs[:, None] * tl.where(second, sd1, sd0)[None, :])
            else:
                acc += tl.dot(hv, tl.trans(w)) * (hs * sd0)[:, None]
        tl.store(y_ptr + pair64[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=col_mask[:, None] & n_mask[None, :])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _check_or_equal(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    same = torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                       b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    if not same:
        diff = (a.float() - b.float()).abs()
        print(f"  {name}: DIFFER in {(diff > 0).sum().item()} of {diff.numel()} (max {diff.max().item():.3g})")
    return same


# CPU check under the interpreter: ragged I (not a multiple of 128) and a few tiles
MOE_SHAPES["tiny"] = dict(e_routed=6, n_shared=1, k=2, d=256, i=192)


def run_shape(name: str, t: int, rounds: int, timing: bool) -> dict:
    x, idx, _wt, w, flops = moe_inputs(name, t, "cuda" if timing else "cpu")
    gate, up, down, sg, su, sd = w
    e, i, d = gate.shape
    k = idx.shape[1]
    p = t * k
    dev = x.device
    block_t = GROUPED_BLOCK_T
    sched, n_slots = grouped_schedule(idx.contiguous(), e, block_t)
    plan = grouped_plan(True, d, i)
    xq, xs = act_quant(x)
    kb_up, kb_down = (max(2, next_pow2(cdiv(n, 128))) for n in (d, i))
    n_i = cdiv(i, 128)

    def new_h():
        return (torch.full((p, i), float("nan"), device=dev).to(torch.float8_e4m3fn),
                torch.full((p, n_i), float("nan"), device=dev))

    h0, hs0 = new_h()
    y0 = torch.full((p, d), float("nan"), device=dev, dtype=x.dtype)

    def up_base():
        two = plan.up_num_warps <= 4
        _moe_up_grouped_kernel[(n_slots, n_i)](
            xq, xs, sched, gate, up, sg, su, h0, hs0, y0, k, i, d, n_slots,
            xq.stride(0), xs.stride(0), gate.stride(0), gate.stride(1), sg.stride(0), sg.stride(1), sg.stride(2),
            h0.stride(0), hs0.stride(0), BLOCK_T=block_t, KB_PAD=kb_up,
            PRELOAD=preload_scales(kb_up) and not two, TWO_DOTS=two, EVEN=False, W_DESC=False,
            num_warps=plan.up_num_warps, num_stages=plan.up_num_stages)

    def down_base(y):
        _moe_down_grouped_kernel[(n_slots, cdiv(d, plan.down_block_n))](
            h0, hs0, sched, down, sd, y, k, i, d, n_slots,
            h0.stride(0), hs0.stride(0), down.stride(0), down.stride(1), sd.stride(0), sd.stride(1), sd.stride(2),
            y.stride(0), BLOCK_T=block_t, BLOCK_N=plan.down_block_n, KB_PAD=kb_down,
            PRELOAD=preload_scales(kb_down), EVEN=False, num_warps=plan.down_num_warps,
            num_stages=plan.down_num_stages)

    wg_desc = TensorDescriptor.from_tensor(gate, [1, 128, 128])
    wu_desc = TensorDescriptor.from_tensor(up, [1, 128, 128])

    def up_tma(h, hs, warps, stages, sorted_h=False):
        return lambda: _up_tma_kernel[(n_slots, n_i)](
            xq, xs, sched, wg_desc, wu_desc, sg, su, h, hs, y0, k, i, d, n_slots,
            xq.stride(0), xs.stride(0), sg.stride(0), sg.stride(1), sg.stride(2), h.stride(0), hs.stride(0),
            BLOCK_T=block_t, H_SORTED=sorted_h, num_warps=warps, num_stages=stages)

    up_base()
    y_base = torch.full_like(y0, float("nan"))
    down_base(y_base)
    sync()
    order = sched[3 * n_slots:].long()
    h_sorted, hs_sorted = h0[order], hs0[order]

    row = dict(shape=name, t=t, flops_up=flops * 2 / 3, flops_down=flops / 3, up={}, down={})
    calls_up = {"base": up_base}
    for warps, stages in ((4, 2), (4, 3), (8, 3)):
        h, hs = new_h()
        fn = up_tma(h, hs, warps, stages)
        fn()
        sync()
        ok = _check_or_equal(f"up tma w{warps} s{stages} h", h, h0) & _check_or_equal("hs", hs, hs0)
        row["up"][f"tma_w{warps}_s{stages}"] = dict(equal=ok)
        if ok:
            calls_up[f"tma_w{warps}_s{stages}"] = fn
    h, hs = new_h()
    up_tma(h, hs, 4, 2, sorted_h=True)()
    sync()
    ok = _check_or_equal("up tma sorted h", h, h_sorted) & _check_or_equal("sorted hs", hs, hs_sorted)
    row["up"]["tma_sorted_h"] = dict(equal=ok)

    calls_down = {"base": lambda: down_base(y0)}
    for bn, warps, stages in ((plan.down_block_n, plan.down_num_warps, plan.down_num_stages), (256, 8, 3),
                              (128, 4, 3), (256, 4, 3)):
        wd_desc = TensorDescriptor.from_tensor(down, [1, bn, 128])
        for sorted_h in (False, True):
            hh, hss = (h_sorted, hs_sorted) if sorted_h else (h0, hs0)
            h_desc = TensorDescriptor.from_tensor(hh, [block_t, 128])
            y = torch.full_like(y0, float("nan"))

            def fn(y=y, hh=hh, hss=hss, h_desc=h_desc, wd_desc=wd_desc, bn=bn, warps=warps, stages=stages,
                   sorted_h=sorted_h):
                _down_tma_kernel[(n_slots, cdiv(d, bn))](
                    hh, h_desc, hss, sched, wd_desc, sd, y, k, i, d, n_slots,
                    hh.stride(0), hss.stride(0), sd.stride(0), sd.stride(1), sd.stride(2), y.stride(0),
                    BLOCK_T=block_t, BLOCK_N=bn, H_SORTED=sorted_h, num_warps=warps, num_stages=stages)

            fn()
            sync()
            key = f"tma{'_sortedh' if sorted_h else ''}_n{bn}_w{warps}_s{stages}"
            ok = _check_or_equal(f"down {key}", y, y_base)
            row["down"][key] = dict(equal=ok)
            if ok:
                calls_down[key] = fn
    if timing:
        from dsv3.kernels.bench import graph_us

        for part, calls, fl in (("up", calls_up, row["flops_up"]), ("down", calls_down, row["flops_down"])):
            times = {kk: [] for kk in calls}
            for r in range(rounds):
                keys = list(calls) if r % 2 == 0 else list(calls)[::-1]
                for kk in keys:
                    times[kk].append(graph_us([calls[kk]] * 3))
            for kk, v in times.items():
                us = statistics.median(v)
                row[part].setdefault(kk, {}).update(us=round(us, 1), tflops=round(fl / us / 1e6, 1),
                                                     rounds=[round(a, 1) for a in v])
            base = row[part]["base"]["us"]
            print(f"{name} T={t} {part}: " + ", ".join(
                f"{kk} {row[part][kk]['us']:.1f} us ({row[part][kk]['tflops']:.0f} TF, {base / row[part][kk]['us']:.3f}x)"
                for kk in times), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="16B,671B-ws8-rank", help=f"comma-separated, of {list(MOE_SHAPES)}")
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    timing = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    rows = [run_shape(n, opts.t, opts.rounds, timing) for n in opts.shapes.split(",")]
    print(json.dumps([{kk: v for kk, v in r.items() if kk in ("shape", "up", "down")} for r in rows]))
    if opts.json:
        from dsv3.kernels.bench import save_json
        save_json(opts.json, dict(device=torch.cuda.get_device_name() if timing else "cpu", rows=rows))


if __name__ == "__main__":
    main()
