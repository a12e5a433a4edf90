"""A/B a prefill MoE layer's end on the GPU: the model's kernels before deferred MoE adds (Inductor's kernel for the
routed pairs' weighted sum + the shared output + the residual add + the next block's RMSNorm, writing h and x in
bf16, then `act_quant` of x in cuBLAS's layout for the q / kv_a GEMM) against `dsv3.moe_residual_norm_quant` (one
kernel writing h and x's e4m3 values and scales). Outputs compared (h_out within rounding: Inductor keeps fp32
between the reference's bf16 roundings; x_q / x_scale dequantized), timed in CUDA graphs, interleaved rounds.

    python3 scripts/ab_moe_residual.py [--cases 4095:6:2048:66,1024:6:2048:66,4095:8:7168:256] [--rounds 5]
        [--json out.json]

Cases T:K:D:E (tokens, pairs per token, hidden size, experts incl. stacked shared slots): the 16B prefill's MoE
layer at 4095 and 1024 tokens, and 671B's shape at world size 1. Bytes moved by the new kernel: pairs (T*K*D*2),
shared, h (read), h_out (written), x_q + scales.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_grouped_moe import timed_old_new  # noqa: E402

from dsv3.kernels.bench import save_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="4095:6:2048:66,1024:6:2048:66,4095:8:7168:256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    import dsv3.kernels  # noqa: F401  (registers the ops)
    from dsv3.kernels.fp8_linear import act_quant
    from dsv3.kernels.fp8_swiglu import QUANTIZED_X_K_BLOCKS
    from dsv3.kernels.rms_norm import rms_norm_rounded
    from dsv3.kernels.routed_experts import combine_pairs

    eps = 1e-6
    rows = []
    for case in opts.cases.split(","):
        t, k, d, e = (int(v) for v in case.split(":"))
        g = torch.Generator(device="cuda").manual_seed(t + d)
        dev = torch.device("cuda")
        h = (torch.randn(1, t, d, device=dev, generator=g) * 3).bfloat16()
        pairs = torch.randn(t, k, d, device=dev, generator=g).bfloat16()
        idx = torch.argsort(torch.rand(t, e - 2, device=dev, generator=g), dim=1)[:, :k]
        w = torch.rand(t, k, device=dev, generator=g)
        shared = torch.randn(1, t, d, device=dev, generator=g).bfloat16()
        nw = (1.0 + 0.3 * torch.randn(d, device=dev, generator=g)).bfloat16()

        def composition(h, pairs, idx, w, shared, nw):
            h2 = h + (combine_pairs(pairs, idx, w, e).view(h.shape) + shared)
            return h2, rms_norm_rounded(h2, nw, eps)

        inductor = torch.compile(composition, fullgraph=True, dynamic=False)

        def old():
            h2, x = inductor(h, pairs, idx, w, shared, nw)
            xq, xs = act_quant(x.view(-1, d), pad_rows_to=4, scales_m_major=True, pad_k_blocks_to=1, pad_k=True)
            return h2, xq, xs

        def new():
            return torch.ops.dsv3.moe_residual_norm_quant(h, pairs, idx, w, shared, e, nw, eps, QUANTIZED_X_K_BLOCKS)

        a, b = old(), new()
        deq = lambda q, s: q.float().view(q.shape[0], -1, 128)[:, :s.shape[1]] * s[:, :, None]  # noqa: E731
        h_err = ((a[0].float() - b[0].float()).norm() / a[0].float().norm()).item()
        qa, qb = deq(a[1], a[2])[:t], deq(b[1], b[2])[:t]
        x_err = ((qa - qb).norm() / qa.norm()).item()
        nbytes = t * k * d * 2 + 3 * t * d * 2 + t * d + t * d // 32
        ab = timed_old_new({"old": old, "new": new}, opts.rounds, 0.0)
        row = dict(case=case, old_us=ab["old"]["us"], new_us=ab["new"]["us"], speedup=ab["speedup"],
                   new_tbs=round(nbytes / ab["new"]["us"] / 1e6, 2), h_rel_err=h_err, x_rel_err=x_err,
                   h_equal_frac=(a[0] == b[0]).float().mean().item())
        rows.append(row)
        print(f"T {t} K {k} D {d}: old {row['old_us']} us (Inductor + act_quant), new {row['new_us']} us "
              f"({row['speedup']}x, {row['new_tbs']} TB/s); h rel err {h_err:.2e} (equal {row['h_equal_frac']:.4f}), "
              f"x rel err {x_err:.2e}", flush=True)
    if opts.json:
        save_json(opts.json, rows)


if __name__ == "__main__":
    main()
