"""The runtime's rank layout (runtime.parallel.apply_parallel) beyond sharding, against the checkpoint and references.

Shared experts stored as extra routed-expert slots (MoE.stack_shared_, world size 1):

- the slots hold exactly the checkpoint's shared-MLP slices (gate/up rows, down columns, and their block scales);
- logits of the stacked model equal the plain model's (the shared MLP of width S*I is the sum of S experts of
  width I) and transformers' DeepseekV3 within the parity bound;
- the presharded world-size-1 conversion produces the same tensors as loading the HF layout;
- the layout is skipped where it cannot apply: FP8 with an expert width that is not a multiple of 128, world size > 1.

Attention input projections fused (MLA.fuse_input_projections_, any world size): the rows of `qkv_a_proj` are this
rank's q_proj / q_a_proj rows then kv_a_proj_with_mqa's, scales by 128-row blocks; skipped with FP8 when the q rows
do not end on a block.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsv3.checkpoint import CheckpointReader
from dsv3.config import resolve_config
from dsv3.init_random import write_random_checkpoint
from dsv3.kernels.fp8_blocks import BLOCK
from dsv3.model import PREFILL_COPIES
from dsv3.runtime.convert import convert_to_ranks
from dsv3.runtime.engine import load_rank_model
from dsv3.runtime.parallel import ParallelPlan, build_rank_model


def _rank_model(ckpt, rank=0, world_size=1, **kw):
    return load_rank_model(ckpt, ParallelPlan(rank, world_size, **kw), dtype=torch.float32, device="cpu",
                           max_batch_size=3, max_seq_len=32, progress=False)


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


# 2 x 9 tokens: decode-sized, the shared slots run inside the routed op; 3 x 24 (> DECODE_MAX_T): prefill-sized, they
# run as one dense MLP over the stacked slots (RoutedExperts.slots_as_mlp)
@pytest.mark.parametrize("bsz,seq", [(2, 9), (3, 24)])
@pytest.mark.parametrize("config,dtype", [("tiny-v2", "fp8"), ("tiny", "fp8"), ("tiny-ragged", "bf16")])
def test_stacked_equals_plain_and_presharded(tmp_path, config, dtype, bsz, seq):
    cfg = resolve_config(config)
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype=dtype, seed=6, progress=False)
    plain = _rank_model(ckpt, stack_shared_experts=False, fuse_input_projections=False)
    stacked = _rank_model(ckpt)
    assert plain.layers[-1].mlp.shared_experts is not None and stacked.layers[-1].mlp.shared_experts is None
    presharded = _rank_model(convert_to_ranks(ckpt, tmp_path / "ranks", 1, progress=False))
    tokens = torch.randint(0, cfg.vocab_size, (bsz, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plain(tokens, torch.arange(seq))
        b = stacked(tokens, torch.arange(seq))
        c = presharded(tokens, torch.arange(seq))
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


@pytest.mark.parametrize("config,dtype,q_lora,world_size", [
    ("tiny", "fp8", 128, 1),         # q_a_proj (128 rows) + kv_a (144 rows: a partial last scale block)
    ("tiny-v2", "bf16", None, 1),    # q_proj (no q LoRA)
    ("tiny-v2", "bf16", None, 2),    # q_proj sharded over 2 ranks: this rank's rows, then the replicated kv_a
])
def test_fused_input_rows_hold_the_checkpoint(tmp_path, config, dtype, q_lora, world_size):
    cfg = resolve_config(config).replace(q_lora_rank=q_lora)
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype=dtype, seed=3, progress=False)
    reader = CheckpointReader(ckpt)
    q_name = "q_proj" if q_lora is None else "q_a_proj"
    for rank in range(world_size):
        model = _rank_model(ckpt, rank, world_size)
        for layer in (0, cfg.num_hidden_layers - 1):
            attn = model.layers[layer].self_attn
            assert not hasattr(attn, "kv_a_proj_with_mqa") and not hasattr(attn, q_name)
            prefix = f"model.layers.{layer}.self_attn"
            q = reader.get(f"{prefix}.{q_name}.weight")
            rows = q.shape[0] // world_size if q_lora is None else q.shape[0]  # q_a_proj is not sharded
            q_local = q[rank * rows:(rank + 1) * rows] if q_lora is None else q
            kv = reader.get(f"{prefix}.kv_a_proj_with_mqa.weight")
            fused = attn.qkv_a_proj.weight
            assert fused.shape[0] == rows + kv.shape[0]
            assert torch.equal(fused[:rows].float(), q_local.float())
            assert torch.equal(fused[rows:].float(), kv.float())
            if dtype == "fp8":
                qs = reader.get(f"{prefix}.{q_name}.weight_scale_inv")
                kvs = reader.get(f"{prefix}.kv_a_proj_with_mqa.weight_scale_inv")
                assert torch.equal(attn.qkv_a_proj.weight_scale_inv, torch.cat([qs, kvs]))


def test_fused_input_projections_match_transformers(tmp_path):
    cfg = resolve_config("tiny-noqlora")
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype="bf16", seed=4, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = _rank_model(ckpt)
    assert ours.layers[0].self_attn.qkv_a_rows
    seq = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(seq).logits.float()
        assert _rel_err(ours(seq[:, :9], torch.arange(9)), ref[:, :9]) <= 1e-4
        for pos in range(9, 12):
            assert _rel_err(ours(seq[:, pos:pos + 1], torch.tensor([pos]), last_only=True), ref[:, pos]) <= 1e-4


def test_not_fused_where_the_q_rows_split_a_block(tmp_path):
    cfg = resolve_config("tiny")  # FP8 q_a_proj of 96 rows: kv_a's rows would start inside a 128-block
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype="fp8", seed=5, progress=False)
    model = _rank_model(ckpt)
    attn = model.layers[0].self_attn
    assert not attn.qkv_a_rows and hasattr(attn, "q_a_proj") and hasattr(attn, "kv_a_proj_with_mqa")


@pytest.mark.parametrize("config,dtype,world_size,n_fused", [
    ("tiny", "fp8", 1, 1),         # the dense layer (512 rows each: gate then up, scales by 128-row blocks)
    ("tiny-v2", "bf16", 2, 3),     # bf16 at world size 2: the dense layer and both tensor-parallel shared MLPs
    ("tiny-ragged", "fp8", 1, 0),  # FP8 344 / 176 rows: up's rows would start inside a 128-block, not fused
])
def test_fused_gate_up_rows_hold_the_checkpoint(tmp_path, config, dtype, world_size, n_fused):
    cfg = resolve_config(config)
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype=dtype, seed=6, progress=False)
    reader = CheckpointReader(ckpt)
    fp8 = dtype == "fp8"
    for rank in range(world_size):
        model = _rank_model(ckpt, rank, world_size)
        checked = 0
        for layer in range(cfg.num_hidden_layers):
            mlp = model.layers[layer].mlp
            for prefix, m in ((f"model.layers.{layer}.mlp", mlp),
                              (f"model.layers.{layer}.mlp.shared_experts", getattr(mlp, "shared_experts", None))):
                if m is None or not hasattr(m, "gate_up_rows"):
                    continue
                gate = reader.get(f"{prefix}.gate_proj.weight")
                rows = gate.shape[0] // world_size
                if fp8 and rows % BLOCK:
                    assert not m.gate_up_rows and hasattr(m, "gate_proj") and hasattr(m, "up_proj")
                    continue
                assert m.gate_up_rows and not hasattr(m, "gate_proj") and not hasattr(m, "up_proj")
                fused = m.gate_up_proj.weight
                assert fused.shape[0] == 2 * rows
                up = reader.get(f"{prefix}.up_proj.weight")
                local = slice(rank * rows, (rank + 1) * rows)
                assert torch.equal(fused[:rows].float(), gate[local].float())
                assert torch.equal(fused[rows:].float(), up[local].float())
                if fp8:
                    gs, us = (reader.get(f"{prefix}.{n}.weight_scale_inv") for n in ("gate_proj", "up_proj"))
                    blocks = slice(rank * rows // BLOCK, (rank + 1) * rows // BLOCK)
                    assert torch.equal(m.gate_up_proj.weight_scale_inv, torch.cat([gs[blocks], us[blocks]]))
                checked += 1
        assert checked == n_fused


@pytest.mark.parametrize("config", ["tiny", "tiny-v2"])
def test_fused_gate_up_matches_the_unfused_model(tmp_path, config):
    """Logits with gate and up fused equal the unfused layout's (prefill and decode steps, float32 on CPU)."""
    cfg = resolve_config(config)
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype="bf16", seed=8, progress=False)
    fused, plain = _rank_model(ckpt), _rank_model(ckpt, fuse_gate_up=False)
    assert any(m.gate_up_rows for m in fused.mlps()) and not any(m.gate_up_rows for m in plain.mlps())
    seq = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _rel_err(fused(seq[:, :9], torch.arange(9)), plain(seq[:, :9], torch.arange(9))) <= 1e-6
        for pos in range(9, 12):
            a = fused(seq[:, pos:pos + 1], torch.tensor([pos]), last_only=True)
            b = plain(seq[:, pos:pos + 1], torch.tensor([pos]), last_only=True)
            assert _rel_err(a, b) <= 1e-6


# Prefill copies (Transformer.add_prefill_copies_, any world size): kv_b_proj dequantized, and at world size 1 the
# stacked shared experts' down projections side by side and their gate / up rows as one matrix, kept as
# non-persistent buffers that every loader refreshes.

def _check_prefill_copies(model, cfg) -> int:
    """Asserts every copy equals what it copies; returns how many copies the model holds."""
    from dsv3.kernels.fp8_blocks import dequantize_weight

    n = 0
    for layer in model.layers:
        attn = layer.self_attn
        kv_b = attn.kv_b_proj
        assert torch.equal(attn.kv_b_dequantized,
                           dequantize_weight(kv_b.weight, kv_b.weight_scale_inv, attn.latent_cache.dtype))
        n += 1
        experts = getattr(layer.mlp, "experts", None)
        if experts is None or not hasattr(experts, "slots_down_packed"):
            continue
        first, (e, d, i) = experts.slots_down_first, experts.down_proj.shape
        s = e - first
        assert s == cfg.n_shared_experts >= 2
        packed, scales = experts.slots_down_packed, experts.slots_down_packed_scale_inv
        assert packed.shape[0] == d and packed.shape[1] % (4 * BLOCK) == 0 and packed.shape[1] >= s * i
        for slot in range(s):
            cols = slice(slot * i, (slot + 1) * i)
            assert torch.equal(packed[:, cols].view(torch.uint8), experts.down_proj[first + slot].view(torch.uint8))
            assert torch.equal(scales[:, slot * (i // BLOCK):(slot + 1) * (i // BLOCK)],
                               experts.down_proj_scale_inv[first + slot])
        assert not packed[:, s * i:].view(torch.uint8).any() and not scales[:, s * i // BLOCK:].any()
        # the slots' gate rows, then their up rows
        rows = [getattr(experts, p)[first:].flatten(0, 1) for p in ("gate_proj", "up_proj")]
        row_scales = [getattr(experts, f"{p}_scale_inv")[first:].flatten(0, 1) for p in ("gate_proj", "up_proj")]
        assert torch.equal(experts.slots_gate_up_packed.view(torch.uint8),
                           torch.cat([r.view(torch.uint8) for r in rows]))
        assert torch.equal(experts.slots_gate_up_packed_scale_inv, torch.cat(row_scales))
        n += 2
    return n


def test_prefill_copies_follow_every_loader(tmp_path):
    from dsv3.runtime.random_weights import fill_random_

    ckpt = write_random_checkpoint(resolve_config("tiny-v2"), tmp_path / "ck", dtype="fp8", seed=7, progress=False)
    cfg = CheckpointReader(ckpt).config  # two shared experts of width 128, FP8: stacked at world size 1
    want = cfg.num_hidden_layers + 2 * (cfg.num_hidden_layers - cfg.first_k_dense_replace)
    hf_layout = _rank_model(ckpt)
    assert _check_prefill_copies(hf_layout, cfg) == want
    presharded = _rank_model(convert_to_ranks(ckpt, tmp_path / "ranks", 1, progress=False))
    assert _check_prefill_copies(presharded, cfg) == want
    fresh = build_rank_model(cfg, ParallelPlan(0, 1), dtype=torch.float32, device="cpu", max_batch_size=1,
                             max_seq_len=8)
    assert _check_prefill_copies(fill_random_(fresh, seed=3), cfg) == want
    fresh.load_state_dict(hf_layout.state_dict())  # the copies are not in the state dict: a hook refreshes them
    assert _check_prefill_copies(fresh, cfg) == want
    none = build_rank_model(cfg, ParallelPlan(0, 1, prefill_copies=False), dtype=torch.float32, device="meta",
                            max_batch_size=1, max_seq_len=8)
    assert not any(n.endswith(PREFILL_COPIES) for n, _ in none.named_buffers())
    # world size 2 (FP8 heads of 128-row blocks): the rank's kv_b rows dequantized; the shared MLPs are not slots
    cfg2 = cfg.replace(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    ws2 = build_rank_model(cfg2, ParallelPlan(0, 2), dtype=torch.bfloat16, device="meta", max_batch_size=1,
                           max_seq_len=8)
    attn = ws2.layers[-1].self_attn
    assert attn.kv_b_dequantized.shape == attn.kv_b_proj.weight.shape == (2 * 256, cfg.kv_lora_rank)
    assert attn.kv_b_dequantized.dtype == torch.bfloat16
    assert not any(n.endswith(("slots_down_packed", "slots_gate_up_packed")) for n, _ in ws2.named_buffers())


def test_prefill_copies_keep_the_logits(tmp_path):
    cfg = resolve_config("tiny-v2")
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype="fp8", seed=8, progress=False)
    with_copies, without = _rank_model(ckpt), _rank_model(ckpt, prefill_copies=False)
    experts, moe = with_copies.layers[-1].mlp.experts, with_copies.layers[-1].mlp
    assert hasattr(experts, "slots_down_packed")
    # the stacked shared slots' prefill weights: gate and up as one packed matrix (one GEMM), down packed
    first = experts.gate_proj.shape[0] - moe.n_shared_slots
    gate_w, gate_s, up_w, up_s, down_w, down_s = experts.slots_fp8_swiglu_weights(first)
    assert up_w is None and up_s is None and gate_w is experts.slots_gate_up_packed
    assert gate_s is experts.slots_gate_up_packed_scale_inv and down_w.shape[0] == 1
    assert torch.equal(gate_w.view(torch.uint8), torch.cat([experts.gate_proj[first:].flatten(0, 1).view(torch.uint8),
                                                            experts.up_proj[first:].flatten(0, 1).view(torch.uint8)]))
    assert torch.equal(gate_s, torch.cat([experts.gate_proj_scale_inv[first:].flatten(0, 1),
                                          experts.up_proj_scale_inv[first:].flatten(0, 1)]))
    # without the copies: the slots' gate and up rows as two views
    plain = without.layers[-1].mlp.experts.slots_fp8_swiglu_weights(first)
    assert plain[2] is not None and plain[0].shape == plain[2].shape == (moe.n_shared_slots * cfg.moe_intermediate_size,
                                                                         cfg.hidden_size)
    tokens = torch.randint(0, cfg.vocab_size, (3, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = with_copies(tokens, torch.arange(24))  # prefill-sized: the copies are read
        b = without(tokens, torch.arange(24))
        # a continued chunk: the cached prefix attended in absorbed form through the dequantized kv_b
        rows = torch.arange(3)
        c = with_copies(tokens[:, :8], torch.arange(24, 32), cache_rows=rows)
        d = without(tokens[:, :8], torch.arange(24, 32), cache_rows=rows)
    # fp32 activations: only the summation order of the shared down projection differs (one GEMM over the slots)
    assert _rel_err(a, b) <= 1e-5 and _rel_err(c, d) <= 1e-5
