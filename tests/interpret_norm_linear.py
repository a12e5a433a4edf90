"""`dsv3.add_rms_norm_fp8_linear`'s Triton paths run by the Triton CPU interpreter against the op's reference.

Run in its own process with TRITON_INTERPRET=1 (tests/test_norm_linear.py does). The `fixed_interpreter` fixture
(interpret_kernels.py) makes the interpreter's fp32 -> bf16 / e4m3 casts round to nearest even as the GPU does.
h + delta lie on a coarse grid (`test_norm.grid_inputs`), so the row's sum of squares is exact in any order and
the normalized, quantized x of the kernel is bitwise the reference's; y then differs from the reference's fp32
GEMM only by the order of its fp32 sums. By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_norm_linear.py
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_norm_linear.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import norm_linear as NL  # noqa: E402
from dsv3.kernels.fp8_blocks import dequantize_activation, quantize_activation, quantize_weight  # noqa: E402
from dsv3.kernels.fp8_linear import fp8_linear_reference  # noqa: E402
from dsv3.kernels.rms_norm import rms_norm_rounded  # noqa: E402
import interpret_kernels as IK  # noqa: E402
from kernel_checks import rel_err  # noqa: E402
from test_norm import grid_inputs  # noqa: E402

fixed_interpreter = IK.fixed_interpreter
EPS = 1e-6


def inputs(m, n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    h, delta, norm_w = grid_inputs(m, k, dtype, gen)
    w, ws = quantize_weight(torch.randn(n, k, generator=gen) * 0.05)
    return h, delta, norm_w, w, ws


def reference(h, delta, norm_w, w, ws):
    h_out = h + delta
    return h_out, fp8_linear_reference(rms_norm_rounded(h_out, norm_w, EPS), w, ws)


@pytest.mark.parametrize("m", [1, 3, 4, 6])
@pytest.mark.parametrize("n,k", [(72, 200), (300, 256), (136, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_paths(m, n, k, dtype, fixed_interpreter):
    """m <= 4: the fused rows kernel; m = 6: the add + norm + quant kernel, then the GEMV on the quantized x."""
    h, delta, norm_w, w, ws = inputs(m, n, k, dtype, seed=m * 1000 + n + k)
    h_out, y = NL.add_rms_norm_fp8_linear_triton(h, delta, norm_w, EPS, w, ws)
    r_h, r_y = reference(h, delta, norm_w, w, ws)
    assert h_out.dtype == dtype and y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(h_out, r_h)
    assert rel_err(y, r_y) < 4e-3  # fp32 sum order only: a rare last-bit difference after rounding to 16 bits


@pytest.mark.parametrize("block_n,num_warps", [(1, 1), (4, 2), (16, 4)])
def test_fused_launch_configs_and_leading_dims(block_n, num_warps, fixed_interpreter):
    """[B, S, K] inputs, h a strided view; BLOCK_N not dividing N (the last program's rows masked)."""
    h, delta, norm_w, w, ws = inputs(4, 200, 384, torch.bfloat16, seed=7)
    wide = torch.zeros(4, 400, dtype=torch.bfloat16)
    wide[:, 16:400] = h
    hv = wide[:, 16:].reshape(2, 2, 384)
    assert not hv.is_contiguous()
    h_out, y = NL.add_rms_norm_fp8_linear_triton(hv, delta.view(2, 2, 384), norm_w, EPS, w, ws, block_n=block_n,
                                                  num_warps=num_warps)
    r_h, r_y = reference(h, delta, norm_w, w, ws)
    assert h_out.shape == (2, 2, 384) and y.shape == (2, 2, 200)
    assert torch.equal(h_out.view(4, 384), r_h)
    assert rel_err(y.view(4, 200), r_y) < 4e-3


def test_random_inputs_vs_float64(fixed_interpreter):
    """Off the grid (sum order and rsqrt rounding the kernel's own): y against float64 math within the FP8 bound."""
    gen = torch.Generator().manual_seed(3)
    h = (torch.randn(2, 512, generator=gen) * 3).bfloat16()
    delta = torch.randn(2, 512, generator=gen).bfloat16()
    norm_w = (1 + 0.3 * torch.randn(512, generator=gen)).bfloat16()
    w, ws = quantize_weight(torch.randn(160, 512, generator=gen) * 0.05)
    h_out, y = NL.add_rms_norm_fp8_linear_triton(h, delta, norm_w, EPS, w, ws)
    hf = (h.double() + delta.double())
    x = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS) * norm_w.double()
    wf = w.double() * ws.double().repeat_interleave(128, 0)[:160].repeat_interleave(128, 1)[:, :512]
    assert rel_err(h_out, hf) < 4e-3
    # x quantized per token and 128 channels (the contract). The kernel's x has the model's two bf16 roundings
    # (x * r, then the weight product); this x one. A bf16 ulp of x moves its e4m3 value by a whole step (~6-12%)
    # for ~3% of the elements: ~1.6% relative error on these inputs, which is what the bound allows for.
    xq = dequantize_activation(*quantize_activation(x.to(torch.bfloat16))).double()
    assert rel_err(y, xq @ wf.t()) < 3e-2
    assert rel_err(y, x @ wf.t()) < 5e-2  # the e4m3 activation rounding itself (3 mantissa bits)
