"""`dsv3c convert`: pre-shard a Hugging Face checkpoint per rank, dequantize an FP8 one to BF16, or quantize a BF16
one to DeepSeek's FP8 block format.

Pre-sharded layout (`--world-size N`): one safetensors file per rank whose tensors are named and shaped exactly like
that rank's model state (tensor-parallel slices, the rank's routed experts stacked), plus config.json, the
tokenizer files and `dsv3-shards.json`. Loading a rank is then one sequential read with no slicing or stacking.

BF16 (`--dtype bf16`): every FP8 weight times its block scales (edge blocks of any size, e.g. the 576-row kv_a
projection), written as bfloat16 under the same names and shard files, scales dropped, `quantization_config`
removed from config.json, tokenizer files copied: the result loads in transformers as it is.

FP8 (`--dtype fp8`): the inverse, for the checkpoints DeepSeek publishes in BF16 (V2, V2-Lite, V2.5): every
projection that DeepSeek-V3's FP8 checkpoint stores in e4m3 (attention and MLP / expert linears; not the embedding,
the LM head, norms, the router) is quantized in 128x128 blocks (`quantize_weight`: scale = block amax / 448, values
rounded to nearest even in e4m3) and written with its float32 `<name>_scale_inv` in the same shard; config.json gains
DeepSeek's `quantization_config`. The result loads like an FP8 checkpoint (the FP8 kernels, half the weight bytes).

All stream: one tensor in memory at a time (the writer emits the safetensors header first, then each tensor's bytes).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from dsv3.checkpoint import (INDEX_FILE, CheckpointError, CheckpointReader, TensorSpec, checkpoint_inventory,
                             checkpoint_to_param_name, fused_rows_param, fused_rows_view, shared_slots_view,
                             stacked_shared_param, validate)
from dsv3.config import FP8Quantization
from dsv3.kernels.fp8_blocks import FP8_DTYPE, dequantize_weight, quantize_weight
from dsv3.model import Transformer
from dsv3.runtime.parallel import ParallelPlan, build_rank_model
from dsv3.staging import staged_directory

SHARDS_FILE = "dsv3-shards.json"
SHARDS_FORMAT_VERSION = 2  # 2: the rank layout's gate_up_proj (MLP.fuse_gate_up_)
_ST_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
              torch.int64: "I64"}


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def write_safetensors_streaming(path: Path, specs: dict[str, TensorSpec],
                                produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
                                on_tensor: Callable[[int], None] | None = None) -> None:
    """Write a safetensors file holding only one tensor in memory at a time: header from `specs`, then bytes."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, spec in specs.items():
        n = spec.nbytes()
        header[name] = {"dtype": _ST_DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, spec in specs.items():
            t = produce(name).contiguous()
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                raise CheckpointError(f"convert: {name} came out {tuple(t.shape)} {t.dtype}, expected {spec}")
            f.write(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")
            if on_tensor:
                on_tensor(spec.nbytes())


def _copy_side_files(src: Path, dst: Path, cfg_dict: dict) -> None:
    (dst / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    for p in src.iterdir():
        if p.is_file() and ("token" in p.name or p.name in ("generation_config.json", "chat_template.jinja")):
            shutil.copy2(p, dst / p.name)


def convert_to_ranks(checkpoint: str | Path, out: str | Path, world_size: int, *, overwrite: bool = False,
                     progress: bool = True) -> Path:
    reader = CheckpointReader(checkpoint)
    cfg = reader.config
    expected = validate(reader, cfg)
    # at least the checkpoint's bytes (every tensor lands on some rank; replicated ones count once here)
    with staged_directory(out, overwrite=overwrite, needs_bytes=sum(s.nbytes() for s in expected.values())) as tmp:
        for rank in range(world_size):
            plan = ParallelPlan(rank, world_size)
            plan.check(cfg)
            rank_model = build_rank_model(cfg, plan, dtype=torch.bfloat16, device="meta", max_batch_size=1,
                                          max_seq_len=1)
            state = rank_model.state_dict()
            # checkpoint tensors per rank-model tensor: (checkpoint name, placement)
            sources: dict[str, list] = {name: [] for name in state}
            for name, spec in expected.items():
                where = plan.placement(name, spec.shape, cfg)
                if where is not None:
                    param = checkpoint_to_param_name(name)[0]
                    if param not in sources:  # a fused or stacked layout (ParallelPlan): the tensor that holds it
                        fused = fused_rows_param(param)
                        param = fused if fused in sources else stacked_shared_param(param)
                    sources[param].append((name, where))
            specs = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in state.items()}

            def produce(param: str) -> torch.Tensor:
                parts = sources[param]
                if parts[0][1].expert is None and len(parts) == 1:
                    name, where = parts[0]
                    t = reader.get_part(name, where.dim, where.start, where.length)
                    return t if t.dtype == FP8_DTYPE or t.dtype == specs[param].dtype else t.to(specs[param].dtype)
                stacked = torch.empty(specs[param].shape, dtype=specs[param].dtype)
                for name, where in parts:
                    src_param = checkpoint_to_param_name(name)[0]
                    if where.expert is not None:
                        stacked[where.expert].copy_(reader.get(name))
                    elif fused_rows_param(src_param) == param:  # fused attention input projections, or gate + up
                        fused_rows_view(rank_model, stacked, src_param).copy_(
                            reader.get_part(name, where.dim, where.start, where.length))
                    else:  # a shared expert kept as extra slots (world size 1)
                        view = shared_slots_view(stacked, cfg.n_shared_experts, src_param)
                        view.copy_(reader.get(name).reshape(view.shape))
                return stacked

            with tqdm(total=sum(s.nbytes() for s in specs.values()), unit="B", unit_scale=True,
                      desc=f"rank {rank}/{world_size}", disable=not progress, leave=False) as bar:
                write_safetensors_streaming(tmp / rank_file(rank, world_size), specs, produce, on_tensor=bar.update)
        _copy_side_files(reader.path, tmp, cfg.to_hf_dict())
        (tmp / SHARDS_FILE).write_text(json.dumps({
            "format_version": SHARDS_FORMAT_VERSION, "world_size": world_size, "config_hash": cfg.config_hash(),
            "source": str(Path(checkpoint).resolve()),
            "files": {str(r): rank_file(r, world_size) for r in range(world_size)},
        }, indent=2) + "\n")
    return Path(out)


def convert_to_bf16(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False,
                    progress: bool = True) -> Path:
    reader = CheckpointReader(checkpoint)
    cfg = reader.config
    if not cfg.is_fp8:
        raise CheckpointError(f"{checkpoint} is not an FP8 checkpoint (no quantization_config); nothing to dequantize")
    names = [n for n in reader.names() if not n.endswith("_scale_inv")]
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(reader.file_of(n), []).append(n)

    def spec_of(name: str) -> TensorSpec:
        s = reader.spec(name)
        return TensorSpec(s.shape, torch.bfloat16 if s.dtype == FP8_DTYPE else s.dtype)

    def produce(name: str) -> torch.Tensor:
        t = reader.get(name)
        if t.dtype != FP8_DTYPE:
            return t
        scale = name + "_scale_inv"
        if scale not in reader.weight_map:
            raise CheckpointError(f"FP8 tensor {name} has no {scale} in {checkpoint}")
        return dequantize_weight(t, reader.get(scale), torch.bfloat16)

    raw = json.loads((reader.path / "config.json").read_text())
    raw.pop("quantization_config", None)
    with staged_directory(out, overwrite=overwrite, needs_bytes=_shards_bytes(by_file, spec_of)) as tmp:
        _write_shards(reader, tmp, by_file, spec_of, produce, raw, "dequantize to bf16", progress)
    return Path(out)


def _shards_bytes(by_file: dict[str, list[str]], spec_of: Callable[[str], TensorSpec]) -> int:
    return sum(spec_of(n).nbytes() for names in by_file.values() for n in names)


def _write_shards(reader: CheckpointReader, out: Path, by_file: dict[str, list[str]],
                  spec_of: Callable[[str], TensorSpec], produce: Callable[[str], torch.Tensor], config: dict,
                  desc: str, progress: bool) -> None:
    """The HF layout again under `out` (staged): the same shard files holding `by_file`'s names, an index when the
    source had one, config.json = `config`, the tokenizer files."""
    total = _shards_bytes(by_file, spec_of)
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
        for file, file_names in sorted(by_file.items()):
            write_safetensors_streaming(out / file, {n: spec_of(n) for n in file_names}, produce,
                                        on_tensor=bar.update)
            weight_map.update({n: file for n in file_names})
    if (reader.path / INDEX_FILE).exists():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    _copy_side_files(reader.path, out, config)


def quantization_device(device: str = "auto") -> torch.device:
    """Where `convert_to_fp8` does the block arithmetic: 'auto' is the GPU when there is one (the same e4m3 values
    and scales as on the CPU: one correctly rounded division and one round-to-nearest-even cast per element)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def convert_to_fp8(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                   device: str = "auto") -> Path:
    reader = CheckpointReader(checkpoint)
    cfg = reader.config
    if cfg.is_fp8:
        raise CheckpointError(f"{checkpoint} is already an FP8 checkpoint (its config.json has quantization_config); "
                              "nothing to quantize")
    validate(reader, cfg)
    # Which tensors an FP8 checkpoint of this config stores in e4m3 (the MTP layers' too, when present).
    fp8_specs = checkpoint_inventory(cfg.replace(quantization_config=FP8Quantization()), include_mtp=True)
    to_quantize = {n for n in reader.names() if n in fp8_specs and fp8_specs[n].dtype == FP8_DTYPE}
    dev = quantization_device(device)
    by_file: dict[str, list[str]] = {}
    for n in reader.names():
        by_file.setdefault(reader.file_of(n), []).append(n)
        if n in to_quantize:  # the scale goes into the weight's shard, right after it (produced together)
            by_file[reader.file_of(n)].append(n + "_scale_inv")
    scale_specs = {n + "_scale_inv": fp8_specs[n + "_scale_inv"] for n in to_quantize}
    last: dict[str, torch.Tensor] = {}  # the scale of the weight quantized last, until its turn comes

    def spec_of(name: str) -> TensorSpec:
        if name in scale_specs:
            return scale_specs[name]
        s = reader.spec(name)
        return TensorSpec(s.shape, FP8_DTYPE) if name in to_quantize else s

    def produce(name: str) -> torch.Tensor:
        if name in scale_specs:
            return last.pop(name)
        t = reader.get(name)
        if name not in to_quantize:
            return t
        q, s = quantize_weight(t.to(dev))
        last[name + "_scale_inv"] = s.cpu()
        return q.cpu()

    raw = json.loads((reader.path / "config.json").read_text())
    raw["quantization_config"] = FP8Quantization().to_hf()
    with staged_directory(out, overwrite=overwrite, needs_bytes=_shards_bytes(by_file, spec_of)) as tmp:
        _write_shards(reader, tmp, by_file, spec_of, produce, raw, "quantize to fp8", progress)
    return Path(out)


def read_shards_manifest(directory: Path) -> dict | None:
    p = Path(directory) / SHARDS_FILE
    return json.loads(p.read_text()) if p.exists() else None


def load_presharded_(model: Transformer, directory: Path, plan: ParallelPlan, progress: bool = True) -> None:
    """Fill a built (and sharded) rank model from its pre-sharded file: names, shapes, dtypes must match exactly."""
    from safetensors import safe_open

    meta = read_shards_manifest(directory)
    if meta.get("format_version") != SHARDS_FORMAT_VERSION:
        raise CheckpointError(f"{directory} was pre-sharded in rank-layout format {meta.get('format_version')}; this "
                              f"dsv3c reads format {SHARDS_FORMAT_VERSION}: convert again (dsv3c convert) or use the "
                              "HF checkpoint")
    if meta["world_size"] != plan.world_size:
        raise CheckpointError(f"{directory} is pre-sharded for world size {meta['world_size']}, running with "
                              f"{plan.world_size}; convert again with --world-size {plan.world_size} or use the HF "
                              "checkpoint")
    path = Path(directory) / meta["files"][str(plan.rank)]
    state = model.state_dict()
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"rank file {path} is missing, truncated or corrupt ({e}); convert again") from None
    missing = sorted(set(state) - set(f.keys()))
    extra = sorted(set(f.keys()) - set(state))
    if missing or extra:
        raise CheckpointError(f"{path} does not match this model: missing {missing[:5]}, unexpected {extra[:5]}")
    names: Iterable[str] = list(state)
    with tqdm(total=len(state), desc=f"loading rank {plan.rank}", disable=not progress, leave=False) as bar:
        for name in names:
            t = f.get_tensor(name)
            dst = state[name]
            if tuple(t.shape) != tuple(dst.shape) or t.dtype != dst.dtype and dst.dtype == FP8_DTYPE:
                raise CheckpointError(f"{path}: tensor {name} is {tuple(t.shape)} {t.dtype}, the model expects "
                                      f"{tuple(dst.shape)} {dst.dtype}")
            dst.copy_(t if t.dtype == dst.dtype else t.to(dst.dtype))
            bar.update()
    model.refresh_prefill_copies_()
