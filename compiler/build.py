"""`dsv3c compile`: prefill and decode graphs -> AOTInductor packages + manifest, without the weights.

Stages, each timed and reported, each writing plain files into a temp directory next to the output:
1. model    build this rank's model (tensor/expert-parallel shard shapes for --world-size) with uninitialised
            weights and static latent caches for (max_batch_size, max_seq_len) on the target device.
            Every rank runs the same graph (the rank is a buffer), so one set of packages serves all ranks.
2. export   torch.export of each graph: decode per batch bucket (static shapes), prefill (dynamic chunk length).
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
from dsv3.model import Transformer
from dsv3.runtime.manifest import host_info, write_manifest
from dsv3.runtime.parallel import ParallelPlan, apply_parallel
from dsv3.runtime.steps import DecodeStep, PrefillStep, decode_inputs, prefill_inputs
from dsv3.staging import staged_directory

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class CompileOptions:
    config: ModelConfig
    world_size: int = 1
    max_batch_size: int = 8
    max_seq_len: int = 4096
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    prefill_chunk: int = 512
    dtype: str = "bfloat16"
    device: str = "cuda"
    verify: bool = True

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
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: use cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible on this build host; use --device cpu "
                              "(tiny configs) or build on a GPU host")
        ParallelPlan(0, self.world_size).check(self.config)


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
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_model(opts: CompileOptions) -> Transformer:
    """This rank's model, weights uninitialised (the graphs never see their values)."""
    model = Transformer(opts.config, dtype=DTYPES[opts.dtype], max_batch_size=opts.max_batch_size,
                        max_seq_len=opts.max_seq_len, device=opts.device)
    return apply_parallel(model, ParallelPlan(0, opts.world_size))


def _inductor_configs(name: str, opts: CompileOptions) -> dict:
    return {
        "aot_inductor.package_constants_in_so": False,
        # Inductor inlines 0-d and <= 8-element constants into the code by default: for us those are runtime data
        # (the rank's vocab/expert offsets, a small model's router bias), never compile-time values.
        "always_keep_tensor_constants": True,
        "aot_inductor.metadata": {"dsv3c_graph": name, "config_hash": opts.config.config_hash()},
    }


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


def _export_and_package(step: torch.nn.Module, args: tuple, dynamic_shapes, name: str, out: Path,
                        opts: CompileOptions, log: StageLog) -> None:
    import torch._inductor

    with log.stage(f"export {name}"):
        ep = torch.export.export(step, args, dynamic_shapes=dynamic_shapes)
    with log.stage(f"aoti {name}"), _fresh_int_arrays():
        torch._inductor.aoti_compile_and_package(ep, package_path=str(out / f"{name}.pt2"),
                                                 inductor_configs=_inductor_configs(name, opts))


def compile_artifacts(opts: CompileOptions, out_dir: str | os.PathLike, *, overwrite: bool = False,
                      echo: Callable[[str], None] = print) -> Path:
    opts.check()
    out = Path(out_dir)
    if opts.device == "cuda" and os.path.exists("/usr/bin/g++") and "CXX" in os.environ:
        # Seen on the GPU image: its default compiler wrapper built .so files that segfault at load.
        echo(f"using CXX=/usr/bin/g++ instead of {os.environ['CXX']}")
        os.environ["CXX"] = "/usr/bin/g++"
    log = StageLog(echo)
    t_start = time.perf_counter()
    # torch's own pytree code warns about its own deprecated LeafSpec use during export: not actionable here
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    with staged_directory(out, overwrite=overwrite) as tmp:
        with torch.no_grad(), _process_group(opts.world_size):
            with log.stage("model"):
                model = build_model(opts)
            graphs = {}
            for b in sorted(set(opts.batch_sizes)):
                name = f"decode_b{b}"
                _export_and_package(DecodeStep(model), decode_inputs(b, opts.device), None, name, tmp, opts, log)
                graphs[name] = {"file": f"{name}.pt2", "kind": "decode", "batch": b}
            seq = torch.export.Dim("seq", min=2, max=opts.prefill_chunk)
            dyn = {"tokens": {1: seq}, "input_pos": {1: seq}, "cache_row": None, "logits_index": None}
            example = prefill_inputs(min(opts.prefill_chunk, 16), opts.device)
            _export_and_package(PrefillStep(model), example, dyn, "prefill", tmp, opts, log)
            graphs["prefill"] = {"file": "prefill.pt2", "kind": "prefill", "max_chunk": opts.prefill_chunk}
        with log.stage("manifest"):
            (tmp / "config.json").write_text(json.dumps(opts.config.to_hf_dict(), indent=2) + "\n")
            weights = {n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                       for n, t in model.state_dict().items()}
            manifest = {
                "config_name": opts.config.name, "config_hash": opts.config.config_hash(),
                "world_size": opts.world_size, "device": opts.device, "dtype": opts.dtype,
                "max_batch_size": opts.max_batch_size, "max_seq_len": opts.max_seq_len,
                "prefill_chunk": opts.prefill_chunk, "batch_sizes": sorted(set(opts.batch_sizes)),
                "graphs": graphs,
                "rank_weights": {"note": "identical shapes on every rank (the rank is a buffer, not baked in)",
                                 "tensors": weights},
                "host": host_info(opts.device),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": dict(log.timings),
            }
            write_manifest(tmp, manifest)
        if opts.verify:
            with log.stage("verify"):
                _verify_in_fresh_process(tmp, echo)
    echo(f"compiled {len(graphs)} graphs into {out} in {time.perf_counter() - t_start:.1f}s")
    return out


def _verify_in_fresh_process(directory: Path, echo: Callable[[str], None]) -> None:
    proc = subprocess.run([sys.executable, "-m", "dsv3.runtime.verify", str(directory)], capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        echo("  " + line)
    if proc.returncode != 0:
        raise RuntimeError(f"verification of the compiled packages failed:\n{proc.stdout[-4000:]}"
                           f"{proc.stderr[-4000:]}")
