"""A/B of `dsv3.mla_prefill_attention_o_proj`: the fused path (the attention kernel quantizes o_proj's input in
its epilogue, QUANT_OUT) against the two ops it replaces (DSV3_PREFILL_O_QUANT=off: the attention op, then
dsv3.fp8_linear, whose cuBLAS path quantizes the attention output in its own launch), side by side in one process:
outputs compared bitwise, each form timed in CUDA graphs by ab_grouped_moe.py's `timed_old_new` (3 calls per graph,
rounds alternating which form goes first; medians, TFLOP/s of attention + o_proj).

    python3 scripts/ab_prefill_o_proj.py [--cases 16:2048:1:4095,...] [--rounds 5] [--json out.json]

Cases HEADS:N:B:S: a first chunk (no prefix; positions 0..S-1) with q/k = [nope 128 | rope 64], v 128, bf16, and
FP8 o_proj weights [N, HEADS * 128] with 128x128 block scales. Defaults: the 16B (16 heads, N 2048) and one 671B
rank at world size 8 (16 heads, N 7168) at 4095 tokens (B * S not a multiple of 4: padding rows), the 16B at 1000
tokens, and eight prompts of 300 tokens.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_grouped_moe import timed_env_switch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="16:2048:1:4095,16:7168:1:4095,16:2048:1:1000,16:2048:8:300",
                    help="comma-separated HEADS:N:B:S")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    import dsv3.kernels  # noqa: F401  (registers the ops)
    from dsv3.kernels.bench import save_json
    from dsv3.kernels.fp8_blocks import quantize_weight

    dev = torch.device("cuda")
    rows = []
    for case in opts.cases.split(","):
        h, n, b, s = (int(v) for v in case.split(":"))
        g = torch.Generator(device=dev).manual_seed(h + n + b + s)
        rn = lambda *shape: torch.randn(*shape, device=dev, generator=g).bfloat16()  # noqa: E731
        args = (rn(b, s, h, 128), rn(b, s, h, 64), rn(b, s, h, 128), rn(b, s, 64), rn(b, s, h, 128),
                torch.arange(s, device=dev)[None].repeat(b, 1), 0.07)
        w, ws = quantize_weight(torch.randn(n, h * 128, device=dev, generator=g) * 0.05)

        # causal attention (2 x H x S(S+1)/2 x (192 + 128) per row) + o_proj (2 x S x H * 128 x N per row)
        flops = b * (h * s * (s + 1) * 320 + 2 * s * h * 128 * n)
        row = dict(heads=h, n=n, batch=b, s=s, **timed_env_switch(
            "DSV3_PREFILL_O_QUANT", lambda: torch.ops.dsv3.mla_prefill_attention_o_proj(*args, w, ws), opts.rounds,
            flops))
        rows.append(row)
        print(f"H {h} N {n} B {b} S {s}: two ops {row['old']['us']:.1f} us, fused {row['new']['us']:.1f} us "
              f"({row['speedup']:.3f}x); outputs {'equal' if row['outputs_equal'] else 'DIFFER'}; rounds two ops "
              f"{row['old']['rounds']} fused {row['new']['rounds']}", flush=True)
    if opts.json:
        save_json(opts.json, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows))


if __name__ == "__main__":
    main()
