"""`torch.ops.dsv3.top_p_scores`: top-p (nucleus) filtering and the exponential race of a sampled decode step, with
no sort: the sampled token is the row argmax of the scores (dsv3.generate.sample_scores, the runtime's sampled loop
graphs).

Contract
- logits [B, V] float32 (row stride free, unit column stride), may hold -inf (a top-k filter before); a row is
  never all -inf. noise [B, V] float32 Exp(1) draws, > 0 (unit column stride). temperature > 0; top_p in (0, 1].
- p = softmax(logits / temperature) over each row; f(v) = sum of p_j over the tokens with p_j > v (strictly);
  token i is kept iff f(p_i) < top_p: the smallest descending prefix whose mass reaches top_p, where the tokens
  tied with its last one are all kept. The most probable token is always kept; top_p >= 1 keeps every token.
- Returns scores [B, V] float32, contiguous: p_i / noise_i for kept tokens, 0 for the others (and for p_i = 0,
  the -inf logits: never NaN). argmax(scores) is a draw from p restricted to the kept set (exponential race),
  the same argmax as the eager form's masked_fill(-inf), softmax, probs / noise.
- Deterministic: the same inputs give bitwise the same scores (integer atomics on fixed-point masses only, float
  reductions in a fixed order).

Implementations
- CPU, or anything the kernels do not take: `top_p_scores_reference` (softmax; a sort gives each token the mass
  strictly above it; torch.where). It also runs in float64 (tests).
- CUDA (fp32, unit column stride): the threshold v* = the smallest kept probability, found as its fp32 bit pattern
  by a radix select over the 31 bits of the unnormalised p = exp2(l * log2(e) / T - max) (in [0, 1]; non-negative
  floats order as their int32 bits), never sorting. Grid (B, C) for every launch: C chunks per row (`top_p_plan`:
  ~TARGET_PROGRAMS programs, at most 128 chunks, chunk lengths a multiple of SUB = 1024: 100 chunks at B = 1..8,
  17 at B = 64 for V = 102400), one contiguous chunk per program. Six launches of fixed shape, no host sync:
  1. `_top_p_max_kernel`: per-chunk max of l * log2(e) / T; zeroes the histogram scratch (top_p >= 1: the
     per-chunk sums of exp2 instead, for Z).
  2. `_top_p_round_kernel`, LEVEL 0..3: radix levels of (shift, width) = (23, 8), (15, 8), (7, 8), (0, 7) bits
     (LEVELS). Each program reduces the row's max from the chunk maxima and, from LEVEL 1, picks the previous
     level's bin from the row's histogram (below; every program of the row computes the same bits, and the row's
     chunk-0 program stores prefix, mass above, t and Z in the level's state slot for the next launch). Then it adds
     the masses of its chunk's elements whose bits match the prefix to the row's 256-bin histogram of this level.
     Masses are fixed-point int64, q = trunc(p * 2^44), summed with integer atomics: exact, so the histograms are
     bitwise the same whatever order the atomics land in (deterministic; no float atomics). At level 0, where
     every element lands in a few dozen exponent bins, a program first accumulates into its own private histogram
     and adds that to the row's once (contention); the later levels' few matching elements go straight in.
  3. The same kernel, LEVEL 4 (FINAL): picks the last bin, completing v*; scores = where(bits(p) >= v*,
     p / Z / noise, 0). top_p >= 1 runs it right after the max kernel (ALL: v* = the smallest positive float).
  Picking a bin (`_pick_bin`): M = the mass above the current prefix, h[j] = the mass of bin 255 - j, I = its
  inclusive cumulative sum, t = ceil(top_p * Z) with Z = the level-0 total (the sum of the very masses compared).
  v* lies in the first bin j with M + I[j] >= t (the mass above its largest member, M + I[j - 1], is < t; above
  the next member down it is not), or the last non-empty bin if the row never reaches t; the new M is M + I[j - 1].
  The kept set is exact for the kernel's own p and fixed-point masses: f(p_i) < top_p * Z in units of 2^-44 of
  the largest p (the truncation moves a row's masses by at most V * 2^-44, ~6e-9 of Z at V = 1e5; a token of
  p < 2^-44 weighs 0 and is dropped unless top_p >= 1, where the contract keeps it only for top_p within ~V * 2^-44
  of 1). It differs from a float64 reference only for tokens within fp32 rounding of the boundary
  (`near_boundary`).
  Measured on the H200 (scripts/bench_top_p.py, CUDA graphs, 2026-11-25; V = 102400, T = 0.6, top_p = 0.95):
  16.7 us per call at B = 1 (the eager sort path: 144.7 us), 31.5 us at B = 8 (356.7), 117.4 us at B = 64 (943.3);
  V = 129280, T = 1, top_p = 0.9: 18.6 us at B = 1 (169.2), 37.0 at B = 8 (426.4). Same argmax as the eager path
  on every draw checked (2,624). Tried and slower: per-chunk fp32 histograms reduced by every program (the
  reduction alone took 7-13 us per level), histograms as [16, 16] tensor-core products of one-hot matrices
  (10-20 us per level), three levels of 11 / 10 / 10 bits (bigger scans and zeroing cost more than the launch
  saved), private histograms at every level.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dsv3.kernels._launch import cdiv, next_pow2

LOG2E = 1.4426950408889634
FIXED_ONE: tl.constexpr = tl.constexpr(2.0 ** 44)  # masses in int64 units of 2^-44 of the row's largest p (= 1)
SUB = 1024  # elements per inner step
MAX_CHUNKS = 128
TARGET_PROGRAMS = 1056  # eight per multiprocessor of an H200
MIN_CHUNK = 512
# (shift, width) of the radix levels over the 31 bits of a non-negative fp32 (the sign bit is always 0), top down
LEVELS = ((23, 8), (15, 8), (7, 8), (0, 7))
# Levels whose atomics go to a per-program histogram first (added to the row's once per program): level 0 only,
# where every element lands in a few dozen exponent bins; the later levels' few matching elements go straight in.
PRIVATE_LEVELS = (0,)
NUM_WARPS = 4


def top_p_keep(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask of the kept tokens of probs [..., V] (any float dtype): f(p_i) < top_p, f(v) = the mass of the
    tokens with p_j > v. A sort gives, for each token, the number of tokens strictly above it (searchsorted on the
    ascending order) and the mass of that many largest (a cumulative sum from the largest down)."""
    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    probs = probs.contiguous()
    asc = probs.sort(dim=-1).values
    top_mass = torch.cat([torch.zeros_like(asc[..., :1]), asc.flip(-1).cumsum(-1)], -1)  # mass of the n largest
    n_above = probs.shape[-1] - torch.searchsorted(asc, probs, right=True)
    return top_mass.gather(-1, n_above) < top_p


def top_p_scores_reference(logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_p: float
                           ) -> torch.Tensor:
    """The op's contract in plain torch (float32 or float64)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    keep = top_p_keep(probs, top_p)
    return torch.where(keep, probs / noise, torch.zeros_like(probs))


def near_boundary(probs: torch.Tensor, top_p: float, rel: float = 1e-5) -> torch.Tensor:
    """Bool mask of the tokens of probs [B, V] (a float64 row softmax) whose kept / dropped status could change if
    every probability moved by a relative `rel`, and the masses and top_p by `rel` (of the row's mass): the tokens
    two correct fp32 implementations (p and sums rounded differently) may disagree on. Exactly equal probabilities
    (equal logits) stay tied in any implementation and are not counted as crossing each other. For tests and
    benchmarks."""
    if top_p >= 1.0:
        return torch.zeros_like(probs, dtype=torch.bool)
    probs = probs.contiguous()
    asc = probs.sort(dim=-1).values
    top_mass = torch.cat([torch.zeros_like(asc[..., :1]), asc.flip(-1).cumsum(-1)], -1)
    v = probs.shape[-1]

    def mass_from(x: torch.Tensor, right: bool) -> torch.Tensor:  # mass of p_j > x (right) or p_j >= x
        return top_mass.gather(-1, v - torch.searchsorted(asc, x.contiguous(), right=right))

    surely_above = mass_from(probs * (1 + 2 * rel), True)
    ties = mass_from(probs, False) - mass_from(probs, True)  # the token's own group of equal probabilities
    maybe_above = mass_from(probs * (1 - 2 * rel), False) - ties
    return (surely_above * (1 - rel) < top_p * (1 + rel) + rel) & (maybe_above * (1 + rel) >= top_p * (1 - rel) - rel)


def top_p_plan(b: int, v: int, chunks: int | None = None, sub: int | None = None) -> tuple[int, int]:
    """(chunks per row, chunk length, a multiple of `sub` = SUB): ~TARGET_PROGRAMS programs per launch, chunks of
    >= MIN_CHUNK logits, at most MAX_CHUNKS. `chunks` overrides (tests)."""
    sub = sub or SUB
    if chunks is None:
        chunks = max(1, min(MAX_CHUNKS, cdiv(TARGET_PROGRAMS, max(b, 1)), cdiv(v, MIN_CHUNK)))
    chunk_len = cdiv(cdiv(v, chunks), sub) * sub
    return cdiv(v, chunk_len), chunk_len


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _top_p_max_kernel(logits_ptr, part_ptr, priv_ptr, rowh_ptr, V, CH, C, stride_l, scale,
                      SUMS: tl.constexpr, ZERO_PRIV: tl.constexpr, ZERO_ROW: tl.constexpr, SUB: tl.constexpr):
    """part[row, chunk] = (max of l * scale over the chunk, sum of exp2(l * scale - that max) if SUMS); zero this
    program's ZERO_PRIV private histogram words and, chunk 0, the row's ZERO_ROW (multiples of 256)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    scale = tl.cast(scale, tl.float32)
    base = logits_ptr + row.to(tl.int64) * stride_l
    start = chunk * CH
    end = tl.minimum(start + CH, V)
    mx = tl.full([SUB], float("-inf"), tl.float32)
    for s in range(start, end, SUB):
        offs = s + tl.arange(0, SUB)
        mx = tl.maximum(mx, tl.load(base + offs, mask=offs < end, other=float("-inf")) * scale)
    m = tl.max(mx, axis=0)
    out = part_ptr + (row * C + chunk) * 2
    tl.store(out, m)
    if SUMS:
        ms = tl.where(m == float("-inf"), 0.0, m)  # a chunk of -inf only: sum 0, no NaN
        acc = tl.zeros([SUB], tl.float32)
        for s in range(start, end, SUB):
            offs = s + tl.arange(0, SUB)
            acc += tl.exp2(tl.load(base + offs, mask=offs < end, other=float("-inf")) * scale - ms)
        tl.store(out + 1, tl.sum(acc, axis=0))
    zeros = tl.zeros([256], tl.int64)
    k = tl.arange(0, 256)
    for z0 in tl.static_range(0, ZERO_PRIV, 256):
        tl.store(priv_ptr + (row * C + chunk).to(tl.int64) * ZERO_PRIV + z0 + k, zeros)
    if chunk == 0:
        for z0 in tl.static_range(0, ZERO_ROW, 256):
            tl.store(rowh_ptr + row.to(tl.int64) * ZERO_ROW + z0 + k, zeros)


@triton.jit
def _load_hist(rowh_ptr, NB: tl.constexpr):
    """The row's histogram of a level (NB int64 masses, bin b at rowh_ptr + b), top bin first: (h, I), h[j] the mass
    of bin NB - 1 - j, I[j] the mass of the bins >= NB - 1 - j. I[NB - 1] is the total."""
    h = tl.load(rowh_ptr + NB - 1 - tl.arange(0, NB))
    return h, tl.cumsum(h, axis=0)


@triton.jit
def _pick_bin(h, inc, mabove, t, NB: tl.constexpr):
    """(bin holding v*, mass above that bin) from `_load_hist`'s (h, I). See the module docstring."""
    j = tl.arange(0, NB)
    cross = tl.min(tl.where(mabove + inc >= t, j, NB), axis=0)
    last = tl.max(tl.where(h > 0, j, -1), axis=0)
    jstar = tl.maximum(tl.minimum(cross, last), 0)
    return NB - 1 - jstar, mabove + tl.sum(tl.where(j == jstar - 1, inc, 0), axis=0)


@triton.jit
def _top_p_round_kernel(
    logits_ptr, noise_ptr, out_ptr, part_ptr, priv_ptr, rowh_ptr, state_ptr,
    V, CH, C, stride_l, stride_n, scale, top_p,
    LEVEL: tl.constexpr, FINAL: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr, PREV_WIDTH: tl.constexpr,
    ALL: tl.constexpr, PRIVATE: tl.constexpr, NBS: tl.constexpr, C_PAD: tl.constexpr, SUB: tl.constexpr,
):
    """LEVEL < FINAL (= len(LEVELS)): fix the previous level's bin (LEVEL >= 1), then add the masses of this chunk's
    elements that match the prefix to the row's histogram of level LEVEL (fixed-point int64, integer atomics: exact
    and order-free; through the program's private one if PRIVATE). LEVEL == FINAL (or ALL): fix the last bin, write
    the scores. Scratch: part [B, C, 2] fp32; priv [B, C, NBS] and rowh [B, FINAL, NBS] int64 (zeroed by the max
    kernel; a private histogram is zeroed again after use); state [B, 4, 4] int64, a slot per level: (prefix, mass
    above, t, Z)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    scale = tl.cast(scale, tl.float32)
    ci = tl.arange(0, C_PAD)
    m_parts = tl.load(part_ptr + (row * C + ci) * 2, mask=ci < C, other=float("-inf"))
    m = tl.max(m_parts, axis=0)
    if ALL:
        s_parts = tl.load(part_ptr + (row * C + ci) * 2 + 1, mask=ci < C, other=0.0)
        z = tl.sum(s_parts * tl.exp2(m_parts - m), axis=0)
        vstar = 1  # every p > 0: a token of p = 0 scores 0, whatever the noise
    elif LEVEL == 0:
        prefix = 0
    else:
        h, inc = _load_hist(rowh_ptr + (row * FINAL + LEVEL - 1).to(tl.int64) * NBS, 1 << PREV_WIDTH)
        if LEVEL == 1:
            # level 0 holds every element: its total is Z, the sum of the very masses compared
            zi = tl.max(inc, axis=0)
            tf = zi.to(tl.float64) * tl.cast(top_p, tl.float64)
            t = tf.to(tl.int64)
            t += (t.to(tl.float64) < tf).to(tl.int64)  # ceil: f < top_p * Z  <=>  f < t for integer f
            prefix, mabove = _pick_bin(h, inc, 0, t, 1 << PREV_WIDTH)
        else:
            slot = state_ptr + (row * 4 + LEVEL - 2) * 4
            mabove = tl.load(slot + 1)
            t = tl.load(slot + 2)
            zi = tl.load(slot + 3)
            b, mabove = _pick_bin(h, inc, mabove, t, 1 << PREV_WIDTH)
            prefix = (tl.load(slot).to(tl.int32) << PREV_WIDTH) | b
        if LEVEL < FINAL:
            if chunk == 0:
                slot = state_ptr + (row * 4 + LEVEL - 1) * 4
                tl.store(slot, prefix.to(tl.int64))
                tl.store(slot + 1, mabove)
                tl.store(slot + 2, t)
                tl.store(slot + 3, zi)
        else:
            z = zi.to(tl.float32) * (1.0 / FIXED_ONE)
            vstar = tl.maximum(prefix, 1)

    lbase = logits_ptr + row.to(tl.int64) * stride_l
    start = chunk * CH
    end = tl.minimum(start + CH, V)
    if ALL or LEVEL == FINAL:
        inv_z = 1.0 / z
        nbase = noise_ptr + row.to(tl.int64) * stride_n
        obase = out_ptr + row.to(tl.int64) * V
        for s in range(start, end, SUB):
            offs = s + tl.arange(0, SUB)
            inb = offs < end
            p = tl.exp2(tl.load(lbase + offs, mask=inb, other=float("-inf")) * scale - m)
            keep = p.to(tl.int32, bitcast=True) >= vstar
            nz = tl.load(nbase + offs, mask=inb & keep, other=1.0)
            tl.store(obase + offs, tl.where(keep, p * inv_z / nz, 0.0), mask=inb)
    else:
        row_hist = rowh_ptr + (row * FINAL + LEVEL).to(tl.int64) * NBS
        if PRIVATE:
            hist = priv_ptr + (row * C + chunk).to(tl.int64) * NBS
        else:
            hist = row_hist
        for s in range(start, end, SUB):
            offs = s + tl.arange(0, SUB)
            p = tl.exp2(tl.load(lbase + offs, mask=offs < end, other=float("-inf")) * scale - m)
            key = p.to(tl.int32, bitcast=True)
            q = (p * FIXED_ONE).to(tl.int64)
            match = ((key >> (SHIFT + WIDTH)) == prefix) & (q > 0)
            tl.atomic_add(hist + ((key >> SHIFT) & ((1 << WIDTH) - 1)), q, mask=match, sem="relaxed")
        if PRIVATE:
            # this program's histogram is complete once all its threads are past their atomics; read it from L2
            tl.debug_barrier()
            k = tl.arange(0, 1 << WIDTH)
            h = tl.load(hist + k, cache_modifier=".cg")
            tl.atomic_add(row_hist + k, h, mask=h > 0, sem="relaxed")
            tl.store(hist + k, tl.zeros_like(h), mask=h > 0)  # zero again for the next level


# ----------------------------------------------------------------------------------------------------------------
# Launcher and op
# ----------------------------------------------------------------------------------------------------------------


def top_p_scores_triton(logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_p: float,
                        chunks: int | None = None, sub: int | None = None) -> torch.Tensor:
    """The CUDA path (fp32 logits and noise with unit column stride). `chunks` and `sub` (elements per inner step,
    a power of two) override the plan: tests run it on CPU tensors under TRITON_INTERPRET=1 with small
    chunks."""
    b, v = logits.shape
    out = torch.empty((b, v), dtype=torch.float32, device=logits.device)
    if b == 0 or v == 0:
        return out
    sub = sub or SUB
    c, ch = top_p_plan(b, v, chunks, sub)
    everything = top_p >= 1.0
    dev = logits.device
    part = torch.empty((b, c, 2), dtype=torch.float32, device=dev)
    final = len(LEVELS)
    assert final <= 5 and sum(w for _, w in LEVELS) == 31 and LEVELS[-1][0] == 0, LEVELS  # state has 4 slots
    nbs = 1 << max(w for _, w in LEVELS)  # words per histogram
    private = not everything and any(lv in PRIVATE_LEVELS for lv in range(final))
    if everything:
        priv = rowh = state = part  # not touched
    else:
        priv = torch.empty((b, c, nbs) if private else (1,), dtype=torch.int64, device=dev)
        rowh = torch.empty((b, final, nbs), dtype=torch.int64, device=dev)
        state = torch.empty((b, 4, 4), dtype=torch.int64, device=dev)
    scale = LOG2E / temperature
    grid = (b, c)
    wrap_triton(_top_p_max_kernel)[grid](
        logits, part, priv, rowh, v, ch, c, logits.stride(0), scale, SUMS=everything,
        ZERO_PRIV=nbs if private else 0, ZERO_ROW=0 if everything else final * nbs, SUB=sub, num_warps=NUM_WARPS)
    for level in ([final] if everything else range(final + 1)):
        shift, width = LEVELS[level] if level < final else (0, 0)
        wrap_triton(_top_p_round_kernel)[grid](
            logits, noise, out, part, priv, rowh, state, v, ch, c, logits.stride(0), noise.stride(0), scale,
            float(top_p), LEVEL=level, FINAL=final, SHIFT=shift, WIDTH=width,
            PREV_WIDTH=LEVELS[level - 1][1] if level else 0, ALL=everything, PRIVATE=level in PRIVATE_LEVELS,
            NBS=nbs, C_PAD=max(2, next_pow2(c)), SUB=sub, num_warps=NUM_WARPS,
        )
    return out


def _kernel_ok(logits: torch.Tensor, noise: torch.Tensor) -> bool:
    return (logits.device.type == "cuda" and logits.dtype == torch.float32 and noise.dtype == torch.float32
            and logits.dim() == 2 and noise.shape == logits.shape and logits.stride(-1) == 1
            and noise.stride(-1) == 1)


@triton_op("dsv3::top_p_scores", mutates_args=())
def top_p_scores(logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    if not _kernel_ok(logits, noise):
        return top_p_scores_reference(logits, noise, temperature, top_p).contiguous()
    return top_p_scores_triton(logits, noise, temperature, top_p)


@top_p_scores.register_fake
def _top_p_scores_fake(logits, noise, temperature, top_p):
    return logits.new_empty(logits.shape, dtype=torch.float32)


__all__ = ["LEVELS", "near_boundary", "top_p_keep", "top_p_plan", "top_p_scores", "top_p_scores_reference",
           "top_p_scores_triton"]
