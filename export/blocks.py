"""Plain-PyTorch versions of the dense DeepSeek blocks, built for ONNX export.

Every weight is a dense float tensor at the export dtype (FP8 projections are dequantized with their block scales
when the block is built), so neither a `torch.ops.dsv3.*` op nor an fp8 tensor reaches the exporter. Attention is
the no-cache prefill form: plain causal attention over the input sequence, written with matmul/softmax (naive MLA:
keys and values decompressed from the normalized latent by kv_b_proj), the same arithmetic as the model's absorbed
form up to rounding.

The modules are nested as `model.layers.<i>.<...>` so every parameter's fully qualified name equals the checkpoint
tensor name (e.g. `model.layers.0.self_attn.q_a_proj.weight`); the exporter turns those names into the ONNX
initializer names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ConfigError, ModelConfig
from dsv3.model import select_experts
from dsv3.rope import apply_rope, attention_factor, inverse_frequencies, softmax_scale

BLOCKS = ("attention", "dense-mlp", "shared-expert", "dense-layer", "router")

# name -> dense float32 tensor (FP8 weights already dequantized)
TensorGetter = Callable[[str], torch.Tensor]


class ExportError(ConfigError):
    """The requested block cannot be exported for this layer/config; the message says why."""


def _param(t: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(t.to(dtype).contiguous(), requires_grad=False)


@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 weight as stored (e4m3 + block scales), for `--keep-fp8` exports."""

    weight: torch.Tensor
    scale_inv: torch.Tensor


class Fp8Linear(nn.Module):
    """Calls the project op `dsv3.fp8_linear`; the exporter maps it to plain ONNX (export.translations)."""

    def __init__(self, w: Fp8Weight):
        super().__init__()
        self.weight = nn.Parameter(w.weight, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(w.scale_inv.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dsv3.fp8_linear(x, self.weight, self.weight_scale_inv)


def _linear(value: torch.Tensor | Fp8Weight, dtype: torch.dtype) -> nn.Module:
    return Fp8Linear(value) if isinstance(value, Fp8Weight) else Linear(_param(value, dtype))


class Linear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    """As dsv3.model.RMSNorm: normalise in fp32, round to the activation dtype, then scale."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, get: TensorGetter, prefix: str, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = _linear(get(f"{prefix}.gate_proj.weight"), dtype)
        self.up_proj = _linear(get(f"{prefix}.up_proj.weight"), dtype)
        self.down_proj = _linear(get(f"{prefix}.down_proj.weight"), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """MLA prefill without a cache: q (LoRA or direct), kv LoRA, norms, RoPE/YaRN, causal softmax, o_proj."""

    def __init__(self, cfg: ModelConfig, get: TensorGetter, prefix: str, dtype: torch.dtype):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = softmax_scale(cfg)
        self.rope_factor = attention_factor(cfg)
        eps = cfg.rms_norm_eps
        w = lambda n: _param(get(f"{prefix}.{n}.weight"), dtype)  # noqa: E731
        lin = lambda n: _linear(get(f"{prefix}.{n}.weight"), dtype)  # noqa: E731
        if cfg.q_lora_rank is None:
            self.q_proj = lin("q_proj")
        else:
            self.q_a_proj = lin("q_a_proj")
            self.q_a_layernorm = RMSNorm(w("q_a_layernorm"), eps)
            self.q_b_proj = lin("q_b_proj")
        self.kv_a_proj_with_mqa = lin("kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(w("kv_a_layernorm"), eps)
        self.kv_b_proj = lin("kv_b_proj")
        self.o_proj = lin("o_proj")
        # YaRN inverse frequencies (fp32); cos/sin are computed in the graph from arange(seq).
        self.register_buffer("rope_inv_freq", inverse_frequencies(cfg).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        h, nope, rope, vd = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(bsz, seqlen, h, nope + rope)
        q_nope, q_pe = q.split([nope, rope], dim=-1)

        pos = torch.arange(seqlen, device=x.device)
        freqs = pos.float().unsqueeze(-1) * self.rope_inv_freq  # [S, R/2]
        cos = (freqs.cos() * self.rope_factor).unsqueeze(0)  # [1, S, R/2], broadcast over the batch
        sin = (freqs.sin() * self.rope_factor).unsqueeze(0)
        q_pe = apply_rope(q_pe, cos, sin)  # [B, S, H, R]

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, rope], dim=-1)
        k_pe = apply_rope(k_pe, cos, sin)  # [B, S, R], shared by all heads
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(bsz, seqlen, h, nope + vd)
        k_nope, v = kv.split([nope, vd], dim=-1)

        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, S, nope+R]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(bsz, seqlen, h, rope)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # [B, H, S, V]
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.softmax_scale  # [B, H, S, S] fp32
        future = pos.unsqueeze(0) > pos.unsqueeze(1)  # [S(q), S(k)]: key after query
        scores = scores.masked_fill(future, float("-inf"))
        probs = scores.softmax(dim=-1).to(x.dtype)
        o = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, seqlen, h * vd)
        return self.o_proj(o)


class Router(nn.Module):
    """As dsv3.model.Router, on [B, S, D]: outputs topk_idx [B, S, k] (int64) and topk_weight [B, S, k] (fp32)."""

    def __init__(self, cfg: ModelConfig, get: TensorGetter, prefix: str):
        super().__init__()
        self.cfg = cfg
        self.weight = _param(get(f"{prefix}.weight"), torch.float32)  # scores are computed in fp32, as the model
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = _param(get(f"{prefix}.e_score_correction_bias"), torch.float32)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, seqlen, dim = x.shape
        idx, weight = select_experts(F.linear(x.reshape(-1, dim).float(), self.weight), self.e_score_correction_bias,
                                     self.cfg)
        k = self.cfg.num_experts_per_tok
        return idx.view(bsz, seqlen, k), weight.view(bsz, seqlen, k)


class _Holder(nn.Module):
    pass


class ExportBlock(nn.Module):
    """Root module: `self.model.layers[str(i)]` holds the block's submodules under their checkpoint names."""

    def __init__(self, cfg: ModelConfig, block: str, layer: int, get: TensorGetter, dtype: torch.dtype):
        super().__init__()
        check_block(cfg, block, layer)
        self.cfg, self.block, self.layer, self.dtype = cfg, block, layer, dtype
        prefix = f"model.layers.{layer}"
        lay = _Holder()
        if block in ("attention", "dense-layer"):
            lay.self_attn = Attention(cfg, get, f"{prefix}.self_attn", dtype)
        if block == "dense-layer":
            lay.input_layernorm = RMSNorm(_param(get(f"{prefix}.input_layernorm.weight"), dtype), cfg.rms_norm_eps)
            lay.post_attention_layernorm = RMSNorm(_param(get(f"{prefix}.post_attention_layernorm.weight"), dtype),
                                                   cfg.rms_norm_eps)
        if block in ("dense-mlp", "dense-layer"):
            lay.mlp = MLP(get, f"{prefix}.mlp", dtype)
        if block in ("shared-expert", "router"):
            lay.mlp = _Holder()
            if block == "shared-expert":
                lay.mlp.shared_experts = MLP(get, f"{prefix}.mlp.shared_experts", dtype)
            else:
                lay.mlp.gate = Router(cfg, get, f"{prefix}.mlp.gate")
        self.model = _Holder()
        self.model.layers = nn.ModuleDict({str(layer): lay})
        self.requires_grad_(False)

    @property
    def input_names(self) -> list[str]:
        return ["hidden_states"]

    @property
    def output_names(self) -> list[str]:
        return ["topk_idx", "topk_weight"] if self.block == "router" else ["output"]

    def forward(self, x: torch.Tensor):
        lay = self.model.layers[str(self.layer)]
        if self.block == "attention":
            return lay.self_attn(x)
        if self.block == "dense-mlp":
            return lay.mlp(x)
        if self.block == "shared-expert":
            return lay.mlp.shared_experts(x)
        if self.block == "router":
            return lay.mlp.gate(x)
        h = x + lay.self_attn(lay.input_layernorm(x))
        return h + lay.mlp(lay.post_attention_layernorm(h))


def check_block(cfg: ModelConfig, block: str, layer: int) -> None:
    if block not in BLOCKS:
        raise ExportError(f"unknown block {block!r}: choose one of {', '.join(BLOCKS)}")
    if not 0 <= layer < cfg.num_hidden_layers:
        raise ExportError(f"layer {layer} does not exist: the model has num_hidden_layers = {cfg.num_hidden_layers}")
    moe = cfg.is_moe_layer(layer)
    where = f" ({cfg.name})" if cfg.name else ""
    if block in ("dense-mlp", "dense-layer") and moe:
        raise ExportError(
            f"--block {block}: layer {layer} is an MoE layer{where} (first_k_dense_replace = "
            f"{cfg.first_k_dense_replace}, moe_layer_freq = {cfg.moe_layer_freq}); dense blocks exist only in "
            f"layers < {cfg.first_k_dense_replace}. Use --block shared-expert or router for MoE layers.")
    if block in ("shared-expert", "router") and not moe:
        raise ExportError(
            f"--block {block}: layer {layer} is a dense layer{where} (first_k_dense_replace = "
            f"{cfg.first_k_dense_replace}); routers and shared experts exist only in MoE layers "
            f"(layer >= {cfg.first_k_dense_replace}).")
    if block == "shared-expert" and not cfg.n_shared_experts:
        raise ExportError(f"--block shared-expert: the config{where} has n_shared_experts = 0")

