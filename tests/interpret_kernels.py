"""Triton kernels of dsv3.kernels run by the Triton CPU interpreter, against their plain-torch references.

Not collected by the normal suite (the name does not start with `test_`): `tests/test_kernels.py` runs this file in
a subprocess with TRITON_INTERPRET=1 in its environment, because the flag must be set before triton is imported and
the rest of the suite imports torch/triton normally. By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_kernels.py

Two interpreter bugs (triton 3.9) matter here, and are handled explicitly:
- its fp32 -> e4m3 cast rounds wrongly at binade edges (124.3 -> 64): the FP8 GEMM tests feed pre-quantized
  activations, and the fused-quantization tests use activations that quantize exactly (power-of-two scales, one
  +-448 per block);
- its fp32 -> bf16 cast truncates, and its `tl.dot` multiplies bf16 operands as raw uint16 bits.
  Tests whose kernels quantize or round intermediates they computed themselves (MoE h, MLA in bf16) use the
  `fixed_interpreter` fixture, which routes those casts through torch (RTNE) and upcasts bf16 dot operands.
  MLA is also checked in fp16 with the interpreter unpatched.
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_kernels.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter as _interp  # noqa: E402

from dsv3.kernels import fp8_linear as L  # noqa: E402
from dsv3.kernels import mla_absorb as AB  # noqa: E402
from dsv3.kernels import mla_attention as A  # noqa: E402
from dsv3.kernels import moe_schedule as MS  # noqa: E402
from dsv3.kernels import routed_experts as RE  # noqa: E402
from kernel_checks import exactly_quantizable, moe_shared_slot_idx, rel_err  # noqa: E402
from dsv3.kernels.fp8_blocks import (  # noqa: E402
    ceil_div,
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
)


@pytest.fixture
def fixed_interpreter(monkeypatch):
    torch_dtypes = {tl.float8e4nv: torch.float8_e4m3fn, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}
    orig_convert = _interp._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst in torch_dtypes:
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy()).to(torch_dtypes[dst])
            return t.view(torch.uint8 if dst.primitive_bitwidth == 8 else torch.int16).numpy().view(
                np.uint8 if dst.primitive_bitwidth == 8 else _interp._get_np_dtype(dst))
        return orig_convert(data, src, dst, rounding_mode)

    orig_dot = _interp.InterpreterBuilder.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def up(h):
            if h.dtype == tl.bfloat16:
                return _interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
            return h
        return orig_dot(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(_interp, "_convert_float", convert)
    monkeypatch.setattr(_interp.InterpreterBuilder, "create_dot", dot)


SHAPES = [(1, 88, 200), (3, 200, 300), (17, 130, 256), (1, 576, 136), (5, 64, 1408)]


# ---------------------------------------------------------------------------------------------------------------
# FP8 linear
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("split", [None, 1, 3])
def test_gemv_prequantized(m, n, k, split):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w, s = quantize_weight(torch.randn(n, k, generator=gen))
    xq, xs = quantize_activation(torch.randn(m, k, generator=gen))
    ref = dequantize_activation(xq, xs).double() @ dequantize_weight(w, s).double().t()
    out = torch.full((m, n), float("nan"))
    out = L.fp8_gemv(xq, w, s, torch.float32, x_scale=xs, split=split)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemv_fused_quantization(m, n, k):
    gen = torch.Generator().manual_seed(7 + m + n + k)
    w, s = quantize_weight(torch.randn(n, k, generator=gen))
    x = exactly_quantizable(m, k, gen)
    ref = L.fp8_linear_reference(x.float(), w, s).double()
    for block_n in (64, 128):
        for fused in (False, True):
            assert rel_err(L.fp8_gemv(x, w, s, torch.float32, block_n=block_n, fused=fused), ref) < 1e-6
    # bf16 output of the whole op path (dispatch at M <= 64)
    y = L.fp8_linear_triton(x, w, s)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 8e-3


@pytest.mark.parametrize("m,n,k", SHAPES + [(70, 96, 384)])
def test_tiled_gemm_prequantized(m, n, k):
    gen = torch.Generator().manual_seed(11 + m + n + k)
    w, s = quantize_weight(torch.randn(n, k, generator=gen))
    xq, xs = quantize_activation(torch.randn(m, k, generator=gen))
    ref = dequantize_activation(xq, xs).double() @ dequantize_weight(w, s).double().t()
    out = L.fp8_gemm(xq, xs, w, s, torch.float32, block_m=16, block_n=32, group_m=2)
    assert rel_err(out, ref) < 1e-6
    # scales stored outer-dim-major (the cuBLAS layout) are read through their strides
    xs_t = xs.t().contiguous().t()
    assert rel_err(L.fp8_gemm(xq, xs_t, w, s, torch.float32, block_m=32, block_n=64), ref) < 1e-6


@pytest.mark.parametrize("m,k", [(1, 200), (3, 1408), (17, 256), (6, 72), (67, 264)])  # 67: 4 rows per program
def test_act_quant_exact(m, k):
    gen = torch.Generator().manual_seed(m + k)
    x = exactly_quantizable(m, k, gen)
    xq_ref, xs_ref = quantize_activation(x)
    q, s = L.act_quant(x)
    assert torch.equal(q.float(), xq_ref.float()) and torch.equal(s, xs_ref)
    q4, s4 = L.act_quant(x, pad_rows_to=4, scales_m_major=True)
    mp = ceil_div(m, 4) * 4
    assert q4.shape == (mp, k) and s4.stride() == (1, mp)
    assert torch.equal(q4[:m].float(), xq_ref.float()) and torch.equal(s4[:m], xs_ref)
    assert (q4[m:].float() == 0).all() and (s4[m:] > 0).all()
    # K padded to whole blocks (cuBLAS's path for a ragged K): zero columns; the ragged block keeps its scale
    qr, sr = L.act_quant(x, pad_rows_to=4, scales_m_major=True, pad_k=True)
    kp = ceil_div(k, 128) * 128
    assert qr.shape == (mp, kp) and sr.shape == (mp, kp // 128) and sr.stride() == (1, mp)
    assert torch.equal(qr[:m, :k].float(), xq_ref.float()) and torch.equal(sr[:m], xs_ref)
    assert (qr[:, k:].float() == 0).all()
    if k % 128 == 0:  # K padded to a multiple of 4 blocks (the AOTI cuBLAS path): zero columns, floor scales
        qk, sk = L.act_quant(x, pad_rows_to=4, scales_m_major=True, pad_k_blocks_to=4)
        kp = ceil_div(k // 128, 4) * 512
        assert qk.shape == (mp, kp) and sk.shape == (mp, kp // 128) and sk.stride() == (1, mp)
        assert torch.equal(qk[:m, :k].float(), xq_ref.float()) and torch.equal(sk[:m, :k // 128], xs_ref)
        assert (qk[:, k:].float() == 0).all() and torch.allclose(sk[:, k // 128:], torch.full_like(sk[:, k // 128:],
                                                                                                 1e-4 / 448))
    # all-zero blocks take the 1e-4 amax floor, as in DeepSeek's act_quant
    z, zs = L.act_quant(torch.zeros(2, k, dtype=torch.bfloat16))
    assert (z.float() == 0).all() and torch.allclose(zs, torch.full_like(zs, 1e-4 / 448))


# ---------------------------------------------------------------------------------------------------------------
# MLA
# ---------------------------------------------------------------------------------------------------------------

MLA_CASES = [
    # B, S, H, T, C, R, n_splits
    (2, 1, 4, 300, 128, 16, None),
    (3, 1, 3, 700, 72, 8, 3),      # several splits, ragged lengths
    (2, 3, 3, 200, 72, 8, 2),      # speculative verify: S=3, causal between the draft tokens
    (1, 2, 16, 100, 128, 16, None),
    (2, 20, 3, 64, 72, 8, None),   # prefill-style: many query rows, one split
    (1, 1, 2, 1500, 16, 16, 7),
]


def _mla_inputs(b, s, h, t, c, r, dtype, gen):
    q = torch.randn(b, s, h, c, generator=gen).to(dtype)
    qp = torch.randn(b, s, h, r, generator=gen).to(dtype)
    cache = torch.randn(b, t, c + r, generator=gen).to(dtype)
    start = torch.randint(0, t - s + 1, (b, 1), generator=gen)
    pos = start + torch.arange(s)[None]
    return q, qp, cache, pos


@pytest.mark.parametrize("case", MLA_CASES)
@pytest.mark.parametrize("swap", [None, True])
def test_mla_fp16(case, swap):
    b, s, h, t, c, r, ns = case
    gen = torch.Generator().manual_seed(sum(case[:-1]))
    q, qp, cache, pos = _mla_inputs(b, s, h, t, c, r, torch.float16, gen)
    block_h = None if swap is None else min(32, max(16, 1 << (s * h - 1).bit_length()))
    out = A.mla_attention_triton(q, qp, cache, pos, 0.12, n_splits=ns, swap=swap, block_h=block_h)
    ref = A.mla_attention_reference(q.double(), qp.double(), cache.double(), pos, 0.12)
    assert out.shape == q.shape and rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("case", MLA_CASES[:3])
def test_mla_bf16(case, fixed_interpreter):
    b, s, h, t, c, r, ns = case
    gen = torch.Generator().manual_seed(3 + sum(case[:-1]))
    q, qp, cache, pos = _mla_inputs(b, s, h, t, c, r, torch.bfloat16, gen)
    # stale garbage past every sequence's length must never be read
    for i in range(b):
        cache[i, int(pos[i].max()) + 1:] = float("nan")
    out = A.mla_attention_triton(q, qp, cache, pos, 0.12, n_splits=ns)
    clean = torch.nan_to_num(cache.double(), nan=0.0)
    ref = A.mla_attention_reference(q.double(), qp.double(), clean, pos, 0.12)
    assert rel_err(out, ref) < 8e-3


def test_mla_default_decode_plan():
    """The decode plan as the model gets it (no overrides): 64-row splits, 8 warps, the combine over the splits that
    ran; rows at different positions, one of them inside the first split."""
    gen = torch.Generator().manual_seed(9)
    q, qp, cache, _ = _mla_inputs(3, 1, 16, 300, 64, 16, torch.float16, gen)
    pos = torch.tensor([[299], [5], [130]])
    plan = A.mla_plan(3, 1, 16, 300, 64, 132)
    assert plan[5] == 64 and plan[4] > 1 and plan[3] == 8  # min_chunk, splits, warps
    out = A.mla_attention_triton(q, qp, cache, pos, 0.12)
    ref = A.mla_attention_reference(q.double(), qp.double(), cache.double(), pos, 0.12)
    assert rel_err(out, ref) < 2e-3


def test_mla_long_cache_decode_plan():
    """The plan over a cache of LONG_CACHE_ROWS rows at 16 heads: 3-stage splits; rows at positions
    inside the first split, across split boundaries and at the end of the cache."""
    gen = torch.Generator().manual_seed(19)
    t_cap = A.LONG_CACHE_ROWS
    q, qp, cache, _ = _mla_inputs(3, 1, 16, t_cap, 64, 16, torch.float16, gen)
    pos = torch.tensor([[t_cap - 1], [5], [1000]])
    plan = A.mla_plan(3, 1, 16, t_cap, 64, 132)
    # 44 splits (132 // 3), each of several 64-row blocks in 3 stages at a full cache
    assert (plan.block_t, plan.min_chunk, plan.n_splits, plan.num_stages) == (64, 64, 44, 3)
    out = A.mla_attention_triton(q, qp, cache, pos, 0.12)
    ref = A.mla_attention_reference(q.double(), qp.double(), cache.double(), pos, 0.12)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("block_c,warps", [(128, 4), (16, 2)])
def test_mla_combine_block_c(block_c, warps):
    """Combine programs of other widths than the default (more or fewer per query row) merge the same splits."""
    gen = torch.Generator().manual_seed(23)
    q, qp, cache, _ = _mla_inputs(2, 1, 3, 400, 72, 8, torch.float16, gen)
    pos = torch.tensor([[399], [70]])
    out = A.mla_attention_triton(q, qp, cache, pos, 0.12, n_splits=5, combine_block_c=block_c, combine_warps=warps)
    ref = A.mla_attention_reference(q.double(), qp.double(), cache.double(), pos, 0.12)
    assert rel_err(out, ref) < 2e-3
    with pytest.raises(ValueError, match="block_c=24"):
        A.mla_attention_triton(q, qp, cache, pos, 0.12, n_splits=5, combine_block_c=24)


def test_mla_combine_whole_rows():
    """>= 128 query rows over few splits: the default combine merges each row in one program (`combine_config`)."""
    gen = torch.Generator().manual_seed(29)
    q, qp, cache, pos = _mla_inputs(8, 1, 16, 160, 40, 8, torch.float16, gen)
    assert A.combine_config(8 * 16, 5, 64) == (64, 8) and A.combine_config(8 * 16, 17, 64) == (32, 2)
    out = A.mla_attention_triton(q, qp, cache, pos, 0.12, n_splits=5)
    ref = A.mla_attention_reference(q.double(), qp.double(), cache.double(), pos, 0.12)
    assert rel_err(out, ref) < 2e-3


def test_mla_strided_inputs():
    """q_pe as a view of a wider tensor (as the model splits q), non-contiguous output layout promised by the fake."""
    gen = torch.Generator().manual_seed(5)
    b, s, h, c, r, t = 2, 1, 3, 72, 8, 90
    qfull = torch.randn(b, s, h, c + r, generator=gen).half()
    q, qp = qfull[..., :c], qfull[..., c:]
    cache = torch.randn(b, t, c + r, generator=gen).half()
    pos = torch.tensor([[40], [89]])
    out = A.mla_attention_triton(q, qp, cache, pos, 0.2)
    ref = A.mla_attention_reference(q.double(), qp.double(), cache.double(), pos, 0.2)
    assert rel_err(out, ref) < 2e-3


# ---------------------------------------------------------------------------------------------------------------
# Routed experts
# ---------------------------------------------------------------------------------------------------------------

MOE_CASES = [
    # T, K, E, D, I, fp8, grouped
    (1, 3, 6, 256, 130, True, False),
    (3, 2, 5, 200, 88, True, False),
    (17, 3, 6, 200, 88, True, False),
    (17, 3, 6, 200, 88, True, True),
    (5, 2, 4, 136, 72, False, False),
    (9, 2, 4, 136, 72, False, True),
]


def _moe_inputs(t, k, e, d, i, fp8, dtype, gen):
    x = torch.randn(t, d, generator=gen).to(dtype)
    # ids in [-1, E]: out-of-range ones (expert parallel: other ranks' experts) must contribute nothing
    idx = torch.stack([torch.randperm(e + 2, generator=gen)[:k] - 1 for _ in range(t)])
    if t > 2 and k > 1:
        idx[1, 1] = idx[1, 0]  # a duplicate id: the reference sums its weights
    wt = torch.rand(t, k, generator=gen)
    ws = [torch.randn(e, i, d, generator=gen) * 0.1, torch.randn(e, i, d, generator=gen) * 0.1,
          torch.randn(e, d, i, generator=gen) * 0.1]
    if fp8:
        qs = [quantize_weight(w) for w in ws]
        return x, idx, wt, [qs[0][0], qs[1][0], qs[2][0], qs[0][1], qs[1][1], qs[2][1]]
    return x, idx, wt, [w.to(dtype) for w in ws] + [None] * 3


@pytest.mark.parametrize("case", MOE_CASES)
def test_routed_experts(case, fixed_interpreter):
    t, k, e, d, i, fp8, grouped = case
    gen = torch.Generator().manual_seed(sum(case[:5]) + 100 * grouped)
    x, idx, wt, w = _moe_inputs(t, k, e, d, i, fp8, torch.bfloat16, gen)
    out = RE.routed_experts_triton(x, idx, wt, *w, grouped=grouped)
    ref = RE.routed_experts_reference(x, idx, wt, *w)
    # same rounding points as the reference: with the interpreter's casts fixed the results agree to fp32 rounding
    assert out.dtype == x.dtype and rel_err(out, ref) < 1e-3


@pytest.mark.parametrize("case", MOE_CASES)
def test_routed_experts_pairs_then_combine(case, fixed_interpreter):
    """The op without its combine kernel (dsv3.routed_experts_pairs, the model's default) and the combine as torch
    ops (combine_pairs, fused by Inductor into the next kernel): the op's result, with invalid ids (rows the
    kernels never write are uninitialized and must not leak in: NaN-poisoned buffers here). Ids do not repeat within
    a token (as the router's): the repeated id of _moe_inputs becomes an invalid one."""
    t, k, e, d, i, fp8, grouped = case
    gen = torch.Generator().manual_seed(sum(case[:5]) + 100 * grouped + 7)
    x, idx, wt, w = _moe_inputs(t, k, e, d, i, fp8, torch.bfloat16, gen)
    if t > 2 and k > 1:
        idx[1, 1] = -1
    real_empty = torch.empty
    torch.empty = lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")) if kw.get(  # noqa: E731
        "dtype", torch.float32).is_floating_point else real_empty(*a, **kw)
    try:
        pairs = RE.routed_experts_triton(x, idx, None, *w, grouped=grouped, combine=False)
    finally:
        torch.empty = real_empty
    assert pairs.shape == (t, k, d) and pairs.dtype == x.dtype
    out = RE.combine_pairs(pairs, idx, wt, e)
    assert torch.isfinite(out).all()
    assert rel_err(out, RE.routed_experts_triton(x, idx, wt, *w, grouped=grouped)) < 1e-5
    assert rel_err(out, RE.routed_experts_reference(x, idx, wt, *w)) < 1e-3


# FP8 decode launch plans: up BLOCK_N < 128 writes h in bf16 and the down kernel quantizes it per [tokens, 128] tile;
# up BLOCK_N < 16 at one token is the row-parallel up kernel (h quantized by act_quant). Ragged I (200: one full and
# one partial 128-block of h) and D (300), shared experts stacked as the last 2 of 8 slots, invalid (other ranks')
# ids mixed in. One case per kernel form and side of each BLOCK_N bar (the interpreter is the CPU suite's costliest
# part); the GPU suite runs every plan of the table and the tuned ones at the 16B / 671B shapes
# (tests/test_kernels.py MOE_PLAN_GPU).
MOE_PLAN_CASES = [
    # T, up_block_n, down_block_n
    (1, 16, 64), (1, 8, 128), (3, 32, 128), (3, 128, 32),
    # + the row-parallel down kernel (one row per program and several); each case also runs its up kernel with the
    # MMA down kernel (the last check below), so the row-parallel up kernel at 1 and 2 rows meets it there
    (1, 2, 1), (1, 1, 8),
]


@pytest.mark.parametrize("t,up_bn,down_bn", MOE_PLAN_CASES)
def test_routed_experts_decode_plans(t, up_bn, down_bn, fixed_interpreter):
    e_routed, n_shared, d, i = 6, 2, 300, 200
    if down_bn in RE.ROWS_DOWN_BLOCK_NS:
        # the row-parallel kernels run a program per 1-8 rows, costly in the interpreter: ragged D and I still
        # (200 = 128 + 72, 136 = 128 + 8), a third fewer programs; (1, 8, 128) keeps the rows up kernel at D 300
        # (K blocks padded to KB_PAD)
        d, i = 200, 136
    gen = torch.Generator().manual_seed(1000 + 10 * t + up_bn + down_bn)
    x, _, _, w = _moe_inputs(t, 1, e_routed + n_shared, d, i, True, torch.bfloat16, gen)
    idx = moe_shared_slot_idx(t, e_routed, 3, n_shared, gen, n_invalid=1)
    wt = torch.rand(idx.shape, generator=gen)
    out = RE.routed_experts_triton(x, idx, wt, *w, up_block_n=up_bn, down_block_n=down_bn)
    ref = RE.routed_experts_reference(x, idx, wt, *w)
    assert out.dtype == x.dtype and rel_err(out, ref) < 1e-3
    # the same e4m3 h and scales whoever quantizes them: the default plan (up quantizes) gives the same result; the
    # row-parallel up kernel sums gate/up in another fp32 order, so its h may differ by a bf16 ulp
    base = RE.routed_experts_triton(x, idx, wt, *w, up_block_n=128,
                                    down_block_n=64 if down_bn in RE.ROWS_DOWN_BLOCK_NS else down_bn)
    assert rel_err(out, base) < (1e-2 if up_bn in RE.ROWS_UP_BLOCK_NS else 1e-6)
    if down_bn in RE.ROWS_DOWN_BLOCK_NS:  # the same up kernel with the MMA down kernel: fp32 sum order only
        assert rel_err(out, RE.routed_experts_triton(x, idx, wt, *w, up_block_n=up_bn, down_block_n=64)) < 1e-5


# pairs per tile, the down kernel's BLOCK_N, d (136: one full and one partial 128-row block, so BLOCK_N 256 has a
# second block past D; 300: a partial second block inside BLOCK_N 256), preloaded scales or not, the up kernel's
# warps (4: its TWO_DOTS form)
GROUPED_FP8_CASES = [(128, 128, 136, True, 8), (32, 256, 136, True, 8), (64, 256, 300, True, 8),
                     (64, 256, 300, False, 8), (32, 128, 300, False, 8), (64, 256, 136, True, 4),
                     (32, 128, 300, False, 4)]


@pytest.mark.parametrize("block_t,down_bn,d,preload,up_warps", GROUPED_FP8_CASES)
def test_routed_experts_grouped_plans(block_t, down_bn, d, preload, up_warps, fixed_interpreter, monkeypatch):
    """The grouped FP8 (prefill) kernels with other tiles (pairs per tile, the down kernel's BLOCK_N), ragged D and
    I (200), with and without preloaded scales, the up kernel's one 256-wide dot or two 128-wide ones: same result
    as the default tiles and the reference."""
    gen = torch.Generator().manual_seed(31 + block_t + down_bn + d)
    x, idx, wt, w = _moe_inputs(96, 3, 5, d, 200, True, torch.bfloat16, gen)
    base = RE.routed_experts_triton(x, idx, wt, *w, grouped=True)
    monkeypatch.setattr(RE, "PRELOAD_MAX_KB", 16 if preload else 0)
    out = RE.routed_experts_triton(x, idx, wt, *w, grouped=True, grouped_block_t=block_t, down_block_n=down_bn,
                                   up_num_warps=up_warps)
    assert rel_err(out, base) < 1e-6
    assert rel_err(out, RE.routed_experts_reference(x, idx, wt, *w)) < 1e-3


def test_grouped_fp8_kernels_match_decode_orientation(fixed_interpreter):
    """`_moe_up_grouped_kernel` / `_moe_down_grouped_kernel` (tokens as the MMA's M) give the values of the decode
    kernels (weight rows as M) on the same tiles: h, its scales and the pair outputs, one tile of 20 pairs."""
    gen = torch.Generator().manual_seed(5)
    t, k, e, d, i = 20, 2, 3, 300, 200
    x, idx, _, (wg, wu, wd, sg, su, sd) = _moe_inputs(t, k, e, d, i, True, torch.bfloat16, gen)
    xq, xs = RE.act_quant(x)
    sched, n = RE.grouped_schedule(idx, e, 32)
    p = t * k
    h0, h1 = (torch.zeros((p, i), dtype=torch.float8_e4m3fn) for _ in range(2))
    hs0, hs1 = (torch.zeros((p, 2)) for _ in range(2))
    y0, y1 = (torch.zeros((p, d), dtype=torch.bfloat16) for _ in range(2))
    flags = dict(IS_FP8=True, GROUPED=True, QUANT_H=True, BLOCK_T=32, BLOCK_K=2, BLOCK_P=2, BLOCK_E=2)
    RE._moe_up_kernel[(n, 2)](xq, xs, idx, sched, wg, wu, sg, su, h0, hs0, y0, t, k, e, i, d, n, d, 3, i * d, d,
                              2 * 3, 3, 1, i, 2, BLOCK_N=128, W_DESC=False, **flags)
    for two_dots in (False, True):
        h1.zero_()
        hs1.zero_()
        RE._moe_up_grouped_kernel[(n, 2)](xq, xs, sched, wg, wu, sg, su, h1, hs1, y1, k, i, d, n, d, 3, i * d, d,
                                          2 * 3, 3, 1, i, 2, BLOCK_T=32, KB_PAD=4, PRELOAD=True, TWO_DOTS=two_dots,
                                          EVEN=False, W_DESC=False)
        # (quantize_tile_rcp: a zero's sign aside)
        assert torch.equal(h0.float(), h1.float()) and torch.equal(hs0, hs1), two_dots
    RE._moe_down_kernel[(n, 3)](h0, hs0, idx, sched, wd, sd, y0, t, k, e, i, d, n, i, 2, d * i, i, 3 * 2, 2, 1, d,
                                BLOCK_N=128, EVEN=False, W_DESC=False, **flags)
    RE._moe_down_grouped_kernel[(n, 2)](h0, hs0, sched, wd, sd, y1, k, i, d, n, i, 2, d * i, i, 3 * 2, 2, 1, d,
                                        BLOCK_T=32, BLOCK_N=256, KB_PAD=2, PRELOAD=False, EVEN=False)
    assert torch.equal(y0, y1)


@pytest.mark.parametrize("t,up_bn,down_bn,d,i", [(3, 128, 64, 304, 208), (8, 64, 128, 256, 256), (5, 32, 32, 144, 144)])
def test_decode_weights_through_descriptors(t, up_bn, down_bn, d, i, fixed_interpreter, monkeypatch):
    """The FP8 decode MoE kernels with MMA tiles with their weights through TMA descriptors (DSV3_MOE_DECODE_TMA=on)
    give the pointer tiles' pair outputs bit for bit: ragged D (rows past D zero-filled by the descriptor as by the
    masks), a partial K block (I 208), whole blocks (the down kernel's EVEN loop), row blocks below 128."""
    gen = torch.Generator().manual_seed(7 + t + d)
    x, idx, _, w = _moe_inputs(t, 3, 5, d, i, True, torch.bfloat16, gen)
    assert all(RE.tma_descriptor_ok(v) for v in w[:3])
    kw = dict(up_block_n=up_bn, down_block_n=down_bn)
    outs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("DSV3_MOE_DECODE_TMA", mode)
        outs[mode] = RE.routed_experts_triton(x, idx, None, *w, combine=False, **kw)
    # the decode kernels write a token's pair row for each valid id once (the first k naming it): the rows of
    # invalid ids and of repeats stay unwritten
    repeat = torch.zeros_like(idx, dtype=torch.bool)
    for j in range(1, idx.shape[1]):
        repeat[:, j] = (idx[:, :j] == idx[:, j:j + 1]).any(1)
    valid = ((idx >= 0) & (idx < 5) & ~repeat).reshape(-1)
    on, off = (outs[m].reshape(-1, d)[valid] for m in ("on", "off"))
    assert torch.equal(on, off)
    assert rel_err(on, RE.routed_experts_pairs_reference(x, idx, *w).reshape(-1, d)[valid]) < 1e-3


@pytest.mark.parametrize("d,i,up_warps", [(304, 208, 8), (256, 256, 4), (144, 200, 8)])
def test_grouped_up_weights_through_descriptors(d, i, up_warps, fixed_interpreter, monkeypatch):
    """The grouped FP8 up kernel with its gate / up weights through TMA descriptors (DSV3_MOE_UP_TMA=on, the TWO_DOTS
    form at any warp count; 8 warps: the pointer form's one 256-wide dot, the same products and sums) gives the
    pointer tiles' output bit for bit: ragged D and I (rows and columns past them zero-filled by the descriptor as
    by the masks) and whole blocks (EVEN)."""
    gen = torch.Generator().manual_seed(3 + d + i)
    x, idx, wt, w = _moe_inputs(96, 3, 5, d, i, True, torch.bfloat16, gen)
    assert RE.tma_descriptor_ok(w[0]) and RE.tma_descriptor_ok(w[1])
    kw = dict(grouped=True, grouped_block_t=32, up_num_warps=up_warps)
    outs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("DSV3_MOE_UP_TMA", mode)
        outs[mode] = RE.routed_experts_triton(x, idx, wt, *w, **kw)
    assert torch.equal(outs["on"], outs["off"])
    assert rel_err(outs["on"], RE.routed_experts_reference(x, idx, wt, *w)) < 1e-3
    monkeypatch.setenv("DSV3_MOE_UP_TMA", "auto")  # the default: descriptors for 8-warp plans only
    assert RE.grouped_up_tma(8) and not RE.grouped_up_tma(4)


# (D, I, pairs per tile, the down kernel's BLOCK_N, the up kernel's warps: 4 is its TWO_DOTS form)
GROUPED_EVEN_CASES = [(256, 256, 32, 256, 4), (256, 384, 64, 128, 4), (256, 256, 32, 128, 8)]


@pytest.mark.parametrize("d,i,block_t,down_bn,up_warps", GROUPED_EVEN_CASES)
def test_grouped_fp8_even_blocks_bitwise(d, i, block_t, down_bn, up_warps, fixed_interpreter, monkeypatch):
    """Whole K and row blocks: the grouped FP8 kernels' unmasked loops (EVEN, `even_blocks`) give bitwise the
    masked loops' output, on tiles with unused columns (96 tokens, 3 of 5 experts each; those columns load row 0)."""
    gen = torch.Generator().manual_seed(d + i + block_t + up_warps)
    x, idx, wt, w = _moe_inputs(96, 3, 5, d, i, True, torch.bfloat16, gen)
    kw = dict(grouped=True, grouped_block_t=block_t, down_block_n=down_bn, up_num_warps=up_warps)
    assert RE.even_blocks(i, d, down_bn) and RE.even_blocks(d, i, 128)
    out = RE.routed_experts_triton(x, idx, wt, *w, **kw)
    pairs = RE.routed_experts_triton(x, idx, None, *w, combine=False, **kw)
    monkeypatch.setattr(RE, "even_blocks", lambda *a: False)
    assert torch.equal(out, RE.routed_experts_triton(x, idx, wt, *w, **kw))
    valid = (idx >= 0) & (idx < 5)  # (rows of invalid ids are never written)
    assert torch.equal(pairs[valid], RE.routed_experts_triton(x, idx, None, *w, combine=False, **kw)[valid])
    assert rel_err(out, RE.routed_experts_reference(x, idx, wt, *w)) < 1e-3


@pytest.mark.parametrize("t,up_bn,down_bn", [(3, 64, 64), (8, 128, 128)])
def test_decode_fp8_even_blocks_bitwise(t, up_bn, down_bn, fixed_interpreter, monkeypatch):
    """The decode MoE down kernel (weight rows as the MMA's M) with whole K and row blocks: unmasked weight loads
    (EVEN) give bitwise the masked loop's output; 6 routed + 2 shared slots, an invalid id among them."""
    gen = torch.Generator().manual_seed(300 + t + up_bn)
    x, _, _, w = _moe_inputs(t, 1, 8, 256, 384, True, torch.bfloat16, gen)
    idx = moe_shared_slot_idx(t, 6, 3, 2, gen, n_invalid=1)
    wt = torch.rand(idx.shape, generator=gen)
    kw = dict(up_block_n=up_bn, down_block_n=down_bn, up_num_stages=3, down_num_stages=3)
    assert RE.even_blocks(256, 384, up_bn) and RE.even_blocks(384, 256, down_bn)
    out = RE.routed_experts_triton(x, idx, wt, *w, **kw)
    monkeypatch.setattr(RE, "even_blocks", lambda *a: False)
    assert torch.equal(out, RE.routed_experts_triton(x, idx, wt, *w, **kw))
    assert rel_err(out, RE.routed_experts_reference(x, idx, wt, *w)) < 1e-3


def test_even_blocks():
    assert RE.even_blocks(1408, 2048, 256) and RE.even_blocks(2048, 7168, 256) and RE.even_blocks(2048, 1408, 128)
    assert not RE.even_blocks(200, 256, 128) and not RE.even_blocks(256, 300, 256) and not RE.even_blocks(256, 384, 256)


def test_grouped_sparse_tiles_launch(fixed_interpreter, monkeypatch):
    """A static T of an expert shape listed in GROUPED_SPARSE_SHAPES (one is listed here for the test): past its
    decode bound the launcher takes grouped tiles, of SPARSE_TILE_PAIRS pairs while T * K <= 32 * E, 64 beyond or
    when the call pins them; each matches the reference (ids out of range included)."""
    seen = []
    real = RE.grouped_schedule
    monkeypatch.setattr(RE, "grouped_schedule", lambda idx, e, block_t: seen.append(block_t) or real(idx, e, block_t))
    monkeypatch.setitem(RE.GROUPED_SPARSE_SHAPES, (256, 200), 4)
    gen = torch.Generator().manual_seed(31)
    for t, pin, tiles in ((3, None, []), (12, None, [32]), (97, None, [64]), (12, 64, [64])):  # 97 x 2 > 32 x 6
        x, idx, wt, w = _moe_inputs(t, 2, 6, 256, 200, True, torch.bfloat16, gen)
        seen.clear()
        out = RE.routed_experts_triton(x, idx, wt, *w, grouped_block_t=pin)
        assert seen == tiles, (t, pin, seen)
        assert rel_err(out, RE.routed_experts_reference(x, idx, wt, *w)) < 1e-2


def test_grouped_plan_checks():
    assert RE.grouped_plan(True, down_block_n=128).down_block_n == 128
    assert RE.grouped_plan(True, 2048, 1408) == RE.GROUPED_FP8_TUNED[(2048, 1408)]
    assert RE.grouped_plan(True, 7168, 2048) == RE.MOE_GROUPED_FP8
    assert RE.grouped_plan(True, 2048, 1408, up_num_warps=8).up_num_warps == 8
    assert RE.grouped_plan(False, up_block_n=64).up_block_n == 64
    for fields, name in ((dict(up_block_n=64), "up_block_n"), (dict(up_block_n=4), "up_block_n"),
                         (dict(down_block_n=64), "down_block_n"), (dict(down_num_warps=3), "down_num_warps")):
        with pytest.raises(ValueError, match=name):
            RE.grouped_plan(True, **fields)


def test_routed_experts_decode_plan_env(fixed_interpreter, monkeypatch):
    """DSV3_MOE_DECODE pins the plan (read at trace time); explicit keyword arguments still win."""
    gen = torch.Generator().manual_seed(77)
    x, _, _, w = _moe_inputs(2, 1, 5, 136, 72, True, torch.bfloat16, gen)
    idx = moe_shared_slot_idx(2, 4, 2, 1, gen)
    wt = torch.rand(idx.shape, generator=gen)
    ref = RE.routed_experts_reference(x, idx, wt, *w)
    monkeypatch.setenv("DSV3_MOE_DECODE", "16:4:3:32:4:3")
    assert RE.resolve_moe_decode(2, 5, 72, 136, 132, True) == RE.MoeDecodePlan(16, 4, 3, 32, 4, 3)
    assert rel_err(RE.routed_experts_triton(x, idx, wt, *w), ref) < 1e-3
    assert rel_err(RE.routed_experts_triton(x, idx, wt, *w, up_block_n=128), ref) < 1e-3


def test_routed_experts_fp16_unpatched():
    gen = torch.Generator().manual_seed(1)
    x, idx, wt, w = _moe_inputs(6, 2, 4, 136, 72, False, torch.float16, gen)
    for grouped in (False, True):
        out = RE.routed_experts_triton(x, idx, wt, *w, grouped=grouped)
        assert rel_err(out, RE.routed_experts_reference(x, idx, wt, *w)) < 2e-3


def test_grouped_schedule():
    idx = torch.tensor([[3, 0], [3, 7], [1, -1], [3, 1]])
    sched, n = RE.grouped_schedule(idx, n_experts=4, block_t=2)
    assert n == ceil_div(8, 2) + 4
    e, start, end, order = sched[:n], sched[n:2 * n], sched[2 * n:3 * n], sched[3 * n:]
    flat = idx.flatten()
    seen = []
    for j in range(n):
        if start[j] < end[j]:
            assert end[j] - start[j] <= 2
            pairs = order[start[j]:end[j]]
            assert (flat[pairs] == e[j]).all()
            seen += pairs.tolist()
    assert sorted(seen) == sorted(i for i, v in enumerate(flat.tolist()) if 0 <= v < 4)


@pytest.mark.parametrize("t,k,e,block_t,invalid", [
    (4, 2, 4, 2, 0.2),        # fewer pairs than a chunk (one program: `_schedule_one_kernel`)
    (32, 8, 66, 32, 0.0),     # 16B's batch-32 decode step (sparse tiles of 32 pairs), one program
    (64, 8, 66, 32, 0.1),     # batch 64 with other ranks' ids: SCHEDULE_ONE_MAX_P pairs, one program
    (700, 6, 66, 64, 0.0),    # 16B's prefill (64 routed + 2 shared slots' ids), 5 chunks, a partial last one
    (300, 8, 32, 64, 0.85),   # an expert-parallel rank: most ids belong to other ranks (invalid here), 3 chunks
    (129, 8, 4, 32, 0.1),     # few experts, many tiles each
])
def test_grouped_schedule_kernels(t, k, e, block_t, invalid):
    """The Triton schedule (`moe_schedule.grouped_schedule_triton`: one program up to SCHEDULE_ONE_MAX_P pairs, else
    the two-launch counting sort; small P also pinned to the other form) gives the reference's schedule bit for bit:
    the tile table and the stable order of the pairs, invalid ids last."""
    gen = torch.Generator().manual_seed(t + e)
    idx = torch.randint(0, e, (t, k), generator=gen)
    drop = torch.rand(t, k, generator=gen) < invalid
    idx = torch.where(drop, torch.where(torch.rand(t, k, generator=gen) < 0.5, -idx - 1, idx + e), idx)
    want, n = MS.grouped_schedule_reference(idx, e, block_t)
    got, n2 = MS.grouped_schedule_triton(idx, e, block_t)
    assert n == n2 and got.dtype == torch.int32
    assert torch.equal(got, want)
    if t * k <= MS.SCHEDULE_ONE_MAX_P:
        assert torch.equal(MS.grouped_schedule_triton(idx, e, block_t, one=False)[0], want)
        assert torch.equal(MS.grouped_schedule_triton(idx, e, block_t, chunk=1024, num_warps=2, one=True)[0], want)
    else:
        with pytest.raises(ValueError, match="one-program schedule"):
            MS.grouped_schedule_triton(idx, e, block_t, chunk=512, one=True)


@pytest.mark.parametrize("chunk,warps", sorted({(c, w) for _, c, w in MS.SCHEDULE_LAUNCHES}))
def test_grouped_schedule_each_launch(chunk, warps):
    """Each launch of moe_schedule.SCHEDULE_LAUNCHES (pinned: a small P would take the first row's) gives the
    reference's schedule bit for bit: 16B-like ids (66 slots, 64 routed), several chunks, a partial last one."""
    gen = torch.Generator().manual_seed(chunk)
    idx = torch.randint(0, 64, (300, 6), generator=gen)
    idx[::7, 2] = -1  # other ranks' ids
    want, n = MS.grouped_schedule_reference(idx, 66, 64)
    got, n2 = MS.grouped_schedule_triton(idx, 66, 64, chunk, warps)
    assert n == n2 and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# MLA absorb (W_UK into the query, W_UV^T out of the latent output), weights read from kv_b_proj
# ---------------------------------------------------------------------------------------------------------------

ABSORB_CASES = [
    # M, H, Dn, Dv, C, fp8: 128-aligned heads (the real shapes), and heads that straddle the 128-row scale blocks
    (1, 2, 128, 128, 512, True),
    (3, 3, 16, 24, 72, True),
    (17, 2, 32, 16, 200, True),
    (5, 3, 16, 24, 72, False),
]


# rows None: the default (the CUDA-core kernels for M <= ABSORB_ROWS_MAX_M); False: the MMA kernels at small M too
ABSORB_PATHS = [(c, None) for c in ABSORB_CASES] + [(c, False) for c in ABSORB_CASES if c[0] <= AB.ABSORB_ROWS_MAX_M]


@pytest.mark.parametrize("case,rows", ABSORB_PATHS)
@pytest.mark.parametrize("output", [False, True])
def test_mla_absorb(case, rows, output, fixed_interpreter):
    m, h, dn, dv, c, fp8 = case
    gen = torch.Generator().manual_seed(sum(case[:5]) + output)
    w = torch.randn(h * (dn + dv), c, generator=gen) * 0.1
    w, s = quantize_weight(w) if fp8 else (w.to(torch.bfloat16), None)
    full = torch.randn(m, h, dn + 8, generator=gen).to(torch.bfloat16)
    x = torch.randn(m, h, c, generator=gen).to(torch.bfloat16) if output else full[..., :dn]  # a strided view
    out = AB.mla_absorb_triton(x, w, s, dn, dv, output, rows=rows)
    ref = AB.mla_absorb_reference(x.double(), w if fp8 else w.double(), s, dn, dv, output)  # float64 math
    assert out.shape == (m, h, dv if output else c) and out.dtype == x.dtype
    assert rel_err(out, ref) < 6e-3
