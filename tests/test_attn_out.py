"""Tests for `torch.ops.dsv3.mla_attention_out` (absorbed attention at decode with W_UV applied, one op).

CPU (part of `make test`): the Triton path under the interpreter (`tests/interpret_attn_out.py`, its own process:
bitwise equal to the two-op composition at batch 1, close to float64 math); the reference against an independent
float64 formula (naive attention with keys and values decompressed by kv_b_proj, which absorbed attention must
equal); the op's registration (opcheck) and its switch.

GPU (`pytest -m gpu`, on the device): the fused path against the two ops it replaces on fresh inputs with a poisoned
allocator, at the model's decode shapes (16 heads; batch 1 and 8; a 3-token verify step; contexts from one split
to many), eager, compiled (fullgraph) and in CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch

import dsv3.kernels  # noqa: F401
from dsv3.kernels import mla_attention_out as O
from dsv3.kernels.fp8_blocks import dequantize_weight, quantize_weight
from kernel_checks import check_env_switch, cuda, interpreter_failure, poison_allocator, rel_err, run_interpreted


def make_inputs(b, s, h, dn, dv, c, r, t_cap, ctx, device="cpu", seed=0, fp8=True):
    """Queries of sequence b at positions ctx[b] - s + 1 .. ctx[b] (consecutive: a verify step when s > 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, c, generator=g).to(torch.bfloat16)
    qp = torch.randn(b, s, h, r, generator=g).to(torch.bfloat16)
    cache = torch.randn(b, t_cap, c + r, generator=g).to(torch.bfloat16)
    last = torch.tensor(ctx, dtype=torch.long)
    pos = last[:, None] - (s - 1) + torch.arange(s)[None]
    w = torch.randn(h * (dn + dv), c, generator=g) * 0.1
    w, ws = quantize_weight(w) if fp8 else (w.to(torch.bfloat16), None)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(qp), to(cache), to(pos), to(w), to(ws)


# ---------------------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------------------


def test_triton_path_interpreted():
    res = run_interpreted("interpret_attn_out.py")
    assert res.returncode == 0, interpreter_failure(res)


def test_reference_equals_naive_attention_float64():
    """Absorbed attention with W_UV after it == attention with k_nope = c_kv W_UK^T and v = c_kv W_UV^T per head
    (the chunk form of the paper), all in float64: q_latent = q_nope W_UK, so q_latent . c_kv = q_nope . k_nope."""
    b, s, h, dn, dv, c, r, t_cap = 2, 2, 3, 16, 24, 72, 8, 50
    g = torch.Generator().manual_seed(3)
    q_nope = torch.randn(b, s, h, dn, generator=g, dtype=torch.float64)
    qp = torch.randn(b, s, h, r, generator=g, dtype=torch.float64)
    cache = torch.randn(b, t_cap, c + r, generator=g, dtype=torch.float64)
    pos = torch.tensor([[30, 31], [7, 8]])
    w = torch.randn(h * (dn + dv), c, generator=g, dtype=torch.float64) * 0.1
    w_uk, w_uv = w.view(h, dn + dv, c).split([dn, dv], dim=1)
    q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
    out = O.mla_attention_out_reference(q_latent, qp, cache, pos, 0.2, w, None, dn, dv)
    k_nope = torch.einsum("btc,hdc->bthd", cache[..., :c], w_uk)
    v = torch.einsum("btc,hdc->bthd", cache[..., :c], w_uv)
    scores = (torch.einsum("bshd,bthd->bsht", q_nope, k_nope)
              + torch.einsum("bshr,btr->bsht", qp, cache[..., c:])) * 0.2
    visible = torch.arange(t_cap)[None, None, None, :] <= pos[:, :, None, None]
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    naive = torch.einsum("bsht,bthd->bshd", p, v)
    assert out.shape == (b, s, h, dv)
    assert rel_err(out, naive) < 1e-6  # the reference's softmax runs in fp32 (mla_attention's contract)


def test_opcheck_and_switch(monkeypatch):
    q, qp, cache, pos, w, ws = make_inputs(2, 1, 3, 16, 24, 72, 8, 40, [20, 39], seed=5)
    torch.library.opcheck(torch.ops.dsv3.mla_attention_out.default, (q, qp, cache, pos, 0.1, w, ws, 16, 24),
                          test_utils="test_faketensor")
    check_env_switch(monkeypatch, "DSV3_ATTN_OUT", O.attention_out_choice, O.ATTN_OUT_DEFAULT, valid="two")


def test_fused_block_by_merge_budget():
    """The W_UV rows per program from the static plan: the measured shapes keep their blocks, a plan that would
    re-read more partials than the budget steps up its ladder, then falls back to the two ops (None), as do more
    query tokens than ATTN_OUT_FUSED_MAX_M."""
    from dsv3.kernels.mla_attention import mla_plan

    def block(b, h, t_cap, s=1):
        return O.fused_block_d(b * s, h, mla_plan(b, s, h, t_cap, 512, 132)[4], 512, 128)

    assert block(1, 16, 4096) == 16 and block(8, 16, 4096) == 64  # the sweep's shapes (16B bench cache)
    assert block(2, 16, 4096) == 32                                 # twice the rows: the next block
    assert block(1, 16, 32768) is None and block(1, 64, 4096) is None  # 132 splits; 64 heads per rank
    assert block(32, 16, 4096) is None and block(4, 16, 4096, s=3) is None  # 32 / 12 query tokens: the two ops


def test_reference_dequantizes_w_uv_as_mla_absorb():
    """The FP8 reference uses W dequantized and rounded to the activation dtype (mla_absorb's contract)."""
    q, qp, cache, pos, w, ws = make_inputs(1, 1, 2, 16, 24, 72, 8, 30, [29], seed=7)
    out = O.mla_attention_out_reference(q, qp, cache, pos, 0.1, w, ws, 16, 24)
    o_lat = torch.ops.dsv3.mla_attention(q, qp, cache, pos, 0.1)
    wd = dequantize_weight(w, ws, torch.bfloat16).view(2, 40, 72)[:, 16:]
    assert torch.equal(out, torch.einsum("bshc,hdc->bshd", o_lat, wd).contiguous())


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

GPU_CASES = [  # B, S, positions per sequence (last query): one split, a few, many; batch 1 and 8; a verify step
    (1, 1, [40]),
    (1, 1, [127]),
    (1, 1, [4031]),
    (8, 1, [127, 5, 4000, 900, 64, 2047, 3000, 1]),
    (2, 3, [200, 3500]),
]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("partials", ["fp32", "bf16"])
def test_fused_gpu(case, fp8, partials, monkeypatch):
    monkeypatch.setenv("DSV3_MLA_PARTIALS", partials)
    b, s, ctx = case
    args = make_inputs(b, s, 16, 128, 128, 512, 64, 4096, ctx, device="cuda", seed=b * 100 + s + ctx[0], fp8=fp8)
    poison_allocator()
    out = O.mla_attention_out_triton(*args[:4], 0.13, *args[4:], 128, 128)
    monkeypatch.setenv("DSV3_ATTN_OUT", "two")
    two = torch.ops.dsv3.mla_attention_out(*args[:4], 0.13, *args[4:], 128, 128)
    ref = O.mla_attention_out_reference(args[0].double(), args[1].double(), args[2].double(), args[3], 0.13,
                                        args[4] if fp8 else args[4].double(), args[5], 128, 128)
    assert rel_err(out, two) < 4e-3
    assert rel_err(out, ref) < 8e-3


class _AttnOut(torch.nn.Module):
    def __init__(self, cache, w, ws):
        super().__init__()
        self.register_buffer("latent_cache", cache)
        self.register_buffer("w", w)
        self.register_buffer("ws", ws)

    def forward(self, q, qp, pos):
        return torch.ops.dsv3.mla_attention_out(q, qp, self.latent_cache[: q.shape[0]], pos, 0.13, self.w, self.ws,
                                                128, 128)


@pytest.mark.gpu
@cuda
def test_fused_compiled_and_graph_captured(monkeypatch):
    monkeypatch.setenv("DSV3_ATTN_OUT", "fused")
    torch._dynamo.reset()
    q, qp, cache, pos, w, ws = make_inputs(1, 1, 16, 128, 128, 512, 64, 4096, [1500], device="cuda", seed=21)
    layer = _AttnOut(cache, w, ws)
    ref = O.mla_attention_out_triton(q, qp, cache, pos, 0.13, w, ws, 128, 128)
    compiled = torch.compile(layer, fullgraph=True)
    assert rel_err(compiled(q, qp, pos), ref) < 1e-6
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        compiled(q, qp, pos)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("_mla_fwd_kernel" in n for n in names) == 1 and sum("combine_absorb" in n for n in names) == 1, names
    assert len(names) == 2, names  # no separate combine or W_UV launch
    out = torch.empty_like(ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(compiled(q, qp, pos))
    pos.fill_(3000)  # the length is read on the device at replay
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, O.mla_attention_out_triton(q, qp, cache, pos, 0.13, w, ws, 128, 128)) < 1e-6
    torch._dynamo.reset()
