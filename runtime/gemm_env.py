"""The process's cuBLASLt workspace: none, so that the block-scaled FP8 GEMMs take statically scheduled kernels.

torch hands cuBLASLt a workspace of CUBLASLT_WORKSPACE_SIZE KiB (1 MiB unless set), read once, at the process's
first cuBLASLt GEMM. With one, cuBLASLt picks dynamically scheduled kernels for the prefill's block-scaled FP8
GEMMs (`nvjet_..._coopA_algo2_Ablk128_Bvec128`) and zeroes their scheduler's counters with a memset before each: a
~0.8 us node with a kernel boundary on each side, 109 of them in a 4095-token prefill of the 16B model. Without a
workspace it picks the same tiles statically scheduled (`..._ssched_...`): the cuBLAS kernels' time is unchanged
(7.10-7.19 vs 7.10-7.15 ms per prefill) and the prefill 0.37-0.47 ms shorter (38.30-38.46 -> 37.89-38.09 ms plain,
37.45-37.49 -> 37.00-37.02 through the CUDA-graph bucket; H200, scripts/try_cublaslt_workspace.py, 2026-11-26).
Decode is unaffected (its GEMMs are Triton kernels).

`dsv3c` sets it for each of its processes (torchrun's ranks included) before any GEMM; a process that embeds the
runtime calls `prefer_static_gemm_schedules()` first thing, or exports CUBLASLT_WORKSPACE_SIZE=0. A value the user
exported is kept.
"""

from __future__ import annotations

import os

CUBLASLT_WORKSPACE_ENV = "CUBLASLT_WORKSPACE_SIZE"


def prefer_static_gemm_schedules() -> str:
    """CUBLASLT_WORKSPACE_SIZE=0 unless already set; returns the value in effect (from the process's first cuBLASLt
    GEMM on: torch reads it once)."""
    return os.environ.setdefault(CUBLASLT_WORKSPACE_ENV, "0")
