"""`dsv3.mla_attention_out`'s Triton path (flash-decoding partials merged inside the W_UV kernel) run by the Triton
CPU interpreter: bitwise against the two-op composition it replaces (mla_attention's kernels, then mla_absorb's
CUDA-core W_UV kernel) where that composition runs the same arithmetic, and against float64 math.

Run in its own process with TRITON_INTERPRET=1 (tests/test_attn_out.py does; see tests/interpret_kernels.py for why
and for the `fixed_interpreter` fixture). By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_attn_out.py
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_attn_out.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import dsv3.kernels  # noqa: E402,F401
from dsv3.kernels import mla_absorb as AB  # noqa: E402
from dsv3.kernels import mla_attention as A  # noqa: E402
from dsv3.kernels import mla_attention_out as O  # noqa: E402
from dsv3.kernels.fp8_blocks import quantize_weight  # noqa: E402
from interpret_kernels import fixed_interpreter  # noqa: E402,F401
from kernel_checks import rel_err  # noqa: E402

# B, S, H, Dn, Dv, C, R, T (cache rows), n_splits, fp8 weight: V2/V3 latent dims (C=512, R=64) with few heads, and
# small ragged ones (C not a power of two, heads straddling kv_b_proj's 128-row scale blocks, Dv not one either)
CASES = [
    (1, 1, 2, 128, 128, 512, 64, 300, 4, True),
    (2, 1, 3, 16, 24, 72, 8, 90, 3, True),
    (1, 3, 2, 32, 16, 200, 16, 120, 5, True),   # speculative verify: 3 query tokens, causal among them
    (3, 1, 2, 16, 24, 72, 8, 90, 2, False),     # bf16 kv_b_proj (no scales)
    (2, 1, 2, 16, 24, 72, 8, 8192, 6, True),    # a long cache: the plan's 128-row key blocks and splits
]


def _inputs(case, seed):
    b, s, h, dn, dv, c, r, t_cap, _, fp8 = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, c, generator=g).to(torch.bfloat16)
    qp = torch.randn(b, s, h, r, generator=g).to(torch.bfloat16)
    cache = torch.randn(b, t_cap, c + r, generator=g).to(torch.bfloat16)
    # rows at different lengths: one inside the first split, one at the end of the cache
    last = torch.randint(s - 1, t_cap, (b,), generator=g)
    last[0] = t_cap - 1
    if b > 1:
        last[1] = min(s + 3, t_cap - 1)
    pos = last[:, None] - (s - 1) + torch.arange(s)[None]
    for i in range(b):  # stale rows past a sequence's length must never be read
        cache[i, int(last[i]) + 1:] = float("nan")
    w = torch.randn(h * (dn + dv), c, generator=g) * 0.1
    w, ws = quantize_weight(w) if fp8 else (w.to(torch.bfloat16), None)
    return q, qp, cache, pos, w, ws


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_d", [4, 16, 64])
def test_fused_equals_two_ops(case, block_d, fixed_interpreter):
    b, s, h, dn, dv, c, r, t_cap, n_splits, _ = case
    q, qp, cache, pos, w, ws = _inputs(case, seed=sum(case[:8]))
    out = O.mla_attention_out_triton(q, qp, cache, pos, 0.11, w, ws, dn, dv, block_d=block_d, n_splits=n_splits)
    assert out.shape == (b, s, h, dv) and out.dtype == q.dtype
    o_latent = A.mla_attention_triton(q, qp, cache, pos, 0.11, n_splits=n_splits)
    if b * s <= AB.ABSORB_ROWS_MAX_M:
        # the batch-1 composition runs the same arithmetic in the same order: equal bit for bit
        two = AB.mla_absorb_triton(o_latent, w, ws, dn, dv, True, rows=True)
        assert torch.equal(out, two)
    else:  # the composition's W_UV runs on the MMA kernel (another summation order)
        two = AB.mla_absorb_triton(o_latent, w, ws, dn, dv, True)
        assert rel_err(out, two) < 4e-3
    clean = torch.nan_to_num(cache.double(), nan=0.0)
    w_ref = w if ws is not None else w.double()  # FP8: the reference dequantizes it in x's dtype
    ref = O.mla_attention_out_reference(q.double(), qp.double(), clean, pos, 0.11, w_ref, ws, dn, dv)
    assert rel_err(out, ref) < 8e-3


def test_one_split_falls_back_to_the_composition(fixed_interpreter):
    """A cache too short to split: the attention kernel writes its output itself and W_UV follows as before."""
    case = (1, 1, 2, 16, 24, 72, 8, 40, 1, True)
    b, s, h, dn, dv, c, r, t_cap, n_splits, _ = case
    q, qp, cache, pos, w, ws = _inputs(case, seed=5)
    out = O.mla_attention_out_triton(q, qp, cache, pos, 0.11, w, ws, dn, dv, n_splits=1)
    clean = torch.nan_to_num(cache.double(), nan=0.0)
    ref = O.mla_attention_out_reference(q.double(), qp.double(), clean, pos, 0.11, w, ws, dn, dv)
    assert rel_err(out, ref) < 8e-3


def test_default_plan_at_decode_shapes(fixed_interpreter):
    """16 heads as the model's decode has them, the default attention plan and block: equal to the composition."""
    case = (1, 1, 16, 128, 128, 512, 64, 256, None, True)
    b, s, h, dn, dv, c, r, t_cap, _, _ = case
    q, qp, cache, pos, w, ws = _inputs(case, seed=11)
    out = O.mla_attention_out_triton(q, qp, cache, pos, 0.11, w, ws, dn, dv)
    two = AB.mla_absorb_triton(A.mla_attention_triton(q, qp, cache, pos, 0.11), w, ws, dn, dv, True, rows=True)
    assert torch.equal(out, two)


def test_over_the_merge_budget_falls_back_to_combine_and_w_uv(fixed_interpreter, monkeypatch):
    """A plan whose re-merging would exceed ATTN_OUT_MERGE_BYTES_MAX runs the combine kernel over the same
    partials, then mla_absorb: exactly the two ops."""
    monkeypatch.setattr(O, "ATTN_OUT_MERGE_BYTES_MAX", 0)
    case = CASES[1]
    b, s, h, dn, dv, c, r, t_cap, n_splits, _ = case
    q, qp, cache, pos, w, ws = _inputs(case, seed=17)
    out = O.mla_attention_out_triton(q, qp, cache, pos, 0.11, w, ws, dn, dv, n_splits=n_splits)
    two = AB.mla_absorb_triton(A.mla_attention_triton(q, qp, cache, pos, 0.11, n_splits=n_splits), w, ws, dn, dv,
                               True)
    assert torch.equal(out, two)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_bf16_partials(case, fixed_interpreter, monkeypatch):
    """Split outputs stored in bf16 (DSV3_MLA_PARTIALS=bf16): the fused kernel still equals the two-op composition
    over the same partials bit for bit, and float64 math within the fp32-partials bound."""
    monkeypatch.setenv("DSV3_MLA_PARTIALS", "bf16")
    b, s, h, dn, dv, c, r, t_cap, n_splits, _ = case
    q, qp, cache, pos, w, ws = _inputs(case, seed=sum(case[:8]) + 1)
    out = O.mla_attention_out_triton(q, qp, cache, pos, 0.11, w, ws, dn, dv, block_d=16, n_splits=n_splits)
    o_latent = A.mla_attention_triton(q, qp, cache, pos, 0.11, n_splits=n_splits)
    assert torch.equal(out, AB.mla_absorb_triton(o_latent, w, ws, dn, dv, True, rows=True))
    clean = torch.nan_to_num(cache.double(), nan=0.0)
    ref = O.mla_attention_out_reference(q.double(), qp.double(), clean, pos, 0.11, w, ws, dn, dv)
    assert rel_err(out, ref) < 8e-3
    assert rel_err(o_latent, A.mla_attention_reference(q.double(), qp.double(), clean, pos, 0.11)) < 8e-3
