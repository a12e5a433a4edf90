"""Hugging Face-layout checkpoints: inventory, memory-mapped reading, validation and loading.

Layout: `config.json`, then either `model.safetensors.index.json` + shards or one `model.safetensors`. FP8
checkpoints store each projection as float8_e4m3fn plus a float32 `<name>_scale_inv`; routed experts are one tensor
per expert; the MTP layers (`model.layers.{num_hidden_layers + k}`) are recognised and skipped.

Everything is checked before any weight is copied, and all problems are reported together, each naming the tensor,
its file and expected versus found; then tensors stream one at a time from the memory-mapped shards into the model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from dsv3.config import ConfigError, ModelConfig, ceil_div, default_max_seq_len, load_config_file
from dsv3.kernels.fp8_blocks import BLOCK, FP8_DTYPE
from dsv3.model import Block, Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The dtype every non-FP8 tensor has in a DeepSeek checkpoint (bias and scales excepted).
CHECKPOINT_DTYPE = torch.bfloat16
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E5M2": torch.float8_e5m2,
}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(Exception):
    """The checkpoint on disk does not match what the config says the model needs."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Placement:
    """Which part of a checkpoint tensor one rank loads: a slice along `dim` (None: all of it), and for a routed
    expert the slot in the rank's stacked expert tensor (None: the expert's global index)."""

    dim: int | None = None
    start: int = 0
    length: int = 0
    expert: int | None = None


def _fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# ---------------------------------------------------------------------- names
def param_to_checkpoint_names(param: str, num_experts: int) -> list[tuple[str, int | None]]:
    """Model parameter name -> checkpoint tensor names (one per expert for stacked expert tensors)."""
    m = re.match(r"^(layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$", param)
    if m:
        suffix = "weight_scale_inv" if m.group(3) else "weight"
        return [(f"model.{m.group(1)}.{e}.{m.group(2)}.{suffix}", e) for e in range(num_experts)]
    if param.startswith("lm_head."):
        return [(param, None)]
    return [(f"model.{param}", None)]


def checkpoint_to_param_name(name: str) -> tuple[str, int | None]:
    """Checkpoint tensor name -> (model parameter name, expert index or None)."""
    m = _EXPERT.match(name)
    if m:
        layer, expert, proj, kind = m.groups()
        return f"layers.{layer}.mlp.experts.{proj}{'_scale_inv' if kind == 'weight_scale_inv' else ''}", int(expert)
    if name.startswith("model."):
        return name[len("model."):], None
    return name, None


_SHARED_PARAM = re.compile(r"^(layers\.\d+\.mlp)\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight(_scale_inv)?$")


def stacked_shared_param(param: str) -> str | None:
    """For a shared-expert parameter name, the stacked routed-experts tensor that holds it when the layer stacks its
    shared experts after the routed ones (MoE.stack_shared_); None for any other name."""
    m = _SHARED_PARAM.match(param)
    return None if m is None else f"{m.group(1)}.experts.{m.group(2)}{m.group(3) or ''}"


def shared_slots_view(stack: torch.Tensor, n_shared: int, param: str) -> torch.Tensor:
    """The view of the last n_shared = S slots of `stack` ([E + S, n, k]) that checkpoint tensor `param` of the
    shared MLP (width S*I) fills, in the checkpoint's element order: gate/up rows [S*I, D] (scales [S*I/128, D/128])
    are the slots one after another; down columns [D, S*I] are [D, S, I] (slot s holds columns s*I .. (s+1)*I),
    so the checkpoint tensor goes in as `src.reshape(view.shape)`."""
    slots = stack[stack.shape[0] - n_shared:]
    if ".down_proj." in param:
        return slots.permute(1, 0, 2)
    return slots.reshape(n_shared * slots.shape[1], -1)  # a view: the slots are contiguous


# Linears the rank layout stores as one linear of stacked rows: (pattern, fused linear's name, the module's
# {part: (first row, rows)} attribute). Attention input projections (MLA.fuse_input_projections_) and the gate / up
# projections of dense MLPs and shared experts (MLP.fuse_gate_up_; not the stacked routed experts).
_FUSED_ROWS = (
    (re.compile(r"^(layers\.\d+\.self_attn)\.(q_proj|q_a_proj|kv_a_proj_with_mqa)\.weight(_scale_inv)?$"),
     "qkv_a_proj", "qkv_a_rows"),
    (re.compile(r"^(layers\.\d+\.mlp(?:\.shared_experts)?)\.(gate_proj|up_proj)\.weight(_scale_inv)?$"),
     "gate_up_proj", "gate_up_rows"),
)


def _fused_rows_match(param: str):
    for pattern, fused, rows_attr in _FUSED_ROWS:
        m = pattern.match(param)
        if m is not None:
            return m, fused, rows_attr
    return None, None, None


def fused_rows_param(param: str) -> str | None:
    """For a linear the rank layout may fuse with its neighbour (an attention input projection: q_proj / q_a_proj /
    kv_a_proj_with_mqa; an MLP's gate_proj / up_proj; weight or scale), the fused tensor that holds it when the
    module fuses them (`qkv_a_proj`, `gate_up_proj`); else None."""
    m, fused, _ = _fused_rows_match(param)
    return None if m is None else f"{m.group(1)}.{fused}.weight{m.group(3) or ''}"


def fused_rows_view(model: torch.nn.Module, fused: torch.Tensor, param: str) -> torch.Tensor:
    """The rows of `fused` (the module's fused weight, or its block scales) that checkpoint tensor `param` fills:
    its part's rows in the stacking order (q then kv_a; gate then up; scales in 128-row blocks, each part but the
    last ending on a block)."""
    m, _, rows_attr = _fused_rows_match(param)
    start, n = getattr(model.get_submodule(m.group(1)), rows_attr)[m.group(2)]
    if m.group(3):
        start, n = start // BLOCK, ceil_div(n, BLOCK)
    return fused[start:start + n]


def _checkpoint_dtype(param: str, dtype: torch.dtype) -> torch.dtype:
    if dtype == FP8_DTYPE:
        return FP8_DTYPE
    if param.endswith(("_scale_inv", "e_score_correction_bias")):
        return torch.float32
    return CHECKPOINT_DTYPE


def checkpoint_inventory(cfg: ModelConfig, include_mtp: bool = False) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint of this config holds, with its shape and on-disk dtype, in model order."""
    with torch.device("meta"):
        model = Transformer(cfg, dtype=CHECKPOINT_DTYPE, max_batch_size=1, max_seq_len=1)
    out: dict[str, TensorSpec] = {}
    for param, t in model.state_dict().items():
        names = param_to_checkpoint_names(param, cfg.n_routed_experts)
        shape = tuple(t.shape[1:]) if names[0][1] is not None else tuple(t.shape)
        for name, _ in names:
            out[name] = TensorSpec(shape, _checkpoint_dtype(param, t.dtype))
    if include_mtp:
        out.update(mtp_inventory(cfg))
    return out


def mtp_inventory(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Tensors of the multi-token-prediction layers (kept loadable; not used by generation yet)."""
    out: dict[str, TensorSpec] = {}
    d, bf = cfg.hidden_size, CHECKPOINT_DTYPE
    for k in range(cfg.num_nextn_predict_layers):
        layer = cfg.num_hidden_layers + k
        with torch.device("meta"):
            block = Block(cfg, layer, CHECKPOINT_DTYPE, 1, 1)
        prefix = f"model.layers.{layer}."
        for param, t in block.state_dict().items():
            names = param_to_checkpoint_names(f"layers.{layer}.{param}", cfg.n_routed_experts)
            shape = tuple(t.shape[1:]) if names[0][1] is not None else tuple(t.shape)
            for name, _ in names:
                out[name] = TensorSpec(shape, _checkpoint_dtype(param, t.dtype))
        out[prefix + "embed_tokens.weight"] = TensorSpec((cfg.vocab_size, d), bf)
        out[prefix + "enorm.weight"] = TensorSpec((d,), bf)
        out[prefix + "hnorm.weight"] = TensorSpec((d,), bf)
        out[prefix + "eh_proj.weight"] = TensorSpec((d, 2 * d), bf)
        out[prefix + "shared_head.norm.weight"] = TensorSpec((d,), bf)
        out[prefix + "shared_head.head.weight"] = TensorSpec((cfg.vocab_size, d), bf)
    return out


def is_mtp_tensor(name: str, cfg: ModelConfig) -> bool:
    m = _LAYER.match(name)
    return bool(m) and cfg.num_hidden_layers <= int(m.group(1)) < cfg.num_hidden_layers + cfg.num_nextn_predict_layers


# ---------------------------------------------------------------------- reading
class CheckpointReader:
    """Memory-mapped access to the tensors of one HF-layout checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        cfg_path = self.path / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{self.path} has no config.json: not a Hugging Face checkpoint directory")
        try:
            self.config = load_config_file(cfg_path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self._handles: dict[str, object] = {}
        self._headers: dict[str, dict[str, TensorSpec]] = {}
        self.weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}); "
                                      "re-create the checkpoint or its index") from None
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            absent = [f"{file} ({len(names)} tensors, e.g. {names[0]}) does not exist"
                      for file, names in sorted(files.items()) if not (self.path / file).exists()]
            if absent:
                raise CheckpointError(
                    f"{INDEX_FILE} in {self.path} names {len(absent)} missing shard file(s): " + "; ".join(absent)
                    + ". The download or copy is incomplete."
                )
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if single.exists():
            return {name: SINGLE_FILE for name in self.header(SINGLE_FILE)}
        raise CheckpointError(f"{self.path} has neither {INDEX_FILE} nor {SINGLE_FILE}")

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers and short files
                raise CheckpointError(
                    f"shard {self.path / file} is truncated or corrupt ({e}); re-download or re-create it"
                ) from None
        return self._handles[file]

    def header(self, file: str) -> dict[str, TensorSpec]:
        if file not in self._headers:
            h = self._open(file)
            specs = {}
            for name in h.keys():
                sl = h.get_slice(name)
                dt = SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dt is None:
                    raise CheckpointError(f"tensor {name} in {file} has unsupported dtype {sl.get_dtype()}")
                specs[name] = TensorSpec(tuple(sl.get_shape()), dt)
            self._headers[file] = specs
        return self._headers[file]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def spec(self, name: str) -> TensorSpec:
        file = self.weight_map[name]
        header = self.header(file)
        if name not in header:
            raise CheckpointError(f"{INDEX_FILE} places {name} in {file}, but that shard does not contain it")
        return header[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped (a view of the page cache until it is copied)."""
        return self._open(self.weight_map[name]).get_tensor(name)

    def get_part(self, name: str, dim: int | None, start: int, length: int) -> torch.Tensor:
        """Rows or columns [start, start+length) along `dim` (None: the whole tensor), read from the mmap."""
        if dim is None:
            return self.get(name)
        sl = self._open(self.weight_map[name]).get_slice(name)
        index = (slice(None),) * dim + (slice(start, start + length),)
        return sl[index]

    def file_of(self, name: str) -> str:
        return self.weight_map[name]


# ---------------------------------------------------------------------- validation and loading
def _dtype_ok(expected: torch.dtype, found: torch.dtype) -> bool:
    if expected == FP8_DTYPE:
        return found == FP8_DTYPE
    if expected == torch.float32:  # scales and the correction bias: any float that is not FP8
        return found in _FLOAT_DTYPES
    return found in _FLOAT_DTYPES


def validate(reader: CheckpointReader, cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Check names, shapes and dtypes of every tensor the model needs; raise one error listing all problems."""
    expected = checkpoint_inventory(cfg)
    problems: list[str] = []
    # Read every shard's header, also shards holding only tensors we skip (MTP): a damaged file is reported now.
    for file in sorted(set(reader.weight_map.values())):
        try:
            reader.header(file)
        except CheckpointError as e:
            problems.append(str(e))
    present = set(reader.names())
    missing = [n for n in expected if n not in present]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): " + ", ".join(missing[:8])
                        + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else ""))
    full_layers = reader.config.num_hidden_layers
    unexpected = []
    for n in reader.names():
        if n in expected or is_mtp_tensor(n, reader.config):
            continue
        m = _LAYER.match(n)
        if m and cfg.num_hidden_layers <= int(m.group(1)) < full_layers:
            continue  # a deliberately truncated load (num_layers) skips the later layers
        unexpected.append(n)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): " + ", ".join(unexpected[:8])
                        + (f", ... ({len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    for name, want in expected.items():
        if name not in present:
            continue
        try:
            got = reader.spec(name)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        where = f"tensor {name} (in {reader.file_of(name)})"
        if got.shape != want.shape:
            problems.append(f"{where}: expected shape {_fmt_shape(want.shape)}, found {_fmt_shape(got.shape)}")
        elif not _dtype_ok(want.dtype, got.dtype):
            problems.append(f"{where}: expected dtype {_dtype_name(want.dtype)}, found {_dtype_name(got.dtype)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {reader.path} does not match its config ({cfg.name or 'config.json'}):\n  - "
            + "\n  - ".join(problems)
            + "\nThe weights were not loaded. Check that config.json belongs to these shards "
              "(and that quantization_config is present exactly when the weights are FP8)."
        )
    return expected


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def load_state(model: Transformer, reader: CheckpointReader, *, progress: bool = True,
               placement: Callable[[str, tuple[int, ...]], Placement | None] | None = None) -> None:
    """Validate, then stream the tensors from the shards into the model's parameters and buffers.

    placement(name, full_shape): which part of each tensor this model (rank) holds; None skips the tensor. Only
    that part is read from the memory-mapped file.
    """
    cfg = model.cfg
    expected = validate(reader, cfg)
    state = model.state_dict()
    todo: list[tuple[str, Placement]] = []
    for name, spec in expected.items():
        where = Placement() if placement is None else placement(name, spec.shape)
        if where is not None:
            todo.append((name, where))
    # Read shard by shard so each file's pages are touched once, in order.
    todo.sort(key=lambda item: (reader.file_of(item[0]), item[0]))
    total = sum(expected[n].nbytes() for n, _ in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {reader.path.name}", disable=not progress,
              leave=False) as bar:
        for name, where in todo:
            param, expert = checkpoint_to_param_name(name)
            src = reader.get_part(name, where.dim, where.start, where.length)
            if where.expert is not None:
                expert = where.expert
            if param not in state and fused_rows_param(param) in state:  # q + kv_a, or gate + up, as one linear
                dst = fused_rows_view(model, state[fused_rows_param(param)], param)
            elif param not in state and stacked_shared_param(param) in state:  # shared experts stacked as slots
                dst = shared_slots_view(state[stacked_shared_param(param)], cfg.n_shared_experts, param)
                if src.dim() == 2 and dst.dim() == 3 and src.numel() == dst.numel():
                    src = src.reshape(dst.shape)  # down_proj columns [D, S*I] as [D, S, I]
            else:
                dst = state[param] if expert is None else state[param][expert]
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError(f"tensor {name}: this rank's part has shape {_fmt_shape(src.shape)} but the "
                                      f"model expects {_fmt_shape(dst.shape)}")
            dst.copy_(src if src.dtype == dst.dtype or dst.dtype == FP8_DTYPE else src.to(dst.dtype))
            bar.update(expected[name].nbytes())
    model.refresh_prefill_copies_()  # a laid-out model's copies of the weights (Transformer.add_prefill_copies_)


def load(checkpoint_dir: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
         device: torch.device | str = "cpu", max_batch_size: int = 1, max_seq_len: int | None = None,
         num_layers: int | None = None, progress: bool = True,
         prepare: Callable[[Transformer], Callable[[str, tuple[int, ...]], Placement | None] | None] | None = None,
         ) -> Transformer:
    """Build the model for a checkpoint directory and load its weights (FP8 weights stay FP8).

    dtype: activations and non-FP8 weights. max_seq_len: latent-cache capacity (default min(4096, max positions)).
    num_layers: load only the first N decoder layers (for a quick look at a model too big for the host).
    prepare(model): called on the model while it is still on the meta device (e.g. to shard it for tensor
    parallel), so only what it keeps is ever allocated; returns the placement function for load_state, or None
    to load every tensor whole.
    """
    reader = CheckpointReader(checkpoint_dir)
    cfg = reader.config
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.num_hidden_layers:
            raise ConfigError(f"num_layers = {num_layers}: must be between 1 and num_hidden_layers "
                              f"({cfg.num_hidden_layers}) of {checkpoint_dir}")
        cfg = cfg.replace(num_hidden_layers=num_layers, num_nextn_predict_layers=0,
                          first_k_dense_replace=min(cfg.first_k_dense_replace, num_layers))
    max_seq_len = max_seq_len or default_max_seq_len(cfg)
    model = Transformer(cfg, dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len, device="meta")
    placement = prepare(model) if prepare is not None else None
    model.materialize_(device)
    load_state(model, reader, progress=progress, placement=placement)
    return model


def iter_shards(names: list[str], specs: dict[str, TensorSpec], max_shard_bytes: int) -> Iterator[list[str]]:
    """Group tensors in order into shards of at most max_shard_bytes (a larger tensor gets a shard of its own)."""
    shard: list[str] = []
    size = 0
    for n in names:
        b = specs[n].nbytes()
        if shard and size + b > max_shard_bytes:
            yield shard
            shard, size = [], 0
        shard.append(n)
        size += b
    if shard:
        yield shard
