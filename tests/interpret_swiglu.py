"""`dsv3.fp8_swiglu`'s Triton kernel (SiLU-mul fused with the 1x128 quantization of h), run by the Triton CPU
interpreter against `quantize_activation(F.silu(g) * u)`, bitwise; also with g and u the column halves of one
output (the fused gate / up GEMM's).

Not collected by the normal suite: `tests/test_swiglu.py` runs it in a subprocess with TRITON_INTERPRET=1. By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_swiglu.py

Uses interpret_kernels.py's `fixed_interpreter` (fp32 -> bf16 / e4m3 casts through torch: the interpreter's own
truncate or mis-round).
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_swiglu.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dsv3.kernels.fp8_blocks import quantize_activation  # noqa: E402
from dsv3.kernels.fp8_swiglu import silu_mul_quant  # noqa: E402
import interpret_kernels as IK  # noqa: E402

fixed_interpreter = IK.fixed_interpreter


@pytest.mark.parametrize("m,n,pad", [(1, 128, 1), (3, 384, 4), (4, 2816, 4), (17, 256, 1), (5, 1408, 1), (67, 256, 4)])
def test_silu_mul_quant_matches_reference(fixed_interpreter, m, n, pad):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    g = (torch.randn(m, n, generator=gen) * 3).to(torch.bfloat16)
    u = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    u[0, :128] *= 1e-3  # a small block: its own scale
    q, s = silu_mul_quant(g, u, pad_k_blocks_to=pad)
    nb = n // 128
    kb = -(-nb // pad) * pad
    assert q.shape == (m, kb * 128) and s.shape == (m, kb) and s.stride() == (1, m)  # scales M-major
    want_q, want_s = quantize_activation(F.silu(g) * u)  # eager rounding: silu to bf16, then the product
    assert torch.equal(s[:, :nb], want_s)
    assert torch.equal(q[:, :n].view(torch.uint8), want_q.view(torch.uint8))
    assert not q[:, n:].view(torch.uint8).any()  # padding blocks: quantized zeros


def test_silu_mul_quant_reads_column_slices(fixed_interpreter):
    """g and u as the two column halves of one [M, 2N] output (dsv3.fp8_swiglu's fused gate / up GEMM): read
    through their row stride 2N, the result of contiguous copies."""
    gen = torch.Generator().manual_seed(7)
    m, n = 5, 384
    gu = (torch.randn(m, 2 * n, generator=gen) * 2).to(torch.bfloat16)
    g, u = gu[:, :n], gu[:, n:]
    assert g.stride() == u.stride() == (2 * n, 1)
    q, s = silu_mul_quant(g, u, pad_k_blocks_to=4)
    want_q, want_s = silu_mul_quant(g.contiguous(), u.contiguous(), pad_k_blocks_to=4)
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    ref_q, ref_s = quantize_activation(F.silu(g) * u)
    assert torch.equal(s[:, :n // 128], ref_s) and torch.equal(q[:, :n].view(torch.uint8), ref_q.view(torch.uint8))
