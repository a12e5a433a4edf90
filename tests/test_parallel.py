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


@pytest.mark.parametrize("config,dtype", [("tiny", "bf16"), ("tiny-v2", "bf16")])
def test_two_ranks_match_one(tmp_path, config, dtype):
    ckpt = write_random_checkpoint(resolve_config(config), tmp_path / "ck", dtype=dtype, seed=3, progress=False)
    _torchrun(1, str(ckpt), str(tmp_path / "ws1.pt"))
    _torchrun(2, str(ckpt), str(tmp_path / "ws2.pt"))
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
