"""`dsv3.mla_decode_prep`'s fused Triton kernel run by the Triton CPU interpreter, against the op's torch composition;
`dsv3.mla_prefill_prep`'s kernel against it too, and bit for bit against its own arithmetic in torch
(tests/mla_prep_expect.py: the GPU's summation order, FUSED_ROPE's FMAs) over launch choices and ragged shapes.

Run in its own process with TRITON_INTERPRET=1 (tests/test_mla_prep.py does; see tests/interpret_kernels.py for why
and for the `fixed_interpreter` fixture, which makes the interpreter's fp32 -> bf16 casts round to nearest even
as the GPU does). By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_mla_prep.py
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_mla_prep.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import dsv3.kernels  # noqa: E402,F401
from dsv3.kernels import mla_absorb as AB  # noqa: E402
from dsv3.kernels import mla_decode_prep as P  # noqa: E402
from dsv3.kernels.fp8_blocks import quantize_weight  # noqa: E402
from dsv3.kernels.mla_decode_prep import _row_sum_sq  # noqa: E402
from interpret_kernels import fixed_interpreter  # noqa: E402,F401
from kernel_checks import rel_err  # noqa: E402
from mla_prep_expect import (  # noqa: E402
    bits, gpu_order_sum_sq, k_hi, near_ties, prefill_expected, prefill_inputs, q_hi,
)

# B, S, H, Dn, R, Dv, C, fp8: V2/V3 head dims (C=512, R=64), and small ragged ones (C not a power of two, heads that
# straddle the 128-row scale blocks of kv_b_proj)
CASES = [
    (1, 1, 2, 128, 64, 128, 512, True),
    (2, 1, 3, 16, 8, 24, 72, True),
    (3, 2, 2, 32, 16, 16, 200, True),
    (2, 1, 3, 16, 8, 24, 72, False),
]


def _inputs(case, seed):
    b, s, h, dn, r, dv, c, fp8 = case
    g = torch.Generator().manual_seed(seed)
    t_cap = 40
    # q and kv_a as views of one projection output, as the model's fused qkv_a_proj gives them
    proj = torch.randn(b, s, h * (dn + r) + c + r + 8, generator=g).to(torch.bfloat16)
    q = proj[..., :h * (dn + r)].view(b, s, h, dn + r)
    kv_a = proj[..., h * (dn + r):h * (dn + r) + c + r]
    norm_w = (1 + 0.1 * torch.randn(c, generator=g)).to(torch.bfloat16)
    pos = torch.stack([torch.randperm(t_cap - s, generator=g)[:1] + torch.arange(s) for _ in range(b)])
    ang = torch.rand(b, s, r // 2, generator=g) * 6.0
    cos, sin = ang.cos() * 1.1, ang.sin() * 1.1  # a YaRN-like attention factor
    cache = torch.randn(b + 1, t_cap, c + r, generator=g).to(torch.bfloat16)  # one spare row: B < B_max
    w = torch.randn(h * (dn + dv), c, generator=g) * 0.1
    w, ws = quantize_weight(w) if fp8 else (w.to(torch.bfloat16), None)
    return q, kv_a, norm_w, cos, sin, cache, pos, w, ws, 1e-6, dn, dv


@pytest.mark.parametrize("case", CASES)
def test_fused_kernel_matches_composition(case, fixed_interpreter):
    args = _inputs(case, seed=sum(case[:7]))
    q, kv_a, norm_w, cos, sin, cache, pos, w, ws, eps, dn, dv = args
    c = norm_w.shape[0]
    ref_cache = cache.clone()
    ref_lat, ref_pe = P.mla_decode_prep_reference(q, kv_a, norm_w, cos, sin, ref_cache, pos, w, ws, eps, dn, dv)
    lat, pe = P.mla_decode_prep_triton(*args)
    # the query rope and the key rope: the same fp32 operations and one rounding, so bit for bit
    assert pe.shape == ref_pe.shape and pe.is_contiguous() and torch.equal(pe, ref_pe)
    assert torch.equal(cache[..., c:], ref_cache[..., c:])
    # the normalised latent: the sum of squares is reduced in another order, so an element may differ by one bf16 ulp
    diff = (cache[..., :c].float() - ref_cache[..., :c].float()).abs()
    assert (diff <= ref_cache[..., :c].float().abs() * 2.0 ** -7).all()
    assert (diff > 0).float().mean() < 0.01
    written = torch.zeros(cache.shape[:2], dtype=torch.bool)
    written[torch.arange(pos.shape[0]).unsqueeze(1).expand_as(pos), pos] = True
    assert torch.equal(cache[~written], ref_cache[~written])  # nothing else touched (the spare row included)
    # q_latent: the absorb tiles are mla_absorb's MMA kernel, so equal to it; and close to the float64 einsum
    q_nope = q[..., :dn]
    assert torch.equal(lat, AB.mla_absorb_triton(q_nope, w, ws, dn, dv, False, rows=False))
    assert rel_err(lat, AB.mla_absorb_reference(q_nope.double(), w if ws is not None else w.double(), ws, dn, dv,
                                                False)) < 6e-3
    assert rel_err(lat, ref_lat) < 6e-3


def test_broadcast_positions_and_tables(fixed_interpreter):
    """input_pos and the rope tables as the model can pass them: expanded views with a zero batch stride."""
    q, kv_a, norm_w, cos, sin, cache, pos, w, ws, eps, dn, dv = _inputs((3, 2, 2, 32, 16, 16, 200, True), seed=7)
    pos = pos[:1].expand(3, 2)
    cos, sin = cos[:1].expand(3, 2, -1), sin[:1].expand(3, 2, -1)
    ref_cache = cache.clone()
    ref_lat, ref_pe = P.mla_decode_prep_reference(q, kv_a, norm_w, cos, sin, ref_cache, pos, w, ws, eps, dn, dv)
    lat, pe = P.mla_decode_prep_triton(q, kv_a, norm_w, cos, sin, cache, pos, w, ws, eps, dn, dv)
    assert torch.equal(pe, ref_pe)
    assert rel_err(cache, ref_cache) < 1e-3 and rel_err(lat, ref_lat) < 6e-3


# B, S, H, Dn, R, C, cache rows given: the prefill op (no absorption), longer chunks, a chosen cache row per sequence;
# 20 heads: two head blocks of PREFILL_PREP_HEADS, the second partial
PREFILL_CASES = [(1, 37, 2, 128, 64, 512, False), (2, 19, 3, 16, 8, 72, True), (1, 40, 2, 32, 16, 200, True),
                 (2, 9, 20, 16, 8, 24, True)]


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_prep_kernel_matches_composition(case, fixed_interpreter):
    """`_mla_prefill_prep_kernel` against `mla_prefill_prep_reference`: q_pe and the roped k_pe bit for bit, the
    normalised latent to one bf16 ulp (another summation order), the same rows of the cache written (cache_rows[b]
    or b) and nothing else, the returned latent equal to what went into the cache."""
    b, s, h, dn, r, c, with_rows = case
    q, kv_a, norm_w, cos, sin, cache, _, _, _, eps, _, _ = _inputs((b, 1, h, dn, r, 8, c, False), seed=sum(case[:6]))
    g = torch.Generator().manual_seed(5 + s)
    proj = torch.randn(b, s, h * (dn + r) + c + r + 8, generator=g).to(torch.bfloat16)
    q = proj[..., :h * (dn + r)].view(b, s, h, dn + r)
    kv_a = proj[..., h * (dn + r):h * (dn + r) + c + r]
    cache = torch.randn(b + 2, s + 5, c + r, generator=g).to(torch.bfloat16)
    pos = (torch.arange(b)[:, None] + torch.arange(s)[None, :]).contiguous()
    ang = torch.rand(b, s, r // 2, generator=g) * 6.0
    cos, sin = ang.cos(), ang.sin()
    rows = torch.tensor([b + 1 - i for i in range(b)]) if with_rows else None
    ref_cache = cache.clone()
    ref_pe, ref_lat = P.mla_prefill_prep_reference(q, kv_a, norm_w, cos, sin, ref_cache, pos, rows, eps, dn)
    pe, lat = P.mla_prefill_prep_triton(q, kv_a, norm_w, cos, sin, cache, pos, rows, eps, dn)
    assert pe.is_contiguous() and torch.equal(pe, ref_pe)
    assert torch.equal(lat[..., c:], ref_lat[..., c:]) and torch.equal(cache[..., c:], ref_cache[..., c:])
    diff = (lat[..., :c].float() - ref_lat[..., :c].float()).abs()
    assert (diff <= ref_lat[..., :c].float().abs() * 2.0 ** -7).all() and (diff > 0).float().mean() < 0.01
    assert rel_err(cache, ref_cache) < 1e-3
    written = torch.zeros(cache.shape[:2], dtype=torch.bool)
    cache_row = (rows if with_rows else torch.arange(b)).unsqueeze(1).expand_as(pos)
    written[cache_row, pos] = True
    assert torch.equal(cache[~written], ref_cache[~written])
    assert torch.equal(cache[cache_row, pos], lat)  # the latent returned is the one written


# ---------------------------------------------------------------------------------------------------------------
# The prefill kernel bit for bit: its kv sum of squares in the GPU order it spells out, its FUSED_ROPE products
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _sum_sq_probe(x_ptr, out_ptr, BLOCK_T: tl.constexpr, RED_N: tl.constexpr, RED_L: tl.constexpr,
                  RED_V: tl.constexpr, LOG2_RED_L: tl.constexpr):
    """`_row_sum_sq` of x [BLOCK_T, C_PAD] (contiguous) laid out as its docstring says, into out [BLOCK_T]."""
    i = tl.arange(0, RED_N * BLOCK_T)
    offs = (i % BLOCK_T)[:, None] * (RED_N * RED_L * RED_V) + (i // BLOCK_T)[:, None] * (RED_L * RED_V)
    x = tl.load(x_ptr + offs + tl.arange(0, RED_L * RED_V)[None, :]).to(tl.float32)
    tl.store(out_ptr + tl.arange(0, BLOCK_T), _row_sum_sq(x * x, BLOCK_T, RED_N, RED_L, RED_V, LOG2_RED_L))


@pytest.mark.parametrize("c_pad,block_t", [(512, 4), (512, 1), (1024, 4), (256, 8), (64, 2)])
def test_row_sum_sq_order(c_pad, block_t):
    """`_row_sum_sq` adds in `gpu_order_sum_sq`'s order, bit for bit, on rows of widely spread magnitudes where
    other orders (torch's sum) round differently."""
    g = torch.Generator().manual_seed(c_pad + block_t)
    x = (torch.randn(block_t, c_pad, generator=g) * torch.exp2(torch.randint(-6, 7, (block_t, c_pad), generator=g)))
    x = x.to(torch.bfloat16)
    red_v = min(8, c_pad)
    red_l = min(32, c_pad // red_v)
    out = torch.empty(block_t)
    _sum_sq_probe[(1,)](x, out, block_t, c_pad // (red_v * red_l), red_l, red_v, red_l.bit_length() - 1)
    want = gpu_order_sum_sq(x)
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))
    if c_pad * block_t >= 2048:
        assert (want != x.float().square().sum(-1)).any()


# B, S, H, Dn, R, C, cache rows given, launch (BLOCK_T, head block, warps; None: `prefill_prep_launch`), FUSED_ROPE.
# Token counts that are not multiples of BLOCK_T (a last partial block; blocks straddling the two sequences at
# S = 67), odd head counts (a partial last head block), C = 512 (two channel pieces per lane, as at 16B / 671B),
# 200 (one piece, masked channels) and 600 (four pieces).
EXACT_CASES = [
    (1, 1, 16, 128, 64, 512, False, None, False),
    (1, 3, 5, 16, 8, 72, True, (2, 2, 1), False),
    (1, 17, 16, 128, 64, 512, True, (4, 16, 4), True),
    (2, 67, 3, 32, 16, 200, False, (8, 4, 2), False),
    (2, 67, 16, 128, 64, 512, True, (16, 8, 8), True),
    (1, 5, 3, 16, 8, 600, True, (2, 4, 2), False),
]


@pytest.mark.parametrize("case", EXACT_CASES)
@pytest.mark.usefixtures("fixed_interpreter")
def test_prefill_prep_kernel_bitwise(case):
    """q_pe, the returned latent and the cache rows written, bit for bit the kernel's arithmetic (`prefill_expected`);
    unfused, q_pe and the roped k_pe are also bit for bit the torch reference's, and the normalised latent within
    one bf16 ulp of it (the reference sums the squares in another order)."""
    b, s, h, dn, r, c, with_rows, launch, fused = case
    q, kv_a, norm_w, cos, sin, cache, pos = prefill_inputs(b, s, h, dn, r, c, seed=s * 31 + h)
    assert q.untyped_storage().data_ptr() == kv_a.untyped_storage().data_ptr()  # column slices of one output
    eps = 1e-6
    rows = torch.tensor([b + 1 - i for i in range(b)]) if with_rows else None
    bt, hb, w = launch or (None, None, None)
    before = cache.clone()
    pe, lat = P.mla_prefill_prep_triton(q, kv_a, norm_w, cos, sin, cache, pos, rows, eps, dn, num_warps=w,
                                        block_t=bt, head_block=hb, fused_rope=fused)
    want_pe, want_lat = prefill_expected(q, kv_a, norm_w, cos, sin, eps, dn, fused)
    assert pe.is_contiguous() and torch.equal(bits(pe), bits(want_pe))
    assert torch.equal(bits(lat), bits(want_lat))
    cache_row = (rows if with_rows else torch.arange(b)).unsqueeze(1).expand_as(pos)
    assert torch.equal(bits(cache[cache_row, pos]), bits(lat))
    written = torch.zeros(cache.shape[:2], dtype=torch.bool)
    written[cache_row, pos] = True
    assert torch.equal(bits(cache[~written]), bits(before[~written]))  # spare rows and other positions untouched
    if not fused:
        ref_pe, ref_lat = P.mla_prefill_prep_reference(q, kv_a, norm_w, cos, sin, before.clone(), pos, rows, eps, dn)
        assert torch.equal(bits(pe), bits(ref_pe)) and torch.equal(bits(lat[..., c:]), bits(ref_lat[..., c:]))
        diff = (lat[..., :c].float() - ref_lat[..., :c].float()).abs()
        assert (diff <= ref_lat[..., :c].float().abs() * 2.0 ** -7).all()


@pytest.mark.usefixtures("fixed_interpreter")
def test_prefill_prep_launch_choices_agree():
    """Every (BLOCK_T, head block, warps) gives the same bits, the default launch included."""
    q, kv_a, norm_w, cos, sin, cache, pos = prefill_inputs(2, 13, 5, 16, 8, 512, seed=3)
    rows = torch.tensor([3, 0])
    outs = []
    for launch in [(None, None, None), (1, 2, 1), (2, 4, 2), (4, 8, 4), (8, 2, 8), (16, 8, 1)]:
        c2 = cache.clone()
        bt, hb, w = launch
        pe, lat = P.mla_prefill_prep_triton(q, kv_a, norm_w, cos, sin, c2, pos, rows, 1e-6, 16, num_warps=w,
                                            block_t=bt, head_block=hb)
        outs.append((bits(pe), bits(lat), bits(c2)))
    for other in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(outs[0], other))


@pytest.mark.usefixtures("fixed_interpreter")
def test_prefill_prep_broadcast_positions_and_tables():
    """input_pos and the rope tables as expanded views (zero batch stride), as the model can pass them."""
    q, kv_a, norm_w, cos, sin, cache, pos = prefill_inputs(2, 9, 3, 16, 8, 72, seed=5)
    pos, cos, sin = pos[:1].expand(2, -1), cos[:1].expand(2, -1, -1), sin[:1].expand(2, -1, -1)
    rows = torch.tensor([2, 3])
    before = cache.clone()
    pe, lat = P.mla_prefill_prep_triton(q, kv_a, norm_w, cos, sin, cache, pos, rows, 1e-6, 16, block_t=4)
    want_pe, want_lat = prefill_expected(q, kv_a, norm_w, cos, sin, 1e-6, 16, False)
    assert torch.equal(bits(pe), bits(want_pe)) and torch.equal(bits(lat), bits(want_lat))
    before[rows.unsqueeze(1).expand_as(pos), pos] = lat
    assert torch.equal(bits(cache), bits(before))


@pytest.mark.usefixtures("fixed_interpreter")
def test_prefill_prep_skips_positions_outside_the_cache():
    """A token whose position is < 0 or >= T writes no cache row (as the one-token kernel) but still its latent."""
    q, kv_a, norm_w, cos, sin, cache, pos = prefill_inputs(1, 6, 3, 16, 8, 72, seed=4)
    t_cap = cache.shape[1]
    pos[0, 0], pos[0, 5] = -1, t_cap
    before = cache.clone()
    pe, lat = P.mla_prefill_prep_triton(q, kv_a, norm_w, cos, sin, cache, pos, None, 1e-6, 16, block_t=4)
    want_pe, want_lat = prefill_expected(q, kv_a, norm_w, cos, sin, 1e-6, 16, False)
    assert torch.equal(bits(pe), bits(want_pe)) and torch.equal(bits(lat), bits(want_lat))
    expect = before.clone()
    expect[0, pos[0, 1:5]] = lat[0, 1:5]
    assert torch.equal(bits(cache), bits(expect))


@pytest.mark.usefixtures("fixed_interpreter")
def test_prefill_prep_fused_rope_products():
    """FUSED_ROPE fuses the products `_mla_prefill_prep_kernel`'s docstring names: on inputs tuned next to bf16
    rounding ties (query head 0 of tokens 0-3, the keys of tokens 4-7), where fusing the other product or none
    rounds differently, the kernel's bits are those of `prefill_expected`; and without FUSED_ROPE the unfused
    reference's."""
    b, s, h, dn, r, c = 1, 8, 3, 16, 8, 72
    q, kv_a, norm_w, cos, sin, cache, pos = prefill_inputs(b, s, h, dn, r, c, seed=11)
    g = torch.Generator().manual_seed(12)
    rh = r // 2
    x1, x2, cs, sn = near_ties(4 * rh, q_hi, g)
    q[0, :4, 0, dn::2], q[0, :4, 0, dn + 1::2] = x1.view(4, rh).bfloat16(), x2.view(4, rh).bfloat16()
    cos[0, :4], sin[0, :4] = cs.view(4, rh), sn.view(4, rh)
    x1, x2, cs, sn = near_ties(4 * rh, k_hi, g)
    kv_a[0, 4:, c::2], kv_a[0, 4:, c + 1::2] = x1.view(4, rh).bfloat16(), x2.view(4, rh).bfloat16()
    cos[0, 4:], sin[0, 4:] = cs.view(4, rh), sn.view(4, rh)
    want = {fused: prefill_expected(q, kv_a, norm_w, cos, sin, 1e-6, dn, fused) for fused in (False, True)}
    tuned = (bits(want[True][0][0, :4, 0, rh:]), bits(want[True][1][0, 4:, c + rh:]))
    assert (tuned[0] != bits(want[False][0][0, :4, 0, rh:])).all()
    assert (tuned[1] != bits(want[False][1][0, 4:, c + rh:])).all()
    for fused in (False, True):
        pe, lat = P.mla_prefill_prep_triton(q, kv_a, norm_w, cos, sin, cache.clone(), pos, None, 1e-6, dn,
                                            block_t=4, fused_rope=fused)
        assert torch.equal(bits(pe), bits(want[fused][0])) and torch.equal(bits(lat), bits(want[fused][1]))
