"""Tests for `torch.ops.dsv3.mla_attention_out` (absorbed MLA attention + the W_UV output absorption, one op).

CPU (part of `make test`): the fused Triton path under the Triton interpreter against the composition it replaces
and a float64 formula (`tests/interpret_mla_out.py`, its own process); the op's registration (opcheck), its path
switch and its fallback rules; on the CPU the op is the composition, bit for bit.

GPU (`pytest -m gpu`, on the device): the fused path against the composition and float64 on fresh inputs with a
poisoned allocator at V2-Lite shapes; under torch.compile(fullgraph=True) it must be exactly 2 kernel launches
(the composition is 3); inside CUDA-graph capture, replayed on new inputs, equal to eager.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.kernels import mla_attention_out as AO  # registers dsv3.mla_attention_out (not in dsv3.kernels yet)
from dsv3.kernels.fp8_blocks import quantize_weight
from kernel_checks import cuda, interpreter_failure, poison_allocator, rel_err, run_interpreted

SCALE = 0.1


def make_inputs(b, s, h, c, r, dn, dv, t_cap, ctx, fp8=True, device="cpu", seed=0, dtype=torch.bfloat16):
    """Sequence i's first query at a position in [ctx/2, ctx) (ragged lengths around the context), S consecutive."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, c, generator=g).to(dtype)
    qp = torch.randn(b, s, h, r, generator=g).to(dtype)
    cache = torch.randn(b, t_cap, c + r, generator=g).to(dtype)
    start = torch.randint(max(0, ctx // 2), max(1, ctx - s + 1), (b, 1), generator=g)
    start[0, 0] = ctx - s  # one sequence at the full context
    pos = start + torch.arange(s)[None]
    w = torch.randn(h * (dn + dv), c, generator=g) * 0.1
    w, ws = quantize_weight(w) if fp8 else (w.to(dtype), None)
    t = [x.to(device) if x is not None else None for x in (q, qp, cache, pos, w, ws)]
    return (*t[:4], SCALE, *t[4:], dn, dv)


def composition(q, qp, cache, pos, scale, w, ws, dn, dv):
    o_latent = torch.ops.dsv3.mla_attention(q, qp, cache, pos, scale)
    return torch.ops.dsv3.mla_absorb(o_latent, w, ws, dn, dv, True)


def float64_formula(q, qp, cache, pos, scale, w, ws, dn, dv):
    c = q.shape[-1]
    kv, pe = cache[..., :c].double(), cache[..., c:].double()
    sc = (torch.einsum("bshc,btc->bsht", q.double(), kv) + torch.einsum("bshr,btr->bsht", qp.double(), pe)) * scale
    visible = torch.arange(cache.shape[1], device=q.device)[None, None, None, :] <= pos[:, :, None, None]
    o = torch.einsum("bsht,btc->bshc", torch.softmax(sc.masked_fill(~visible, float("-inf")), dim=-1), kv)
    wd = w.double()
    if ws is not None:
        wd = wd * ws.double().repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :c]
    return torch.einsum("bshc,hdc->bshd", o, wd.view(q.shape[2], dn + dv, c)[:, dn:])


# ---------------------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------------------


def test_fused_kernel_interpreted():
    res = run_interpreted("interpret_mla_out.py")
    assert res.returncode == 0, interpreter_failure(res)


@pytest.mark.parametrize("fp8", [True, False])
def test_opcheck(fp8):
    args = make_inputs(2, 2, 3, 72, 8, 16, 24, t_cap=40, ctx=30, fp8=fp8, seed=1)
    # test_schema's mutation check multiplies inputs, which CPU torch cannot do in float8 (as test_kernels.py's
    # test_opcheck_cpu): the FP8 weight gets the other checks only
    utils = ("test_faketensor", "test_aot_dispatch_dynamic") if fp8 else None
    torch.library.opcheck(torch.ops.dsv3.mla_attention_out.default, args,
                          **({"test_utils": utils} if utils else {}))


def test_path_switch(monkeypatch):
    monkeypatch.setenv("DSV3_ATTN_OUT", "torch")
    assert AO.attn_out_choice() == "torch"
    monkeypatch.setenv("DSV3_ATTN_OUT", "Fused ")
    assert AO.attn_out_choice() == "fused"
    monkeypatch.setenv("DSV3_ATTN_OUT", "bogus")
    with pytest.raises(ValueError, match="DSV3_ATTN_OUT"):
        AO.attn_out_choice()
    monkeypatch.delenv("DSV3_ATTN_OUT")
    assert AO.attn_out_choice() == AO.ATTN_OUT_DEFAULT == "torch"


@pytest.mark.parametrize("case", [(1, 1, True), (3, 2, True), (2, 1, False)])
def test_cpu_op_is_the_composition(case):
    b, s, fp8 = case
    args = make_inputs(b, s, 3, 72, 8, 16, 24, t_cap=50, ctx=45, fp8=fp8, seed=b + s)
    out = torch.ops.dsv3.mla_attention_out(*args)
    assert out.shape == (b, s, 3, 24) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out, composition(*args))
    assert rel_err(out, float64_formula(*args)) < 1e-2


def test_fused_path_only_for_decode_shapes_and_dtypes():
    """`_triton_ok`: what falls back to the composition on CUDA (checked on meta tensors)."""
    def ok(b=1, s=1, t=64, dtype=torch.bfloat16, fp8=True, scale=True, cache_dtype=None):
        h, c, r, dn, dv = 2, 512, 64, 128, 128
        q = torch.empty(b, s, h, c, dtype=dtype, device="meta")
        qp = torch.empty(b, s, h, r, dtype=dtype, device="meta")
        cache = torch.empty(b, t, c + r, dtype=cache_dtype or dtype, device="meta")
        w = torch.empty(h * (dn + dv), c, dtype=torch.float8_e4m3fn if fp8 else dtype, device="meta")
        ws = torch.empty(2, 4, device="meta") if scale else None
        return AO._triton_ok(q, qp, cache, w, ws)

    assert ok() and ok(b=8) and ok(s=16) and ok(b=4, s=16) and ok(dtype=torch.float16) and ok(fp8=False, scale=False)
    assert not ok(s=17)  # S > DECODE_MAX_S: prefill
    assert not ok(b=65) and not ok(b=5, s=13)  # B*S > mla_absorb's DECODE_MAX_M
    assert not ok(dtype=torch.float32) and not ok(cache_dtype=torch.float16)
    assert not ok(fp8=True, scale=False) and not ok(fp8=False, scale=True)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

V2_LITE = dict(h=16, c=512, r=64, dn=128, dv=128)
GPU_CASES = [(b, ctx) for b in (1, 8) for ctx in (100, 3000)]  # cache capacity 4096


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"b{b}-ctx{ctx}" for b, ctx in GPU_CASES])
def test_fused_gpu(case, monkeypatch):
    b, ctx = case
    args = make_inputs(b, 1, **V2_LITE, t_cap=4096, ctx=ctx, device="cuda", seed=b * 7 + ctx)
    poison_allocator()
    out = AO.mla_attention_out_triton(*args)
    ref = composition(*args)
    assert out.shape == ref.shape and out.is_contiguous()
    assert rel_err(out, ref) < 5e-3
    assert (out != ref).float().mean() < 0.05  # fp32 sum order only
    assert rel_err(out, float64_formula(*args)) < 1e-2
    monkeypatch.setenv("DSV3_ATTN_OUT", "fused")
    assert torch.equal(torch.ops.dsv3.mla_attention_out(*args), out)
    monkeypatch.setenv("DSV3_ATTN_OUT", "torch")
    assert torch.equal(torch.ops.dsv3.mla_attention_out(*args), ref)


@pytest.mark.gpu
@cuda
def test_fused_gpu_verify_step_and_dense_weight():
    """S = 3 (speculative verify) with a dense bf16 kv_b weight: the other branches of the kernel."""
    args = make_inputs(2, 3, **V2_LITE, t_cap=4096, ctx=700, fp8=False, device="cuda", seed=3)
    poison_allocator()
    out = AO.mla_attention_out_triton(*args)
    assert rel_err(out, composition(*args)) < 5e-3 and rel_err(out, float64_formula(*args)) < 1e-2


def _kernel_names(fn, *args):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("b", [1, 8])
def test_compiled_two_launches(b, monkeypatch):
    args = make_inputs(b, 1, **V2_LITE, t_cap=4096, ctx=1000, device="cuda", seed=21 + b)
    ref = composition(*args)

    def layer(q, qp, cache, pos, w, ws):
        return torch.ops.dsv3.mla_attention_out(q, qp, cache, pos, SCALE, w, ws, 128, 128)

    tensors = (*args[:4], *args[5:7])
    for choice, n_launches in (("fused", 2), ("torch", 3)):
        monkeypatch.setenv("DSV3_ATTN_OUT", choice)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        out = compiled(*tensors)
        assert rel_err(out, ref) < 5e-3
        names = _kernel_names(compiled, *tensors)
        assert len(names) == n_launches, (choice, names)
        assert any("_mla_fwd_kernel" in n for n in names), names
        if choice == "fused":
            assert sum("_mla_combine_absorb_o_kernel" in n for n in names) == 1, names
    torch._dynamo.reset()


@pytest.mark.gpu
@cuda
def test_cuda_graph_replay_on_new_inputs():
    """Captured once, replayed after the inputs (and the positions, hence the active splits) changed in place."""
    args = list(make_inputs(8, 1, **V2_LITE, t_cap=4096, ctx=3000, device="cuda", seed=31))
    new = make_inputs(8, 1, **V2_LITE, t_cap=4096, ctx=200, device="cuda", seed=32)
    AO.mla_attention_out_triton(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = AO.mla_attention_out_triton(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, AO.mla_attention_out_triton(*args))
    for i in range(4):  # q, q_pe, cache, positions
        args[i].copy_(new[i])
    graph.replay()
    torch.cuda.synchronize()
    eager = AO.mla_attention_out_triton(*args)
    assert torch.equal(out, eager)
    assert rel_err(out, composition(*args)) < 5e-3
