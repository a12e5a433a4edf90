"""The ops' reference implementations (what runs on CPU and what every kernel is checked against) against
float64 formulas written from the spec (dsv3_architecture.md 2.2, 6.3, 7.3, 8.1-8.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsv3.kernels  # noqa: F401
from dsv3.kernels.fp8_blocks import FP8_DTYPE, dequantize_weight, quantize_activation, quantize_weight

G = torch.Generator().manual_seed(0)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("n,k", [(576, 256), (200, 300), (128, 128), (33, 10944 // 8)])
def test_weight_quantization_blocks(n, k):
    w = torch.randn(n, k, generator=G) * 0.02
    q, s = quantize_weight(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert s.shape == (-(-n // 128), -(-k // 128))
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            block = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            # Scale over the elements that exist (a partial edge block counts as zero-padded).
            assert s[bi, bj].item() == pytest.approx(block.abs().max().item() / 448, rel=1e-6)
    deq = dequantize_weight(q, s, torch.float64)
    # e4m3 keeps 3 mantissa bits: relative error per element <= 2^-4 of its block's max.
    block_max = s.double().index_select(0, torch.arange(n) // 128).index_select(1, torch.arange(k) // 128) * 448
    assert ((deq - w.double()).abs() <= block_max * 2**-4 + 1e-12).all()


def test_activation_quantization_exact_cases():
    x = torch.zeros(2, 300)
    x[0, :128] = torch.linspace(-3.5, 3.5, 128)
    x[0, 128:256] = 0.0  # all-zero block: the amax floor keeps the scale finite
    x[0, 256:] = 7.0  # partial tail block of 44 elements
    x[1] = torch.randn(300, generator=G)
    q, s = quantize_activation(x)
    assert s.shape == (2, 3)
    assert s[0, 0].item() == pytest.approx(3.5 / 448)
    assert s[0, 1].item() == pytest.approx(1e-4 / 448)
    assert s[0, 2].item() == pytest.approx(7.0 / 448)
    assert (q[0, 256:].float() == 448).all()  # the block max maps to the format max exactly
    assert q[0, 0].float().item() == -448
    for j in range(3):
        assert s[1, j].item() == pytest.approx(x[1, j * 128:(j + 1) * 128].abs().max().item() / 448, rel=1e-6)


@pytest.mark.parametrize("m,n,k", [(1, 576, 256), (3, 200, 300), (17, 256, 1408 // 4), (5, 130, 96)])
def test_fp8_linear_reference_matches_block_formula(m, n, k):
    x = torch.randn(m, k, generator=G)
    w = torch.randn(n, k, generator=G) * 0.05
    wq, ws = quantize_weight(w)
    y = torch.ops.dsv3.fp8_linear(x, wq, ws)
    xq, xs = quantize_activation(x)
    ref = torch.zeros(m, n, dtype=torch.float64)
    for kb in range(-(-k // 128)):
        sl = slice(kb * 128, (kb + 1) * 128)
        partial = xq[:, sl].double() @ wq[:, sl].double().t()
        ref += partial * xs[:, kb: kb + 1].double() * ws[torch.arange(n) // 128, kb].double()[None, :]
    assert _rel(y, ref) < 1e-6
    # and W8A8 stays close to the unquantized product: two e4m3 roundings, ~2^-5 each, in norm
    exact = x.double() @ w.double().t()
    assert ((y.double() - exact).norm() / exact.norm()).item() < 5e-2


@pytest.mark.parametrize("n,k", [(64, 300), (200, 300), (576, 10944), (33, 129)])
def test_fp8_reference_compiles_exactly_for_ragged_shapes(n, k):
    """Regression: Inductor (CPU, torch 2.13) miscompiled floor-division scale expansion for ragged shapes."""
    torch._dynamo.reset()
    x = torch.randn(4, k, generator=G)
    wq, ws = quantize_weight(torch.randn(n, k, generator=G) * 0.02)
    eager = torch.ops.dsv3.fp8_linear(x, wq, ws)
    compiled = torch.compile(lambda a: torch.ops.dsv3.fp8_linear(a, wq, ws), fullgraph=True)(x)
    assert torch.equal(eager, compiled)
    deq = torch.compile(dequantize_weight, fullgraph=True)(wq, ws)
    assert torch.equal(deq, dequantize_weight(wq, ws))


@pytest.mark.parametrize("b,s,h,c,r,t", [(2, 1, 4, 128, 16, 40), (3, 5, 3, 72, 8, 24), (1, 3, 16, 512, 64, 64)])
def test_mla_attention_absorbed_equals_naive_attention(b, s, h, c, r, t):
    """Absorbed attention over the latent cache == ordinary attention with per-head K/V expanded by W_kv_b (6.2)."""
    nope, vdim, scale = 16, 24, 0.17
    g = torch.Generator().manual_seed(b * 100 + s)
    c_kv = torch.randn(b, t, c, generator=g, dtype=torch.float64)
    k_pe = torch.randn(b, t, r, generator=g, dtype=torch.float64)
    w_kvb = torch.randn(h, nope + vdim, c, generator=g, dtype=torch.float64) * c**-0.5
    q_nope = torch.randn(b, s, h, nope, generator=g, dtype=torch.float64)
    q_pe = torch.randn(b, s, h, r, generator=g, dtype=torch.float64)
    # each row at its own position, the query tokens consecutive (as in decode or a chunk)
    start = torch.randint(0, t - s + 1, (b,), generator=g)
    input_pos = start[:, None] + torch.arange(s)[None, :]

    w_uk, w_uv = w_kvb[:, :nope], w_kvb[:, nope:]
    cache = torch.cat([c_kv, k_pe], -1).float()
    q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk).float()
    o_lat = torch.ops.dsv3.mla_attention(q_lat, q_pe.float(), cache, input_pos, scale)
    got = torch.einsum("bshc,hdc->bshd", o_lat.double(), w_uv)

    k = torch.einsum("btc,hdc->bthd", c_kv, w_uk)
    v = torch.einsum("btc,hdc->bthd", c_kv, w_uv)
    ref = torch.zeros(b, s, h, vdim, dtype=torch.float64)
    for bi in range(b):
        for si in range(s):
            n = int(input_pos[bi, si]) + 1
            for hi in range(h):
                sc = (k[bi, :n, hi] @ q_nope[bi, si, hi] + k_pe[bi, :n] @ q_pe[bi, si, hi]) * scale
                ref[bi, si, hi] = torch.softmax(sc, 0) @ v[bi, :n, hi]
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("fp8", [False, True])
def test_routed_experts_pairs_and_combine(fp8):
    """dsv3.routed_experts_pairs (CPU: the dense reference) + combine_pairs (the model's default form) == the
    routed-experts op, with invalid ids, against float64 sums too (ids do not repeat within a token, as the router's)."""
    from dsv3.kernels.routed_experts import combine_pairs

    t, d, i, e, topk = 5, 136, 72, 4, 3
    x = torch.randn(t, d, generator=G).bfloat16()
    ws = [torch.randn(e, i, d, generator=G) * 0.1, torch.randn(e, i, d, generator=G) * 0.1,
          torch.randn(e, d, i, generator=G) * 0.1]
    if fp8:
        qs = [quantize_weight(w) for w in ws]
        w = [qs[0][0], qs[1][0], qs[2][0], qs[0][1], qs[1][1], qs[2][1]]
    else:
        w = [v.bfloat16() for v in ws] + [None] * 3
    idx = torch.tensor([[0, 3, 1], [2, 1, -1], [3, 7, 0], [1, 0, 2], [5, -2, 9]])
    wts = torch.rand(t, topk, generator=G)
    pairs = torch.ops.dsv3.routed_experts_pairs(x, idx, *w)
    assert pairs.shape == (t, topk, d) and pairs.dtype == x.dtype
    y = combine_pairs(pairs, idx, wts, e)
    assert torch.equal(y[4], torch.zeros_like(y[4]))  # no valid id
    assert _rel(y, torch.ops.dsv3.routed_experts(x, idx, wts, *w)) < 4e-3  # fp32 sums in another order, bf16 out
    ref = torch.zeros(t, d, dtype=torch.float64)
    for ti in range(t):
        for kk in range(topk):
            ex = int(idx[ti, kk])
            if 0 <= ex < e:
                ref[ti] += wts[ti, kk].double() * pairs[ti, kk].double()
    assert _rel(y, ref) < 4e-3


@pytest.mark.parametrize("fp8", [False, True])
def test_routed_experts_reference(fp8):
    t, d, i, e, topk = 6, 200, 88, 5, 2
    x = torch.randn(t, d, generator=G)
    gate, up, down = (torch.randn(e, i, d, generator=G) * 0.05, torch.randn(e, i, d, generator=G) * 0.05,
                      torch.randn(e, d, i, generator=G) * 0.05)
    idx = torch.tensor([[0, 3], [4, 1], [2, 2 + e], [-1, 1], [3, 0], [7, 9]])  # ids outside [0, E) are skipped
    wts = torch.rand(t, topk, generator=G)
    if fp8:
        (gq, gs), (uq, us), (dq, ds) = quantize_weight(gate), quantize_weight(up), quantize_weight(down)
        y = torch.ops.dsv3.routed_experts(x, idx, wts, gq, uq, dq, gs, us, ds)
        gate, up, down = dequantize_weight(gq, gs), dequantize_weight(uq, us), dequantize_weight(dq, ds)
    else:
        y = torch.ops.dsv3.routed_experts(x, idx, wts, gate, up, down, None, None, None)
    ref = torch.zeros(t, d, dtype=torch.float64)
    for ti in range(t):
        for kk in range(topk):
            ex = int(idx[ti, kk])
            if 0 <= ex < e:
                xt = x[ti].double()
                h = F.silu(gate[ex].double() @ xt) * (up[ex].double() @ xt)
                ref[ti] += wts[ti, kk].double() * (down[ex].double() @ h)
    assert (y[5] == 0).all()
    if fp8:  # W8A8: the input and the intermediate are each quantized to e4m3 (~2^-5 each, in norm)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 5e-2
    else:
        assert _rel(y, ref) < 1e-6
