"""DeepSeek-V2/V3 for inference, written for `torch.compile(fullgraph=True)`.

One readable file, each block as in the papers: MLA attention (absorbed, over a static latent cache), dense SwiGLU
MLP for the first layers, DeepSeekMoE after. Shapes are static; cache writes and positions are driven by the
`input_pos` tensor; nothing in forward reads a tensor value on the host. The hot ops are `torch.ops.dsv3.*`
(dsv3.kernels). The model knows nothing of parallelism: tensor/expert parallel is applied to a built model by
the runtime (it shards weights and inserts collectives).

Parameter names equal the Hugging Face checkpoint names without the leading `model.`, except the routed experts,
which are stacked per layer: `layers.{i}.mlp.experts.gate_proj` is [E, I, D] (checkpoint: one tensor per expert).
The runtime may lay a built model out further for its kernels (MoE.stack_shared_, MLA.fuse_input_projections_,
MLP.fuse_gate_up_, Transformer.add_prefill_copies_); the loader maps the checkpoint's tensors into that layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import dsv3.kernels  # noqa: F401  (registers torch.ops.dsv3.*)
from dsv3.config import ModelConfig, ceil_div
from dsv3.kernels._launch import static_int
from dsv3.kernels.fp8_blocks import BLOCK, FP8_DTYPE, dequantize_weight
from dsv3.kernels.fp8_linear import GEMV_MAX_M
from dsv3.kernels.fp8_swiglu import QUANTIZED_X_K_BLOCKS, takes_quantized_x
from dsv3.kernels.mla_attention import DECODE_MAX_S
from dsv3.kernels.mla_prefill import cache_sequences, cached_prefill_choice
from dsv3.kernels.moe_residual_norm import moe_residual_choice
from dsv3.kernels.rms_norm import norm_quant_choice, rms_norm_rounded
from dsv3.kernels.router import route_args, select_experts_reference
from dsv3.kernels.routed_experts import DECODE_MAX_T, combine_pairs, moe_combine_choice
from dsv3.rope import rope_tables, softmax_scale


# Buffers of Transformer.add_prefill_copies_ (weights rearranged for the prefill at load): decode graphs never read them
PREFILL_COPIES = ("kv_b_dequantized", "slots_down_packed", "slots_down_packed_scale_inv", "slots_gate_up_packed",
                  "slots_gate_up_packed_scale_inv")

# Activations of one-token steps in FP8 layers (Transformer.set_batch1_activations_)
BATCH1_ACTIVATIONS = ("fp8", "bf16")


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Weights are allocated, never initialised here: they come from a checkpoint (or init-random).
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T: plain for dense weights, dsv3.fp8_linear for FP8 weights with their 128x128 block scales."""
    if weight_scale_inv is None:
        return F.linear(x, weight)
    return torch.ops.dsv3.fp8_linear(x, weight, weight_scale_inv)


class Linear(nn.Module):
    """Bias-free linear layer; FP8 weights (with their block scales) stay FP8 and go through dsv3.fp8_linear, or
    dsv3.fp8_linear_a16 for one-token inputs when the model is built with bf16 batch-1 activations
    (Transformer.set_batch1_activations_)."""

    one_token_a16 = False  # set per instance by Transformer.set_batch1_activations_

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, fp8: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _empty(out_features, in_features, dtype=FP8_DTYPE if fp8 else dtype)
        if fp8:
            scale_shape = (ceil_div(out_features, BLOCK), ceil_div(in_features, BLOCK))
            self.register_buffer("weight_scale_inv", torch.empty(scale_shape, dtype=torch.float32))
        else:
            self.weight_scale_inv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_token_a16 and self.weight_scale_inv is not None and _static_tokens(x) == 1:
            return torch.ops.dsv3.fp8_linear_a16(x, self.weight, self.weight_scale_inv)
        return linear(x, self.weight, self.weight_scale_inv)



def _static_tokens(x: torch.Tensor) -> int | None:
    """Tokens in x ([..., D]): the product of the leading sizes, or None when dynamic (the prefill graph)."""
    m = 1
    for size in x.shape[:-1]:
        m = m * size
    return static_int(m)


def _gemm_sized(x: torch.Tensor) -> bool:
    """More tokens than the FP8 decode GEMV takes (or a dynamic count: the prefill graph): dsv3.fp8_linear runs
    a GEMM (cuBLAS when N and K are multiples of 128)."""
    m = _static_tokens(x)
    return m is None or m > GEMV_MAX_M


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _empty(dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF rounding (normalise in fp32, round to the activation dtype, then scale) so logits match transformers.
        return rms_norm_rounded(x, self.weight, self.eps)


class MLA(nn.Module):
    """Multi-head latent attention, absorbed form: the cache holds kv_norm(c_kv) and roped k_pe per token."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_batch_size: int, max_seq_len: int):
        super().__init__()
        fp8 = cfg.is_fp8
        self.num_heads = cfg.num_attention_heads  # the runtime's tensor-parallel pass sets the per-rank count
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.softmax_scale = softmax_scale(cfg)
        self.qkv_a_rows: dict[str, tuple[int, int]] = {}  # set by fuse_input_projections_
        q_out = cfg.num_attention_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, q_out, dtype, fp8)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, dtype, fp8)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out, dtype, fp8)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype, fp8)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                dtype, fp8)
        self.o_proj = Linear(cfg.num_attention_heads * cfg.v_head_dim, cfg.hidden_size, dtype, fp8)
        self.register_buffer(
            "latent_cache", torch.zeros(max_batch_size, max_seq_len, cfg.latent_dim, dtype=dtype), persistent=False
        )

    def forward(self, x: torch.Tensor | None, input_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache_rows: torch.Tensor | None = None, first_chunk: bool = False,
                x_quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: the normed input [B, S, D]; or None with x_quantized = (x_q, x_scale), x already quantized for the FP8
        input projections in cuBLAS's layout (dsv3.moe_residual_norm_quant, Block.defer_moe_add)."""
        bsz, seqlen = input_pos.shape
        if x_quantized is not None:
            outs = [torch.ops.dsv3.fp8_linear_quantized(*x_quantized, bsz * seqlen, proj.weight, proj.weight_scale_inv,
                                                        self.latent_cache.dtype).view(bsz, seqlen, -1)
                    for proj in self.input_projections()]
            q_first, kv_a = (outs[0].split([n for _, n in self.qkv_a_rows.values()], dim=-1) if self.qkv_a_rows
                             else outs)
        elif self.qkv_a_rows:
            # both input projections in one linear (fuse_input_projections_): one GEMV at decode, one cuBLAS GEMM at
            # prefill (its ragged N, q rows + kv_a's 576, padded to whole blocks by dsv3.fp8_linear)
            q_first, kv_a = self.qkv_a_proj(x).split([n for _, n in self.qkv_a_rows.values()], dim=-1)
        else:
            q_first = (self.q_proj if self.q_lora_rank is None else self.q_a_proj)(x)
            kv_a = self.kv_a_proj_with_mqa(x)
        q = q_first if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q_first))
        q = q.view(bsz, seqlen, self.num_heads, self.nope_dim + self.rope_dim)
        # Absorb W_UK into the query and W_UV into the output, so attention runs in the 512-wide latent space.
        # Both are slices of kv_b_proj, read in place (FP8 at decode: no per-step dequantized copy).
        kv_b = self.kv_b_proj
        if not self._prefill_form(seqlen, cache_rows):  # decode, speculative verify: absorbed attention
            # The steps of the prefill branch below (q/k RoPE, kv_a_layernorm, the cache write of cat(c_kv, k_pe)
            # at input_pos in rows 0..B-1) plus the W_UK absorption, as one op (dsv3.kernels.mla_decode_prep):
            # one launch on CUDA (by default; DSV3_DECODE_PREP=torch: the five of the composition).
            q_latent, q_pe = torch.ops.dsv3.mla_decode_prep(
                q, kv_a, self.kv_a_layernorm.weight, cos, sin, self.latent_cache, input_pos, kv_b.weight,
                kv_b.weight_scale_inv, self.kv_a_layernorm.eps, self.nope_dim, self.v_dim)
            # attention over the latent cache and W_UV on its output (dsv3.kernels.mla_attention_out: on CUDA the
            # W_UV kernel merges flash-decoding's splits itself; DSV3_ATTN_OUT=two: mla_attention + mla_absorb)
            o = torch.ops.dsv3.mla_attention_out(q_latent, q_pe, self.latent_cache[:bsz], input_pos,
                                                 self.softmax_scale, kv_b.weight, kv_b.weight_scale_inv,
                                                 self.nope_dim, self.v_dim)
            return self.o_proj(o.reshape(bsz, seqlen, self.num_heads * self.v_dim))

        # q/k RoPE, kv_a_layernorm and the cache write of cat(c_kv, k_pe) at input_pos, in cache row b of batch row
        # b or in cache_rows[b] (prefill of one sequence into its slot), as one op (dsv3.kernels.mla_decode_prep:
        # one launch on CUDA; DSV3_PREFILL_PREP=torch: the composition, four Inductor kernels)
        q_nope = q[..., :self.nope_dim]
        q_pe, latent = torch.ops.dsv3.mla_prefill_prep(q, kv_a, self.kv_a_layernorm.weight, cos, sin,
                                                       self.latent_cache, input_pos, cache_rows,
                                                       self.kv_a_layernorm.eps, self.nope_dim)
        # prefill. A first chunk has no prefix: its graph attends the chunk's own keys only.
        return self._prefill_attention(q_nope, q_pe, latent, input_pos, cache_rows, first_chunk)

    @staticmethod
    def _prefill_form(seqlen, cache_rows: torch.Tensor | None) -> bool:
        """Prefill form for a prefill call into chosen cache rows (the runtime's prefill graph, any chunk length) and
        for more than DECODE_MAX_S tokens per row; absorbed attention for decode and speculative verify. The
        cache_rows test comes first: under torch.compile a dynamic length is a SymInt that dynamo treats as an int,
        and comparing it would specialize the graph to one side of the threshold (a recompile at 17 tokens)."""
        if cache_rows is not None:
            return True
        s_static = static_int(seqlen)
        return s_static is None or s_static > DECODE_MAX_S

    def _prefill_attention(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                           input_pos: torch.Tensor, cache_rows: torch.Tensor | None,
                           first_chunk: bool) -> torch.Tensor:
        """Attention of a prefill chunk (consecutive positions per row), dsv3.kernels.mla_prefill, in naive form:
        keys and values decompressed by kv_b_proj (640 instead of 2176 FLOPs per query-key pair and head on V3
        shapes), attended causally. A first chunk: the chunk's own keys. A chunk that continues its sequences
        (cache sequences cache_rows, else 0..B-1; `cached_prefill_choice`): one op,
        dsv3.mla_cached_prefill_attention, decompresses the cache rows up to the chunk's last position (the prefix
        and the chunk, written by the prep op) and attends over them, reading the sequences' rows of the whole cache
        in place; otherwise (DSV3_PREFILL_PREFIX=absorbed, caches too large to decompress) the prefix is attended in
        absorbed form over a gathered copy of the sequences' cache rows and merged with the chunk's keys through its
        log-sum-exp. kv_b_proj is used dequantized to the activation dtype (as decode's absorption uses it), not
        through the FP8 linear: no activation quantization of the latent; the dequantized weight is kept since load
        by add_prefill_copies_, else dequantized here once per call. Returns o_proj of the attention: with FP8 o_proj
        weights one op (on CUDA the attention kernel quantizes o_proj's input itself)."""
        bsz, seqlen = latent.shape[:2]
        kv_b = self.kv_b_proj
        w = getattr(self, "kv_b_dequantized", None)  # add_prefill_copies_: dequantized at load
        if w is None:
            w = kv_b.weight if kv_b.weight_scale_inv is None else dequantize_weight(kv_b.weight, kv_b.weight_scale_inv,
                                                                                    latent.dtype)
        w = w.to(latent.dtype)
        o_proj = self.o_proj
        o_fp8 = o_proj.weight_scale_inv is not None and not (o_proj.one_token_a16 and static_int(bsz * seqlen) == 1)
        if not first_chunk and cached_prefill_choice(self.latent_cache, bsz, self.num_heads, self.nope_dim,
                                                     self.v_dim):
            # A continued sequence: its rows up to the chunk's last position (the prefix and the chunk, which the
            # prep op has just written) decompressed, one causal attention over them. The absorbed prefix below
            # costs 2 * (2 * C + R) FLOPs per query-key pair and head against 2 * (Dn + R + Dv) here (V3 shapes:
            # 2176 against 640) plus the decompression of each prefix row once per chunk.
            args = (q_nope, q_pe, self.latent_cache, input_pos, w, self.softmax_scale, self.nope_dim, self.v_dim)
            if o_fp8:
                return torch.ops.dsv3.mla_cached_prefill_attention_o_proj(*args, o_proj.weight, o_proj.weight_scale_inv,
                                                                          cache_rows)
            o = torch.ops.dsv3.mla_cached_prefill_attention(*args, cache_rows)
            return o_proj(o.reshape(bsz, seqlen, self.num_heads * self.v_dim))
        kv = F.linear(latent[..., :self.kv_lora_rank], w)
        k_nope, v = kv.view(bsz, seqlen, self.num_heads, self.nope_dim + self.v_dim).split(
            [self.nope_dim, self.v_dim], dim=-1)
        k_pe = latent[..., self.kv_lora_rank:]
        prefix = ()
        if not first_chunk:
            cache = cache_sequences(self.latent_cache, bsz, cache_rows)
            q_latent = torch.ops.dsv3.mla_absorb(q_nope, w, None, self.nope_dim, self.v_dim, False)
            prefix_latent, prefix_lse = torch.ops.dsv3.mla_prefix_attention(q_latent, q_pe, cache, input_pos,
                                                                            self.softmax_scale)
            prefix = (torch.ops.dsv3.mla_absorb(prefix_latent, w, None, self.nope_dim, self.v_dim, True), prefix_lse)
        if o_fp8:
            return torch.ops.dsv3.mla_prefill_attention_o_proj(q_nope, q_pe, k_nope, k_pe, v, input_pos,
                                                               self.softmax_scale, o_proj.weight,
                                                               o_proj.weight_scale_inv, *prefix)
        o = torch.ops.dsv3.mla_prefill_attention(q_nope, q_pe, k_nope, k_pe, v, input_pos, self.softmax_scale,
                                                 *prefix)
        return o_proj(o.reshape(bsz, seqlen, self.num_heads * self.v_dim))

    def add_prefill_copies_(self) -> None:
        """FP8: keep kv_b_proj dequantized to the activation dtype as a buffer (`kv_b_dequantized`, filled from the
        weight by refresh_prefill_copies_), which the prefill's decompression and absorptions read instead of
        dequantizing the weight on every call (16B: 4 MB per layer, ~4 us per layer and call on the H200; decode
        keeps reading the FP8 weight). Call on a laid-out (sharded) model before it is materialised or loaded."""
        kv_b = self.kv_b_proj
        if kv_b.weight_scale_inv is None or hasattr(self, "kv_b_dequantized"):
            return
        self.register_buffer("kv_b_dequantized", torch.empty(kv_b.weight.shape, dtype=self.latent_cache.dtype,
                                                             device=kv_b.weight.device), persistent=False)

    def refresh_prefill_copies_(self) -> None:
        if hasattr(self, "kv_b_dequantized"):
            kv_b = self.kv_b_proj
            self.kv_b_dequantized.copy_(dequantize_weight(kv_b.weight, kv_b.weight_scale_inv,
                                                          self.kv_b_dequantized.dtype))

    def input_projections(self) -> list[Linear]:
        """The linears that read x: qkv_a_proj when fused, else q_proj (q_a_proj) and kv_a_proj_with_mqa."""
        if self.qkv_a_rows:
            return [self.qkv_a_proj]
        return [self.q_proj if self.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa]

    def can_fuse_input_projections(self) -> bool:
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        return first.weight_scale_inv is None or first.out_features % BLOCK == 0

    def fuse_input_projections_(self) -> None:
        """q_proj (or q_a_proj) and kv_a_proj_with_mqa read the same x: keep them as one linear of their stacked rows
        (`qkv_a_proj`), so a decode step quantizes x once and launches one GEMV instead of two. With FP8 the q rows
        must end on a 128-block boundary so the stacked scale grid stays the two grids one after the other. Call on
        a fresh model (after sharding: the rows are this rank's); the loader fills the rows (`qkv_a_rows`)."""
        if self.qkv_a_rows:
            return
        if not self.can_fuse_input_projections():
            raise ValueError("the q projection's rows do not end on an FP8 128-block boundary")
        name = "q_proj" if self.q_lora_rank is None else "q_a_proj"
        first, kv = getattr(self, name), self.kv_a_proj_with_mqa
        fp8 = first.weight_scale_inv is not None
        with torch.device(first.weight.device):
            self.qkv_a_proj = Linear(first.in_features, first.out_features + kv.out_features, first.weight.dtype, fp8)
        self.qkv_a_rows = {name: (0, first.out_features), "kv_a_proj_with_mqa": (first.out_features, kv.out_features)}
        delattr(self, name)
        del self.kv_a_proj_with_mqa


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, inter: int, dtype: torch.dtype, fp8: bool):
        super().__init__()
        self.gate_proj = Linear(dim, inter, dtype, fp8)
        self.up_proj = Linear(dim, inter, dtype, fp8)
        self.down_proj = Linear(inter, dim, dtype, fp8)
        self.gate_up_rows: dict[str, tuple[int, int]] = {}  # set by fuse_gate_up_

    def fp8_swiglu_weights(self) -> tuple[torch.Tensor, ...] | None:
        """(gate_w, gate_s, up_w, up_s, down_w, down_s) as dsv3.fp8_swiglu takes them (FP8), else None. up_w, up_s
        None: gate_w is the fused gate / up weight (fuse_gate_up_), one cuBLAS GEMM for both."""
        down = self.down_proj
        if down.weight_scale_inv is None:
            return None
        if self.gate_up_rows:  # gate and up as one linear (fuse_gate_up_): the op takes it whole
            gate_up = (self.gate_up_proj.weight, self.gate_up_proj.weight_scale_inv, None, None)
        else:
            gate, up = self.gate_proj, self.up_proj
            gate_up = (gate.weight, gate.weight_scale_inv, up.weight, up.weight_scale_inv)
        return (*gate_up, down.weight.unsqueeze(0), down.weight_scale_inv.unsqueeze(0))

    def forward(self, x: torch.Tensor, x_q: torch.Tensor | None = None, x_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x_q / x_scale: x quantized in the layout dsv3.fp8_swiglu's cuBLAS path takes (MoE.quantizes_x_for_cublas)."""
        down = self.down_proj
        if down.weight_scale_inv is None or not _gemm_sized(x):
            if self.gate_up_rows:  # one GEMV at decode (fuse_gate_up_)
                gate, up = self.gate_up_proj(x).split([self.gate_up_rows["gate_proj"][1]] * 2, dim=-1)
                return down(F.silu(gate) * up)
            return down(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # FP8 at GEMM-sized M: x quantized once, SiLU-mul fused with h's quantization (dsv3.fp8_swiglu)
        return torch.ops.dsv3.fp8_swiglu(x, *self.fp8_swiglu_weights(), x_q, x_scale)

    def can_fuse_gate_up(self) -> bool:
        return self.gate_proj.weight_scale_inv is None or self.gate_proj.out_features % BLOCK == 0

    def fuse_gate_up_(self) -> None:
        """gate_proj and up_proj read the same x: keep them as one linear of their stacked rows (`gate_up_proj`), so
        a decode step launches one GEMV instead of two (671B at world size 8: the shared expert's two 256-row GEMVs,
        ~3.3 us each on the H200, in every MoE layer). With FP8 the gate rows must end on a 128-block boundary so the
        stacked scale grid stays the two grids one after the other. Call on a fresh model (after sharding: the rows
        are this rank's); the loader fills the rows (`gate_up_rows`)."""
        if self.gate_up_rows:
            return
        if not self.can_fuse_gate_up():
            raise ValueError("the gate projection's rows do not end on an FP8 128-block boundary")
        gate, up = self.gate_proj, self.up_proj
        fp8 = gate.weight_scale_inv is not None
        with torch.device(gate.weight.device):
            self.gate_up_proj = Linear(gate.in_features, 2 * gate.out_features, gate.weight.dtype, fp8)
        self.gate_up_rows = {"gate_proj": (0, gate.out_features), "up_proj": (gate.out_features, up.out_features)}
        del self.gate_proj, self.up_proj


class Router(nn.Module):
    """Expert selection. Scores and top-k in fp32 (as HF) so near-ties resolve the same way as the reference."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.route_args = route_args(cfg)  # the op's scalar arguments, computed once
        self.weight = _empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype)
        if cfg.topk_method == "noaux_tc":
            # Load-balancing bias: shifts which experts are chosen, never their weights. Always fp32.
            self.register_buffer("e_score_correction_bias", torch.empty(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor, n_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        # One op: fp32 logits, scoring, group limiting, top-k and weights (two kernels at decode, no weight copy).
        # n_shared appends always-on columns for shared experts stacked after the routed ones (weight 1).
        return torch.ops.dsv3.route(x, self.weight, self.e_score_correction_bias, **self.route_args,
                                    n_shared=n_shared)


def select_experts(logits: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] (fp32) -> (expert ids [T, k], combine weights [T, k]): scores, group limiting,
    top-k on the bias-shifted scores, weights from the unshifted ones, renormalisation, routed scaling
    (dsv3.kernels.router has the contract). Out-of-place ops only, so it exports to ONNX (dsv3.export)."""
    return select_experts_reference(logits, bias, **route_args(cfg))


class RoutedExperts(nn.Module):
    """All routed experts of a layer, stacked, so one op computes the selected ones with no host sync.
    `extra` more slots after them hold the shared experts when the layer stacks them (MoE.stack_shared_)."""

    one_token_a16 = False  # set per instance by Transformer.set_batch1_activations_

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, extra: int = 0):
        super().__init__()
        e, d, i = cfg.n_routed_experts + extra, cfg.hidden_size, cfg.moe_intermediate_size
        fp8 = cfg.is_fp8
        wdtype = FP8_DTYPE if fp8 else dtype
        self.gate_proj = _empty(e, i, d, dtype=wdtype)
        self.up_proj = _empty(e, i, d, dtype=wdtype)
        self.down_proj = _empty(e, d, i, dtype=wdtype)
        for name, (n, k) in (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i))):
            scale = torch.empty(e, ceil_div(n, BLOCK), ceil_div(k, BLOCK), dtype=torch.float32) if fp8 else None
            self.register_buffer(f"{name}_scale_inv", scale)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                x_q: torch.Tensor | None = None, x_scale: torch.Tensor | None = None) -> torch.Tensor:
        weights = (self.gate_proj, self.up_proj, self.down_proj,
                   self.gate_proj_scale_inv, self.up_proj_scale_inv, self.down_proj_scale_inv)
        # bf16 batch-1 activations (Transformer.set_batch1_activations_): one token's experts without activation
        # quantization (W8A16), x_q / x_scale then unused
        quant_act = not (self.one_token_a16 and self.down_proj_scale_inv is not None and _static_tokens(x) == 1)
        if moe_combine_choice() == "kernel":
            return torch.ops.dsv3.routed_experts(x, topk_idx, topk_weight, *weights, x_q, x_scale, quant_act)
        # The weighted sum over each token's experts as plain torch ops: Inductor fuses it into the kernel that
        # consumes the output (the residual add and the next layer's RMSNorm), one launch less per MoE layer.
        return combine_pairs(self.pairs(x, topk_idx, x_q, x_scale, quant_act), topk_idx, topk_weight,
                             self.gate_proj.shape[0])

    def pairs(self, x: torch.Tensor, topk_idx: torch.Tensor, x_q: torch.Tensor | None = None,
              x_scale: torch.Tensor | None = None, quant_act: bool = True) -> torch.Tensor:
        """[T, K, D]: each selected expert's output per token, not yet weighted and summed (combine_pairs)."""
        weights = (self.gate_proj, self.up_proj, self.down_proj,
                   self.gate_proj_scale_inv, self.up_proj_scale_inv, self.down_proj_scale_inv)
        return torch.ops.dsv3.routed_experts_pairs(x, topk_idx, *weights, x_q, x_scale, quant_act)

    def _slot_rows(self, name: str, first: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slots [first, E) of gate_proj / up_proj as one [(E - first) * I, D] matrix (a view) and its scales."""
        w, s = getattr(self, name), getattr(self, f"{name}_scale_inv")
        return w[first:].flatten(0, 1), None if s is None else s[first:].flatten(0, 1)

    def slots_fp8_swiglu_weights(self, first: int) -> tuple[torch.Tensor, ...] | None:
        """Slots [first, E) as dsv3.fp8_swiglu's (gate_w, gate_s, up_w, up_s, down_w, down_s) (FP8), else None.
        With the prefill copies (add_prefill_copies_): the packed gate / up rows as one weight (up_w, up_s None)
        and the packed down projections as one."""
        if self.down_proj_scale_inv is None:
            return None
        if getattr(self, "slots_down_first", None) == first:  # add_prefill_copies_: packed since load
            return (self.slots_gate_up_packed, self.slots_gate_up_packed_scale_inv, None, None,
                    self.slots_down_packed.unsqueeze(0), self.slots_down_packed_scale_inv.unsqueeze(0))
        down, down_s = self.down_proj[first:], self.down_proj_scale_inv[first:]
        return (*self._slot_rows("gate_proj", first), *self._slot_rows("up_proj", first), down, down_s)

    def slots_as_mlp(self, x: torch.Tensor, first: int, x_q: torch.Tensor | None = None,
                     x_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Slots [first, E) applied to every token as one dense SwiGLU of width (E - first) * I, the sum of those
        experts' outputs (what the routed-experts op computes for slots every token selects with weight 1). The
        slots' gate / up rows are consecutive rows of one [(E - first) * I, D] matrix (a view; with FP8, I is a
        multiple of 128 so their block scales stack too; with the prefill copies, gate and up are one packed
        matrix, one GEMM); down takes each slot's own I input columns, summed.
        x_q / x_scale (FP8): x quantized in the layout dsv3.fp8_swiglu's cuBLAS path takes."""
        i = self.gate_proj.shape[1]
        weights = self.slots_fp8_swiglu_weights(first)
        if weights is not None:  # FP8: one op, the down slots as one GEMM (dsv3.fp8_swiglu)
            return torch.ops.dsv3.fp8_swiglu(x, *weights, x_q, x_scale)
        h = F.silu(linear(x, *self._slot_rows("gate_proj", first))) * linear(x, *self._slot_rows("up_proj", first))
        y = None
        for j, e in enumerate(range(first, self.gate_proj.shape[0])):
            part = linear(h[:, j * i:(j + 1) * i], self.down_proj[e], None)
            y = part if y is None else y + part
        return y

    def add_prefill_copies_(self, first: int) -> None:
        """FP8 with two or more slots [first, E) (stacked shared experts): keep their down projections side by side
        as `slots_down_packed` [D, Kp] (slot s in columns s*I .. (s+1)*I, then zero columns up to Kp, a multiple of 4
        blocks) with `slots_down_packed_scale_inv` (zero scales past the slots), and their gate rows then their up
        rows as one matrix, `slots_gate_up_packed` [2*S*I, D] with `slots_gate_up_packed_scale_inv`, filled from the
        slots by refresh_prefill_copies_. `slots_as_mlp` passes them to dsv3.fp8_swiglu as one down projection and
        one gate / up weight: otherwise every prefill call copies the down slots side by side and pads K for
        AOTInductor's cuBLAS call (16B: 6.3 MB per layer, ~12 us on the H200, whatever the prompt length), and runs
        gate and up as two GEMMs (16B: 11.5 MB per layer; one GEMM saves ~8 us at 384 tokens, ~10 us at 4096, the
        outputs bitwise equal). Decode reads the slots."""
        slots = self.gate_proj.shape[0] - first
        if self.down_proj_scale_inv is None or slots < 2 or hasattr(self, "slots_down_packed"):
            return
        d, i = self.down_proj.shape[1:]
        kp = ceil_div(slots * i, 4 * BLOCK) * 4 * BLOCK
        device = self.down_proj.device
        self.slots_down_first = first  # the first slot of both packed copies
        self.register_buffer("slots_down_packed", torch.empty(d, kp, dtype=FP8_DTYPE, device=device),
                             persistent=False)
        self.register_buffer("slots_down_packed_scale_inv", torch.empty(ceil_div(d, BLOCK), kp // BLOCK,
                                                                        dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("slots_gate_up_packed", torch.empty(2 * slots * i, d, dtype=FP8_DTYPE, device=device),
                             persistent=False)
        self.register_buffer("slots_gate_up_packed_scale_inv",
                             torch.empty(2 * slots * i // BLOCK, ceil_div(d, BLOCK), dtype=torch.float32,
                                         device=device), persistent=False)

    def refresh_prefill_copies_(self) -> None:
        if not hasattr(self, "slots_down_packed"):
            return
        w, s = self.down_proj[self.slots_down_first:], self.down_proj_scale_inv[self.slots_down_first:]
        slots, d, i = w.shape
        packed = self.slots_down_packed.view(torch.uint8)
        packed[:, :slots * i].copy_(w.view(torch.uint8).permute(1, 0, 2).reshape(d, slots * i))
        packed[:, slots * i:].zero_()
        scales, kb = self.slots_down_packed_scale_inv, slots * s.shape[2]
        scales[:, :kb].copy_(s.permute(1, 0, 2).reshape(s.shape[1], kb))
        scales[:, kb:].zero_()
        rows = slots * i  # the slots' gate rows, then their up rows
        gate_up, gate_up_s = self.slots_gate_up_packed.view(torch.uint8), self.slots_gate_up_packed_scale_inv
        for j, name in enumerate(("gate_proj", "up_proj")):
            w, s = self._slot_rows(name, self.slots_down_first)
            gate_up[j * rows:(j + 1) * rows].copy_(w.view(torch.uint8))
            gate_up_s[j * rows // BLOCK:(j + 1) * rows // BLOCK].copy_(s)


def can_stack_shared(cfg: ModelConfig) -> bool:
    """Whether the shared experts can live in extra slots of the routed-experts tensors: each shared expert is a
    moe_intermediate_size slice of the shared MLP, and with FP8 those slices must start on 128-block boundaries."""
    return cfg.n_shared_experts > 0 and cfg.n_routed_experts > 0 and (
        not cfg.is_fp8 or cfg.moe_intermediate_size % BLOCK == 0)


class MoEOutput(NamedTuple):
    """A prefill MoE layer's output not yet added to the residual stream (Block.defer_moe_add): the routed experts'
    per-pair outputs with their ids and weights (combine_pairs' inputs) and the stacked shared experts' output. The
    next block adds it inside its input norm's kernel (dsv3.moe_residual_norm_quant), which also quantizes the
    normed x for the attention's FP8 input projection: x is never written in bf16."""
    pairs: torch.Tensor
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    shared: torch.Tensor
    n_experts: int


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.gate = Router(cfg, dtype)
        self.experts = RoutedExperts(cfg, dtype)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.shared_intermediate_size, dtype, cfg.is_fp8) if cfg.n_shared_experts else None
        )
        self.n_shared_slots = 0  # shared experts stored as extra experts (stack_shared_)

    def stack_shared_(self) -> None:
        """Store the shared experts as n_shared_experts extra experts after the routed ones, so the routed-experts op
        computes them too (one launch sequence, every weight streamed by the same kernels). Exact in real
        arithmetic: the shared MLP of width S*I is the sum of S SwiGLU experts of width I (its intermediate split
        into S slices); the router appends them to every token with weight 1. Call on a fresh (meta or unloaded)
        model: the weights are allocated, not moved; the loader fills the slots (dsv3.checkpoint.load_state)."""
        cfg = self.gate.cfg
        if self.shared_experts is None or self.n_shared_slots:
            return
        if not can_stack_shared(cfg):
            raise ValueError(f"shared experts of width {cfg.moe_intermediate_size} cannot be stacked with FP8 "
                             f"128-blocks")
        device = self.experts.gate_proj.device
        with torch.device(device):
            # the router weight has the model's dtype (the experts' own may be FP8)
            self.experts = RoutedExperts(cfg, self.gate.weight.dtype, extra=cfg.n_shared_experts)
        self.shared_experts = None
        self.n_shared_slots = cfg.n_shared_experts

    def decode_sized(self, x: torch.Tensor) -> bool:
        """Decode-sized token count (static, <= DECODE_MAX_T): the router appends the stacked shared slots and the
        routed-experts op computes them; the caller may route together with the post-attention norm
        (dsv3.add_rms_norm_quant_route, which fuses the two for up to 4 tokens). Larger or dynamic counts: the
        prefill form below."""
        t = _static_tokens(x)
        return t is not None and t <= DECODE_MAX_T

    def quantizes_x_for_cublas(self, h: torch.Tensor) -> bool:
        """Whether this layer's x (h's shape) is quantized by dsv3.add_rms_norm_quant_cublas: prefill-sized T with the
        shared experts on cuBLAS (dsv3.fp8_swiglu, `takes_quantized_x`), so x is quantized once, by the norm, for
        them and the routed experts. Not with DSV3_NORM_QUANT=torch (the A/B baseline of the fused norm: the
        kernels it replaced, each op's own quantization)."""
        if self.decode_sized(h) or norm_quant_choice() == "torch":
            return False
        if self.n_shared_slots:
            weights = self.experts.slots_fp8_swiglu_weights(self.experts.gate_proj.shape[0] - self.n_shared_slots)
        else:
            weights = None if self.shared_experts is None else self.shared_experts.fp8_swiglu_weights()
        return weights is not None and takes_quantized_x(h, weights[4])

    def can_leave_unadded(self, x: torch.Tensor) -> bool:
        """Whether forward(..., unadded=True) returns a MoEOutput for x: prefill-sized T with the shared experts
        stacked and the routed pairs summed in the graph (DSV3_MOE_COMBINE=graph), unless DSV3_MOE_RESIDUAL=torch."""
        return (bool(self.n_shared_slots) and not self.decode_sized(x) and moe_combine_choice() == "graph"
                and moe_residual_choice() == "fused")

    def forward(self, x: torch.Tensor, x_q: torch.Tensor | None = None, x_scale: torch.Tensor | None = None,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None,
                x_scale_cublas: torch.Tensor | None = None, unadded: bool = False) -> torch.Tensor | MoEOutput:
        """x_q / x_scale: x already quantized for the FP8 experts (dsv3.add_rms_norm_quant's), else they do it; with
        x_scale_cublas, dsv3.add_rms_norm_quant_cublas's (`quantizes_x_for_cublas`): the shared experts take
        (x_q, x_scale_cublas), the routed experts (x_q, x_scale).
        routing: (topk_idx, topk_weight) as this layer's router computes them (with the stacked shared slots), when
        the caller already did (`decode_sized`).
        unadded (where `can_leave_unadded`): return the output's parts as a MoEOutput instead of their sum."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        t = flat.shape[0]
        # (the cuBLAS layout's padded x_q as it is: the routed experts read its first T rows and D columns; a slice
        # would make torch.export guard T <= Mp, which its solver cannot prove for a dynamic T)
        routed_q = () if x_q is None else (x_q if x_scale_cublas is not None else x_q.reshape(flat.shape),
                                            x_scale.reshape(t, -1))
        shared_q = () if x_scale_cublas is None else (x_q, x_scale_cublas)
        if self.n_shared_slots and not self.decode_sized(x):
            # Prefill-sized T: the stacked shared experts see every token, so they are a dense MLP there: cuBLAS
            # block-scaled GEMMs at M = T (~2.5x the grouped kernel's FLOP rate on the H200), the routed ones
            # grouped. Decode keeps them in the routed op (one launch sequence streams every expert's weights).
            first = self.experts.gate_proj.shape[0] - self.n_shared_slots
            topk_idx, topk_weight = self.gate(flat, 0)
            if unadded and self.can_leave_unadded(x):
                pairs = self.experts.pairs(flat, topk_idx, *routed_q)
                shared = self.experts.slots_as_mlp(flat, first, *shared_q).view(shape)
                return MoEOutput(pairs, topk_idx, topk_weight, shared, self.experts.gate_proj.shape[0])
            y = self.experts(flat, topk_idx, topk_weight, *routed_q) + self.experts.slots_as_mlp(flat, first, *shared_q)
            return y.view(shape)
        topk_idx, topk_weight = self.gate(flat, self.n_shared_slots) if routing is None else routing
        y = self.experts(flat, topk_idx, topk_weight, *routed_q).view(shape)
        return y if self.shared_experts is None else y + self.shared_experts(x, *shared_q)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, max_batch_size: int, max_seq_len: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLA(cfg, dtype, max_batch_size, max_seq_len)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MoE(cfg, dtype) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size,
                                                                        dtype, cfg.is_fp8)
        self.fp8_moe = cfg.is_fp8 and cfg.is_moe_layer(layer)
        # Transformer.defer_moe_adds_: at prefill sizes this block hands its MoE output to the next block unadded
        self.defer_moe_add = False

    def forward(self, h: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache_rows: torch.Tensor | None = None, first_chunk: bool = False,
                moe_out: MoEOutput | None = None) -> tuple[torch.Tensor, MoEOutput | None]:
        """Returns (h, None), or (h, MoEOutput) when this block leaves its MoE output unadded (defer_moe_add).
        moe_out: the previous block's unadded MoE output: added to h by this block's input norm op, which also
        quantizes the normed x for the attention's FP8 input projections."""
        if moe_out is None:
            attn = self.self_attn(self.input_layernorm(h), input_pos, cos, sin, cache_rows, first_chunk)
        else:
            norm = self.input_layernorm
            h, x_q, x_scale = torch.ops.dsv3.moe_residual_norm_quant(h, *moe_out, norm.weight, norm.eps,
                                                                     QUANTIZED_X_K_BLOCKS)
            attn = self.self_attn(None, input_pos, cos, sin, cache_rows, first_chunk, x_quantized=(x_q, x_scale))
        return self.feed_forward(h, attn)

    def feed_forward(self, h: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, MoEOutput | None]:
        """The block's second half: h + attn, post_attention_layernorm, the MLP or MoE, its residual add (or, with
        defer_moe_add at prefill sizes, the MoE output left for the next block: (h, MoEOutput))."""
        if self.fp8_moe:
            # h + attn, post_attention_layernorm and the experts' FP8 quantization of its output as one op
            # (dsv3.kernels.rms_norm; one launch on CUDA by default), the experts take x quantized.
            norm, moe = self.post_attention_layernorm, self.mlp
            if moe.decode_sized(h):  # and the router (for 1-4 tokens its logits GEMV runs in the norm's launch)
                gate = moe.gate
                h, x, x_q, x_scale, topk_idx, topk_weight = torch.ops.dsv3.add_rms_norm_quant_route(
                    h, attn, norm.weight, norm.eps, gate.weight, gate.e_score_correction_bias, **gate.route_args,
                    n_shared=moe.n_shared_slots)
                return h + moe(x, x_q, x_scale, routing=(topk_idx, topk_weight)), None
            unadded = self.defer_moe_add  # the MoE returns its parts unadded only where it can (can_leave_unadded)
            if moe.quantizes_x_for_cublas(h):  # prefill-sized, shared experts on cuBLAS: x also in its layout
                h, x, x_q, x_scale, x_scale_cublas = torch.ops.dsv3.add_rms_norm_quant_cublas(
                    h, attn, norm.weight, norm.eps, QUANTIZED_X_K_BLOCKS)
                out = moe(x, x_q, x_scale, x_scale_cublas=x_scale_cublas, unadded=unadded)
            else:
                h, x, x_q, x_scale = torch.ops.dsv3.add_rms_norm_quant(h, attn, norm.weight, norm.eps)
                out = moe(x, x_q, x_scale, unadded=unadded)
            return (h, out) if isinstance(out, MoEOutput) else (h + out, None)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), None


def _refresh_prefill_copies_hook(model: "Transformer", _incompatible_keys) -> None:
    model.refresh_prefill_copies_()  # load_state_dict wrote the weights the copies are made from


class DeviceMemoryError(RuntimeError):
    """The model's weights and caches alone do not fit the device's free memory."""


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (one rank's weights and caches), on any device, meta included."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def check_device_memory(model: nn.Module, device: torch.device | str) -> None:
    """Refuse to materialise `model` (its parameters and buffers, on any device) on a CUDA device whose free memory
    is smaller: a clear error now rather than an out-of-memory traceback part-way through a long load. A lower
    bound: prefill copies, activations and CUDA graph pools come on top."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    need = model_bytes(model)
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # this process's cached blocks
    if need > free:
        max_batch, max_seq = getattr(model, "max_batch_size", "?"), getattr(model, "max_seq_len", "?")
        raise DeviceMemoryError(
            f"this rank's model needs {need / 2**30:.1f} GiB of GPU memory for its weights and caches (max batch "
            f"{max_batch}, max sequence {max_seq}), {device} has {free / 2**30:.1f} of {total / 2**30:.1f} GiB free; "
            "use more GPUs (--world-size), a smaller cache (--max-seq-len / --max-batch-size; compile time for "
            "artifacts), or free the device")


class Transformer(nn.Module):
    """`model(tokens, input_pos)` -> fp32 logits.

    tokens: [B, S] int64 with B <= max_batch_size. input_pos: [B, S] (or [S], shared by the batch) int64, the
    cache position of each token; every position must be < max_seq_len. Rows of a batch may be at different
    positions (mixed-length prompts, right-padded). `logits_index` ([B] int64, index into S) returns [B, vocab] for
    one position per row; `last_only=True` returns [B, vocab] for position S-1; otherwise [B, S, vocab].
    `cache_rows` ([B] int64): the cache rows the batch uses (default: rows 0..B-1), e.g. to prefill one sequence
    into its own slot of a batch. `first_chunk=True` promises that every row's tokens start at position 0 (a
    prompt's first chunk): prefill-sized calls then attend to the chunk alone, without reading the cache (the runtime
    builds a graph of its own for this; a row that continues a sequence would silently lose its history).
    """

    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype = torch.bfloat16, max_batch_size: int = 1,
                 max_seq_len: int = 4096, device: torch.device | str | None = None):
        super().__init__()
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_seq_len ({max_seq_len}) must be >= 1")
        self.cfg, self.dtype = cfg, dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.batch1_activations = "fp8"  # set_batch1_activations_
        with torch.device(device or "cpu"):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, _freeze=True,
                                             _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype))
            self.layers = nn.ModuleList(
                Block(cfg, i, dtype, max_batch_size, max_seq_len) for i in range(cfg.num_hidden_layers)
            )
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype, fp8=False)  # the head is never FP8
            cos, sin = rope_tables(cfg, max_seq_len)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, logits_index: torch.Tensor | None = None,
                last_only: bool = False, cache_rows: torch.Tensor | None = None,
                first_chunk: bool = False) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        if input_pos.dim() == 1:
            input_pos = input_pos.unsqueeze(0).expand(bsz, seqlen)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        h, moe_out = self.embed_tokens(tokens), None
        for layer in self.layers:
            h, moe_out = layer(h, input_pos, cos, sin, cache_rows, first_chunk, moe_out)
        assert moe_out is None, "the last block adds its own MoE output (defer_moe_adds_ leaves it out)"
        if logits_index is not None:
            h = h.gather(1, logits_index.view(bsz, 1, 1).expand(bsz, 1, h.shape[-1])).squeeze(1)
        elif last_only:
            h = h[:, -1]
        return self.lm_head(self.norm(h)).float()

    def reset_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.latent_cache.zero_()

    def materialize_(self, device: torch.device | str) -> "Transformer":
        """Give a model built on the meta device real (uninitialised) storage on `device` and fill its computed
        buffers: rope tables, zeroed latent caches, and any submodule's `reset_buffers_()` (modules added from
        outside, e.g. the tensor-parallel rank offsets). Building on meta first and materialising after sharding
        means a rank never allocates the whole model (671B: 1.3 TB at full size, 81 GiB per rank at world size 8).
        Weights stay uninitialised: the loader (or fill_random_) writes them. On CUDA, a model that cannot fit the
        device's free memory is refused here, before the allocation (`check_device_memory`)."""
        check_device_memory(self, device)
        self.to_empty(device=device)
        with torch.device(device):
            cos, sin = rope_tables(self.cfg, self.max_seq_len)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        self.reset_caches()
        for m in self.modules():
            if m is not self and hasattr(m, "reset_buffers_"):
                m.reset_buffers_()
        return self

    def fuse_input_projections_(self) -> "Transformer":
        """Every attention layer computes its two input projections as one linear (MLA.fuse_input_projections_)."""
        for layer in self.layers:
            layer.self_attn.fuse_input_projections_()
        return self

    def can_fuse_input_projections(self) -> bool:
        return all(layer.self_attn.can_fuse_input_projections() for layer in self.layers)

    def mlps(self) -> list[MLP]:
        """The dense MLPs: dense layers' and MoE layers' shared experts (unless stacked as expert slots)."""
        return [m for m in self.modules() if isinstance(m, MLP)]

    def defer_moe_adds_(self) -> "Transformer":
        """At prefill sizes let each FP8 MoE block with stacked shared experts hand its output to the next block
        unadded, where one kernel adds it, normalises and quantizes x for the FP8 input projections
        (dsv3.moe_residual_norm_quant): x is not written in bf16 and read back by a separate quantization launch.
        Call after stack_shared_experts_ (required) and fuse_input_projections_ (the next block's projections
        take x quantized either way; the last block has no next one). Not under tensor parallel: the MoE's
        all-reduce hook needs its output summed."""
        for layer, nxt in zip(self.layers[:-1], self.layers[1:]):
            fp8_inputs = all(p.weight_scale_inv is not None for p in nxt.self_attn.input_projections())
            layer.defer_moe_add = layer.fp8_moe and bool(getattr(layer.mlp, "n_shared_slots", 0)) and fp8_inputs
        return self

    def fuse_gate_up_(self) -> "Transformer":
        """Every MLP whose gate rows end on an FP8 block computes gate and up as one linear (MLP.fuse_gate_up_)."""
        for mlp in self.mlps():
            if mlp.can_fuse_gate_up():
                mlp.fuse_gate_up_()
        return self

    def set_batch1_activations_(self, mode: str) -> "Transformer":
        """How FP8 layers treat the activations of one-token steps (batch-1 decode): "fp8" (the default) quantizes
        them per token per 128 channels (W8A8, as every other step: dsv3.fp8_linear, dsv3.routed_experts); "bf16"
        leaves them in the activation dtype (W8A16: dsv3.fp8_linear_a16 and the experts' quant_act=False), the
        numerics of DeepSeek's official inference code at its default, and no quantization step before the
        one-token GEMVs, which widen x to fp32 on CUDA cores anyway. Other token counts stay W8A8. A compile-time
        choice (`dsv3c compile --batch1-activations`, recorded in the manifest); call after the layout methods
        (fuse_*_, stack_shared_experts_: they build new modules)."""
        if mode not in BATCH1_ACTIVATIONS:
            raise ValueError(f"batch-1 activations {mode!r}: use one of {', '.join(BATCH1_ACTIVATIONS)}")
        self.batch1_activations = mode
        for m in self.modules():
            if isinstance(m, (Linear, RoutedExperts)):
                m.one_token_a16 = mode == "bf16"
        return self

    def stack_shared_experts_(self) -> "Transformer":
        """Every MoE layer keeps its shared experts as extra routed-expert slots (MoE.stack_shared_). A storage
        layout: state-dict names change (no `shared_experts.*`), the loader maps the checkpoint into the slots."""
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.stack_shared_()
        return self

    def add_prefill_copies_(self) -> "Transformer":
        """Keep rearranged copies of the weights that the prefill path would otherwise rearrange on every call
        (MLA.add_prefill_copies_: kv_b_proj dequantized; RoutedExperts.add_prefill_copies_: the stacked shared
        experts' down projections side by side, their gate / up rows as one matrix). A layout step, after sharding
        and stacking, before the model is materialised: non-persistent buffers (not in the state dict or a
        checkpoint), filled from the weights by `refresh_prefill_copies_`, which every loader calls after writing the
        weights (and load_state_dict, through a hook). Memory: 16B ~0.58 GB, a 671B rank at world size 8 ~0.26 GB."""
        for layer in self.layers:
            layer.self_attn.add_prefill_copies_()
            if isinstance(layer.mlp, MoE) and layer.mlp.n_shared_slots:
                experts = layer.mlp.experts
                experts.add_prefill_copies_(experts.gate_proj.shape[0] - layer.mlp.n_shared_slots)
        if not getattr(self, "_prefill_copies_hook", False):
            self.register_load_state_dict_post_hook(_refresh_prefill_copies_hook)
            self._prefill_copies_hook = True
        return self

    @torch.no_grad()
    def refresh_prefill_copies_(self) -> "Transformer":
        """Recompute the prefill copies (add_prefill_copies_) from the weights; nothing without them."""
        for m in self.modules():
            if m is not self and hasattr(m, "refresh_prefill_copies_"):
                m.refresh_prefill_copies_()
        return self

    def latent_caches(self) -> list[torch.Tensor]:
        return [layer.self_attn.latent_cache for layer in self.layers]
