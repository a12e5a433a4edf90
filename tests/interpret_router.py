"""The Triton kernels of `dsv3.kernels.router` run by the Triton CPU interpreter, against `route_reference`.

Not collected by the normal suite (the name does not start with `test_`): `tests/test_router.py` runs this file in a
subprocess with TRITON_INTERPRET=1, because the flag must be set before triton is imported. By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_router.py

Indices are compared exactly except on tokens whose decision is within 1e-5 of flipping (a near-tie between the
k-th and (k+1)-th choice, or between the last kept and the first dropped group, measured in float64): the kernel's
fp32 logits are summed in another order than the reference's GEMM. Exact ties (duplicated router rows) are decided
by the kernel's documented rule, lowest index first, and checked against a float64 model of that rule.
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_router.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import router as R  # noqa: E402
from interpret_kernels import fixed_interpreter  # noqa: E402,F401  (the interpreter's bf16 tl.dot, mended)

# bf16 x and weight above 8 tokens take the logits kernel's tensor-core tiles (DOT), whose bf16 tl.dot the interpreter
# gets wrong unless mended
pytestmark = pytest.mark.usefixtures("fixed_interpreter")

# name: (E, routing args) -- the three real routings, and small ones (ragged groups of 4, 3 groups of 4)
CONFIGS = {
    "16B": (64, dict(top_k=6, n_group=1, topk_group=1, sigmoid=False, group_top2=False, norm_topk_prob=False,
                     routed_scaling_factor=1.0)),
    "236B": (160, dict(top_k=6, n_group=8, topk_group=3, sigmoid=False, group_top2=False, norm_topk_prob=False,
                       routed_scaling_factor=16.0)),
    "671B": (256, dict(top_k=8, n_group=8, topk_group=4, sigmoid=True, group_top2=True, norm_topk_prob=True,
                       routed_scaling_factor=2.5)),
    "tiny-ragged": (12, dict(top_k=3, n_group=3, topk_group=2, sigmoid=True, group_top2=True, norm_topk_prob=True,
                             routed_scaling_factor=1.5)),
    "tiny-v2-norm": (16, dict(top_k=3, n_group=4, topk_group=2, sigmoid=False, group_top2=False,
                              norm_topk_prob=True, routed_scaling_factor=16.0)),
    "tiny-greedy": (4, dict(top_k=2, n_group=1, topk_group=1, sigmoid=True, group_top2=False, norm_topk_prob=False,
                            routed_scaling_factor=1.0)),
}


def decision_margin(x, w, bias, top_k, n_group, topk_group, sigmoid, group_top2, **_) -> torch.Tensor:
    """[T] float64: the smallest score gap that decides the routing (k-th vs next choice, last kept vs first
    dropped group, and the order inside the top k). 0 means an exact tie."""
    logits = x.double() @ w.double().t()
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    choice = scores if bias is None else scores + bias.double()
    t, e = choice.shape
    gaps = []
    if n_group > 1 and topk_group < n_group:
        per = e // n_group
        top = choice.reshape(t, n_group, per).sort(-1, descending=True).values
        gs = top[..., 0] + top[..., 1] if group_top2 else top[..., 0]
        gs_sorted, gorder = gs.sort(dim=-1, descending=True, stable=True)
        gaps.append(gs_sorted[:, topk_group - 1] - gs_sorted[:, topk_group])
        kept = torch.zeros(t, n_group, dtype=torch.bool).scatter(1, gorder[:, :topk_group], True)
        choice = choice.masked_fill(~kept.repeat_interleave(per, 1), float("-inf"))
    cs = choice.sort(-1, descending=True).values
    nxt = cs[:, 1:top_k + 1] if top_k < e else torch.cat([cs[:, 1:], torch.full((t, 1), float("-inf"))], 1)
    gaps.append((cs[:, :top_k] - nxt).min(-1).values)
    return torch.stack(gaps).min(0).values


def routing_inputs(e, d, t, args, dtype, gen, w_dtype=torch.bfloat16):
    x = torch.randn(t, d, generator=gen).to(dtype)
    w = (torch.randn(e, d, generator=gen) * d ** -0.5).to(w_dtype)
    bias = torch.rand(e, generator=gen) * 0.1 if args["group_top2"] else None
    return x, w, bias


def check(out, ref, margin, exact_ties_ok=False):
    idx, wt = out
    ridx, rwt = ref
    assert idx.dtype == torch.int64 and wt.dtype == torch.float32 and idx.shape == ridx.shape == wt.shape
    stable = margin > 1e-5
    if exact_ties_ok:
        stable = stable | (margin == 0)
    assert stable.float().mean() >= 0.5, "too many near-ties: the test inputs are badly conditioned"
    assert torch.equal(idx[stable], ridx[stable])
    torch.testing.assert_close(wt[stable], rwt[stable], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t", [1, 3, 17, 64])
@pytest.mark.parametrize("d", [128, 200])
@pytest.mark.parametrize("name", ["16B", "236B", "671B"])
def test_route_kernels(name, d, t):
    e, args = CONFIGS[name]
    gen = torch.Generator().manual_seed(e * 1000 + d * 10 + t)
    x, w, bias = routing_inputs(e, d, t, args, torch.bfloat16, gen)
    out = R.route_triton(x, w, bias, **args)
    check(out, R.route_reference(x, w, bias, **args), decision_margin(x, w, bias, **args))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("t", [5, 20])
def test_route_kernels_splits_and_small_configs(name, splits, t):
    """A fixed D split (the partials are summed by the select kernel), every config, ragged D and E, both tile
    shapes of the logits kernel (FLAT for T <= 8, 3D beyond)."""
    e, args = CONFIGS[name]
    gen = torch.Generator().manual_seed(e + splits + t)
    x, w, bias = routing_inputs(e, 456, t, args, torch.bfloat16, gen)
    out = R.route_triton(x, w, bias, **args, splits=splits)
    check(out, R.route_reference(x, w, bias, **args), decision_margin(x, w, bias, **args))


@pytest.mark.parametrize("n_shared", [1, 2, 3])
def test_route_kernels_shared_columns(n_shared):
    """Always-on columns for stacked shared experts: ids E .. E + n_shared - 1 with weight 1 after the top-k."""
    e, args = CONFIGS["16B"]
    gen = torch.Generator().manual_seed(40 + n_shared)
    x, w, bias = routing_inputs(e, 128, 3, args, torch.bfloat16, gen)
    idx, wt = R.route_triton(x, w, bias, **args, n_shared=n_shared)
    k = args["top_k"]
    assert idx.shape == wt.shape == (3, k + n_shared)
    assert torch.equal(idx[:, k:], torch.arange(e, e + n_shared).expand(3, n_shared))
    assert torch.equal(wt[:, k:], torch.ones(3, n_shared))
    check((idx[:, :k], wt[:, :k]), R.route_reference(x, w, bias, **args), decision_margin(x, w, bias, **args))


@pytest.mark.parametrize("t", [4, 20])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)])
def test_route_kernels_dtypes(x_dtype, w_dtype, t):
    """Operands of other dtypes than bf16 x bf16 keep the fp32 FMA tiles (FLAT at T = 4, 3D at T = 20)."""
    e, args = CONFIGS["671B"]
    gen = torch.Generator().manual_seed(3 + t)
    x, w, bias = routing_inputs(e, 64, t, args, x_dtype, gen, w_dtype)
    out = R.route_triton(x, w, bias, **args)
    check(out, R.route_reference(x, w, bias, **args), decision_margin(x, w, bias, **args))


def test_route_kernels_strided_x():
    e, args = CONFIGS["236B"]
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(3, 300, generator=gen).bfloat16()
    x = wide[:, :200]  # rows with a stride wider than D
    w = (torch.randn(e, 200, generator=gen) * 200 ** -0.5).bfloat16()
    out = R.route_triton(x, w, None, **args)
    check(out, R.route_reference(x, w, None, **args), decision_margin(x, w, None, **args))


def stable_order_reference(x, w, bias, top_k, n_group, topk_group, sigmoid, group_top2, norm_topk_prob,
                           routed_scaling_factor):
    """float64 routing with the kernels' tie rule (stable sorts: lowest expert / group index first)."""
    logits = x.double() @ w.double().t()
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    choice = scores if bias is None else scores + bias.double()
    t, e = choice.shape
    if n_group > 1 and topk_group < n_group:
        per = e // n_group
        top = choice.reshape(t, n_group, per).sort(-1, descending=True).values
        gs = top[..., 0] + top[..., 1] if group_top2 else top[..., 0]
        gorder = gs.sort(dim=-1, descending=True, stable=True).indices
        kept = torch.zeros(t, n_group, dtype=torch.bool).scatter(1, gorder[:, :topk_group], True)
        choice = choice.masked_fill(~kept.repeat_interleave(per, 1), float("-inf"))
    idx = choice.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    wt = scores.gather(1, idx)
    if norm_topk_prob:
        wt = wt / wt.sum(-1, keepdim=True)
    return idx, (wt * routed_scaling_factor).float()


@pytest.mark.parametrize("name", ["236B", "671B", "tiny-v2-norm", "16B"])
def test_route_kernels_exact_ties(name):
    """Router rows (and biases) duplicated in pairs, and whole groups duplicated: every choice and group score has
    an exact twin, which the kernel must resolve to the lower index."""
    e, args = CONFIGS[name]
    gen = torch.Generator().manual_seed(5)
    x, w, bias = routing_inputs(e, 96, 6, args, torch.bfloat16, gen)
    w = w[torch.arange(e) // 2 * 2]                        # row 2j+1 == row 2j
    ng = args["n_group"]
    if ng > 1:
        per = e // ng
        src = torch.arange(e)
        src = (src // per // 2 * 2) * per + src % per     # group 2g+1 == group 2g
        w = w[src]
        bias = None if bias is None else bias[src]
    if bias is not None and ng == 1:
        bias = bias[torch.arange(e) // 2 * 2]
    idx, wt = R.route_triton(x, w, bias, **args)
    ridx, rwt = stable_order_reference(x, w, bias, **args)
    stable = decision_margin(x, w, bias, **args)
    stable = (stable == 0) | (stable > 1e-5)
    assert stable.any()
    assert torch.equal(idx[stable], ridx[stable])
    torch.testing.assert_close(wt[stable], rwt[stable], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_shared", [0, 2])
@pytest.mark.parametrize("name", ["16B", "236B", "671B", "tiny-ragged"])
def test_select_logits_prefill_sized(name, n_shared):
    """The prefill path: fp32 logits of many tokens (the cuBLAS GEMM's on the GPU; here the reference's) selected by
    `_router_select_kernel`, one program per token: the reference's selection on the same logits. Same logits on
    both sides, so only exact ties could differ (the kernel's rule: lowest index)."""
    e, args = CONFIGS[name]
    gen = torch.Generator().manual_seed(e * 7 + n_shared)
    x, w, bias = routing_inputs(e, 96, 150, args, torch.bfloat16, gen)
    logits = torch.nn.functional.linear(x.float(), w.float())
    out = R.select_logits(logits, bias, **args, n_shared=n_shared)
    ref = R.route_from_logits(logits, bias, **args, n_shared=n_shared)
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["671B", "tiny-v2-norm"])
def test_select_group_view_equals_membership_grid(name):
    """Power-of-two groupings (671B: 8 groups of 32) score groups on a [groups, per group] view of the experts;
    the [groups, experts] membership grid every grouping can use must select the same experts with the same
    weights, exact ties included (duplicated logits)."""
    e, args = CONFIGS[name]
    gen = torch.Generator().manual_seed(e + 11)
    logits = torch.randn(1, 40, e, generator=gen)
    logits[0, :8, 1::2] = logits[0, :8, 0::2]  # exact ties inside groups (and across them)
    logits[0, 8:12] = logits[0, 8:12, :1]  # every expert tied
    bias = torch.rand(e, generator=gen) * 0.1 if args["group_top2"] else None
    outs = []
    for view in (None, False):
        idx = torch.empty(40, args["top_k"], dtype=torch.int64)
        wt = torch.empty(40, args["top_k"], dtype=torch.float32)
        R.select_from_partials(logits, bias, idx, wt, **args, group_view=view)
        outs.append((idx, wt))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    ref = R.route_from_logits(logits[0], bias, **args)
    assert torch.equal(outs[0][0][12:], ref[0][12:])  # untied rows: the reference's selection
