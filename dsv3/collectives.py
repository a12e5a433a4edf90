"""The tensor-parallel all-reduce of a decode step as one op: a one-shot all-reduce over NVLink when the runtime
has given it a symmetric-memory buffer, the process group's own all-reduce otherwise.

Why: a decode step of 671B at world size 8 issues 123 all-reduces of [batch, 7168] bf16 (two per layer and the
embedding's); at 14-115 KB each they are pure latency. PyTorch's symmetric-memory one-shot all-reduce
(`symm_mem.one_shot_all_reduce_copy`: copy the input into this rank's slot of a peer-mapped buffer, barrier, read
every peer's slot over NVLink and sum, barrier) is one kernel where the functional NCCL all-reduce is a copy plus
NCCL's kernel. Measured on two H200s in a CUDA graph (scripts/allreduce_latency.py, docs/BENCHMARKS.md, thirteenth
session), [1, 7168]: 7.3 us back to back vs NCCL's 19.4; in a dependent chain with one elementwise kernel per link,
8.3 vs 10.5 us per link. Plain peer loads, no NVLink multicast.

`dsv3::one_shot_all_reduce(buffer, x, group_name)` returns the sum of `x` over the group:
- `buffer` was made by `symmetric_buffer` for this group and holds `x` (CUDA, same dtype): one-shot all-reduce
  through it. The buffer is scratch memory: its contents before and after the call mean nothing to the graph, so
  the op does not declare it mutated (as `symm_mem.one_shot_all_reduce_copy` does not), which keeps the compilers
  from copying it (a copy would not be symmetric memory);
- otherwise (a CPU run over gloo, the stand-in group of one-rank timing, a buffer the runtime did not replace):
  the functional all-reduce through whatever backend the group has. Same result, NCCL's latency.

The compiled graphs call this op where the plan asks for it (dsv3.runtime.parallel), with a module buffer as
`buffer`; the runtime swaps that buffer for `symmetric_buffer(...)` on every rank before binding the graphs.
Only CUDA artifacts do (`dsv3c compile --all-reduce one-shot` refuses --device cpu): CPU AOTInductor packages
calling the op, whose gloo reduction then runs from inside the package's proxy-executor call, hung in 3 of 4
2-rank runs (thirteenth session; a CUDA package only reaches that fallback under the stand-in group, whose
collectives return at once). Eager CPU models may use it (tests/test_parallel.py).
"""

from __future__ import annotations

import torch

# data_ptr -> (group name, the buffer) for every buffer symmetric_buffer() allocated in this process: how the op
# tells a symmetric buffer from an ordinary one (PyTorch's rendezvous does not refuse ordinary CUDA tensors). The
# buffer is held so its address is never reused by an ordinary allocation (a few hundred KB per process).
_SYMMETRIC: dict[int, tuple[str, torch.Tensor]] = {}


def symmetric_buffer(numel: int, dtype: torch.dtype, device: torch.device | str, group_name: str) -> torch.Tensor:
    """A [numel] buffer in symmetric memory, mapped into every rank of `group_name`. Collective: every rank of the
    group calls it with the same numel and dtype."""
    import torch.distributed._symmetric_memory as symm_mem

    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required by torch 2.11's rendezvous by group name
        symm_mem.enable_symm_mem_for_group(group_name)
    buf = symm_mem.empty(numel, dtype=dtype, device=device)
    symm_mem.rendezvous(buf, group_name)
    _SYMMETRIC[buf.data_ptr()] = (group_name, buf)
    return buf


def is_symmetric(buffer: torch.Tensor, group_name: str) -> bool:
    entry = _SYMMETRIC.get(buffer.data_ptr())
    return entry is not None and entry[0] == group_name


@torch.library.custom_op("dsv3::one_shot_all_reduce", mutates_args=())
def one_shot_all_reduce(buffer: torch.Tensor, x: torch.Tensor, group_name: str) -> torch.Tensor:
    n = x.numel()
    if (x.is_cuda and x.dtype == buffer.dtype and n <= buffer.numel() and is_symmetric(buffer, group_name)):
        return torch.ops.symm_mem.one_shot_all_reduce_copy(buffer[:n].view(x.shape), x.contiguous(), "sum",
                                                           group_name)
    # the functional all-reduce, as the graphs' other collectives: mixing it with dist.all_reduce on one gloo group
    # hung a 2-rank CPU run (a prefill after decode steps)
    import torch.distributed._functional_collectives as fc

    return fc.wait_tensor(fc.all_reduce(x, "sum", group_name))


@one_shot_all_reduce.register_fake
def _(buffer: torch.Tensor, x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)
