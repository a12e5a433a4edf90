"""Loading AOTInductor packages and handing every one of them the same weight and cache tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsv3.runtime.manifest import ArtifactError


class CompiledGraph:
    """One loaded AOTInductor package: call it with the graph's tensors, get its output tensor.

    Built on torch's C++ package loader directly. torch's Python `aoti_load_package` first probes the host's CPU
    vector ISA by test-compiling C++ programs (for an advisory warning only; pytorch/pytorch#191715), which cost
    34-45 s of the cold start on the H200 host; our manifest check (`check_host`) covers the same ground up front.
    It also keeps torch._inductor out of the runtime's imports.
    """

    def __init__(self, loader):
        from torch.utils import _pytree as pytree

        self._loader = loader
        in_spec, out_spec = loader.get_call_spec()
        self._in_spec, self._out_spec = pytree.treespec_loads(in_spec), pytree.treespec_loads(out_spec)
        self._pytree = pytree

    def __call__(self, *args: torch.Tensor):
        flat = self._pytree.tree_flatten((args, {}))[0]
        return self._pytree.tree_unflatten(self._loader.boxed_run(flat), self._out_spec)

    def get_constant_fqns(self) -> list[str]:
        return self._loader.get_constant_fqns()

    def load_constants(self, constants: dict[str, torch.Tensor], *, check_full_update: bool,
                       user_managed: bool) -> None:
        self._loader.load_constants(constants, False, check_full_update, user_managed)


def load_package(directory: Path, graph: dict[str, Any], device: str, single_threaded: bool) -> CompiledGraph:
    """One .pt2 package. `single_threaded` (CUDA): required to capture it in a CUDA graph."""
    index = torch.device(device).index if device.startswith("cuda") else -1
    path = str(directory / graph["file"])
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", single_threaded, 1,
                                                       -1 if index is None else index)
        return CompiledGraph(loader)
    except Exception as e:  # a corrupt or foreign package fails deep inside the loader
        raise ArtifactError(f"cannot load {graph['file']} from {directory}: {e}") from None


def bind_constants(package, graph_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Give the package our tensors (no copies; user_managed): weights, latent caches, rope tables."""
    fqns = list(package.get_constant_fqns())
    missing = [f for f in fqns if f not in tensors]
    if missing:
        raise ArtifactError(f"graph {graph_name} expects constants this model does not have: {missing[:5]} "
                            f"({len(missing)} in all); the artifacts were built for another config")
    package.load_constants({f: tensors[f] for f in fqns}, check_full_update=True, user_managed=True)
