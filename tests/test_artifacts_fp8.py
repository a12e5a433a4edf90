"""FP8 artifacts with the prefill copies of weights (Transformer.add_prefill_copies_), compiled on the CPU with the
compile-time verification. A file of its own so the two CI workers build it beside tests/test_artifacts.py's
artifacts (pytest-xdist distributes by file).
"""

from __future__ import annotations

import torch
from click.testing import CliRunner

import dsv3
from dsv3.cli import main
from dsv3.config import resolve_config
from dsv3.generate import generate
from dsv3.init_random import write_random_checkpoint
from dsv3.runtime.engine import artifact_stepper
from dsv3.runtime.manifest import read_manifest
from dsv3.runtime.parallel import ParallelPlan


def test_fp8_prefill_copies_in_packages(tmp_path):
    """FP8 with two stacked shared experts (tiny-v2): the prefill graphs read the prefill copies of weights
    (kv_b_proj dequantized, the shared experts' down projections side by side, their gate / up rows as one matrix)
    as run-time constants, the decode graphs do not; the compile-time verification (packages against the eager
    model) passes, and the runtime's greedy tokens equal the eager model's (loaded plainly: no layout, no copies)."""
    # one MoE layer (its two shared experts stacked as slots): the least a package with every copy needs
    cfg = resolve_config("tiny-v2").replace(num_hidden_layers=1, first_k_dense_replace=0)
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype="fp8", seed=4, progress=False)
    out = tmp_path / "art"
    res = CliRunner().invoke(main, ["compile", "--config", str(ckpt), "--device", "cpu", "--out", str(out),
                                    "--max-batch-size", "1", "--max-seq-len", "32", "--batch-sizes", "1",
                                    "--prefill-chunk", "16", "--dtype", "float32"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = read_manifest(out)
    assert m["rank_layout"]["prefill_copies"] == 3  # kv_b dequantized, the packed down and gate / up slots
    res = CliRunner().invoke(main, ["inspect", str(out)])
    assert "3 prefill copies of weights" in res.output
    prompt = [0, 5, 9, 13, 200, 7, 81, 44, 3, 17, 99, 12, 4, 4, 60, 61, 62, 63, 2]  # 19 tokens: two prefill chunks
    eager = dsv3.load(ckpt, dtype=torch.float32, max_batch_size=1, max_seq_len=32, progress=False)
    stepper, _ = artifact_stepper(out, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    want, _ = generate(eager, [prompt], max_new_tokens=6)
    got, _ = generate(stepper, [prompt], max_new_tokens=6)
    assert [c.tokens for c in got] == [c.tokens for c in want]
