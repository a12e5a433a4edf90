"""`dsv3.add_rms_norm_quant`'s Triton kernel and `dsv3.routed_experts`' pre-quantized x, run by the Triton CPU
interpreter against their plain-torch references.

Not collected by the normal suite (the name does not start with `test_`): `tests/test_norm.py` runs it in a
subprocess with TRITON_INTERPRET=1, which must be set before triton is imported. By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_norm.py

The kernel rounds intermediates itself (h_out, x * r and y to bf16/fp16, y to e4m3), so every test uses the
`fixed_interpreter` fixture of interpret_kernels.py (fp32 -> bf16 / fp16 / e4m3 casts through torch; the
interpreter's own truncate or mis-round). Bitwise comparisons of y need one more thing: the fp32 sum of squares
is the only value whose order of operations is the kernel's own (numpy's pairwise sum here, torch's vectorized
cascade in the reference: they differ in about half the rows of random data), so the bitwise cases use
activations on a coarse grid (k / 16 times a power of two per row) whose squares sum exactly in fp32 in any
order (`test_norm.grid_inputs`); `test_kernel_random_inputs` checks random data to one ulp, and y_q / y_scale
there bitwise against quantize_activation of the kernel's own y. (The reciprocal square root is one more value per
row: the kernel's RN(1 / RN(sqrt)) and CPU torch.rsqrt (MKL for some sizes) may differ by an fp32 ulp, which moves
a bf16 y element with odds of ~2^-16 each; the seeded cases here show no such element.)
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_norm.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import rms_norm as N  # noqa: E402
from dsv3.kernels import routed_experts as RE  # noqa: E402
from dsv3.kernels.fp8_blocks import quantize_activation  # noqa: E402
import interpret_kernels as IK  # noqa: E402
from kernel_checks import moe_shared_slot_idx, rel_err  # noqa: E402
from test_norm import grid_inputs  # noqa: E402  (h + delta on a grid: an order-independent sum of squares)

fixed_interpreter = IK.fixed_interpreter  # the fixture of interpret_kernels.py (casts through torch)

EPS = 1e-6


def check_bitwise(got, ref):
    h_out, y, y_q, y_scale = got
    r_h, r_y, r_q, r_s = ref
    assert h_out.dtype == r_h.dtype and y.dtype == r_y.dtype and y_q.dtype == r_q.dtype and y_scale.dtype == r_s.dtype
    assert h_out.shape == r_h.shape and y.shape == r_y.shape and y_q.shape == r_q.shape and y_scale.shape == r_s.shape
    assert torch.equal(h_out, r_h)
    assert torch.equal(y, r_y), f"y differs in {(y != r_y).sum().item()} elements"
    assert torch.equal(y_q.view(torch.uint8), r_q.view(torch.uint8))
    assert torch.equal(y_scale, r_s)


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("d", [64, 200, 576, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_bitwise(rows, d, dtype, fixed_interpreter):
    gen = torch.Generator().manual_seed(rows * 10000 + d + (dtype == torch.float16))
    h, delta, weight = grid_inputs(rows, d, dtype, gen)
    got = N.add_rms_norm_quant_triton(h, delta, weight, EPS)
    check_bitwise(got, N.add_rms_norm_quant_reference(h, delta, weight, EPS))


def test_kernel_leading_dims_and_strided_rows(fixed_interpreter):
    """[B, S, D] inputs (flattened to rows), h a row-strided view of a wider tensor, y_scale [B, S, ceil(D/128)]."""
    gen = torch.Generator().manual_seed(5)
    h, delta, weight = grid_inputs(6, 200, torch.bfloat16, gen)
    wide = torch.zeros(6, 264, dtype=torch.bfloat16)
    wide[:, 8:208] = h
    hv = wide[:, 8:208].reshape(2, 3, 200)
    assert not hv.is_contiguous()
    got = N.add_rms_norm_quant_triton(hv, delta.reshape(2, 3, 200), weight, EPS)
    assert got[3].shape == (2, 3, 2) and all(t.is_contiguous() for t in got)
    check_bitwise(got, N.add_rms_norm_quant_reference(h.reshape(2, 3, 200), delta.reshape(2, 3, 200), weight, EPS))


@pytest.mark.parametrize("d", [200, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_random_inputs(d, dtype, fixed_interpreter):
    """Random data: h_out bitwise; y within one ulp of the reference where the sum of squares rounds differently;
    y_q / y_scale exactly quantize_activation of the kernel's own y."""
    gen = torch.Generator().manual_seed(d + 3)
    h = (torch.randn(9, d, generator=gen) * 3).to(dtype)
    delta = torch.randn(9, d, generator=gen).to(dtype)
    weight = (1.0 + 0.3 * torch.randn(d, generator=gen)).to(dtype)
    h_out, y, y_q, y_scale = N.add_rms_norm_quant_triton(h, delta, weight, EPS)
    r_h, r_y, _, _ = N.add_rms_norm_quant_reference(h, delta, weight, EPS)
    assert torch.equal(h_out, r_h)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert ((y.float() - r_y.float()).abs() <= ulp * r_y.float().abs()).all()
    assert rel_err(y, r_y) < 1e-3
    q_ref, s_ref = quantize_activation(y)
    assert torch.equal(y_q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(y_scale, s_ref)


@pytest.mark.parametrize("rows,d,pad_k", [(3, 200, 4), (6, 256, 1)])
def test_cublas_kernel(rows, d, pad_k, fixed_interpreter):
    """add_rms_norm_quant_cublas: (y_q, y_scale_cublas) exactly act_quant's cuBLAS layout of y (rows padded to 4,
    K to whole blocks and to pad_k blocks, quantized zeros in the padding, scales M-major); h_out, y, y_scale and
    y_q[:rows, :D] the default op's; bitwise the reference."""
    gen = torch.Generator().manual_seed(rows * 100 + d)
    h, delta, weight = grid_inputs(rows, d, torch.bfloat16, gen)
    got = N.add_rms_norm_quant_cublas_triton(h, delta, weight, EPS, pad_k)
    h_out, y, y_q, y_scale, y_scale_c = got
    mp, kb = -(-rows // 4) * 4, -(-d // 128)
    kbt = -(-kb // pad_k) * pad_k
    assert y_q.shape == (mp, kbt * 128) and y_scale_c.shape == (mp, kbt) and y_scale_c.stride() == (1, mp)
    want_q, want_s = N.act_quant(y, pad_rows_to=4, scales_m_major=True, pad_k_blocks_to=pad_k, pad_k=True)
    assert torch.equal(y_q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(y_scale_c, want_s)
    default = N.add_rms_norm_quant_triton(h, delta, weight, EPS)
    check_bitwise((h_out, y, y_q[:rows, :d], y_scale), default)
    ref = N.add_rms_norm_quant_cublas_reference(h, delta, weight, EPS, pad_k)
    assert ref[4].stride() == (1, mp)
    check_bitwise(got[:4], ref[:4])
    assert torch.equal(y_scale_c, ref[4])


def test_kernel_eps_as_fp64_tensor_scalar(fixed_interpreter):
    """A large eps (it matters in every row) rounded to fp32 as torch rounds the scalar it adds."""
    gen = torch.Generator().manual_seed(8)
    h, delta, weight = grid_inputs(3, 200, torch.bfloat16, gen)
    eps = 0.1 + 1e-9  # not an fp32 value
    check_bitwise(N.add_rms_norm_quant_triton(h, delta, weight, eps),
                  N.add_rms_norm_quant_reference(h, delta, weight, eps))


# ---------------------------------------------------------------------------------------------------------------
# routed_experts with x pre-quantized (x_q / x_scale): the FP8 decode and grouped paths skip their act_quant
# ---------------------------------------------------------------------------------------------------------------

PREQUANT_CASES = [
    # T, grouped, up_block_n (None: the plan's default)
    (1, False, None),   # decode, the up kernel quantizes h
    (1, False, 2),      # decode, the row-parallel up kernel (one token)
    (3, False, None),
    (3, False, 32),     # decode, the down kernel quantizes h
    (70, True, None),   # grouped (T > 64)
]


@pytest.mark.parametrize("t,grouped,up_bn", PREQUANT_CASES)
def test_routed_experts_prequantized_x(t, grouped, up_bn, fixed_interpreter):
    # one token: the row-parallel up kernel runs a program per row pair, costly in the interpreter (I 136 and D 200:
    # still ragged, fewer programs and K blocks)
    e_routed, n_shared, d, i = (6, 2, 200, 136) if t == 1 else (6, 2, 300, 200)
    gen = torch.Generator().manual_seed(2000 + t + (up_bn or 0))
    x, _, _, w = IK._moe_inputs(t, 1, e_routed + n_shared, d, i, True, torch.bfloat16, gen)
    idx = moe_shared_slot_idx(t, e_routed, 3, n_shared, gen, n_invalid=1)
    wt = torch.rand(idx.shape, generator=gen)
    assert grouped == (t > RE.DECODE_MAX_T)
    x_q, x_scale = quantize_activation(x)
    base = RE.routed_experts_triton(x, idx, wt, *w, up_block_n=up_bn)
    got = RE.routed_experts_triton(x, idx, wt, *w, up_block_n=up_bn, x_q=x_q, x_scale=x_scale)
    assert torch.equal(got, base)
    if t in (3, 70):  # x_q inside a larger buffer (add_rms_norm_quant_cublas's padded rows and columns): not read
        padded = torch.full((t + 3, d + 212), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)  # e4m3 NaN
        padded[:t, :d] = x_q
        got = RE.routed_experts_triton(x, idx, wt, *w, up_block_n=up_bn, x_q=padded, x_scale=x_scale)
        assert torch.equal(got, base)
    # x itself is not read on the FP8 paths when x_q is given (only its shape and dtype)
    nan_x = torch.full_like(x, float("nan"))
    assert torch.equal(RE.routed_experts_triton(nan_x, idx, wt, *w, up_block_n=up_bn, x_q=x_q, x_scale=x_scale), base)
    # the reference ignores them (they equal what it computes)
    assert torch.equal(RE.routed_experts_reference(x, idx, wt, *w, x_q, x_scale), RE.routed_experts_reference(x, idx, wt, *w))
    assert rel_err(got, RE.routed_experts_reference(x, idx, wt, *w)) < 1e-3
