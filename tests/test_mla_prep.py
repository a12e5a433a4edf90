"""Tests for `torch.ops.dsv3.mla_decode_prep` (kv RMSNorm + RoPE + latent-cache write + W_UK absorption, one op).

CPU (part of `make test`): the fused Triton kernel under the Triton interpreter against the op's torch composition
(`tests/interpret_mla_prep.py`, its own process); the composition against independent float64 formulas (DeepSeek's
interleaved rotary as complex multiplication, RMSNorm from its definition); the op's registration (opcheck), its
path switch, and the model's decode step through it equal to the model's prefill branch (which keeps the torch ops).
`mla_prefill_prep`: its launch rule, and its launcher traced with a symbolic token count (one launch, no
specialization on the count); its kernel bit for bit under the interpreter (also in `tests/interpret_mla_prep.py`).

GPU (`pytest -m gpu`, on the device): the fused kernel against the composition on fresh inputs with a poisoned
allocator; under torch.compile(fullgraph=True) with the cache as a module buffer it must stay ONE kernel launch
(the cache mutated in place: no clone or copy of the cache around it), and inside CUDA-graph capture. The prefill
kernel against its reference, and bit for bit against `mla_prep_expect.prefill_expected` at several launches.
"""

from __future__ import annotations

import pytest
import torch

import dsv3.kernels  # noqa: F401
from dsv3.config import resolve_config
from dsv3.kernels import mla_decode_prep as P
from dsv3.kernels.fp8_blocks import quantize_weight
from dsv3.model import Transformer
from kernel_checks import check_env_switch, cuda, interpreter_failure, poison_allocator, rel_err, run_interpreted
from mla_prep_expect import bits, prefill_expected, prefill_inputs


def make_inputs(b, s, h, dn, r, dv, c, t_cap=64, fp8=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    # q and kv_a are views of one projection output on the device, strided as the fused qkv_a_proj gives them
    proj = torch.randn(b, s, h * (dn + r) + c + r, generator=g).to(torch.bfloat16).to(device)
    q = proj[..., :h * (dn + r)].view(b, s, h, dn + r)
    kv_a = proj[..., h * (dn + r):]
    norm_w = (1 + 0.1 * torch.randn(c, generator=g)).to(torch.bfloat16)
    pos = torch.randint(0, t_cap - s + 1, (b, 1), generator=g) + torch.arange(s)
    ang = torch.rand(b, s, r // 2, generator=g) * 6.0
    cos, sin = ang.cos(), ang.sin()
    cache = torch.randn(b, t_cap, c + r, generator=g).to(torch.bfloat16)
    w = torch.randn(h * (dn + dv), c, generator=g) * 0.1
    w, ws = quantize_weight(w) if fp8 else (w.to(torch.bfloat16), None)
    rest = [a.to(device) if a is not None else None for a in (norm_w, cos, sin, cache, pos, w, ws)]
    return [q, kv_a, *rest, 1e-6, dn, dv]


def check_cache(cache, ref_cache, pos, c, bound=2e-3):
    """The rows the op wrote (b, pos[b, s]) close to the reference's, part by part; every other row untouched."""
    batch = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
    got, want = cache[batch, pos], ref_cache[batch, pos]
    assert rel_err(got[..., :c], want[..., :c]) < bound and rel_err(got[..., c:], want[..., c:]) < bound
    others = torch.ones(cache.shape[:2], dtype=torch.bool, device=cache.device)
    others[batch, pos] = False
    assert torch.equal(cache[others], ref_cache[others])


# ---------------------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------------------


def test_fused_kernel_interpreted():
    res = run_interpreted("interpret_mla_prep.py")
    assert res.returncode == 0, interpreter_failure(res)


def _rotary64(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    """DeepSeek's form: interleaved pairs as complex numbers times e^{i angle}; returned de-interleaved (real parts,
    then imaginary parts), the layout both q and k use here (their dot products are unchanged)."""
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    z = z * torch.polar(torch.ones_like(ang.double()), ang.double())
    return torch.cat([z.real, z.imag], dim=-1)


def test_composition_matches_float64_formulas():
    b, s, h, dn, r, dv, c = 2, 3, 4, 16, 8, 24, 72
    q, kv_a, norm_w, _, _, cache, pos, w, ws, eps, _, _ = make_inputs(b, s, h, dn, r, dv, c, seed=3)
    ang = torch.rand(b, s, r // 2, generator=torch.Generator().manual_seed(4)) * 6.0
    cos, sin = ang.cos(), ang.sin()
    before = cache.clone()
    q_latent, q_pe = P.mla_decode_prep_reference(q, kv_a, norm_w, cos, sin, cache, pos, w, ws, eps, dn, dv)
    assert rel_err(q_pe, _rotary64(q[..., dn:], ang[:, :, None, :])) < 4e-3
    c_kv = kv_a[..., :c].double()
    normed = c_kv / (c_kv.pow(2).mean(-1, keepdim=True) + eps).sqrt() * norm_w.double()
    rows = cache[torch.arange(b)[:, None].expand(b, s), pos]
    assert rel_err(rows[..., :c], normed) < 6e-3
    assert rel_err(rows[..., c:], _rotary64(kv_a[..., c:], ang)) < 4e-3
    written = torch.zeros(cache.shape[:2], dtype=torch.bool)
    written[torch.arange(b)[:, None].expand(b, s), pos] = True
    assert torch.equal(cache[~written], before[~written])
    wd = (w.float() * ws.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :c]).double()
    w_uk = wd.view(h, dn + dv, c)[:, :dn]
    assert rel_err(q_latent, torch.einsum("bshd,hdc->bshc", q[..., :dn].double(), w_uk)) < 6e-3


def test_opcheck_and_path_switch(monkeypatch):
    args = make_inputs(1, 1, 3, 16, 8, 24, 72, seed=5)
    torch.library.opcheck(torch.ops.dsv3.mla_decode_prep.default, tuple(args), test_utils="test_faketensor")
    check_env_switch(monkeypatch, "DSV3_DECODE_PREP", P.decode_prep_choice, P.DECODE_PREP_DEFAULT, valid="fused")


def test_prefill_prep_opcheck_and_path_switch(monkeypatch):
    q, kv_a, norm_w, cos, sin, cache, pos, _, _, eps, dn, _ = make_inputs(2, 5, 3, 16, 8, 24, 72, seed=6)
    for rows in (None, torch.tensor([1, 0])):
        torch.library.opcheck(torch.ops.dsv3.mla_prefill_prep.default,
                              (q, kv_a, norm_w, cos, sin, cache.clone(), pos, rows, eps, dn),
                              test_utils="test_faketensor")
    check_env_switch(monkeypatch, "DSV3_PREFILL_PREP", P.prefill_prep_choice, P.PREFILL_PREP_DEFAULT, valid="fused")


def test_prefill_prep_launch_rule():
    """`prefill_prep_launch`: one head block at 16 heads, blocks of PREFILL_PREP_HEADS at 128; the query tile within
    PREFILL_PREP_MAX_TILE; at most one warp per token; fewer tokens per program only for a known smaller count;
    values given kept."""
    bt, hb, warps = P.PREFILL_PREP_BLOCK_T, P.PREFILL_PREP_HEADS, P.PREFILL_PREP_WARPS
    assert P.prefill_prep_launch(4095, 16) == (bt, 16, min(warps, bt))
    assert P.prefill_prep_launch(4095, 128) == (min(bt, P.PREFILL_PREP_MAX_TILE // hb), hb, min(warps, bt))
    for heads in (1, 3, 5, 16, 20, 64, 128):
        b, h, w = P.prefill_prep_launch(4095, heads)
        assert b * h <= P.PREFILL_PREP_MAX_TILE and 1 <= w <= b and h >= 2 and (h >= heads or h == hb)
    assert P.prefill_prep_launch(1, 16) == (1, 16, 1)
    assert P.prefill_prep_launch(3, 16)[0] == min(bt, 4)
    assert P.prefill_prep_launch(3, 16, block_t=16, head_block=4, num_warps=8) == (16, 4, 8)


def test_prefill_prep_traces_with_a_dynamic_token_count():
    """The launcher traced with symbolic sizes (as torch.compile and AOTInductor trace the op's CUDA body with a
    dynamic token count): one kernel launch whose grid and token arguments are symbolic, and whose constexprs are
    the defaults for an unknown count (a 2-token example would get BLOCK_T 2 if the count were read)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    q, kv_a, norm_w, cos, sin, cache, pos, _, _, eps, dn, _ = make_inputs(1, 2, 3, 16, 8, 24, 72, seed=9)
    rows = torch.tensor([0])

    def prep(q, kv_a, norm_w, cos, sin, cache, pos, rows):
        return P.mla_prefill_prep_triton(q, kv_a, norm_w, cos, sin, cache, pos, rows, eps, dn)

    gm = make_fx(prep, tracing_mode="symbolic")(q, kv_a, norm_w, cos, sin, cache, pos, rows)
    launches = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_mutation]
    assert len(launches) == 1
    grid, args = launches[0].kwargs["grid"], launches[0].kwargs["kwargs"]
    assert isinstance(grid[0][0], torch.fx.Node) and isinstance(args["M"], torch.fx.Node)
    assert isinstance(args["S"], torch.fx.Node)
    assert (args["BLOCK_T"], args["H_PAD"]) == P.prefill_prep_launch(10 ** 6, 3)[:2]


def test_prefill_prep_reference_is_the_decode_prep_token_work():
    """mla_prefill_prep's reference writes the rows and ropes q_pe as mla_decode_prep's does (one token at a time),
    into the chosen cache rows, and returns the latent it wrote."""
    q, kv_a, norm_w, cos, sin, cache, pos, w, ws, eps, dn, dv = make_inputs(2, 4, 3, 16, 8, 24, 72, t_cap=16,
                                                                           seed=8)
    cache = torch.cat([cache, cache[:1]])  # three rows, sequences written into rows 2 and 0
    rows = torch.tensor([2, 0])
    got = cache.clone()
    pe, lat = P.mla_prefill_prep_reference(q, kv_a, norm_w, cos, sin, got, pos, rows, eps, dn)
    want = cache.clone()[rows]
    _, want_pe = P.mla_decode_prep_reference(q, kv_a, norm_w, cos, sin, want, pos, w, ws, eps, dn, dv)
    assert torch.equal(pe, want_pe) and torch.equal(got[rows], want)
    assert torch.equal(got[1], cache[1]) and torch.equal(got[rows.unsqueeze(1).expand_as(pos), pos], lat)


def test_model_decode_step_equals_prefill_branch():
    """The decode branch (mla_decode_prep) and the prefill branch (mla_prefill_prep, then the naive attention)
    compute the same layer: one token decoded after a prompt gives the logits the prefill branch gives at that
    position."""
    cfg = resolve_config("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg, dtype=torch.float32, max_batch_size=1, max_seq_len=64)
    for name, p in model.named_parameters():
        p.data.copy_(torch.randn_like(p, dtype=torch.float32).mul_(0.05).to(p.dtype))
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.data.fill_(1.0)
    for name, buf in model.named_buffers():
        if name.endswith("weight_scale_inv") or name.endswith("scale_inv"):
            buf.fill_(1.0)
        elif name.endswith("e_score_correction_bias"):
            buf.zero_()
    tokens = torch.randint(0, cfg.vocab_size, (1, 20))
    full = model(tokens, torch.arange(20))  # 20 > DECODE_MAX_S: the prefill branch for every position
    model.reset_caches()
    model(tokens[:, :19], torch.arange(19))
    step = model(tokens[:, 19:], torch.tensor([19]))  # one token: the decode branch (mla_decode_prep)
    assert rel_err(step[:, 0], full[:, 19]) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

GPU_CASES = [  # B, S, H, Dn, R, Dv, C: V2-Lite / V3 per-rank heads, batch 1 and 8, a verify step of 3 tokens
    (1, 1, 16, 128, 64, 128, 512),
    (8, 1, 16, 128, 64, 128, 512),
    (2, 3, 128, 128, 64, 128, 512),
]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", GPU_CASES)
def test_fused_kernel_gpu(case):
    args = make_inputs(*case, t_cap=4096, device="cuda", seed=sum(case))
    ref_args = list(args)
    ref_args[5] = args[5].clone()
    poison_allocator()
    lat, pe = P.mla_decode_prep_triton(*args)
    ref_lat, ref_pe = P.mla_decode_prep_reference(*ref_args)
    assert args[0].untyped_storage().data_ptr() == args[1].untyped_storage().data_ptr()  # views of one projection
    assert rel_err(pe, ref_pe) < 2e-3 and rel_err(lat, ref_lat) < 6e-3
    check_cache(args[5], ref_args[5], args[6], args[2].shape[0])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("rows,heads", [(None, 16), ([1], 16), ([1], 128)])
def test_prefill_prep_gpu(rows, heads):
    """The prefill op's kernel against its reference at V2/V3 head dims (16 heads: 16B, 671B per rank at TP 8; 128:
    one rank of 236B / 671B), a 1000-token chunk, into cache row 0 or 1."""
    q, kv_a, norm_w, cos, sin, cache, pos, _, _, eps, dn, _ = make_inputs(1, 1000, heads, 128, 64, 128, 512,
                                                                         t_cap=4096, device="cuda", seed=21)
    cache = torch.cat([cache, cache.clone()])
    rows = None if rows is None else torch.tensor(rows, device="cuda")
    ref_cache = cache.clone()
    poison_allocator()
    pe, lat = P.mla_prefill_prep_triton(q, kv_a, norm_w, cos, sin, cache, pos, rows, eps, dn)
    ref_pe, ref_lat = P.mla_prefill_prep_reference(q, kv_a, norm_w, cos, sin, ref_cache, pos, rows, eps, dn)
    assert rel_err(pe, ref_pe) < 2e-3 and rel_err(lat, ref_lat) < 2e-3
    row = 0 if rows is None else 1
    assert torch.equal(cache[row, pos[0]], lat[0])
    assert torch.equal(cache[1 - row], ref_cache[1 - row])  # the other row untouched
    others = torch.ones(cache.shape[1], dtype=torch.bool, device="cuda")
    others[pos[0]] = False
    assert torch.equal(cache[row, others], ref_cache[row, others])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("rows,heads", [(None, 16), ([1], 16), ([1], 128)])
def test_prefill_prep_gpu_bitwise(rows, heads):
    """The compiled prefill kernel's bits, at every launch choice tried: `mla_prep_expect.prefill_expected` with the
    contractions the compiled kernel has under fp fusion (Triton's default), i.e. what the one-token kernel it
    replaced computed on the H200: q_pe, the latent returned and the cache rows written; other rows untouched."""
    q, kv_a, norm_w, cos, sin, cache, pos = prefill_inputs(1, 1000, heads, 128, 64, 512, seed=23, device="cuda")
    cache_rows = None if rows is None else torch.tensor(rows, device="cuda")
    fused = P._fp_fusion(q)
    want_pe, want_lat = prefill_expected(*(t.cpu() for t in (q, kv_a, norm_w, cos, sin)), 1e-6, 128, fused,
                                         contract_lo=fused)
    row = 0 if rows is None else rows[0]
    written = torch.zeros(cache.shape[:2], dtype=torch.bool)
    written[row, pos[0].cpu()] = True
    for launch in [(None, None, None), (2, 16, 2), (8, 16, 8), (16, 8, 4), (4, 32, 4)]:
        got_cache = cache.clone()
        poison_allocator()
        pe, lat = P.mla_prefill_prep_triton(q, kv_a, norm_w, cos, sin, got_cache, pos, cache_rows, 1e-6, 128,
                                            block_t=launch[0], head_block=launch[1], num_warps=launch[2])
        got_cache = got_cache.cpu()
        assert torch.equal(bits(pe.cpu()), bits(want_pe)), launch
        assert torch.equal(bits(lat.cpu()), bits(want_lat)), launch
        assert torch.equal(bits(got_cache[row, pos[0].cpu()]), bits(want_lat[0])), launch
        assert torch.equal(bits(got_cache[~written]), bits(cache.cpu()[~written])), launch


class _PrepLayer(torch.nn.Module):
    """The op as the model calls it: the cache is a module buffer, which attention reads after the op."""

    def __init__(self, cache):
        super().__init__()
        self.register_buffer("latent_cache", cache)

    def forward(self, q, kv_a, norm_w, cos, sin, pos, w, ws):
        lat, pe = torch.ops.dsv3.mla_decode_prep(q, kv_a, norm_w, cos, sin, self.latent_cache, pos, w, ws, 1e-6,
                                                 128, 128)
        return torch.ops.dsv3.mla_attention(lat, pe, self.latent_cache[: q.shape[0]], pos, 0.1), pe


@pytest.mark.gpu
@cuda
def test_fused_kernel_compiled_in_place(monkeypatch):
    monkeypatch.setenv("DSV3_DECODE_PREP", "fused")
    torch._dynamo.reset()
    q, kv_a, norm_w, cos, sin, cache, pos, w, ws, _, _, _ = make_inputs(1, 1, 16, 128, 64, 128, 512, t_cap=4096,
                                                                       device="cuda", seed=11)
    eager_layer, layer = _PrepLayer(cache.clone()), _PrepLayer(cache.clone())
    ref = eager_layer(q, kv_a, norm_w, cos, sin, pos, w, ws)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(q, kv_a, norm_w, cos, sin, pos, w, ws)
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 2e-3
    assert torch.equal(layer.latent_cache, eager_layer.latent_cache)  # the buffer itself was written
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        compiled(q, kv_a, norm_w, cos, sin, pos, w, ws)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # one launch for the op, then attention's; nothing else: a clone or copy of the 4.7 MB cache around the
    # mutating op (an Inductor kernel named after its FX node, or a memcpy) would be a third name
    assert sum("decode_prep" in n for n in names) == 1, names
    assert all("_mla_" in n for n in names), names
    torch._dynamo.reset()


@pytest.mark.gpu
@cuda
def test_fused_kernel_cuda_graph():
    args = make_inputs(8, 1, 16, 128, 64, 128, 512, t_cap=4096, device="cuda", seed=13)
    ref_args = list(args)
    ref_args[5] = args[5].clone()
    ref = P.mla_decode_prep_reference(*ref_args)
    P.mla_decode_prep_triton(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = P.mla_decode_prep_triton(*args)
    args[5].zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out[1], ref[1]) < 2e-3 and rel_err(out[0], ref[0]) < 6e-3
    batch = torch.arange(8, device="cuda")[:, None]
    assert rel_err(args[5][batch, args[6]], ref_args[5][batch, args[6]]) < 2e-3  # written by the replay
