"""The prefill's RoPE of q_pe as Inductor compiles it, two formulations side by side on the GPU (issue 6).

    python3 scripts/bench_rope.py [--json out.json]

`dsv3.rope.apply_rope` writes the rotated pairs with a cat of the two halves; Inductor turns that cat into one
kernel whose every element loads both halves' inputs under masks (the 16B prefill profile: 17-26 us per layer for
4095 tokens x 16 heads x 64, ~8 MB out). The alternative computes the same values with one load per operand: the
de-interleaved and the swapped x as index permutations, cos / sin repeated over the halves, the sign from the
column index. Each is compiled (fullgraph) as the model runs it: the cos / sin tables gathered by position inside
the graph, q_pe a view of the [S, H, 192] projection rows; outputs compared bitwise; timed in CUDA graphs
(`dsv3.kernels.bench.graph_us`, 3 interleaved rounds, median).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def apply_rope_indexed(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope's values, written without a cat (see the module docstring)."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    pairs = x.float().unflatten(-1, (half, 2))
    deint = pairs.transpose(-1, -2).flatten(-2)                 # x1..., x2...
    swapped = pairs.flip(-1).transpose(-1, -2).flatten(-2)      # x2..., x1...
    cos2 = cos.unsqueeze(-2).expand(*cos.shape[:-1], 2, half).flatten(-2)
    sin2 = sin.unsqueeze(-2).expand(*sin.shape[:-1], 2, half).flatten(-2)
    sign = torch.where(torch.arange(2 * half, device=x.device) < half, -1.0, 1.0)
    return (deint * cos2 + swapped * (sin2 * sign)).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tokens", type=int, default=4095)
    opts = ap.parse_args()
    from dsv3.kernels.bench import graph_us
    from dsv3.rope import apply_rope

    dev = torch.device("cuda")
    s, h = opts.tokens, 16
    g = torch.Generator(device=dev).manual_seed(0)
    proj = torch.randn(1, s, h, 192, device=dev, generator=g).bfloat16()
    table = torch.rand(4096, 32, device=dev, generator=g) * 6.0
    cos_t, sin_t = table.cos(), table.sin()
    pos = torch.arange(s, device=dev)[None]

    def model_form(fn):
        def step(proj, pos):
            return fn(proj[..., 128:], cos_t[pos], sin_t[pos])
        return torch.compile(step, fullgraph=True, dynamic=False)

    fns = {"cat (apply_rope)": model_form(apply_rope), "indexed": model_form(apply_rope_indexed)}
    outs = {k: f(proj, pos) for k, f in fns.items()}
    same = torch.equal(*outs.values())
    times = {k: [] for k in fns}
    for _ in range(3):
        for k, f in fns.items():
            times[k].append(graph_us([lambda f=f: f(proj, pos)] * 3))
    nbytes = s * h * 64 * 2 * 2
    rows = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(f"q_pe rope, {s} tokens x {h} heads x 64 ({nbytes / 1e6:.1f} MB in + out): "
          + ", ".join(f"{k} {us} us ({nbytes / us / 1e6:.2f} TB/s)" for k, us in rows.items())
          + f"; outputs bitwise equal: {same}", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(tokens=s, heads=h, us=rows, bitwise_equal=same), f, indent=1)


if __name__ == "__main__":
    main()
