"""The decode GEMV variants of `dsv3.kernels.fp8_linear` run by the Triton CPU interpreter, against the reference.

Not collected by the normal suite (the name does not start with `test_`): `tests/test_gemv_variants.py` runs this
file in a subprocess with TRITON_INTERPRET=1 (the flag must be set before triton is imported). By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_gemv.py

The interpreter's fp32 -> e4m3 cast rounds wrongly at binade edges (see tests/interpret_kernels.py), so every
variant is checked twice: on pre-quantized activations (`x_scale=`: no quantization inside the kernels at all), and,
for the paths that quantize (in-program or in `_act_quant_kernel`), on activations whose per-128 quantization is exact
(power-of-two scales, one +-448 per block), where the reference's quantization and the kernel's agree bit for bit.
Outputs are fp32 (the interpreter's fp32 -> bf16 cast truncates), except in the one end-to-end dispatch check.
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_gemv.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import fp8_linear as L  # noqa: E402
from kernel_checks import exactly_quantizable, rel_err  # noqa: E402
from dsv3.kernels.fp8_blocks import (  # noqa: E402
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
)

# Every pair of M in {1, 3, 4}, N in {576, 200, 128} (ragged: not multiples of 128 except 128 itself) and
# K in {2048, 1408, 320} (1408 = 11 blocks, 320 = 2.5 blocks) appears once.
SHAPES = [(1, 576, 2048), (3, 200, 1408), (4, 128, 320), (1, 200, 320), (3, 128, 2048), (4, 576, 1408),
          (1, 128, 1408), (3, 576, 320), (4, 200, 2048)]
# Launch configs cycled over the shapes: (block_n, num_warps, num_stages). num_warps changes the cc kernel's x tile
# height (X_ROWS > BLOCK_T for 4 and 8 warps), block_n 8 / 64 only where N*K is small (interpreter time).
CONFIGS = {
    "cc": [(32, 2, 8), (16, 4, 3), (64, 8, 2), (8, 1, 1)],
    "cc_prequant": [(16, 8, 4), (32, 1, 2), (8, 4, 8), (64, 2, 3)],
    "nosplit": [(32, 4, 4), (16, 4, 3), (64, 8, 2)],
    "fused_nosplit": [(32, 4, 4), (16, 2, 3), (64, 8, 2)],
    "splitk": [(64, 4, 5), (32, 4, 3), (16, 4, 2)],
    "rows": [(8, 8, 1), (2, 4, 1), (1, 2, 1), (4, 1, 1)],
}


def config_for(variant: str, i: int, n: int, k: int) -> tuple[int, int, int]:
    bn, nw, ns = CONFIGS[variant][i % len(CONFIGS[variant])]
    if n * k > 150_000:  # the interpreter's time goes by programs x K blocks: few, wide programs on big shapes
        bn = 8 if variant == "rows" else 64
    return bn, nw, ns


def weights(n: int, k: int, gen: torch.Generator):
    return quantize_weight(torch.randn(n, k, generator=gen))


@pytest.mark.parametrize("variant", ["cc", "nosplit", "fused_nosplit", "rows"])  # splitk: tests/interpret_kernels.py
# (cc_prequant / rows_prequant with x_scale= are cc / rows with x_scale=)
@pytest.mark.parametrize("i", range(len(SHAPES)))
def test_gemv_variant_prequantized(variant, i):
    m, n, k = SHAPES[i]
    gen = torch.Generator().manual_seed(1000 * i + m + n + k)
    w, s = weights(n, k, gen)
    xq, xs = quantize_activation(torch.randn(m, k, generator=gen))
    ref = dequantize_activation(xq, xs).double() @ dequantize_weight(w, s).double().t()
    bn, nw, ns = config_for(variant, i, n, k)
    out = L.fp8_gemv(xq, w, s, torch.float32, x_scale=xs, variant=variant, block_n=bn, num_warps=nw, num_stages=ns)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("variant", ["cc", "fused_nosplit", "cc_prequant", "rows"])
@pytest.mark.parametrize("i", range(len(SHAPES)))
def test_gemv_variant_quantizes_exactly(variant, i):
    """The variants that quantize x inside the GEMV program (`quantize_tile_rcp`), and cc after `_act_quant_kernel`
    (nosplit's use of it is checked by `test_launches_per_variant` and tests/interpret_kernels.py)."""
    m, n, k = SHAPES[i]
    gen = torch.Generator().manual_seed(77 + 1000 * i + m + n + k)
    w, s = weights(n, k, gen)
    x = exactly_quantizable(m, k, gen)
    ref = L.fp8_linear_reference(x.float(), w, s).double()
    bn, nw, ns = config_for("rows" if variant == "rows" else variant, i + 1, n, k)
    out = L.fp8_gemv(x, w, s, torch.float32, variant=variant, block_n=bn, num_warps=nw, num_stages=ns)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("m", [3, 6])
def test_rows_token_tiles(m):
    """More tokens than GEMV_ROWS_M_TILE: the rows kernel takes several programs along grid axis 1 (the last one
    ragged), each token's x quantized in the program."""
    n, k = 40, 300
    gen = torch.Generator().manual_seed(50 + m)
    w, s = weights(n, k, gen)
    x = exactly_quantizable(m, k, gen)
    ref = L.fp8_linear_reference(x.float(), w, s).double()
    assert rel_err(L.fp8_gemv(x, w, s, torch.float32, variant="rows", block_n=8, num_warps=2), ref) < 1e-6


@pytest.mark.parametrize("m", [11, 64])
def test_cc_token_chunks(m):
    """M above GEMV_CC_MAX_T: the cc kernel takes several programs along grid axis 1 (the last one ragged)."""
    n, k = 72, 200
    gen = torch.Generator().manual_seed(m)
    w, s = weights(n, k, gen)
    x = exactly_quantizable(m, k, gen, dtype=torch.float32)  # fp32 input: another x dtype, X_ROWS from 4-byte rows
    ref = L.fp8_linear_reference(x, w, s).double()
    assert rel_err(L.fp8_gemv(x, w, s, torch.float32, variant="cc", block_n=32, num_warps=8), ref) < 1e-6
    xq, xs = quantize_activation(x)
    assert rel_err(L.fp8_gemv(xq, w, s, torch.float32, x_scale=xs, variant="cc", block_n=64), ref) < 1e-6


def test_cc_strided_rows():
    """x rows with a stride larger than K (a view of a wider tensor), the out row stride is N."""
    m, n, k = 3, 136, 264
    gen = torch.Generator().manual_seed(5)
    w, s = weights(n, k, gen)
    wide = exactly_quantizable(m, k + 136, gen)
    x = wide[:, :k]
    ref = L.fp8_linear_reference(x.float(), w, s).double()
    for variant in ("cc", "fused_nosplit"):
        assert rel_err(L.fp8_gemv(x, w, s, torch.float32, variant=variant, block_n=16), ref) < 1e-6


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels the launchers start, in order."""
    names: list[str] = []
    orig = L.wrap_triton

    def record(kernel):
        names.append(getattr(kernel, "fn", kernel).__name__)
        return orig(kernel)

    monkeypatch.setattr(L, "wrap_triton", record)
    return names


@pytest.mark.parametrize("variant,expected", [
    ("cc", ["_fp8_gemv_cc_kernel"]),
    ("cc_prequant", ["_act_quant_kernel", "_fp8_gemv_cc_kernel"]),
    ("nosplit", ["_act_quant_kernel", "_fp8_gemv_kernel"]),
    ("fused_nosplit", ["_fp8_gemv_kernel"]),
    ("splitk", ["_act_quant_kernel", "_fp8_gemv_kernel", "_splitk_reduce_kernel"]),
    ("splitk_fused", ["_fp8_gemv_kernel", "_splitk_reduce_kernel"]),
    ("rows", ["_fp8_gemv_rows_kernel"]),
    ("rows_prequant", ["_act_quant_kernel", "_fp8_gemv_rows_kernel"]),
])
def test_launches_per_variant(variant, expected, launches):
    m, n, k = 1, 64, 1408  # splitk: 1 program column -> several splits
    gen = torch.Generator().manual_seed(3)
    w, s = weights(n, k, gen)
    x = exactly_quantizable(m, k, gen)
    out = L.fp8_gemv(x, w, s, torch.float32, variant=variant)
    assert launches == expected
    assert rel_err(out, L.fp8_linear_reference(x.float(), w, s)) < 1e-6


def test_env_knob_pins_variant_through_the_op_path(launches, monkeypatch):
    m, n, k = 2, 200, 320
    gen = torch.Generator().manual_seed(9)
    w, s = weights(n, k, gen)
    x = exactly_quantizable(m, k, gen)
    ref = L.fp8_linear_reference(x.float(), w, s).double()
    monkeypatch.setenv("DSV3_GEMV_VARIANT", "cc:8:2:4")
    y = L.fp8_linear_triton(x, w, s)  # the dispatch `torch.ops.dsv3.fp8_linear` takes on CUDA, bf16 output
    assert launches == ["_fp8_gemv_cc_kernel"]
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 8e-3  # the interpreter's bf16 cast truncates
    launches.clear()
    monkeypatch.setenv("DSV3_GEMV_VARIANT", "fused_nosplit")
    y = L.fp8_linear_triton(x.float(), w, s)
    assert launches == ["_fp8_gemv_kernel"] and rel_err(y, ref) < 1e-6


def test_legacy_splitk_knobs_win_over_the_env(launches, monkeypatch):
    """`split=` / `fused=True` callers (bench sweeps, older tests) keep getting the split-K kernel."""
    m, n, k = 1, 64, 1408
    gen = torch.Generator().manual_seed(4)
    w, s = weights(n, k, gen)
    x = exactly_quantizable(m, k, gen)
    ref = L.fp8_linear_reference(x.float(), w, s)
    monkeypatch.setenv("DSV3_GEMV_VARIANT", "cc")
    assert rel_err(L.fp8_gemv(x, w, s, torch.float32, split=3), ref) < 1e-6
    assert launches == ["_act_quant_kernel", "_fp8_gemv_kernel", "_splitk_reduce_kernel"]
    launches.clear()
    assert rel_err(L.fp8_gemv(x, w, s, torch.float32, fused=True), ref) < 1e-6
    assert launches[0] == "_fp8_gemv_kernel"
