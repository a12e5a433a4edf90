"""Helpers shared by the kernel tests (interpreter scripts and GPU tests); not a test module itself.

Imported after the interpreter scripts have set TRITON_INTERPRET=1: nothing here imports triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.kernels.fp8_blocks import (
    FP8_DTYPE,
    ceil_div,
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def check_env_switch(monkeypatch, name: str, choice, default, valid: str | None = None) -> None:
    """A DSV3_* trace-time switch read by `choice()`: a valid value is returned as given, a typo fails naming the
    variable, and without the variable `choice()` returns `default`."""
    if valid is not None:
        monkeypatch.setenv(name, valid)
        assert choice() == valid
    monkeypatch.setenv(name, "bogus")
    with pytest.raises(ValueError, match=name):
        choice()
    monkeypatch.delenv(name)
    assert choice() == default


def run_interpreted(script: str, *pytest_args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run tests/SCRIPT (an interpreter test file) with pytest in a fresh process under TRITON_INTERPRET=1: the flag
    must be set before triton is imported, and the rest of the suite imports triton normally. GPU selection and
    trace-time path pins (DSV3_GEMV_VARIANT, DSV3_GEMV_TABLE, DSV3_MOE_DECODE) are not passed on."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    for name in ("CUDA_VISIBLE_DEVICES", "DSV3_GEMV_VARIANT", "DSV3_GEMV_TABLE", "DSV3_MOE_DECODE"):
        env.pop(name, None)
    here = Path(__file__).resolve().parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args, str(here / script)]
    return subprocess.run(cmd, env=env, cwd=here.parent, capture_output=True, text=True, timeout=timeout)


def interpreter_failure(res: subprocess.CompletedProcess) -> str:
    return f"interpreter tests failed:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in float64; a non-finite output (an element never written) fails outright."""
    assert torch.isfinite(out).all(), "non-finite (unwritten?) output elements"
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def exactly_quantizable(m: int, k: int, gen: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """[m, k] activations whose per-128 quantization is exact: each block is e4m3 values times 2^e with one entry
    +-448, so the block scale is 2^e (amax / 448, exact) and x / scale is the e4m3 value itself. Lets tests check
    kernels that quantize in-program despite the interpreter's unreliable fp32 -> e4m3 cast."""
    kb = ceil_div(k, 128)
    q = torch.randn(m, kb * 128, generator=gen).clamp(-400, 400).to(FP8_DTYPE).float()
    rows = torch.arange(m)
    for b in range(kb):
        col = torch.randint(b * 128, min(k, (b + 1) * 128), (m,), generator=gen)
        q[rows, col] = torch.where(torch.rand(m, generator=gen) < 0.5, -448.0, 448.0)
    e = torch.randint(-12, 4, (m, kb), generator=gen).float()
    x = q[:, :k] * (2.0 ** e).repeat_interleave(128, dim=1)[:, :k]
    assert torch.equal(x.to(dtype).float(), x)
    return x.to(dtype)


def moe_shared_slot_idx(t: int, n_routed: int, k_routed: int, n_shared: int, gen: torch.Generator,
                        n_invalid: int = 0, device="cpu") -> torch.Tensor:
    """[T, n_invalid + k_routed + n_shared] int64 expert ids as the model routes with shared experts stacked as extra
    slots: per token `k_routed` distinct routed ids in [0, n_routed), then the always-on shared slots n_routed ..
    n_routed + n_shared - 1; `n_invalid` leading ids outside [0, n_routed + n_shared) (other ranks' experts under
    expert parallelism, which must contribute nothing). `gen` is a CPU generator."""
    e = n_routed + n_shared
    rows = []
    for _ in range(t):
        routed = torch.randperm(n_routed, generator=gen)[:k_routed]
        bad = torch.randint(e, e + 1000, (n_invalid,), generator=gen) * torch.where(
            torch.rand(n_invalid, generator=gen) < 0.5, 1, -1)
        rows.append(torch.cat([bad, routed, torch.arange(n_routed, e)]))
    return torch.stack(rows).to(device)


def fp8_ref64(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 W8A8 reference. Quantizes on the CPU: CUDA evaluates quantize_activation's `amax / 448` as a multiply
    by the reciprocal (one ulp off for about half the blocks), which moves values sitting on e4m3 rounding ties;
    the kernels divide exactly."""
    xq, xs = (t.to(x.device) for t in quantize_activation(x.cpu()))
    return dequantize_activation(xq, xs).double() @ dequantize_weight(w, s).double().t()


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched inside it (`names`): which ops a model call ran."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def poison_allocator() -> None:
    """Fill the caching allocator's free blocks with NaN, so any output element a kernel forgets to write shows."""
    bufs = [torch.full((64 << 20,), float("nan"), device="cuda") for _ in range(4)]
    bufs += [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(64)]
    del bufs


class ErrorLog:
    """The largest measured error per check, written as JSON to $OUT/<filename> (device runs keep them)."""

    def __init__(self, filename: str):
        self.filename, self.errors = filename, {}

    def note(self, name: str, err: float) -> float:
        self.errors[name] = max(err, self.errors.get(name, 0.0))
        return err

    def write(self) -> None:
        if self.errors and os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], self.filename), "w") as f:
                json.dump(self.errors, f, indent=1, sort_keys=True)
