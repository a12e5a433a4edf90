"""Tensor + expert parallel on CPU (gloo, 2 ranks under torchrun): logits equal world size 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.config import ConfigError, resolve_config
from dsv3.init_random import write_random_checkpoint
from dsv3.runtime.parallel import ParallelPlan

WORKER = Path(__file__).parent / "workers" / "tp_logits.py"


def _torchrun(nproc: int, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(WORKER), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("config,dtype,all_reduce", [("tiny", "bf16", "nccl"), ("tiny-v2", "bf16", "nccl"),
                                                     ("tiny", "bf16", "one-shot")])
def test_two_ranks_match_one(tmp_path, config, dtype, all_reduce):
    ckpt = write_random_checkpoint(resolve_config(config), tmp_path / "ck", dtype=dtype, seed=3, progress=False)
    _torchrun(1, str(ckpt), str(tmp_path / "ws1.pt"))
    _torchrun(2, str(ckpt), str(tmp_path / "ws2.pt"), all_reduce)
    one, two = torch.load(tmp_path / "ws1.pt"), torch.load(tmp_path / "ws2.pt")
    for a, b in zip(one, two):
        assert a.shape == b.shape
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def test_fp8_split_must_stay_block_aligned():
    cfg = resolve_config("671B")
    ParallelPlan(0, 8).check(cfg)  # 16 heads per rank: 3072 q rows, 4096 kv_b rows, 2048 o_proj columns
    with pytest.raises(ConfigError, match="num_attention_heads"):
        ParallelPlan(0, 3).check(cfg)
    tiny_fp8 = resolve_config("tiny").replace(quantization_config=resolve_config("671B").quantization_config)
    with pytest.raises(ConfigError, match="FP8"):
        ParallelPlan(0, 2).check(tiny_fp8)


def test_placement_slices_and_experts():
    cfg = resolve_config("671B")
    plan = ParallelPlan(3, 8)
    p = plan.placement("model.layers.0.self_attn.q_b_proj.weight", (24576, 1536), cfg)
    assert (p.dim, p.start, p.length) == (0, 3 * 3072, 3072)
    p = plan.placement("model.layers.0.self_attn.q_b_proj.weight_scale_inv", (192, 12), cfg)
    assert (p.dim, p.start, p.length) == (0, 3 * 24, 24)
    p = plan.placement("model.layers.0.self_attn.o_proj.weight", (7168, 16384), cfg)
    assert (p.dim, p.start, p.length) == (1, 3 * 2048, 2048)
    assert plan.placement("model.layers.5.mlp.experts.95.up_proj.weight", (2048, 7168), cfg) is None
    assert plan.placement("model.layers.5.mlp.experts.96.up_proj.weight", (2048, 7168), cfg).expert == 0
    assert plan.placement("model.layers.5.mlp.experts.127.down_proj.weight", (7168, 2048), cfg).expert == 31
    assert plan.placement("model.layers.5.mlp.experts.128.down_proj.weight", (7168, 2048), cfg) is None
    assert plan.placement("model.layers.5.mlp.gate.weight", (256, 7168), cfg).dim is None
    assert plan.placement("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (576, 7168), cfg).dim is None


def test_rank_model_is_sharded_before_it_is_allocated(monkeypatch):
    """build_rank_model allocates only the shard (a 671B rank at world size 8 must never hold all 256 experts),
    and the computed buffers are right after materialising: rope tables, zero caches, the rank offsets."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import torch.distributed as dist
    from dsv3.model import Transformer
    from dsv3.runtime.parallel import build_rank_model

    import dsv3.runtime.parallel as parallel

    cfg = resolve_config("tiny")
    devices = []
    real_apply = parallel.apply_parallel

    def watching_apply(model, plan):  # where the model lives when it is cut to this rank's shard
        devices.append(model.embed_tokens.weight.device.type)
        return real_apply(model, plan)

    monkeypatch.setattr(parallel, "apply_parallel", watching_apply)
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        model = build_rank_model(cfg, ParallelPlan(1, 2), dtype=torch.float32, device="cpu", max_batch_size=2,
                                 max_seq_len=32)
    finally:
        dist.destroy_process_group()
    assert devices == ["meta"]  # sharded before any storage exists
    full = Transformer(cfg, dtype=torch.float32, max_batch_size=2, max_seq_len=32)
    assert model.layers[1].mlp.experts.gate_proj.shape[0] == cfg.n_routed_experts // 2
    assert model.embed_tokens.weight.shape[0] == cfg.vocab_size // 2
    assert torch.equal(model.rope_cos, full.rope_cos) and torch.equal(model.rope_sin, full.rope_sin)
    assert all(int(c.abs().max()) == 0 for c in model.latent_caches())
    assert int(model.embed_tokens.vocab_start) == cfg.vocab_size // 2
    assert int(model.layers[1].mlp.experts.expert_offset.value) == cfg.n_routed_experts // 2


def test_checkpoint_load_prepares_on_meta(tmp_path):
    """The loader calls `prepare` (the tensor-parallel pass) before any storage exists."""
    ckpt = write_random_checkpoint(resolve_config("tiny"), tmp_path / "ck", dtype="bf16", seed=3, progress=False)
    seen = []

    def prepare(model):
        seen.append(model.embed_tokens.weight.device.type)
        return None

    model = dsv3.checkpoint.load(ckpt, dtype=torch.float32, max_seq_len=16, prepare=prepare, progress=False)
    assert seen == ["meta"] and model.embed_tokens.weight.device.type == "cpu"


def test_local_expert_ids_keeps_prequantized_inputs():
    """The expert-parallel pre-hook shifts the ids to the rank's local numbering and passes on x_q / x_scale (an FP8
    MoE layer hands its experts x already quantized, dsv3.add_rms_norm_quant)."""
    from dsv3.runtime.parallel import ExpertOffset, _local_expert_ids

    experts = torch.nn.Module()
    experts.expert_offset = ExpertOffset(8, "cpu")
    x, idx, w = torch.randn(2, 4), torch.tensor([[8, 11], [9, 15]]), torch.rand(2, 2)
    xq, xs = torch.randn(2, 4), torch.rand(2, 1)
    out = _local_expert_ids(experts, (x, idx, w, xq, xs))
    assert len(out) == 5 and out[0] is x and out[3] is xq and out[4] is xs
    assert torch.equal(out[1], idx - 8)
    assert len(_local_expert_ids(experts, (x, idx, w))) == 3
