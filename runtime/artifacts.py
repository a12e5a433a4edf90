"""Loading AOTInductor packages and handing every one of them the same weight and cache tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsv3.runtime.manifest import ArtifactError


def load_package(directory: Path, graph: dict[str, Any], device: str, single_threaded: bool):
    """One .pt2 package. `single_threaded` (CUDA decode graphs): required to capture it in a CUDA graph."""
    import torch._inductor

    index = torch.device(device).index if device.startswith("cuda") else -1
    try:
        return torch._inductor.aoti_load_package(str(directory / graph["file"]),
                                                 run_single_threaded=single_threaded,
                                                 device_index=-1 if index is None else index)
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
