"""Tests for `torch.ops.dsv3.add_rms_norm_quant_route` (residual add + RMSNorm + FP8 quantization + router).

CPU (part of `make test`): the fused kernel under the Triton interpreter against the op's reference
(`tests/interpret_norm_route.py`, its own process); registration (opcheck), the path switch, and that the model's
decode step routes through this op with the logits of the layers written out unfused.

GPU (`pytest -m gpu`, on the device): the fused kernel at the three real routings (16B with the two stacked shared
slots, 236B, 671B) against the torch path (bitwise for the norm outputs, routing against float64 away from
near-ties); compiled (fullgraph) it is two launches; CUDA-graph replay.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.config import FP8Quantization, resolve_config
from dsv3.kernels import norm_route as NR
from dsv3.kernels import router as R
from dsv3.model import MoE, Transformer
from kernel_checks import (OpLog, check_env_switch, cuda, interpreter_failure, poison_allocator, rel_err,
                           run_interpreted)
from test_router import REAL_CONFIGS, assert_routing

EPS = 1e-6


def make_inputs(name, t, device="cpu", seed=0, lead=None):
    cfg = resolve_config(name)
    gen = torch.Generator().manual_seed(seed)
    d, e = cfg.hidden_size, cfg.n_routed_experts
    shape = lead or (t,)
    h = (torch.randn(*shape, d, generator=gen) * 3).bfloat16()
    delta = torch.randn(*shape, d, generator=gen).bfloat16()
    norm_w = (1 + 0.3 * torch.randn(d, generator=gen)).bfloat16()
    rw = (torch.randn(e, d, generator=gen) * d ** -0.5).bfloat16()
    bias = torch.rand(e, generator=gen) * 0.1 if cfg.topk_method == "noaux_tc" else None
    n_shared = cfg.n_shared_experts if name == "16B" else 0  # 16B stacks its shared experts at world size 1
    to = (lambda v: None if v is None else v.to(device))  # noqa: E731
    return [to(h), to(delta), to(norm_w), EPS, to(rw), to(bias)], dict(R.route_args(cfg), n_shared=n_shared)


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# ---------------------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------------------


def test_fused_kernel_interpreted():
    res = run_interpreted("interpret_norm_route.py")
    assert res.returncode == 0, interpreter_failure(res)


def test_opcheck_and_switch(monkeypatch):
    args, kw = make_inputs("16B", 2, seed=1, lead=(2, 1))
    torch.library.opcheck(torch.ops.dsv3.add_rms_norm_quant_route.default, tuple(args), kw,
                          test_utils="test_faketensor")
    check_env_switch(monkeypatch, "DSV3_NORM_ROUTE", NR.norm_route_choice, NR.NORM_ROUTE_DEFAULT)


def test_reference_is_norm_then_route():
    args, kw = make_inputs("671B", 3, seed=2)
    out = torch.ops.dsv3.add_rms_norm_quant_route(*args, **kw)
    norm = torch.ops.dsv3.add_rms_norm_quant(*args[:4])
    for a, b in zip(out[:4], norm):
        assert torch.equal(_bits(a), _bits(b))
    idx, wt = torch.ops.dsv3.route(norm[1], args[4], args[5], *kw.values())
    assert torch.equal(out[4], idx) and torch.equal(out[5], wt)


def _unfused_logits(model, tokens, pos):
    """The layers as the paper writes them: norm, attention, residual add, norm, router, experts, residual add."""
    bsz, seqlen = tokens.shape
    pos = pos.unsqueeze(0).expand(bsz, seqlen)
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]
    h = model.embed_tokens(tokens)
    for layer in model.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), pos, cos, sin)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.norm(h)).float()


@pytest.mark.parametrize("stack_shared", [False, True])
def test_model_decode_routes_with_the_norm(stack_shared):
    """An FP8 decode step (2 tokens) calls the op once per MoE layer (with the stacked shared slots when the layout
    has them), a prefill-sized step (2 x 40 tokens > DECODE_MAX_T) never; both give the logits of the unfused layers
    on the same cache contents."""
    cfg = resolve_config("tiny").replace(quantization_config=FP8Quantization())
    torch.manual_seed(0)
    model = Transformer(cfg, dtype=torch.float32, max_batch_size=2, max_seq_len=64)
    if stack_shared:
        model.stack_shared_experts_()
    for name, p in model.named_parameters():
        p.data.copy_(torch.randn_like(p, dtype=torch.float32).mul_(0.05).to(p.dtype))
        if name.endswith("norm.weight"):
            p.data.copy_(1 + 0.2 * torch.randn_like(p, dtype=torch.float32))
    for name, buf in model.named_buffers():
        if name.endswith("scale_inv"):
            buf.copy_(torch.rand_like(buf) * 0.5 + 0.75)
        elif name.endswith("e_score_correction_bias"):
            buf.zero_()
    n_moe = sum(isinstance(layer.mlp, MoE) for layer in model.layers)
    tokens = torch.randint(0, cfg.vocab_size, (2, 41))
    with torch.no_grad():
        with OpLog() as prompt_log:
            model(tokens[:, :40], torch.arange(40))
        with OpLog() as step_log:
            step = model(tokens[:, 40:], torch.tensor([40]))
        model.reset_caches()
        _unfused_logits(model, tokens[:, :40], torch.arange(40))
        want = _unfused_logits(model, tokens[:, 40:], torch.tensor([40]))
    assert n_moe > 0
    assert sum("add_rms_norm_quant_route" in n for n in step_log.names) == n_moe
    assert not any("add_rms_norm_quant_route" in n for n in prompt_log.names)
    assert rel_err(step, want) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("t", [1, 2, 4, 8])
@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_gpu_against_torch_path(name, t, monkeypatch):
    for seed in range(3):
        poison_allocator()
        args, kw = make_inputs(name, t, device="cuda", seed=100 * seed + t)
        monkeypatch.setenv("DSV3_NORM_ROUTE", "fused")
        out = torch.ops.dsv3.add_rms_norm_quant_route(*args, **kw)
        monkeypatch.setenv("DSV3_NORM_ROUTE", "torch")
        ref = torch.ops.dsv3.add_rms_norm_quant_route(*args, **kw)
        for a, b in zip(out[:4], ref[:4]):  # the same norm kernel arithmetic: bitwise
            assert torch.equal(_bits(a), _bits(b))
        k = kw["top_k"]
        n_shared = kw["n_shared"]
        assert torch.equal(out[4][:, k:].cpu(), torch.arange(kw["n_shared"]).expand(t, n_shared) + args[4].shape[0])
        route_kw = {key: v for key, v in kw.items() if key != "n_shared"}
        assert_routing(out[4][:, :k], out[5][:, :k], out[1], args[4], args[5], route_kw, rtol=5e-5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["16B", "671B"])
def test_gpu_compiled_two_launches_and_graph_replay(name):
    torch._dynamo.reset()
    args, kw = make_inputs(name, 1, device="cuda", seed=7, lead=(1, 1))

    def fn(h, delta, norm_w, rw, bias):
        return torch.ops.dsv3.add_rms_norm_quant_route(h, delta, norm_w, EPS, rw, bias, **kw)

    tensors = [args[0], args[1], args[2], args[4], args[5]]
    compiled = torch.compile(fn, fullgraph=True)
    got, want = compiled(*tensors), fn(*tensors)
    for a, b in zip(got, want):
        assert torch.equal(_bits(a), _bits(b))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        compiled(*tensors)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(names) == 2 and "logits" in names[0] and "select" in names[1], names
    torch._dynamo.reset()
    static = [a.clone() if a is not None else None for a in tensors]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(*static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = fn(*static)
    fresh, _ = make_inputs(name, 1, device="cuda", seed=8, lead=(1, 1))
    for dst, src in zip(static[:2], fresh[:2]):
        dst.copy_(src)
    g.replay()
    want = fn(*static)
    for a, b in zip(outs, want):
        assert torch.equal(_bits(a), _bits(b))
