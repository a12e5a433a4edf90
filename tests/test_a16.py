"""bf16 batch-1 activations (W8A16 at one-token steps): `dsv3.fp8_linear_a16`, the experts' `quant_act=False`,
`Transformer.set_batch1_activations_`, `dsv3c compile --batch1-activations`.

CPU (part of `make test`):
- the kernels run by the Triton interpreter against float64 (`tests/interpret_a16.py`, in a subprocess);
- the model: with bf16 batch-1 activations a batch-1 sequence (its one-token prompt step and its decode steps)
  computes what the same model with the FP8 weights dequantized to float32 computes (the plain F.linear /
  dense-experts path; that path is checked against transformers in tests/test_parity_hf.py), while the default
  W8A8 model sits an activation-quantization error away; steps of more than one token are unchanged;
- the choice reaches every FP8 layer (also the fused ones the layout builds), the manifest and `inspect`, and a
  bad value fails with the choices named.

GPU (`pytest -m gpu tests/test_a16.py`, on the device): the op at the 16B and 671B-tp8 decode shapes against
float64 with poisoned allocator memory, under `torch.compile(fullgraph=True)` and in an AOTInductor package; the
experts at both models' one-token shapes against the float64 dequantized experts.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import dsv3
from dsv3.config import resolve_config
from dsv3.init_random import write_random_checkpoint
from dsv3.kernels import fp8_linear as L
from dsv3.kernels import routed_experts as RE
from dsv3.kernels.fp8_blocks import FP8_DTYPE, dequantize_weight, quantize_weight
from dsv3.model import Linear, RoutedExperts, Transformer
from dsv3.runtime.parallel import ParallelPlan, apply_parallel
from kernel_checks import cuda, interpreter_failure, poison_allocator, rel_err, run_interpreted


def test_a16_kernels_interpreted():
    res = run_interpreted("interpret_a16.py")
    assert res.returncode == 0, interpreter_failure(res)


# ---------------------------------------------------------------------------------------------------------------
# The model (CPU)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    return write_random_checkpoint(resolve_config("tiny"), tmp_path_factory.mktemp("a16") / "tiny", dtype="fp8",
                                   seed=21, progress=False)


def _dequantized_twin(model: Transformer) -> Transformer:
    """The same model with every FP8 weight dequantized (float32, plain layers: no activation quantization)."""
    twin = Transformer(model.cfg.replace(quantization_config=None), dtype=model.dtype,
                       max_batch_size=model.max_batch_size, max_seq_len=model.max_seq_len)
    state = model.state_dict()
    dense = {}
    for name, t in twin.state_dict().items():
        src = state[name]
        dense[name] = dequantize_weight(src, state[name + "_scale_inv"], t.dtype) if src.dtype == FP8_DTYPE else src
    twin.load_state_dict(dense, strict=False)
    return twin


def _sequence(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Batch 1, one token per call: the prompt's first token, then decode steps (every call a one-token step)."""
    model.reset_caches()
    out = []
    with torch.no_grad():
        for pos in range(tokens.shape[1]):
            out.append(model(tokens[:, pos: pos + 1], torch.tensor([pos]), last_only=True))
    return out


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_batch1_bf16_activations_compute_the_dequantized_model(fp8_ckpt):
    model = dsv3.load(fp8_ckpt, dtype=torch.float32, max_batch_size=2, max_seq_len=32, progress=False)
    twin = _dequantized_twin(model)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    want = _sequence(twin, tokens)
    w8a8 = _sequence(model, tokens)
    model.set_batch1_activations_("bf16")
    w8a16 = _sequence(model, tokens)
    for step, (a, q, ref) in enumerate(zip(w8a16, w8a8, want)):
        assert _err(a, ref) < 1e-5, f"step {step}: W8A16 {_err(a, ref):.2e} from the dequantized model"
        # the default quantizes every activation: at least an e4m3 rounding error away from it (a real difference;
        # more where the quantization flips a near-tie of the router, 15% at one step of this tiny random model)
        assert _err(q, ref) > 1e-3, f"step {step}: W8A8 {_err(q, ref):.2e}"


def test_steps_of_more_tokens_stay_w8a8(fp8_ckpt):
    """Only one-token steps change: a batch-2 decode step and a 5-token prefill give the same logits either way."""
    model = dsv3.load(fp8_ckpt, dtype=torch.float32, max_batch_size=2, max_seq_len=32, progress=False)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))

    def run():
        model.reset_caches()
        with torch.no_grad():
            pre = model(tokens[:, :5], torch.arange(5), last_only=True)
            return pre, model(tokens[:, 5:], torch.full((2, 1), 5), last_only=True)

    before = run()
    model.set_batch1_activations_("bf16")
    after = run()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_choice_reaches_every_fp8_layer_and_the_manifest():
    cfg = resolve_config("tiny").replace(num_hidden_layers=2)
    from dsv3.config import FP8Quantization

    cfg = cfg.replace(quantization_config=FP8Quantization())
    plan = ParallelPlan(0, 1).for_artifacts({"all_reduce": "none", "batch1_activations": "bf16"})
    assert plan.batch1_activations == "bf16"
    assert ParallelPlan(0, 1).for_artifacts({}).batch1_activations == "fp8"  # artifacts from before the option
    model = apply_parallel(Transformer(cfg, device="meta"), plan)
    fp8_layers = [m for m in model.modules() if isinstance(m, (Linear, RoutedExperts))
                  and getattr(m, "weight_scale_inv", getattr(m, "down_proj_scale_inv", None)) is not None]
    names = {n for n, m in model.named_modules() if m in fp8_layers}
    assert any("gate_up_proj" in n for n in names) and any("experts" in n for n in names)  # built by the layout
    assert all(m.one_token_a16 for m in fp8_layers) and model.batch1_activations == "bf16"
    assert not model.lm_head.one_token_a16 or model.lm_head.weight_scale_inv is None
    model.set_batch1_activations_("fp8")
    assert not any(m.one_token_a16 for m in fp8_layers)
    with pytest.raises(ValueError, match="fp8, bf16"):
        model.set_batch1_activations_("int8")


def test_compile_option_checked_and_recorded(monkeypatch, tmp_path):
    from dsv3.cli import main
    from dsv3.compiler import build as B
    from dsv3.config import ConfigError

    cfg = resolve_config("tiny")
    opts = B.CompileOptions(cfg, device="cpu", batch1_activations="bf16")
    assert opts.plan().batch1_activations == "bf16"
    with pytest.raises(ConfigError, match="--batch1-activations 'int8'"):
        B.CompileOptions(cfg, device="cpu", batch1_activations="int8").check()
    res = CliRunner().invoke(main, ["compile", "--help"])
    assert res.exit_code == 0 and "--batch1-activations" in res.output and "W8A16" in res.output
    res = CliRunner().invoke(main, ["compile", "--config", "tiny", "--out", str(tmp_path / "a"), "--device", "cpu",
                                    "--batch1-activations", "int8"])
    assert res.exit_code != 0 and "fp8" in res.output and "bf16" in res.output
    # the manifest field, and how inspect shows it (a manifest written by hand: building is tests/test_artifacts')
    seen = {}
    monkeypatch.setattr(B, "write_manifest", lambda d, m: seen.update(m) or (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr(B, "build_graph", lambda *a, **k: {})
    with pytest.raises(RuntimeError, match="stop"):
        B.compile_artifacts(B.CompileOptions(cfg.replace(num_hidden_layers=1), device="cpu", batch_sizes=(1,),
                                             max_batch_size=1, max_seq_len=16, prefill_chunk=8, verify=False, jobs=1,
                                             batch1_activations="bf16"), tmp_path / "b", echo=lambda s: None)
    assert seen["batch1_activations"] == "bf16"
    assert not (tmp_path / "b").exists()  # nothing half-written


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

# 16B: qkv_a, o_proj, dense gate/up, dense down; 671B at TP 8: qkv_a, q_b, o_proj, shared gate/up, shared down,
# dense gate/up, dense down
A16_SHAPES = [(3648, 2048), (2048, 2048), (10944, 2048), (2048, 10944), (2112, 7168), (3072, 1536), (7168, 2048),
              (512, 7168), (7168, 256), (4608, 7168), (7168, 2304)]


def _ref64(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x.double() @ dequantize_weight(w, s).double().t()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n,k", A16_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_fp8_linear_a16_gpu(n, k, m):
    """Fresh inputs, poisoned memory; bf16 output against float64 (40 tokens: the dequantized-GEMM branch)."""
    w, s = quantize_weight(torch.randn(n, k, device="cuda") * 0.05)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    poison_allocator()
    y = torch.ops.dsv3.fp8_linear_a16(x, w, s)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert rel_err(y, _ref64(x, w, s)) < 4e-3  # bf16 output rounding (2^-9) is the error


class _A16(torch.nn.Module):
    def forward(self, x, w, s):
        return torch.ops.dsv3.fp8_linear_a16(x, w, s)


@pytest.mark.gpu
@cuda
def test_fp8_linear_a16_compiled_and_packaged_gpu(tmp_path):
    torch._dynamo.reset()
    w, s = quantize_weight(torch.randn(2112, 7168, device="cuda") * 0.05)
    x = torch.randn(1, 7168, device="cuda", dtype=torch.bfloat16)
    eager = _A16()(x, w, s)
    compiled = torch.compile(_A16(), fullgraph=True)
    assert rel_err(compiled(x, w, s), eager) < 1e-6
    ep = torch.export.export(_A16(), (x, w, s))
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "a16.pt2")))
    fresh = torch.randn(1, 7168, device="cuda", dtype=torch.bfloat16)
    assert rel_err(runner(fresh, w, s), _ref64(fresh, w, s)) < 4e-3


# (routed experts + stacked shared slots, I, D, top-k + shared): 16B at world size 1, 671B's rank at world size 8
A16_MOE = [(64, 2, 1408, 2048, 6), (32, 0, 2048, 7168, 8)]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("e_routed,n_shared,i,d,k", A16_MOE)
def test_routed_experts_a16_gpu(e_routed, n_shared, i, d, k):
    e = e_routed + n_shared
    g = torch.Generator(device="cuda").manual_seed(e + i)
    ws = [quantize_weight(torch.randn(e, *shape, device="cuda", generator=g) * 0.05)
          for shape in ((i, d), (i, d), (d, i))]
    w = [ws[0][0], ws[1][0], ws[2][0], ws[0][1], ws[1][1], ws[2][1]]
    x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16, generator=g)
    # 671B's rank: most of the top-8 ids belong to other ranks (outside [0, 32)); 16B: six routed + the shared slots
    ids = (torch.randperm(e_routed, device="cuda", generator=g)[:k] if n_shared else
           torch.tensor([3, -1, 40, 17, 255, -5, 31, 100], device="cuda"))
    idx = torch.cat([ids, torch.arange(e_routed, e, device="cuda")]).view(1, -1)
    wt = torch.rand(idx.shape, device="cuda", generator=g)
    poison_allocator()
    out = torch.ops.dsv3.routed_experts(x, idx, wt, *w, None, None, False)
    pairs = torch.ops.dsv3.routed_experts_pairs(x, idx, *w, None, None, False)
    want = torch.zeros(1, d, dtype=torch.float64, device="cuda")
    x64 = x.double()
    for j, ex in enumerate(idx[0].tolist()):
        if 0 <= ex < e:
            gt, up, dn = (dequantize_weight(ws[n][0][ex], ws[n][1][ex]).double() for n in range(3))
            h = (torch.nn.functional.silu(x64 @ gt.t()) * (x64 @ up.t())).to(torch.bfloat16).double()
            want += wt[0, j].double() * (h @ dn.t())
    assert torch.isfinite(out).all() and rel_err(out, want) < 1e-2
    assert rel_err(RE.combine_pairs(pairs, idx, wt, e), out) < 1e-5
    ref = RE.routed_experts_reference(x, idx, wt, *w, quant_act=False)
    assert rel_err(out, ref) < 1e-2
    # the W8A8 op is a quantization error away (the arguments really change the arithmetic)
    assert rel_err(torch.ops.dsv3.routed_experts(x, idx, wt, *w), want) > 2 * rel_err(out, want)


def test_a16_moe_configs(monkeypatch):
    """The W8A16 experts' launch fields: the measured table (nearest slot count of the same expert shape), else the
    T = 1 plan's row-parallel fields or A16_UP / A16_DOWN; DSV3_MOE_DECODE pins the plan's."""
    plan = RE.moe_decode_plan(1, 66, 1408, 2048, 132)
    assert RE.a16_moe_config(66, 1408, 2048, plan) == RE.A16_MOE_TUNED[(66, 1408, 2048)]
    assert RE.a16_moe_config(64, 1408, 2048, plan) == RE.A16_MOE_TUNED[(66, 1408, 2048)]
    assert RE.a16_moe_config(32, 2048, 7168, plan) == RE.A16_MOE_TUNED[(32, 2048, 7168)]
    other = RE.moe_decode_plan(1, 16, 640, 512, 132)  # no row: the default plan (MMA kernels) -> the fallbacks
    assert RE.a16_moe_config(16, 640, 512, other) == (*RE.A16_UP, *RE.A16_DOWN)
    x = torch.zeros(1, 2048, dtype=torch.bfloat16)
    w = [torch.zeros(66, *shape, dtype=FP8_DTYPE) for shape in ((1408, 2048), (1408, 2048), (2048, 1408))]
    s = [torch.ones(66, *shape) for shape in ((11, 16), (11, 16), (16, 11))]
    idx = torch.tensor([[0, 1, 2, 3, 4, 5, 64, 65]])
    with pytest.raises(ValueError, match="up_block_n in"):  # W8A16 takes the row-parallel kernels only
        RE.routed_experts_triton(x, idx, idx.float(), *w, *s, quant_act=False, up_block_n=64)
    monkeypatch.setenv("DSV3_MOE_DECODE", "2:4:1:8:4:1")
    pinned = RE.resolve_moe_decode(1, 66, 1408, 2048, 132, True)
    assert RE.a16_moe_config(66, 1408, 2048, pinned) == (2, 4, 8, 4)


def test_opcheck_a16_cpu():
    g = torch.Generator().manual_seed(3)
    w, s = quantize_weight(torch.randn(200, 320, generator=g))
    x = torch.randn(1, 320, generator=g)
    torch.library.opcheck(torch.ops.dsv3.fp8_linear_a16.default, (x, w, s), test_utils="test_faketensor")
    assert torch.equal(torch.ops.dsv3.fp8_linear_a16(x, w, s), L.fp8_linear_a16_reference(x, w, s))
    assert json.dumps(str(torch.ops.dsv3.routed_experts_pairs.default._schema)).count("quant_act") == 1
