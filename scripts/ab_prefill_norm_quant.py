"""A/B of the prefill MoE layer's x quantized once, by the post-attention norm (dsv3.add_rms_norm_quant_cublas,
`MoE.quantizes_x_for_cublas`: the shared experts' dsv3.fp8_swiglu reads its cuBLAS layout, the routed experts the
padded e4m3 buffer and per-token scales) against fp8_swiglu quantizing x itself (DSV3_PREFILL_NORM_QUANT=off: its
own act_quant launch), side by side in one process: `dsv3.model.Block.feed_forward` of an FP8 MoE layer (residual
add + norm + quantization, router, routed and shared experts, residual), outputs compared bitwise, each form timed
in CUDA graphs by ab_grouped_moe.py's `timed_old_new` (3 calls per graph, rounds alternating which form goes first;
medians).

    python3 scripts/ab_prefill_norm_quant.py [--config 16B] [--tokens 4095,1000,300] [--rounds 5] [--json out.json]

The layer is the config's first MoE layer (FP8 whatever the config says) with random weights (`fill_random_`), laid
out as the runtime lays out world size 1 (shared experts stacked as expert slots, their down projections packed at
load).
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
    ap.add_argument("--config", default="16B")
    ap.add_argument("--tokens", default="4095,1000,300", help="comma-separated prompt lengths (one sequence)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    from dsv3.config import FP8Quantization, resolve_config
    from dsv3.kernels.bench import save_json
    from dsv3.model import MoE, Transformer
    from dsv3.runtime.random_weights import fill_random_

    cfg = resolve_config(opts.config)
    cfg = cfg.replace(num_hidden_layers=cfg.first_k_dense_replace + 1, quantization_config=FP8Quantization())
    model = Transformer(cfg, dtype=torch.bfloat16, max_batch_size=1, max_seq_len=16, device="meta")
    model.stack_shared_experts_().add_prefill_copies_()
    fill_random_(model.materialize_("cuda"), seed=3)
    block = model.layers[-1]
    assert isinstance(block.mlp, MoE) and block.fp8_moe
    dev = torch.device("cuda")
    rows = []
    for t in (int(v) for v in opts.tokens.split(",")):
        g = torch.Generator(device=dev).manual_seed(t)
        h = torch.randn(1, t, cfg.hidden_size, device=dev, generator=g).bfloat16()
        attn = torch.randn(1, t, cfg.hidden_size, device=dev, generator=g).bfloat16()

        def feed_forward():
            on = os.environ["DSV3_PREFILL_NORM_QUANT"] == "on"
            assert block.mlp.quantizes_x_for_cublas(h) == on, "the switch did not change the layer's path"
            return block.feed_forward(h, attn)

        experts = cfg.num_experts_per_tok + cfg.n_shared_experts
        flops = 2 * t * 3 * cfg.hidden_size * cfg.moe_intermediate_size * experts
        with torch.no_grad():
            row = dict(config=opts.config, tokens=t, **timed_env_switch(
                "DSV3_PREFILL_NORM_QUANT", feed_forward, opts.rounds, flops))
        rows.append(row)
        print(f"{opts.config} T {t}: each op quantizes {row['old']['us']:.1f} us, the norm quantizes "
              f"{row['new']['us']:.1f} us ({row['speedup']:.3f}x); outputs "
              f"{'equal' if row['outputs_equal'] else 'DIFFER'}; rounds {row['old']['rounds']} / "
              f"{row['new']['rounds']}", flush=True)
    if opts.json:
        save_json(opts.json, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows))


if __name__ == "__main__":
    main()
