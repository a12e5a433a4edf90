"""What torch.compile believes our Triton kernels write, against what the ops declare and what the launches change.

Inductor (and AOTInductor) reads a user Triton kernel's TTIR to decide which tensor arguments a launch writes
(torch._higher_order_ops.triton_kernel_wrap): functionalization clones each of those before the launch, and the
scheduler orders other reads and writes around it. Two ways that goes wrong, both invisible in eager runs:
- an argument the op only reads taken as written: a copy per launch in every compiled graph. Views with a storage
  offset have then failed at run time: the prefill prep kernel's first multi-token form computed its cache-row offsets
  in a helper function, the analysis took input_pos and cache_rows as written (it marks every argument of a call whose
  result addresses a store), and the compiled chunked-prefill graphs hit illegal memory accesses (2026-11-26).
- a tensor a launch changes that the analysis misses: Inductor could move a read of it across the write.

Every launch that the tiny models' eager generation makes through `wrap_triton` (FP8 and BF16 weights; prefill of
a long prompt and a short batch, decode, greedy and top-p sampling) and the loop graphs' greedy step, inside its
`dsv3` op: the analysis of that
launch (on its real arguments) must not mark any tensor sharing storage with an input the op's schema does not
declare mutated, and every storage the launch changed must hold a tensor the analysis marks. Launches with TMA
descriptors (`_launch.launch_with_descriptors`) go through torch's descriptor path and are not seen here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsv3

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _written_by_analysis(kernel, kwargs: dict) -> set[str]:
    """The kernel parameters torch's TTIR analysis takes as written (torch 2.13: identify_accessed_tensors;
    2.11: identify_mutated_tensors). It falls back to 'everything' on an exception, which this test then reports."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    if hasattr(tkw, "identify_accessed_tensors"):
        return {dep.name for dep in tkw.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes}
    return set(tkw.identify_mutated_tensors(kernel, kwargs, {}))


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

    def wrap(self, kernel):
        audit = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    names = getattr(kernel, "arg_names", None) or kernel.fn.arg_names
                    params = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
                    tensors = {k: v for k, v in params.items() if isinstance(v, torch.Tensor) and v.numel()}
                    before = {_storage(t): _storage_bytes(t) for t in tensors.values()}
                    kernel[grid](*args, **kwargs)
                    torch.cuda.synchronize()
                    op, read_only = audit.op or ("(no dsv3 op)", set())
                    rec = Launch(op, getattr(kernel, "__name__", None) or kernel.fn.__name__,
                                 _written_by_analysis(kernel, params), read_only,
                                 {k: _storage(t) for k, t in tensors.items()})
                    for t in tensors.values():
                        if not torch.equal(_storage_bytes(t), before[_storage(t)]):
                            rec.changed.add(_storage(t))
                    audit.launches.append(rec)

                return launch

        return Launcher()


def _kernel_modules():
    import dsv3.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"dsv3.kernels.{info.name}")
        if hasattr(mod, "wrap_triton"):
            yield mod


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_compiled_view_of_kernel_writes(random_checkpoint, monkeypatch, dtype):
    from dsv3.generate import SamplingParams, generate

    audit = LaunchAudit()
    for mod in _kernel_modules():
        monkeypatch.setattr(mod, "wrap_triton", audit.wrap)
    model = dsv3.load(random_checkpoint("tiny", dtype), dtype=torch.bfloat16, max_batch_size=4, max_seq_len=96,
                      device="cuda", progress=False)
    g = torch.Generator().manual_seed(5)
    long_prompt = torch.randint(2, 1000, (40,), generator=g).tolist()
    short = [torch.randint(2, 1000, (n,), generator=g).tolist() for n in (3, 7)]
    with audit:
        generate(model, [long_prompt], max_new_tokens=3)
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
    want = {"dsv3.mla_prefill_prep", "dsv3.mla_decode_prep", "dsv3.mla_absorb", "dsv3.mla_attention_out",
            "dsv3.top_p_scores", "dsv3.greedy_next_"}
    if dtype == "fp8":
        want |= {"dsv3.fp8_linear"}
    assert want <= ops, f"not run: {sorted(want - ops)}; run: {sorted(ops)}"
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
    assert not sorted(set(problems)), "\n".join(sorted(set(problems)))
