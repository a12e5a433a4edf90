"""Faster forms of `_kv_decompress_kernel` (dsv3.kernels.mla_prefill, the cached prefill's decompression)? GPU
experiment. Measured 2026-11-26 (H200, 8192 rows): pers_n256 56.0 us against the production kernel's 77.1 and
cuBLAS's 55.6 (pers_s4 60.7, pers_t256 61.8, pers / tma ~69, the rest slower; the pers_ws variants hung). Built into
the op as `_kv_decompress_tma_kernel` with 64-column output boxes (AOTInductor's descriptors need boxes of at most 128
bytes: docs/KERNELS.md): 1.23-1.31x the pointer kernel at 8192-32768 rows. The question, as it stood: the pointer
kernel runs at 0.74-0.76x cuBLAS on the 16B shapes (8192 rows 76 vs 56 us, 32768 rows 276 vs 207 us) and launch-config
sweeps (scripts/sweep_decompress.py) found nothing better. K is only 512, so each
128 x 128 tile re-reads a 128 x 512 cache tile and a 128 x 512 weight tile from L2 (~65 FLOP per L2 byte) for just
8 K steps: its prologue and its 32 KB output store are not hidden behind other K steps of the same program.

Variants: each a @triton.jit kernel and a launcher `(latent_cache, input_pos, w, cache_rows=None)` returning what
`kv_decompress_triton` returns ([B, T, N + R]: the decompressed rows, then each row's k_pe copied from the cache, for
the KEY_TILE_ROWS-row tiles that start before each sequence's last position + 1, read on the device; the k_pe copy is
done by the programs of the first output block, or before the tile loop in the persistent kernels):

  swz8        the production kernel on a 1-D grid in grouped order: programs that run together cover 8 row tiles x
              a few weight tiles (neighbours share weight tiles in L2) instead of one row tile x all 32 of them
  tma         TMA tensor-descriptor loads (host-side descriptors; the cache 3-D [Bc, T, C] so a tile never reads
              another sequence's rows) and a TMA store of the output tile; one program per tile as production
  tma_n256    the same, 128 x 256 tiles (the cache tile serves 256 outputs: 87 FLOP per L2 byte)
  t256        the same, 256 x 128 tiles (the weight tile serves 256 rows); a 256-row tile runs when it starts before
              the limit, so up to 128 rows past the last needed 128-row tile may be written too (the attention never
              reads them; the k_pe copy stays at 128-row tiles)
  areg        the whole 128 x 512 cache tile loaded once per program (triton keeps it in shared memory, 128 KB),
              then 8 weight blocks of 32 outputs streamed past it in a pipelined loop, one K=512 dot each: the cache
              tile is read from L2 once per 256 outputs (BLOCK_N 64 would need 272 KB of shared memory)
  pers        persistent (one program per SM), TMA loads and store, the tile loop flattened with the K loop
              (tl.range(flatten=True)) so the software pipeline loads the next tile's K steps during the current
              tile's epilogue (the TMA store of tile i drains during tile i + 1); tiles in grouped order (8 row
              tiles); pers_s4 with 4 stages
  pers_n256   the same with 128 x 256 tiles, the epilogue stored in two 128 x 128 halves
  pers_t256   the same with 256 x 128 tiles
  pers_ptr    persistent and flattened like pers, with pointer loads and stores (no descriptors)
  pers_x2     pers with 2 programs per SM and 2 stages (one program's epilogue overlaps the other's main loop)
  pers_ws     persistent with tl.range(warp_specialize=True): triton 3.6's Hopper warp specialization, which acts
              only on 4-warp kernels without a flattened loop or a TMA store of a 128-row tile (else it is a no-op or
              fails to compile); it launches 12 warps: a producer warp group issuing the TMA loads (40 registers)
              and two consumer warp groups each computing 64 rows of the tile (setmaxnreg 232), pointer stores;
              pers_ws_s5 with 5 stages, pers_ws_n256 with 128 x 256 tiles (3 stages; _s4 with 4)

Shared memory / registers for sm_90 with triton 3.6 (no spills in any): production 96 KB / 107, swz8 96 KB,
tma 96 KB / 90, tma_n256 and t256 144 KB / 154, areg 200 KB / 56, pers 128 KB / 93 (s4 160 KB), pers_n256
176 KB / 156, pers_t256 208 KB / 156, pers_ptr 128 KB / 128, pers_x2 96 KB / 93, pers_ws 112 KB (s5 176 KB),
pers_ws_n256 176 KB (s4 224 KB), the WS kernels 168 registers (consumers raised to 232).

Each variant is checked against F.linear on the rows it must compute (relative error; k_pe columns bit for bit),
then timed with the production kernel and cuBLAS (F.linear on the same rows) as CUDA-graph replays of 20 calls
(median of 5). A variant that fails to compile, launch or verify is reported and skipped.

    python3 scripts/try_decompress.py [--only pers,tma] [--json out.json]
    TRITON_INTERPRET=1 python3 scripts/try_decompress.py --cpu-check     # small fp16 shapes on the CPU
"""

from __future__ import annotations

import argparse
import functools
import os
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsv3.kernels._launch import cdiv, next_pow2, num_sms
from dsv3.kernels.bench import graph_us as bench_graph_us, save_json
from dsv3.kernels.mla_prefill import KEY_TILE_ROWS, kv_decompress_triton


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _limit_row(b, rows_ptr, pos_ptr, s_rows, s_pos_b, s_pos_s, S, HAS_ROWS: tl.constexpr):
    """(sequence b's last position + 1 (int32), its cache row (int64)) for sequence b (int64)."""
    limit = tl.load(pos_ptr + b * s_pos_b + (S - 1) * s_pos_s).to(tl.int32) + 1  # positions increase along the chunk
    if HAS_ROWS:
        row = tl.load(rows_ptr + b * s_rows).to(tl.int64)
    else:
        row = b
    return limit, row


@triton.jit
def _copy_pe(c_ptr, out_ptr, row, b, t0, T, C, N, R, s_c_b, s_c_t, s_o_b, s_o_t, BLOCK_T: tl.constexpr,
             R_PAD: tl.constexpr):
    """out[b, t, N + r] = c[row, t, C + r] for the BLOCK_T rows from t0."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, R_PAD)
    mask = (offs_t < T)[:, None] & (offs_r < R)[None, :]
    k_pe = tl.load(c_ptr + row * s_c_b + offs_t[:, None] * s_c_t + C + offs_r[None, :], mask=mask)
    tl.store(out_ptr + b * s_o_b + offs_t[:, None] * s_o_t + N + offs_r[None, :], k_pe, mask=mask)


@triton.jit
def _grouped_tile(tile, n_t, n_n, GROUP_T: tl.constexpr):
    """Tile index -> (row tile, output block): groups of GROUP_T row tiles, each group's tiles output-block-major
    (consecutive programs share a weight tile across GROUP_T row tiles)."""
    per_group = GROUP_T * n_n
    first_t = (tile // per_group) * GROUP_T
    size = tl.minimum(n_t - first_t, GROUP_T)
    pid_t = first_t + (tile % per_group) % size
    pid_n = (tile % per_group) // size
    return pid_t, pid_n


class _Args:
    """The launch arguments every kernel here shares, from the launcher's tensors."""

    def __init__(self, latent_cache, input_pos, w, cache_rows):
        self.t_cap, cr = latent_cache.shape[1:]
        self.bsz = input_pos.shape[0]
        self.n, self.c = w.shape
        self.r = cr - self.c
        self.out = torch.empty((self.bsz, self.t_cap, self.n + self.r), dtype=latent_cache.dtype,
                               device=latent_cache.device)
        self.w = w if w.stride(-1) == 1 else w.contiguous()
        rows = input_pos if cache_rows is None else cache_rows  # (not read without HAS_ROWS)
        self.common = dict(
            c_ptr=latent_cache, rows_ptr=rows, pos_ptr=input_pos, out_ptr=self.out, T=self.t_cap, C=self.c, N=self.n,
            R=self.r, S=input_pos.shape[1], s_c_b=latent_cache.stride(0), s_c_t=latent_cache.stride(1),
            s_rows=rows.stride(0), s_pos_b=input_pos.stride(0), s_pos_s=input_pos.stride(1),
            s_o_b=self.out.stride(0), s_o_t=self.out.stride(1), R_PAD=max(16, next_pow2(self.r)),
            HAS_ROWS=cache_rows is not None,
        )
        self.latent = latent_cache[..., :self.c]

    def descriptors(self, block_t, block_n, block_k, store_n=None):
        """Host-side TMA descriptors: the cache's latent [Bc, T, C], the weight [N, C], the output's first N columns
        [B, T, N] (box width store_n, default block_n)."""
        from triton.tools.tensor_descriptor import TensorDescriptor

        return dict(a_desc=TensorDescriptor.from_tensor(self.latent, [1, block_t, block_k]),
                    w_desc=TensorDescriptor.from_tensor(self.w, [block_n, block_k]),
                    o_desc=TensorDescriptor.from_tensor(self.out[..., :self.n], [1, block_t, store_n or block_n]))


# ----------------------------------------------------------------------------------------------------------------
# swz8: the production kernel in grouped order
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _swizzle_kernel(
    c_ptr, rows_ptr, pos_ptr, w_ptr, out_ptr, T, C, N, R, S, s_c_b, s_c_t, s_rows, s_pos_b, s_pos_s, s_w_n, s_o_b,
    s_o_t, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    HAS_ROWS: tl.constexpr, GROUP_T: tl.constexpr,
):
    """Grid (T / BLOCK_T * N / BLOCK_N, B)."""
    b = tl.program_id(1).to(tl.int64)
    pid_t, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.cdiv(N, BLOCK_N), GROUP_T)
    limit, row = _limit_row(b, rows_ptr, pos_ptr, s_rows, s_pos_b, s_pos_s, S, HAS_ROWS)
    t0 = pid_t * BLOCK_T
    if t0 >= limit:
        return
    if pid_n == 0:
        _copy_pe(c_ptr, out_ptr, row, b, t0, T, C, N, R, s_c_b, s_c_t, s_o_b, s_o_t, BLOCK_T, R_PAD)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < C
        a = tl.load(c_ptr + row * s_c_b + offs_t[:, None] * s_c_t + offs_k[None, :],
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * s_w_n + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)
    tl.store(out_ptr + b * s_o_b + offs_t[:, None] * s_o_t + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_mask[:, None] & n_mask[None, :])


def decompress_swizzle(latent_cache, input_pos, w, cache_rows=None, group_t=8, num_warps=8, num_stages=3):
    a = _Args(latent_cache, input_pos, w, cache_rows)
    bt, bn = KEY_TILE_ROWS, 128
    _swizzle_kernel[(cdiv(a.t_cap, bt) * cdiv(a.n, bn), a.bsz)](
        w_ptr=a.w, s_w_n=a.w.stride(0), **a.common, BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=64, GROUP_T=group_t,
        num_warps=num_warps, num_stages=num_stages,
    )
    return a.out


# ----------------------------------------------------------------------------------------------------------------
# tma / tma_n256 / t256: descriptor loads and store, one program per tile
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tma_kernel(
    a_desc, w_desc, o_desc, c_ptr, rows_ptr, pos_ptr, out_ptr, T, C, N, R, S, s_c_b, s_c_t, s_rows, s_pos_b,
    s_pos_s, s_o_b, s_o_t, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    """a_desc [Bc, T, C] box [1, BLOCK_T, BLOCK_K], w_desc [N, C] box [BLOCK_N, BLOCK_K], o_desc [B, T, N] box
    [1, BLOCK_T, BLOCK_N] (rows past T zero on load, dropped on store). Grid (N / BLOCK_N, T / BLOCK_T, B)."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2)
    limit, row = _limit_row(b.to(tl.int64), rows_ptr, pos_ptr, s_rows, s_pos_b, s_pos_s, S, HAS_ROWS)
    t0 = pid_t * BLOCK_T
    if t0 >= limit:
        return
    if pid_n == 0:
        for tp in tl.static_range(0, BLOCK_T, 128):  # whole 128-row tiles (the attention reads those)
            if t0 + tp < limit:
                _copy_pe(c_ptr, out_ptr, row, b.to(tl.int64), t0 + tp, T, C, N, R, s_c_b, s_c_t, s_o_b, s_o_t,
                         128, R_PAD)
    row32 = row.to(tl.int32)
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        a = a_desc.load([row32, t0, k0]).reshape(BLOCK_T, BLOCK_K)
        w = w_desc.load([n0, k0])
        acc = tl.dot(a, w.T, acc)
    o_desc.store([b, t0, n0], acc.to(o_desc.dtype).reshape(1, BLOCK_T, BLOCK_N))


def decompress_tma(latent_cache, input_pos, w, cache_rows=None, block_t=128, block_n=128, block_k=64, num_warps=8,
                   num_stages=3):
    a = _Args(latent_cache, input_pos, w, cache_rows)
    _tma_kernel[(cdiv(a.n, block_n), cdiv(a.t_cap, block_t), a.bsz)](
        **a.descriptors(block_t, block_n, block_k), **a.common, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return a.out


# ----------------------------------------------------------------------------------------------------------------
# pers*: persistent, the tile loop flattened with the K loop
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _persistent_kernel(
    a_desc, w_desc, o_desc, c_ptr, rows_ptr, pos_ptr, out_ptr, T, C, N, R, S, s_c_b, s_c_t, s_rows, s_pos_b,
    s_pos_s, s_o_b, s_o_t, progs, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr, HAS_ROWS: tl.constexpr, GROUP_T: tl.constexpr, FLATTEN: tl.constexpr,
    WARP_SPEC: tl.constexpr, TMA_STORE: tl.constexpr, EPI_SPLIT: tl.constexpr,
):
    """Descriptors as `_tma_kernel`'s (o_desc's box [1, BLOCK_T, BLOCK_N // 2] when EPI_SPLIT; unused without
    TMA_STORE: pointer stores). Grid (progs, B): sequence b's programs stride over its tiles that start before its
    limit (k_pe first, by 128-row tile)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    limit, row = _limit_row(b.to(tl.int64), rows_ptr, pos_ptr, s_rows, s_pos_b, s_pos_s, S, HAS_ROWS)
    for pt in range(pid, tl.minimum(tl.cdiv(limit, 128), tl.cdiv(T, 128)), progs):
        _copy_pe(c_ptr, out_ptr, row, b.to(tl.int64), pt * 128, T, C, N, R, s_c_b, s_c_t, s_o_b, s_o_t, 128, R_PAD)
    row32 = row.to(tl.int32)
    n_t = tl.minimum(tl.cdiv(limit, BLOCK_T), tl.cdiv(T, BLOCK_T))
    n_n = tl.cdiv(N, BLOCK_N)
    o_base = out_ptr + b.to(tl.int64) * s_o_b
    for tile in tl.range(pid, n_t * n_n, progs, flatten=FLATTEN, warp_specialize=WARP_SPEC):
        pid_t, pid_n = _grouped_tile(tile, n_t, n_n, GROUP_T)
        t0 = pid_t * BLOCK_T
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            a = a_desc.load([row32, t0, k0]).reshape(BLOCK_T, BLOCK_K)
            w = w_desc.load([n0, k0])
            acc = tl.dot(a, w.T, acc)
        if not TMA_STORE:
            offs_t = t0 + tl.arange(0, BLOCK_T)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            tl.store(o_base + offs_t[:, None] * s_o_t + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=(offs_t < T)[:, None] & (offs_n < N)[None, :])
        elif EPI_SPLIT:
            lo, hi = acc.reshape(BLOCK_T, 2, BLOCK_N // 2).permute(0, 2, 1).split()
            o_desc.store([b, t0, n0], lo.to(o_desc.dtype).reshape(1, BLOCK_T, BLOCK_N // 2))
            o_desc.store([b, t0, n0 + BLOCK_N // 2], hi.to(o_desc.dtype).reshape(1, BLOCK_T, BLOCK_N // 2))
        else:
            o_desc.store([b, t0, n0], acc.to(o_desc.dtype).reshape(1, BLOCK_T, BLOCK_N))


def decompress_persistent(latent_cache, input_pos, w, cache_rows=None, block_t=128, block_n=128, block_k=64,
                          group_t=8, flatten=True, warp_spec=False, tma_store=True, epi_split=False, per_sm=1,
                          num_warps=8, num_stages=3, progs=None):
    a = _Args(latent_cache, input_pos, w, cache_rows)
    progs = progs or max(1, num_sms(latent_cache.device) * per_sm // a.bsz)
    _persistent_kernel[(progs, a.bsz)](
        **a.descriptors(block_t, block_n, block_k, block_n // 2 if epi_split else None), **a.common, progs=progs,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_T=group_t, FLATTEN=flatten, WARP_SPEC=warp_spec,
        TMA_STORE=tma_store, EPI_SPLIT=epi_split, num_warps=num_warps, num_stages=num_stages,
    )
    return a.out


@triton.jit
def _persistent_ptr_kernel(
    c_ptr, rows_ptr, pos_ptr, w_ptr, out_ptr, T, C, N, R, S, s_c_b, s_c_t, s_rows, s_pos_b, s_pos_s, s_w_n, s_o_b,
    s_o_t, progs, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    HAS_ROWS: tl.constexpr, GROUP_T: tl.constexpr,
):
    """Grid (progs, B), as `_persistent_kernel` with pointer tiles."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    limit, row = _limit_row(b, rows_ptr, pos_ptr, s_rows, s_pos_b, s_pos_s, S, HAS_ROWS)
    n_t = tl.minimum(tl.cdiv(limit, BLOCK_T), tl.cdiv(T, BLOCK_T))
    for pt in range(pid, n_t, progs):
        _copy_pe(c_ptr, out_ptr, row, b, pt * BLOCK_T, T, C, N, R, s_c_b, s_c_t, s_o_b, s_o_t, BLOCK_T, R_PAD)
    n_n = tl.cdiv(N, BLOCK_N)
    c_base = c_ptr + row * s_c_b
    o_base = out_ptr + b * s_o_b
    for tile in tl.range(pid, n_t * n_n, progs, flatten=True):
        pid_t, pid_n = _grouped_tile(tile, n_t, n_n, GROUP_T)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        t_mask = offs_t < T
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < C
            a = tl.load(c_base + offs_t[:, None] * s_c_t + offs_k[None, :],
                        mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * s_w_n + offs_k[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(w), acc)
        tl.store(o_base + offs_t[:, None] * s_o_t + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & n_mask[None, :])


def decompress_persistent_ptr(latent_cache, input_pos, w, cache_rows=None, group_t=8, per_sm=1, num_warps=8,
                              num_stages=3, progs=None):
    a = _Args(latent_cache, input_pos, w, cache_rows)
    progs = progs or max(1, num_sms(latent_cache.device) * per_sm // a.bsz)
    _persistent_ptr_kernel[(progs, a.bsz)](
        w_ptr=a.w, s_w_n=a.w.stride(0), **a.common, progs=progs, BLOCK_T=KEY_TILE_ROWS, BLOCK_N=128, BLOCK_K=64,
        GROUP_T=group_t, num_warps=num_warps, num_stages=num_stages,
    )
    return a.out


# ----------------------------------------------------------------------------------------------------------------
# areg: the cache tile loaded once, several weight blocks streamed past it
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _areg_kernel(
    c_ptr, rows_ptr, pos_ptr, w_ptr, out_ptr, T, N, R, S, s_c_b, s_c_t, s_rows, s_pos_b, s_pos_s, s_w_n, s_o_b,
    s_o_t, C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    HAS_ROWS: tl.constexpr, N_PER_PROG: tl.constexpr,
):
    """Grid (N / (BLOCK_N * N_PER_PROG), T / BLOCK_T, B); C (the latent width, a power of two) whole in one dot."""
    pid_g = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    limit, row = _limit_row(b, rows_ptr, pos_ptr, s_rows, s_pos_b, s_pos_s, S, HAS_ROWS)
    t0 = pid_t * BLOCK_T
    if t0 >= limit:
        return
    if pid_g == 0:
        _copy_pe(c_ptr, out_ptr, row, b, t0, T, C, N, R, s_c_b, s_c_t, s_o_b, s_o_t, BLOCK_T, R_PAD)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, C)
    t_mask = offs_t < T
    a = tl.load(c_ptr + row * s_c_b + offs_t[:, None] * s_c_t + offs_k[None, :], mask=t_mask[:, None], other=0.0)
    for j in tl.range(0, N_PER_PROG):
        offs_n = (pid_g * N_PER_PROG + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w = tl.load(w_ptr + offs_n[:, None] * s_w_n + offs_k[None, :], mask=n_mask[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(w))
        tl.store(out_ptr + b * s_o_b + offs_t[:, None] * s_o_t + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & n_mask[None, :])


def decompress_areg(latent_cache, input_pos, w, cache_rows=None, block_n=32, n_per_prog=8, num_warps=8,
                    num_stages=2):
    a = _Args(latent_cache, input_pos, w, cache_rows)
    assert a.c & (a.c - 1) == 0, "areg: the latent width must be a power of two"
    common = dict(a.common)
    del common["C"]
    _areg_kernel[(cdiv(a.n, block_n * n_per_prog), cdiv(a.t_cap, KEY_TILE_ROWS), a.bsz)](
        w_ptr=a.w, s_w_n=a.w.stride(0), **common, C=a.c, BLOCK_T=KEY_TILE_ROWS, BLOCK_N=block_n,
        N_PER_PROG=n_per_prog, num_warps=num_warps, num_stages=num_stages,
    )
    return a.out


P = functools.partial
WS = dict(flatten=False, warp_spec=True, tma_store=False, num_warps=4)  # what triton 3.6's Hopper WS takes
VARIANTS = {
    "swz8": P(decompress_swizzle),
    "tma": P(decompress_tma),
    "tma_n256": P(decompress_tma, block_n=256),
    "t256": P(decompress_tma, block_t=256),
    "areg": P(decompress_areg),
    "pers": P(decompress_persistent),
    "pers_s4": P(decompress_persistent, num_stages=4),
    "pers_n256": P(decompress_persistent, block_n=256, epi_split=True),
    "pers_t256": P(decompress_persistent, block_t=256),
    "pers_ptr": P(decompress_persistent_ptr),
    "pers_x2": P(decompress_persistent, per_sm=2, num_stages=2),
    "pers_ws": P(decompress_persistent, **WS),
    "pers_ws_s5": P(decompress_persistent, **WS, num_stages=5),
    "pers_ws_n256": P(decompress_persistent, block_n=256, **WS),
    "pers_ws_n256_s4": P(decompress_persistent, block_n=256, **WS, num_stages=4),
}
PERSISTENT = tuple(name for name in VARIANTS if name.startswith("pers"))


def needed_rows(input_pos: torch.Tensor, t_cap: int) -> list[int]:
    """Per sequence: the rows that must be computed (whole KEY_TILE_ROWS tiles up to its last position)."""
    return [min(t_cap, cdiv(int(p) + 1, KEY_TILE_ROWS) * KEY_TILE_ROWS) for p in input_pos[:, -1].tolist()]


def rel_err(out: torch.Tensor, latent_cache: torch.Tensor, input_pos: torch.Tensor, w: torch.Tensor,
            cache_rows=None, exact: bool = False) -> float:
    """Largest relative error (Frobenius) over the sequences, on the rows each must compute, against F.linear
    (float64 when `exact`, else the inputs' dtype, as cuBLAS computes it); inf if k_pe (when out has the columns)
    is not copied bit for bit or a value is not finite."""
    n, c = w.shape
    worst = 0.0
    for b, rows in enumerate(needed_rows(input_pos, latent_cache.shape[1])):
        cache_b = latent_cache[b if cache_rows is None else int(cache_rows[b])]
        x = cache_b[:rows, :c]
        want = F.linear(x.double(), w.double()) if exact else F.linear(x, w).double()
        got = out[b, :rows, :n].double()
        if not torch.isfinite(got).all():
            return float("inf")
        if out.shape[-1] > n and not torch.equal(out[b, :rows, n:], cache_b[:rows, c:]):
            return float("inf")
        worst = max(worst, ((got - want).norm() / want.norm().clamp_min(1e-30)).item())
    return worst


# ----------------------------------------------------------------------------------------------------------------
# CPU check (Triton interpreter) and GPU benchmark
# ----------------------------------------------------------------------------------------------------------------


def cpu_check() -> None:
    """Small fp16 shapes (the interpreter's bf16 dot is unreliable): limits mid-tile, two sequences with different
    limits, a row count that is not a multiple of 128, chosen cache rows (reversed in a larger cache whose other row
    is NaN), persistent variants with 3 programs (each strides over several tiles). Then main's bench() on small
    shapes without timing (its checks and report)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
    g = torch.Generator().manual_seed(0)
    cases = [(1, 512, 128, 256, [300], False), (2, 500, 512, 256, [130, 499], False),
             (2, 384, 128, 384, [1, 255], True)]
    failed = 0
    for bsz, t_cap, c, n, lasts, chosen in cases:
        cache = torch.randn(bsz, t_cap, c + 64, generator=g).half()
        w = (torch.randn(n, c, generator=g) * c ** -0.5).half()
        pos = torch.stack([torch.arange(last - 7, last + 1) for last in lasts])
        rows = None
        if chosen:
            rows = torch.arange(bsz, 0, -1)
            whole = torch.full((bsz + 1, t_cap, c + 64), float("nan"), dtype=cache.dtype)
            whole[rows] = cache
            cache = whole
        for name, fn in [("production", kv_decompress_triton)] + list(VARIANTS.items()):
            kw = dict(progs=3) if name in PERSISTENT else {}
            out = fn(cache, pos, w, rows, **kw)
            err = rel_err(out, cache, pos, w, rows, exact=True)
            failed += not err < 2e-3
            print(f"B {bsz} T {t_cap} C {c} N {n} last {lasts} rows {rows}: {name:15s} rel err vs float64 {err:.1e}"
                  f"{'' if err < 2e-3 else '  FAIL'}")
    print("all passed" if not failed else f"{failed} FAILED")
    print("\nbench() dry run (timings are placeholders):")
    bench(torch.device("cpu"), 512, 128, 256, (256, 512), 128, list(VARIANTS), None, timer=lambda fn: (fn(), 1.0)[1])


def graph_us(fn, calls: int = 20) -> float:
    """Median microseconds per call of fn, replayed as `calls` back-to-back calls in one CUDA graph."""
    return bench_graph_us([fn] * calls)


def bench(dev: torch.device, t_cap: int, c: int, n: int, ends: tuple, window: int, names: list, json_path,
          timer=None) -> None:
    """Check and time the production kernel and `names` on a [1, t_cap, c + 64] cache and an [n, c] weight, for
    chunks of `window` positions ending at each of `ends` (timer: graph_us; a stand-in for a CPU dry run)."""
    timer = timer or graph_us
    g = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    cache = torch.randn(1, t_cap, c + 64, device=dev, generator=g).to(dtype)
    w = (torch.randn(n, c, device=dev, generator=g) * c ** -0.5).to(dtype)
    rows, dead, table = [], {}, {}
    for end in ends:
        pos = (end - window + torch.arange(window, device=dev))[None]
        flops = 2 * end * n * c
        want = F.linear(cache[0, :end, :c], w).float()
        base = timer(lambda: F.linear(cache[0, :end, :c], w))
        table.setdefault("cuBLAS", {})[end] = (base, 1.0)
        print(f"rows {end}: cuBLAS {base:.1f} us ({flops / base / 1e6:.0f} TFLOP/s)")
        for name in ["production"] + names:
            if name in dead:
                continue
            fn = kv_decompress_triton if name == "production" else VARIANTS[name]
            try:
                out = fn(cache, pos, w)
                got = out[0, :end, :n].float()
                err = ((got - want).norm() / want.norm()).item()
                if not err < 1e-2:
                    raise RuntimeError(f"wrong result: rel err {err:.2e} vs F.linear")
                if out.shape[-1] > n and not torch.equal(out[0, :end, n:], cache[0, :end, c:]):
                    raise RuntimeError("k_pe columns not copied")
                del out, got
                us = timer(lambda: fn(cache, pos, w))
            except Exception as e:  # a failed compile / launch / check: report, skip this variant from now on
                dead[name] = f"{type(e).__name__}: {e}"
                print(f"  {name:15s} FAILED ({dead[name].splitlines()[0][:90]}), skipped")
                traceback.print_exc(limit=2)
                continue
            table.setdefault(name, {})[end] = (us, base / us)
            rows.append(dict(rows=end, variant=name, us=round(us, 2), cublas_us=round(base, 2),
                             tflops=round(flops / us / 1e6, 1), ratio=round(base / us, 3), rel_err=err))
            print(f"  {name:15s} {us:8.1f} us ({flops / us / 1e6:4.0f} TFLOP/s, {base / us:.2f}x cuBLAS), "
                  f"rel err {err:.1e}")
            if json_path:
                save_json(json_path, dict(results=rows, failed=dead))
    print("\nus (x cuBLAS) per row count:")
    for name, by_end in table.items():
        print(f"  {name:15s} " + "  ".join(f"{end:6d}: {us:7.1f} ({r:.2f}x)" for end, (us, r) in by_end.items()))
    for name, why in dead.items():
        print(f"  {name:15s} FAILED: {why.splitlines()[0][:100]}")
    if json_path:
        save_json(json_path, dict(results=rows, failed=dead))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--only", help="comma-separated variant names (default: all but the warp-specialized ones, which "
                                   "hung on the H200 with triton 3.6, 2026-11-26)")
    ap.add_argument("--cpu-check", action="store_true", help="interpreter check on small shapes (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.cpu_check:
        cpu_check()
        return
    names = args.only.split(",") if args.only else [name for name in VARIANTS if not name.startswith("pers_ws")]
    unknown = [name for name in names if name not in VARIANTS]
    assert not unknown, f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}"
    assert KEY_TILE_ROWS == 128
    dev = torch.device("cuda")
    # (for kernels that want global scratch; host-side descriptors need none)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    # 16B: 16 heads x (128 + 128) outputs from the 512-wide latent, a 32768-row cache, 4096-position chunks
    bench(dev, 32768, 512, 16 * 256, (8192, 16384, 32768), 4096, names, args.json)


if __name__ == "__main__":
    main()
