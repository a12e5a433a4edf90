"""`dsv3c compile`: prefill and decode graphs -> AOTInductor packages + manifest, without the weights.

Stages, each timed and reported, each writing plain files into a temp directory next to the output:
1. model    build this rank's model (tensor/expert-parallel shard shapes for --world-size) with uninitialised
            weights and static latent caches for (max_batch_size, max_seq_len) on the target device.
            Every rank runs the same graph (the rank is a buffer), so one set of packages serves all ranks.
2. export   torch.export of each graph: decode per batch bucket (static shapes), prefill (dynamic chunk length;
            `prefill_first` for a prompt's first chunk, `prefill` for the chunks after it), and first-chunk graphs
            of static shape for short prompts (`prefill_first_1x16`, ...; --short-prefill).
3. aoti     aoti_compile_and_package, weights and caches left out of the .so (package_constants_in_so=False):
            the runtime hands the same tensors to every package.
4. manifest config.json, manifest.json (versions, host, buckets, expected weights, sha256 of every file).
5. verify   a fresh process loads every package with random weights and compares with the eager model.
Then the temp directory is renamed to --out: an interrupted build leaves no directory that looks complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from dsv3.config import ConfigError, ModelConfig
from dsv3.model import BATCH1_ACTIVATIONS, Transformer, model_bytes
from dsv3.runtime.distributed import stub_process_group
from dsv3.runtime.manifest import host_info, write_manifest
from dsv3.runtime.parallel import ParallelPlan, build_rank_model, rank_layout
from dsv3.runtime.steps import DecodeStep, PrefillStep, decode_inputs, prefill_inputs
from dsv3.staging import staged_directory

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# (rows, width) of the static first-chunk graphs built by default for CUDA, where a static token count pays (16B FP8
# on one H200, docs/BENCHMARKS.md). Every config: 1x16 and 1x32, where the routed experts take the decode path and
# the FP8 linears the GEMV instead of the grouped path and act-quant + cuBLAS (16 tokens, us per MoE layer: 216 ->
# 149). Where the routed experts' shape takes sparse grouped tiles (`sparse_tiles` in dsv3.kernels.routed_experts:
# FP8, a measured expert shape, one rank), also the SPARSE widths: a static T of up to 32 pairs per expert runs
# 32-pair streaming tiles (244 -> 185 us at 32 tokens, 250 -> 188 at 64, 244 -> 189 at 128), measured replays of
# one prompt 30 tokens 8.5 -> 6.1 ms, 50 tokens 9.1 -> 7.0, 200 tokens 9.2 -> 7.9, eight prompts of 14 tokens
# 9.5 -> 7.8, of 30 tokens 9.1 -> 8.0. Rows 8 become --max-batch-size when that is smaller (measured at 8 only).
# 1x128 is left out: a 65-128-token prompt replays 1x256 (7.9 ms; 1x128 7.7) for one package less to build.
SHORT_PREFILL_DEFAULT = ((1, 16), (1, 32))
SHORT_PREFILL_SPARSE = ((1, 64), (1, 256), (8, 16), (8, 32))


@dataclass(frozen=True)
class CompileOptions:
    config: ModelConfig
    world_size: int = 1
    max_batch_size: int = 8
    max_seq_len: int = 4096
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    prefill_chunk: int = 4096
    dtype: str = "bfloat16"
    device: str = "cuda"
    verify: bool = True
    jobs: int | None = None  # graphs built at once, each in its own process; None: as many as fit (CUDA), 1 (CPU)
    # world size > 1: the decode graphs' all-reduces. "one-shot": dsv3::one_shot_all_reduce over a symmetric-memory
    # buffer (NVLink, CUDA); "nccl": NCCL's; "auto": one-shot for CUDA, nccl for CPU. One-shot is the CUDA default
    # since it ran end to end on two H200s (fifteenth session, docs/BENCHMARKS.md): 671B at 8 layers 2.00-2.02 vs
    # 2.12-2.16 ms/token at batch 1, and the tiny config's world-size-2 logits bit for bit those of NCCL's graphs.
    all_reduce: str = "auto"
    # FP8 layers at one-token steps (the batch-1 decode graph): "fp8" quantizes activations (W8A8, as every other
    # step), "bf16" does not (W8A16, Transformer.set_batch1_activations_; the default: ParallelPlan's note).
    batch1_activations: str = "bf16"
    # First-chunk graphs of static shape (rows, width) for short prompts; None: SHORT_PREFILL_DEFAULT (+
    # SHORT_PREFILL_SPARSE) on CUDA, none on CPU. A prompt of up to `width` tokens is padded to it and replayed from
    # that graph's CUDA graph: with T static the routed experts take the decode path or sparse tiles and the FP8
    # linears (up to 64 tokens) the GEMV, instead of the grouped path and cuBLAS that a dynamic T needs.
    short_prefill: tuple[tuple[int, int], ...] | None = None

    def short_prefill_shapes(self) -> tuple[tuple[int, int], ...]:
        if self.short_prefill is not None:
            return tuple(sorted(set(self.short_prefill)))
        if self.device != "cuda":
            return ()
        shapes = {(min(r, self.max_batch_size), w) for r, w in SHORT_PREFILL_DEFAULT + SHORT_PREFILL_SPARSE}
        return tuple(sorted((r, w) for r, w in shapes if w <= self.prefill_chunk
                            and ((r, w) in SHORT_PREFILL_DEFAULT or self._sparse_moe_tiles(r * w))))

    def _sparse_moe_tiles(self, tokens: int) -> bool:
        """Whether a static count of `tokens` takes the routed experts' sparse grouped tiles on this build (the
        kernel's own rule, `sparse_tiles`, on the routed experts alone; one rank only: the tiles' pairs-per-expert
        bound was measured with every expert local)."""
        from dsv3.kernels.routed_experts import sparse_tiles

        cfg = self.config
        return (self.world_size == 1 and cfg.n_routed_experts > 0
                and sparse_tiles(cfg.is_fp8, tokens, cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.hidden_size,
                                 cfg.moe_intermediate_size))

    def resolved_all_reduce(self) -> str:
        if self.all_reduce == "auto":
            return "one-shot" if self.device == "cuda" else "nccl"
        return self.all_reduce

    def plan(self) -> ParallelPlan:
        """Rank 0's plan (every rank runs the same graphs)."""
        one_shot = self.resolved_all_reduce() == "one-shot" and self.world_size > 1
        return ParallelPlan(0, self.world_size, one_shot_all_reduce=one_shot,
                            batch1_activations=self.batch1_activations)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        bad = [b for b in self.batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ConfigError(f"--batch-sizes {bad}: every bucket must be between 1 and --max-batch-size "
                              f"({self.max_batch_size})")
        if not 2 <= self.prefill_chunk <= self.max_seq_len:
            raise ConfigError(f"--prefill-chunk {self.prefill_chunk}: must be between 2 and --max-seq-len "
                              f"({self.max_seq_len})")
        for r, w in self.short_prefill_shapes():
            if not (1 <= r <= self.max_batch_size and 2 <= w <= self.prefill_chunk):
                raise ConfigError(f"--short-prefill {r}x{w}: rows must be between 1 and --max-batch-size "
                                  f"({self.max_batch_size}), the width between 2 and --prefill-chunk "
                                  f"({self.prefill_chunk})")
        if self.jobs is not None and self.jobs < 1:
            raise ConfigError(f"--jobs {self.jobs}: must be at least 1")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: use cpu or cuda")
        check_kernel_switches()
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible on this build host; use --device cpu "
                              "(tiny configs) or build on a GPU host")
        if self.batch1_activations not in BATCH1_ACTIVATIONS:
            raise ConfigError(f"--batch1-activations {self.batch1_activations!r}: use one of "
                              f"{', '.join(BATCH1_ACTIVATIONS)}")
        if self.all_reduce not in ("auto", "nccl", "one-shot"):
            raise ConfigError(f"--all-reduce {self.all_reduce!r}: use auto, nccl or one-shot")
        if self.all_reduce == "one-shot" and self.device != "cuda":
            # symmetric memory is CUDA's; and a CPU package calling the op (gloo fallback from inside the package's
            # proxy-executor call) hung intermittently in 2-rank runs (thirteenth session)
            raise ConfigError("--all-reduce one-shot needs --device cuda (symmetric memory over NVLink); CPU "
                              "artifacts use --all-reduce nccl")
        self.plan().check(self.config)


def check_kernel_switches() -> None:
    """The DSV3_* trace-time switches are read inside the graph-building processes: a bad value would surface there
    as a traceback per graph. Check the ones with a fixed syntax before anything is built."""
    from dsv3.kernels import fp8_linear, mla_decode_prep, mla_prefill, norm_route, rms_norm, routed_experts

    checks = {
        "DSV3_DECODE_PREP": mla_decode_prep.decode_prep_choice,
        "DSV3_PREFILL_PREP": mla_decode_prep.prefill_prep_choice,
        "DSV3_PREFILL_PREFIX": mla_prefill.prefill_prefix_choice,
        "DSV3_PREFILL_DECOMPRESS": mla_prefill.decompress_choice,
        "DSV3_NORM_QUANT": rms_norm.norm_quant_choice,
        "DSV3_NORM_ROUTE": norm_route.norm_route_choice,
        "DSV3_FP8_GEMM": fp8_linear.fp8_gemm_mode,
        "DSV3_GEMV_VARIANT": lambda: fp8_linear.parse_gemv_variant(os.environ["DSV3_GEMV_VARIANT"]),
        "DSV3_MOE_DECODE": lambda: routed_experts.parse_moe_plan(os.environ["DSV3_MOE_DECODE"],
                                                                 routed_experts.MOE_DECODE_DEFAULT),
    }
    for name, check in checks.items():
        if name in os.environ:
            try:
                check()
            except ValueError as e:
                raise ConfigError(f"environment variable {name}={os.environ[name]!r}: {e}") from None


@dataclass
class StageLog:
    """Prints one line per stage with its time; keeps the timings for the manifest."""

    echo: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.echo(f"[{name}] ...")
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.timings[name] = round(dt, 2)
        self.echo(f"[{name}] done in {dt:.1f}s")


@contextmanager
def _process_group(world_size: int) -> Iterator[None]:
    """Tracing collectives needs a process group; at compile time a fake one stands in for the ranks."""
    import torch.distributed as dist

    if world_size == 1 or dist.is_initialized():
        yield
        return
    stub_process_group(world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_model(opts: CompileOptions, device: str | None = None) -> Transformer:
    """This rank's model, weights uninitialised (the graphs never see their values); `device="meta"`: shapes only."""
    return build_rank_model(opts.config, opts.plan(), dtype=DTYPES[opts.dtype],
                            device=device or opts.device, max_batch_size=opts.max_batch_size,
                            max_seq_len=opts.max_seq_len)


def _inductor_configs(name: str, opts: CompileOptions) -> dict:
    return {
        "aot_inductor.package_constants_in_so": False,
        # Inductor inlines 0-d and <= 8-element constants into the code by default: for us those are runtime data
        # (the rank's vocab/expert offsets, a small model's router bias), never compile-time values.
        "always_keep_tensor_constants": True,
        "aot_inductor.metadata": {"dsv3c_graph": name, "config_hash": opts.config.config_hash()},
    }


# Prefill graphs: rows up to this many elements are reduced in one pass whatever Inductor's reduction hint (its
# default: rows up to 1024 with an INNER hint). 16B's hidden size is 2048: the prefill kernel that sums each token's
# expert outputs, adds the residual and applies the next RMSNorm looped over the row twice, reading the [T, 6, 2048]
# expert outputs twice (2.0 ms of the 4095-token prefill at f26559c; its hint is not INNER). Decode graphs keep the
# default (their norm kernels measured slower in one pass: 2.5 -> 3.1 us).
ONE_PASS_ROW_MAX = 2048


@contextmanager
def _one_pass_rows(enabled: bool) -> Iterator[None]:
    """Inductor's persistent-reduction choice widened to rows of ONE_PASS_ROW_MAX with exact bounds, through its
    out-of-tree heuristics hook (`V.set_choices_handler`)."""
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.virtualized import V
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        yield
        return

    class Choices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            return (torch._inductor.config.triton.persistent_reductions and not cooperative_reduction
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, ONE_PASS_ROW_MAX))

    with V.set_choices_handler(Choices()):
        yield


@contextmanager
def _fresh_int_arrays() -> Iterator[None]:
    """Work around a torch 2.11 AOTInductor code-generation error seen on the H200 for the full 16B graph
    (`int_array_451 was not declared in this scope` in wrapper.cpp): the C++ wrapper caches each shape/stride
    array declaration and reuses its name later, even where the first declaration sat in a nested scope. Here
    every use declares its own array, which is valid wherever it lands (more lines of C++, same machine code).
    Checked on CPU builds (CI); on CUDA it is the candidate fix, not yet confirmed on the device."""
    try:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    except ImportError:
        yield
        return
    impl = getattr(CppWrapperCpu, "_codegen_int_array_var_impl", None)
    if impl is None:
        yield
        return
    original = CppWrapperCpu.codegen_int_array_var

    def uncached(self, int_array, writeline, known_statically=False, graph=None):
        return impl(self, int_array, writeline, known_statically)

    CppWrapperCpu.codegen_int_array_var = uncached
    try:
        yield
    finally:
        CppWrapperCpu.codegen_int_array_var = original


@dataclass(frozen=True)
class GraphSpec:
    name: str
    kind: str  # "decode" (static batch bucket) or "prefill" (dynamic chunk length, or static: width)
    batch: int = 1  # decode: the bucket; prefill: the most rows per call (dynamic when > 1; static: the rows)
    first_chunk: bool = False  # prefill: the graph for chunks at position 0 (no cached prefix)
    width: int = 0  # prefill: a static chunk length (and `batch` static rows); 0: dynamic

    def manifest_entry(self, opts: CompileOptions) -> dict:
        if self.kind == "decode":
            return {"file": f"{self.name}.pt2", "kind": "decode", "batch": self.batch}
        entry = {"file": f"{self.name}.pt2", "kind": "prefill", "max_chunk": self.width or opts.prefill_chunk,
                 "first_chunk": self.first_chunk, "max_batch": self.batch}
        if self.width:
            entry["static_shape"] = [self.batch, self.width]
        return entry


def graph_specs(opts: CompileOptions) -> list[GraphSpec]:
    # Two prefill graphs: a prompt's first chunk (position 0) has no cached rows to attend to, so its graph leaves
    # out the absorbed prefix half (two absorption GEMMs, the copies feeding them, an attention kernel that would
    # find nothing); later chunks of a long prompt take the general graph. The first-chunk graph takes several
    # prompts per call (a batch's prompts in one pass over the weights instead of one pass each).
    # Short prompts also get first-chunk graphs of static shape (opts.short_prefill_shapes()).
    return [GraphSpec(f"decode_b{b}", "decode", b) for b in sorted(set(opts.batch_sizes))] + [
        GraphSpec("prefill_first", "prefill", batch=opts.max_batch_size, first_chunk=True),
        GraphSpec("prefill", "prefill")] + [
        GraphSpec(f"prefill_first_{r}x{w}", "prefill", batch=r, first_chunk=True, width=w)
        for r, w in opts.short_prefill_shapes()]


def build_graph(opts: CompileOptions, spec: GraphSpec, out: Path, echo: Callable[[str], None] = print
                ) -> dict[str, float]:
    """Export one graph of this rank's model and package it as out/<name>.pt2; returns the stage timings.
    Self-contained (builds its own model) so that graphs can be built in separate processes."""
    import torch._inductor

    # torch's own pytree code warns about its own deprecated LeafSpec use during export: not actionable here
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    log = StageLog(echo)
    with torch.no_grad(), _process_group(opts.world_size):
        model = build_model(opts)
        if spec.kind == "decode":
            step, args, dynamic = DecodeStep(model), decode_inputs(spec.batch, opts.device), None
        elif spec.width:  # a static (rows, width) first-chunk graph
            step, dynamic = PrefillStep(model, first_chunk=spec.first_chunk), None
            args = prefill_inputs(spec.width, opts.device, rows=spec.batch)
        else:
            seq = torch.export.Dim("seq", min=2, max=opts.prefill_chunk)
            if spec.batch > 1:  # a dynamic row count too (the example has 2 rows: export specializes a size of 1)
                rows = torch.export.Dim("rows", min=1, max=spec.batch)
                dynamic = {"tokens": {0: rows, 1: seq}, "input_pos": {0: rows, 1: seq}, "cache_row": {0: rows},
                           "logits_index": {0: rows}}
            else:
                dynamic = {"tokens": {1: seq}, "input_pos": {1: seq}, "cache_row": None, "logits_index": None}
            step = PrefillStep(model, first_chunk=spec.first_chunk)
            args = prefill_inputs(min(opts.prefill_chunk, 16), opts.device, rows=min(spec.batch, 2))
        with log.stage(f"export {spec.name}"):
            ep = torch.export.export(step, args, dynamic_shapes=dynamic)
        with log.stage(f"aoti {spec.name}"), _fresh_int_arrays(), _one_pass_rows(spec.kind == "prefill"):
            torch._inductor.aoti_compile_and_package(ep, package_path=str(out / f"{spec.name}.pt2"),
                                                     inductor_configs=_inductor_configs(spec.name, opts))
    return log.timings


def _build_graph_in_worker(opts: CompileOptions, spec: GraphSpec, out: str, gpus=None) -> dict[str, float]:
    # gpus: a queue of GPU indices shared by the workers (CUDA builds): take one for this graph, give it back after
    gpu = None if gpus is None else gpus.get()
    try:
        if gpu is not None:
            torch.cuda.set_device(gpu)
        return build_graph(opts, spec, Path(out), echo=lambda line: print(line, flush=True))
    except Exception as e:
        # Inductor's errors can hold frames and other unpicklable state: send the parent a plain error that names
        # the graph and keeps the message and traceback text (the original reached the parent as "cannot pickle
        # 'frame' object", hiding the cause).
        import traceback

        hint = ""
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e):
            hint = ("\n(graphs build in parallel processes, each holding the rank's model on the GPU: a smaller --jobs "
                    "needs less memory; --jobs 1 builds one graph at a time)")
        raise GraphBuildError(f"building graph {spec.name!r} failed: {type(e).__name__}: {e}{hint}\n"
                              f"{traceback.format_exc()[-4000:]}") from None
    finally:
        if gpu is not None:
            gpus.put(gpu)


class GraphBuildError(RuntimeError):
    """A graph build in a worker process failed (the message carries the worker's error and traceback)."""


def gpu_slots(free_bytes: list[int], per_job: float) -> list[int]:
    """The GPU of each build process that fits at once: as many per GPU as 90% of its free memory holds, GPUs
    interleaved (0, 1, ..., 0, 1, ...) so a few graphs spread over the GPUs; at least one slot on GPU 0."""
    fits = [int(f * 0.9 // per_job) for f in free_bytes]
    slots = [gpu for k in range(max(fits, default=0)) for gpu, fit in enumerate(fits) if k < fit]
    return slots or [0]


def _free_gpu_memory() -> list[int]:
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def _per_job_bytes(model: Transformer) -> float:
    # what each graph-building process allocates: the rank's weights and caches + activations, workspace, context
    return model_bytes(model) * 1.1 + (2 << 30)


def default_jobs(opts: CompileOptions, n_graphs: int, model: Transformer) -> int:
    """CUDA: one process per graph, as many as the CPU cores (Inductor also compiles kernels in parallel) and the
    free memory of the visible GPUs allow (a multi-GPU host builds graphs on different GPUs: 671B at world size 8
    is one 81 GiB rank model per process). CPU targets build one graph at a time (CI boxes have few cores)."""
    if opts.device != "cuda":
        return 1
    # 3 processes per 8 cores: on the 16-core H200 host the 16B's 6 graphs built in ~260 s with 6 processes against
    # 371 s with 4 (one per 4 cores, the rule before), each graph's own time unchanged (145-224 s), 2026-11-25
    by_cores = max(1, 3 * (os.cpu_count() or 1) // 8)
    return max(1, min(n_graphs, by_cores, _jobs_that_fit(model)))


def _jobs_that_fit(model: Transformer) -> int:
    """Build processes the visible GPUs' free memory holds at once (`gpu_slots`; at least one)."""
    return len(gpu_slots(_free_gpu_memory(), _per_job_bytes(model)))


def compile_artifacts(opts: CompileOptions, out_dir: str | os.PathLike, *, overwrite: bool = False,
                      echo: Callable[[str], None] = print) -> Path:
    opts.check()
    out = Path(out_dir)
    cxx = os.environ.get("CXX")
    if opts.device == "cuda" and os.path.exists("/usr/bin/g++") and cxx not in (None, "/usr/bin/g++"):
        # Seen on the GPU image: its default compiler wrapper built .so files that segfault at load.
        echo(f"using CXX=/usr/bin/g++ instead of {cxx}")
        os.environ["CXX"] = "/usr/bin/g++"
    log = StageLog(echo)
    t_start = time.perf_counter()
    specs = graph_specs(opts)
    with staged_directory(out, overwrite=overwrite) as tmp:
        with log.stage("model"), _process_group(opts.world_size):
            model = build_model(opts, device="meta")  # shapes only: the manifest's expected weights
            jobs = min(opts.jobs or default_jobs(opts, len(specs), model), len(specs))
            if opts.jobs and opts.device == "cuda":
                fit = _jobs_that_fit(model)
                if jobs > fit:  # the user's count stands (the estimate is a rule of thumb), with the risk named
                    echo(f"warning: --jobs {opts.jobs}: each build process holds this rank's model, about "
                         f"{_per_job_bytes(model) / 2**30:.0f} GiB of GPU memory; the free memory holds {fit} at once, "
                         f"so {jobs} may run out of it (leave --jobs out to build {fit} at a time)")
        echo(f"building {len(specs)} graphs ({', '.join(s.name for s in specs)}), {jobs} at a time")
        if jobs == 1 and opts.device != "cuda":
            for spec in specs:
                log.timings.update(build_graph(opts, spec, tmp, echo))
        else:
            _build_in_parallel(opts, specs, tmp, jobs, _per_job_bytes(model), log, echo)
        graphs = {spec.name: spec.manifest_entry(opts) for spec in specs}
        with log.stage("manifest"):
            (tmp / "config.json").write_text(json.dumps(opts.config.to_hf_dict(), indent=2) + "\n")
            weights = {n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                       for n, t in model.state_dict().items()}
            manifest = {
                "config_name": opts.config.name, "config_hash": opts.config.config_hash(),
                "world_size": opts.world_size, "device": opts.device, "dtype": opts.dtype,
                "all_reduce": opts.plan().all_reduce,
                "batch1_activations": opts.batch1_activations,
                "max_batch_size": opts.max_batch_size, "max_seq_len": opts.max_seq_len,
                "prefill_chunk": opts.prefill_chunk, "batch_sizes": sorted(set(opts.batch_sizes)),
                "short_prefill": [list(rw) for rw in opts.short_prefill_shapes()],
                "graphs": graphs,
                "rank_weights": {"note": "identical shapes on every rank (the rank is a buffer, not baked in)",
                                 "tensors": weights},
                "rank_layout": rank_layout(model),
                "host": host_info(opts.device),
                # trace-time kernel choices pinned through the environment (DSV3_GEMV_VARIANT, DSV3_FP8_GEMM, ...):
                # they change what the packages contain, so the artifact records them
                "kernel_overrides": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DSV3_")},
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": dict(log.timings),
                "build_jobs": jobs,
                "build_wall_seconds": round(time.perf_counter() - t_start, 2),  # stages overlap when jobs > 1
            }
            write_manifest(tmp, manifest)
        if opts.verify:
            with log.stage("verify"):
                _verify_in_fresh_process(tmp, echo)
    echo(f"compiled {len(graphs)} graphs into {out} in {time.perf_counter() - t_start:.1f}s")
    return out


def _build_in_parallel(opts: CompileOptions, specs: list[GraphSpec], tmp: Path, jobs: int, per_job: float,
                       log: StageLog,
                       echo: Callable[[str], None]) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: a CUDA context does not survive fork; each worker builds its own model and prints its own stages.
    # CUDA builds always go through workers, even one at a time: a finished graph's process exits and gives back
    # its rank model (81 GiB for 671B at world size 8), which an in-process build kept alive into the next graph.
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    gpus = manager = None
    if opts.device == "cuda" and torch.cuda.device_count() > 1:
        # one GPU index per concurrent process, spread over the visible GPUs as their free memory allows
        # (one GPU: every process on it, as before; this multi-GPU path has not run on a device yet)
        slots = gpu_slots(_free_gpu_memory(), per_job)
        manager = ctx.Manager()
        gpus = manager.Queue()
        for k in range(jobs):  # --jobs above what fits: the extra processes share GPUs round-robin
            gpus.put(slots[k % len(slots)])
        if len(set(slots[:jobs])) > 1:
            echo(f"building on GPUs {sorted(set(slots[:jobs]))}")
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
            # the longest builds first (prefill graphs: ~250 s against ~180 for a decode graph on the 16B config,
            # H200 host, 2026-11-23): with fewer processes than graphs the decode builds fill in behind them
            order = sorted(specs, key=lambda sp: sp.kind != "prefill")
            futures = {pool.submit(_build_graph_in_worker, opts, spec, str(tmp), gpus): spec for spec in order}
            try:
                for fut in as_completed(futures):
                    log.timings.update(fut.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        if manager is not None:
            manager.shutdown()
    log.timings["graphs (wall)"] = round(time.perf_counter() - t0, 2)
    echo(f"[graphs] {len(specs)} built by {jobs} processes in {time.perf_counter() - t0:.1f}s")


def _verify_in_fresh_process(directory: Path, echo: Callable[[str], None]) -> None:
    proc = subprocess.run([sys.executable, "-m", "dsv3.runtime.verify", str(directory)], capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        echo("  " + line)
    if proc.returncode != 0:
        raise RuntimeError(f"verification of the compiled packages failed:\n{proc.stdout[-4000:]}"
                           f"{proc.stderr[-4000:]}")
