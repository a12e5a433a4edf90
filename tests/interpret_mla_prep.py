"""`dsv3.mla_decode_prep`'s fused Triton kernel run by the Triton CPU interpreter, against the op's torch composition.

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

import dsv3.kernels  # noqa: E402,F401
from dsv3.kernels import mla_absorb as AB  # noqa: E402
from dsv3.kernels import mla_decode_prep as P  # noqa: E402
from dsv3.kernels.fp8_blocks import quantize_weight  # noqa: E402
from interpret_kernels import fixed_interpreter  # noqa: E402,F401
from kernel_checks import rel_err  # noqa: E402

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
