"""Does the router's top-k selection pay as its own launch? A one-token prototype (GPU timing; interpreter check).

    python3 scripts/try_select_in_up.py [--json out.json]            # on the GPU: checked, then timed
    TRITON_INTERPRET=1 python3 scripts/try_select_in_up.py --smoke   # CPU: small shapes, outputs compared only

A batch-1 MoE layer runs, after the fused norm + router-logits kernel, `_router_select_kernel` (2.0 us per layer in
the 16B profile of 2026-11-24, 3.5 us at 671B's grouping) and then the row-parallel up kernel, which starts by
loading its expert id from the select kernel's output. Here every up program computes the selection itself from the
logits (`select_top_k`, the select kernel's own code: 64-256 values, a few reductions) and program (0, 0) also
writes the ids and weights for the down kernel and the combine; shared-expert slots skip the selection. Prediction:
one dependent phase less, the selection's ~0.5-1 us moved onto the up kernel's critical path: ~1-2 us per layer.
Variants, timed as the kernel bench does (weight copies past the L2, the calls captured in one CUDA graph):
(a) today: select kernel + `_moe_up_rows_kernel` (W8A16, the 16B / 671B-rank configs of A16_MOE_TUNED);
(b) the fused prototype kernel below. h and ids are compared bitwise, weights to 1e-6.
Measured (H200, 2026-11-24): 16B 16.70 -> 21.47 us, 671B rank 25.56 -> 84.1 us: every up program repeating the
selection costs more than the launch it saves. Not wired into the model; kept as the record of that result.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from dsv3.kernels._launch import cdiv, next_pow2
from dsv3.kernels.fp8_blocks import quantize_weight
from dsv3.kernels.fp8_linear import dot_rows, k_blocks, load_weight_rows, load_x_act
from dsv3.kernels.routed_experts import A16_MOE_TUNED, _moe_up_rows_kernel, _swiglu
from dsv3.kernels.bench import save_json
from dsv3.kernels.router import _router_select_kernel, select_top_k


@triton.jit
def _up_rows_select_kernel(
    x_ptr, part_ptr, bias_ptr, idx_ptr, wt_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr,
    E_ROUTED, E, I, D, ID_OFFSET, PER_GROUP, N_GROUP, TOPK_GROUP, scale,
    stride_we, stride_wn, stride_se, stride_sn, stride_h,
    HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, GROUPED: tl.constexpr, GROUP_TOP2: tl.constexpr,
    NORM: tl.constexpr, TOP_K: tl.constexpr, E_PAD: tl.constexpr, G_PAD: tl.constexpr, K_PAD: tl.constexpr,
    N_SHARED: tl.constexpr, S_PAD: tl.constexpr, GROUP_VIEW: tl.constexpr, BLOCK_N: tl.constexpr,
    KB_PAD: tl.constexpr,
):
    """Grid (TOP_K + N_SHARED slots, cdiv(I, BLOCK_N)), one token. Routed slot k: expert sel[k] - ID_OFFSET of this
    rank's E local experts (outside [0, E): nothing to do); shared slot TOP_K + j: local expert E_ROUTED_LOCAL + j,
    i.e. E - N_SHARED + j. Program (0, 0) stores ids (as the select kernel: global ids, then the shared slots) and
    weights."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    if slot < TOP_K:
        offs_e = tl.arange(0, E_PAD)
        logits = tl.load(part_ptr + offs_e, mask=offs_e < E_ROUTED, other=0.0)
        sel, w = select_top_k(logits, bias_ptr, E_ROUTED, PER_GROUP, N_GROUP, TOPK_GROUP, scale, HAS_BIAS, SIGMOID,
                              GROUPED, GROUP_TOP2, NORM, TOP_K, E_PAD, G_PAD, K_PAD, GROUP_VIEW)
        offs_k = tl.arange(0, K_PAD)
        e = tl.sum(tl.where(offs_k == slot, sel, 0), axis=0) - ID_OFFSET
        if (slot == 0) & (pid_n == 0):
            k_mask = offs_k < TOP_K
            tl.store(idx_ptr + offs_k, sel.to(tl.int64), mask=k_mask)
            tl.store(wt_ptr + offs_k, w, mask=k_mask)
            if N_SHARED > 0:
                offs_s = tl.arange(0, S_PAD)
                s_mask = offs_s < N_SHARED
                tl.store(idx_ptr + TOP_K + offs_s, (E_ROUTED + offs_s).to(tl.int64), mask=s_mask)
                tl.store(wt_ptr + TOP_K + offs_s, tl.full((S_PAD,), 1.0, tl.float32), mask=s_mask)
    else:
        e = E - N_SHARED + (slot - TOP_K)
    if (e >= 0) & (e < E):
        e64 = e.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < I
        offs_b, offs_k2, k_mask2, kb_mask = k_blocks(D, KB_PAD)
        wg, sg = load_weight_rows(wg_ptr + e64 * stride_we, sg_ptr + e64 * stride_se, offs_n, n_mask, offs_b,
                                  offs_k2, k_mask2, kb_mask, stride_wn, stride_sn)
        wu, su = load_weight_rows(wu_ptr + e64 * stride_we, su_ptr + e64 * stride_se, offs_n, n_mask, offs_b,
                                  offs_k2, k_mask2, kb_mask, stride_wn, stride_sn)
        xq, xs = load_x_act(x_ptr, offs_k2, k_mask2, offs_b)
        odt = h_ptr.dtype.element_ty
        hf = _swiglu(dot_rows(wg, sg, xq, xs), dot_rows(wu, su, xq, xs), odt)
        tl.store(h_ptr + slot * stride_h + offs_n, hf.to(odt), mask=n_mask)


# (name, routed experts the router scores, local expert slots (routed + shared), shared, I, D, top-k, groups,
#  top groups, sigmoid + bias + top-2 group scores (V3) or softmax (V2-Lite), weight scale, norm)
SHAPES = {
    "16B": dict(e_routed=64, e_local=66, n_shared=2, i=1408, d=2048, top_k=6, n_group=1, topk_group=1, v3=False,
                scale=1.0, norm=False),
    "671B-ep8": dict(e_routed=256, e_local=32, n_shared=0, i=2048, d=7168, top_k=8, n_group=8, topk_group=4,
                     v3=True, scale=2.5, norm=True),
    "smoke": dict(e_routed=16, e_local=18, n_shared=2, i=200, d=256, top_k=4, n_group=4, topk_group=2, v3=True,
                  scale=1.0, norm=True),
    "smoke-v2": dict(e_routed=16, e_local=18, n_shared=2, i=200, d=256, top_k=4, n_group=1, topk_group=1, v3=False,
                     scale=1.0, norm=False),
}


def run_case(name: str, dev: torch.device, copies: int, time_it: bool) -> dict:
    sh = SHAPES[name]
    g = torch.Generator(device=dev).manual_seed(7)
    e_r, e_l, n_sh, i, d, k = sh["e_routed"], sh["e_local"], sh["n_shared"], sh["i"], sh["d"], sh["top_k"]
    grouped = sh["n_group"] > 1 and sh["topk_group"] < sh["n_group"]
    e_pad, k_pad = max(2, next_pow2(e_r)), max(2, next_pow2(k))
    g_pad = max(2, next_pow2(sh["n_group"] if grouped else 1))
    group_view = grouped and e_r == e_pad and sh["n_group"] == g_pad
    x = torch.randn(1, d, device=dev, generator=g).bfloat16()
    part = torch.randn(1, 1, e_r, device=dev, generator=g)
    part[0, 0, 5] += 10.0  # one routed expert of rank 0's local range is certain to be selected
    bias = (torch.randn(e_r, device=dev, generator=g) * 0.1) if sh["v3"] else None
    weights = []
    for _ in range(copies):
        q = [quantize_weight(torch.randn(e_l, i, d, device=dev, generator=g) * 0.05) for _ in range(2)]
        weights.append((q[0][0], q[1][0], q[0][1], q[1][1]))
    ub, uw = A16_MOE_TUNED.get((e_l, i, d), (4, 4))[:2]
    kb_pad = max(2, next_pow2(cdiv(d, 128)))
    sel_kw = dict(HAS_BIAS=bias is not None, SIGMOID=sh["v3"], GROUPED=grouped, GROUP_TOP2=sh["v3"],
                  NORM=sh["norm"], TOP_K=k, E_PAD=e_pad, G_PAD=g_pad, K_PAD=k_pad, N_SHARED=n_sh,
                  S_PAD=max(2, next_pow2(n_sh)), GROUP_VIEW=group_view)
    per_group = e_r // sh["n_group"] if grouped else e_r
    n_group, topk_group = (sh["n_group"], sh["topk_group"]) if grouped else (1, 1)
    slots = k + n_sh
    bias_arg = bias if bias is not None else part

    # outputs per weight copy, allocated once (rows of slots without a local expert stay zero)
    bufs = [(torch.zeros(1, slots, dtype=torch.int64, device=dev), torch.zeros(1, slots, device=dev),
             torch.zeros(slots, i, dtype=torch.bfloat16, device=dev)) for _ in range(copies)]

    def today(c: int):
        wg, wu, sg, su = weights[c]
        idx, wt, h = bufs[c]
        _router_select_kernel[(1,)](part, bias_arg, idx, wt, 1, e_r, 1, per_group, n_group, topk_group,
                                    float(sh["scale"]), num_warps=4 if group_view else 1, **sel_kw)
        # the rows kernel reads local ids: this rank holds experts [0, e_l - n_sh) (rank 0) and the shared slots
        _moe_up_rows_kernel[(slots, cdiv(i, ub))](
            x, x, idx, wg, wu, sg, su, h, e_l, i, d, wg.stride(0), wg.stride(1), sg.stride(0), sg.stride(1),
            h.stride(0), ACT16=True, BLOCK_N=ub, KB_PAD=kb_pad, num_warps=uw)
        return h, idx, wt

    def fused(c: int):
        wg, wu, sg, su = weights[c]
        idx, wt, h = bufs[c]
        _up_rows_select_kernel[(slots, cdiv(i, ub))](
            x, part, bias_arg, idx, wt, wg, wu, sg, su, h, e_r, e_l, i, d, 0, per_group, n_group, topk_group,
            float(sh["scale"]), wg.stride(0), wg.stride(1), sg.stride(0), sg.stride(1), h.stride(0),
            BLOCK_N=ub, KB_PAD=kb_pad, num_warps=uw, **sel_kw)
        return h, idx, wt

    a = [t.clone() for t in today(0)]
    for t in bufs[0]:
        t.zero_()
    b = fused(0)
    # ids and h bitwise; the weights to fp32 rounding: the select kernel runs in 1 warp (4 at the group view), the
    # fused one in the up kernel's warps, and a softmax / normalisation sum over other warps rounds differently
    # (the first GPU run, 2026-11-24: the 16B outputs were not all bitwise equal)
    (h_a, idx_a, wt_a), (h_b, idx_b, wt_b) = a, b
    weight_err = ((wt_a - wt_b).abs().max() / wt_a.abs().max()).item()
    row = {"shape": name, "block_n": ub, "warps": uw, "ids_equal": torch.equal(idx_a, idx_b),
           "h_equal": torch.equal(h_a, h_b), "weights_equal": torch.equal(wt_a, wt_b), "weight_rel_err": weight_err}
    if not (row["ids_equal"] and row["h_equal"] and weight_err < 1e-6):
        raise SystemExit(f"{name}: fused outputs differ from select + up ({row})")
    if time_it:
        from dsv3.kernels.bench import graph_us

        samples = {"today": [], "fused": []}
        for _ in range(3):
            samples["today"].append(graph_us([lambda c=c: today(c) for c in range(copies)]))
            samples["fused"].append(graph_us([lambda c=c: fused(c) for c in range(copies)]))
        row.update({k: round(sorted(v)[1], 2) for k, v in samples.items()})
    print(row, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="small shapes, outputs only (CPU, TRITON_INTERPRET=1)")
    opts = ap.parse_args()
    if opts.smoke:
        for name in ("smoke", "smoke-v2"):
            run_case(name, torch.device("cpu"), 1, False)
        return 0
    rows = [run_case(name, torch.device("cuda"), 8, True) for name in ("16B", "671B-ep8")]
    if opts.json:
        save_json(opts.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
