"""dsv3.fp8_swiglu: the FP8 SwiGLU MLP (dense layers, shared experts) at prefill-sized M.

- CPU: the Triton kernel under the interpreter (`tests/interpret_swiglu.py`, subprocess); the op against a float64
  SwiGLU on the dequantized weights with the spec's activation quantization of x and h; a fused gate / up weight
  (up_w None) gives the two halves' output bitwise (and the fake impl its shape, opcheck); the model's prefill MoE
  and dense MLP (also with gate and up fused) through the op equal the composition they replaced.
- GPU (`-m gpu`): the cuBLAS path (x quantized once, fused SiLU-mul-quant, the S down slots as one GEMM) against the
  float64 SwiGLU and against the composition of dsv3.fp8_linear calls, eager and under torch.compile(fullgraph=True),
  on the 16B shared-expert and 671B-rank shapes, outputs poisoned; gate and up as one GEMM (a fused weight) bitwise
  the two GEMMs' result, eager, compiled and in an AOTInductor package.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsv3.kernels  # noqa: F401  (registers the ops)
from dsv3.kernels.fp8_blocks import dequantize_activation, dequantize_weight, quantize_activation
from dsv3.kernels.fp8_linear import fp8_linear_reference
from dsv3.kernels.fp8_swiglu import fp8_swiglu_reference
from kernel_checks import cuda, interpreter_failure, poison_allocator, rel_err, run_interpreted

FP8 = torch.float8_e4m3fn


def random_fp8(rows: int, cols: int, gen: torch.Generator, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(rows, cols, generator=gen) * 0.5).clamp(-448, 448).to(FP8)
    s = torch.rand(-(-rows // 128), -(-cols // 128), generator=gen) * 0.02 + 0.005
    return w.to(device), s.to(device)


def swiglu_inputs(m: int, d: int, slots: int, inter: int, gen: torch.Generator, device="cpu", dtype=torch.bfloat16):
    x = torch.randn(m, d, generator=gen).to(dtype).to(device)
    gate_w, gate_s = random_fp8(slots * inter, d, gen, device)
    up_w, up_s = random_fp8(slots * inter, d, gen, device)
    downs = [random_fp8(d, inter, gen, device) for _ in range(slots)]
    down_w = torch.stack([w for w, _ in downs])
    down_s = torch.stack([s for _, s in downs])
    return x, gate_w, gate_s, up_w, up_s, down_w, down_s


def swiglu_float64(x, gate_w, gate_s, up_w, up_s, down_w, down_s) -> torch.Tensor:
    """The SwiGLU in float64 on the dequantized weights, with the spec's 1x128 activation quantization of the two
    GEMM inputs (x, and h = silu(g) * u) and nothing else rounded."""
    def w64(w, s):
        return dequantize_weight(w, s).double()

    def act64(a):
        return dequantize_activation(*quantize_activation(a.float())).double()
    xd = act64(x)
    h = F.silu(xd @ w64(gate_w, gate_s).t()) * (xd @ w64(up_w, up_s).t())
    inter = down_w.shape[2]  # each down projection quantizes its own input slice
    return sum(act64(h[:, j * inter:(j + 1) * inter]) @ w64(down_w[j], down_s[j]).t() for j in range(down_w.shape[0]))


def test_silu_mul_quant_interpreted():
    res = run_interpreted("interpret_swiglu.py")
    assert res.returncode == 0, interpreter_failure(res)


@pytest.mark.parametrize("m,d,slots,inter", [(5, 256, 2, 128), (70, 384, 1, 256), (3, 128, 3, 200)])
def test_reference_against_float64(m, d, slots, inter):
    gen = torch.Generator().manual_seed(m + d + slots)
    args = swiglu_inputs(m, d, slots, inter, gen)
    out = torch.ops.dsv3.fp8_swiglu(*args)
    assert out.shape == (m, d) and out.dtype == torch.bfloat16
    assert rel_err(out, swiglu_float64(*args)) < 2e-2


def packed_down(down_w: torch.Tensor, down_s: torch.Tensor, pad_blocks: int = 4):
    """The S down slots side by side ([1, D, Kp]: slot s in columns s*I..(s+1)*I, zero columns up to a multiple of
    pad_blocks blocks) with their scales (zero past the slots): RoutedExperts.add_prefill_copies_'s layout."""
    s, d, i = down_w.shape
    kp = -(-s * i // (pad_blocks * 128)) * pad_blocks * 128
    w = torch.cat(list(down_w.view(torch.uint8)), dim=1)
    ws = torch.cat(list(down_s), dim=1)
    w = F.pad(w, (0, kp - s * i)).view(down_w.dtype)
    ws = F.pad(ws, (0, kp // 128 - ws.shape[1]))
    return w.unsqueeze(0), ws.unsqueeze(0)


@pytest.mark.parametrize("m,d,slots,inter", [(70, 256, 2, 128), (5, 384, 3, 256)])
def test_packed_down_equals_one_projection(m, d, slots, inter):
    """A padded single down projection (the slots side by side, zero columns to whole 4-block groups) gives the
    unpadded one's output and the float64 SwiGLU's."""
    gen = torch.Generator().manual_seed(m + slots)
    x, gate_w, gate_s, up_w, up_s, down_w, down_s = swiglu_inputs(m, d, slots, inter, gen)
    pw, ps = packed_down(down_w, down_s)
    assert pw.shape[2] > slots * inter
    one_w, one_s = pw[:, :, :slots * inter], ps[:, :, :slots * inter // 128]
    out = torch.ops.dsv3.fp8_swiglu(x, gate_w, gate_s, up_w, up_s, pw, ps)
    one = torch.ops.dsv3.fp8_swiglu(x, gate_w, gate_s, up_w, up_s, one_w.contiguous(), one_s.contiguous())
    assert rel_err(out, one) < 4e-3  # the fp32 sums over K with and without the zero columns: one bf16 rounding
    ref = swiglu_float64(x, gate_w, gate_s, up_w, up_s, one_w, one_s)
    assert rel_err(out, ref) < 2e-2


def fused_gate_up(gate_w, gate_s, up_w, up_s) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate rows then the up rows as one [2N, D] weight with its scales: dsv3.fp8_swiglu's fused form (up_w,
    up_s None), RoutedExperts.add_prefill_copies_'s `slots_gate_up_packed`."""
    w = torch.cat([gate_w.view(torch.uint8), up_w.view(torch.uint8)]).view(gate_w.dtype)
    return w, torch.cat([gate_s, up_s])


@pytest.mark.parametrize("m,d,slots,inter", [(70, 256, 2, 128), (5, 384, 1, 256), (3, 200, 3, 128)])
def test_fused_gate_up_equals_halves(m, d, slots, inter):
    """A fused gate / up weight (up_w, up_s None) gives the two halves' output bit for bit (CPU: split and computed
    as the halves), with the slots' down projections and with them packed; the fake impl gives the output's shape;
    the op's registration passes opcheck in both forms; a malformed fused form is refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(m * 3 + d)
    x, gate_w, gate_s, up_w, up_s, down_w, down_s = swiglu_inputs(m, d, slots, inter, gen)
    fw, fs = fused_gate_up(gate_w, gate_s, up_w, up_s)
    assert fw.shape == (2 * slots * inter, d)
    op = torch.ops.dsv3.fp8_swiglu
    for down in ((down_w, down_s), packed_down(down_w, down_s)):
        want = op(x, gate_w, gate_s, up_w, up_s, *down)
        assert torch.equal(op(x, fw, fs, None, None, *down), want)
        assert torch.equal(fp8_swiglu_reference(x, fw, fs, None, None, *down), want)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(t) for t in (x, fw, fs)), None, None,
                  *(mode.from_tensor(t) for t in (down_w, down_s)))
    assert fake.shape == (m, d) and fake.dtype == x.dtype
    for args in ((x, fw, fs, None, None, down_w, down_s), (x, gate_w, gate_s, up_w, up_s, down_w, down_s)):
        torch.library.opcheck(op.default, args, test_utils="test_faketensor")  # (test_schema: no e4m3 mul)
    with pytest.raises(RuntimeError, match="together"):
        op(x, fw, fs, None, up_s, down_w, down_s)
    with pytest.raises(RuntimeError, match="multiple of 128"):  # halves not on a 128-row block
        op(x, fw[:-128], fs[:-1], None, None, down_w, down_s)


def test_model_paths_use_the_op_and_match_the_composition():
    """The prefill MoE's stacked shared slots and a dense FP8 MLP at GEMM-sized M go through dsv3.fp8_swiglu and
    give what the composition of fp8_linear calls gave (CPU: the same reference arithmetic)."""
    from dsv3.config import FP8Quantization, resolve_config
    from dsv3.model import MLP, Transformer
    from dsv3.runtime.random_weights import fill_random_

    cfg = resolve_config("tiny").replace(quantization_config=FP8Quantization())
    model = Transformer(cfg, dtype=torch.bfloat16, max_batch_size=1, max_seq_len=128)
    fill_random_(model.stack_shared_experts_(), seed=5)  # the world-size-1 layout, then weights
    moe = next(layer.mlp for layer in model.layers if hasattr(layer.mlp, "n_shared_slots"))
    ex = moe.experts
    first = ex.gate_proj.shape[0] - moe.n_shared_slots
    x = torch.randn(80, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = ex.slots_as_mlp(x, first)
    i = ex.gate_proj.shape[1]
    want = fp8_swiglu_reference(x, ex.gate_proj[first:].flatten(0, 1), ex.gate_proj_scale_inv[first:].flatten(0, 1),
                                ex.up_proj[first:].flatten(0, 1), ex.up_proj_scale_inv[first:].flatten(0, 1),
                                ex.down_proj[first:], ex.down_proj_scale_inv[first:])
    assert torch.equal(got, want) and want.shape == (80, cfg.hidden_size) and i % 128 == 0
    dense = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MLP))
    want = dense.down_proj(F.silu(dense.gate_proj(x)) * dense.up_proj(x))
    assert torch.equal(dense(x), want)
    with torch.no_grad():
        for m in (1, 80):  # decode-sized and GEMM-sized through the model's MLP
            assert torch.equal(dense(x[:m]), fp8_linear_reference(
                F.silu(fp8_linear_reference(x[:m], dense.gate_proj.weight, dense.gate_proj.weight_scale_inv))
                * fp8_linear_reference(x[:m], dense.up_proj.weight, dense.up_proj.weight_scale_inv),
                dense.down_proj.weight, dense.down_proj.weight_scale_inv))
        # gate and up fused (MLP.fuse_gate_up_): the op takes the fused weight whole (one GEMM on cuBLAS)
        halves = (dense.gate_proj.weight, dense.gate_proj.weight_scale_inv, dense.up_proj.weight,
                  dense.up_proj.weight_scale_inv)
        want = {m: dense(x[:m]) for m in (1, 80)}
        fw, fs = fused_gate_up(*halves)
        dense.fuse_gate_up_()
        dense.gate_up_proj.weight.copy_(fw)
        dense.gate_up_proj.weight_scale_inv.copy_(fs)
        weights = dense.fp8_swiglu_weights()
        assert weights[0] is dense.gate_up_proj.weight and weights[2] is None and weights[3] is None
        for m in (1, 80):
            assert torch.equal(dense(x[:m]), want[m])


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

GPU_SHAPES = [(4095, 2048, 2, 1408), (300, 2048, 2, 1408), (65, 7168, 1, 256), (1000, 7168, 1, 2304)]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m,d,slots,inter", GPU_SHAPES)
@pytest.mark.parametrize("compiled", [False, True])
def test_cublas_path_gpu(m, d, slots, inter, compiled):
    gen = torch.Generator().manual_seed(m * 7 + inter)
    args = swiglu_inputs(m, d, slots, inter, gen, device="cuda")
    op = torch.ops.dsv3.fp8_swiglu
    fn = torch.compile(lambda *a: op(*a), fullgraph=True, dynamic=False) if compiled else op
    poison_allocator()
    out = fn(*args)
    ref64 = swiglu_float64(*args)
    composed = fp8_swiglu_reference(*args, linear=lambda x, w, s: torch.ops.dsv3.fp8_linear(x, w, s))
    assert out.shape == (m, d) and torch.isfinite(out).all()
    assert rel_err(out, ref64) < 2e-2
    # one GEMM over the S slots (fp32 accumulation) vs S bf16 GEMMs summed: a few bf16 roundings apart
    assert rel_err(out, composed) < 8e-3
    if slots > 1:  # the slots side by side and padded at load (RoutedExperts.add_prefill_copies_): no copy per call
        pw, ps = packed_down(args[5], args[6])
        packed = fn(*args[:5], pw, ps)
        assert rel_err(packed, out) < 2e-3 and rel_err(packed, ref64) < 2e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m", [300, 1024])
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_gate_up_gpu(m, compiled):
    """16B shared experts (D 2048, N 2816): gate and up as one cuBLAS GEMM over a fused weight (up_w None) give the
    two GEMMs' output bit for bit (each output column is the same dot product; the halves are read as column slices
    of one [Mp, 2N] output), with the slots' down projections or packed ones, x quantized by the op or given in
    cuBLAS's layout, eager and under torch.compile(fullgraph=True)."""
    from dsv3.kernels.fp8_linear import act_quant
    from dsv3.kernels.fp8_swiglu import QUANTIZED_X_K_BLOCKS

    gen = torch.Generator().manual_seed(m + 5)
    x, gate_w, gate_s, up_w, up_s, down_w, down_s = swiglu_inputs(m, 2048, 2, 1408, gen, device="cuda")
    fw, fs = fused_gate_up(gate_w, gate_s, up_w, up_s)
    xq = act_quant(x, pad_rows_to=4, scales_m_major=True, pad_k=True, pad_k_blocks_to=QUANTIZED_X_K_BLOCKS)
    op = torch.ops.dsv3.fp8_swiglu
    torch._dynamo.reset()  # each form's 4 graphs (down, x_q) under the recompile limit, per form
    halves = torch.compile(lambda *a: op(*a), fullgraph=True, dynamic=False) if compiled else op
    fused = torch.compile(lambda *a: op(*a), fullgraph=True, dynamic=False) if compiled else op
    for down in ((down_w, down_s), packed_down(down_w, down_s)):
        for x_q in ((), xq):
            poison_allocator()
            want = halves(x, gate_w, gate_s, up_w, up_s, *down, *x_q)
            got = fused(x, fw, fs, None, None, *down, *x_q)
            assert got.shape == (m, 2048) and torch.isfinite(got).all() and torch.equal(got, want)


@pytest.mark.gpu
@cuda
def test_packed_down_in_a_package_gpu(tmp_path):
    """Inside an AOTInductor package (v1 `torch._scaled_mm`, K padded to whole 4-block groups) at a dynamic prefill
    M: the packed down projection needs no pad, and gives the slots' result; with gate and up as one weight too
    (the model's prefill copies), bitwise the package with two."""
    gen = torch.Generator().manual_seed(11)
    x, gate_w, gate_s, up_w, up_s, down_w, down_s = swiglu_inputs(300, 2048, 2, 1408, gen, device="cuda")
    pw, ps = packed_down(down_w, down_s)

    class Swiglu(torch.nn.Module):
        def forward(self, x, gate_w, gate_s, up_w, up_s, down_w, down_s):
            return torch.ops.dsv3.fp8_swiglu(x, gate_w, gate_s, up_w, up_s, down_w, down_s)

    m = torch.export.Dim("m", min=65, max=4096)
    weights = (gate_w, gate_s, up_w, up_s, pw, ps)
    ep = torch.export.export(Swiglu(), (x, *weights), dynamic_shapes=({0: m},) + (None,) * 6)
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "swiglu.pt2")))

    class FusedGateUp(torch.nn.Module):  # gate and up as one weight (the prefill copy of the stacked slots)
        def forward(self, x, gate_up_w, gate_up_s, down_w, down_s):
            return torch.ops.dsv3.fp8_swiglu(x, gate_up_w, gate_up_s, None, None, down_w, down_s)

    fused_weights = (*fused_gate_up(gate_w, gate_s, up_w, up_s), pw, ps)
    ep = torch.export.export(FusedGateUp(), (x, *fused_weights), dynamic_shapes=({0: m},) + (None,) * 4)
    fused_runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "swiglu_fused.pt2")))
    for rows in (300, 777):
        xr = torch.randn(rows, 2048, generator=gen).to(torch.bfloat16).cuda()
        poison_allocator()
        out = runner(xr, *weights)
        ref64 = swiglu_float64(xr, gate_w, gate_s, up_w, up_s, down_w, down_s)
        assert out.shape == (rows, 2048) and torch.isfinite(out).all()
        assert rel_err(out, ref64) < 2e-2
        assert rel_err(out, torch.ops.dsv3.fp8_swiglu(xr, gate_w, gate_s, up_w, up_s, down_w, down_s)) < 2e-3
        assert torch.equal(fused_runner(xr, *fused_weights), out)  # one GEMM for gate and up: the same columns


def _norm_then_experts(h, delta, norm_w, swiglu_w, routed, idx, wt, quantized: bool):
    """An FP8 MoE layer's prefill as the model runs it: the post-attention norm, the shared experts through
    dsv3.fp8_swiglu, the routed experts; with `quantized` x is quantized once, by dsv3.add_rms_norm_quant_cublas
    (MoE.quantizes_x_for_cublas), else fp8_swiglu quantizes it itself (the routed experts take the norm's)."""
    from dsv3.kernels.fp8_swiglu import QUANTIZED_X_K_BLOCKS

    if quantized:
        _, x, xq, xs, xsc = torch.ops.dsv3.add_rms_norm_quant_cublas(h, delta, norm_w, 1e-6, QUANTIZED_X_K_BLOCKS)
        return torch.ops.dsv3.fp8_swiglu(x, *swiglu_w, xq, xsc), torch.ops.dsv3.routed_experts(
            x, idx, wt, *routed, xq, xs)  # (the routed experts read xq's first t rows)
    _, x, xq, xs = torch.ops.dsv3.add_rms_norm_quant(h, delta, norm_w, 1e-6)
    return torch.ops.dsv3.fp8_swiglu(x, *swiglu_w), torch.ops.dsv3.routed_experts(x, idx, wt, *routed, xq, xs)


@pytest.mark.gpu
@cuda
def test_norm_quantized_x_gpu(tmp_path, monkeypatch):
    """x quantized by dsv3.add_rms_norm_quant_cublas and read by dsv3.fp8_swiglu (shared experts, cuBLAS's layout)
    and dsv3.routed_experts (the padded e4m3 as it is, per-token scales; grouped path): both outputs bitwise what
    the ops give when fp8_swiglu quantizes x itself, eagerly (T not a multiple of 4), under torch.compile(fullgraph=
    True) with a dynamic T (both forms compiled), and in AOTInductor packages with a dynamic T (against the package
    with DSV3_PREFILL_NORM_QUANT=off, which turns `takes_quantized_x` off)."""
    from dsv3.kernels.fp8_blocks import quantize_weight
    from dsv3.kernels.fp8_swiglu import takes_quantized_x

    gen = torch.Generator().manual_seed(21)
    d, inter, slots, e_routed, k = 2048, 1408, 2, 64, 6

    def inputs(t):
        h = (torch.randn(t, d, generator=gen) * 2).to(torch.bfloat16).cuda()
        delta = torch.randn(t, d, generator=gen).to(torch.bfloat16).cuda()
        idx = torch.stack([torch.randperm(e_routed, generator=gen)[:k] for _ in range(t)]).cuda()
        wt = torch.rand(t, k, generator=gen).cuda()
        return h, delta, idx, wt

    norm_w = (1 + 0.2 * torch.randn(d, generator=gen)).to(torch.bfloat16).cuda()
    swiglu_w = swiglu_inputs(1, d, slots, inter, gen, device="cuda")[1:]
    routed = [quantize_weight(torch.randn(*s, generator=gen) * 0.05) for s in
              ((e_routed, inter, d), (e_routed, inter, d), (e_routed, d, inter))]
    routed = [w.cuda() for w, _ in routed] + [s.cuda() for _, s in routed]
    assert takes_quantized_x(inputs(65)[0], swiglu_w[4])
    for t in (4095, 301):
        h, delta, idx, wt = inputs(t)
        poison_allocator()
        got = _norm_then_experts(h, delta, norm_w, swiglu_w, routed, idx, wt, True)
        want = _norm_then_experts(h, delta, norm_w, swiglu_w, routed, idx, wt, False)
        assert all(torch.isfinite(a).all() and torch.equal(a, b) for a, b in zip(got, want)), t
    torch._dynamo.reset()
    fns = {q: torch.compile(lambda *a, q=q: _norm_then_experts(*a[:2], norm_w, swiglu_w, routed, *a[2:], q),
                            fullgraph=True) for q in (True, False)}
    for t in (333, 1000):
        args = inputs(t)
        for a_ in args:
            torch._dynamo.mark_dynamic(a_, 0)
        got, want = fns[True](*args), fns[False](*args)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), t
    torch._dynamo.reset()

    class Layer(torch.nn.Module):
        def forward(self, h, delta, idx, wt):
            return _norm_then_experts(h, delta, norm_w, swiglu_w, routed, idx, wt,
                                      takes_quantized_x(h, swiglu_w[4]))

    a = inputs(700)
    t_dim = torch.export.Dim("t", min=65, max=4096)
    runners = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("DSV3_PREFILL_NORM_QUANT", mode)
        ep = torch.export.export(Layer(), a, dynamic_shapes=({0: t_dim},) * 4)
        runners[mode] = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / f"norm_q_{mode}.pt2")))
    monkeypatch.delenv("DSV3_PREFILL_NORM_QUANT")
    for t in (700, 301, 4095):
        b = a if t == 700 else inputs(t)
        got, want = runners["on"](*b), runners["off"](*b)
        assert all(torch.isfinite(x).all() and torch.equal(x, y) for x, y in zip(got, want)), t


@pytest.mark.gpu
@cuda
def test_model_prefill_norm_quant_gpu(random_checkpoint, monkeypatch):
    """The model's prefill with x quantized by the post-attention norm for both kinds of expert (the default on
    Hopper) gives the logits of the path where fp8_swiglu quantizes x itself (DSV3_PREFILL_NORM_QUANT=off), bit for
    bit, eagerly on the tiny FP8 checkpoint (its shared expert as an MLP; 301 tokens: rows padded for cuBLAS)."""
    import dsv3
    from dsv3.model import MoE

    model = dsv3.load(random_checkpoint("tiny", "fp8"), dtype=torch.bfloat16, max_batch_size=1, max_seq_len=512,
                      device="cuda", progress=False)
    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 301), generator=gen).cuda()
    pos = torch.arange(301, device="cuda")
    probe = torch.empty(1, 301, model.cfg.hidden_size, dtype=torch.bfloat16, device="cuda")
    logits = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("DSV3_PREFILL_NORM_QUANT", mode)
        assert moes and all(moe.quantizes_x_for_cublas(probe) == (mode == "on") for moe in moes)
        with torch.no_grad():
            logits[mode] = model(tokens, pos)
    assert torch.isfinite(logits["on"]).all() and torch.equal(logits["on"], logits["off"])
