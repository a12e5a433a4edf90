"""`init-random` (dsv3.init_random): exactly the Hugging Face layout, the right dtypes, sensible and reproducible
values, atomic writes; and a bf16 V3-style checkpoint that transformers loads as it is."""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dsv3
import dsv3.init_random as init_random
from dsv3.checkpoint import INDEX_FILE, SINGLE_FILE, TensorSpec, checkpoint_inventory
from dsv3.config import FP8Quantization, ModelConfig, resolve_config
from dsv3.init_random import parse_size, random_tensor, write_random_checkpoint

FP8 = torch.float8_e4m3fn
SHARD_BYTES = 1_000_000
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
PROJ_RE = re.compile(r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)"
                     r"\.weight$")
BF16_RE = re.compile(r"(^model\.embed_tokens\.weight$|^lm_head\.weight$|norm\.weight$|\.mlp\.gate\.weight$"
                     r"|\.eh_proj\.weight$|\.embed_tokens\.weight$|\.shared_head\.head\.weight$)")


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def header_data_bytes(file: Path) -> tuple[dict, int]:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return header, len(raw) - 8 - n


@pytest.fixture(scope="module")
def sharded(random_checkpoint) -> Path:
    return random_checkpoint("tiny", "fp8", max_shard_size=SHARD_BYTES)


# ---------------------------------------------------------------------- layout
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_config_json_fields(random_checkpoint, dtype):
    path = random_checkpoint("tiny", dtype)
    raw = json.loads((path / "config.json").read_text())
    src = json.loads((resources.files("dsv3.configs") / "tiny.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "n_routed_experts", "n_shared_experts",
                "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor", "scoring_func", "topk_method",
                "norm_topk_prob", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "vocab_size", "num_nextn_predict_layers", "max_position_embeddings",
                "intermediate_size", "moe_intermediate_size", "rms_norm_eps", "bos_token_id", "eos_token_id"):
        assert raw[key] == src[key], key
    assert raw["architectures"] == ["DeepseekV3ForCausalLM"] and raw["model_type"] == "deepseek_v3"
    assert raw["rope_scaling"]["type"] == "yarn" and raw["rope_scaling"]["factor"] == 40
    assert raw["rope_theta"] == 10000
    assert raw["tie_word_embeddings"] is False
    if dtype == "fp8":
        assert raw["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                              "weight_block_size": [128, 128]}
    else:
        assert "quantization_config" not in raw
    cfg = resolve_config(path)
    assert cfg.is_fp8 == (dtype == "fp8")
    assert cfg.replace(quantization_config=None) == resolve_config("tiny")


def test_num_layers_recorded_in_config(random_checkpoint):
    path = random_checkpoint("tiny-ragged", "bf16", num_layers=1)
    raw = json.loads((path / "config.json").read_text())
    assert raw["num_hidden_layers"] == 1
    assert raw["first_k_dense_replace"] == 1  # clamped from 2
    names = set(read_all(path))
    assert not any(n.startswith("model.layers.1.") for n in names)
    assert dsv3.load(path, dtype=torch.float32, max_seq_len=8, progress=False).cfg.num_hidden_layers == 1


def test_tokenizer_files_load_with_chat_template(sharded):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sharded))
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1
    assert len(tok) == 1024
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert ids[0] == 0
    assert tok.decode(tok.encode("Hello world", add_special_tokens=False)) == "Hello world"


def test_shard_file_names_and_index(sharded):
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(files)
    assert n > 2
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert all(SHARD_RE.match(f) for f in files)
    assert not (sharded / SINGLE_FILE).exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert set(index["weight_map"].values()) == set(files)


def test_single_shard_is_model_safetensors_without_index(random_checkpoint):
    path = random_checkpoint("tiny", "fp8")
    assert sorted(p.name for p in path.glob("*.safetensors")) == [SINGLE_FILE]
    assert not (path / INDEX_FILE).exists()
    assert set(read_all(path)) == set(checkpoint_inventory(resolve_config(path), include_mtp=True))


def test_index_total_size_is_sum_of_tensor_bytes(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    total = 0
    data_bytes = 0
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(str(sharded / f), framework="pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                total += t.numel() * t.element_size()
        data_bytes += header_data_bytes(sharded / f)[1]
    assert index["metadata"]["total_size"] == total
    assert data_bytes == total  # no padding or stray bytes in the data sections


def test_every_index_entry_is_in_its_shard_and_vice_versa(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    seen: dict[str, str] = {}
    for f in sorted(set(index.values())):
        with safe_open(str(sharded / f), framework="pt") as h:
            for name in h.keys():
                assert name not in seen, f"{name} in {seen.get(name)} and {f}"
                seen[name] = f
    assert seen == index
    inventory = checkpoint_inventory(resolve_config(sharded), include_mtp=True)
    assert set(index) == set(inventory)
    # a weight and its scale share a shard
    for name in index:
        if name.endswith("_scale_inv"):
            assert index[name] == index[name[: -len("_scale_inv")]], name


def test_shards_respect_max_shard_size(sharded):
    for f in sharded.glob("model-*.safetensors"):
        header, data = header_data_bytes(f)
        weights = [k for k in header if k != "__metadata__" and not k.endswith("_scale_inv")]
        assert data <= SHARD_BYTES or len(weights) == 1, (f.name, data)
        assert header.get("__metadata__") == {"format": "pt"}


def test_tensor_dtypes_per_class(sharded):
    tensors = read_all(sharded)
    seen = {"fp8": 0, "scale": 0, "bf16": 0, "bias": 0}
    for name, t in tensors.items():
        if name.endswith("weight_scale_inv"):
            assert t.dtype == torch.float32, name
            w = tensors[name[: -len("_scale_inv")]]
            assert tuple(t.shape) == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)), name
            seen["scale"] += 1
        elif name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32, name
            seen["bias"] += 1
        elif PROJ_RE.search(name) and not name.endswith("eh_proj.weight"):
            assert t.dtype == FP8, name
            assert name + "_scale_inv" in tensors, name
            seen["fp8"] += 1
        else:
            assert BF16_RE.search(name), f"unclassified tensor {name}"
            assert t.dtype == torch.bfloat16, name
            seen["bf16"] += 1
    assert seen["fp8"] == seen["scale"] > 0 and seen["bf16"] > 0 and seen["bias"] == 3  # layers 1, 2 and MTP 3
    assert tensors["model.layers.3.eh_proj.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16


def test_bf16_checkpoint_dtypes(random_checkpoint):
    tensors = read_all(random_checkpoint("tiny", "bf16"))
    assert not any(n.endswith("_scale_inv") for n in tensors)
    for name, t in tensors.items():
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want, name


def test_671B_inventory_matches_published_checkpoint():
    """Spec 2: the R1/V3 checkpoint holds 91,991 tensors and 684,531,386,000 numbers (scales included)."""
    cfg = resolve_config("671B")
    inv = checkpoint_inventory(cfg, include_mtp=True)
    assert len(inv) == 91_991
    assert sum(math.prod(s.shape) for s in inv.values()) == 684_531_386_000
    assert inv["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == TensorSpec((5, 56), torch.float32)
    assert inv["model.layers.61.eh_proj.weight"] == TensorSpec((7168, 14336), torch.bfloat16)
    assert inv["model.layers.3.mlp.gate.e_score_correction_bias"] == TensorSpec((256,), torch.float32)
    assert inv["model.layers.60.mlp.experts.255.down_proj.weight"] == TensorSpec((7168, 2048), FP8)


# ---------------------------------------------------------------------- values
def test_same_seed_same_bytes(tmp_path):
    cfg = resolve_config("tiny")
    a = write_random_checkpoint(cfg, tmp_path / "a", seed=7, max_shard_size=SHARD_BYTES, progress=False)
    b = write_random_checkpoint(cfg, tmp_path / "b", seed=7, max_shard_size=SHARD_BYTES, progress=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_different_seed_different_values(random_checkpoint):
    a = read_all(random_checkpoint("tiny", "bf16", seed=0))
    b = read_all(random_checkpoint("tiny", "bf16", seed=1))
    assert a.keys() == b.keys()
    for name in a:
        assert not torch.equal(a[name], b[name]), name


def test_values_independent_of_sharding(random_checkpoint, sharded):
    one = read_all(random_checkpoint("tiny", "fp8"))
    many = read_all(sharded)
    assert one.keys() == many.keys()
    for name in one:
        assert same(one[name], many[name]), name


def test_stored_values_are_random_tensor(random_checkpoint):
    path = random_checkpoint("tiny", "bf16", seed=3)
    cfg = resolve_config(path)
    inv = checkpoint_inventory(cfg, include_mtp=True)
    stored = read_all(path)
    for name in ("model.embed_tokens.weight", "model.layers.2.mlp.experts.7.up_proj.weight",
                 "model.layers.1.mlp.gate.e_score_correction_bias", "model.norm.weight"):
        assert same(stored[name], random_tensor(name, inv[name], cfg, seed=3)), name


def _expected_std(name: str, shape: tuple[int, ...], num_layers: int) -> tuple[float, float]:
    """(mean, std) of init-random's distribution for this tensor, written out independently."""
    if name.endswith("e_score_correction_bias"):
        return 0.05, 0.1 / math.sqrt(12)  # U(0, 0.1)
    if len(shape) == 1:
        return 1.0, 0.05
    std = min(0.02, 1 / math.sqrt(shape[-1]))
    if re.search(r"\.(o_proj|down_proj)\.weight$", name):
        std /= math.sqrt(2 * num_layers)
    return 0.0, std


def _check_stats(name: str, t: torch.Tensor, mean: float, std: float) -> None:
    n = t.numel()
    s, m = (v.item() for v in torch.std_mean(t.float()))
    tol = 5 / math.sqrt(2 * n)  # five standard errors of a sample std
    assert abs(s / std - 1) < max(tol, 0.02), (name, s, std)
    assert abs(m - mean) < 6 * std / math.sqrt(n), (name, m, mean)


@pytest.mark.parametrize("config", ["tiny", "tiny-ragged"])
def test_weight_std_formula_on_written_checkpoint(random_checkpoint, config):
    path = random_checkpoint(config, "bf16")
    cfg = resolve_config(path)
    for name, t in read_all(path).items():
        if t.numel() < 64:
            continue
        mean, std = _expected_std(name, tuple(t.shape), cfg.num_hidden_layers)
        _check_stats(name, t, mean, std)
        if name.endswith("e_score_correction_bias"):
            assert (t >= 0).all() and (t < 0.1).all()


@pytest.mark.parametrize("config,names", [
    ("16B", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
             "model.layers.5.mlp.experts.3.down_proj.weight",
             "model.layers.5.mlp.gate.weight", "model.layers.5.input_layernorm.weight"]),
    ("671B", ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.4.mlp.experts.200.down_proj.weight",
              "model.layers.4.mlp.gate.weight",
              "model.layers.4.mlp.gate.e_score_correction_bias", "model.layers.61.enorm.weight"]),
])
def test_weight_std_formula_on_full_size_shapes(config, names):
    cfg = resolve_config(config)
    inv = checkpoint_inventory(cfg.replace(quantization_config=None), include_mtp=True)
    for name in names:
        spec = inv[name]
        mean, std = _expected_std(name, spec.shape, cfg.num_hidden_layers)
        _check_stats(name, random_tensor(name, TensorSpec(spec.shape, torch.float32), cfg, seed=0), mean, std)


def _layer_rms(model, tokens: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    rms: list[float] = []
    # a block returns (h, its MoE output when left unadded): h, the residual stream
    hooks = [layer.register_forward_hook(lambda m, i, o: rms.append(o[0].float().pow(2).mean().sqrt().item()))
             for layer in model.layers]
    try:
        out = model(tokens, torch.arange(tokens.shape[1]))
    finally:
        for h in hooks:
            h.remove()
    return rms, out


@pytest.mark.parametrize("config,ckpt_dtype", [("tiny", "fp8"), ("tiny-ragged", "fp8"), ("tiny", "bf16"),
                                               ("tiny-noqlora", "bf16"), ("tiny-ragged", "bf16"), ("tiny-v2", "bf16")])
def test_activations_finite_and_scaled(random_checkpoint, config, ckpt_dtype):
    model = dsv3.load(random_checkpoint(config, ckpt_dtype), dtype=torch.bfloat16, max_seq_len=32,
                      max_batch_size=2, progress=False)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    rms, out = _layer_rms(model, tokens)
    emb = model.embed_tokens.weight.float().pow(2).mean().sqrt().item()
    assert abs(emb - 0.02) < 0.002
    for i, r in enumerate(rms):
        assert math.isfinite(r) and 0.5 * emb < r < 4 * emb, (i, r, emb)
    assert torch.isfinite(out).all()
    assert 0.05 < out.std().item() < 5


def test_activations_stay_bounded_through_many_layers(tmp_path):
    cfg = resolve_config("tiny").replace(num_hidden_layers=10, num_nextn_predict_layers=0)
    path = write_random_checkpoint(cfg, tmp_path / "deep", dtype="bf16", progress=False)
    model = dsv3.load(path, dtype=torch.float32, max_seq_len=32, progress=False)
    rms, out = _layer_rms(model, torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(0)))
    assert len(rms) == 10
    assert all(math.isfinite(r) for r in rms)
    assert rms[-1] < 3 * rms[0]
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------- atomic writes, --out handling
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    real = init_random.save_file
    calls = []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 1:
            raise OSError("No space left on device (simulated)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(init_random, "save_file", flaky)
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(OSError, match="simulated"):
        write_random_checkpoint(resolve_config("tiny"), parent / "out", max_shard_size=SHARD_BYTES, progress=False)
    assert len(calls) == 2
    assert list(parent.iterdir()) == []


def test_failure_with_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def broken(*a, **k):
        raise OSError("simulated")

    monkeypatch.setattr(init_random, "save_file", broken)
    with pytest.raises(OSError):
        write_random_checkpoint(resolve_config("tiny"), out, overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_refuses_non_empty_out_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError) as e:
        write_random_checkpoint(resolve_config("tiny"), out, progress=False)
    assert str(out) in str(e.value) and "not empty" in str(e.value) and "--overwrite" in str(e.value)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    write_random_checkpoint(resolve_config("tiny"), out, overwrite=True, progress=False)
    assert not (out / "precious.txt").exists() and (out / "config.json").exists()


def test_empty_existing_out_is_fine(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_random_checkpoint(resolve_config("tiny"), out, num_layers=1, progress=False)
    assert (out / "config.json").exists()


def test_cli_refuses_non_empty_out(tmp_path):
    from click.testing import CliRunner

    from dsv3.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    res = CliRunner().invoke(main, ["init-random", "--config", "tiny", "--out", str(out)])
    assert res.exit_code == 2
    assert "not empty" in res.output and "--overwrite" in res.output


def test_num_layers_beyond_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num.layers"):
        write_random_checkpoint(resolve_config("tiny"), tmp_path / "deeper", num_layers=7, dtype="bf16",
                                progress=False)
    assert not (tmp_path / "deeper").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="fp8 or bf16"):
        write_random_checkpoint(resolve_config("tiny"), tmp_path / "a", dtype="fp16", progress=False)
    with pytest.raises(ValueError, match="num-layers"):
        write_random_checkpoint(resolve_config("tiny"), tmp_path / "b", num_layers=0, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text,value", [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("64KiB", 65536),
                                        ("1024", 1024), ("1.5GB", 1_500_000_000), ("3MiB", 3 * 2**20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("two gigs")


# ---------------------------------------------------------------------- transformers
@pytest.mark.parametrize("config", ["tiny", "tiny-noqlora", "tiny-ragged"])
def test_bf16_checkpoint_loads_in_transformers(random_checkpoint, config):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = random_checkpoint(config, "bf16")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"], sorted(info["missing_keys"])[:10]
    assert not info["mismatched_keys"]
    cfg = resolve_config(path)
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    assert all(k.startswith(mtp) for k in info["unexpected_keys"]), sorted(info["unexpected_keys"])[:10]
    stored = read_all(path)
    assert torch.equal(model.model.embed_tokens.weight, stored["model.embed_tokens.weight"].float())
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"].float())
    with torch.no_grad():
        out = model(torch.arange(1, 9).view(1, 8)).logits
    assert torch.isfinite(out).all()


def test_model_config_for_fp8_out(random_checkpoint):
    cfg = resolve_config(random_checkpoint("tiny", "fp8"))
    assert cfg.quantization_config == FP8Quantization()
    assert isinstance(cfg, ModelConfig)
