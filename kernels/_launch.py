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
