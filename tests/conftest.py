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


# The test files that take minutes on a 2-core CI machine (interpreted kernels, compiled artifacts), longest first:
# collected first, so that pytest-xdist's loadfile scheduler (which hands out files in collection order) starts them
# at once and the short files fill the end, instead of one worker finishing a long file alone (2026-11-26: the last
# ~3 of 13.6 minutes). Tests within a file keep their order.
SLOW_FILES_FIRST = (
    "test_kernels.py", "test_artifacts.py", "test_compile.py", "test_artifacts_fp8.py", "test_a16.py", "test_router.py",
    "test_norm.py", "test_gemv_variants.py", "test_attn_out.py", "test_prefill.py", "test_top_p.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
