"""`dsv3c init-random`: a random checkpoint in exactly the Hugging Face layout of DeepSeek's releases.

No real weights can be downloaded here, so tests and benchmarks run on these. Every tensor is drawn from its own
generator seeded by (seed, tensor name), so a tensor's values do not depend on sharding, order or rank:
`random_tensor` regenerates any tensor by name. (CPU and CUDA generators draw different streams for one seed, so
the values equal the files only when generated on the CPU, as init-random does.)

Scales keep activations finite through all layers: linear weights ~ N(0, min(0.02, 1/sqrt(fan_in))), with the
residual-branch outputs (o_proj, down_proj) further divided by sqrt(2 * layers); norms ~ 1 + N(0, 0.05).
FP8 checkpoints quantize each projection in 128x128 blocks (float32 `weight_scale_inv`); embeddings, norms, router
and head stay bfloat16 and the router's correction bias float32, as in the real checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dsv3.checkpoint import INDEX_FILE, SINGLE_FILE, TensorSpec, checkpoint_inventory, iter_shards
from dsv3.config import FP8Quantization, ModelConfig
from dsv3.kernels.fp8_blocks import FP8_DTYPE, quantize_weight
from dsv3.staging import staged_directory

_RESIDUAL_OUT = re.compile(r"\.(o_proj|down_proj)\.weight$")


def parse_size(text: str) -> int:
    """'2GB', '500MB', '64KiB', '1024' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, flags=re.I)
    if not m:
        raise ValueError(f"cannot read size {text!r}: use e.g. 2GB, 500MB or a byte count")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def _generator(seed: int, name: str, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def random_tensor(name: str, spec: TensorSpec, cfg: ModelConfig, seed: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The value init-random writes for checkpoint tensor `name` (FP8 weights: the FP8 values; see scales)."""
    if name.endswith("_scale_inv"):
        raise ValueError("scales come with their weight: use random_weight_fp8")
    g = _generator(seed, name, device)
    shape = spec.shape
    if name.endswith("e_score_correction_bias"):
        return (torch.rand(shape, generator=g, device=device) * 0.1).to(spec.dtype)
    if len(shape) == 1:  # RMSNorm weights
        return (1.0 + 0.05 * torch.randn(shape, generator=g, device=device)).to(spec.dtype)
    fan_in = shape[-1]
    std = min(0.02, 1.0 / math.sqrt(fan_in))
    if _RESIDUAL_OUT.search(name):
        std /= math.sqrt(2 * cfg.num_hidden_layers)
    w = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std
    if spec.dtype == FP8_DTYPE:
        return w  # quantized by the caller together with its scales
    return w.to(spec.dtype)


def random_checkpoint_tensors(name: str, spec: TensorSpec, cfg: ModelConfig, seed: int,
                              device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """{name: tensor} plus, for an FP8 weight, {name + '_scale_inv': block scales}."""
    t = random_tensor(name, spec, cfg, seed, device)
    if spec.dtype != FP8_DTYPE:
        return {name: t}
    q, s = quantize_weight(t)
    return {name: q, name + "_scale_inv": s}


def write_random_checkpoint(cfg: ModelConfig, out_dir: str | os.PathLike, *, dtype: str = "fp8", seed: int = 0,
                            num_layers: int | None = None, max_shard_size: int = 2 * 10**9,
                            overwrite: bool = False, progress: bool = True) -> Path:
    """Write config.json, safetensors shards (+ index), tokenizer files. Atomic: a temp dir renamed at the end."""
    from dsv3.tokenizer import write_tokenizer

    if dtype not in ("fp8", "bf16"):
        raise ValueError(f"dtype must be fp8 or bf16, got {dtype!r}")
    cfg = cfg.replace(quantization_config=FP8Quantization() if dtype == "fp8" else None)
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.num_hidden_layers:
            raise ValueError(f"--num-layers must be between 1 and the config's num_hidden_layers "
                             f"({cfg.num_hidden_layers}), got {num_layers}")
        cfg = cfg.replace(num_hidden_layers=num_layers,
                          first_k_dense_replace=min(cfg.first_k_dense_replace, num_layers))
    out = Path(out_dir)
    specs = checkpoint_inventory(cfg, include_mtp=True)
    # Weight names only: each FP8 weight's scale is produced with it and lands in the same shard.
    weights = [n for n in specs if not n.endswith("_scale_inv")]
    shard_specs = {n: specs[n] for n in weights}
    for n in weights:
        if specs[n].dtype == FP8_DTYPE:  # count the scale's bytes with its weight
            shard_specs[n] = TensorSpec((specs[n].nbytes() + specs[n + "_scale_inv"].nbytes(),), torch.uint8)
    shards = list(iter_shards(weights, shard_specs, max_shard_size))
    total_bytes = sum(shard_specs[n].nbytes() for n in weights)

    with staged_directory(out, overwrite=overwrite, needs_bytes=total_bytes, space_hint=(
            ", or write fewer layers (--num-layers N); run and bench take --random-weights with artifacts: the weights "
            "made on the GPU, no checkpoint")) as tmp:
        weight_map: dict[str, str] = {}
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"init-random {cfg.name or ''}".strip(),
                  disable=not progress) as bar:
            for i, names in enumerate(shards):
                file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                tensors: dict[str, torch.Tensor] = {}
                for n in names:
                    tensors.update(random_checkpoint_tensors(n, specs[n], cfg, seed))
                    bar.update(shard_specs[n].nbytes())
                save_file(tensors, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({n: file for n in tensors})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(specs[n].nbytes() for n in weight_map)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(_json(index))
        (tmp / "config.json").write_text(_json(cfg.to_hf_dict()))
        write_tokenizer(tmp, cfg.vocab_size, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    return out


def _json(obj: object) -> str:
    return json.dumps(obj, indent=2) + "\n"
