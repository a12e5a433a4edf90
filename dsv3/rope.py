"""Rotary position embedding for DeepSeek's decoupled rope dims, with YaRN, as Hugging Face computes it.

HF (and the remote code) apply YaRN whatever the cache length; DeepSeek's own inference code switches it off when
max_seq_len <= 4096. We follow HF so logits match `DeepseekV3ForCausalLM` (spec: dsv3_architecture.md, 5 and 6.4).
"""

from __future__ import annotations

import math

import torch

from dsv3.config import ModelConfig, yarn_mscale


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """theta'_j for j in [0, rope_dim/2): plain RoPE, or YaRN's blend of extrapolated and interpolated bands."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    ys = cfg.rope_scaling
    if ys is None:
        return extrapolated
    interpolated = 1.0 / (ys.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(ys.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(ys.beta_fast), correction_dim(ys.beta_slow)
    if ys.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: high-frequency band kept as is; 0: low-frequency band divided by `factor`
    return interpolated * (1 - keep) + extrapolated * keep


def attention_factor(cfg: ModelConfig) -> float:
    """HF multiplies cos/sin by this (1.0 for V3 and V2-Lite, where mscale == mscale_all_dim)."""
    ys = cfg.rope_scaling
    if ys is None:
        return 1.0
    if ys.mscale and ys.mscale_all_dim:
        return yarn_mscale(ys.factor, ys.mscale) / yarn_mscale(ys.factor, ys.mscale_all_dim)
    return yarn_mscale(ys.factor)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim ** -0.5
    ys = cfg.rope_scaling
    if ys is not None and ys.mscale_all_dim:
        m = yarn_mscale(ys.factor, ys.mscale_all_dim)
        scale *= m * m
    return scale


def rope_tables(cfg: ModelConfig, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_seq_len, rope_dim/2] in fp32 (on the default device), times the YaRN attention factor."""
    inv = inverse_frequencies(cfg)
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv)
    f = attention_factor(cfg)
    return freqs.cos() * f, freqs.sin() * f


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) by position; the output is de-interleaved (evens then odds).

    q and k get the same permutation, so their dot products equal those of DeepSeek's interleaved layout; this is
    the layout HF uses and it needs no complex numbers (fine for compile, export and ONNX).
    x: [..., S, (heads,) R]; cos/sin: [B, S, R/2], broadcast over the head dim when x has one.
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
