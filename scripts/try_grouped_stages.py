"""Grouped MoE (16B, T=4096, 6 routed per token): up/down kernels at 2 pipeline stages (two CTAs per SM fit the
shared memory; ncu: 1 CTA/SM at 3 stages, 12.5% occupancy) against the default. One-off diagnostic."""
import torch
from dsv3.kernels.bench import graph_us
from dsv3.kernels.fp8_blocks import quantize_weight
from dsv3.kernels.routed_experts import routed_experts_triton

dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
e, k, d, i, t = 66, 6, 2048, 1408, 4096
q = [quantize_weight(torch.randn(*s, device=dev, generator=g) * 0.05) for s in ((e, i, d), (e, i, d), (e, d, i))]
w = [q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1]]
idx = torch.stack([torch.randperm(64, device=dev, generator=g)[:k] for _ in range(t)])
wt = torch.rand(idx.shape, device=dev, generator=g)
x = torch.randn(t, d, device=dev, generator=g).bfloat16()
cfgs = {"default": {}, "up s2": dict(up_num_stages=2), "up s2 down s2": dict(up_num_stages=2, down_num_stages=2),
        "up w4 s2": dict(up_num_warps=4, up_num_stages=2), "up bn64 w4 s2": dict(up_block_n=64, up_num_warps=4, up_num_stages=2),
        "down s2": dict(down_num_stages=2), "down w4 s2": dict(down_num_warps=4, down_num_stages=2)}
base = routed_experts_triton(x, idx, wt, *w)
res = {}
for name, c in cfgs.items():
    try:
        out = routed_experts_triton(x, idx, wt, *w, **c)
        diff = (out.float() - base.float()).abs().max().item() / base.float().abs().max().item()
        res[name] = [graph_us([lambda c=c: routed_experts_triton(x, idx, wt, *w, **c)] * 3), diff]
    except Exception as ex:  # noqa: BLE001
        res[name] = [None, repr(ex)[:120]]
for r in range(2):
    for name, c in cfgs.items():
        if res[name][0] is not None:
            res[name].append(graph_us([lambda c=c: routed_experts_triton(x, idx, wt, *w, **c)] * 3))
for name, v in res.items():
    print(f"{name:16s} {v}")
