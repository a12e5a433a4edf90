"""Steppers over compiled graphs: AOTInductor packages (production) or torch.compile at start-up (--jit).

Both implement `dsv3.generate.Stepper`:
- prefill: each prompt goes into its own cache row through the prefill graph, in chunks of at most
  `prefill_chunk` tokens (the graph takes 2..chunk tokens; a 1-token piece gets a dummy second token one position
  later, which the first decode step overwrites before anything attends to it); a chunk at position 0 goes through
  the first-chunk graph when the artifacts have one (no attention over cached rows: there are none), several
  prompts' first chunks per call when it takes rows (right-padded to one length, at most `prefill_chunk` tokens
  per call with the padding: the padding writes cache slots after a prompt's end, which its decode steps overwrite
  before they attend to them). On CUDA, first chunks of up to 256 tokens (several prompts) or 2048 (one prompt)
  replay CUDA graphs of the first-chunk graph captured at load, one per (rows, width) bucket (`_ShortPrefill`,
  `GraphStepper.short_prefill_`): a call is padded to the bucket (tokens right-padded,
  extra rows repeating the first row: the same writes into the same cache row), so a short prompt pays neither
  ~850 kernel launches from the host nor a first call at a new length; a bucket for which the artifacts have a
  first-chunk graph of static shape (`dsv3c compile --short-prefill`) captures that graph instead, whose kernels
  are chosen for its token count (the decode paths of the experts and the FP8 linears);
- decode: the batch is padded to the next bucket; on CUDA each bucket's graph is captured once in a CUDA graph
  (one shared pool, static token/position buffers) and replayed;
- generation (`decode_loop`): a second graph per bucket steps the batch with the argmax and the next step's
  tokens and positions computed inside it, so a generated token costs one replay and nothing else on the device;
  sampled generation gets such a graph per (bucket, sampling settings) on first use (`prepare_sampling`), with the
  sampling ops and their random draws inside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import dsv3.checkpoint as ckpt_mod
from dsv3.config import ModelConfig, load_config_file
from dsv3.generate import DecodeLoop, SamplingParams, sample, sample_scores
from dsv3.kernels.greedy import greedy_next_, greedy_scratch
from dsv3.model import Transformer
from dsv3.runtime.artifacts import bind_constants, load_package
from dsv3.runtime.manifest import ArtifactError, check_host, read_manifest, verify_files
from dsv3.runtime.parallel import ParallelPlan, apply_parallel, build_rank_model
from dsv3.runtime.steps import DecodeStep, PrefillStep, constants, decode_inputs, prefill_inputs

StepFn = Callable[..., torch.Tensor]


def _int64_rows(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """[len(rows), width] int64, each row right-padded with 0. Through numpy: a 4096-token prompt converts in ~60 us
    where torch.tensor(list) takes ~230 (2-core host)."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


def _packed(parts: Sequence[np.ndarray], pinned: bool) -> tuple[torch.Tensor, list[int]]:
    """The int64 arrays `parts` in one host tensor (pinned: for an asynchronous copy), each starting at an even
    element (16-byte aligned on the device too): (tensor, offsets)."""
    offsets, n = [], 0
    for a in parts:
        offsets.append(n)
        n += -(-a.size // 2) * 2
    host = torch.zeros(n, dtype=torch.long, pin_memory=pinned)
    flat = host.numpy()
    for a, o in zip(parts, offsets):
        flat[o: o + a.size] = a.reshape(-1)
    return host, offsets


def _staged(parts: Sequence[np.ndarray], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`parts` on `device` after one host-to-device copy (pinned and asynchronous on CUDA): (the buffer, a view of
    it per part). A prefill call's inputs used to be four torch.tensor copies from pageable memory, each holding
    the host before the first kernel: 356 -> 249 us for a 4095-token prompt, 76 -> 52 for 14 tokens (H200,
    scripts/try_prefill_inputs.py, 2026-11-26; the graph buckets' one copy in `_ShortPrefill.run`: 45 -> 21 us at
    14 tokens, 251 -> 107 at 2048)."""
    host, offsets = _packed(parts, pinned=device.type == "cuda")
    buf = host.to(device, non_blocking=True)
    return buf, [buf[o: o + a.size].view(a.shape) for a, o in zip(parts, offsets)]


class GraphStepper:
    def __init__(self, model: Transformer, prefill_fn: StepFn, decode_fns: dict[int, StepFn], prefill_chunk: int,
                 cuda_graphs: bool, prefill_first_fn: StepFn | None = None, prefill_first_rows: int = 1,
                 static_first_fns: dict[tuple[int, int], StepFn] | None = None):
        self.model = model
        self.max_batch_size, self.max_seq_len = model.max_batch_size, model.max_seq_len
        self.device = model.rope_cos.device
        self.prefill_fn, self.decode_fns, self.prefill_chunk = prefill_fn, decode_fns, prefill_chunk
        # chunks at position 0 (artifacts from before the first-chunk graph: the general one)
        self.prefill_first_fn = prefill_first_fn if prefill_first_fn is not None else prefill_fn
        self.prefill_first_rows = prefill_first_rows if prefill_first_fn is not None else 1  # prompts per call
        # first-chunk graphs of static (rows, width), for the short-prefill buckets of that shape
        self.static_first_fns = dict(static_first_fns or {})
        self.buckets = sorted(decode_fns)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.loops = {b: _LoopBuffers(b, self.device) for b in self.buckets}
        self.loop_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Sampled loop graphs, captured on first use, at most MAX_SAMPLED_GRAPHS (the oldest goes). Their random
        # draws come from one generator of ours registered with each graph; a run's own generator (a seed) is
        # copied into it when the loop starts, so the draws continue that generator's sequence.
        self.sampled_graphs: dict[tuple[int, SamplingParams], torch.cuda.CUDAGraph] = {}
        self.sample_generator = torch.Generator(device=self.device) if cuda_graphs else None
        # short first chunks: (rows, width) -> static inputs and, on CUDA, the captured graph (`short_prefill_`)
        self.short_prefill: dict[tuple[int, int], _ShortPrefill] = {}
        # a prompt's later chunks: the general prefill graph at one full chunk (`short_prefill_`), None: plain calls
        self.later_prefill: _ShortPrefill | None = None
        self.pool = None
        self.capture_s = 0.0
        self.all_reduce = "none" if getattr(model, "tp_all_reduce", None) is None else "nccl"  # artifact_stepper
        if cuda_graphs:
            self._capture()

    # -------------------------------------------------------------- decode
    def _bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds the largest decode bucket {self.buckets[-1]}")

    @torch.inference_mode()
    def _capture(self) -> None:
        """One CUDA graph per bucket, in one memory pool. Warm-up writes the cache at position 0 of unused rows:
        harmless, prefill overwrites what a sequence reads."""
        t0 = time.perf_counter()
        pool = self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for b in self.buckets:
            tok = torch.zeros(b, 1, dtype=torch.long, device=self.device)
            pos = torch.zeros(b, 1, dtype=torch.long, device=self.device)
            # after the fills: the side stream would otherwise read tok / pos before this stream zeroes them (the
            # allocator's recycled bytes: an out-of-range token id, a device-side assert in the embedding)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.decode_fns[b](tok, pos)
                self._loop_step(b)  # compiles greedy_next_'s kernel before the capture (all rows padding)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.decode_fns[b](tok, pos)
            self.graphs[b] = (graph, tok, pos, out)
            loop_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(loop_graph, pool=pool):
                self._loop_step(b)
            self.loop_graphs[b] = loop_graph
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        self.short_prefill_(capture=True)

    @torch.inference_mode()  # the static buffers were made in inference mode (capture); callers need not be
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[n, vocab] fp32 logits. Under CUDA graphs this is a view of the graph's static output buffer, valid until
        the next decode call (no copy on the hot path): clone it to keep it longer."""
        n = tokens.shape[0]
        b = self._bucket(n)
        if b in self.graphs:
            graph, tok, pos, out = self.graphs[b]
            if n < b:  # padding rows: unused cache rows, position 0
                tok.zero_()
                pos.zero_()
            tok[:n, 0].copy_(tokens)
            pos[:n, 0].copy_(positions)
            graph.replay()
            return out[:n]
        tok = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        pos = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        tok[:n, 0] = tokens
        pos[:n, 0] = positions
        return self.decode_fns[b](tok, pos)[:n]

    @torch.inference_mode()
    def _loop_step(self, b: int, sampling: SamplingParams = SamplingParams(),
                     generator: torch.Generator | None = None) -> None:
        """One step of bucket b on its static buffers: decode, sample (the argmax of `sample_scores`), then the next
        step's inputs in place. Padding rows (active 0) keep token 0 at position 0; positions stop at the cache's
        last slot (a row that reached it has stopped, generate() discards what it produces)."""
        buf = self.loops[b]
        scores = sample_scores(self.decode_fns[b](buf.tokens, buf.positions), sampling, generator)
        greedy_next_(scores, buf.tokens, buf.positions, buf.active, buf.best, buf.count, self.max_seq_len - 1)

    MAX_SAMPLED_GRAPHS = 8

    @torch.inference_mode()
    def prepare_sampling(self, sampling: SamplingParams, batch: int) -> None:
        """Capture the sampled loop graph for this batch's bucket and these settings now (dsv3c run does at load, so
        the first request does not wait for it; decode_loop otherwise captures on first use). No-op when greedy
        or without CUDA graphs."""
        if sampling.temperature != 0.0 and self.graphs:
            self._sampled_graph(self._bucket(batch), sampling)

    def _sampled_graph(self, b: int, sampling: SamplingParams) -> torch.cuda.CUDAGraph:
        key = (b, sampling)
        graph = self.sampled_graphs.pop(key, None)
        if graph is None:
            t0 = time.perf_counter()
            logits = self.graphs[b][3]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the sampling ops' first calls (library handles, workspaces) outside
                sample_scores(logits.clone(), sampling, torch.Generator(device=self.device))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.sample_generator)
            with torch.cuda.graph(graph, pool=self.pool):
                self._loop_step(b, sampling, self.sample_generator)
            torch.cuda.synchronize(self.device)
            self.capture_s += time.perf_counter() - t0
            while len(self.sampled_graphs) >= self.MAX_SAMPLED_GRAPHS:
                self.sampled_graphs.pop(next(iter(self.sampled_graphs)))
        self.sampled_graphs[key] = graph  # re-inserted: the most recently used is last
        return graph

    @torch.inference_mode()
    def decode_loop(self, tokens: torch.Tensor, positions: torch.Tensor, sampling: SamplingParams,
                    generator: torch.Generator | None = None) -> DecodeLoop | None:
        """Steps that feed themselves (see `dsv3.generate.DecodeLoop`): under CUDA graphs one replay per token.
        Sampled steps draw from `generator` (or, when None, from a seed taken from torch's default CPU generator):
        a batch that fills its bucket draws the numbers decode + `sample` would, a smaller one draws noise for the
        bucket's padding rows too, so its tokens differ from that path's. Without CUDA graphs, sampled generation
        returns None (`generate` runs decode + sample)."""
        n = tokens.shape[0]
        b = self._bucket(n)
        sampled = sampling.temperature != 0.0
        if sampled and not self.graphs:
            return None
        graph = self._sampled_graph(b, sampling) if sampled else self.loop_graphs.get(b)
        if sampled:
            gen = self.sample_generator
            if generator is not None:
                gen.set_state(generator.get_state())
            else:
                gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
        buf = self.loops[b]
        buf.start(tokens, positions.clamp(max=self.max_seq_len - 1))
        return _Loop(buf, n, graph.replay if graph is not None else lambda: self._loop_step(b))

    def release_graphs(self) -> None:
        """Drop the CUDA graphs (and the NCCL work captured in them) before the process group goes."""
        self.graphs.clear()
        self.loop_graphs.clear()
        self.sampled_graphs.clear()
        self.short_prefill.clear()
        self.later_prefill = None

    # -------------------------------------------------------------- prefill
    @torch.inference_mode()
    def warm_prefill(self) -> float:
        """Run each prefill graph once on a 2-token chunk in cache row 0, and a request's prefill + first token at
        each short-prefill row count, so that the first request does not pay their first calls (loading every
        kernel of the package and of torch, library handles, first allocations). Harmless: a prefill rewrites the
        cache rows its sequence reads. Returns the seconds it took."""
        t0 = time.perf_counter()
        self.prefill_first_fn(*prefill_inputs(2, self.device, rows=min(2, self.prefill_first_rows)))
        if self.prefill_fn is not self.prefill_first_fn:
            self.prefill_fn(*prefill_inputs(2, self.device))
        # a request's path around the prefill graphs, at each short-prefill row count: the logits' copies and the
        # first token's argmax (torch kernels are loaded at their first launch, ~1 ms each on the H200)
        for rows in sorted({r for r, _ in self.short_prefill}):
            sample(self.prefill([[0, 0]] * rows), SamplingParams())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _first_chunk_groups(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Prompt indices in calls of the first-chunk graph: consecutive prompts while the call stays within its
        rows and within prefill_chunk tokens counting the right-padding to the longest first chunk."""
        groups: list[list[int]] = []
        width = 0
        for i, prompt in enumerate(prompts):
            s = max(2, min(len(prompt), self.prefill_chunk))
            fits = groups and len(groups[-1]) < self.prefill_first_rows
            if fits and (len(groups[-1]) + 1) * max(width, s) <= self.prefill_chunk:
                groups[-1].append(i)
                width = max(width, s)
            else:
                groups.append([i])
                width = s
        return groups

    # Short first chunks through static (rows, width) buckets: widths SHORT_PREFILL_WIDTHS (at most prefill_chunk),
    # rows the decode buckets that the first-chunk graph takes, at most SHORT_PREFILL_TOKENS per call. Padding a
    # 14-token prompt to 16 costs little; the replay saves the host's launches: a plain 14-token prefill of the
    # 16B returns to the host after ~11 ms of launching ~850 kernels, its replay takes 7.8 ms (H200).
    SHORT_PREFILL_WIDTHS = (16, 32, 64, 128, 256)
    SHORT_PREFILL_TOKENS = 1024
    # One prompt past 256 tokens: buckets 128 apart up to 2048, one row whatever the decode buckets. The host still
    # launches barely ahead of the kernels there, so the idle GPU between launches adds up: a replay saved 1.27 ms of
    # a 500-token prompt's 10.5, 1.12 of 1000 tokens' 14.4, 0.86 of 2000 tokens' 22.1, and nothing at 4095 (16B,
    # H200, scripts/bench_ttft.py --extra-widths, 2026-11-25). Padding costs ~7.7 us per token at these lengths:
    # 128 apart, the average pad (64 tokens, ~0.5 ms) leaves a gain and the worst (127, ~1 ms) about breaks even.
    LONG_PREFILL_WIDTHS = tuple(range(384, 2049, 128))
    # and one bucket of a whole chunk (prefill_chunk tokens), in two graphs: the first-chunk graph's for prompts
    # of a chunk or longer (and within PREFILL_PAD_TOKENS of it), the general graph's for their later chunks
    # (`later_prefill`). The host launches a 4096-token chunk's ~620 kernels barely ahead of them, with ~1.8 us of
    # idle GPU at each boundary of a plain call: 4095 tokens back to back, plain call then replay alternated, 38.09-
    # 38.76 -> 37.00-37.49 ms (16B, H200, scripts/try_cublaslt_workspace.py, 2026-11-26, three machines). Its memory
    # is the pool's (captured first, the smaller buckets reuse it): dsv3c bench's peak 19.15 -> 19.5 GiB (measured
    # with the later-chunk graph captured last).
    # A bucket's padding is computed like real tokens, so a call takes the bucket only while that pays: always up
    # to PREFILL_PAD_FREE_TOKENS in all (a replay of 512 tokens, ~9.3-9.6 ms, is no slower than a plain call of
    # any shorter chunk, which launching ~850 kernels from the host holds at ~10 ms), past that with at most
    # PREFILL_PAD_TOKENS of padding (~7.7 us each against a ~1 ms gain). Measured (16B, H200, 2026-11-25,
    # bench_ttft.py): 2 / 3 / 5 prompts of 100 tokens replayed in the 8 x 128 bucket 12.4 / 12.3 / 12.5 ms
    # against 10.2 / 10.0 / 10.2 plain; 8 of them 12.8 against 13.0; 2 / 5 prompts of 60 in 8 x 64 9.6 / 9.2
    # against 10.5 / 10.0.
    PREFILL_PAD_FREE_TOKENS = 512
    PREFILL_PAD_TOKENS = 256

    @torch.inference_mode()
    def short_prefill_(self, capture: bool) -> None:
        """Make the short-prefill buckets: static inputs per (rows, width), each run once (the first call of the
        package at that shape happens here, not in a request) and, with capture, captured in a CUDA graph in the
        decode graphs' pool, largest first (what a smaller one allocates fits in what a larger one freed). Run at
        load, before any request: warm-up and capture write cache row 0, which a prefill rewrites. A graph that
        cannot be captured leaves the plain calls in place, with a warning."""
        t0 = time.perf_counter()
        pool = self.pool if capture else None
        try:
            # the later-chunk graph first: with the whole-chunk bucket the largest, captured before the smaller ones
            # (whose allocations then fit in what these freed); shared when both are the same graph
            if self.prefill_fn is not self.prefill_first_fn or (1, self.prefill_chunk) in self.static_first_fns:
                self.later_prefill = _ShortPrefill(self.prefill_fn, 1, self.prefill_chunk, self.device, pool)
            for r, w in self._short_prefill_shapes():  # a static graph of the bucket's shape where there is one
                fn = self.static_first_fns.get((r, w), self.prefill_first_fn)
                self.short_prefill[(r, w)] = _ShortPrefill(fn, r, w, self.device, pool)
            if self.later_prefill is None:
                self.later_prefill = self.short_prefill[(1, self.prefill_chunk)]
        except RuntimeError as e:  # a host sync or an uncapturable library call inside the package
            import warnings

            warnings.warn(f"prefills run without CUDA graphs: capturing a prefill graph failed ({e})")
            self.short_prefill.clear()
            self.later_prefill = None
            torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - t0

    def _short_prefill_shapes(self) -> list[tuple[int, int]]:
        """The (rows, width) buckets, largest first (the capture order)."""
        widths = [w for w in self.SHORT_PREFILL_WIDTHS if w <= self.prefill_chunk]
        rows = [b for b in self.buckets if b <= self.prefill_first_rows] or [1]
        shapes = {(r, w) for r in rows for w in widths if r * w <= self.SHORT_PREFILL_TOKENS}
        shapes |= {(1, w) for w in self.LONG_PREFILL_WIDTHS if w <= self.prefill_chunk}  # never past the chunk
        shapes.add((1, self.prefill_chunk))
        return sorted(shapes | set(self.static_first_fns), key=lambda rw: (-rw[0] * rw[1], -rw[0]))

    def _short_prefill_for(self, rows: int, width: int) -> _ShortPrefill | None:
        """The smallest bucket that holds a call of `rows` prompts right-padded to `width` tokens, where its padding
        pays (PREFILL_PAD_FREE_TOKENS, PREFILL_PAD_TOKENS); None: the plain call."""
        fits = [k for k in self.short_prefill if k[0] >= rows and k[1] >= width]
        if not fits:
            return None
        r, w = min(fits, key=lambda rw: (rw[0] * rw[1], rw[1]))
        return self.short_prefill[(r, w)] if self._padding_pays(r * w, rows * width) else None

    def _padding_pays(self, bucket_tokens: int, tokens: int) -> bool:
        return bucket_tokens <= self.PREFILL_PAD_FREE_TOKENS or bucket_tokens - tokens <= self.PREFILL_PAD_TOKENS

    def _later_prefill_for(self, start: int, length: int) -> _ShortPrefill | None:
        """The later-chunk bucket for a chunk of `length` tokens at position `start`, where its padding pays and its
        padded positions stay inside the cache; None: the plain call."""
        full = self.later_prefill
        if full is None or start + full.width > self.max_seq_len:
            return None
        return full if self._padding_pays(full.width, length) else None

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        logits: torch.Tensor | None = None  # [prompts, vocab], each call's rows copied in as it returns
        for group in self._first_chunk_groups(prompts):
            firsts = [list(prompts[i][: self.prefill_chunk]) for i in group]
            # right-padded with token 0 (a 1-token prompt gets its dummy second token this way too)
            width = max(2, max(len(p) for p in firsts))
            short = self._short_prefill_for(len(group), width)
            if short is not None:
                out = short.run(firsts, group)
            else:
                out = self.prefill_first_fn(*_staged(
                    [_int64_rows(firsts, width), np.broadcast_to(np.arange(width), (len(group), width)),
                     np.asarray(group, dtype=np.int64), np.asarray([len(p) - 1 for p in firsts], dtype=np.int64)],
                    self.device)[1])
            if logits is None:
                logits = out.new_empty(len(prompts), out.shape[-1])
            logits[group[0]: group[0] + len(group)] = out[: len(group)]  # a group is consecutive prompts
        for row, prompt in enumerate(prompts):  # the chunks after the first, one prompt at a time
            for start in range(self.prefill_chunk, len(prompt), self.prefill_chunk):
                piece = list(prompt[start: start + self.prefill_chunk])
                full = self._later_prefill_for(start, len(piece))
                if full is not None:
                    logits[row] = full.run([piece], [row], start)[0]
                    continue
                last = len(piece) - 1
                if len(piece) == 1:
                    piece.append(0)  # dummy token at the next position; the first decode step overwrites it
                logits[row] = self.prefill_fn(*_staged(
                    [_int64_rows([piece], len(piece)), np.arange(start, start + len(piece)).reshape(1, -1),
                     np.asarray([row], dtype=np.int64), np.asarray([last], dtype=np.int64)], self.device)[1])[0]
        return logits


class _ShortPrefill:
    """Prefill calls of `rows` x `width` tokens on static inputs, replayed from a CUDA graph when captured (pool
    given), else called directly (CPU, and tests of the padding). A first-chunk bucket, or (`run`'s start > 0) the
    one-row bucket of the general prefill graph that takes a prompt's later chunks. Fewer prompts than rows: the
    extra rows repeat the first prompt into its own cache row (identical writes of identical values); shorter
    pieces are right-padded with token 0, whose cache slots come after the prompt's end (overwritten by its decode
    steps before they are attended to)."""

    def __init__(self, fn: StepFn, rows: int, width: int, device: torch.device, pool=None):
        self.fn, self.rows, self.width = fn, rows, width
        # tokens, positions, cache rows and logits indices as (16-byte aligned) views of one buffer: a call's inputs
        # are one copy. Cache rows 0: warm-up and capture write cache row 0 (see short_prefill_).
        self.inputs, (self.tokens, self.positions, self.cache_rows, self.logits_index) = _staged(
            [np.zeros((rows, width), np.int64), np.broadcast_to(np.arange(width), (rows, width)),
             np.zeros(rows, np.int64), np.full(rows, width - 1, np.int64)], torch.device(device))
        self.graph = None
        self.out = fn(self.tokens, self.positions, self.cache_rows, self.logits_index)  # first call at this shape
        if pool is not None:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn(self.tokens, self.positions, self.cache_rows, self.logits_index)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.out = fn(self.tokens, self.positions, self.cache_rows, self.logits_index)
            graph.replay()  # a graph's first launch uploads it: here, not in the first request
            self.graph = graph

    def run(self, pieces: list[list[int]], cache_rows: list[int], start: int = 0) -> torch.Tensor:
        """[len(pieces), vocab] logits of each piece's last token, the pieces at positions start..; from a graph, a
        view of its output, valid until its next replay."""
        n = len(pieces)
        rows = cache_rows + [cache_rows[0]] * (self.rows - n)
        last = [len(p) - 1 for p in pieces] + [len(pieces[0]) - 1] * (self.rows - n)
        host, _ = _packed([_int64_rows(pieces + [pieces[0]] * (self.rows - n), self.width),
                           np.broadcast_to(np.arange(start, start + self.width), (self.rows, self.width)),
                           np.asarray(rows, dtype=np.int64), np.asarray(last, dtype=np.int64)],
                          pinned=self.inputs.is_cuda)  # the layout of self.inputs (same shapes)
        self.inputs.copy_(host, non_blocking=True)  # one transfer, ordered before the replay on this stream
        if self.graph is not None:
            self.graph.replay()
            return self.out[:n]
        return self.fn(self.tokens, self.positions, self.cache_rows, self.logits_index)[:n]


class _LoopBuffers:
    """A bucket's static inputs for stepping: [b, 1] tokens and positions, and 1 / 0 for real / padding rows. The
    loop graphs (greedy and sampled) read them and write the next step's values back (`dsv3.greedy_next_`, one
    launch, over the logits or the sampling scores)."""

    def __init__(self, b: int, device: torch.device):
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.active = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.best, self.count = greedy_scratch(b, device)  # the op's scratch, left as it found it

    def start(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        n = tokens.shape[0]
        for t in (self.tokens, self.positions, self.active):
            t.zero_()
        self.tokens[:n, 0].copy_(tokens)
        self.positions[:n, 0].copy_(positions)
        self.active[:n] = 1


class _Loop:
    def __init__(self, buf: _LoopBuffers, n: int, run_step: Callable[[], None]):
        self.buf, self.n, self.run_step = buf, n, run_step

    def step(self) -> torch.Tensor:
        self.run_step()
        return self.buf.tokens[:self.n, 0]


# ------------------------------------------------------------------ building the model for this rank
def load_rank_model(checkpoint: str | Path, plan: ParallelPlan, *, dtype: torch.dtype, device: str,
                    max_batch_size: int, max_seq_len: int, progress: bool = True) -> Transformer:
    """This rank's shard of the checkpoint: a pre-sharded rank file (`dsv3c convert`) read as it is, or only this
    rank's slices read from the memory-mapped HF-layout files."""
    from dsv3.runtime.convert import load_presharded_, read_shards_manifest

    if read_shards_manifest(Path(checkpoint)) is not None:
        cfg = load_config_file(Path(checkpoint) / "config.json")
        model = build_rank_model(cfg, plan, dtype=dtype, device=device, max_batch_size=max_batch_size,
                                 max_seq_len=max_seq_len)
        load_presharded_(model, Path(checkpoint), plan, progress=progress)
        return model

    def prepare(model: Transformer):
        apply_parallel(model, plan)
        return lambda name, shape: plan.placement(name, shape, model.cfg)

    return ckpt_mod.load(checkpoint, dtype=dtype, device=device, max_batch_size=max_batch_size,
                         max_seq_len=max_seq_len, progress=progress, prepare=prepare)


def _config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = a.to_hf_dict(), b.to_hf_dict()
    return [f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]


def artifact_stepper(artifacts: str | Path, checkpoint: str | Path | None, plan: ParallelPlan, device: str,
                     progress: bool = True, weights_seed: int = 0) -> tuple[GraphStepper, dict]:
    """Check the manifest against this host and checkpoint, load this rank's weights, bind every package.

    checkpoint None: this rank's weights are generated in place on the device (dsv3.runtime.random_weights, seed
    `weights_seed`; the same on every rank, so replicated tensors agree) for the config the artifacts were built
    for. That is how 671B runs on hosts whose disks cannot hold its ~690 GB checkpoint."""
    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    check_host(manifest, device, plan.world_size)
    verify_files(artifacts, manifest)
    plan = plan.for_artifacts(manifest)  # the graphs' collectives are a compile-time choice
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[manifest["dtype"]]
    t0 = time.perf_counter()
    if checkpoint is None:
        from dsv3.runtime.random_weights import fill_random_

        cfg = load_config_file(artifacts / "config.json")
        model = build_rank_model(cfg, plan, dtype=dtype, device=device, max_batch_size=manifest["max_batch_size"],
                                 max_seq_len=manifest["max_seq_len"])
        fill_random_(model, seed=weights_seed, progress=progress)
    else:
        cfg = load_config_file(Path(checkpoint) / "config.json")
        if cfg.config_hash() != manifest["config_hash"]:
            built = load_config_file(artifacts / "config.json")
            diff = _config_differences(built, cfg)
            raise ArtifactError(f"checkpoint {checkpoint} does not match the config the artifacts were built for "
                                f"({len(diff)} field(s) differ, artifacts vs checkpoint):\n  - "
                                + "\n  - ".join(diff[:12])
                                + f"\nRebuild: dsv3c compile --config {checkpoint} --world-size {plan.world_size} ...")
        model = load_rank_model(checkpoint, plan, dtype=dtype, device=device,
                                max_batch_size=manifest["max_batch_size"], max_seq_len=manifest["max_seq_len"],
                                progress=progress)
    load_s = time.perf_counter() - t0
    want = manifest["rank_weights"]["tensors"]
    for name, t in model.state_dict().items():
        spec = want.get(name)
        got = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        if spec != got:
            raise ArtifactError(f"weight {name}: the artifacts expect {spec}, this rank loaded {got}; the artifacts "
                                f"were built for another rank layout or checkpoint: rebuild them with `dsv3c compile`")
    # one-shot all-reduce artifacts: the scratch buffer goes into symmetric memory on every rank (collective)
    reducer = getattr(model, "tp_all_reduce", None)
    symmetric = reducer is not None and reducer.use_symmetric_memory_()
    tensors = constants(model)
    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    decode_fns, prefill_fns, static_first_fns = {}, {}, {}
    for name, graph in manifest["graphs"].items():
        pkg = load_package(artifacts, graph, device, single_threaded=cuda)  # every graph may be captured
        bind_constants(pkg, name, tensors)
        if graph["kind"] == "decode":
            decode_fns[graph["batch"]] = pkg
        elif "static_shape" in graph:
            static_first_fns[tuple(graph["static_shape"])] = pkg
        else:
            prefill_fns[bool(graph.get("first_chunk", False))] = pkg
    if False not in prefill_fns:
        raise ArtifactError(f"{artifacts} has no (general) prefill graph: rebuild it with `dsv3c compile`")
    packages_s = time.perf_counter() - t0
    first_rows = next((g.get("max_batch", 1) for g in manifest["graphs"].values()
                       if g["kind"] == "prefill" and g.get("first_chunk") and "static_shape" not in g), 1)
    stepper = GraphStepper(model, prefill_fns[False], decode_fns, manifest["prefill_chunk"], cuda_graphs=cuda,
                           prefill_first_fn=prefill_fns.get(True), prefill_first_rows=first_rows,
                           static_first_fns=static_first_fns)
    stepper.all_reduce = plan.all_reduce + (" (symmetric memory)" if symmetric else "")
    return stepper, {"load_weights_s": load_s, "load_packages_s": packages_s, "capture_s": stepper.capture_s,
                     "warmup_s": stepper.warm_prefill()}


def jit_stepper(model: Transformer, buckets: Sequence[int], prefill_chunk: int) -> tuple[GraphStepper, dict]:
    """torch.compile(fullgraph=True) of the same step modules, compiled here at start-up (development path)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(buckets) + 8)
    decode = torch.compile(DecodeStep(model), fullgraph=True, dynamic=False)
    prefill = torch.compile(PrefillStep(model), fullgraph=True, dynamic=True)
    prefill_first = torch.compile(PrefillStep(model, first_chunk=True), fullgraph=True, dynamic=True)
    device = model.rope_cos.device
    t0 = time.perf_counter()
    with torch.inference_mode():  # compile now, not inside the first request (writes only unused cache slots)
        prefill(*prefill_inputs(min(prefill_chunk, 3), device))
        for rows in sorted({1, min(2, model.max_batch_size)}):  # one row, and a dynamic row count from 2
            prefill_first(*prefill_inputs(min(prefill_chunk, 3), device, rows=rows))
        for b in buckets:
            decode(*decode_inputs(b, device))
    compile_s = time.perf_counter() - t0
    stepper = GraphStepper(model, prefill, {b: decode for b in buckets}, prefill_chunk,
                           cuda_graphs=device.type == "cuda", prefill_first_fn=prefill_first,
                           prefill_first_rows=model.max_batch_size)
    return stepper, {"compile_s": compile_s, "capture_s": stepper.capture_s}
