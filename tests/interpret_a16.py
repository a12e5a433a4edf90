"""The W8A16 kernels (bf16 batch-1 activations) run by the Triton CPU interpreter, against float64 references.

Not collected by the normal suite (the name does not start with `test_`): `tests/test_a16.py` runs this file in a
subprocess with TRITON_INTERPRET=1 (the flag must be set before triton is imported). By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_a16.py

No activation is quantized on this path, so the interpreter's unreliable fp32 -> e4m3 cast never runs: x and h are
read in bf16 and widened to fp32, the e4m3 weights are widened to fp32 (an exact cast). What the interpreter cannot
do exactly is its fp32 -> bf16 cast (it truncates), so the GEMV writes fp32 outputs where exactness is checked, and
the experts (gate, up, SiLU and h rounded to bf16, as the reference rounds them) run under interpret_kernels.py's
`fixed_interpreter` fixture (casts through torch, round to nearest even).
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_a16.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import fp8_linear as L  # noqa: E402
from dsv3.kernels import routed_experts as RE  # noqa: E402
from dsv3.kernels.fp8_blocks import dequantize_weight, quantize_weight  # noqa: E402
from interpret_kernels import fixed_interpreter  # noqa: E402,F401  (fixture: RTNE casts, as the GPU's)
from kernel_checks import rel_err  # noqa: E402

# ragged N and K (not multiples of 128; 1408 = 11 blocks, 320 = 2.5), M = 1 (the model's use) and a few tokens
GEMV_CASES = [(1, 576, 2048, 8, 8), (1, 200, 1408, 2, 4), (1, 128, 320, 1, 1), (3, 200, 320, 4, 2),
              (5, 136, 1408, 8, 4)]


def _x64(x: torch.Tensor) -> torch.Tensor:
    return x.double()


@pytest.mark.parametrize("m,n,k,block_n,num_warps", GEMV_CASES)
def test_gemv_a16_against_float64(m, n, k, block_n, num_warps):
    """y = x @ dequant(W)^T with x unquantized: the kernel's fp32 sums of exact products times the block scales."""
    gen = torch.Generator().manual_seed(m * 7 + n + k)
    w, s = quantize_weight(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).float()  # bf16 values, fp32 storage: fp32 output
    ref = _x64(x) @ dequantize_weight(w, s).double().t()
    out = L.fp8_gemv_a16(x, w, s, block_n=block_n, num_warps=num_warps)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-6
    # the op's dispatch on CUDA (the same kernel; bf16 in and out, the interpreter's bf16 cast truncates)
    y = L.fp8_linear_a16_triton(x.to(torch.bfloat16), w, s)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 8e-3
    # and the CPU reference the op runs there
    assert rel_err(L.fp8_linear_a16_reference(x, w, s), ref) < 1e-6


def test_gemv_a16_is_not_w8a8():
    """The W8A16 result differs from the W8A8 one by the activation quantization error (e4m3: ~2-3% per element),
    so a kernel that quantized x after all would fail the float64 check above; here: that difference is real."""
    gen = torch.Generator().manual_seed(11)
    w, s = quantize_weight(torch.randn(64, 512, generator=gen))
    x = torch.randn(1, 512, generator=gen)
    ref = x.double() @ dequantize_weight(w, s).double().t()
    a16 = L.fp8_gemv_a16(x, w, s)
    w8a8 = L.fp8_linear_reference(x, w, s)
    assert rel_err(a16, ref) < 1e-6 < 1e-3 < rel_err(w8a8, ref)


def test_a16_config():
    """Rows configs: A16_TUNED's, else 4 rows at 8 warps within <= 128 weight values per thread."""
    assert L.gemv_a16_config(1, 7168, 2048) == (4, 4)         # 671B-tp8 o_proj: a measured row
    assert L.gemv_a16_config(1, 2112, 7168) == (4, 8)         # 671B-tp8 qkv_a: the rule (64 blocks of 128)
    assert L.gemv_a16_config(1, 576, 320) == (4, 8)
    bn, nw = L.gemv_a16_config(1, 4096, 16384)                 # 128 blocks of 128: 2 rows at 8 warps
    assert (bn, nw) == (2, 8) and bn * 16384 // (32 * nw) <= L.A16_VALUES_PER_THREAD
    for (n, k), (bn, nw) in L.A16_TUNED.items():
        assert 128 % bn == 0 and bn * L.next_pow2(L.cdiv(k, 128)) * 128 // (32 * nw) <= 2 * L.A16_VALUES_PER_THREAD


# experts: (D, I, routed experts, shared slots, top-k); D and I ragged, ids include other ranks' (-1, E)
MOE_CASES = [(300, 136, 6, 2, 3), (256, 130, 5, 0, 2)]  # (I 136 rather than 200: a third fewer row programs)


@pytest.mark.parametrize("d,i,e_routed,n_shared,k", MOE_CASES)
@pytest.mark.parametrize("plan", ["table", "rows"])
def test_routed_experts_a16(d, i, e_routed, n_shared, k, plan, fixed_interpreter):
    """One token, quant_act=False: the row-parallel up and down kernels on bf16 x and h, against the reference with
    the same rounding points (gate, up, SiLU, h in bf16) and no quantization; the pairs form (the model's) too."""
    gen = torch.Generator().manual_seed(d + i + k)
    e = e_routed + n_shared
    x = torch.randn(1, d, generator=gen).to(torch.bfloat16)
    ids = torch.randperm(e_routed, generator=gen)[:k].tolist() + list(range(e_routed, e))
    idx = torch.tensor([ids + [-1, e]])  # two ids of other ranks: nothing
    wt = torch.rand(idx.shape, generator=gen)
    ws = [torch.randn(e, i, d, generator=gen) * 0.1, torch.randn(e, i, d, generator=gen) * 0.1,
          torch.randn(e, d, i, generator=gen) * 0.1]
    q = [quantize_weight(w) for w in ws]
    w = [q[0][0], q[1][0], q[2][0], q[0][1], q[1][1], q[2][1]]
    kw = {} if plan == "table" else dict(up_block_n=4, up_num_warps=2, down_block_n=2, down_num_warps=2)
    out = RE.routed_experts_triton(x, idx, wt, *w, quant_act=False, **kw)
    ref = RE.routed_experts_reference(x, idx, wt, *w, quant_act=False)
    assert out.dtype == x.dtype and rel_err(out, ref) < 1e-3  # the same rounding points: fp32 sum order only
    pairs = RE.routed_experts_triton(x, idx, None, *w, quant_act=False, combine=False, **kw)
    assert rel_err(RE.combine_pairs(pairs, idx, wt, e), out) < 1e-5
    # float64 of the same arithmetic: experts on dequantized weights with h rounded to bf16 as the reference does
    x64 = x.double()
    want = torch.zeros(1, d, dtype=torch.float64)
    for j, ex in enumerate(idx[0].tolist()):
        if 0 <= ex < e:
            g, u, dn = (dequantize_weight(q[n][0][ex], q[n][1][ex]).double() for n in range(3))
            h = (torch.nn.functional.silu(x64 @ g.t()) * (x64 @ u.t())).to(torch.bfloat16).double()
            want += wt[0, j].double() * (h @ dn.t())
    assert rel_err(out, want) < 2e-2
