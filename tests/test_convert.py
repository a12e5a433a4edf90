"""`dsv3c convert`: pre-sharded ranks load and match the HF-layout path; BF16 dequantization loads in transformers;
FP8 quantization of a BF16 checkpoint meets the e4m3 rounding bound per element (float64 check) and loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import dsv3
from dsv3.checkpoint import CheckpointError, CheckpointReader, checkpoint_inventory
from dsv3.cli import main
from dsv3.config import FP8Quantization, resolve_config
from dsv3.init_random import write_random_checkpoint
from dsv3.kernels.fp8_blocks import FP8_DTYPE, FP8_MAX, dequantize_weight
from dsv3.runtime.convert import SHARDS_FILE, convert_to_fp8
from dsv3.runtime.engine import load_rank_model
from dsv3.runtime.parallel import ParallelPlan

WORKER = Path(__file__).parent / "workers" / "tp_logits.py"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(resolve_config("tiny"), tmp_path_factory.mktemp("ck") / "tiny", dtype="bf16",
                                   seed=8, max_shard_size=2_000_000, progress=False)


def test_presharded_world_size_1_equals_hf_layout(ckpt, tmp_path):
    out = tmp_path / "ws1"
    res = CliRunner().invoke(main, ["convert", "--checkpoint", str(ckpt), "--out", str(out), "--world-size", "1"])
    assert res.exit_code == 0, res.output
    assert (out / "tokenizer.json").exists() and (out / "rank-00000-of-00001.safetensors").exists()
    plan = ParallelPlan(0, 1)
    a = load_rank_model(out, plan, dtype=torch.float32, device="cpu", max_batch_size=1, max_seq_len=16, progress=False)
    b = load_rank_model(ckpt, plan, dtype=torch.float32, device="cpu", max_batch_size=1, max_seq_len=16,
                        progress=False)  # the same rank layout (shared experts stacked) read from the HF layout
    assert b.layers[-1].mlp.n_shared_slots == 1
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, t in b.state_dict().items():
        assert torch.equal(a.state_dict()[name], t), name
    assert "layers.0.mlp.gate_up_proj.weight" in b.state_dict()  # the dense layer's gate and up as one linear
    # a conversion written in an older rank layout is refused with the fix, not loaded by name mismatch
    meta_path = out / SHARDS_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, format_version=1)))
    with pytest.raises(CheckpointError, match="pre-sharded in rank-layout format 1.*convert again"):
        load_rank_model(out, plan, dtype=torch.float32, device="cpu", max_batch_size=1, max_seq_len=16,
                        progress=False)


def test_presharded_two_ranks_match_world_size_1(ckpt, tmp_path):
    out = tmp_path / "ws2"
    res = CliRunner().invoke(main, ["convert", "--checkpoint", str(ckpt), "--out", str(out), "--world-size", "2"])
    assert res.exit_code == 0, res.output
    with safe_open(str(out / "rank-00001-of-00002.safetensors"), "pt") as f:
        # rank 1 holds experts 8..15 of 16 as slots 0..7, and the second half of each head-split tensor
        assert f.get_slice("layers.1.mlp.experts.gate_proj").get_shape()[0] == 8
        full = CheckpointReader(ckpt)
        assert torch.equal(f.get_tensor("layers.1.mlp.experts.gate_proj")[0],
                           full.get("model.layers.1.mlp.experts.8.gate_proj.weight"))
        assert torch.equal(f.get_tensor("layers.0.self_attn.o_proj.weight"),
                           full.get("model.layers.0.self_attn.o_proj.weight")[:, 64:])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = {}
    for name, src, n in (("hf", ckpt, 1), ("pre", out, 2)):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(n), str(WORKER), str(src), str(tmp_path / f"{name}.pt")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = torch.load(tmp_path / f"{name}.pt")
    for a, b in zip(outs["hf"], outs["pre"]):
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    with pytest.raises(CheckpointError, match="pre-sharded for world size 2, running with 1"):
        load_rank_model(out, ParallelPlan(0, 1), dtype=torch.float32, device="cpu", max_batch_size=1,
                        max_seq_len=16, progress=False)


def test_bf16_dequantization_loads_in_transformers(tmp_path):
    cfg = resolve_config("tiny-ragged")  # kv_a rows 72+8 = 80: a partial edge block in every layer
    fp8 = write_random_checkpoint(cfg, tmp_path / "fp8", dtype="fp8", seed=4, max_shard_size=500_000,
                                  progress=False)
    out = tmp_path / "bf16"
    res = CliRunner().invoke(main, ["convert", "--checkpoint", str(fp8), "--out", str(out), "--dtype", "bf16"])
    assert res.exit_code == 0, res.output
    raw = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in raw and (out / "tokenizer_config.json").exists()
    src, dst = CheckpointReader(fp8), CheckpointReader(out)
    assert not [n for n in dst.names() if n.endswith("_scale_inv")]
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    expect = dequantize_weight(src.get(name), src.get(name + "_scale_inv"), torch.bfloat16)
    assert dst.get(name).dtype == torch.bfloat16 and torch.equal(dst.get(name), expect)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = dsv3.load(out, dtype=torch.float32, max_seq_len=16, progress=False)
    tokens = torch.tensor([[0, 5, 9, 300, 7, 42]])
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens, torch.arange(6))
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_convert_refuses_what_does_not_fit(ckpt, tmp_path, monkeypatch):
    """An output larger than the free space is refused before anything is written (here BF16 -> FP8 blocks)."""
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 20))
    res = CliRunner().invoke(main, ["convert", "--checkpoint", str(ckpt), "--out", str(tmp_path / "fp8"),
                                    "--dtype", "fp8"])
    assert res.exit_code == 2 and "GB free" in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_convert_needs_one_mode(ckpt, tmp_path):
    res = CliRunner().invoke(main, ["convert", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "exactly one of" in res.output
    res = CliRunner().invoke(main, ["convert", "--checkpoint", str(ckpt), "--out", str(tmp_path / "y"),
                                    "--dtype", "bf16"])
    assert res.exit_code == 2 and "not an FP8 checkpoint" in res.output


def _blocks_f64(t: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/128), ceil(K/128), 128 * 128] float64, edge blocks padded with zeros."""
    n, k = t.shape
    p = torch.zeros(-(-n // 128) * 128, -(-k // 128) * 128, dtype=torch.float64)
    p[:n, :k] = t.double()
    return p.unflatten(0, (-1, 128)).unflatten(2, (-1, 128)).permute(0, 2, 1, 3).flatten(2)


def test_fp8_quantization_of_a_bf16_checkpoint(tmp_path):
    cfg = resolve_config("tiny-ragged")  # partial edge blocks (80 kv_a rows)
    bf16 = write_random_checkpoint(cfg, tmp_path / "bf16", dtype="bf16", seed=5, max_shard_size=400_000,
                                   progress=False)
    out = tmp_path / "fp8"
    res = CliRunner().invoke(main, ["convert", "--checkpoint", str(bf16), "--out", str(out), "--dtype", "fp8",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization_config"] == FP8Quantization().to_hf() and (out / "tokenizer.json").exists()
    src, dst = CheckpointReader(bf16), CheckpointReader(out)
    quantized = [n for n in dst.names() if dst.spec(n).dtype == FP8_DTYPE]
    # every projection of every layer, and nothing else: embedding, head, norms and router stay as they were
    assert len(quantized) == len([n for n in dst.names() if n.endswith("_scale_inv")]) > 0
    assert {n.split(".")[-2] for n in quantized} >= {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"}
    for n in src.names():
        if n not in quantized:
            assert torch.equal(dst.get(n), src.get(n)), n
    for n in quantized:
        assert dst.file_of(n + "_scale_inv") == dst.file_of(n)
        w, q, s = _blocks_f64(src.get(n)), _blocks_f64(dst.get(n).float()), dst.get(n + "_scale_inv").double()
        amax = w.abs().amax(-1)
        # the scale is the block's amax / 448 (to float32 rounding), so the block's largest element becomes +-448
        assert torch.allclose(s, amax / FP8_MAX, rtol=2e-7, atol=0), n
        assert torch.equal(q.abs().amax(-1), torch.full_like(amax, FP8_MAX)), n
        # each value is within half an e4m3 step of w / scale (3 mantissa bits; below 2^-6 the subnormal step 2^-9)
        v = (w / s[..., None]).abs()
        step = torch.where(v >= 2.0 ** -6, torch.exp2(torch.floor(torch.log2(v.clamp_min(2.0 ** -6))) - 3), 2.0 ** -9)
        assert ((q - w / s[..., None]).abs() <= 0.5 * step * (1 + 1e-6)).all(), n
    # the quantized checkpoint loads as FP8 and predicts what the BF16 one does, to FP8 precision
    tokens = torch.tensor([[0, 5, 9, 300, 7, 42]])
    with torch.no_grad():
        ref = dsv3.load(bf16, dtype=torch.float32, max_seq_len=16, progress=False)(tokens, torch.arange(6))
        model = dsv3.load(out, dtype=torch.float32, max_seq_len=16, progress=False)
        got = model(tokens, torch.arange(6))
    assert model.layers[0].self_attn.o_proj.weight.dtype == FP8_DTYPE
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert 0 < rel < 0.1, rel


def test_fp8_quantization_covers_mtp_layers_and_refuses_an_fp8_checkpoint(tmp_path):
    cfg = resolve_config("tiny")  # one MTP layer (model.layers.3): its projections are FP8 in V3's checkpoint too
    bf16 = write_random_checkpoint(cfg, tmp_path / "bf16", dtype="bf16", seed=2, progress=False)
    out = convert_to_fp8(bf16, tmp_path / "q", progress=False, device="cpu")
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    dst = CheckpointReader(out)
    assert dst.spec(mtp + "self_attn.o_proj.weight").dtype == FP8_DTYPE
    assert dst.spec(mtp + "eh_proj.weight").dtype == torch.bfloat16  # as in DeepSeek-V3's FP8 release
    assert sorted(dst.names()) == sorted(checkpoint_inventory(dst.config, include_mtp=True))
    fp8 = write_random_checkpoint(cfg, tmp_path / "fp8", dtype="fp8", seed=1, progress=False)
    res = CliRunner().invoke(main, ["convert", "--checkpoint", str(fp8), "--out", str(tmp_path / "again"),
                                    "--dtype", "fp8"])
    assert res.exit_code == 2 and "already an FP8 checkpoint" in res.output
    assert not (tmp_path / "again").exists()


@pytest.mark.gpu
def test_fp8_quantization_on_the_gpu_equals_the_cpu(tmp_path):
    """`convert --device cuda` (the default where there is a GPU) writes the same bytes as on the CPU: one correctly
    rounded division and one round-to-nearest-even cast per element on both."""
    from dsv3.kernels.fp8_blocks import quantize_weight

    gen = torch.Generator().manual_seed(0)
    # a weight-like matrix with ragged edges, outliers and tiny blocks (subnormal e4m3 values after scaling)
    w = (torch.randn(1000, 2100, generator=gen) * 0.02).to(torch.bfloat16)
    w[::97, ::13] *= 300
    w[:128, :128] *= 1e-6
    qc, sc = quantize_weight(w)
    qg, sg = quantize_weight(w.cuda())
    assert torch.equal(sg.cpu(), sc)
    assert torch.equal(qg.cpu().view(torch.uint8), qc.view(torch.uint8))
    bf16 = write_random_checkpoint(resolve_config("tiny-ragged"), tmp_path / "bf16", dtype="bf16", seed=3,
                                   progress=False)
    cpu = CheckpointReader(convert_to_fp8(bf16, tmp_path / "cpu", progress=False, device="cpu"))
    gpu = CheckpointReader(convert_to_fp8(bf16, tmp_path / "gpu", progress=False, device="cuda"))
    assert cpu.names() == gpu.names()
    for n in cpu.names():
        a, b = cpu.get(n), gpu.get(n)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), n
