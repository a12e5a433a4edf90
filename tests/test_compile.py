"""The model under torch.compile(fullgraph=True) on CPU: no graph breaks, eager logits, no recompiles.

Inductor runs the ops' CPU branch (plain torch) and fuses it; the same model code carries the Triton branch on CUDA.
Tolerance vs eager (float32 activations): bf16 weights rel 1e-4 (Inductor reorders reductions: ~1e-7 per op).
FP8 weights rel 1e-2: each op still matches eager to ~1e-7, but the per-token FP8 activation quantization turns such
a 1e-7 difference into a whole e4m3 step (2^-4 relative) for any element that sits on a rounding boundary, and
those steps accumulate through the layers (measured: 1.5e-3 over the tiny config's three layers).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo

import dsv3
from dsv3.config import resolve_config
from dsv3.init_random import write_random_checkpoint

BATCH, PROMPT, STEPS = 2, 10, 8


TOLERANCE = {"bf16": 1e-4, "fp8": 1e-2}


def _model(tmp_path_factory, weights: str):
    ckpt = write_random_checkpoint(resolve_config("tiny"), tmp_path_factory.mktemp("ck") / "tiny", dtype=weights,
                                   seed=5, progress=False)
    # one dense and one MoE layer: every kind of block, a third less to compile than the config's three layers
    return dsv3.load(ckpt, dtype=torch.float32, max_batch_size=BATCH, max_seq_len=32, num_layers=2, progress=False)


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    return _model(tmp_path_factory, "fp8")


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _run(model, fn_prefill, fn_decode, tokens):
    model.reset_caches()
    outs = [fn_prefill(tokens[:, :PROMPT], torch.arange(PROMPT))]
    for s in range(STEPS):
        pos = torch.full((BATCH, 1), PROMPT + s, dtype=torch.long)
        outs.append(fn_decode(tokens[:, PROMPT + s: PROMPT + s + 1], pos))
    return outs


def test_no_graph_breaks_aot_eager(fp8_model):
    """Whole prefill and decode each trace to exactly one graph with no breaks (cheap backend)."""
    torch._dynamo.reset()
    tokens = torch.randint(0, 1024, (BATCH, PROMPT))
    explain = torch._dynamo.explain(fp8_model)(tokens, torch.arange(PROMPT))
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_inductor_matches_eager_without_recompiles(tmp_path_factory, weights):
    torch._dynamo.reset()
    model = _model(tmp_path_factory, weights)
    tokens = torch.randint(0, 1024, (BATCH, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = _run(model, model, lambda t, p: model(t, p, last_only=True), tokens)
        prefill = torch.compile(model, fullgraph=True, dynamic=False)
        decode = torch.compile(lambda t, p: model(t, p, last_only=True), fullgraph=True, dynamic=False)
        with torch._dynamo.config.patch(error_on_recompile=True):
            # error_on_recompile: any guard failure across the 8 decode steps raises instead of recompiling.
            compiled = _run(model, prefill, decode, tokens)
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert _rel(a, b) < TOLERANCE[weights], f"output {i}: rel err {_rel(a, b):.2e}"


def test_gpu_slots_spread_builds_over_gpus():
    """Concurrent CUDA graph builds: one slot per rank model that fits in 90% of a GPU's free memory, interleaved
    over the GPUs (671B at world size 8: one 81 GiB model per H200, so 8 GPUs build 3 graphs at once)."""
    from dsv3.compiler.build import gpu_slots

    gib = 1 << 30
    assert gpu_slots([140 * gib], 90 * gib) == [0]
    assert gpu_slots([140 * gib] * 8, 90 * gib) == list(range(8))
    assert gpu_slots([140 * gib, 140 * gib], 20 * gib) == [0, 1] * 6
    assert gpu_slots([140 * gib, 30 * gib], 20 * gib) == [0, 1] + [0] * 5
    assert gpu_slots([10 * gib], 90 * gib) == [0]  # nothing fits: still one build (it will say why it fails)
    assert gpu_slots([], 1) == [0]


def test_worker_build_errors_reach_the_parent_picklable(monkeypatch):
    """A graph build that fails in a worker process sends back a GraphBuildError naming the graph and the cause
    (Inductor's own exceptions can hold frames: pickling them failed with "cannot pickle 'frame' object")."""
    import pickle
    import sys as _sys

    from dsv3.compiler import build as B

    def failing_build(*args, **kwargs):
        err = RuntimeError("launcher() missing 1 required positional argument: '_grid_2'")
        err.frame = _sys._getframe()  # unpicklable state, as Inductor's errors carry
        raise err

    monkeypatch.setattr(B, "build_graph", failing_build)
    with pytest.raises(B.GraphBuildError) as info:
        B._build_graph_in_worker(None, B.GraphSpec("decode_b1", "decode", 1), "/nonexistent")
    back = pickle.loads(pickle.dumps(info.value))
    assert "decode_b1" in str(back) and "_grid_2" in str(back) and "--jobs" not in str(back)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 288.00 MiB.")

    monkeypatch.setattr(B, "build_graph", out_of_memory)
    with pytest.raises(B.GraphBuildError, match=r"(?s)prefill.*out of memory.*a smaller --jobs"):
        B._build_graph_in_worker(None, B.GraphSpec("prefill", "prefill"), "/nonexistent")


def test_jobs_beyond_free_memory_warn(monkeypatch, tmp_path):
    """An explicit --jobs above what the free GPU memory holds (per process: the rank's model + 10% + 2 GiB) is kept,
    with a warning naming the estimate and the count that fits (a 32768-row 16B build with --jobs 6 on one H200 ran
    out of memory five minutes in, 2026-11-26)."""
    from dsv3.compiler import build as B

    monkeypatch.setattr(B, "_free_gpu_memory", lambda: [40 << 30])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (the options check; nothing touches a GPU)
    def stop(*args, **kwargs):  # the builds themselves are not under test
        raise SystemExit("stop")

    monkeypatch.setattr(B, "_build_in_parallel", stop)
    opts = B.CompileOptions(config=resolve_config("tiny"), device="cuda", jobs=3, verify=False)
    lines = []
    with pytest.raises(SystemExit):
        B.compile_artifacts(opts, tmp_path / "art", echo=lines.append)
    # (the tiny model is a few MB: ~2 GiB per process, 18 fit in 90% of 40 GiB; 3 fit without a warning)
    assert not any("warning" in ln for ln in lines)
    monkeypatch.setattr(B, "_per_job_bytes", lambda model: 20 << 30)
    lines.clear()
    with pytest.raises(SystemExit):
        B.compile_artifacts(opts, tmp_path / "art2", echo=lines.append)
    warning = next(ln for ln in lines if ln.startswith("warning"))
    assert "--jobs 3" in warning and "about 20 GiB" in warning and "holds 1 at once" in warning
    assert any("3 at a time" in ln for ln in lines)


@torch.library.triton_op("dsv3test::switched", mutates_args=())
def _switched(x: torch.Tensor) -> torch.Tensor:
    # stands in for an op whose path a DSV3_* variable picks at trace time (DSV3_NORM_QUANT, DSV3_DECODE_PREP)
    return x * (2.0 if os.environ.get("DSV3_TEST_SWITCH") == "a" else 3.0)


@_switched.register_fake
def _(x):
    return torch.empty_like(x)


def test_compile_caches_see_trace_time_switches(monkeypatch, tmp_path):
    """The traced graph holds only the op call, so without dsv3.kernels.cache_key's uuid covering the DSV3_*
    variables the FX / AOTAutograd caches returned the other path's compiled code after a switch."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache of its own, then warm below
    x = torch.ones(4)
    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True):
        for switch, want in (("a", 2.0), ("b", 3.0), ("a", 2.0)):
            monkeypatch.setenv("DSV3_TEST_SWITCH", switch)
            torch._dynamo.reset()
            out = torch.compile(lambda t: torch.ops.dsv3test.switched(t) + 0, fullgraph=True)(x)
            assert torch.equal(out, torch.full((4,), want)), (switch, out)
    torch._dynamo.reset()
