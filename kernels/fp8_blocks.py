"""DeepSeek FP8 block format, in plain PyTorch: the exact arithmetic every FP8 kernel is checked against.

Weights: e4m3fn values `Wq[N, K]` with fp32 multipliers `S[ceil(N/128), ceil(K/128)]` (the checkpoint's
`weight_scale_inv`), `W ~= Wq * S[i // 128, j // 128]`. Edge blocks may be partial (N=576, K=10944): their scale
is computed over the elements that exist, as if the block were zero-padded to 128.
Activations: per token, per 128 channels, `s = max(amax, 1e-4) / 448`, `xq = cast_e4m3fn(x / s)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128
FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
# DeepSeek's act_quant clamps amax so an all-zero block gets a finite scale.
ACT_AMAX_FLOOR = 1e-4


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to_blocks(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    pad: list[int] = []
    for d in range(x.dim() - 1, -1, -1):
        size = x.shape[d]
        pad += [0, (-size) % BLOCK if d in dims else 0]
    return F.pad(x, pad) if any(pad) else x


def _block_of(size: int, device: torch.device) -> torch.Tensor:
    """Element index -> block index, for expanding block scales by gathering.

    Truncating division on purpose: Inductor's CPU code for the floor-division form (`arange // 128`, and also
    repeat_interleave + slice) read wrong elements whenever the size ended in a partial block (torch 2.13;
    tests/test_ops_reference.py keeps the regression test). The indices are non-negative, so both agree.
    """
    return torch.div(torch.arange(size, device=device), BLOCK, rounding_mode="trunc")


def expand_block_scales(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[..., ceil(N/128), ceil(K/128)] block scales -> [..., N, K] element scales."""
    n, k = shape[-2], shape[-1]
    return scale.index_select(-2, _block_of(n, scale.device)).index_select(-1, _block_of(k, scale.device))


def dequantize_weight(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 weight [..., N, K] + block scales -> dense `dtype` weight (computed in fp32, rounded once)."""
    return (weight.float() * expand_block_scales(scale_inv.float(), tuple(weight.shape))).to(dtype)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense weight [..., N, K] -> (e4m3fn [..., N, K], fp32 scales [..., ceil(N/128), ceil(K/128)])."""
    *lead, n, k = w.shape
    wp = _pad_to_blocks(w.float(), (w.dim() - 2, w.dim() - 1))
    nb, kb = wp.shape[-2] // BLOCK, wp.shape[-1] // BLOCK
    blocks = wp.reshape(*lead, nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-12)
    # a tensor divisor, as in quantize_activation: CUDA divides by a Python scalar as a multiply by its reciprocal
    # (one ulp off amax / 448 in some blocks), so `convert --dtype fp8` on a GPU would write other scales than on a CPU
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(*lead, nb * BLOCK, kb * BLOCK)[..., :n, :k].to(FP8_DTYPE)
    return q.contiguous(), scale.contiguous()


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3fn [..., K], fp32 scales [..., ceil(K/128)]): per token, per 128 channels."""
    k = x.shape[-1]
    xf = x.float()
    # Whole blocks and the partial tail separately (no padding copy).
    full = k - k % BLOCK
    amax = [xf[..., :full].unflatten(-1, (full // BLOCK, BLOCK)).abs().amax(dim=-1)] if full else []
    if full < k:
        amax.append(xf[..., full:].abs().amax(dim=-1, keepdim=True))
    amax = torch.cat(amax, dim=-1).clamp_min(ACT_AMAX_FLOOR)
    # A tensor divisor: CUDA turns division by a Python scalar into a multiply by its (inexact) reciprocal, one ulp
    # off amax / 448, which moves activations sitting on e4m3 ties; the Triton kernels divide exactly (div_rn).
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (xf / scale.index_select(-1, _block_of(k, x.device))).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_activation(xq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return xq.float() * scale.index_select(-1, _block_of(xq.shape[-1], xq.device))
