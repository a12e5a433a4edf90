"""The routed-experts kernels under Nsight Compute: why the grouped (prefill) path runs well below the FP8 peak (its
L2 / DRAM throughput, stalls, occupancy) and the one-token decode kernels below the copy bandwidth.

    ncu --profile-from-start off --kernel-name regex:_moe_ ... python3 scripts/ncu_moe.py   (gpu_check.sh ncu-moe)

Builds the 16B MoE shapes (64 routed experts + 2 shared slots, D 2048, I 1408, FP8 weights), runs each case twice
outside the profiled range (Triton compiles, caches warm), then once inside `torch.cuda.profiler.start/stop`:
1. grouped path, T = 4096 tokens, 6 routed experts per token (the model's prefill call: shared slots run as a
   dense MLP there);
2. grouped path, T = 128 (a short prompt's prefill: ~12 pairs per expert, one mostly empty tile each; a static
   T this small takes the sparse tiles, `sparse_tiles`: 32 pairs, GROUPED_SPARSE_FP8; the ncu numbers of
   docs/BENCHMARKS.md's thirtieth session are of the 64-pair tiles before that);
3. decode path, T = 1 (8 slots: 6 routed + 2 shared), the default plan.
Without ncu it just runs (a smoke test of the inputs). A diagnostic for docs/KERNELS.md, not part of the runtime.
"""

from __future__ import annotations

import torch


def main() -> None:
    from dsv3.kernels.bench import profile_under_ncu
    from dsv3.kernels.fp8_blocks import quantize_weight
    from dsv3.kernels.routed_experts import routed_experts_triton

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    e_routed, n_shared, k, d, i = 64, 2, 6, 2048, 1408
    e = e_routed + n_shared
    q = [quantize_weight(torch.randn(*s, device=dev, generator=g) * 0.05) for s in ((e, i, d), (e, i, d), (e, d, i))]
    w = [q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1]]

    def inputs(t: int, with_shared: bool):
        idx = torch.stack([torch.randperm(e_routed, device=dev, generator=g)[:k] for _ in range(t)])
        if with_shared:
            idx = torch.cat([idx, torch.arange(e_routed, e, device=dev).expand(t, n_shared)], 1)
        wt = torch.rand(idx.shape, device=dev, generator=g)
        x = torch.randn(t, d, device=dev, generator=g).bfloat16()
        return x, idx, wt

    cases = [("grouped T=4096", inputs(4096, False)), ("grouped T=128", inputs(128, False)),
             ("decode T=1", inputs(1, True))]
    profile_under_ncu(cases, lambda x, idx, wt: routed_experts_triton(x, idx, wt, *w))


if __name__ == "__main__":
    main()
