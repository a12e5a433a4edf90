"""`torch.ops.dsv3.add_rms_norm_quant_route`: the MoE side's residual add + RMSNorm + FP8 quantization and the router,
in two launches at batch-1 decode instead of three.

An FP8 MoE layer at decode starts with `dsv3.add_rms_norm_quant` (one program per token) and `dsv3.route` (a logits
GEMV over the router weight, then a select kernel): three dependent launches of ~2-3 us each on the H200, the first
two over a few KB and a 0.25-3.7 MB weight. The logits GEMV only needs the normed row, which every program can
compute itself from h and delta (a few KB from L2), so the norm and the logits become one launch.

Contract
- h, delta: [..., D] bfloat16/float16, norm_weight: [D] (same dtype), eps: float; router_weight [E, D]
  (bfloat16/float32), bias [E] fp32 or None, and `dsv3.route`'s scalars (top_k, n_group, topk_group, sigmoid,
  group_top2, norm_topk_prob, routed_scaling_factor, n_shared).
- Returns (h_out, y, y_q, y_scale, topk_idx, topk_weight): the first four exactly `dsv3.add_rms_norm_quant(h, delta,
  norm_weight, eps)`, the last two `dsv3.route(y.reshape(-1, D), router_weight, bias, ...)` ([T, top_k + n_shared]
  with T = prod(h.shape[:-1])). Logits are fp32 sums of exact fp32 products (as `dsv3.route`'s kernels; their
  order is this kernel's own, so near-ties may resolve differently from the reference, as documented there).

Implementations (branch taken at trace time)
- CPU, unsupported dtypes or sizes, or DSV3_NORM_ROUTE=torch: `add_rms_norm_quant_route_reference`, the two ops
  (on CUDA: the three launches the model ran before this op).
- CUDA, T statically 1..ROUTE_FUSED_MAX_T, E <= 512: `_add_norm_quant_logits_kernel`, grid E / BLOCK_E: every
  program loads the T rows of h and delta and the norm weight, computes y exactly as `_add_rms_norm_quant_kernel`
  (the same `add_rms_norm_tile`) and the fp32 logits of its BLOCK_E experts (their weight rows over the whole D in one
  load); program 0 also stores h_out, y, y_q, y_scale. Then `dsv3.route`'s select kernel over the logits.
DSV3_NORM_ROUTE=fused|torch (read at trace time; `fused` the default) pins a path. The model calls this op for every
decode-sized step (dsv3.model.MoE.decode_sized); beyond ROUTE_FUSED_MAX_T tokens it is the two ops it replaces.

Measured (H200, scripts/gpu_check.sh ab16, 16B FP8 at 8 layers, 2026-11-23, two runs of 5 and 8 round-robin
rounds): batch 1 650.3 -> 633.3 us per step with the fused path, 2.39 / 2.12 us per MoE layer less (the other
paths unchanged); batch 8 takes the unfused path (T > ROUTE_FUSED_MAX_T), same graph. Profile: the fused kernel
2.4 us per call where the norm + quant kernel took 1.9 and the logits GEMV 2.7.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, env_switch, next_pow2, static_int
from dsv3.kernels.fp8_blocks import BLOCK, FP8_DTYPE
from dsv3.kernels.fp8_linear import k_blocks, quantize_tile_rcp
from dsv3.kernels.rms_norm import add_rms_norm_tile, norm_num_warps
from dsv3.kernels.router import SELECT_MAX_E, _check_args as check_route_args, select_from_partials

NORM_ROUTE_DEFAULT = "fused"
ROUTE_FUSED_MAX_T = 4
# Programs of the fused kernel: about one per SM at most (BLOCK_E experts each, a power of two).
ROUTE_FUSED_PROGRAMS = 128


def add_rms_norm_quant_route_reference(
    h: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, router_weight: torch.Tensor,
    bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int, sigmoid: bool, group_top2: bool,
    norm_topk_prob: bool, routed_scaling_factor: float, n_shared: int = 0,
):
    h_out, y, y_q, y_scale = torch.ops.dsv3.add_rms_norm_quant(h, delta, norm_weight, eps)
    idx, wt = torch.ops.dsv3.route(y.reshape(-1, y.shape[-1]), router_weight, bias, top_k, n_group, topk_group,
                                   sigmoid, group_top2, norm_topk_prob, routed_scaling_factor, n_shared)
    return h_out, y, y_q, y_scale, idx, wt


@triton.jit
def _add_norm_quant_logits_kernel(
    h_ptr, d_ptr, nw_ptr, rw_ptr, ho_ptr, y_ptr, q_ptr, s_ptr, lg_ptr,
    T, E, D, eps, stride_h, stride_d, stride_rw,
    BLOCK_E: tl.constexpr, T_TILE: tl.constexpr, KB_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    offs_b, offs_k, k_mask, kb_mask = k_blocks(D, KB_PAD)
    rw = tl.load(rw_ptr + offs_e[:, None, None] * stride_rw + offs_k[None, :, :],
                 mask=e_mask[:, None, None] & k_mask[None, :, :], other=0.0).to(tl.float32)
    nw = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    dt = ho_ptr.dtype.element_ty
    for t in tl.static_range(T_TILE):
        hv = tl.load(h_ptr + t * stride_h + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        dv = tl.load(d_ptr + t * stride_d + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        ho, y = add_rms_norm_tile(hv, dv, nw, D, eps, dt)
        if pid == 0:
            row = t * D
            tl.store(ho_ptr + row + offs_k, ho, mask=k_mask)
            tl.store(y_ptr + row + offs_k, y, mask=k_mask)
            q, s = quantize_tile_rcp(y.to(tl.float32))
            tl.store(q_ptr + row + offs_k, q, mask=k_mask)
            tl.store(s_ptr + t * tl.cdiv(D, 128) + offs_b, s, mask=kb_mask)
        lg = tl.sum(tl.sum(rw * y.to(tl.float32)[None, :, :], axis=2), axis=1)
        tl.store(lg_ptr + t * E + offs_e, lg, mask=e_mask)


def add_rms_norm_quant_route_triton(
    h: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, router_weight: torch.Tensor,
    bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int, sigmoid: bool, group_top2: bool,
    norm_topk_prob: bool, routed_scaling_factor: float, n_shared: int = 0, block_e: Optional[int] = None,
    num_warps: Optional[int] = None,
):
    """The fused CUDA path (T <= ROUTE_FUSED_MAX_T); block_e / num_warps override the launch (sweeps)."""
    d = static_int(h.shape[-1])
    shape = h.shape
    h2, d2 = h.reshape(-1, d), delta.reshape(-1, d)
    h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
    d2 = d2 if d2.stride(-1) == 1 else d2.contiguous()
    rw = router_weight if router_weight.stride(-1) == 1 else router_weight.contiguous()
    t, e = h2.shape[0], rw.shape[0]
    kb = cdiv(d, BLOCK)
    h_out = torch.empty(shape, dtype=h.dtype, device=h.device)
    y = torch.empty(shape, dtype=h.dtype, device=h.device)
    y_q = torch.empty(shape, dtype=FP8_DTYPE, device=h.device)
    y_scale = torch.empty((*shape[:-1], kb), dtype=torch.float32, device=h.device)
    logits = torch.empty((1, t, e), dtype=torch.float32, device=h.device)
    block_e = block_e or next_pow2(cdiv(e, ROUTE_FUSED_PROGRAMS))
    kb_pad = next_pow2(kb)
    if num_warps is None:  # as the norm kernel, and 8 when the weight tile is large (671B: D 7168, 2 experts)
        num_warps = max(norm_num_warps(d), 8 if block_e * kb_pad * BLOCK > 8192 else 4)
    wrap_triton(_add_norm_quant_logits_kernel)[(cdiv(e, block_e),)](
        h2, d2, norm_weight, rw, h_out, y, y_q, y_scale, logits,
        t, e, d, eps, h2.stride(0), d2.stride(0), rw.stride(0),
        BLOCK_E=block_e, T_TILE=t, KB_PAD=kb_pad, num_warps=num_warps,
    )
    k = top_k + n_shared
    idx = torch.empty((t, k), dtype=torch.int64, device=h.device)
    wt = torch.empty((t, k), dtype=torch.float32, device=h.device)
    select_from_partials(logits, bias, idx, wt, top_k, n_group, topk_group, sigmoid, group_top2, norm_topk_prob,
                         routed_scaling_factor, n_shared)
    return h_out, y, y_q, y_scale, idx, wt


def norm_route_choice() -> str:
    return env_switch("DSV3_NORM_ROUTE", NORM_ROUTE_DEFAULT, ("fused", "torch"))


def _fusable(h: torch.Tensor, router_weight: torch.Tensor) -> bool:
    d = static_int(h.shape[-1])
    t = static_int(h.numel() // h.shape[-1]) if d else None
    return (h.device.type == "cuda" and h.dtype in (torch.bfloat16, torch.float16) and d is not None
            and t is not None and 0 < t <= ROUTE_FUSED_MAX_T and router_weight.shape[0] <= SELECT_MAX_E
            and router_weight.dtype in (torch.bfloat16, torch.float32) and norm_route_choice() == "fused")


@triton_op("dsv3::add_rms_norm_quant_route", mutates_args=())
def add_rms_norm_quant_route(
    h: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, router_weight: torch.Tensor,
    bias: Optional[torch.Tensor], top_k: int, n_group: int, topk_group: int, sigmoid: bool, group_top2: bool,
    norm_topk_prob: bool, routed_scaling_factor: float, n_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (h, delta, norm_weight, eps, router_weight, bias, top_k, n_group, topk_group, sigmoid, group_top2,
            norm_topk_prob, routed_scaling_factor, n_shared)
    if not _fusable(h, router_weight):
        return add_rms_norm_quant_route_reference(*args)
    return add_rms_norm_quant_route_triton(*args)


@add_rms_norm_quant_route.register_fake
def _add_rms_norm_quant_route_fake(h, delta, norm_weight, eps, router_weight, bias, top_k, n_group, topk_group,
                                   sigmoid, group_top2, norm_topk_prob, routed_scaling_factor, n_shared=0):
    torch._check(delta.shape == h.shape and norm_weight.shape[0] == h.shape[-1]
                 and router_weight.shape[1] == h.shape[-1],
                 lambda: f"add_rms_norm_quant_route: h {tuple(h.shape)}, delta {tuple(delta.shape)}, norm weight "
                         f"{tuple(norm_weight.shape)}, router weight {tuple(router_weight.shape)} do not match")
    check_route_args(router_weight.shape[0], top_k, n_group, topk_group, group_top2, n_shared)
    shape = h.shape
    t = h.numel() // shape[-1]
    k = top_k + n_shared
    return (h.new_empty(shape), h.new_empty(shape), h.new_empty(shape, dtype=FP8_DTYPE),
            h.new_empty((*shape[:-1], cdiv(shape[-1], BLOCK)), dtype=torch.float32),
            h.new_empty((t, k), dtype=torch.int64), h.new_empty((t, k), dtype=torch.float32))


__all__ = ["add_rms_norm_quant_route", "add_rms_norm_quant_route_reference", "add_rms_norm_quant_route_triton"]
