"""`dsv3c export-onnx`: one dense block of one layer as an ONNX model, checked in onnxruntime (CPU).

Weights come from a checkpoint (only the tensors the block needs are read, FP8 ones dequantized with their block
scales) or, with a config name, are generated exactly as `init-random` would write them (seed 0), one tensor at a
time, so a real-size layer needs no embedding or other layers in memory. The block (export.blocks) is exported
with `torch.onnx.export(..., dynamo=True)` with dynamic batch and sequence axes; initializers carry the checkpoint
tensor names; metadata_props hold the config JSON, layer, block, source, dtype and opset.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv3.checkpoint import CheckpointError, CheckpointReader, checkpoint_inventory
from dsv3.config import ModelConfig, resolve_config
from dsv3.kernels.fp8_blocks import FP8_DTYPE, dequantize_weight
from dsv3.export.blocks import (BLOCKS, ExportBlock, ExportError, Fp8Linear, Fp8Weight, TensorGetter,
                                check_block)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
OPSETS = (20, 23)
# Relative error bound (max |onnx - torch fp32| / max |torch fp32|) per export dtype. fp16: weights and activations
# are rounded to fp16 on the ONNX side, compared with the fp32 PyTorch block; a few 1e-3 is typical.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# --keep-fp8 runs the W8A8 arithmetic on both sides: an activation on an e4m3 rounding boundary can round one way
# in torch and the other in onnxruntime (1e-7 apart before the cast), one e4m3 step (2^-4 relative) for that element.
KEEP_FP8_TOLERANCE = 1e-2
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with room for the graph itself


# ---------------------------------------------------------------------- weight sources
def checkpoint_source(path: str | os.PathLike, keep_fp8: bool = False) -> tuple[ModelConfig, TensorGetter, str]:
    reader = CheckpointReader(path)
    if keep_fp8 and not reader.config.is_fp8:
        raise ExportError(f"--keep-fp8: {path} is not an FP8 checkpoint (no quantization_config)")
    cfg = reader.config
    specs = checkpoint_inventory(cfg)

    def get(name: str) -> torch.Tensor:
        if name not in reader.weight_map:
            raise CheckpointError(f"tensor {name} is not in checkpoint {reader.path}")
        t = reader.get(name)
        want = specs.get(name)
        if want is not None and tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"tensor {name} in {reader.path}: shape {list(t.shape)}, the config needs "
                                  f"{list(want.shape)}")
        if t.dtype == FP8_DTYPE:
            if keep_fp8:
                return Fp8Weight(t, reader.get(name + "_scale_inv"))
            return dequantize_weight(t, reader.get(name + "_scale_inv"), torch.float32)
        return t.float()

    return cfg, get, str(Path(path).resolve())


def config_source(name: str, seed: int = 0) -> tuple[ModelConfig, TensorGetter, str]:
    """Random weights, tensor by tensor: the values init-random (same seed) writes for these names."""
    from dsv3.init_random import random_checkpoint_tensors

    cfg = resolve_config(name)
    specs = checkpoint_inventory(cfg)  # built on the meta device: no allocation

    def get(tname: str) -> torch.Tensor:
        ts = random_checkpoint_tensors(tname, specs[tname], cfg, seed)
        t = ts[tname]
        if t.dtype == FP8_DTYPE:
            return dequantize_weight(t, ts[tname + "_scale_inv"], torch.float32)
        return t.float()

    return cfg, get, f"config:{cfg.name or name} (random weights, seed {seed})"


# ---------------------------------------------------------------------- export
@dataclass
class ExportResult:
    path: Path
    summary: dict[str, Any]
    verify: dict[str, Any] | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verify is None or bool(self.verify["ok"])


def build_block(cfg: ModelConfig, get: TensorGetter, block: str, layer: int, dtype: str) -> ExportBlock:
    check_block(cfg, block, layer)
    return ExportBlock(cfg, block, layer, get, DTYPES[dtype]).eval()


def _dynamic_shapes() -> tuple[dict[int, Any], ...]:
    return ({0: torch.export.Dim("batch", min=1, max=4096), 1: torch.export.Dim("seq", min=1, max=1 << 20)},)


def example_input(module: ExportBlock, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, module.cfg.hidden_size, generator=g).to(module.dtype)


def export_module(module: ExportBlock, out: str | os.PathLike, *, opset: int, seq_len: int,
                  metadata: dict[str, str]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = example_input(module, 2, max(seq_len, 2))
    from dsv3.export.translations import translation_table

    program = torch.onnx.export(
        module, (x,), dynamo=True, dynamic_shapes=_dynamic_shapes(), opset_version=opset,
        input_names=module.input_names, output_names=module.output_names, optimize=False, verbose=False,
        custom_translation_table=translation_table(),
    )
    model = program.model  # onnx_ir Model
    params = dict(module.named_parameters())
    _fix_initializer_names(model, params)
    _optimize(model, set(params))
    model.metadata_props.update(metadata)
    model.producer_name = "dsv3c export-onnx"
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    for f in (out, out.with_name(out.name + ".data")):
        if f.exists():
            f.unlink()
    program.save(str(out), external_data=nbytes > EXTERNAL_DATA_BYTES)
    return out


def _optimize(model, keep: set[str]) -> None:
    """The exporter's default optimisation, except that a weight's Transpose (from F.linear) is not folded into an
    anonymous transposed copy: the initializer keeps its checkpoint name and [out, in] layout, as in the checkpoint.
    """
    import onnxscript.optimizer
    from onnxscript import ir

    def should_fold(node) -> bool | None:
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Transpose":
            src = node.inputs[0]
            if src is not None and src.name in keep and src.is_initializer():
                return False
        # --keep-fp8: folding the dequantization would store every FP8 weight as a float copy (4x the bytes) and
        # drop the checkpoint's scale tensors; keep anything that reads an FP8 weight or a block scale.
        for src in node.inputs:
            if src is not None and src.is_initializer() and src.name in keep and (
                    src.name.endswith("_scale_inv") or src.dtype == ir.DataType.FLOAT8E4M3FN):
                return False
        return None

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)


def _fix_initializer_names(model, params: dict[str, torch.nn.Parameter]) -> None:
    """Make every weight initializer carry its checkpoint name (the parameter's fully qualified name)."""
    inits = model.graph.initializers
    missing = [n for n in params if n not in inits]
    if not missing:
        return
    # The exporter may prefix or mangle names (e.g. "p_model_layers_0_..."): map by the mangled spelling.
    def mangle(n: str) -> str:
        return n.replace(".", "_").lower()

    by_mangled = {mangle(n): n for n in missing}
    for old in list(inits):
        key = mangle(old)
        for pre in ("p_", "b_", ""):
            if key.startswith(pre) and key[len(pre):] in by_mangled:
                value = inits.pop(old)
                value.name = by_mangled.pop(key[len(pre):])
                inits[value.name] = value
                break


def _metadata(cfg: ModelConfig, block: str, layer: int, source: str, dtype: str, opset: int) -> dict[str, str]:
    from dsv3 import __version__

    return {
        "dsv3.config": json.dumps(cfg.to_hf_dict(), sort_keys=True),
        "dsv3.config_name": cfg.name or "",
        "dsv3.block": block,
        "dsv3.layer": str(layer),
        "dsv3.source": source,
        "dsv3.dtype": dtype,
        "dsv3.opset": str(opset),
        "dsv3.version": __version__,
    }


# ---------------------------------------------------------------------- summary
def _dims(value_info) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _elem_type_name(value_info) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(value_info.type.tensor_type.elem_type).lower()


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    for fn in proto.functions:
        ops.update(n.op_type for n in fn.node)
    files = {path}
    params = 0
    for init in proto.graph.initializer:
        params += math.prod(init.dims)
        for kv in init.external_data:
            if kv.key == "location":
                files.add(path.parent / kv.value)
    return {
        "ops": dict(ops.most_common()),
        "num_nodes": len(proto.graph.node),
        "parameters": params,
        "initializers": [i.name for i in proto.graph.initializer],
        "inputs": [(v.name, _elem_type_name(v), _dims(v)) for v in proto.graph.input],
        "outputs": [(v.name, _elem_type_name(v), _dims(v)) for v in proto.graph.output],
        "file_bytes": sum(f.stat().st_size for f in files if f.exists()),
        "external_data": len(files) > 1,
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "metadata": {p.key: p.value for p in proto.metadata_props},
    }


def format_summary(s: dict[str, Any], top: int = 12) -> str:
    lines = [f"ops ({s['num_nodes']} nodes, opset {s['opset']}): "
             + ", ".join(f"{op} {n}" for op, n in list(s["ops"].items())[:top])
             + (" ..." if len(s["ops"]) > top else "")]
    lines.append(f"parameters: {s['parameters']:,} in {len(s['initializers'])} initializers")
    for kind in ("inputs", "outputs"):
        for name, dt, dims in s[kind]:
            lines.append(f"{kind[:-1]}: {name} {dt} [{', '.join(str(d) for d in dims)}]")
    size = s["file_bytes"]
    lines.append(f"file size: {size / 1e6:.2f} MB" + (" (weights in external data)" if s["external_data"] else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------- verification
def check(path: str | os.PathLike) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)  # a path works for any size (external data)


def run_onnx(path: str | os.PathLike, x: torch.Tensor) -> list:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def _compare_router(ref: tuple[torch.Tensor, torch.Tensor], got: list) -> dict[str, Any]:
    ref_idx, ref_w = ref
    got_idx, got_w = torch.from_numpy(got[0]).long(), torch.from_numpy(got[1]).float()
    k = ref_idx.shape[-1]
    ri, rw = ref_idx.reshape(-1, k), ref_w.reshape(-1, k).float()
    gi, gw = got_idx.reshape(-1, k), got_w.reshape(-1, k)
    ro, go = ri.sort(-1), gi.sort(-1)
    same = (ro.values == go.values).all(-1)
    rw, gw = rw.gather(1, ro.indices), gw.gather(1, go.indices)
    err = (rw[same] - gw[same]).abs().max().item() if same.any() else float("inf")
    scale = rw.abs().max().item() or 1.0
    return {"max_abs": err, "rel": err / scale, "index_mismatch_tokens": int((~same).sum())}


def verify(path: str | os.PathLike, module: ExportBlock, reference: ExportBlock, *, dtype: str, seq_len: int,
           shapes: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """onnx.checker full check, then ORT (CPU) vs the fp32 PyTorch block on random inputs of several shapes."""
    check(path)
    keeps_fp8 = any(isinstance(m, Fp8Linear) for m in module.modules())
    tol = max(TOLERANCE[dtype], KEEP_FP8_TOLERANCE) if keeps_fp8 else TOLERANCE[dtype]
    shapes = shapes or [(2, seq_len), (1, seq_len + 3)]
    runs = []
    for i, (b, s) in enumerate(shapes):
        x = example_input(module, b, s, seed=1 + i)
        with torch.no_grad():
            ref = reference(x.float())
        got = run_onnx(path, x)
        if module.block == "router":
            r = _compare_router(ref, got)
            r["ok"] = r["index_mismatch_tokens"] == 0 and r["rel"] <= tol
        else:
            g = torch.from_numpy(got[0]).float()
            if tuple(g.shape) != tuple(ref.shape):
                r = {"max_abs": float("inf"), "rel": float("inf"), "ok": False,
                     "error": f"shape {list(g.shape)} != {list(ref.shape)}"}
            else:
                err = (g - ref).abs().max().item()
                r = {"max_abs": err, "rel": err / (ref.abs().max().item() or 1.0)}
                r["ok"] = math.isfinite(err) and r["rel"] <= tol
        r["shape"] = (b, s)
        runs.append(r)
    return {
        "ok": all(r["ok"] for r in runs), "tolerance": tol, "runs": runs,
        "max_abs": max(r["max_abs"] for r in runs), "rel": max(r["rel"] for r in runs),
    }


def format_verify(v: dict[str, Any]) -> str:
    lines = []
    for r in v["runs"]:
        extra = f", index mismatches {r['index_mismatch_tokens']} tokens" if "index_mismatch_tokens" in r else ""
        lines.append(f"verify (batch {r['shape'][0]}, seq {r['shape'][1]}): max abs {r['max_abs']:.3e}, "
                     f"rel {r['rel']:.3e}{extra} -> {'ok' if r['ok'] else 'FAIL'}")
    lines.append(f"verify: {'passed' if v['ok'] else 'FAILED'} (relative tolerance {v['tolerance']:g}, "
                 "onnxruntime CPU vs PyTorch fp32)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the whole command
def export_onnx(*, block: str, layer: int, out: str | os.PathLike, checkpoint: str | None = None,
                config: str | None = None, opset: int = 20, dtype: str = "fp32", seq_len: int = 16,
                do_verify: bool = True, seed: int = 0, keep_fp8: bool = False) -> ExportResult:
    if (checkpoint is None) == (config is None):
        raise ExportError("give exactly one of --checkpoint or --config")
    if block not in BLOCKS:
        raise ExportError(f"unknown block {block!r}: choose one of {', '.join(BLOCKS)}")
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported: use one of {OPSETS}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)} "
                          "(bf16 does not run in onnxruntime's CPU provider)")
    if seq_len < 1:
        raise ExportError(f"--seq-len must be >= 1, got {seq_len}")
    if keep_fp8 and checkpoint is None:
        raise ExportError("--keep-fp8 needs --checkpoint with an FP8 checkpoint")
    cfg, get, source = (checkpoint_source(checkpoint, keep_fp8) if checkpoint is not None
                        else config_source(config, seed))
    check_block(cfg, block, layer)
    cache: dict[str, torch.Tensor] = {}

    def cached_get(name: str) -> torch.Tensor:  # read/generate once, even when the fp32 reference is built too
        if name not in cache:
            cache[name] = get(name)
        return cache[name]

    module = build_block(cfg, cached_get if do_verify and dtype != "fp32" else get, block, layer, dtype)
    path = export_module(module, out, opset=opset, seq_len=seq_len,
                         metadata=_metadata(cfg, block, layer, source, dtype, opset))
    result = ExportResult(path=path, summary=summarize(path))
    if do_verify:
        reference = module if dtype == "fp32" else build_block(cfg, cached_get, block, layer, "fp32")
        result.verify = verify(path, module, reference, dtype=dtype, seq_len=seq_len)
    return result
