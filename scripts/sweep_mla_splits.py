"""How many flash-decoding splits should `dsv3.mla_attention` use? (GPU measurement, issue 3.)

`mla_plan` sizes the splits as ceil(SMs / (batch x row blocks)): at batch 8 on 132 SMs that is 17 splits, 136
programs, and at batch 32 5 splits, 160 programs: one wave and a few programs more, which a second wave then runs
alone. The kernel bench of 2026-11-24 measured batch 32 at 8k context at 39% of copy bandwidth (54.6% on
2026-11-22, before the 8-warp 64-row plan). This script times the op (splits + combine) at H = 16 and 128, batch 1,
8 and 32, contexts 1k, 8k and 32k (cache filled up to the position), with the plan's split count and with whole
waves of programs (floor(SMs / programs per split) x 1, 2, 3), each checked against `mla_attention_reference`
(max abs error < 2e-2) and timed as the kernel bench does (C cache copies past the L2, C calls in one CUDA graph).
At contexts >= 8k also other forms at the plan's split count: the transposed formulation (swap) at 4 / 8 warps,
128-row key blocks.

Outcome (2026-11-24, H200, 132 SMs, us, plan's ceil() split count -> whole waves): H 16 batch 8 at 32k 171.7 ->
131.7, batch 32 at 8k 182.2 -> 133.0 and at 32k 660.9 -> 458.0, H 128 batch 8 / 32 at 8k 136.4 -> 99.9 / 428.3 ->
312.1; batch 1 and batch 8 up to 8k unchanged; 2-3x whole waves no better. Adopted in `mla_plan`.

    python3 scripts/sweep_mla_splits.py [--json out.json]
"""

from __future__ import annotations

import argparse

import torch

from dsv3.kernels._launch import cdiv, num_sms
from dsv3.kernels.bench import graph_us, save_json
from dsv3.kernels.mla_attention import mla_attention_reference, mla_attention_triton, mla_plan


COPY_TB_S = 4.28  # the H200's measured device-to-device copy bandwidth (docs/KERNELS.md)


def timed_variant(q, qpe, caches, pos, scale, ref, size, **kw) -> dict:
    """`mla_attention_triton` with the launch overrides `kw`: checked against `ref` (max abs error < 2e-2) on the
    first cache copy, then timed over all copies in one CUDA graph: {us, pct_copy} for the `size` bytes of cache
    rows read, or {error} (a mismatch, or a config that does not compile or launch: shared memory, registers)."""
    try:
        out = mla_attention_triton(q, qpe, caches[0], pos, scale, **kw).float()
        err = (out - ref).abs().max().item()
        if not err < 2e-2:
            return dict(error=f"max abs err {err:.3g}")
        us = graph_us([lambda cc=cc: mla_attention_triton(q, qpe, cc, pos, scale, **kw) for cc in caches])
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        return dict(error=str(e).splitlines()[0][:120])
    return dict(us=round(us, 2), pct_copy=round(100 * size / us / 1e6 / COPY_TB_S, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only-short", action="store_true", help="only the short contexts in long caches")
    opts = ap.parse_args()
    dev = torch.device("cuda")
    sms = num_sms(dev)
    c, r, scale = 512, 64, 0.1
    rows = []
    cases = [(16, b, ctx, ctx) for b in (1, 8, 32) for ctx in (1024, 8192, 32768)]
    cases += [(128, b, 8192, 8192) for b in (1, 8, 32)]
    # short contexts in long caches (the plan sees only the cache length): what 128-row key blocks cost there
    cases += [(16, b, ctx, t_cap) for t_cap in (4096, 32768) for b in (1, 8) for ctx in (128, 1024, 4095)]
    if opts.only_short:
        cases = cases[12:]
    for heads, b, ctx, t_cap in cases:
        size = b * ctx * (c + r) * 2  # the rows read
        cache_bytes = b * t_cap * (c + r) * 2
        copies = max(2, min(16, (512 << 20) // cache_bytes))
        g = torch.Generator(device=dev).manual_seed(b * 100000 + ctx + heads)
        caches = [torch.randn(b, t_cap, c + r, device=dev, generator=g).bfloat16() for _ in range(copies)]
        q = torch.randn(b, 1, heads, c, device=dev, generator=g).bfloat16()
        qpe = torch.randn(b, 1, heads, r, device=dev, generator=g).bfloat16()
        pos = torch.full((b, 1), ctx - 1, device=dev, dtype=torch.long)
        ref = mla_attention_reference(q, qpe, caches[0], pos, scale).float()
        plan = mla_plan(b, 1, heads, t_cap, c, sms)
        block_h, default_splits, min_chunk = plan.block_h, plan.n_splits, plan.min_chunk
        per_split = b * cdiv(heads, block_h)
        cap = cdiv(t_cap, min_chunk)
        whole = max(1, sms // per_split)
        cands = sorted({default_splits, *(min(cap, whole * k) for k in (1, 2, 3))}) if t_cap == ctx else [default_splits]
        res = {}
        for n in cands:
            res[n] = timed_variant(q, qpe, caches, pos, scale, ref, size, n_splits=n)
            if "us" in res[n]:
                res[n]["programs"] = n * per_split
        # and at the plan's split count: the transposed formulation (cache rows as the MMA's M: 16 query rows fill
        # a quarter of a 64-row wgmma in the plain one), 128-row key blocks
        forms = {}
        if ctx >= 8192 or t_cap > ctx:
            forms_kw = (("swap_w4", dict(swap=True, num_warps=4)), ("swap_w8", dict(swap=True, num_warps=8)),
                        ("bt128", dict(block_t=128, min_chunk=128)))
            if t_cap > ctx:  # short context: 128-row blocks with the split count the plan would then choose
                forms_kw = (("bt128", dict(block_t=128, min_chunk=128, n_splits=None)),)
            for name, kw in forms_kw:
                forms[name] = timed_variant(q, qpe, caches, pos, scale, ref, size,
                                            **dict(dict(n_splits=default_splits), **kw))
        row = dict(heads=heads, b=b, ctx=ctx, t_cap=t_cap, default_splits=default_splits, results=res, forms=forms)
        rows.append(row)
        print(f"H={heads:3d} B={b:2d} ctx={ctx:5d} cache={t_cap:5d}: " + ", ".join(
            f"{n} splits{' (plan)' if n == default_splits else ''} "
            + (f"{v['us']:.1f} us {v['pct_copy']}%" if "us" in v else v["error"]) for n, v in res.items())
            + "".join(f"; {k} " + (f"{v['us']:.1f} us {v['pct_copy']}%" if "us" in v else v["error"])
                      for k, v in forms.items()), flush=True)
        del caches
    if opts.json:
        save_json(opts.json, rows)


if __name__ == "__main__":
    main()
