"""`dsv3.moe_residual_norm_quant`'s Triton kernel and `dsv3.fp8_linear_quantized`'s Triton GEMM path, run by the
Triton CPU interpreter against their plain-torch references.

Not collected by the normal suite (the name does not start with `test_`): `tests/test_moe_residual.py` runs it in
a subprocess with TRITON_INTERPRET=1. By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_moe_residual.py

Every test uses interpret_kernels.py's `fixed_interpreter` (fp32 -> bf16 / e4m3 casts through torch). As in
interpret_norm.py, the bitwise cases put every value on a coarse grid so that the sum of squares is exact in fp32 in
any order (the one per-row value whose order is the kernel's own): pair outputs a / 16 * 2^e with |a| <= 8 and
weights 1/4 (products and their sum exact, |sum| <= 2^(e-1)), the shared output and h on the 1 / 16 * 2^e grid with
|.| <= 2^e, so h_out is exact in bf16 below 2^(e+2) on a 2^(e-6) grid and D <= 256 squares sum exactly.
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_moe_residual.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import fp8_linear as L  # noqa: E402
from dsv3.kernels import moe_residual_norm as MR  # noqa: E402
from dsv3.kernels.fp8_blocks import quantize_weight  # noqa: E402
import interpret_kernels as IK  # noqa: E402
from kernel_checks import rel_err  # noqa: E402

fixed_interpreter = IK.fixed_interpreter  # the fixture of interpret_kernels.py (casts through torch)

EPS = 1e-6
N_EXPERTS = 10


def grid_case(t: int, k: int, d: int, gen: torch.Generator):
    """(h, pairs, idx, weight, shared, norm_weight) on the module docstring's grid; per token one invalid id (-1 or
    >= N_EXPERTS) whose pair row is NaN, the rest distinct valid ids."""
    e = 2.0 ** torch.randint(-4, 5, (t, 1), generator=gen).float()
    h = torch.randint(-16, 17, (t, d), generator=gen).float() / 16 * e
    shared = torch.randint(-16, 17, (t, d), generator=gen).float() / 16 * e
    pairs = torch.randint(-8, 9, (t, k, d), generator=gen).float() / 16 * e[:, :, None]
    idx = torch.stack([torch.randperm(N_EXPERTS, generator=gen)[:k] for _ in range(t)])
    bad = torch.randint(0, k, (t,), generator=gen)
    idx[torch.arange(t), bad] = torch.where(torch.rand(t, generator=gen) < 0.5, -1, N_EXPERTS + 3)
    pairs[torch.arange(t), bad] = float("nan")
    w = torch.full((t, k), 0.25)
    norm_w = ((1.0 + 0.3 * torch.randn(d, generator=gen)) * torch.where(torch.rand(d, generator=gen) < 0.1, -1, 1))
    return (h.bfloat16(), pairs.bfloat16(), idx, w, shared.bfloat16(), norm_w.bfloat16())


def run_both(case, pad_k: int, shape=None):
    h, pairs, idx, w, shared, nw = case
    if shape is not None:
        h, shared = h.view(*shape, -1), shared.view(*shape, -1)
    args = (h, pairs, idx, w, shared, N_EXPERTS, nw, EPS, pad_k)
    return MR.moe_residual_norm_quant_triton(*args), MR.moe_residual_norm_quant_reference(*args)


def assert_bitwise(got, ref):
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), (a.shape, b.shape)
        bits = (lambda t: t.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn else (lambda t: t)
        assert torch.equal(bits(a), bits(b)), f"{a.dtype}: {(bits(a) != bits(b)).sum().item()} elements differ"


@pytest.mark.parametrize("t,k,d,pad_k", [(1, 4, 200, 4), (3, 4, 256, 1), (6, 7, 256, 4), (9, 2, 128, 1)])
def test_kernel_bitwise(t, k, d, pad_k, fixed_interpreter):
    """h_out, x_q and x_scale (rows padded to 4, K to pad_k blocks, M-major) bitwise the reference, with NaN rows of
    invalid pairs ignored."""
    got, ref = run_both(grid_case(t, k, d, torch.Generator().manual_seed(t * 100 + k + d)), pad_k)
    mp, kbt = -(-t // 4) * 4, -(-(-(-d // 128)) // pad_k) * pad_k
    assert got[1].shape == (mp, kbt * 128) and got[2].shape == (mp, kbt) and got[2].stride() == (1, mp)
    assert_bitwise(got, ref)


def test_kernel_leading_dims(fixed_interpreter):
    """h and shared as [B, S, D] (the model's), pairs [B*S, K, D]."""
    got, ref = run_both(grid_case(6, 4, 256, torch.Generator().manual_seed(7)), 4, shape=(2, 3))
    assert got[0].shape == (2, 3, 256)
    assert_bitwise(got, ref)


def test_kernel_random_inputs(fixed_interpreter):
    """Random data at D = 576 (ragged blocks): h_out bitwise (the same fp32 operations in the same order); x_q /
    x_scale within e4m3's rounding of the reference's (the sum of squares may round differently by an ulp)."""
    gen = torch.Generator().manual_seed(3)
    t, k, d = 5, 6, 576
    h = (torch.randn(t, d, generator=gen) * 3).bfloat16()
    pairs = torch.randn(t, k, d, generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(N_EXPERTS, generator=gen)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=gen)
    shared = torch.randn(t, d, generator=gen).bfloat16()
    nw = (1.0 + 0.3 * torch.randn(d, generator=gen)).bfloat16()
    args = (h, pairs, idx, w, shared, N_EXPERTS, nw, EPS, 4)
    got, ref = MR.moe_residual_norm_quant_triton(*args), MR.moe_residual_norm_quant_reference(*args)
    assert torch.equal(got[0], ref[0])
    deq = lambda q, s: q.float().view(q.shape[0], -1, 128) * s[:, :, None]  # noqa: E731
    assert rel_err(deq(got[1], got[2]), deq(ref[1], ref[2])) < 1e-2
    assert torch.equal(got[1][t:].float(), torch.zeros_like(got[1][t:].float()))  # padding rows: zeros


def test_linear_quantized_triton_gemm(fixed_interpreter):
    """fp8_linear_quantized's non-cuBLAS path (the Triton tiled GEMM on x_q / x_scale, K padding columns dropped)
    against the reference on a ragged N, K = 256 padded to 4 blocks (the interpreter runs the GEMM the op calls)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 256, generator=gen).bfloat16()
    wq, ws = quantize_weight(torch.randn(200, 256, generator=gen) * 0.1)
    xq, xs = L.act_quant(x, pad_rows_to=4, scales_m_major=True, pad_k_blocks_to=4, pad_k=True)
    got = L.fp8_gemm(xq[:6, :256], xs[:6, :2], wq, ws, torch.bfloat16)  # the op's call on the GPU without cuBLAS
    want = L.fp8_linear_quantized_reference(xq, xs, 6, wq, ws, torch.bfloat16)
    assert got.shape == want.shape == (6, 200)
    assert rel_err(got, want) < 1e-2
    assert torch.equal(want, L.fp8_linear_reference(x, wq, ws))
