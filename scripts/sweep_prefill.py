"""Sweep the prefill kernels' launch configs on the GPU: the grouped MoE path of `dsv3.routed_experts` and the
causal attention of `dsv3.mla_prefill_attention`, at prompt-sized T.

    python3 scripts/sweep_prefill.py --json $OUT/sweep_prefill.json        # ~3-4 min on an H200
    python3 scripts/sweep_prefill.py --only moe --t 4096,16384
    python3 scripts/sweep_prefill.py --only moe --sparse --shapes 16B --t 32,64   # decode batches' sparse tiles

MoE (FP8 weights, bf16 activations), T tokens with random distinct routing: 16B (64 routed + 2 shared slots,
top-6 + 2, D 2048, I 1408; `16B-routed`: the 64 routed top-6 alone, as the model's prefill runs them) and one rank of 671B at world size 8 (32 local experts, 1 local id per token, D 7168,
I 2048). Configs: the default (`grouped_plan` for the shape's (D, I), GROUPED_BLOCK_T pairs per tile; 4 up warps run
the up kernel's TWO_DOTS form), then pairs per tile x the up
kernel's (warps, stages) with the down kernel at its default, then the down kernel's (BLOCK_N 128 / 256, warps,
stages) under the best up config.
Attention: 16 heads (the 16B model, and 671B at tensor parallel 8), Dn 128, R 64, Dv 128, one sequence of T tokens,
no prefix; configs (BLOCK_M, BLOCK_N, warps, stages). With --prefix P: a later chunk's attention as
`dsv3.mla_cached_prefill_attention` runs it (keys_cached: T queries at positions P .. P+T-1 over P + T decompressed
key rows), once with the keys through TMA descriptors (eager calls take them) and once through pointer tiles
(DSV3_PREFILL_ATTN_TMA=off: what compiled graphs of static key shapes take).

Every config runs once eagerly and is checked against the default config's output (MoE: max abs difference <=
1e-2 * max |default|, the default against `routed_experts_reference` on the first 64 tokens; attention: against
the reference on a slice of queries); failing configs are recorded and skipped. Timing: `dsv3.kernels.bench.graph_us`
(3 calls per CUDA graph; the MoE weights, 571 MB on 16B, are well past the 60 MB L2), then the three fastest and
the default re-timed interleaved (3 rounds, median). TFLOP/s: MoE 2 x 3 x D x I per (token, expert) pair; attention
causal 2 x (Dn + R + Dv) x H x T(T+1)/2, against the FP8 GEMM peak (MoE) and the bf16 matmul peak (attention)
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

MOE_SHAPES = {
    "16B": dict(e_routed=64, n_shared=2, k=6, d=2048, i=1408),
    # what the 16B prefill runs: the shared experts go to cuBLAS as a dense MLP there (MoE.forward)
    "16B-routed": dict(e_routed=64, n_shared=0, k=6, d=2048, i=1408),
    "671B-ws8-rank": dict(e_routed=32, n_shared=0, k=1, d=7168, i=2048),
}
UP_GRID = [(bt, w, s) for bt in (32, 64, 128) for w, s in ((4, 2), (4, 3), (8, 3), (8, 4))]
DOWN_GRID = [(bn, w, s) for bn in (128, 256) for w, s in ((4, 2), (4, 3), (8, 2), (8, 3), (8, 4))]
# --sparse (decode-sized T with sparse tiles): the up kernel's warps and stages (the tile stays SPARSE_TILE_PAIRS)
SPARSE_UP_CONFIGS = [dict(up_num_warps=w, up_num_stages=s) for w, s in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4))]
ATTN_GRID = [(bm, bn, w, s) for bm, bn in ((128, 64), (128, 128), (128, 32), (64, 64), (64, 128))
             for w in (4, 8) for s in (2, 3)]


def log(msg: str) -> None:
    print(msg, flush=True)


def moe_configs_up() -> list[dict]:
    cfgs = [dict(grouped_block_t=32)]
    for bt, w, s in UP_GRID:
        cfgs.append(dict(grouped_block_t=bt, up_num_warps=w, up_num_stages=s))
    return cfgs


def moe_inputs(name: str, t: int, device: str = "cuda"):
    """(x, topk_idx, topk_weight, weights, FLOPs) for MOE_SHAPES[name] at T tokens, on `device`, seed 0: random
    distinct routed ids, the shared slots appended to every token, FP8 weights with 128x128 block scales."""
    from dsv3.kernels.fp8_blocks import quantize_weight

    sh = MOE_SHAPES[name]
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    e, d, i = sh["e_routed"] + sh["n_shared"], sh["d"], sh["i"]
    routed = torch.stack([torch.randperm(sh["e_routed"], device=dev, generator=g)[:sh["k"]] for _ in range(t)])
    shared = torch.arange(sh["e_routed"], e, device=dev).expand(t, sh["n_shared"])
    idx = torch.cat([routed, shared], 1)
    wt = torch.rand(idx.shape, device=dev, generator=g)
    x = torch.randn(t, d, device=dev, generator=g).bfloat16()
    q = [quantize_weight(torch.randn(*s, device=dev, generator=g) * 0.05) for s in ((e, i, d), (e, i, d), (e, d, i))]
    w = [q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1]]
    return x, idx, wt, w, 2 * 3 * d * i * idx.numel()


def sweep_moe(name: str, t: int, peak: float, rows: list, sparse: bool = False) -> None:
    from dsv3.kernels.routed_experts import (
        GROUPED_BLOCK_T, SPARSE_TILE_PAIRS, grouped_plan, routed_experts_reference, routed_experts_triton,
        sparse_tiles,
    )

    d, i = MOE_SHAPES[name]["d"], MOE_SHAPES[name]["i"]
    x, idx, wt, w, flops = moe_inputs(name, t)
    if sparse and not sparse_tiles(True, t, idx.shape[1], w[0].shape[0], d, i):
        log(f"MoE {name} T={t}: the op does not take sparse tiles here (`sparse_tiles`); skipped")
        return

    def call(cfg):
        # the tile pinned (64 pairs unless the config says): a static T with few pairs per expert would otherwise
        # take the sparse tiles and their plan by itself (`sparse_tiles`), and the fields below would vary that plan.
        # --sparse: not pinned, so the fields vary the sparse tiles' plan (GROUPED_SPARSE_FP8).
        cfg = cfg if sparse else {"grouped_block_t": GROUPED_BLOCK_T, **cfg}
        return lambda: routed_experts_triton(x, idx, wt, *w, grouped=True, **cfg)

    base = call({})()
    ref = routed_experts_reference(x[:64], idx[:64], wt[:64], *w)
    ref_err = ((base[:64].double() - ref.double()).norm() / ref.double().norm()).item()
    scale = base.float().abs().max().item()
    tile = SPARSE_TILE_PAIRS if sparse else GROUPED_BLOCK_T
    log(f"MoE {name} T={t}: default ({tile} pairs{', sparse tiles' if sparse else ''}, "
        f"{grouped_plan(True, d, i, sparse, t if sparse else None)}) vs reference rel err {ref_err:.1e}")
    rows.append(dict(kind="moe", shape=name, t=t, default_ref_rel_err=ref_err))

    def check(out):
        diff = (out.float() - base.float()).abs().max().item()
        if not diff <= 1e-2 * scale:
            return f"differs from the default: max abs {diff:.3e} (max |default| {scale:.3e})", {}
        return None, {"max_abs_diff_vs_default": diff}

    measure = measurer("moe", name, t, call, check, flops, peak, rows)
    timed = {json.dumps({}): measure({})}
    for cfg in (SPARSE_UP_CONFIGS if sparse else moe_configs_up()):
        timed[json.dumps(cfg, sort_keys=True)] = measure(cfg)
    best_up = min((k for k in timed if timed[k] is not None), key=lambda k: timed[k])
    up = json.loads(best_up)
    for bn, nw, ns in DOWN_GRID:
        cfg = dict(up, down_block_n=bn, down_num_warps=nw, down_num_stages=ns)
        timed[json.dumps(cfg, sort_keys=True)] = measure(cfg)
    confirm("moe", name, t, timed, lambda k: call(json.loads(k)), flops, peak, rows)


def measurer(kind, name, t, call, check, flops, peak, rows):
    """measure(cfg) -> us or None: run the config once, `check(out)` -> (error or None, extra fields to record),
    then graph-time it; a config that does not compile, launch or verify is recorded and skipped."""
    from dsv3.kernels.bench import graph_us

    def measure(cfg: dict) -> float | None:
        label = json.dumps(cfg, sort_keys=True)
        try:
            err, extra = check(call(cfg)())
            if err:
                raise ValueError(err)
            us = graph_us([call(cfg)] * 3)
        except Exception as exc:
            rows.append(dict(kind=kind, shape=name, t=t, cfg=cfg, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            log(f"  {label}: {rows[-1]['error']}")
            return None
        rows.append(dict(kind=kind, shape=name, t=t, cfg=cfg, us=round(us, 1), tflops=round(flops / us / 1e6, 1),
                         share_of_peak=round(flops / us / 1e6 / peak, 3), **extra))
        log(f"  {label}: {us:8.1f} us  {flops / us / 1e6:6.0f} TFLOP/s ({flops / us / 1e6 / peak:.1%})"
            + "".join(f" {k} {v:.1e}" for k, v in extra.items()))
        return us

    return measure


def confirm(kind, name, t, timed, make_call, flops, peak, rows, rounds: int = 3) -> None:
    from dsv3.kernels.bench import graph_us

    ok = sorted((k for k in timed if timed[k] is not None), key=lambda k: timed[k])
    # the three fastest and the default ("{}": the launcher's own defaults), if it ran
    keys = list(dict.fromkeys(ok[:3] + ([json.dumps({})] if timed.get(json.dumps({})) is not None else [])))
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(rounds):
        for k in keys:
            samples[k].append(graph_us([make_call(k)] * 3))
    log(f"{kind} {name} T={t}, confirmed ({rounds} interleaved rounds, median):")
    for k in sorted(keys, key=lambda k: statistics.median(samples[k])):
        us = statistics.median(samples[k])
        rows.append(dict(kind=kind, shape=name, t=t, confirmed=json.loads(k), us=round(us, 1),
                         spread_us=round(max(samples[k]) - min(samples[k]), 1),
                         tflops=round(flops / us / 1e6, 1), share_of_peak=round(flops / us / 1e6 / peak, 3)))
        log(f"  {k}: {us:8.1f} us  {flops / us / 1e6:6.0f} TFLOP/s ({flops / us / 1e6 / peak:.1%})")


def sweep_attention(t: int, peak: float, rows: list, prefix: int = 0, tma: str = "on") -> None:
    import os

    from dsv3.kernels.mla_prefill import mla_prefill_attention_triton

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    h, dn, r, dv = 16, 128, 64, 128
    kr = prefix + t  # key rows
    bf = torch.bfloat16
    q = torch.randn(1, t, h, dn + r, device=dev, generator=g, dtype=bf)
    q_nope, q_pe = q.split([dn, r], dim=-1)
    kv = torch.randn(1, kr, h, dn + dv, device=dev, generator=g, dtype=bf)   # as kv_b_proj's output, split
    k_nope, v = kv.split([dn, dv], dim=-1)
    # k_pe as the model passes it: the rope columns of latent-cache rows (512 + 64 wide)
    k_pe = torch.randn(1, kr, 512 + r, device=dev, generator=g, dtype=bf)[..., 512:]
    pos = torch.arange(prefix, kr, device=dev).unsqueeze(0)
    scale = 0.1
    flops = 2 * (dn + r + dv) * h * (t * prefix + t * (t + 1) // 2)
    args = (q_nope, q_pe, k_nope, k_pe, v, pos, scale)  # no prefix: the first chunk's form
    name = f"H16 prefix {prefix} TMA {tma}" if prefix else "H16"

    def call(cfg):
        def run():
            old = os.environ.get("DSV3_PREFILL_ATTN_TMA")
            os.environ["DSV3_PREFILL_ATTN_TMA"] = tma
            try:
                return mla_prefill_attention_triton(*args, keys_cached=bool(prefix), **cfg)
            finally:
                os.environ.pop("DSV3_PREFILL_ATTN_TMA") if old is None else os.environ.update(
                    DSV3_PREFILL_ATTN_TMA=old)
        return run

    # reference on the last 256 queries (they see every key): the rows of a full run are checked against it
    sl = slice(t - 256, t)
    ref = _attention_tail_reference(q_nope, q_pe, k_nope, k_pe, v, scale, 256)

    def check(out):
        err = ((out[0, sl].double() - ref).norm() / ref.norm()).item()
        return (f"rel err {err:.1e} against the reference on the last 256 queries" if not err < 5e-3 else None,
                dict(rel_err=err))

    measure = measurer("attention", name, t, call, check, flops, peak, rows)
    timed = {json.dumps({}): measure({})}
    for bm, bn, nw, ns in ATTN_GRID:
        cfg = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        timed[json.dumps(cfg, sort_keys=True)] = measure(cfg)
    confirm("attention", name, t, timed, lambda k: call(json.loads(k)), flops, peak, rows)


def _attention_tail_reference(q_nope, q_pe, k_nope, k_pe, v, scale, n_tail):
    """float64 causal attention of the last n_tail queries over all keys, the queries being the last of the key
    rows (a first chunk, or a chunk over its cached prefix): [n_tail, H, Dv]."""
    qn, qp = q_nope[0, -n_tail:].double(), q_pe[0, -n_tail:].double()
    s = (torch.einsum("qhd,khd->hqk", qn, k_nope[0].double())
         + torch.einsum("qhr,kr->hqk", qp, k_pe[0].double())) * scale
    t = k_nope.shape[1]
    qi = torch.arange(t - n_tail, t, device=s.device)[:, None]
    ki = torch.arange(t, device=s.device)[None, :]
    s = s.masked_fill(ki > qi, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v[0].double())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", default="4096", help="comma-separated token counts")
    ap.add_argument("--only", choices=("moe", "attention"), default=None)
    ap.add_argument("--shapes", default=",".join(MOE_SHAPES), help="MoE shapes")
    ap.add_argument("--prefix", type=int, default=0,
                    help="attention: a later chunk over this many cached rows (keys_cached), TMA on and off")
    ap.add_argument("--sparse", action="store_true",
                    help="MoE at decode-sized T: vary the sparse tiles' plan instead of pinning 64-pair tiles")
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    from dsv3.kernels.bench import ceilings, CEIL
    from dsv3.runtime.bench import fp8_gemm_peak

    dev = torch.device("cuda")
    fp8_peak = fp8_gemm_peak(dev) / 1e12
    ceilings()
    bf16_peak = CEIL["bf16_tflop_s"]
    log(f"FP8 GEMM peak {fp8_peak:.0f} TFLOP/s, ceilings {CEIL}")
    rows: list = []
    meta = dict(fp8_peak_tflops=fp8_peak, ceilings=dict(CEIL), started=time.strftime("%Y-%m-%d %H:%M:%S"))

    def dump():
        if opts.json:
            from dsv3.kernels.bench import save_json
            save_json(opts.json, dict(meta, rows=rows))

    for t in (int(v) for v in opts.t.split(",")):
        if opts.only in (None, "attention"):
            for tma in (("on", "off") if opts.prefix else ("on",)):
                sweep_attention(t, bf16_peak, rows, opts.prefix, tma)
                dump()
        if opts.only in (None, "moe"):
            for name in opts.shapes.split(","):
                sweep_moe(name, t, fp8_peak, rows, opts.sparse)
                dump()


if __name__ == "__main__":
    main()
