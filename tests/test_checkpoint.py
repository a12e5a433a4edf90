"""Checkpoint loading (dsv3.checkpoint): every error case of issue 2 with its message, and the positive layouts.

Damaged checkpoints are copies of the session's random checkpoints (tests/conftest.py), edited with safetensors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    CheckpointReader,
    checkpoint_inventory,
    load_state,
)
from dsv3.config import ConfigError, resolve_config
from dsv3.init_random import random_tensor
from dsv3.kernels.fp8_blocks import dequantize_weight
from dsv3.model import Linear, RoutedExperts, Transformer

FP8 = torch.float8_e4m3fn
SHARD_BYTES = 1_000_000  # tiny fp8 (~8.4 MB) -> 9 shards
SEQ = 12

Q_A = "model.layers.1.self_attn.q_a_proj.weight"  # FP8 [96, 256] in tiny
NORM = "model.layers.0.input_layernorm.weight"  # BF16 [256]
ROUTER = "model.layers.1.mlp.gate.weight"  # BF16 [16, 256]
EXPERT = "model.layers.2.mlp.experts.5.down_proj.weight"  # FP8 [256, 128]
KV_B = "model.layers.0.self_attn.kv_b_proj.weight"  # FP8 [256, 128]


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def sharded(random_checkpoint) -> Path:
    path = random_checkpoint("tiny", "fp8", max_shard_size=SHARD_BYTES)
    assert (path / INDEX_FILE).exists()
    return path


@pytest.fixture(scope="module")
def single(random_checkpoint) -> Path:
    path = random_checkpoint("tiny", "fp8")
    assert (path / SINGLE_FILE).exists() and not (path / INDEX_FILE).exists()
    return path


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def read_index(d: Path) -> dict:
    return json.loads((d / INDEX_FILE).read_text())


def write_index(d: Path, index: dict) -> None:
    (d / INDEX_FILE).write_text(json.dumps(index))


def file_of(d: Path, name: str) -> str:
    if not (d / INDEX_FILE).exists():
        return SINGLE_FILE
    return read_index(d)["weight_map"][name]


def edit_shard(d: Path, file: str, fn) -> None:
    tensors = load_file(str(d / file))
    fn(tensors)
    save_file(tensors, str(d / file), metadata={"format": "pt"})


def set_index_entry(d: Path, name: str, file: str | None) -> None:
    index = read_index(d)
    if file is None:
        del index["weight_map"][name]
    else:
        index["weight_map"][name] = file
    write_index(d, index)


def remove_tensor(d: Path, name: str, *, from_index: bool) -> str:
    file = file_of(d, name)
    edit_shard(d, file, lambda t: t.pop(name))
    if from_index and (d / INDEX_FILE).exists():
        set_index_entry(d, name, None)
    return file


def replace_tensor(d: Path, name: str, value: torch.Tensor) -> str:
    file = file_of(d, name)

    def fn(t):
        assert name in t
        t[name] = value

    edit_shard(d, file, fn)
    return file


def add_tensor(d: Path, name: str, value: torch.Tensor, file: str | None = None) -> str:
    file = file or file_of(d, Q_A)
    edit_shard(d, file, lambda t: t.__setitem__(name, value))
    if (d / INDEX_FILE).exists():
        set_index_entry(d, name, file)
    return file


def load_error(d: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        dsv3.load(d, progress=False, max_seq_len=32, **kw)
    return str(e.value)


def logits(model: Transformer, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, SEQ), generator=g)
    return model(tokens, torch.arange(SEQ))


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ---------------------------------------------------------------------- missing / unexpected tensors
def test_missing_tensor_listed_in_index_but_absent_from_shard(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    file = remove_tensor(d, Q_A, from_index=False)
    msg = load_error(d)
    assert Q_A in msg
    assert file in msg
    assert "does not contain" in msg


def test_missing_tensor_in_neither_index_nor_shard(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    remove_tensor(d, Q_A, from_index=True)
    msg = load_error(d)
    assert "missing 1 tensor(s)" in msg
    assert Q_A in msg
    assert "not loaded" in msg


def test_missing_expert_tensor_single_file_layout(single, tmp_path):
    d = copy(single, tmp_path)
    remove_tensor(d, EXPERT, from_index=False)
    msg = load_error(d)
    assert "missing 1 tensor(s)" in msg
    assert EXPERT in msg


def test_missing_scale_inv(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    remove_tensor(d, KV_B + "_scale_inv", from_index=True)
    msg = load_error(d)
    assert "missing 1 tensor(s)" in msg
    assert KV_B + "_scale_inv" in msg


@pytest.mark.parametrize("name", [
    "model.layers.0.self_attn.extra_proj.weight",  # a name the model does not have
    "model.layers.4.input_layernorm.weight",  # beyond the MTP layer (tiny: 3 layers + 1 MTP at index 3)
    "model.layers.1.mlp.experts.16.up_proj.weight",  # expert index past n_routed_experts (16)
])
def test_unexpected_tensor(sharded, tmp_path, name):
    d = copy(sharded, tmp_path)
    add_tensor(d, name, torch.zeros(4, 4, dtype=torch.bfloat16))
    msg = load_error(d)
    assert "1 unexpected tensor(s)" in msg
    assert name in msg


# ---------------------------------------------------------------------- wrong shape / dtype
@pytest.mark.parametrize("name,bad,expected,found", [
    (Q_A, torch.zeros(95, 256).to(FP8), "[96, 256]", "[95, 256]"),
    (Q_A + "_scale_inv", torch.ones(2, 2), "[1, 2]", "[2, 2]"),
    (NORM, torch.ones(255, dtype=torch.bfloat16), "[256]", "[255]"),
    (EXPERT, torch.zeros(128, 256).to(FP8), "[256, 128]", "[128, 256]"),
])
def test_wrong_shape(sharded, tmp_path, name, bad, expected, found):
    d = copy(sharded, tmp_path)
    file = replace_tensor(d, name, bad)
    msg = load_error(d)
    assert f"tensor {name} (in {file}): expected shape {expected}, found {found}" in msg


@pytest.mark.parametrize("name,bad,expected,found", [
    # bf16 where the FP8 checkpoint needs FP8
    (Q_A, torch.zeros(96, 256, dtype=torch.bfloat16), "float8_e4m3fn", "bfloat16"),
    (EXPERT, torch.zeros(256, 128, dtype=torch.bfloat16), "float8_e4m3fn", "bfloat16"),
    # FP8 where bf16 is expected (norm, router, embedding)
    (NORM, torch.ones(256).to(FP8), "bfloat16", "float8_e4m3fn"),
    (ROUTER, torch.zeros(16, 256).to(FP8), "bfloat16", "float8_e4m3fn"),
    ("model.embed_tokens.weight", torch.zeros(1024, 256).to(FP8), "bfloat16", "float8_e4m3fn"),
])
def test_wrong_dtype(sharded, tmp_path, name, bad, expected, found):
    d = copy(sharded, tmp_path)
    file = replace_tensor(d, name, bad)
    msg = load_error(d)
    assert f"tensor {name} (in {file}): expected dtype {expected}, found {found}" in msg


def test_fp8_tensor_in_bf16_checkpoint(random_checkpoint, tmp_path):
    d = copy(random_checkpoint("tiny", "bf16"), tmp_path)
    file = replace_tensor(d, Q_A, torch.zeros(96, 256).to(FP8))
    msg = load_error(d)
    assert f"tensor {Q_A} (in {file}): expected dtype bfloat16, found float8_e4m3fn" in msg


def test_fp8_shards_with_config_lacking_quantization_config(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    msg = load_error(d)
    assert "expected dtype bfloat16, found float8_e4m3fn" in msg
    assert "unexpected tensor(s)" in msg and "_scale_inv" in msg
    assert "quantization_config" in msg  # the hint


# ---------------------------------------------------------------------- files
def test_missing_shard_file(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    file = file_of(d, Q_A)
    (d / file).unlink()
    msg = load_error(d)
    assert file in msg
    assert "does not exist" in msg
    names_in_file = [n for n, f in read_index(d)["weight_map"].items() if f == file]
    assert f"{len(names_in_file)} tensors" in msg


def test_missing_single_file_and_no_index(single, tmp_path):
    d = copy(single, tmp_path)
    (d / SINGLE_FILE).unlink()
    msg = load_error(d)
    assert INDEX_FILE in msg and SINGLE_FILE in msg
    assert "neither" in msg


def test_no_index_and_no_single_file_with_shards_present(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    (d / INDEX_FILE).unlink()
    msg = load_error(d)
    assert f"has neither {INDEX_FILE} nor {SINGLE_FILE}" in msg


@pytest.mark.parametrize("keep_bytes", ["minus100", "header_only", "4"])
def test_truncated_shard_file(sharded, tmp_path, keep_bytes):
    d = copy(sharded, tmp_path)
    file = file_of(d, Q_A)
    path = d / file
    size = path.stat().st_size
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    new_size = {"minus100": size - 100, "header_only": 8 + header_len, "4": 4}[keep_bytes]
    with open(path, "r+b") as f:
        f.truncate(new_size)
    msg = load_error(d)
    assert str(path) in msg
    assert "truncated or corrupt" in msg


def test_truncated_shard_with_only_mtp_tensors(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    by_file: dict[str, set[bool]] = {}
    for n, f in read_index(d)["weight_map"].items():
        by_file.setdefault(f, set()).add(n.startswith("model.layers.3."))
    mtp_only = sorted(f for f, kinds in by_file.items() if kinds == {True})
    assert mtp_only
    path = d / mtp_only[-1]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    msg = load_error(d)
    assert mtp_only[-1] in msg and "truncated or corrupt" in msg


def test_truncated_single_file(single, tmp_path):
    d = copy(single, tmp_path)
    path = d / SINGLE_FILE
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    msg = load_error(d)
    assert SINGLE_FILE in msg
    assert "truncated or corrupt" in msg


def test_index_names_absent_file(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    set_index_entry(d, Q_A, "model-00099-of-00099.safetensors")
    msg = load_error(d)
    assert "model-00099-of-00099.safetensors" in msg
    assert "does not exist" in msg
    assert Q_A in msg  # the only tensor placed there is named as the example


def test_no_config_json(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    (d / "config.json").unlink()
    msg = load_error(d)
    assert "no config.json" in msg
    assert str(d) in msg


def test_checkpoint_dir_does_not_exist(tmp_path):
    msg = load_error(tmp_path / "nowhere")
    assert "does not exist" in msg and "nowhere" in msg


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', "[1, 2]"])
def test_corrupt_index(sharded, tmp_path, text):
    d = copy(sharded, tmp_path)
    (d / INDEX_FILE).write_text(text)
    msg = load_error(d)
    assert INDEX_FILE in msg
    assert "not a valid safetensors index" in msg


def test_invalid_config_json_is_a_checkpoint_error(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    (d / "config.json").write_text("{broken")
    msg = load_error(d)
    assert "config.json" in msg and "not valid JSON" in msg


# ---------------------------------------------------------------------- all together, nothing half-loaded
def _break_four_ways(d: Path) -> dict[str, str]:
    """Missing, unexpected, wrong shape and wrong dtype, in different shards; returns what the message must say."""
    expert_file = file_of(d, EXPERT)
    remove_tensor(d, EXPERT, from_index=True)
    add_tensor(d, "model.layers.0.self_attn.bogus.weight", torch.zeros(3, dtype=torch.bfloat16))
    q_file = replace_tensor(d, Q_A, torch.zeros(95, 256).to(FP8))
    norm_file = replace_tensor(d, NORM, torch.ones(256).to(FP8))
    assert len({expert_file, q_file, norm_file}) >= 2
    return {
        "missing": f"missing 1 tensor(s): {EXPERT}",
        "unexpected": "1 unexpected tensor(s): model.layers.0.self_attn.bogus.weight",
        "shape": f"tensor {Q_A} (in {q_file}): expected shape [96, 256], found [95, 256]",
        "dtype": f"tensor {NORM} (in {norm_file}): expected dtype bfloat16, found float8_e4m3fn",
    }


def test_all_problems_reported_in_one_error(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    want = _break_four_ways(d)
    msg = load_error(d)
    for kind, text in want.items():
        assert text in msg, f"{kind} problem not reported:\n{msg}"
    assert "The weights were not loaded" in msg


def test_index_shard_mismatch_reported_with_other_problems(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    remove_tensor(d, KV_B, from_index=False)  # the index still places it in its shard
    q_file = replace_tensor(d, Q_A, torch.zeros(95, 256).to(FP8))
    msg = load_error(d)
    assert KV_B in msg
    assert f"tensor {Q_A} (in {q_file}): expected shape [96, 256], found [95, 256]" in msg


def test_every_missing_shard_file_named(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    files = sorted(set(read_index(d)["weight_map"].values()))
    (d / files[1]).unlink()
    (d / files[-1]).unlink()
    msg = load_error(d)
    assert files[1] in msg and files[-1] in msg


def test_nothing_loaded_on_error(sharded, tmp_path, monkeypatch):
    d = copy(sharded, tmp_path)
    _break_four_ways(d)
    reads: list[str] = []
    for method in ("get", "get_part"):  # every way the reader hands out tensor data
        if hasattr(CheckpointReader, method):
            real = getattr(CheckpointReader, method)
            monkeypatch.setattr(CheckpointReader, method,
                                lambda self, name, *a, _real=real, **k: reads.append(name) or _real(self, name, *a, **k))

    # The public entry point returns no model ...
    with pytest.raises(CheckpointError):
        dsv3.load(d, progress=False, max_seq_len=16)
    # ... and load_state into an existing model copies nothing before raising.
    reader = CheckpointReader(d)
    model = Transformer(reader.config, dtype=torch.float32, max_seq_len=16)
    for t in model.state_dict().values():
        t.zero_() if t.dtype != FP8 else t.copy_(torch.zeros(t.shape).to(FP8))
    with pytest.raises(CheckpointError):
        load_state(model, reader, progress=False)
    assert reads == []
    for name, t in model.state_dict().items():
        assert not raw_bytes(t).any(), f"{name} was written although validation failed"


# ---------------------------------------------------------------------- positive cases
def test_single_file_and_sharded_layouts_give_identical_logits(single, sharded):
    assert len([p for p in sharded.iterdir() if p.suffix == ".safetensors"]) > 1
    a = dsv3.load(single, dtype=torch.float32, max_seq_len=32, progress=False)
    b = dsv3.load(sharded, dtype=torch.float32, max_seq_len=32, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(raw_bytes(sa[k]), raw_bytes(sb[k])), k
    la, lb = logits(a), logits(b)
    assert torch.isfinite(la).all()
    assert torch.equal(la, lb)


@pytest.mark.parametrize("config", ["tiny", "tiny-noqlora", "tiny-ragged", "tiny-v2"])
@pytest.mark.parametrize("ckpt_dtype", ["fp8", "bf16"])
def test_fp8_and_bf16_checkpoints_load(random_checkpoint, config, ckpt_dtype):
    path = random_checkpoint(config, ckpt_dtype)
    model = dsv3.load(path, dtype=torch.bfloat16, max_seq_len=32, progress=False)
    cfg = model.cfg
    assert cfg.is_fp8 == (ckpt_dtype == "fp8")
    if config == "tiny":  # forward passes of every config are in test_init_random (activations)
        out = logits(model)
        assert out.shape == (1, SEQ, cfg.vocab_size) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    w = model.layers[0].self_attn.kv_a_proj_with_mqa.weight
    assert w.dtype == (FP8 if ckpt_dtype == "fp8" else torch.bfloat16)


def test_bf16_checkpoint_weights_equal_stored_values(random_checkpoint):
    path = random_checkpoint("tiny", "bf16")
    model = dsv3.load(path, dtype=torch.bfloat16, max_seq_len=16, progress=False)
    stored = load_file(str(path / SINGLE_FILE))
    assert torch.equal(model.layers[0].self_attn.kv_b_proj.weight, stored[KV_B])
    assert torch.equal(model.layers[2].mlp.experts.down_proj[5], stored[EXPERT])
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(model.layers[1].mlp.gate.e_score_correction_bias,
                       stored["model.layers.1.mlp.gate.e_score_correction_bias"])


def test_fp8_weights_stay_fp8_with_block_scales_ragged(random_checkpoint):
    path = random_checkpoint("tiny-ragged", "fp8")
    model = dsv3.load(path, dtype=torch.float32, max_seq_len=16, progress=False)
    stored = load_file(str(path / SINGLE_FILE))
    partial = 0
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"]
    assert linears
    for name, mod in linears:
        n, k = mod.weight.shape
        assert mod.weight.dtype == FP8, name
        assert mod.weight_scale_inv.dtype == torch.float32, name
        assert tuple(mod.weight_scale_inv.shape) == (math.ceil(n / 128), math.ceil(k / 128)), name
        partial += (n % 128 != 0) or (k % 128 != 0)
        ck = f"model.{name}.weight"
        assert torch.equal(raw_bytes(mod.weight), raw_bytes(stored[ck])), name
        assert torch.equal(mod.weight_scale_inv, stored[ck + "_scale_inv"]), name
    assert partial > 0
    # K = hidden 200 -> 2 column blocks, the second partial (72 wide); N = 344 -> 3 row blocks (88 tall)
    gate = model.layers[0].mlp.gate_proj
    assert tuple(gate.weight.shape) == (344, 200) and tuple(gate.weight_scale_inv.shape) == (3, 2)
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert experts
    for ex in experts:
        e = model.cfg.n_routed_experts
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w, s = getattr(ex, proj), getattr(ex, proj + "_scale_inv")
            assert w.dtype == FP8 and s.dtype == torch.float32
            assert tuple(s.shape) == (e, math.ceil(w.shape[1] / 128), math.ceil(w.shape[2] / 128))
    assert model.lm_head.weight.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.float32


def test_mtp_tensors_present_and_skipped(sharded):
    cfg = resolve_config(sharded)
    assert cfg.num_nextn_predict_layers == 1 and cfg.num_hidden_layers == 3
    names = set(read_index(sharded)["weight_map"])
    mtp = {n for n in names if n.startswith("model.layers.3.")}
    for suffix in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                   "shared_head.norm.weight", "shared_head.head.weight", "self_attn.q_a_proj.weight",
                   "mlp.experts.0.gate_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.3.{suffix}" in mtp
    model = dsv3.load(sharded, dtype=torch.float32, max_seq_len=16, progress=False)
    assert len(model.layers) == 3
    assert not any(k.startswith("layers.3.") for k in model.state_dict())


def test_checkpoint_without_mtp_layer_loads(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    index = read_index(d)
    by_file: dict[str, list[str]] = {}
    for n, f in list(index["weight_map"].items()):
        if n.startswith("model.layers.3."):
            by_file.setdefault(f, []).append(n)
            del index["weight_map"][n]
    for f, names in by_file.items():
        edit_shard(d, f, lambda t: [t.pop(n) for n in names])
    write_index(d, index)
    a = dsv3.load(d, dtype=torch.float32, max_seq_len=16, progress=False).state_dict()
    b = dsv3.load(sharded, dtype=torch.float32, max_seq_len=16, progress=False).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(raw_bytes(a[k]), raw_bytes(b[k])), k


def test_load_truncated_to_num_layers(sharded):
    full = dsv3.load(sharded, dtype=torch.float32, max_seq_len=16, progress=False)
    part = dsv3.load(sharded, dtype=torch.float32, max_seq_len=16, num_layers=2, progress=False)
    assert len(part.layers) == 2 and part.cfg.num_hidden_layers == 2
    assert part.cfg.num_nextn_predict_layers == 0
    fs = full.state_dict()
    for k, v in part.state_dict().items():
        assert torch.equal(raw_bytes(v), raw_bytes(fs[k])), k
    assert torch.isfinite(logits(part)).all()
    one = dsv3.load(sharded, dtype=torch.float32, max_seq_len=16, num_layers=1, progress=False)
    assert len(one.layers) == 1


@pytest.mark.parametrize("n", [0, 4])
def test_load_num_layers_out_of_range(sharded, n):
    with pytest.raises(ConfigError, match=r"num_layers = %d: must be between 1 and num_hidden_layers \(3\)" % n):
        dsv3.load(sharded, num_layers=n, progress=False)


def _fp8_names(cfg) -> dict:
    inv = checkpoint_inventory(cfg, include_mtp=True)
    return {n: s for n, s in inv.items() if s.dtype == FP8}


def test_dequantized_fp8_close_to_generating_values(random_checkpoint):
    path = random_checkpoint("tiny-ragged", "fp8")
    reader = CheckpointReader(path)
    cfg = reader.config
    names = _fp8_names(cfg)
    assert len(names) > 50
    for name, spec in names.items():
        q, s = reader.get(name), reader.get(name + "_scale_inv")
        assert q.dtype == FP8 and s.dtype == torch.float32
        dense = random_tensor(name, spec, cfg, seed=0).float()
        n, k = dense.shape
        assert tuple(s.shape) == (math.ceil(n / 128), math.ceil(k / 128))
        deq = dequantize_weight(q, s, torch.float32)
        for bi in range(s.shape[0]):
            for bj in range(s.shape[1]):
                blk = dense[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
                err = (deq[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] - blk).abs()
                amax = blk.abs().max()
                # the scale is the block's amax / 448 (over the elements that exist in a partial block)
                assert torch.allclose(s[bi, bj], amax / 448, rtol=1e-6), (name, bi, bj)
                # e4m3 has 3 mantissa bits: rounding error <= 2^-4 relative (plus half a subnormal step)
                bound = 2.0 ** -4 * blk.abs() + 2.0 ** -10 * s[bi, bj] + 1e-12
                assert (err <= bound).all(), (name, bi, bj, (err / bound).max())
                assert err.norm() <= 2.0 ** -4 * blk.norm(), (name, bi, bj)


def test_fp8_and_bf16_checkpoints_hold_the_same_weights(random_checkpoint):
    fp8 = CheckpointReader(random_checkpoint("tiny", "fp8"))
    bf16 = CheckpointReader(random_checkpoint("tiny", "bf16"))
    for name in (Q_A, KV_B, EXPERT, "model.layers.0.mlp.down_proj.weight"):
        deq = dequantize_weight(fp8.get(name), fp8.get(name + "_scale_inv"), torch.float32)
        ref = bf16.get(name).float()
        assert ((deq - ref).abs() <= (2.0 ** -4 + 2.0 ** -8) * ref.abs() + 1e-5 * ref.abs().max()).all(), name
    for name in (NORM, ROUTER, "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(fp8.get(name), bf16.get(name)), name


def test_config_with_rope_parameters_loads_same_model(sharded, tmp_path):
    d = copy(sharded, tmp_path)
    raw = json.loads((d / "config.json").read_text())
    legacy = raw.pop("rope_scaling")
    theta = raw.pop("rope_theta")
    params = {k: v for k, v in legacy.items() if k != "type"}
    raw["rope_parameters"] = dict(params, rope_type="yarn", rope_theta=theta)
    (d / "config.json").write_text(json.dumps(raw))
    assert CheckpointReader(d).config == CheckpointReader(sharded).config
    a = dsv3.load(d, dtype=torch.float32, max_seq_len=32, num_layers=1, progress=False)
    b = dsv3.load(sharded, dtype=torch.float32, max_seq_len=32, num_layers=1, progress=False)
    assert a.cfg == b.cfg
    assert a.cfg.rope_scaling is not None and a.cfg.rope_scaling.factor == 40
    assert torch.equal(a.rope_cos, b.rope_cos)
    assert torch.equal(logits(a), logits(b))


def test_checkpoint_saved_by_transformers_loads(random_checkpoint, tmp_path):
    """`save_pretrained` (transformers 5): one model.safetensors, `rope_parameters`, no MTP layer (HF drops it)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    src = random_checkpoint("tiny", "bf16")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
        hf.save_pretrained(str(tmp_path / "hf"))
    finally:
        hf_logging.set_verbosity(verbosity)
    d = tmp_path / "hf"
    assert (d / SINGLE_FILE).exists() and not (d / INDEX_FILE).exists()
    assert "rope_parameters" in json.loads((d / "config.json").read_text())
    a = dsv3.load(d, dtype=torch.float32, max_seq_len=32, progress=False)
    b = dsv3.load(src, dtype=torch.float32, max_seq_len=32, progress=False)
    assert a.cfg == b.cfg
    assert torch.equal(logits(a), logits(b))


def test_reader_exposes_memory_mapped_tensors(sharded):
    reader = CheckpointReader(sharded)
    assert reader.file_of(Q_A) == read_index(sharded)["weight_map"][Q_A]
    spec = reader.spec(Q_A)
    assert spec.shape == (96, 256) and spec.dtype == FP8
    assert reader.get(Q_A).shape == (96, 256)


def test_model_that_cannot_fit_the_gpu_is_refused_before_allocating(monkeypatch):
    """materialize_ on CUDA first compares the model's parameter and buffer bytes (weights and caches: the 16B in
    FP8 at max batch 8 x 4096 positions) with the device's free memory (faked here): a clear error naming both and
    the ways out, not an out-of-memory traceback part-way through a load; nothing checked on other devices."""
    from dsv3.model import DeviceMemoryError, check_device_memory

    model = Transformer(resolve_config("16B").replace(quantization_config=resolve_config("671B").quantization_config),
                        max_batch_size=8, max_seq_len=4096, device="meta")
    need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert 15e9 < need < 20e9  # ~16 GB of FP8 weights (the bf16 embedding and head included) and the latent caches
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need - 1, 141 * 2**30))
    with pytest.raises(DeviceMemoryError, match=r"needs 1\d\.\d GiB .*max batch 8, max sequence 4096.*--world-size"):
        check_device_memory(model, "cuda:0")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need, 141 * 2**30))
    check_device_memory(model, "cuda:0")
    check_device_memory(model, "cpu")  # no query off CUDA


@pytest.mark.gpu
def test_model_larger_than_the_gpu_is_refused_on_the_device():
    """On a real GPU: the 671B model at world size 1 (~0.69 TB of FP8 weights, far more than an H200's 141 GB) is
    refused by materialize_ with the device's own free memory, and nothing is allocated on the way; a model that
    fits materialises."""
    from dsv3.model import DeviceMemoryError

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    big = Transformer(resolve_config("671B"), max_batch_size=1, max_seq_len=4096, device="meta")
    with pytest.raises(DeviceMemoryError, match=r"needs 6\d\d\.\d GiB .*cuda(:0)? has \d+\.\d of \d+\.\d GiB free"):
        big.materialize_("cuda")
    assert torch.cuda.memory_allocated() == before
    small = Transformer(resolve_config("tiny"), max_batch_size=1, max_seq_len=32, device="meta").materialize_("cuda")
    assert small.layers[0].self_attn.latent_cache.is_cuda
    assert int(small.layers[0].self_attn.latent_cache.abs().max()) == 0
