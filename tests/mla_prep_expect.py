"""The arithmetic of `dsv3.kernels.mla_decode_prep._mla_prefill_prep_kernel` in torch, bit for bit, and inputs for
checking it; shared by tests/interpret_mla_prep.py (the kernel under the interpreter) and tests/test_mla_prep.py
(on the GPU). Not a test module; nothing here imports triton."""

from __future__ import annotations

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats as their bits: equal bits, not just equal values (-0.0 != +0.0)."""
    return t.contiguous().view(torch.int16)


def prefill_inputs(b, s, h, dn, r, c, seed, t_extra=6, device="cpu"):
    """q and kv_a as column slices of one projection output with trailing columns (row stride > their widths), as
    the model's fused qkv_a projection gives them; rope tables with a YaRN-like factor; a cache with spare rows
    (B < B_max) and room for positions starting anywhere in [0, t_extra)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(b, s, h * (dn + r) + c + r + 40, generator=g).to(torch.bfloat16)
    q = proj[..., :h * (dn + r)].view(b, s, h, dn + r)
    kv_a = proj[..., h * (dn + r):h * (dn + r) + c + r]
    norm_w = (1 + 0.1 * torch.randn(c, generator=g)).to(torch.bfloat16)
    ang = torch.rand(b, s, r // 2, generator=g) * 6.0
    cache = torch.randn(b + 2, s + t_extra, c + r, generator=g).to(torch.bfloat16)
    pos = (torch.randint(0, t_extra, (b, 1), generator=g) + torch.arange(s)).contiguous()
    out = [q, kv_a, norm_w, ang.cos() * 1.1, ang.sin() * 1.1, cache, pos]
    if device != "cpu":  # q and kv_a stay views of one device buffer
        proj = proj.to(device)
        out = [proj[..., :h * (dn + r)].view(b, s, h, dn + r), proj[..., h * (dn + r):h * (dn + r) + c + r]]
        out += [t.to(device) for t in (norm_w, ang.cos() * 1.1, ang.sin() * 1.1, cache, pos)]
    return out


def gpu_order_sum_sq(x: torch.Tensor) -> torch.Tensor:
    """sum(x^2) over the last dim in fp32, in `_row_sum_sq`'s order: the C_PAD channels as (n, lane, 8-vector v);
    each lane folds n, then v, left to right; then lanes l and l + half are added, halves first."""
    c = x.shape[-1]
    c_pad = 1 << (c - 1).bit_length()
    red_v = min(8, c_pad)
    red_l = min(32, c_pad // red_v)
    red_n = c_pad // (red_v * red_l)
    sq = torch.nn.functional.pad(x.float(), (0, c_pad - c)).square()  # exact: 16-bit values squared
    sq = sq.view(*x.shape[:-1], red_n, red_l, red_v).transpose(-3, -2).reshape(*x.shape[:-1], red_l, red_n * red_v)
    acc = sq[..., 0]
    for e in range(1, red_n * red_v):
        acc = acc + sq[..., e]
    while acc.shape[-1] > 1:
        acc = acc[..., :acc.shape[-1] // 2] + acc[..., acc.shape[-1] // 2:]
    return acc[..., 0]


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 a * b + c rounded once (the product is exact in float64; a second rounding of the float64 sum to fp32
    differs from one only on ties that random data does not hit)."""
    return (a.double() * b.double() + c.double()).float()


def q_hi(x1, x2, cs, sn):
    """FUSED_ROPE's query second half: x2 * cos fused."""
    return fma(x2, cs, x1 * sn)


def k_hi(x1, x2, cs, sn):
    """FUSED_ROPE's key second half: x1 * sin fused."""
    return fma(x1, sn, x2 * cs)


def swapped(hi):
    """The same FMA with the other product fused."""
    return lambda x1, x2, cs, sn: hi(x2, x1, sn, cs)


def rope(x, cos, sin, hi=None, contract_lo=False):
    """De-interleaved rope in fp32, rounded to x's dtype (`apply_rope`): hi(x1, x2, cos, sin) replaces the second
    half's x2 * cos + x1 * sin; contract_lo: the first half x1 * cos - x2 * sin as LLVM contracts it (x1 * cos
    fused)."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    lo = fma(x1, cos, -(x2 * sin)) if contract_lo else x1 * cos - x2 * sin
    hi = x2 * cos + x1 * sin if hi is None else hi(x1, x2, cos, sin)
    return torch.cat([lo, hi], dim=-1).to(x.dtype)


def prefill_expected(q, kv_a, norm_w, cos, sin, eps, dn, fused, contract_lo=False):
    """(q_pe, latent) with the kernel's arithmetic: the model's rounding points, `_row_sum_sq`'s order, and with
    `fused` FUSED_ROPE's explicit FMAs in the second halves; contract_lo: also the first halves' contraction,
    which the compiled kernel has with fp fusion (the interpreter contracts nothing)."""
    c = norm_w.shape[0]
    q_pe = rope(q[..., dn:], cos[:, :, None, :], sin[:, :, None, :], q_hi if fused else None, contract_lo)
    x = kv_a[..., :c]
    ms = gpu_order_sum_sq(x) / c + torch.tensor(eps, dtype=torch.float32)
    inv = 1.0 / torch.sqrt(ms)
    normed = (x.float() * inv[..., None]).to(x.dtype).float()
    c_kv = (norm_w.float() * normed).to(x.dtype)
    return q_pe, torch.cat([c_kv, rope(kv_a[..., c:], cos, sin, k_hi if fused else None, contract_lo)], dim=-1)


def near_ties(n, hi, gen, tries=1024):
    """n (x1, x2, cos, sin): x1, x2 bf16 and sin random, cos tuned so that x2 * cos + x1 * sin lies within a few
    fp32 ulps of a bf16 rounding midpoint; kept where `hi` rounds to a bf16 value that neither the other product
    fused nor no FMA gives."""
    sign = torch.where(torch.rand(tries, 2, generator=gen) < 0.5, -1.0, 1.0)
    x = ((torch.rand(tries, 2, generator=gen) + 0.5) * sign).to(torch.bfloat16).float()
    x1, x2 = x[:, 0], x[:, 1]
    sn = torch.rand(tries, generator=gen) * 2 - 1
    v0 = x2.double() * (torch.rand(tries, generator=gen).double() * 2 - 1) + x1.double() * sn.double()
    ulp = torch.exp2(torch.floor(torch.log2(v0.abs())) - 7)
    cs0 = ((((v0 / ulp).floor() + 0.5) * ulp - x1.double() * sn.double()) / x2.double()).float()
    cs = cs0[:, None] + torch.arange(-4, 5)[None, :] * torch.exp2(torch.floor(torch.log2(cs0.abs())) - 23)[:, None]
    args = (x1[:, None].expand_as(cs), x2[:, None].expand_as(cs), cs, sn[:, None].expand_as(cs))
    want = hi(*args).to(torch.bfloat16)
    ok = (want != swapped(hi)(*args).to(torch.bfloat16)) & (want != (args[1] * cs + args[0] * args[3]).bfloat16())
    rows = ok.any(1).nonzero()[:, 0][:n]
    assert len(rows) == n
    return x1[rows], x2[rows], cs[rows, ok[rows].float().argmax(1)], sn[rows]
