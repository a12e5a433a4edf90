"""`dsv3c bench` on CPU (smoke: no timings asserted) and the roofline byte count against a hand count."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dsv3.cli import main
from dsv3.config import resolve_config
from dsv3.model import Transformer
from dsv3.runtime.bench import expected_unique_experts, step_bytes


def test_expected_unique_experts():
    assert expected_unique_experts(64, 6, 1) == pytest.approx(6)
    assert expected_unique_experts(64, 6, 1000) == pytest.approx(64, rel=1e-6)
    assert 6 < expected_unique_experts(64, 6, 8) < 48


def test_step_bytes_hand_count():
    cfg = resolve_config("tiny")  # bf16 weights
    with torch.device("meta"):
        m = Transformer(cfg, dtype=torch.bfloat16, max_batch_size=2, max_seq_len=64)
    d, v, e, i, k = cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts, cfg.moe_intermediate_size, 4
    expert = 3 * i * d * 2
    total_params = sum(t.numel() * 2 for n, t in m.state_dict().items() if t.dtype == torch.bfloat16)
    bias = sum(t.numel() * 4 for n, t in m.state_dict().items() if t.dtype == torch.float32)
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    non_expert = total_params + bias - v * d * 2 - moe_layers * e * expert
    cache = 1 * 40 * cfg.latent_dim * 2 * cfg.num_hidden_layers
    expected = non_expert + 1 * d * 2 + int(expert * k * moe_layers) + cache
    assert step_bytes(m, batch=1, context=40) == pytest.approx(expected, rel=1e-6)


def test_bench_cli_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--random-weights", "--config", "tiny", "--eager", "--device", "cpu",
                                    "--dtype", "float32", "--batch-sizes", "1,2", "--context", "8,24", "--steps", "3",
                                    "--prompt-len", "16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "copy bandwidth" in res.output and "roofline" in res.output and "prefill 16 tokens" in res.output
    report = json.loads(out.read_text())
    assert [(r["batch"], r["context"]) for r in report["decode"]] == [(1, 8), (1, 24), (2, 8), (2, 24)]
    assert all(r["ms_per_token"] > 0 and 0 < r["fraction_of_roofline"] for r in report["decode"])
    res = CliRunner().invoke(main, ["bench", "--eager", "--config", "tiny"])
    assert res.exit_code == 2 and "--random-weights" in res.output


def test_bench_hf_baseline(tmp_path):
    from dsv3.init_random import write_random_checkpoint

    ckpt = write_random_checkpoint(resolve_config("tiny"), tmp_path / "ck", dtype="bf16", progress=False)
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", "--checkpoint", str(ckpt), "--eager", "--device", "cpu", "--dtype",
                                    "float32", "--batch-sizes", "1", "--context", "8", "--steps", "3",
                                    "--prompt-len", "8", "--baseline", "hf", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["baseline_hf"][0]["batch"] == 1 and report["baseline_hf"][0]["ms_per_token"] > 0
    assert "vs hf" in res.output
