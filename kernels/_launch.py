"""Small host-side helpers shared by the Triton ops (launch planning from static shapes).

Everything here runs at trace time (eager call, `torch.compile` tracing or AOTInductor compilation), never inside a
captured graph: the decisions become constants of the compiled program.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def static_int(v) -> Optional[int]:
    """The value of a size if it is a plain int (or a SymInt with a known constant), else None (dynamic)."""
    if isinstance(v, int):
        return v
    try:
        from torch.fx.experimental.symbolic_shapes import is_concrete_int

        if is_concrete_int(v):
            return int(v)
    except Exception:  # pragma: no cover - very old/new torch
        pass
    return None


def exceeds(n, bound: int):
    """1 where n > bound, else 0, for an int or a SymInt n in [0, 2**40): a launch choice by a size that may be
    dynamic at trace time, as a factor of a grid dimension. A grid with a zero dimension is not launched (Triton's
    launcher, Inductor's Python and AOTInductor's C++ wrappers all skip it), so a graph can hold the launch of each
    choice and run only the one the size picks. Only + and // (which sympy, the guards and the generated grid code
    handle): no guard on the size, unlike a comparison."""
    return (n + (1 << 40) - bound - 1) // (1 << 40)


@functools.lru_cache(maxsize=None)
def _device_props(index: int) -> tuple[int, tuple[int, int]]:
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, (p.major, p.minor)


def num_sms(device: torch.device) -> int:
    """Multiprocessor count of `device`; 132 (an H100/H200) when it is not a CUDA device (interpreter tests)."""
    if device.type != "cuda":
        return 132
    return _device_props(device.index if device.index is not None else torch.cuda.current_device())[0]


def capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    return _device_props(device.index if device.index is not None else torch.cuda.current_device())[1]


def env_choice(name: str, default: str) -> str:
    """Trace-time override knob (benchmarks and tests use it to pin one path), e.g. DSV3_FP8_GEMM=triton."""
    return os.environ.get(name, default).strip().lower() or default


def env_switch(name: str, default: str, choices: tuple[str, ...]) -> str:
    """A trace-time switch with a fixed set of values: a typo must fail by name, not silently pick a path."""
    choice = env_choice(name, default)
    if choice not in choices:
        raise ValueError(f"{name}={choice!r}: use one of {', '.join(choices)}")
    return choice


def tma_descriptor_ok(t: torch.Tensor) -> bool:
    """Whether `t` can back a TMA tensor descriptor (`triton.tools.tensor_descriptor.TensorDescriptor`): a Hopper or
    newer GPU (or the Triton interpreter, which emulates descriptors on the CPU), the last dim contiguous, the
    base address and every other stride 16-byte aligned, all known at trace time (sizes may be dynamic: the
    descriptor is built at each launch from the tensor's sizes then), and a torch that `launch_with_descriptors`
    can launch through (`descriptor_launch_supported`): the one gate every descriptor form's caller asks."""
    if not descriptor_launch_supported():
        return False
    if t.device.type == "cuda":
        if capability(t.device) < (9, 0):
            return False
    elif os.environ.get("TRITON_INTERPRET") != "1":
        return False
    item = t.element_size()
    layout = [static_int(v) for v in (*t.stride(), t.storage_offset())]
    if t.dim() == 0 or any(v is None for v in layout):
        return False
    strides, offset = layout[:-1], layout[-1]
    return strides[-1] == 1 and all(st * item % 16 == 0 for st in strides[:-1]) and offset * item % 16 == 0


@functools.lru_cache(maxsize=None)
def descriptor_launch_supported() -> bool:
    """Whether this torch / Triton pair has what `launch_with_descriptors` uses (torch's private launch-tracing
    classes, checked on torch 2.11 and 2.13; Triton's host-side TensorDescriptor). Callers pick their pointer form
    when it does not, so another torch version costs speed, not a failed compile."""
    import importlib

    try:
        tkw = importlib.import_module("torch._higher_order_ops.triton_kernel_wrap")
        if not hasattr(importlib.import_module("triton.tools.tensor_descriptor"), "TensorDescriptor"):
            return False
    except ImportError:
        return False
    hop = getattr(tkw, "TracingTritonHOPifier", None)
    return (hop is not None and all(hasattr(hop, n) for n in ("call_triton_kernel", "call_HOP",
                                                                "store_non_graphable_args"))
            and all(hasattr(tkw, n) for n in ("create_tma_stable_metadata", "triton_kernel_wrapper_mutation",
                                              "TraceableTritonKernelWrapper")))


def launch_with_descriptors(kernel, grid, descriptors: dict[str, list[int]], **kwargs) -> None:
    """`kernel[grid](**kwargs)` where each kwarg named in `descriptors` is a tensor that the kernel receives as a
    host-side TMA tensor descriptor with that block shape (zero fill past the tensor's bounds).

    Why not `wrap_triton(kernel)[grid](desc, ...)`: under the dispatcher tracing that `triton_op` bodies go
    through (torch.compile's decomposition, torch.export, AOTInductor), torch's wrapper records the launch with an
    empty descriptor table and rejects a `TensorDescriptor` argument (torch 2.11 / 2.13: "TMA descriptor capturing
    not yet supported in non-dynamo tracing"), although the launch HOP it records takes one: it then rebuilds each
    descriptor from its tensor and block shape at run time, and Inductor emits that rebuild in its generated code.
    Here the tensor goes into the graph and the table is filled in. Eager launches (wrap_triton disabled, as in a
    `triton_op` called on real tensors; the Triton interpreter) build the descriptors directly."""
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper
    from torch.library import wrap_triton

    wrapped = wrap_triton(kernel)
    if not isinstance(wrapped, TraceableTritonKernelWrapper):
        # wrap_triton disabled, or the Triton interpreter (its kernels are not traceable)
        from triton.tools.tensor_descriptor import TensorDescriptor

        for name, block in descriptors.items():
            kwargs[name] = TensorDescriptor.from_tensor(kwargs[name], list(block))
        kernel[grid](**kwargs)
        return
    from torch._higher_order_ops.triton_kernel_wrap import (
        TracingTritonHOPifier, create_tma_stable_metadata, triton_kernel_wrapper_mutation,
    )

    table = {name: create_tma_stable_metadata(list(block)) for name, block in descriptors.items()}

    class _WithDescriptors(TracingTritonHOPifier):
        def call_HOP(self, variable, grids, combined_args, tx):  # noqa: N802 (torch's name)
            graphable, constant_idx = self.store_non_graphable_args(combined_args)
            return triton_kernel_wrapper_mutation(
                kernel_idx=variable.kernel_idx, constant_args_idx=constant_idx, grid=grids,
                tma_descriptor_metadata=table, kwargs=graphable)

    _WithDescriptors().call_triton_kernel(wrapped[grid], (), kwargs, None)
