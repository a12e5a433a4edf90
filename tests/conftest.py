"""Shared fixtures: random checkpoints written once per session and reused (read-only) by every test module.

Tests that damage a checkpoint must copy it first (`shutil.copytree(random_checkpoint(...), tmp_path / "ckpt")`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

# The device image's default C++ compiler wrapper builds AOTInductor .so files that crash at load
# (compile_stack.md §3; gpu_check.sh exports CXX=/usr/bin/g++). Set it before any test imports Inductor: a
# monkeypatch inside a test came too late once the compiler choice was cached (a segfault at aoti_load_package when
# the AOTI tests ran in a pytest session started without gpu_check.sh, 2026-11-23). Only on NVIDIA hosts. The
# image itself exports CXX=/opt/gcc/bin/g++ (the wrapper), so an existing value is replaced, not kept: a default
# alone left the wrapper in place and test_aoti_package_gpu segfaulted at load (H200, 2026-11-23, eleventh session).
_CXX = os.environ.get("CXX", "")
if shutil.which("nvidia-smi") and Path("/usr/bin/g++").exists() and (not _CXX or _CXX.startswith("/opt/gcc/")):
    os.environ["CXX"] = "/usr/bin/g++"


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`random_checkpoint(config_name="tiny", dtype="fp8", **kw) -> Path`: a cached `init-random` checkpoint.

    `kw` goes to `dsv3.init_random.write_random_checkpoint` (seed, num_layers, max_shard_size, ...). The same
    arguments return the same directory; treat it as read-only.
    """
    from dsv3.config import resolve_config
    from dsv3.init_random import write_random_checkpoint

    cache: dict[tuple, Path] = {}

    def make(config_name: str = "tiny", dtype: str = "fp8", **kw) -> Path:
        key = (config_name, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            parent = tmp_path_factory.mktemp(f"ckpt-{config_name}-{dtype}")
            cache[key] = write_random_checkpoint(resolve_config(config_name), parent / "ckpt", dtype=dtype,
                                                 progress=False, **kw)
        return cache[key]

    return make
