"""Shared experts stored as extra routed-expert slots (MoE.stack_shared_, the world-size-1 runtime layout).

- the slots hold exactly the checkpoint's shared-MLP slices (gate/up rows, down columns, and their block scales);
- logits of the stacked model equal the plain model's (the shared MLP of width S*I is the sum of S experts of
  width I) and transformers' DeepseekV3 within the parity bound;
- the presharded world-size-1 conversion produces the same tensors as loading the HF layout;
- the layout is skipped where it cannot apply: FP8 with an expert width that is not a multiple of 128, world size > 1.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsv3.checkpoint import CheckpointReader
from dsv3.config import resolve_config
from dsv3.init_random import write_random_checkpoint
from dsv3.kernels.fp8_blocks import BLOCK
from dsv3.runtime.convert import convert_to_ranks
from dsv3.runtime.engine import load_rank_model
from dsv3.runtime.parallel import ParallelPlan, build_rank_model


def _rank_model(ckpt, **kw):
    return load_rank_model(ckpt, ParallelPlan(0, 1, **kw), dtype=torch.float32, device="cpu", max_batch_size=2,
                           max_seq_len=32, progress=False)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("config,dtype", [("tiny-v2", "fp8"), ("tiny", "fp8"), ("tiny-ragged", "bf16")])
def test_slots_hold_the_checkpoint_slices(tmp_path, config, dtype):
    cfg = resolve_config(config)
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype=dtype, seed=5, progress=False)
    model = _rank_model(ckpt)
    reader = CheckpointReader(ckpt)
    e, s, i = cfg.n_routed_experts, cfg.n_shared_experts, cfg.moe_intermediate_size
    layer = cfg.first_k_dense_replace
    moe = model.layers[layer].mlp
    assert moe.shared_experts is None and moe.n_shared_slots == s
    assert moe.experts.gate_proj.shape[0] == e + s
    prefix = f"model.layers.{layer}.mlp.shared_experts"
    for slot in range(s):
        for proj in ("gate_proj", "up_proj"):
            w = reader.get(f"{prefix}.{proj}.weight")
            assert torch.equal(getattr(moe.experts, proj)[e + slot].float(), w[slot * i:(slot + 1) * i].float())
        down = reader.get(f"{prefix}.down_proj.weight")
        assert torch.equal(moe.experts.down_proj[e + slot].float(), down[:, slot * i:(slot + 1) * i].float())
        if dtype == "fp8":
            ib = i // BLOCK
            gs = reader.get(f"{prefix}.gate_proj.weight_scale_inv")
            ds = reader.get(f"{prefix}.down_proj.weight_scale_inv")
            assert torch.equal(moe.experts.gate_proj_scale_inv[e + slot], gs[slot * ib:(slot + 1) * ib])
            assert torch.equal(moe.experts.down_proj_scale_inv[e + slot], ds[:, slot * ib:(slot + 1) * ib])
    # the routed experts are untouched
    assert torch.equal(moe.experts.up_proj[1].float(), reader.get(f"model.layers.{layer}.mlp.experts.1.up_proj.weight").float())


@pytest.mark.parametrize("config,dtype", [("tiny-v2", "fp8"), ("tiny", "fp8"), ("tiny-ragged", "bf16")])
def test_stacked_equals_plain_and_presharded(tmp_path, config, dtype):
    cfg = resolve_config(config)
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype=dtype, seed=6, progress=False)
    plain = _rank_model(ckpt, stack_shared_experts=False)
    stacked = _rank_model(ckpt)
    assert plain.layers[-1].mlp.shared_experts is not None and stacked.layers[-1].mlp.shared_experts is None
    presharded = _rank_model(convert_to_ranks(ckpt, tmp_path / "ranks", 1, progress=False))
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plain(tokens, torch.arange(9))
        b = stacked(tokens, torch.arange(9))
        c = presharded(tokens, torch.arange(9))
    # fp32 activations: only the summation order of the shared down projection differs
    assert _rel_err(b, a) <= 1e-5
    assert torch.equal(b, c)


def test_stacked_matches_transformers(tmp_path):
    cfg = resolve_config("tiny-ragged")  # two shared experts of a ragged width (88)
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype="bf16", seed=8, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = _rank_model(ckpt)
    assert ours.layers[-1].mlp.n_shared_slots == 2
    seq = torch.randint(0, cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(seq).logits.float()
        logits = ours(seq[:, :10], torch.arange(10))
        assert _rel_err(logits, ref[:, :10]) <= 1e-4
        for pos in range(10, 14):
            step = ours(seq[:, pos:pos + 1], torch.tensor([pos]), last_only=True)
            assert _rel_err(step, ref[:, pos]) <= 1e-4


def test_not_stacked_where_it_cannot_apply(tmp_path):
    # FP8 with an expert width of 88: a slot would not start on a 128-block boundary of the shared MLP's scales.
    ragged = resolve_config("tiny-ragged")
    ckpt = write_random_checkpoint(ragged, tmp_path / "ck", dtype="fp8", seed=9, progress=False)
    model = _rank_model(ckpt)
    assert model.cfg.is_fp8 and model.layers[-1].mlp.shared_experts is not None
    assert model.layers[-1].mlp.n_shared_slots == 0
    # world size > 1: a rank's tensor-parallel slice of the shared MLP is not an expert-sized block
    cfg = resolve_config("tiny-v2")
    ws2 = build_rank_model(cfg, ParallelPlan(0, 2), dtype=torch.bfloat16, device="meta", max_batch_size=1,
                           max_seq_len=8)
    assert ws2.layers[-1].mlp.shared_experts is not None
    assert ws2.layers[-1].mlp.experts.gate_proj.shape[0] == cfg.n_routed_experts // 2
