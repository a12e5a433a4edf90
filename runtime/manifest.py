"""`manifest.json` of an artifact directory: what was built, for which host, and a sha256 of every file.

The compiler writes it last (so a directory with a valid manifest is complete); the runtime reads it first and
refuses a host or a file that does not match, saying what differs and how to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

# 2: rank layout with stacked shared experts and fused qkv_a_proj (weight names and shapes); 3: + gate_up_proj;
# 4: + first-chunk graphs of static shape (a prefill graph with `static_shape`, which a format-3 runtime would take
# for the dynamic one)
FORMAT_VERSION = 4
MANIFEST = "manifest.json"


class ArtifactError(Exception):
    """The artifact directory is incomplete, tampered with, or built for another host."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def host_info(device: str) -> dict[str, Any]:
    """The build (or run) environment that a .pt2 package is tied to."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # the lean runtime needs no Triton
        info["triton"] = None
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["compute_capability"] = list(torch.cuda.get_device_capability(idx))
    return info


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(directory))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=files)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(directory / MANIFEST)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist; build it with `dsv3c compile`")
    if not path.exists():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not a complete artifact directory (an interrupted "
                            "compile leaves none); rebuild it with `dsv3c compile`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rebuild the artifacts") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')}, this runtime reads "
                            f"{FORMAT_VERSION}; rebuild the artifacts with this version of dsv3c")
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists with its size and sha256; extra .pt2 files are refused too."""
    directory = Path(directory)
    problems = []
    for rel, meta in manifest["files"].items():
        p = directory / rel
        if not p.exists():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"{rel} has {p.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)")
        elif sha256_file(p) != meta["sha256"]:
            problems.append(f"{rel} does not match its sha256 in the manifest (modified after the build)")
    if problems:
        raise ArtifactError(f"artifact directory {directory} failed its integrity check:\n  - "
                            + "\n  - ".join(problems) + "\nRebuild it with `dsv3c compile`.")


def check_host(manifest: dict[str, Any], device: str, world_size: int) -> None:
    """Refuse to run packages built for another torch/CUDA build, GPU architecture or world size."""
    built, here = manifest["host"], host_info(device)
    problems = []
    if manifest["device"] != ("cuda" if device.startswith("cuda") else "cpu"):
        problems.append(f"built for device {manifest['device']}, asked to run on {device}")
    for key, what in (("torch", "torch build"), ("cuda", "CUDA version")):
        if built.get(key) != here.get(key):
            problems.append(f"{what}: built with {built.get(key)}, this host has {here.get(key)}")
    if manifest["device"] == "cuda" and device.startswith("cuda"):
        if built.get("compute_capability") != here.get("compute_capability"):
            problems.append(f"GPU: built for {built.get('gpu')} (compute capability "
                            f"{built.get('compute_capability')}), this host has {here.get('gpu')} "
                            f"({here.get('compute_capability')})")
    # The C++ wrapper is compiled for the build host's CPU (-march=native): a lesser CPU would crash in it.
    isa_rank = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
    if built.get("machine") != here.get("machine") or isa_rank.get(built.get("cpu_capability"), 0) > isa_rank.get(
            here.get("cpu_capability"), 0):
        problems.append(f"CPU: built on {built.get('machine')}/{built.get('cpu_capability')}, this host is "
                        f"{here.get('machine')}/{here.get('cpu_capability')}")
    if manifest["world_size"] != world_size:
        problems.append(f"world size: built for {manifest['world_size']}, running with {world_size}")
    if problems:
        raise ArtifactError("these artifacts do not fit this host:\n  - " + "\n  - ".join(problems)
                            + f"\nRebuild on this host: dsv3c compile --config <config> --world-size {world_size} "
                              f"--device {'cuda' if device.startswith('cuda') else 'cpu'} --out <dir>")
