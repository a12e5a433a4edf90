"""Decode GEMV variants of `torch.ops.dsv3.fp8_linear` (`dsv3.kernels.fp8_linear.fp8_gemv`).

CPU (part of `make test`):
- every variant run by the Triton interpreter against the reference: `tests/interpret_gemv.py`, in a subprocess
  because TRITON_INTERPRET=1 must be set before triton is imported (~20 s);
- the trace-time choice: `gemv_choice` (GEMV_TUNED, else `gemv_default`'s shape classes), DSV3_GEMV_VARIANT parsing and
  precedence (`resolve_gemv`).

GPU (`pytest -m gpu tests/test_gemv_variants.py`, on the device): each variant at the 16B decode shapes (M = 1, 4, 8)
against a float64 GEMM of the identically quantized operands, bf16 output, relative Frobenius error < 1e-2 (as
tests/test_kernels.py; measured values go to $OUT/gemv_test_errors.json), with poisoned allocator memory; inside
CUDA-graph capture replayed on fresh inputs; pinned with DSV3_GEMV_VARIANT under `torch.compile(fullgraph=True)`;
and the in-program quantization (`quantize_tile_rcp`) bit for bit against `_act_quant_kernel` and the CPU
`quantize_activation` on adversarial activations (values at e4m3 rounding ties, tiny values, zeros).
"""

from __future__ import annotations


import pytest
import torch

from dsv3.kernels import fp8_linear as L  # (importing dsv3.kernels registers torch.ops.dsv3.*)
from dsv3.kernels.fp8_blocks import dequantize_activation, dequantize_weight, quantize_activation, quantize_weight
from kernel_checks import cuda, ErrorLog, fp8_ref64, interpreter_failure, poison_allocator, rel_err, run_interpreted

# ---------------------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------------------


def test_gemv_variants_interpreted():
    res = run_interpreted("interpret_gemv.py")
    assert res.returncode == 0, interpreter_failure(res)


DECODE_SHAPES = [(3072, 2048), (576, 2048), (2048, 2048), (2816, 2048), (2048, 2816), (10944, 2048), (2048, 10944),
                 (1536, 7168), (3072, 1536), (576, 7168), (7168, 2048), (256, 7168), (7168, 256), (2304, 7168),
                 (7168, 2304)]


def test_gemv_choice_untuned_shapes_get_the_shape_class_default(monkeypatch):
    monkeypatch.setattr(L, "GEMV_TUNED", {})
    for n, k in DECODE_SHAPES:
        for m in (1, 4, 8, 16, 64):
            assert L.gemv_choice(m, n, k, 132) == L.gemv_default(m, n, k)
    # the classes (sweep_gemv.py, H200): one token, small weights -> rows quantizing x; one token, large weights
    # with K in nearly whole power-of-two blocks -> rows over pre-quantized x; else split-K (x quantized in the
    # programs for small weights at 2-16 tokens)
    assert L.gemv_default(1, 576, 2048) == ("rows", 8, 8, 1)
    assert L.gemv_default(1, 7168, 512) == ("rows", 8, 4, 1)
    assert L.gemv_default(1, 6144, 1536) == ("rows", 8, 8, 1)  # 9.4 MB at K 1536
    assert L.gemv_default(1, 12288, 1536) == L.GEMV_DEFAULT  # 18.9 MB
    assert L.gemv_default(1, 7168, 8192) == ("rows_prequant", 2, 4, 1)  # 64 blocks: no padding
    assert L.gemv_default(1, 1536, 7168) == ("rows_prequant", 2, 4, 1)  # 56 of 64
    assert L.gemv_default(1, 7168, 4608) == L.GEMV_DEFAULT  # 36 of 64
    assert L.gemv_default(1, 256, 18432) == L.GEMV_DEFAULT  # past ROWS_MAX_K (registers)
    assert L.gemv_default(4, 576, 2048) == ("splitk_fused", 64, 4, 5)
    assert L.gemv_default(16, 2048, 2816) == ("splitk_fused", 64, 4, 5)
    assert L.gemv_default(4, 1536, 7168) == L.gemv_default(17, 576, 2048) == L.GEMV_DEFAULT
    monkeypatch.delenv("DSV3_GEMV_VARIANT", raising=False)
    assert L.resolve_gemv(1, 576, 2048, 132) == ("rows", 8, 8, 1)
    # every shipped choice is a legal launch config
    shipped = [(L.GEMV_DEFAULT,)] + [tuple(r[1:] for r in rows) for rows in L.GEMV_TUNED.values()]
    shipped += [tuple(L.gemv_default(m, n, k) for n, k in DECODE_SHAPES for m in (1, 4, 16, 64))]
    for choices in shipped:
        for variant, bn, nw, ns in choices:
            assert variant in L.GEMV_VARIANTS and 128 % bn == 0 and (variant in L.GEMV_CUDA_CORE_VARIANTS or bn >= 16)
            assert nw in (1, 2, 4, 8) and ns >= 1


def test_gemv_choice_table(monkeypatch):
    monkeypatch.setattr(L, "GEMV_TUNED", {(2048, 2048): ((1, "cc", 16, 2, 8), (8, "nosplit", 32, 4, 4))})
    assert L.gemv_choice(1, 2048, 2048, 132) == ("cc", 16, 2, 8)
    assert L.gemv_choice(4, 2048, 2048, 132) == ("nosplit", 32, 4, 4)
    assert L.gemv_choice(8, 2048, 2048, 132) == ("nosplit", 32, 4, 4)
    assert L.gemv_choice(9, 2048, 2048, 132) == L.gemv_default(9, 2048, 2048)
    assert L.gemv_choice(1, 2048, 2816, 132) == L.gemv_default(1, 2048, 2816)
    # a pinned variant takes the table's config when the table chose that variant, else the variant's default
    monkeypatch.setenv("DSV3_GEMV_VARIANT", "cc")
    assert L.resolve_gemv(1, 2048, 2048, 132) == ("cc", 16, 2, 8)
    assert L.resolve_gemv(4, 2048, 2048, 132) == ("cc",) + L.GEMV_VARIANT_DEFAULTS["cc"]


def test_gemv_table_file(monkeypatch, tmp_path):
    """DSV3_GEMV_TABLE: the suggested table of a scripts/sweep_gemv.py JSON replaces GEMV_TUNED at trace time."""
    import json

    monkeypatch.setattr(L, "GEMV_TUNED", {(2048, 2048): ((8, "cc", 16, 2, 8),)})
    path = tmp_path / "sweep_gemv.json"
    path.write_text(json.dumps({"suggestion": {"table": {"2048,2048": [[1, "splitk_fused", 32, 4, 5],
                                                                          [8, "nosplit", 16, 4, 3]]}}}))
    monkeypatch.setenv("DSV3_GEMV_TABLE", str(path))
    assert L.gemv_choice(1, 2048, 2048, 132) == ("splitk_fused", 32, 4, 5)
    assert L.gemv_choice(8, 2048, 2048, 132) == ("nosplit", 16, 4, 3)
    assert L.gemv_choice(1, 576, 2048, 132) == L.gemv_default(1, 576, 2048)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    monkeypatch.setenv("DSV3_GEMV_TABLE", str(bad))
    with pytest.raises(ValueError, match="DSV3_GEMV_TABLE"):
        L.gemv_choice(1, 2048, 2048, 132)
    monkeypatch.delenv("DSV3_GEMV_TABLE")
    assert L.gemv_choice(1, 2048, 2048, 132) == ("cc", 16, 2, 8)


def test_resolve_gemv_precedence(monkeypatch):
    monkeypatch.setattr(L, "GEMV_TUNED", {})
    monkeypatch.delenv("DSV3_GEMV_VARIANT", raising=False)
    for v in L.GEMV_VARIANTS:
        assert L.resolve_gemv(1, 576, 2048, 132, v) == (v,) + L.GEMV_VARIANT_DEFAULTS[v]
    assert L.resolve_gemv(1, 576, 2048, 132, "cc:8:1:12") == ("cc", 8, 1, 12)
    monkeypatch.setenv("DSV3_GEMV_VARIANT", " NoSplit:16:8:3 ")
    assert L.resolve_gemv(1, 576, 2048, 132) == ("nosplit", 16, 8, 3)
    assert L.resolve_gemv(1, 576, 2048, 132, num_stages=5) == ("nosplit", 16, 8, 5)
    assert L.resolve_gemv(1, 576, 2048, 132, "cc") == ("cc",) + L.GEMV_VARIANT_DEFAULTS["cc"]  # explicit wins
    monkeypatch.setenv("DSV3_GEMV_VARIANT", "auto")
    v, _, nw, ns = L.gemv_default(1, 576, 2048)
    assert L.resolve_gemv(1, 576, 2048, 132, block_n=32) == (v, 32, nw, ns)
    for bad in ("gemv", "cc:16", "auto:16:4:4", "cc:a:b:c"):
        monkeypatch.setenv("DSV3_GEMV_VARIANT", bad)
        with pytest.raises(ValueError):
            L.resolve_gemv(1, 576, 2048, 132)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

ERRORS = ErrorLog("gemv_test_errors.json")
note, rel, ref64 = ERRORS.note, rel_err, fp8_ref64


@pytest.fixture(scope="module", autouse=True)
def _write_errors():
    yield
    ERRORS.write()


def rand_weight(n, k):
    return quantize_weight(torch.randn(n, k, device="cuda") * 0.05)


# 16B (V2-Lite) decode linears: q_proj, kv_a_proj, o_proj, shared gate/up, shared down, dense gate/up, dense down
SHAPES_16B = [(3072, 2048), (576, 2048), (2048, 2048), (2816, 2048), (2048, 2816), (10944, 2048), (2048, 10944)]
GPU_CONFIGS = {  # per variant: its default, and one other legal config
    "splitk": [None, (32, 4, 3)],
    "splitk_fused": [None, (32, 8, 3)],
    "cc": [None, (8, 4, 12)],
    "cc_prequant": [None, (32, 4, 5)],
    "nosplit": [None, (16, 4, 5)],
    "fused_nosplit": [None, (16, 8, 3)],
    "rows": [None, (1, 4, 1)],
    "rows_prequant": [None, (4, 2, 1)],
}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n,k", SHAPES_16B)
@pytest.mark.parametrize("variant", L.GEMV_VARIANTS)
def test_gemv_variant_gpu(variant, n, k):
    w, s = rand_weight(n, k)
    for m in (1, 4, 8):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = ref64(x, w, s)
        for cfg in GPU_CONFIGS[variant]:
            bn, nw, ns = cfg or (None, None, None)
            poison_allocator()
            y = L.fp8_gemv(x, w, s, torch.bfloat16, variant=variant, block_n=bn, num_warps=nw, num_stages=ns)
            assert y.shape == (m, n) and y.dtype == torch.bfloat16
            assert note(f"gemv[{variant} {cfg}] M={m} N={n} K={k}", rel(y, ref)) < 1e-2
        # fp32 activations and output (the op's x.dtype contract)
        xf = torch.randn(m, k, device="cuda")
        yf = L.fp8_gemv(xf, w, s, torch.float32, variant=variant)
        assert note(f"gemv[{variant}] fp32 M={m} N={n} K={k}", rel(yf, ref64(xf, w, s))) < 1e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("variant", L.GEMV_VARIANTS)
def test_gemv_variant_cuda_graph(variant):
    """No host sync in any variant: captured into a CUDA graph, replayed on fresh inputs, same results as eager."""
    cases = [(1, 576, 2048), (4, 2816, 2048), (8, 2048, 10944), (3, 200, 1408)]
    ws = [rand_weight(n, k) for _, n, k in cases]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m, _, k in cases]

    def run():
        return [L.fp8_gemv(x, w, s, torch.bfloat16, variant=variant) for x, (w, s) in zip(xs, ws)]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = run()
    for _ in range(2):
        for x in xs:
            x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        eager = run()
        for (m, n, k), o, e, x, (w, s) in zip(cases, outs, eager, xs, ws):
            assert rel(o, e) < 1e-6
            assert note(f"graph[{variant}] M={m} N={n} K={k}", rel(o, ref64(x, w, s))) < 1e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("variant", L.GEMV_VARIANTS)
def test_gemv_variant_compiled(variant, monkeypatch):
    """DSV3_GEMV_VARIANT pins the variant at trace time; the op compiles with fullgraph=True.

    Compiled and eager results are compared through the reference, not bit for bit: with Inductor the variants
    that write the bf16 output straight from the GEMV kernel were seen 1 bf16 ulp apart from eager in a few
    elements (H200, torch 2.11; split-K, whose output comes from the reduce kernel, was identical)."""
    monkeypatch.setenv("DSV3_GEMV_VARIANT", variant)
    torch._dynamo.reset()
    w1, s1 = rand_weight(576, 2048)
    w2, s2 = rand_weight(2048, 1408)

    def f(x, w1, s1, w2, s2):
        h = torch.ops.dsv3.fp8_linear(x, w1, s1)
        hp = torch.nn.functional.pad(h, (0, 1408 - 576))
        return h, hp, torch.ops.dsv3.fp8_linear(hp, w2, s2)

    compiled = torch.compile(f, fullgraph=True)
    for _ in range(2):
        x = torch.randn(1, 2, 2048, device="cuda", dtype=torch.bfloat16)
        h, hp, y = compiled(x, w1, s1, w2, s2)
        h_eager = f(x, w1, s1, w2, s2)[0]
        assert h.shape == (1, 2, 576) and y.shape == (1, 2, 2048)
        assert rel(h, h_eager) < 1e-2
        assert note(f"compiled[{variant}] h", rel(h[0], ref64(x[0], w1, s1))) < 1e-2
        assert note(f"compiled[{variant}] y", rel(y[0], ref64(hp[0], w2, s2))) < 1e-2
    torch._dynamo.reset()

def adversarial_activations(m: int, k: int, dtype) -> torch.Tensor:
    """Random rows plus rows built to stress the quantizer's rounding: values whose x / scale lands next to e4m3
    rounding midpoints (and next to binary32 midpoints of the quotient), exact zeros and -0, values 2^-100 and
    below, blocks that are all zero (the 1e-4 amax floor), and a mix of magnitudes across blocks."""
    g = torch.Generator(device="cuda").manual_seed(m * 7 + k)
    x = torch.randn(m, k, device="cuda", generator=g) * torch.exp2(torch.randint(-20, 20, (m, 1), device="cuda",
                                                                                   generator=g).float())
    kb = -(-k // 128)
    amax = torch.exp2(torch.randint(-30, 30, (m, kb), device="cuda", generator=g).float())
    amax = amax * (1 + torch.rand(m, kb, device="cuda", generator=g))
    scale = (amax / 448).repeat_interleave(128, 1)[:, :k]
    e4 = torch.arange(256, device="cuda", dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4 = e4[torch.isfinite(e4)].sort().values
    mids = (e4[1:] + e4[:-1]) / 2
    q = mids[torch.randint(0, len(mids), (m, k), device="cuda", generator=g)]
    q = q * (1 + torch.randint(-2, 3, (m, k), device="cuda", generator=g).float() * 2.0 ** -23)
    adv = q * scale
    adv[:, ::128] = amax[:, : adv[:, ::128].shape[1]]  # each block's amax present: the scale is as planned
    rows = torch.arange(m, device="cuda") % 4
    x = torch.where((rows == 1)[:, None], adv, x)
    x[rows == 2, : k // 2] = 0.0
    x[rows == 2, k // 2:] = -0.0
    tiny = torch.randn(m, k, device="cuda", generator=g) * 2.0 ** -110
    x = torch.where((rows == 3)[:, None] & (torch.rand(m, k, device="cuda", generator=g) < 0.5), tiny, x)
    return x.to(dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_in_program_quantization_is_exact_gpu(dtype):
    """`_act_quant_kernel` (IEEE division) reproduces `quantize_activation` bit for bit, and `quantize_tile_rcp`
    (inside cc / fused_nosplit programs) gives the same e4m3 values and scales: the fused and the pre-quantized
    launch of the same kernel agree bit for bit on their outputs (same accumulation order; only where x is
    quantized differs).

    The reference quantization runs on the CPU: on CUDA, PyTorch computes `amax / 448` (a division by a Python
    scalar) as `amax * (1 / 448)`, which is not the correctly rounded quotient for about half the blocks, and
    bf16 activations often put x / scale exactly on an e4m3 rounding tie, so a one-ulp different scale flips
    elements (relative output differences ~2e-3 against a CUDA-computed reference)."""
    for m, n, k in [(1, 576, 2048), (3, 200, 1408), (8, 2048, 10944), (4, 136, 264)]:
        w, s = rand_weight(n, k)
        x = adversarial_activations(m, k, dtype)
        if dtype == torch.float16:
            x = x.clamp(-6e4, 6e4)
        xq_ref, xs_ref = quantize_activation(x.cpu())
        xq, xs = L.act_quant(x)
        assert torch.equal(xs.cpu(), xs_ref)
        assert torch.equal(xq.cpu().float(), xq_ref.float())  # (== : +0 and -0 agree)
        ref = (dequantize_activation(xq_ref, xs_ref).double() @ dequantize_weight(w.cpu(), s.cpu()).double().t())
        ref = ref.cuda()
        for fused, pre in (("cc", "cc_prequant"), ("fused_nosplit", "nosplit")):
            a = L.fp8_gemv(x, w, s, torch.float32, variant=fused)
            b = L.fp8_gemv(x, w, s, torch.float32, variant=pre)
            assert torch.equal(a, b), f"{fused} vs {pre} M={m} N={n} K={k} {dtype}: max diff {(a - b).abs().max()}"
            bound = 1e-5 if fused == "cc" else 1e-2  # fp32 CUDA-core sums; the FP8 MMA accumulates coarser
            assert note(f"adversarial[{fused}] M={m} N={n} K={k} {dtype}", rel(a, ref)) < bound
