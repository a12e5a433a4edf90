"""Make torch.compile's caches see our ops' Python code and their trace-time switches.

AOTAutograd caches the decomposition of a `triton_op` under the op's name plus its Triton kernels' source, not the
op body: after an upgrade that changes an op's PyTorch branch (or the fp8 block helpers), a warm cache would
replay the old computation (seen with torch 2.13). Inductor hashes the uuid of custom graph passes into every
cache key, so a no-op pass whose uuid is the hash of this package's source closes that hole. The ops also choose
paths from DSV3_* environment variables at trace time (DSV3_NORM_QUANT, DSV3_DECODE_PREP, DSV3_GEMV_VARIANT, ...),
which the traced graph does not show either: after a switch, the cache returned the other path's compiled graph
(found in review, 2026-11-23, torch 2.13). The uuid therefore also covers those variables, read at each compile.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass


def _source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _switches() -> str:
    return repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("DSV3_")))


class KernelSourcePass(CustomGraphPass):
    """Changes nothing in the graph; only keys caches by the kernels' source and the DSV3_* switches."""

    def __init__(self) -> None:
        self._source = _source_hash()

    def __call__(self, graph: torch.fx.graph.Graph) -> None:
        return None

    def uuid(self) -> str:
        return hashlib.sha256((self._source + _switches()).encode()).hexdigest()


def install() -> None:
    """Idempotent; leaves a user's own pass in place (then keying is theirs to manage)."""
    import torch._inductor.config as inductor_config

    if inductor_config.post_grad_custom_pre_pass is None:
        inductor_config.post_grad_custom_pre_pass = KernelSourcePass()
