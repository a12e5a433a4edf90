"""dsv3::one_shot_all_reduce on two GPUs (NCCL + symmetric memory), eager and inside a CUDA graph.

The CPU side (gloo: the op reduces through the group's functional all-reduce) runs in test_parallel.py (eager
model) and test_artifacts.py (AOTInductor packages that call the op).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "one_shot_gpu.py"


@pytest.mark.gpu
def test_one_shot_all_reduce_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this host has {torch.cuda.device_count()} (run on nvidia-h200-x2)")
    out = tmp_path / "report.json"
    env = dict(os.environ, TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NCCL_NVLS_ENABLE="0")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["symmetric"] and not report["plain_is_symmetric"]
    assert len(report["checks"]) == 6
    for check in report["checks"]:
        # two bf16 addends: the one-shot sum is the float64 sum rounded once to bf16 (relative error <= 2^-8)
        assert check["finite"] and check["max_rel_err"] <= 2 ** -8, check
