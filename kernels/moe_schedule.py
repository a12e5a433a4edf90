"""The grouped MoE path's tile schedule (`dsv3.routed_experts` at prefill-sized T): which (token, k) pairs each
tile of the grouped kernels computes, built on the device without a host sync.

Contract (`grouped_schedule(topk_idx, n_experts, block_t) -> (sched, n_tiles)`):
- topk_idx [T, K] integer expert ids; ids outside [0, E) are invalid (another rank's experts).
- P = T * K pairs, pair id = t * K + k. n_tiles = ceil(P / block_t) + E (static in P: no sync).
- sched int32 [3 * n_tiles + P]: per tile j, its expert (clamped to E - 1 for the unused tiles), its start and end
  into the sorted pair list (start == end: an empty tile, which the kernels skip); then the P pair ids sorted by
  expert, stably (within an expert in pair order), the invalid ones last. Expert e's pairs fill tiles of block_t
  consecutive sorted pairs, the experts' tiles one after another.

Implementations
- `grouped_schedule_reference`: torch ops (a stable radix sort of the keys, binary searches, cumsums). On the H200
  that is ~13 launches per MoE layer (the sort's histogram, scan and one-sweep kernels, their memsets, searchsorted,
  cumsum, gathers), 50-76 us per call in a CUDA graph from a short prompt's few tokens to T = 4095, each launch a
  dependent phase of its own.
- CUDA (the default; DSV3_MOE_SCHEDULE=torch keeps the reference for A/B runs): a stable counting sort in two Triton
  launches over chunks of 128-512 pairs (by pair count: SCHEDULE_LAUNCHES). `_schedule_count_kernel`: each chunk's
  sort keys (into a private buffer) and their histogram. `_schedule_scatter_kernel`: each program sums the
  histograms (the experts' starts, its chunk's offset within each expert), sorts its chunk's (expert, position)
  composites once (`tl.sort`) and places each pair at its expert's start + offset + rank (`tl.gather` of
  per-expert values, no serial loop), and writes its share of the tile table. Bitwise the reference's schedule;
  6-10 us per call on the H200 (13-14 us at every T with the 1024-pair chunks of before 2026-11-26). (Its first
  form ranked the pairs by a one-hot prefix sum over 64 pairs at a time, 16 dependent steps per chunk: 85-95 us
  per call on the H200, slower than the torch schedule's 50-76.) A static P of at most SCHEDULE_ONE_MAX_P pairs
  (the decode batches that take sparse tiles) runs `_schedule_one_kernel` instead: the whole schedule in one
  program, one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from dsv3.kernels._launch import cdiv, env_switch, exceeds, next_pow2, static_int

# A pinned launch's default fields (grouped_schedule_triton given only one of chunk / num_warps): the one launch of
# before SCHEDULE_LAUNCHES, the sweep's baseline
CHUNK = 1024
SCHEDULE_WARPS = 4
# The launch by pair count P = T * K: (most pairs, pairs per program, warps), the last row unbounded. Measured with
# scripts/bench_schedule.py --sweep (H200, 2026-11-26; 16 launches, each bitwise the reference's schedule; us per
# call, CUDA graphs): 1024 pairs at 4 warps took 13.0-14.2 us at every T, the time of its one sort of 1024
# composites; smaller chunks sort less per program and run more programs. 16B prefill (K 6): T 384 6.4 us (128 /
# 2), 1024 7.0 (128 / 2), 2048 8.2 (256 / 2), 4096 9.9 (512 / 4); the 671B-ep8 rank at T 4096 (K 8) 9.1 (512 / 4).
SCHEDULE_LAUNCHES = ((8192, 128, 2), (16384, 256, 2), (None, 512, 4))
# Decode batches (a static P of at most this many pairs: 16B batch 32 / 64 steps have 256 / 512): the whole schedule
# in one program (`_schedule_one_kernel`) instead of the count and scatter launches; 1 warp up to
# SCHEDULE_ONE_SMALL_P pairs, else 8. scripts/bench_schedule.py --decode on the H200 (2026-11-26; 66 slots, 32-pair
# tiles, CUDA graphs, best of 3 interleaved rounds, every form bitwise the reference's), us per call, two launches ->
# one program at 1 / 2 / 4 / 8 warps: P 64 6.86 -> 4.10 / 4.61 / 4.58 / 4.38, P 128 6.94 -> 4.52 / 4.92 / 4.92 /
# 4.75, P 256 6.02 -> 5.58 / 5.98 / 5.23 / 5.13, P 512 5.86 -> 7.80 / 8.63 / 6.43 / 5.66.
SCHEDULE_ONE_MAX_P = 512
SCHEDULE_ONE_SMALL_P = 128
COUNT_ROWS = 16  # chunk histograms summed per step
TILE_ROWS = 64  # tiles per step of the tile table


def schedule_one_warps(p: int) -> int:
    """Warps of the one-program schedule for P pairs (see SCHEDULE_ONE_MAX_P)."""
    return 1 if p <= SCHEDULE_ONE_SMALL_P else 8


def schedule_impl() -> str:
    """DSV3_MOE_SCHEDULE=triton (default on CUDA) / torch: how the grouped path builds its tile schedule (read at
    trace time)."""
    return env_switch("DSV3_MOE_SCHEDULE", "triton", ("triton", "torch"))


def n_schedule_tiles(p, e: int, block_t: int):
    """ceil(P / block_t) + E: every expert's partial last tile fits (P may be a SymInt: no sync)."""
    return cdiv(p, block_t) + e if isinstance(p, int) else (p + block_t - 1) // block_t + e


def grouped_schedule_reference(topk_idx: torch.Tensor, n_experts: int, block_t: int) -> tuple[torch.Tensor, int]:
    flat = topk_idx.reshape(-1)
    p = flat.shape[0]
    e = n_experts
    valid = (flat >= 0) & (flat < e)
    key = torch.where(valid, flat, torch.full_like(flat, e))
    # the narrowest key that holds 0..E: a radix sort makes one pass per key byte (int64 ids: eight)
    kdt = torch.uint8 if e < 256 else torch.int16
    sorted_key, order = torch.sort(key.to(kdt), stable=True)
    # expert i's pairs are sorted_key[bounds[i]:bounds[i + 1]]: E + 1 binary searches over the sorted keys instead of
    # a scatter-add of T*K ones into E + 1 counters (atomics on a few addresses: 7 us per layer at T = 4095, H200)
    bounds = torch.searchsorted(sorted_key, torch.arange(e + 1, device=flat.device, dtype=kdt))
    seg_start = bounds[:-1]
    counts = bounds[1:] - seg_start
    tiles = (counts + block_t - 1) // block_t
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = n_schedule_tiles(p, e, block_t)
    j = torch.arange(n_tiles, device=flat.device)
    te = torch.searchsorted(tile_end, j, right=True)
    ok = te < e
    tec = te.clamp(max=e - 1)
    start = seg_start[tec] + (j - (tile_end[tec] - tiles[tec])) * block_t
    end = torch.where(ok, torch.minimum(start + block_t, seg_start[tec] + counts[tec]), start)
    sched = torch.cat([tec, start, end, order]).to(torch.int32)
    return sched, n_tiles


@triton.jit
def _chunk_keys(idx_ptr, offs, P, E, E_PAD: tl.constexpr):
    """Sort keys of pairs `offs`: the expert id, E for an invalid id, E_PAD - 1 (a bin nobody reads) past P."""
    ids = tl.load(idx_ptr + offs, mask=offs < P, other=0)
    key = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    return tl.where(offs < P, key, E_PAD - 1)


@triton.jit
def _schedule_count_kernel(idx_ptr, keys_ptr, counts_ptr, P, E, CHUNK_: tl.constexpr, E_PAD: tl.constexpr):
    c = tl.program_id(0)
    offs = c * CHUNK_ + tl.arange(0, CHUNK_)
    key = _chunk_keys(idx_ptr, offs, P, E, E_PAD)
    tl.store(keys_ptr + offs, key)
    tl.store(counts_ptr + c * E_PAD + tl.arange(0, E_PAD), tl.histogram(key, E_PAD))


@triton.jit
def _schedule_scatter_kernel(keys_ptr, counts_ptr, sched_ptr, P, E, n_chunks, n_tiles,
                             CHUNK_: tl.constexpr, E_PAD: tl.constexpr, COUNT_ROWS_: tl.constexpr,
                             TILE_ROWS_: tl.constexpr, BLOCK_T: tl.constexpr):
    c = tl.program_id(0)
    lanes = tl.arange(0, E_PAD)
    # every chunk's histogram: the experts' totals, and the pairs of each expert in the chunks before this one
    total = tl.zeros((E_PAD,), dtype=tl.int32)
    before = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, n_chunks, COUNT_ROWS_):
        rows = c0 + tl.arange(0, COUNT_ROWS_)
        h = tl.load(counts_ptr + rows[:, None] * E_PAD + lanes[None, :], mask=rows[:, None] < n_chunks, other=0)
        total += tl.sum(h, axis=0)
        before += tl.sum(tl.where(rows[:, None] < c, h, 0), axis=0)
    total = tl.where(lanes <= E, total, 0)  # bins 0..E (E: invalid ids, sorted last); the padding bin counts nothing
    seg_start = tl.cumsum(total, axis=0) - total
    # this chunk's pairs sorted by (expert, position) in one sort of composites: the i-th of them is the
    # (i - first[e])-th pair of its expert e in this chunk, and goes to seg_start[e] + before[e] + that rank
    lane = tl.arange(0, CHUNK_)
    key = tl.load(keys_ptr + c * CHUNK_ + lane)
    hist = tl.histogram(key, E_PAD)
    first = tl.cumsum(hist, axis=0) - hist
    ranked = tl.sort(key * CHUNK_ + lane)
    skey = ranked // CHUNK_
    pair = c * CHUNK_ + ranked % CHUNK_
    pos = tl.gather(seg_start + before - first, skey, 0) + lane
    tl.store(sched_ptr + 3 * n_tiles + pos, pair, mask=pair < P)
    # the tile table, TILE_ROWS tiles at a time, shared out among the programs
    _tile_table(sched_ptr, total, seg_start, lanes, E, n_tiles, c * TILE_ROWS_, n_chunks * TILE_ROWS_, TILE_ROWS_,
                BLOCK_T)


@triton.jit
def _tile_table(sched_ptr, total, seg_start, lanes, E, n_tiles, j_first, j_step, TILE_ROWS_: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """Tiles j_first, j_first + j_step, ... (TILE_ROWS_ at a time) of the table: expert, start, end, from the experts'
    pair counts `total` and their starts `seg_start` in the sorted pair list ([E_PAD] over `lanes`)."""
    tiles = tl.where(lanes < E, (total + BLOCK_T - 1) // BLOCK_T, 0)
    tile_end = tl.cumsum(tiles, axis=0)
    last = tl.where(lanes < E, tile_end, 2147483647)  # searchsorted(tile_end, j, right=True) over experts 0..E-1
    first_tile = tile_end - tiles
    for j0 in range(j_first, n_tiles, j_step):
        j = j0 + tl.arange(0, TILE_ROWS_)
        te = tl.sum((last[None, :] <= j[:, None]).to(tl.int32), axis=1)
        tec = tl.minimum(te, E - 1)
        seg = tl.gather(seg_start, tec, 0)
        start = seg + (j - tl.gather(first_tile, tec, 0)) * BLOCK_T
        end = tl.where(te < E, tl.minimum(start + BLOCK_T, seg + tl.gather(total, tec, 0)), start)
        in_table = j < n_tiles
        tl.store(sched_ptr + j, tec, mask=in_table)
        tl.store(sched_ptr + n_tiles + j, start, mask=in_table)
        tl.store(sched_ptr + 2 * n_tiles + j, end, mask=in_table)


@triton.jit
def _schedule_one_kernel(idx_ptr, sched_ptr, P, E, n_tiles, CHUNK_: tl.constexpr, E_PAD: tl.constexpr,
                         TILE_ROWS_: tl.constexpr, BLOCK_T: tl.constexpr):
    """The whole schedule of P <= CHUNK_ pairs in one program (decode batches' few pairs): one sort of the (expert,
    position) composites puts every pair at its place, so the i-th sorted one is stored at i: no store address
    derives from the loaded ids (torch's analysis would take the ids as written, see grouped_schedule_triton) and
    no key buffer or histogram launch is needed. Padding lanes sort last (key E_PAD - 1 > E)."""
    lane = tl.arange(0, CHUNK_)
    key = _chunk_keys(idx_ptr, lane, P, E, E_PAD)
    lanes = tl.arange(0, E_PAD)
    total = tl.where(lanes <= E, tl.histogram(key, E_PAD), 0)
    seg_start = tl.cumsum(total, axis=0) - total
    ranked = tl.sort(key * CHUNK_ + lane)
    tl.store(sched_ptr + 3 * n_tiles + lane, ranked % CHUNK_, mask=lane < P)
    _tile_table(sched_ptr, total, seg_start, lanes, E, n_tiles, 0, TILE_ROWS_, TILE_ROWS_, BLOCK_T)


def schedule_launches(p) -> list[tuple[int, int, object]]:
    """The schedule's launches for P pairs: [(pairs per program, warps, grid factor)] from SCHEDULE_LAUNCHES. A
    static P takes one launch; a dynamic P (a SymInt: the prefill packages) every row's, each with factor 1 only
    where P falls in its range (`exceeds`: no launch for a zero grid, no guard on P)."""
    n = static_int(p)
    if n is not None:
        return [next((chunk, warps, 1) for bound, chunk, warps in SCHEDULE_LAUNCHES if bound is None or n <= bound)]
    launches, below = [], 1  # below: 1 where P is past the previous row's bound (every P for the first row)
    for bound, chunk, warps in SCHEDULE_LAUNCHES:
        past = 0 if bound is None else exceeds(p, bound)
        launches.append((chunk, warps, below - past))
        below = past
    return launches


def grouped_schedule_triton(topk_idx: torch.Tensor, n_experts: int, block_t: int, chunk: int | None = None,
                            num_warps: int | None = None, one: bool | None = None) -> tuple[torch.Tensor, int]:
    """`chunk` (pairs per program, a power of two) and `num_warps` pin one launch (with only one of them given,
    the other is CHUNK's / SCHEDULE_WARPS); by default the launch by pair count (`schedule_launches`), or for a
    static P <= SCHEDULE_ONE_MAX_P the one-program kernel. `one` pins that choice (True: P must be static and fit
    `chunk`, default next_pow2(P))."""
    flat = topk_idx.reshape(-1)
    p = flat.shape[0]
    e = n_experts
    e_pad = next_pow2(e + 2)  # bins 0..E and the padding bin E_PAD - 1
    n_tiles = n_schedule_tiles(p, e, block_t)
    sched = torch.empty((3 * n_tiles + p,), dtype=torch.int32, device=flat.device)
    p_static = static_int(p)
    if one is None:
        one = chunk is None and num_warps is None and p_static is not None and p_static <= SCHEDULE_ONE_MAX_P
    if one:
        chunk_ = chunk or max(16, next_pow2(p_static or 1))
        if p_static is None or p_static > chunk_:
            raise ValueError(f"the one-program schedule needs a static P <= chunk ({p} pairs, chunk {chunk_})")
        wrap_triton(_schedule_one_kernel)[(1,)](flat, sched, p, e, n_tiles, CHUNK_=chunk_, E_PAD=e_pad,
                                                 TILE_ROWS_=TILE_ROWS, BLOCK_T=block_t,
                                                 num_warps=num_warps or schedule_one_warps(p_static))
        return sched, n_tiles
    if chunk is None and num_warps is None:
        launches = schedule_launches(p)
    else:
        launches = [(chunk or CHUNK, num_warps or SCHEDULE_WARPS, 1)]
    for chunk_, warps, factor in launches:
        n_chunks = (p + chunk_ - 1) // chunk_
        # the keys go to a private buffer for the scatter: its store addresses derive from the values it loads, and
        # torch's wrap_triton analysis takes a kernel to write every tensor its store addresses derive from: reading
        # the ids there would make Inductor copy them (the caller reads them again), and on torch 2.11 cloning the
        # ids' flat view trips an assertion in Inductor's post-grad pass (pytorch#181735)
        keys = torch.empty((n_chunks * chunk_,), dtype=torch.int32, device=flat.device)
        counts = torch.empty((n_chunks, e_pad), dtype=torch.int32, device=flat.device)
        wrap_triton(_schedule_count_kernel)[(n_chunks * factor,)](flat, keys, counts, p, e, CHUNK_=chunk_,
                                                                  E_PAD=e_pad, num_warps=warps)
        wrap_triton(_schedule_scatter_kernel)[(n_chunks * factor,)](
            keys, counts, sched, p, e, n_chunks, n_tiles, CHUNK_=chunk_, E_PAD=e_pad, COUNT_ROWS_=COUNT_ROWS,
            TILE_ROWS_=TILE_ROWS, BLOCK_T=block_t, num_warps=warps,
        )
    return sched, n_tiles


def grouped_schedule(topk_idx: torch.Tensor, n_experts: int, block_t: int) -> tuple[torch.Tensor, int]:
    """See the module docstring. CPU, or DSV3_MOE_SCHEDULE=torch: the reference; CUDA: the Triton launches."""
    if topk_idx.device.type == "cpu" or schedule_impl() == "torch":
        return grouped_schedule_reference(topk_idx, n_experts, block_t)
    return grouped_schedule_triton(topk_idx, n_experts, block_t)


__all__ = ["grouped_schedule", "grouped_schedule_reference", "grouped_schedule_triton", "n_schedule_tiles",
           "schedule_launches"]
