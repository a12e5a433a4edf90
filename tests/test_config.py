"""Configs (dsv3.config): shipped names against the spec table (dsv3_architecture.md 1), resolution, legacy and
transformers-5 RoPE fields, validation messages, immutability, round trips; softmax scale and YaRN frequencies."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from dsv3.config import (
    ConfigError,
    FP8Quantization,
    ModelConfig,
    YarnScaling,
    resolve_config,
    shipped_config_names,
)
from dsv3.rope import attention_factor, inverse_frequencies, softmax_scale

SPEC = {
    "671B": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                 num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, n_routed_experts=256,
                 n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, scoring_func="sigmoid",
                 topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=1536,
                 kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 num_nextn_predict_layers=1, max_position_embeddings=163840, rope_theta=10000.0),
    "236B": dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                 num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128, n_routed_experts=160,
                 n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3, scoring_func="softmax",
                 topk_method="group_limited_greedy", routed_scaling_factor=16.0, q_lora_rank=1536, kv_lora_rank=512,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
    "16B": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=64,
                n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, scoring_func="softmax",
                routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                qk_rope_head_dim=64, v_head_dim=128),
}
# (factor, original_max_position_embeddings, beta_fast, beta_slow, mscale); 236B's mscale is unverified (spec 6.4)
YARN = {"671B": (40.0, 4096, 32.0, 1.0, 1.0), "16B": (40.0, 4096, 32.0, 1.0, 0.707),
        "236B": (40.0, 4096, 32.0, 1.0, None)}


def tiny_dict() -> dict:
    return resolve_config("tiny").to_hf_dict()


# ---------------------------------------------------------------------- shipped configs
def test_shipped_names():
    names = shipped_config_names()
    for n in ("671B", "236B", "16B", "tiny", "tiny-noqlora", "tiny-ragged", "tiny-v2"):
        assert n in names


@pytest.mark.parametrize("name", sorted(SPEC))
def test_named_config_matches_spec_table(name):
    cfg = resolve_config(name)
    for field, value in SPEC[name].items():
        assert getattr(cfg, field) == value, field
    factor, orig, beta_fast, beta_slow, mscale = YARN[name]
    ys = cfg.rope_scaling
    assert (ys.factor, ys.original_max_position_embeddings, ys.beta_fast, ys.beta_slow) == (factor, orig, beta_fast,
                                                                                            beta_slow)
    if mscale is not None:
        # official `mscale` is HF `mscale_all_dim`; both are set equal in the shipped files
        assert ys.mscale_all_dim == mscale and ys.mscale == mscale
    assert cfg.rms_norm_eps == 1e-6
    assert cfg.name == name


def test_671B_is_fp8_and_others_are_not():
    assert resolve_config("671B").is_fp8
    assert resolve_config("671B").quantization_config == FP8Quantization()
    assert not resolve_config("16B").is_fp8 and not resolve_config("236B").is_fp8


def test_16B_specifics():
    cfg = resolve_config("16B")
    assert cfg.q_lora_rank is None
    assert cfg.rope_scaling.mscale == pytest.approx(0.707)
    assert cfg.is_moe_layer(1) and not cfg.is_moe_layer(0)
    assert cfg.shared_intermediate_size == 2 * 1408


@pytest.mark.parametrize("name", ["tiny", "tiny-noqlora", "tiny-ragged", "tiny-v2"])
def test_tiny_configs_resolve(name):
    cfg = resolve_config(name)
    assert cfg.num_hidden_layers <= 4 and cfg.hidden_size <= 256
    cfg.check_world_size(1)


# ---------------------------------------------------------------------- resolution
def test_config_from_json_path(tmp_path):
    p = tmp_path / "my.json"
    p.write_text(json.dumps(tiny_dict()))
    assert resolve_config(p) == resolve_config("tiny")
    assert resolve_config(str(p)) == resolve_config("tiny")
    assert resolve_config(p).name == str(p)


def test_config_from_checkpoint_dir(random_checkpoint):
    path = random_checkpoint("tiny", "fp8")
    assert resolve_config(path) == resolve_config("tiny").replace(quantization_config=FP8Quantization())


def test_dir_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match="without config.json") as e:
        resolve_config(tmp_path)
    assert "671B" in str(e.value) and "tiny" in str(e.value)


def test_unknown_name_lists_shipped_configs():
    with pytest.raises(ConfigError) as e:
        resolve_config("999B")
    msg = str(e.value)
    assert "999B" in msg
    for n in shipped_config_names():
        assert n in msg


def test_missing_and_invalid_json_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_config(bad)


def test_missing_required_field_is_named():
    d = tiny_dict()
    del d["kv_lora_rank"]
    with pytest.raises(ConfigError, match="missing required field.*kv_lora_rank"):
        ModelConfig.from_hf_dict(d)


# ---------------------------------------------------------------------- RoPE fields, q_lora_rank spelling
def test_legacy_rope_scaling_equals_rope_parameters():
    legacy = tiny_dict()
    modern = dict(legacy)
    rs = modern.pop("rope_scaling")
    theta = modern.pop("rope_theta")
    modern["rope_parameters"] = dict({k: v for k, v in rs.items() if k != "type"}, rope_type="yarn",
                                     rope_theta=theta)
    a, b = ModelConfig.from_hf_dict(legacy), ModelConfig.from_hf_dict(modern)
    assert a == b
    assert b.rope_scaling == YarnScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                         beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def test_rope_theta_taken_from_rope_parameters():
    d = tiny_dict()
    d.pop("rope_scaling")
    d["rope_theta"] = 10000.0
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 50000.0}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling is None


def test_transformers_written_config_reads_the_same(random_checkpoint, tmp_path):
    """transformers 5 rewrites config.json with `rope_parameters`; we read it back to the same config."""
    from transformers import AutoConfig

    path = random_checkpoint("tiny", "bf16")
    AutoConfig.from_pretrained(str(path)).save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw
    assert resolve_config(tmp_path) == resolve_config(path)


def test_yarn_without_factor_named():
    d = tiny_dict()
    del d["rope_scaling"]["factor"]
    with pytest.raises(ConfigError, match="rope_scaling.*yarn needs 'factor'"):
        ModelConfig.from_hf_dict(d)


def test_unsupported_rope_type_named():
    d = tiny_dict()
    d["rope_scaling"] = {"type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match="rope_scaling.*linear"):
        ModelConfig.from_hf_dict(d)


def test_q_lora_rank_zero_means_none():
    d = tiny_dict()
    d["q_lora_rank"] = 0
    assert ModelConfig.from_hf_dict(d).q_lora_rank is None
    d["q_lora_rank"] = None
    assert ModelConfig.from_hf_dict(d).q_lora_rank is None


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("change,field,constraint", [
    (dict(n_group=3), "n_group", "must divide n_routed_experts (16)"),
    (dict(scoring_func="relu"), "scoring_func", "must be one of"),
    (dict(topk_method="top1"), "topk_method", "must be one of"),
    (dict(topk_group=5), "topk_group", "between 1 and n_group (4)"),
    (dict(num_experts_per_tok=20), "num_experts_per_tok", "between 1 and topk_group * experts per group (8)"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim", "must be even"),
    (dict(hidden_size=0), "hidden_size", "positive integer"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace", "between 0 and num_hidden_layers (3)"),
    (dict(n_group=16, topk_group=8), "n_group", "top-2"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings", "do not tie"),
    (dict(quantization_config=FP8Quantization(weight_block_size=(64, 64))), "quantization_config", "128"),
])
def test_validation_names_field_and_constraint(change, field, constraint):
    with pytest.raises(ConfigError) as e:
        resolve_config("tiny").replace(**change)
    msg = str(e.value)
    assert f"`{field}`" in msg
    assert constraint in msg
    assert "tiny" in msg  # where the config came from


def test_validation_from_hf_dict():
    d = tiny_dict()
    d["scoring_func"] = "tanh"
    with pytest.raises(ConfigError, match="`scoring_func` = 'tanh'"):
        ModelConfig.from_hf_dict(d)


def test_check_world_size():
    cfg = resolve_config("671B")
    with pytest.raises(ConfigError) as e:
        cfg.check_world_size(3)
    assert "num_attention_heads" in str(e.value) and "128" in str(e.value) and "3" in str(e.value)
    for ws in (1, 2, 4, 8):
        cfg.check_world_size(ws)
    with pytest.raises(ConfigError, match="world size must be >= 1"):
        cfg.check_world_size(0)


def test_frozen():
    cfg = resolve_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 512
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rope_scaling.factor = 2.0
    assert hash(cfg) == hash(resolve_config("tiny"))


@pytest.mark.parametrize("name", ["671B", "236B", "16B", "tiny", "tiny-noqlora", "tiny-ragged", "tiny-v2"])
def test_to_hf_dict_round_trip(name):
    cfg = resolve_config(name)
    d = cfg.to_hf_dict()
    json.dumps(d)  # serialisable
    back = ModelConfig.from_hf_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert back.config_hash() == cfg.config_hash()


def test_to_hf_dict_round_trip_without_num_key_value_heads():
    d = tiny_dict()
    del d["num_key_value_heads"]
    cfg = ModelConfig.from_hf_dict(d)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_config_hash_ignores_name():
    a = resolve_config("tiny")
    assert a.replace(name="other").config_hash() == a.config_hash()
    assert a.replace(routed_scaling_factor=2.0).config_hash() != a.config_hash()


# ---------------------------------------------------------------------- rope numbers (spec 5.1, 6.4)
def test_softmax_scale_671B():
    cfg = resolve_config("671B")
    assert softmax_scale(cfg) == pytest.approx(0.1352338, abs=5e-8)
    m = 0.1 * 1.0 * math.log(40) + 1
    assert softmax_scale(cfg) == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
    assert attention_factor(cfg) == 1.0


def test_softmax_scale_16B_uses_mscale_all_dim():
    cfg = resolve_config("16B")
    m = 0.1 * 0.707 * math.log(40) + 1
    assert softmax_scale(cfg) == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
    assert attention_factor(cfg) == pytest.approx(1.0)


def test_yarn_inverse_frequencies_671B():
    cfg = resolve_config("671B")
    inv = inverse_frequencies(cfg).double()
    assert inv.shape == (32,)
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ratio = inv / base
    assert torch.allclose(ratio[:11], torch.ones(11, dtype=torch.float64), rtol=1e-6)  # j <= 10 unchanged
    assert torch.allclose(ratio[23:], torch.full((9,), 1 / 40, dtype=torch.float64), rtol=1e-6)  # j >= 23: / 40
    # in between: linear blend with ramp (j - 10) / 13
    for j in range(11, 23):
        r = (j - 10) / 13
        assert ratio[j].item() == pytest.approx((1 - r) + r / 40, rel=1e-5), j


def test_no_rope_scaling_gives_plain_frequencies():
    cfg = resolve_config("tiny").replace(rope_scaling=None)
    dim = cfg.qk_rope_head_dim
    expected = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    assert torch.allclose(inverse_frequencies(cfg), expected)
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5)
