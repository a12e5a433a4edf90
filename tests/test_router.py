"""Tests for `torch.ops.dsv3.route` (dsv3.kernels.router): the MoE router as one op.

CPU (part of `make test`):
- op registration (`torch.library.opcheck`: schema, fake impl, autograd registration, AOT dispatch) on the CPU branch;
- `route_reference` against a float64 implementation written here from the contract (sorts, not torch.topk) for
  the 16B / 236B / 671B routings on random inputs at their real shapes;
- (the model's router against Hugging Face's: tests/test_parity_hf.py);
- the two Triton kernels run by the Triton interpreter against `route_reference`: `tests/interpret_router.py`, in a
  subprocess because TRITON_INTERPRET=1 must be set before triton is imported.

GPU (`pytest -m gpu tests/test_router.py`, on the device): the op against the float64 implementation at the
16B / 236B / 671B shapes for T = 1, 8, 64 (Triton decode path) and T = 300, 4095 (prefill path: cuBLAS logits, the
select kernel; also with DSV3_ROUTE_PREFILL=torch), inside `torch.compile(fullgraph=True)` (prefill sizes also with
dynamic shapes, as the prefill graph has them), and under CUDA graph capture (no host sync) with fresh inputs on
replay.

Indices are compared exactly except on tokens whose routing is decided by a gap <= 1e-5 (k-th vs (k+1)-th choice,
last kept vs first dropped group, in float64): fp32 logits summed in another order may flip those legitimately.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.config import resolve_config
from dsv3.kernels import router as R  # (importing it registers torch.ops.dsv3.route)
from kernel_checks import check_env_switch, cuda, interpreter_failure, poison_allocator, run_interpreted

REAL_CONFIGS = ["16B", "236B", "671B"]
NEAR_TIE = 1e-5


def routing_float64(x, weight, bias, top_k, n_group, topk_group, sigmoid, group_top2, norm_topk_prob,
                    routed_scaling_factor):
    """The contract in float64, by sorting (stable: lowest index first on ties), independent of the module's code.
    Returns (idx [T, k], weights [T, k] float64, margin [T]: the smallest gap deciding the routing)."""
    logits = x.double() @ weight.double().t()
    scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
    choice = scores if bias is None else scores + bias.double()
    t, e = choice.shape
    gaps = []
    if n_group > 1 and topk_group < n_group:
        per = e // n_group
        best = choice.reshape(t, n_group, per).sort(dim=-1, descending=True).values
        group_score = best[..., 0] + best[..., 1] if group_top2 else best[..., 0]
        g_sorted, g_order = group_score.sort(dim=-1, descending=True, stable=True)
        gaps.append(g_sorted[:, topk_group - 1] - g_sorted[:, topk_group])
        kept = torch.zeros(t, n_group, dtype=torch.bool).scatter(1, g_order[:, :topk_group], True)
        choice = torch.where(kept.repeat_interleave(per, dim=1), choice, float("-inf"))
    c_sorted, order = choice.sort(dim=-1, descending=True, stable=True)
    idx = order[:, :top_k]
    following = torch.cat([c_sorted[:, 1:], torch.full((t, 1), float("-inf"), dtype=c_sorted.dtype)], dim=1)
    gaps.append((c_sorted[:, :top_k] - following[:, :top_k]).min(dim=-1).values)
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return idx, weights * routed_scaling_factor, torch.stack(gaps).min(dim=0).values


def real_inputs(name: str, t: int, device="cpu", seed=0):
    """x and router weight in bf16 at the config's shapes, logits ~ N(0, 1); the V3 bias as trained ones are
    (a small positive spread)."""
    cfg = resolve_config(name)
    args = R.route_args(cfg)
    g = torch.Generator().manual_seed(seed)
    d, e = cfg.hidden_size, cfg.n_routed_experts
    x = torch.randn(t, d, generator=g).bfloat16()
    w = (torch.randn(e, d, generator=g) * d ** -0.5).bfloat16()
    bias = torch.rand(e, generator=g) * 0.1 if cfg.topk_method == "noaux_tc" else None
    to = (lambda v: None if v is None else v.to(device))  # noqa: E731
    return to(x), to(w), to(bias), args


def assert_routing(idx, wt, x, w, bias, args, rtol, min_stable=0.5):
    t, k = x.shape[0], args["top_k"]
    assert idx.shape == (t, k) and wt.shape == (t, k)
    assert idx.dtype == torch.int64 and wt.dtype == torch.float32
    idx, wt = idx.cpu(), wt.cpu()
    x, w, bias = x.cpu(), w.cpu(), None if bias is None else bias.cpu()
    e = w.shape[0]
    assert ((idx >= 0) & (idx < e)).all() and torch.isfinite(wt).all()
    assert all(len(set(row)) == k for row in idx.tolist()), "an expert chosen twice"
    ridx, rwt, margin = routing_float64(x, w, bias, **args)
    stable = margin > NEAR_TIE
    assert stable.float().mean() >= min_stable, "too many near-ties: badly conditioned test inputs"
    assert torch.equal(idx[stable], ridx[stable])
    torch.testing.assert_close(wt[stable].double(), rwt[stable], rtol=rtol, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------------------


def test_triton_kernels_interpreted():
    res = run_interpreted("interpret_router.py", timeout=600)
    assert res.returncode == 0, interpreter_failure(res)


@pytest.mark.parametrize("name", ["tiny", "tiny-v2", "tiny-ragged", "16B"])
def test_opcheck_cpu(name):
    cfg = resolve_config(name)
    args = R.route_args(cfg)
    g = torch.Generator().manual_seed(1)
    e, d = cfg.n_routed_experts, 64
    x = torch.randn(5, d, generator=g).bfloat16()
    w = torch.randn(e, d, generator=g).bfloat16()
    bias = torch.rand(e, generator=g) if cfg.topk_method == "noaux_tc" else None
    op_args = (x, w, bias, *args.values())
    torch.library.opcheck(torch.ops.dsv3.route.default, op_args)
    idx, wt = torch.ops.dsv3.route(*op_args)
    ridx, rwt = R.route_reference(x, w, bias, **args)
    assert torch.equal(idx, ridx) and torch.equal(wt, rwt)


def test_shared_columns_reference_and_fake():
    """n_shared appends ids E.. with weight 1 (the stacked shared experts); the fake impl gives the same shapes."""
    cfg = resolve_config("tiny-v2")
    args = R.route_args(cfg)
    g = torch.Generator().manual_seed(2)
    e, d, t = cfg.n_routed_experts, 32, 4
    x, w = torch.randn(t, d, generator=g), torch.randn(e, d, generator=g)
    plain = R.route_reference(x, w, None, **args)
    idx, wt = torch.ops.dsv3.route(x, w, None, *args.values(), 2)
    k = args["top_k"]
    assert torch.equal(idx[:, :k], plain[0]) and torch.equal(wt[:, :k], plain[1])
    assert idx[:, k:].tolist() == [[e, e + 1]] * t and wt[:, k:].tolist() == [[1.0, 1.0]] * t
    torch.library.opcheck(torch.ops.dsv3.route.default, (x, w, None, *args.values(), 2))
    with pytest.raises(ValueError, match="n_shared"):
        R._check_args(e, k, 1, 1, False, -1)


def test_prefill_select_switch(monkeypatch):
    check_env_switch(monkeypatch, "DSV3_ROUTE_PREFILL", R.route_prefill_choice, R.ROUTE_PREFILL_DEFAULT)
    assert R.ROUTE_PREFILL_DEFAULT == "kernel"


def test_route_args():
    a16, a236, a671 = (R.route_args(resolve_config(n)) for n in REAL_CONFIGS)
    assert a16 == dict(top_k=6, n_group=1, topk_group=1, sigmoid=False, group_top2=False, norm_topk_prob=False,
                       routed_scaling_factor=1.0)
    assert a236 == dict(top_k=6, n_group=8, topk_group=3, sigmoid=False, group_top2=False, norm_topk_prob=False,
                        routed_scaling_factor=16.0)
    assert a671 == dict(top_k=8, n_group=8, topk_group=4, sigmoid=True, group_top2=True, norm_topk_prob=True,
                        routed_scaling_factor=2.5)
    # groups that keep everything are no limiting at all
    cfg = resolve_config("tiny-v2").replace(topk_group=4)
    assert R.route_args(cfg)["n_group"] == 1 and R.route_args(cfg)["topk_group"] == 1


def test_bad_args():
    x, w = torch.randn(2, 8), torch.randn(12, 8)
    base = dict(top_k=2, n_group=3, topk_group=2, sigmoid=True, group_top2=True, norm_topk_prob=True,
                routed_scaling_factor=1.0)
    for bad in (dict(top_k=0), dict(top_k=13), dict(n_group=5), dict(topk_group=0), dict(top_k=9),
                dict(n_group=12, topk_group=6)):
        with pytest.raises(ValueError):
            R.route_triton(x, w, None, **{**base, **bad})
        with pytest.raises(ValueError):
            with torch._subclasses.FakeTensorMode() as mode:
                torch.ops.dsv3.route(mode.from_tensor(x), mode.from_tensor(w), None, *{**base, **bad}.values())


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_reference_matches_float64(name):
    x, w, bias, args = real_inputs(name, 64, seed=2)
    idx, wt = R.route_reference(x, w, bias, **args)
    assert_routing(idx, wt, x, w, bias, args, rtol=1e-5)


@pytest.mark.parametrize("dot", [False, True])
def test_logits_plan(dot):
    for t in (1, 3, 8, 17, 64):
        for e, d in ((64, 2048), (160, 5120), (256, 7168), (16, 64), (12, 200)):
            p = R.logits_plan(t, e, d, 132, dot=dot)
            bt, be, bd, splits, per = p["BLOCK_T"], p["BLOCK_E"], p["BLOCK_D"], p["splits"], p["d_per_split"]
            assert bt >= t and p["FLAT"] == (bt <= 8) and per % bd == 0 and (splits - 1) * per < d <= splits * per
            assert p["DOT"] == (dot and bt > 8) and p["STAGES"] == (1 if per == bd else 3)
            if p["DOT"]:  # tensor-core tiles: >= 16 on every side, at most one program per SM
                assert min(bt, be, bd) >= 16 and p["num_warps"] == 4
                assert -(-e // be) * splits <= 132 or splits == 1
                assert splits * t * e * 4 <= e * d * 2 or splits == 1       # partials no larger than the weight
                continue
            assert bt * be * bd <= 2 * R.LOGITS_ACC_ELEMS and p["num_warps"] in (4, 8)
            assert -(-e // be) * splits <= 4 * 132 or splits == 1           # at most 4 programs per SM
            assert splits * t * e * 4 <= e * d * 2 // 4 or splits == 1     # partials small next to the weight
    # batch-1 decode of 671B: one 512-wide chunk of D per program, 14 programs per 8 experts
    p = R.logits_plan(1, 256, 7168, 132)
    assert (p["BLOCK_D"], p["d_per_split"], p["splits"], p["FLAT"]) == (512, 512, 14, True)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("t", [1, 8, 64, 300, 4095])
@pytest.mark.parametrize("name", REAL_CONFIGS)
@pytest.mark.parametrize("prefill_select", ["kernel", "torch"])
def test_route_gpu(name, t, prefill_select, monkeypatch):
    if t <= 64 and prefill_select == "torch":
        pytest.skip("the switch only applies to prefill-sized T")
    monkeypatch.setenv("DSV3_ROUTE_PREFILL", prefill_select)
    x, w, bias, args = real_inputs(name, t, device="cuda", seed=t)
    poison_allocator()
    idx, wt = torch.ops.dsv3.route(x, w, bias, *args.values())
    assert idx.device.type == "cuda"
    # T <= 64: the Triton kernels (tl.exp, fp32 logits in another order); T = 300, 4095: cuBLAS logits from the bf16
    # operands with fp32 accumulation (torch.mm out_dtype), then the select kernel (or the reference's selection)
    assert_routing(idx, wt, x, w, bias, args, rtol=5e-5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_route_prefill_dynamic_compiled_gpu(name, monkeypatch):
    """As the prefill graph runs it: compiled with a dynamic T, called at two lengths; equal to the eager op."""
    monkeypatch.setenv("DSV3_ROUTE_PREFILL", "kernel")
    torch._dynamo.reset()
    _, _, _, args = real_inputs(name, 300, device="cuda", seed=31)
    model = RouteModule(args)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for t in (300, 777):
        x, w, bias, _ = real_inputs(name, t, device="cuda", seed=t)
        idx, wt = compiled(x, w, bias)
        ridx, rwt = model(x, w, bias)
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(wt, rwt, rtol=1e-6, atol=0)
        assert_routing(idx, wt, x, w, bias, args, rtol=5e-5)
    torch._dynamo.reset()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_route_gpu_fp32_weight(name):
    x, w, bias, args = real_inputs(name, 4, device="cuda", seed=11)
    idx, wt = torch.ops.dsv3.route(x, w.float(), bias, *args.values())
    assert_routing(idx, wt, x, w.float(), bias, args, rtol=5e-5)


class RouteModule(torch.nn.Module):
    def __init__(self, args: dict):
        super().__init__()
        self.args = args

    def forward(self, x, w, bias):
        return torch.ops.dsv3.route(x, w, bias, **self.args)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name,t", [("16B", 1), ("236B", 8), ("671B", 1), ("671B", 64), ("16B", 300)])
def test_route_compile_fullgraph_gpu(name, t):
    torch._dynamo.reset()
    x, w, bias, args = real_inputs(name, t, device="cuda", seed=21)
    model = RouteModule(args)
    compiled = torch.compile(model, fullgraph=True)
    for seed in (21, 22):
        x, w, bias, _ = real_inputs(name, t, device="cuda", seed=seed)
        idx, wt = compiled(x, w, bias)
        ridx, rwt = model(x, w, bias)
        assert torch.equal(idx, ridx)  # the same kernels with the same launch plan: same results
        torch.testing.assert_close(wt, rwt, rtol=1e-6, atol=0)
        assert_routing(idx, wt, x, w, bias, args, rtol=5e-5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_route_cuda_graph_gpu(name):
    """The decode path has no host sync: it captures into a CUDA graph and replays correctly on new inputs."""
    x, w, bias, args = real_inputs(name, 4, device="cuda", seed=31)
    model = RouteModule(args)
    static = [x.clone(), w.clone(), None if bias is None else bias.clone()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(*static)  # warm-up (Triton compiles) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_idx, out_wt = model(*static)
    fx, fw, fb, _ = real_inputs(name, 4, device="cuda", seed=32)
    for dst, src in zip(static, (fx, fw, fb)):
        if dst is not None:
            dst.copy_(src)
    g.replay()
    torch.cuda.synchronize()
    want_idx, want_wt = model(fx, fw, fb)
    assert torch.equal(out_idx, want_idx)
    torch.testing.assert_close(out_wt, want_wt, rtol=0, atol=0)
