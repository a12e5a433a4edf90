"""What torch.compile believes our Triton kernels write, against what the ops declare and what the launches change.

Inductor (and AOTInductor) reads a user Triton kernel's TTIR to decide which tensor arguments a launch writes
(torch._higher_order_ops.triton_kernel_wrap): functionalization clones each of those before the launch, and the
scheduler orders other reads and writes around it. Two ways that goes wrong, both invisible in eager runs:
- an argument the op only reads taken as written: a copy per launch in every compiled graph. Views with a storage
  offset have then failed at run time: the prefill prep kernel's first multi-token form computed its cache-row offsets
  in a helper function, the analysis took input_pos and cache_rows as written (it marks every argument of a call whose
  result addresses a store), and the compiled chunked-prefill graphs hit illegal memory accesses (2026-11-26).
- a tensor a launch changes that the analysis misses: Inductor could move a read of it across the write.

Every launch that the tiny models' eager generation makes (FP8 and BF16 weights, loaded as `dsv3c run` loads them;
prefill of a long prompt, a decode-sized one and a short batch, decode, greedy and top-p sampling) and the loop
graphs' greedy step, inside its `dsv3` op: the analysis of that launch (on its real arguments; parameters passed as
TMA descriptors analysed as descriptors, as Inductor sees them) must not mark any tensor sharing storage with an
input the op's schema does not declare mutated, and every storage the launch changed must hold a tensor the
analysis marks.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.kernels import _launch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _written_by_analysis(kernel, kwargs: dict, tma: dict) -> set[str]:
    """The kernel parameters torch's TTIR analysis takes as written (torch 2.13: identify_accessed_tensors;
    2.11: identify_mutated_tensors). It falls back to 'everything' on an exception, which this test then reports."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    if hasattr(tkw, "identify_accessed_tensors"):
        return {dep.name for dep in tkw.identify_accessed_tensors(kernel, kwargs, tma).read_writes.writes}
    return set(tkw.identify_mutated_tensors(kernel, kwargs, tma))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A copy of the whole storage behind t (writes through any view of it show)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()).clone()


@dataclass
class Launch:
    op: str
    kernel: str
    written: set[str]  # parameters the analysis takes as written
    read_only_inputs: set[int]  # storages of the op's inputs its schema does not declare mutated
    args: dict[str, int] = field(default_factory=dict)  # tensor parameter -> storage
    changed: set[int] = field(default_factory=set)  # storages the launch changed


class LaunchAudit(TorchDispatchMode):
    """Inside it, each `dsv3` op call is the context of the launches its body makes (`wrap` records them)."""

    def __init__(self):
        super().__init__()
        self.op = None
        self.launches: list[Launch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "dsv3":
            return func(*args, **kwargs)
        schema = func._schema
        bound = dict(zip((a.name for a in schema.arguments), args)) | kwargs
        read_only = set()
        for a in schema.arguments:
            mutated = a.alias_info is not None and a.alias_info.is_write
            values = bound.get(a.name)
            for v in values if isinstance(values, (list, tuple)) else [values]:
                if isinstance(v, torch.Tensor) and not mutated:
                    read_only.add(_storage(v))
        self.op = (str(func.overloadpacket), read_only)
        try:
            return func(*args, **kwargs)
        finally:
            self.op = None

    def record(self, kernel, launch, params: dict, descriptors: dict) -> None:
        """Run launch() (the kernel with params) and record it: what the analysis takes as written (descriptors:
        the parameters passed as TMA descriptors, with their block shapes), what changed."""
        from torch._higher_order_ops import triton_kernel_wrap as tkw

        tensors = {k: v for k, v in params.items() if isinstance(v, torch.Tensor) and v.numel()}
        before = {_storage(t): _storage_bytes(t) for t in tensors.values()}
        launch()
        torch.cuda.synchronize()
        op, read_only = self.op or ("(no dsv3 op)", set())
        tma = {name: tkw.create_tma_stable_metadata(list(block)) for name, block in descriptors.items()}
        rec = Launch(op, getattr(kernel, "__name__", None) or kernel.fn.__name__,
                     _written_by_analysis(kernel, params, tma), read_only, {k: _storage(t) for k, t in tensors.items()})
        for t in tensors.values():
            if not torch.equal(_storage_bytes(t), before[_storage(t)]):
                rec.changed.add(_storage(t))
        self.launches.append(rec)

    def wrap(self, kernel):
        """Stands in for `wrap_triton` in the kernel modules."""
        audit = self
        names = getattr(kernel, "arg_names", None) or kernel.fn.arg_names

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    params = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
                    audit.record(kernel, lambda: kernel[grid](*args, **kwargs), params, {})

                return launch

        return Launcher()

    def launch_with_descriptors(self, kernel, grid, descriptors, **kwargs):
        """Stands in for `_launch.launch_with_descriptors` in the kernel modules."""
        names = getattr(kernel, "arg_names", None) or kernel.fn.arg_names
        params = {k: v for k, v in kwargs.items() if k in names}
        self.record(kernel, lambda: _launch.launch_with_descriptors(kernel, grid, descriptors, **dict(kwargs)), params,
                    descriptors)


def _kernel_modules():
    import dsv3.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "_launch":  # defines launch_with_descriptors (the stand-in calls it)
            continue
        mod = importlib.import_module(f"dsv3.kernels.{info.name}")
        if hasattr(mod, "wrap_triton") or hasattr(mod, "launch_with_descriptors"):
            yield mod


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_compiled_view_of_kernel_writes(random_checkpoint, monkeypatch, dtype):
    from dsv3.generate import SamplingParams, generate
    from dsv3.runtime.engine import load_rank_model
    from dsv3.runtime.parallel import ParallelPlan

    audit = LaunchAudit()
    for mod in _kernel_modules():
        for name, stand_in in (("wrap_triton", audit.wrap), ("launch_with_descriptors", audit.launch_with_descriptors)):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, stand_in)
    # as `dsv3c run` loads it: the world-size-1 layout (stacked shared experts, fused projections, deferred MoE adds)
    model = load_rank_model(random_checkpoint("tiny", dtype), ParallelPlan(0, 1), dtype=torch.bfloat16, device="cuda",
                            max_batch_size=4, max_seq_len=96, progress=False)
    g = torch.Generator().manual_seed(5)
    long_prompt = torch.randint(2, 1000, (80,), generator=g).tolist()  # past DECODE_MAX_T: the prefill forms
    medium = torch.randint(2, 1000, (40,), generator=g).tolist()  # a decode-sized prefill (absorbed MLA)
    short = [torch.randint(2, 1000, (n,), generator=g).tolist() for n in (3, 7)]
    with audit:
        generate(model, [long_prompt], max_new_tokens=3)
        generate(model, [medium], max_new_tokens=2)
        generate(model, short, max_new_tokens=3, sampling=SamplingParams(temperature=0.7, top_p=0.9), seed=1)
        # the loop graphs' greedy step (its declared mutations: tokens, positions and its scratch)
        from dsv3.kernels.greedy import greedy_scratch

        logits = torch.randn(3, 1000, device="cuda")
        tokens = torch.zeros(3, 1, dtype=torch.long, device="cuda")
        positions = torch.arange(3, dtype=torch.long, device="cuda").view(3, 1) * 7
        active = torch.ones(3, 1, dtype=torch.long, device="cuda")
        torch.ops.dsv3.greedy_next_(logits, tokens, positions, active, *greedy_scratch(3, "cuda"), 20)
    assert audit.launches, "no launch went through wrap_triton"
    ops = {rec.op for rec in audit.launches}
    want = {"dsv3.mla_prefill_prep", "dsv3.mla_decode_prep", "dsv3.mla_attention_out", "dsv3.routed_experts_pairs",
            "dsv3.route", "dsv3.top_p_scores", "dsv3.greedy_next_"}
    if dtype == "fp8":  # (fp8_linear_quantized launches cuBLAS only)
        want |= {"dsv3.mla_cached_prefill_attention_o_proj", "dsv3.fp8_linear", "dsv3.fp8_linear_a16",
                 "dsv3.fp8_swiglu", "dsv3.moe_residual_norm_quant", "dsv3.add_rms_norm_quant_route",
                 "dsv3.add_rms_norm_quant_cublas"}
    else:  # (a later chunk's attention; with FP8 o_proj weights the op that also runs o_proj)
        want |= {"dsv3.mla_cached_prefill_attention"}
    for op, kernel, written in sorted({(r.op, r.kernel, tuple(sorted(r.written))) for r in audit.launches}):
        print(f"{op:36s} {kernel:36s} writes {', '.join(written)}")
    problems = []
    for rec in audit.launches:
        by_storage = {}
        for name, st in rec.args.items():
            by_storage.setdefault(st, set()).add(name)
        for name in sorted(rec.written):
            if rec.args.get(name) in rec.read_only_inputs:
                problems.append(f"{rec.op} / {rec.kernel}: {name} taken as written, an input the op only reads")
        for st in rec.changed:
            if not by_storage[st] & rec.written:
                problems.append(f"{rec.op} / {rec.kernel}: {sorted(by_storage[st])} changed, not taken as written")
    if not want <= ops:
        problems.append(f"ops not run: {sorted(want - ops)}; run: {sorted(ops)}")
    assert not problems, "\n".join(sorted(set(problems)))
