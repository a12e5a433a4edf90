"""`dsv3.mla_attention_out`'s fused Triton path run by the Triton CPU interpreter, against the composition it replaces
(`mla_attention_triton` + `mla_absorb_triton`, interpreted too) and against a float64 formula.

Run in its own process with TRITON_INTERPRET=1 (tests/test_mla_out.py does; see tests/interpret_kernels.py for why
and for the `fixed_interpreter` fixture, which makes the interpreter's fp32 -> bf16 casts round to nearest even
as the GPU does). By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_mla_out.py
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_mla_out.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import mla_absorb as AB  # noqa: E402
from dsv3.kernels import mla_attention as A  # noqa: E402
from dsv3.kernels import mla_attention_out as AO  # noqa: E402
from dsv3.kernels.fp8_blocks import quantize_weight  # noqa: E402
from interpret_kernels import fixed_interpreter  # noqa: E402
from kernel_checks import rel_err  # noqa: E402

_FIXTURES = (fixed_interpreter,)  # imported for pytest (tests request it by name)

SCALE = 0.12

# name: (H, C, R, Dn, Dv, fp8). V2/V3 head dims, and small ragged ones (C not a power of two, heads straddling the
# 128-row scale blocks of kv_b_proj: rows of head h are h*(Dn+Dv) + Dn + d)
DIMS = {
    "v2": (2, 512, 64, 128, 128, True),
    "ragged": (3, 72, 8, 16, 24, True),
    "ragged_dense": (3, 72, 8, 16, 24, False),
}

# (dims, B, S, T, positions of each sequence's first token, plan overrides). block_t = min_chunk = 16 makes splits
# of 16-row multiples, so a few hundred cache rows give several splits: with n_splits=4, a sequence of length 70
# has chunks of 32 and leaves split 3 inactive; length <= 16 runs in split 0 alone.
CASES = [
    ("v2", 1, 1, 100, [99], dict(n_splits=4, block_t=16, min_chunk=16)),
    ("v2", 2, 1, 100, [69, 5], dict(n_splits=4, block_t=16, min_chunk=16)),
    ("v2", 1, 2, 70, [40], dict(n_splits=3, block_t=16, min_chunk=16)),
    ("ragged", 3, 1, 130, [129, 69, 3], dict(n_splits=4, block_t=16, min_chunk=16)),
    ("ragged", 2, 2, 130, [68, 100], dict(n_splits=4, block_t=16, min_chunk=16)),
    ("ragged", 3, 2, 130, [10, 127, 60], dict(n_splits=5, block_t=16, min_chunk=16)),
    ("ragged", 2, 1, 130, [129, 40], dict(n_splits=1)),  # one split: SPLIT forced on anyway
    ("ragged", 3, 1, 300, [299, 5, 130], dict()),  # the default decode plan (64-row splits)
    # 16 splits: BLOCK_S 16, and rows with <= ATTN_OUT_SMALL_S (8) active splits take the small-tile branch
    # (length 101: 7 chunks of 16) while the others loop over [16, C] tiles (length 300: 10 of 32; 251: 16 of 16)
    ("ragged", 3, 1, 300, [299, 100, 250], dict(n_splits=16, block_t=16, min_chunk=16)),
    ("v2", 2, 1, 300, [40, 299], dict(n_splits=16, block_t=16, min_chunk=16)),
    ("ragged_dense", 3, 1, 130, [129, 69, 3], dict(n_splits=4, block_t=16, min_chunk=16)),
    ("ragged_dense", 2, 2, 130, [68, 100], dict(n_splits=4, block_t=16, min_chunk=16)),
]


def _inputs(dims, b, s, t, starts, dtype, seed, nan_tail=True):
    h, c, r, dn, dv, fp8 = DIMS[dims]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, c, generator=g).to(dtype)
    qp = torch.randn(b, s, h, r, generator=g).to(dtype)
    cache = torch.randn(b, t, c + r, generator=g).to(dtype)
    pos = torch.tensor(starts)[:, None] + torch.arange(s)[None]
    assert int(pos.max()) < t
    if nan_tail:  # stale garbage past every sequence's length must never be read
        for i in range(b):
            cache[i, int(pos[i].max()) + 1:] = float("nan")
    w = torch.randn(h * (dn + dv), c, generator=g) * 0.1
    w, ws = quantize_weight(w) if fp8 else (w.to(dtype), None)
    return q, qp, cache, pos, w, ws, dn, dv


def _float64(q, qp, cache, pos, w, ws, dn, dv):
    """einsum attention over the visible cache rows, then the dequantized (not rounded) W_UV, all in float64."""
    c = q.shape[-1]
    cache = torch.nan_to_num(cache.double(), nan=0.0)
    kv, pe = cache[..., :c], cache[..., c:]
    sc = (torch.einsum("bshc,btc->bsht", q.double(), kv) + torch.einsum("bshr,btr->bsht", qp.double(), pe)) * SCALE
    visible = torch.arange(cache.shape[1])[None, None, None, :] <= pos[:, :, None, None]
    p = torch.softmax(sc.masked_fill(~visible, float("-inf")), dim=-1)
    o = torch.einsum("bsht,btc->bshc", p, kv)
    wd = w.double()
    if ws is not None:
        wd = wd * ws.double().repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :c]
    h = q.shape[2]
    w_uv = wd.view(h, dn + dv, c)[:, dn:]
    return torch.einsum("bshc,hdc->bshd", o, w_uv)


def _composition(q, qp, cache, pos, w, ws, dn, dv, plan):
    o_latent = A.mla_attention_triton(q, qp, cache, pos, SCALE, **plan)
    return AB.mla_absorb_triton(o_latent, w, ws, dn, dv, True)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-b{c[1]}s{c[2]}t{c[3]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.usefixtures("fixed_interpreter")
def test_fused_matches_composition_and_float64(case):
    dims, b, s, t, starts, plan = case
    args = _inputs(dims, b, s, t, starts, torch.bfloat16, seed=sum(starts) + b + s)
    q, qp, cache, pos, w, ws, dn, dv = args
    out = AO.mla_attention_out_triton(q, qp, cache, pos, SCALE, w, ws, dn, dv, **plan)
    assert out.shape == (b, s, q.shape[2], dv) and out.dtype == q.dtype and out.is_contiguous()
    ref = _composition(*args, plan)
    assert rel_err(out, ref) < 5e-3
    assert (out != ref).float().mean() < 0.05  # differences: fp32 sum order only (an odd bf16 rounding flip)
    assert rel_err(out, _float64(*args)) < 1e-2
    # without the small-tile branch the combine runs with `_mla_combine_kernel`'s own BLOCK_S, and the absorb is the
    # composition's CUDA-core kernel (<= 4 tokens): the same fp32 operations in the same order, so bit for bit
    same = AO.mla_attention_out_triton(q, qp, cache, pos, SCALE, w, ws, dn, dv, small_s=0, **plan)
    if b * s <= AB.ABSORB_ROWS_MAX_M:
        assert torch.equal(same, ref)
    else:  # the composition's MMA absorb kernel sums C in another order
        assert rel_err(same, ref) < 5e-3
    # the small-tile branch forced on (2 splits), taken by the rows with at most 2 active splits
    small = AO.mla_attention_out_triton(q, qp, cache, pos, SCALE, w, ws, dn, dv, small_s=2, **plan)
    assert rel_err(small, ref) < 5e-3 and rel_err(small, out) < 5e-3


@pytest.mark.parametrize("block_d", [8, 32, 64])
@pytest.mark.usefixtures("fixed_interpreter")
def test_block_d_variants(block_d):
    """The sweep's BLOCK_D values (Dv = 24: the last block partly masked for 16 and 32; one program per head at 64)."""
    plan = dict(n_splits=4, block_t=16, min_chunk=16)
    args = _inputs("ragged", 2, 1, 130, [129, 50], torch.bfloat16, seed=block_d)
    q, qp, cache, pos, w, ws, dn, dv = args
    out = AO.mla_attention_out_triton(q, qp, cache, pos, SCALE, w, ws, dn, dv, block_d=block_d, small_s=0, **plan)
    assert torch.equal(out, _composition(*args, plan))


def test_fp16_unpatched_interpreter():
    """fp16 activations (the interpreter's own fp32 -> fp16 cast is exact RTNE), FP8 weight, several splits."""
    plan = dict(n_splits=3, block_t=16, min_chunk=16)
    args = _inputs("ragged", 2, 1, 130, [129, 20], torch.float16, seed=5)
    q, qp, cache, pos, w, ws, dn, dv = args
    out = AO.mla_attention_out_triton(q, qp, cache, pos, SCALE, w, ws, dn, dv, **plan)
    assert out.dtype == torch.float16
    assert rel_err(out, _composition(*args, plan)) < 2e-3
    assert rel_err(out, _float64(*args)) < 5e-3


@pytest.mark.usefixtures("fixed_interpreter")
def test_strided_inputs():
    """q_latent / q_pe as views of one wider tensor, input_pos an expanded view (zero batch stride)."""
    h, c, r, dn, dv, _ = DIMS["ragged"]
    g = torch.Generator().manual_seed(11)
    qfull = torch.randn(2, 1, h, c + r + 4, generator=g).to(torch.bfloat16)
    q, qp = qfull[..., :c], qfull[..., c:c + r]
    cache = torch.randn(2, 90, c + r, generator=g).to(torch.bfloat16)
    pos = torch.tensor([[77]]).expand(2, 1)
    w, ws = quantize_weight(torch.randn(h * (dn + dv), c, generator=g) * 0.1)
    plan = dict(n_splits=3, block_t=16, min_chunk=16)
    out = AO.mla_attention_out_triton(q, qp, cache, pos, SCALE, w, ws, dn, dv, **plan)
    ref = _composition(q, qp, cache, pos, w, ws, dn, dv, plan)
    assert rel_err(out, ref) < 5e-3
    assert rel_err(out, _float64(q, qp, cache, pos, w, ws, dn, dv)) < 1e-2


def test_default_plan():
    """`attn_out_plan`: BLOCK_D by tokens, the combine's BLOCK_S, the small-tile branch only below BLOCK_S."""
    assert AO.attn_out_plan(1, 64) == (AO.ATTN_OUT_BLOCK_D, 64, AO.ATTN_OUT_SMALL_S)
    assert AO.attn_out_plan(2, 17) == (32, 32, AO.ATTN_OUT_SMALL_S)
    assert AO.attn_out_plan(8, 17) == (64, 32, AO.ATTN_OUT_SMALL_S)
    assert AO.attn_out_plan(3, 5) == (32, 8, 0)
    assert AO.attn_out_plan(1, 1) == (AO.ATTN_OUT_BLOCK_D, 2, 0)
    assert AO.attn_out_plan(8, 100, block_d=8, block_s=16, small_s=4) == (8, 16, 4)
