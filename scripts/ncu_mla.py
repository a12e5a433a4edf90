"""The MLA decode kernels under Nsight Compute: why one sequence (batch 1) reads its latent cache at 14-33% of the
copy bandwidth when batch 32 reaches 75-90% (docs/KERNELS.md, issue 3).

    ncu --profile-from-start off --kernel-name regex:_mla_ ... python3 scripts/ncu_mla.py   (gpu_check.sh ncu-mla)

Cases (H = 16, C = 512, R = 64, bf16, the plan the model gets): batch 1 at context 128 of a 4096-row cache (the 16B
bench), batch 1 at 8192 of 8192 rows (one 128-row block per split), batch 1 at 32768 (several 64-row blocks per
split, 3 stages), batch 8 at 4032 of 4096. Each case runs twice outside the profiled range (compiles, warm caches),
then once inside `torch.cuda.profiler.start/stop`: the split kernel and the combine kernel of each case are
profiled. Without ncu it just runs. A diagnostic for docs/KERNELS.md, not part of the runtime.
"""

from __future__ import annotations

import torch

from dsv3.kernels.bench import profile_under_ncu
from dsv3.kernels.mla_attention import mla_attention_triton

CASES = [(1, 128, 4096), (1, 8192, 8192), (1, 32768, 32768), (8, 4032, 4096)]


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    heads, c, r = 16, 512, 64
    inputs = []
    for b, ctx, t_cap in CASES:
        cache = torch.randn(b, t_cap, c + r, device=dev, generator=g).bfloat16()
        q = torch.randn(b, 1, heads, c, device=dev, generator=g).bfloat16()
        qpe = torch.randn(b, 1, heads, r, device=dev, generator=g).bfloat16()
        pos = torch.full((b, 1), ctx - 1, device=dev, dtype=torch.long)
        inputs.append((f"B={b} ctx={ctx} cache={t_cap}", (q, qpe, cache, pos, 0.1)))
    profile_under_ncu(inputs, mla_attention_triton)


if __name__ == "__main__":
    main()
