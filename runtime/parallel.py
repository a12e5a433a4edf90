"""Tensor and expert parallelism, applied to a built model from the outside (the model code knows nothing of it).

`apply_parallel(model, rank, world_size)` edits a freshly built `Transformer` in place:
- attention heads split over ranks (q_proj / q_b_proj and kv_b_proj rows, o_proj columns), dense MLP and shared
  experts split by intermediate columns/rows, embedding and head split by vocabulary rows;
- routed experts split whole: rank r holds experts [r*E/W, (r+1)*E/W) (expert parallel);
- collectives through forward hooks: one all-reduce after attention, one after each MLP/MoE (routed and shared
  partial sums reduced together), one for the vocab-parallel embedding, an all-gather of the logits. The
  all-reduces go through `model.tp_all_reduce` (`AllReduce`): NCCL's, or, where the plan asks for it
  (`ParallelPlan.one_shot_all_reduce`), a one-shot all-reduce through a symmetric-memory buffer for tensors of
  decode size (dsv3.collectives).

Every rank runs the same graph: the rank enters only through buffers (`embed_tokens.vocab_start`,
`layers.{i}.mlp.experts.expert_offset.value`) read on the device, so one compiled artifact serves all ranks.
`build_rank_model` builds on the meta device, shards, then materialises: a rank only ever allocates its shard.
`placement(name)` tells the loader which part of each checkpoint tensor this rank needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F
from torch import nn

import dsv3.collectives  # noqa: F401  (registers torch.ops.dsv3.one_shot_all_reduce, which graphs may call)
from dsv3.checkpoint import Placement, checkpoint_to_param_name
from dsv3.config import ConfigError, ModelConfig
from dsv3.kernels.fp8_blocks import BLOCK
from dsv3.model import PREFILL_COPIES, Transformer, can_stack_shared

# model parameter name -> split dim (0: rows / output features, 1: columns / input features)
_SPLIT_RULES: list[tuple[re.Pattern, int]] = [
    (re.compile(r"^embed_tokens\.weight$"), 0),
    (re.compile(r"^lm_head\.weight$"), 0),
    (re.compile(r"\.self_attn\.(q_proj|q_b_proj|kv_b_proj)\.weight(_scale_inv)?$"), 0),
    (re.compile(r"\.self_attn\.o_proj\.weight(_scale_inv)?$"), 1),
    (re.compile(r"\.mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight(_scale_inv)?$"), 0),
    (re.compile(r"\.mlp\.(shared_experts\.)?down_proj\.weight(_scale_inv)?$"), 1),
    (re.compile(r"\.mlp\.experts\.(gate_proj|up_proj|down_proj)(_scale_inv)?$"), 0),  # whole experts
]


def split_dim(param: str) -> int | None:
    for pattern, dim in _SPLIT_RULES:
        if pattern.search(param):
            return dim
    return None


@dataclass(frozen=True)
class ParallelPlan:
    rank: int
    world_size: int
    group_name: str = "0"  # the default process group's name
    # World size 1: keep the shared experts as extra routed-expert slots (MoE.stack_shared_), so one fused op runs
    # them with the routed ones. Not at world size > 1: a rank's tensor-parallel slice of the shared MLP is not an
    # expert-sized block (671B at 8: 256 of 2048 columns).
    stack_shared_experts: bool = True
    # Any world size: each attention layer's q_proj (q_a_proj) and kv_a_proj_with_mqa as one linear (one GEMV and
    # one activation quantization per decode step instead of two; MLA.fuse_input_projections_).
    fuse_input_projections: bool = True
    # Any world size: each dense MLP's and (unstacked) shared expert's gate_proj and up_proj as one linear where the
    # gate rows end on an FP8 block (one GEMV per decode step instead of two; MLP.fuse_gate_up_).
    fuse_gate_up: bool = True
    # World size > 1: all-reduces of at most ONE_SHOT_MAX_BYTES with static shapes (decode steps) go through
    # dsv3::one_shot_all_reduce and a [max_batch_size * hidden] buffer the runtime puts in symmetric memory. A
    # compile-time choice (the graphs call a different op); the manifest records it.
    one_shot_all_reduce: bool = False
    # Any world size: "bf16" runs one-token steps' FP8 layers without activation quantization (W8A16,
    # Transformer.set_batch1_activations_); "fp8" quantizes them as every other step. A compile-time choice (the
    # graphs call other ops); the manifest records it (artifacts from before the choice: "fp8"). bf16 by default
    # since the seventeenth session (H200, batch 1: 671B rank 388.1 -> 361.9 us per 4-layer step, 16B 591.0 ->
    # 579.9 us per 8-layer step; docs/BENCHMARKS.md).
    batch1_activations: str = "bf16"
    # Any world size: keep copies of the weights the prefill would otherwise rearrange on every call (kv_b_proj
    # dequantized; at world size 1 the stacked shared experts' down projections side by side and their gate / up
    # rows as one matrix; Transformer.add_prefill_copies_), ~0.58 GB on 16B (0.11 kv_b, 0.16 down, 0.30 gate / up),
    # ~0.26 GB on a 671B rank at world size 8. The graphs read them as constants, so it is a compile-time choice too;
    # both sides default to it.
    prefill_copies: bool = True
    # World size 1 (the MoE output's all-reduce hook needs it summed): at prefill sizes each FP8 MoE layer with
    # stacked shared experts hands its output to the next block unadded, where one kernel adds it, normalises and
    # quantizes x for the fused input projection (Transformer.defer_moe_adds_). Graph structure only, no weights.
    defer_moe_adds: bool = True

    @property
    def all_reduce(self) -> str:
        """What the manifest records: "none" (one rank), "one-shot" or "nccl"."""
        return "none" if self.world_size == 1 else "one-shot" if self.one_shot_all_reduce else "nccl"

    def for_artifacts(self, manifest: dict) -> "ParallelPlan":
        """This rank's plan with the compile-time choices of the artifacts (the graphs' all-reduce op)."""
        return replace(self, one_shot_all_reduce=manifest.get("all_reduce") == "one-shot",
                       batch1_activations=manifest.get("batch1_activations", "fp8"))

    @property
    def stacks_shared(self) -> bool:
        return self.stack_shared_experts and self.world_size == 1

    def check(self, cfg: ModelConfig) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size}")
        cfg.check_world_size(self.world_size)
        if cfg.is_fp8 and self.world_size > 1:
            # Each rank's slice of an FP8 weight must start on a 128 boundary so its scale grid stays aligned.
            heads = cfg.num_attention_heads // self.world_size
            for what, rows in (("q_b_proj/q_proj rows", heads * cfg.qk_head_dim),
                               ("kv_b_proj rows", heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
                               ("o_proj columns", heads * cfg.v_head_dim)):
                if rows % BLOCK:
                    raise ConfigError(
                        f"config field `num_attention_heads` = {cfg.num_attention_heads} cannot be split over world "
                        f"size {self.world_size} with FP8 weights: each rank's {what} ({rows}) must be a multiple "
                        f"of {BLOCK}; use fewer ranks or a BF16 checkpoint")

    def local(self, size: int) -> tuple[int, int]:
        """(start, length) of this rank's contiguous share of `size`."""
        n = size // self.world_size
        return self.rank * n, n

    def placement(self, name: str, shape: tuple[int, ...], cfg: ModelConfig) -> Placement | None:
        """Which part of checkpoint tensor `name` (full shape `shape`) this rank loads; None: not needed here."""
        param, expert = checkpoint_to_param_name(name)
        if expert is not None:
            start, n = self.local(cfg.n_routed_experts)
            return Placement(expert=expert - start) if start <= expert < start + n else None
        dim = split_dim(param)
        if dim is None or self.world_size == 1:
            return Placement()
        # For a block scale this is exact: each rank's weight slice starts on a 128 boundary (see check()).
        start, n = self.local(shape[dim])
        return Placement(dim=dim, start=start, length=n)


def _shrink(module: nn.Module, attr: str, dim: int, world_size: int) -> None:
    t = getattr(module, attr)
    shape = list(t.shape)
    if shape[dim] % world_size:
        raise ConfigError(f"{attr} of shape {tuple(t.shape)} cannot be split {world_size} ways along dim {dim}")
    shape[dim] //= world_size
    new = torch.empty(shape, dtype=t.dtype, device=t.device)
    if isinstance(t, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=False))
    else:
        module.register_buffer(attr, new, persistent=attr not in module._non_persistent_buffers_set)


class VocabParallelEmbedding(nn.Module):
    """Rows [r*V/W, (r+1)*V/W) of the embedding; other ids give zeros, and an all-reduce (a hook) fills them in."""

    def __init__(self, weight: torch.Tensor, vocab_start: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start = vocab_start
        self.register_buffer("vocab_start", torch.tensor(vocab_start, device=weight.device), persistent=False)

    def reset_buffers_(self) -> None:  # after Transformer.materialize_
        self.vocab_start.fill_(self.start)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local_vocab = self.weight.shape[0]
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= local_vocab)
        out = F.embedding(local.clamp(0, local_vocab - 1), self.weight)
        return out.masked_fill(outside.unsqueeze(-1), 0)  # partial: apply_parallel's hook sums over the ranks


# Buffers that only the decode graphs read (verification accepts their absence from the prefill packages).
DECODE_ONLY_BUFFERS = ("tp_all_reduce.one_shot_buffer",)

# Above this a one-shot all-reduce (every rank reads every peer's whole input) loses to NCCL's ring; decode
# tensors of 671B (hidden 7168, bf16) stay under it up to batch 36.
ONE_SHOT_MAX_BYTES = 512 * 1024


class AllReduce(nn.Module):
    """Sum over the tensor-parallel group. With a one-shot buffer (`one_shot_buffer`, non-persistent: scratch, not
    weights), tensors of static size that fit it go through dsv3::one_shot_all_reduce; everything else (prefill's
    dynamic chunk, bigger tensors) through the functional NCCL all-reduce."""

    def __init__(self, group_name: str, one_shot_numel: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.group_name = group_name
        self.register_buffer("one_shot_buffer", torch.empty(one_shot_numel, dtype=dtype, device=device)
                             if one_shot_numel else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buf = self.one_shot_buffer
        n = x.numel()
        if buf is not None and type(n) is int and n <= buf.numel() and x.dtype == buf.dtype:
            return torch.ops.dsv3.one_shot_all_reduce(buf, x, self.group_name)
        return fc.wait_tensor(fc.all_reduce(x, "sum", self.group_name))

    def use_symmetric_memory_(self) -> bool:
        """Replace the one-shot buffer with one in symmetric memory (collective: every rank at the same point).
        Only over NCCL on CUDA: the stand-in group of one-rank timing and gloo keep the ordinary buffer, which the
        op reduces through the group's own all-reduce. True when replaced."""
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        buf = self.one_shot_buffer
        if buf is None or buf.device.type != "cuda" or not dist.is_initialized():
            return False
        if dist.get_backend(_resolve_process_group(self.group_name)) != "nccl":
            return False
        try:
            self.one_shot_buffer = dsv3.collectives.symmetric_buffer(buf.numel(), buf.dtype, buf.device,
                                                                     self.group_name)
        except Exception as exc:  # e.g. GPUs without peer access: say what to do instead of a bare traceback
            raise RuntimeError(
                f"these artifacts reduce through symmetric memory (one-shot all-reduce), which this host could not "
                f"set up ({type(exc).__name__}: {exc}); rebuild them with `dsv3c compile ... --all-reduce nccl`"
            ) from exc
        return True


class ExpertOffset(nn.Module):
    """The first global expert id this rank holds, as a device buffer (one graph for every rank)."""

    def __init__(self, start: int, device: torch.device):
        super().__init__()
        self.start = start
        self.register_buffer("value", torch.tensor(start, device=device), persistent=False)

    def reset_buffers_(self) -> None:  # after Transformer.materialize_
        self.value.fill_(self.start)


def _local_expert_ids(experts: nn.Module, args: tuple) -> tuple:
    x, topk_idx, topk_weight, *prequantized = args  # (x_q, x_scale when the caller quantized x)
    return (x, topk_idx - experts.expert_offset.value, topk_weight, *prequantized)


def build_rank_model(cfg: ModelConfig, plan: ParallelPlan, *, dtype: torch.dtype, device: torch.device | str,
                     max_batch_size: int, max_seq_len: int) -> Transformer:
    """This rank's shard of the model with uninitialised weights on `device` (meta: shapes only)."""
    model = Transformer(cfg, dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len, device="meta")
    apply_parallel(model, plan)
    return model if torch.device(device).type == "meta" else model.materialize_(device)


def apply_parallel(model: Transformer, plan: ParallelPlan) -> Transformer:
    """Lay out a freshly built (unloaded) model in place for `plan`: shard it, or at world size 1 stack the shared
    experts into the routed-experts tensors where the config allows (`ParallelPlan.stack_shared_experts`); then
    fuse each layer's attention input projections and each MLP's gate and up (`ParallelPlan.fuse_input_projections`,
    `fuse_gate_up`), and at world size 1 defer each MoE layer's residual add to the next block (`defer_moe_adds`)."""
    cfg = model.cfg
    plan.check(cfg)
    ws = plan.world_size
    if ws == 1:
        if plan.stacks_shared and can_stack_shared(cfg):
            model.stack_shared_experts_()
        return _fuse(model, plan)
    group = plan.group_name
    hidden = cfg.hidden_size
    one_shot_numel = 0
    if plan.one_shot_all_reduce:
        one_shot_numel = min(model.max_batch_size, ONE_SHOT_MAX_BYTES // (hidden * model.dtype.itemsize)) * hidden
    model.tp_all_reduce = AllReduce(group, one_shot_numel, model.dtype, model.rope_cos.device)

    def all_reduce(_m, _args, out):
        return model.tp_all_reduce(out)

    def gather_logits(_m, _args, out):
        # gathered along dim 0, then each rank's vocab slice put side by side with a view: all_gather_tensor's own
        # gather_dim=-1 splits with torch.chunk, whose symbolic chunk count export cannot prove for a dynamic row
        # count (the batched first-chunk prefill graph)
        full = fc.wait_tensor(fc.all_gather_tensor(out.contiguous(), gather_dim=0, group=group))
        return full.view(ws, *out.shape).movedim(0, -2).flatten(-2)

    # Parameters and buffers that hold a slice.
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        dim = split_dim(name)
        if dim is None:
            continue
        owner, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        _shrink(owner, attr, dim, ws)
    for module in model.modules():
        if hasattr(module, "in_features") and hasattr(module, "weight"):
            module.out_features, module.in_features = module.weight.shape  # keep Linear's bookkeeping true

    experts_per_rank = cfg.n_routed_experts // ws
    for layer in model.layers:
        layer.self_attn.num_heads = cfg.num_attention_heads // ws
        layer.self_attn.register_forward_hook(all_reduce)
        layer.mlp.register_forward_hook(all_reduce)
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            experts.expert_offset = ExpertOffset(plan.rank * experts_per_rank, experts.gate_proj.device)
            experts.register_forward_pre_hook(_local_expert_ids)

    vocab = model.embed_tokens.weight
    model.embed_tokens = VocabParallelEmbedding(vocab.data, plan.rank * vocab.shape[0])
    model.embed_tokens.register_forward_hook(all_reduce)
    model.lm_head.register_forward_hook(gather_logits)
    return _fuse(model, plan)


def rank_layout(model: Transformer) -> dict:
    """How a laid-out rank model stores its weights beyond sharding (recorded in the manifest, shown by inspect)."""
    moe = next((layer.mlp for layer in model.layers if hasattr(layer.mlp, "n_shared_slots")), None)
    return {"shared_expert_slots": moe.n_shared_slots if moe is not None else 0,
            "fused_qkv_a_proj": all(bool(layer.self_attn.qkv_a_rows) for layer in model.layers),
            "fused_gate_up_proj": sum(bool(mlp.gate_up_rows) for mlp in model.mlps()),
            # copies of weights (a packed copy's block scales count with it)
            "prefill_copies": sum(name.rsplit(".", 1)[-1] in PREFILL_COPIES and not name.endswith("_scale_inv")
                                  for name, _ in model.named_buffers()),
            # MoE layers whose prefill output the next block adds (Transformer.defer_moe_adds_; graph structure)
            "deferred_moe_adds": sum(layer.defer_moe_add for layer in model.layers)}


def _fuse(model: Transformer, plan: ParallelPlan) -> Transformer:
    # after sharding: the fused rows are this rank's q rows followed by the (replicated) kv_a rows
    if plan.fuse_input_projections and model.can_fuse_input_projections():
        model.fuse_input_projections_()
    if plan.fuse_gate_up:
        model.fuse_gate_up_()
    if plan.prefill_copies:  # after sharding and stacking: the copies take the rank's shapes
        model.add_prefill_copies_()
    if plan.defer_moe_adds and plan.world_size == 1:  # after stacking and fusing the input projections
        model.defer_moe_adds_()
    return model.set_batch1_activations_(plan.batch1_activations)  # last: the fusions above build new modules
