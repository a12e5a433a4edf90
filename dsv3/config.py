"""Model configuration: one immutable dataclass in Hugging Face `config.json` field names.

`ModelConfig.from_hf_dict` reads a checkpoint's `config.json` (DeepSeek-V2, V2-Lite and V3 layouts, legacy
`rope_scaling` or transformers-5 `rope_parameters`), validates every field and names the bad one in the error.
`resolve_config` takes what users type after `--config`: a shipped name (`671B`, `16B`, `tiny`, ...), a path to a
JSON file, or a checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
FP8_BLOCK = 128


class ConfigError(ValueError):
    """A config value is missing or violates a constraint; the message names the field."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE extension (`rope_scaling` with type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # HF semantics: `mscale` and `mscale_all_dim` may be absent (None); see dsv3.rope for how each is used.
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "yarn",
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }
        if self.mscale is not None:
            out["mscale"] = self.mscale
        if self.mscale_all_dim is not None:
            out["mscale_all_dim"] = self.mscale_all_dim
        if not self.truncate:
            out["truncate"] = False
        return out


@dataclass(frozen=True)
class FP8Quantization:
    """`quantization_config` of DeepSeek's FP8 checkpoints: e4m3 weights with 128x128 block scales."""

    weight_block_size: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)
    activation_scheme: str = "dynamic"
    fmt: str = "e4m3"

    def to_hf(self) -> dict[str, Any]:
        return {
            "activation_scheme": self.activation_scheme,
            "fmt": self.fmt,
            "quant_method": "fp8",
            "weight_block_size": list(self.weight_block_size),
        }


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V2/V3 architecture. Field names and meanings are those of Hugging Face `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: queries are projected directly (q_proj), as in V2-Lite
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    norm_topk_prob: bool = False
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    quantization_config: FP8Quantization | None = None
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    num_key_value_heads: int | None = None
    model_type: str = "deepseek_v3"
    name: str = field(default="", compare=False)  # where it came from, for messages only

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Per-token, per-layer width of the absorbed-MLA latent cache: normalized c_kv then roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def is_fp8(self) -> bool:
        return self.quantization_config is not None

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, fld: str, constraint: str) -> None:
            if not ok:
                value = getattr(self, fld, None)
                where = f" in {self.name}" if self.name else ""
                raise ConfigError(f"config field `{fld}` = {value!r}{where}: {constraint}")

        for fld in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        ):
            need(isinstance(getattr(self, fld), int) and getattr(self, fld) > 0, fld, "must be a positive integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
             "must be a positive integer, or null for no query compression (0 is the official code's spelling)")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func", f"must be one of {SCORING_FUNCS}")
        need(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be between 0 and num_hidden_layers ({self.num_hidden_layers})")
        need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.n_routed_experts >= 0, "n_routed_experts", "must be >= 0")
        has_dense = self.first_k_dense_replace > 0 or self.n_routed_experts == 0 or self.moe_layer_freq > 1
        if has_dense:
            need(self.intermediate_size > 0, "intermediate_size", "must be > 0 when the model has dense MLP layers")
        if self.n_routed_experts > 0:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0 for MoE layers")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(self.n_group >= 1, "n_group", "must be >= 1")
            need(self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts ({self.n_routed_experts})")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be between 1 and n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            need(1 <= self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                 f"must be between 1 and topk_group * experts per group ({self.topk_group * per_group})")
            if self.topk_method == "noaux_tc":
                need(per_group >= 2, "n_group",
                     "noaux_tc scores a group by its top-2 experts, so each group needs >= 2 experts")
            if self.topk_method == "greedy":
                need(self.n_group == 1 or self.topk_group == self.n_group, "topk_group",
                     "greedy routing does not limit groups; use group_limited_greedy or noaux_tc")
        if self.rope_scaling is not None:
            need(self.rope_scaling.factor >= 1.0, "rope_scaling", "yarn factor must be >= 1")
            need(self.rope_scaling.original_max_position_embeddings > 0, "rope_scaling",
                 "original_max_position_embeddings must be > 0")
        if self.quantization_config is not None:
            need(tuple(self.quantization_config.weight_block_size) == (FP8_BLOCK, FP8_BLOCK), "quantization_config",
                 "only weight_block_size [128, 128] is supported")
            need(self.quantization_config.fmt == "e4m3", "quantization_config", "only fmt e4m3 is supported")
            need(self.quantization_config.activation_scheme == "dynamic", "quantization_config",
                 "only activation_scheme dynamic is supported")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "DeepSeek models do not tie embeddings")

    def check_world_size(self, world_size: int) -> None:
        """Constraints for tensor parallel (heads, columns, vocab) and expert parallel (routed experts)."""

        def need(ok: bool, fld: str, value: int, constraint: str) -> None:
            if not ok:
                raise ConfigError(
                    f"config field `{fld}` = {value} cannot be split over world size {world_size}: {constraint}"
                )

        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        need(self.num_attention_heads % world_size == 0, "num_attention_heads", self.num_attention_heads,
             "heads must be divisible by the world size")
        need(self.vocab_size % world_size == 0, "vocab_size", self.vocab_size,
             "the vocabulary must be divisible by the world size")
        if self.n_routed_experts:
            need(self.n_routed_experts % world_size == 0, "n_routed_experts", self.n_routed_experts,
                 "routed experts must be divisible by the world size")
        blk = FP8_BLOCK if self.is_fp8 else 1
        for fld in ("intermediate_size", "shared_intermediate_size") if world_size > 1 else ():
            size = getattr(self, fld)
            if size:
                need(size % (world_size * blk) == 0, fld, size,
                     f"each rank's slice must be a whole number of {blk}-wide FP8 blocks"
                     if blk > 1 else "must be divisible by the world size")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], name: str = "") -> "ModelConfig":
        d = dict(raw)
        where = f" in {name}" if name else ""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("rope_scaling", "quantization_config", "name", "rope_theta"):
                continue
            if f.name in d:
                kwargs[f.name] = d[f.name]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in kwargs]
        if missing:
            raise ConfigError(f"config{where} is missing required field(s): {', '.join(missing)}")
        if kwargs.get("q_lora_rank") == 0:  # the official ModelArgs spells "no q compression" as 0
            kwargs["q_lora_rank"] = None
        if kwargs.get("num_experts_per_tok") is None and d.get("n_routed_experts") in (None, 0):
            kwargs["num_experts_per_tok"] = 0
        for k in ("n_routed_experts", "n_shared_experts", "moe_intermediate_size", "intermediate_size"):
            if kwargs.get(k) is None:
                kwargs[k] = 0

        # RoPE: transformers 5 writes `rope_parameters` (with rope_theta inside); older files `rope_scaling`.
        rope = d.get("rope_parameters")
        if isinstance(rope, Mapping) and rope:
            theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            rtype = rope.get("rope_type", rope.get("type", "default"))
        else:
            rope = d.get("rope_scaling")
            theta = d.get("rope_theta", 10000.0)
            rtype = (rope or {}).get("type", (rope or {}).get("rope_type", "default")) if rope else "default"
        kwargs["rope_theta"] = float(theta)
        if rtype == "yarn":
            try:
                kwargs["rope_scaling"] = YarnScaling(
                    factor=float(rope["factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                    beta_fast=float(rope.get("beta_fast") or 32.0),
                    beta_slow=float(rope.get("beta_slow") or 1.0),
                    mscale=None if rope.get("mscale") is None else float(rope["mscale"]),
                    mscale_all_dim=None if rope.get("mscale_all_dim") is None else float(rope["mscale_all_dim"]),
                    truncate=bool(rope.get("truncate", True)),
                )
            except KeyError as e:
                raise ConfigError(f"config field `rope_scaling`{where}: yarn needs {e.args[0]!r}") from None
        elif rtype not in ("default", None):
            raise ConfigError(f"config field `rope_scaling`{where}: rope type {rtype!r} is not supported "
                              "(DeepSeek uses 'yarn' or none)")

        q = d.get("quantization_config")
        if q:
            if q.get("quant_method") != "fp8":
                raise ConfigError(f"config field `quantization_config`{where}: quant_method "
                                  f"{q.get('quant_method')!r} is not supported (only DeepSeek's block fp8)")
            kwargs["quantization_config"] = FP8Quantization(
                weight_block_size=tuple(q.get("weight_block_size", (FP8_BLOCK, FP8_BLOCK))),
                activation_scheme=q.get("activation_scheme", "dynamic"),
                fmt=q.get("fmt", "e4m3"),
            )
        if kwargs.get("num_key_value_heads") is None:  # MLA has no KV heads; HF wants the head count here
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(name=name, **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` that transformers (4.x and 5.x) and DeepSeek's own tools read."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"],
            "model_type": self.model_type,
        }
        for f in dataclasses.fields(self):
            if f.name in ("name", "rope_scaling", "quantization_config", "model_type"):
                continue
            out[f.name] = getattr(self, f.name)
        out["rope_scaling"] = self.rope_scaling.to_hf() if self.rope_scaling else None
        if self.quantization_config is not None:
            out["quantization_config"] = self.quantization_config.to_hf()
        out.update(hidden_act="silu", attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
                   use_cache=True, torch_dtype="bfloat16")
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def config_hash(self) -> str:
        """Stable hash of everything that changes the computation (not the name)."""
        d = self.to_hf_dict()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- named configs
def shipped_config_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in resources.files("dsv3.configs").iterdir()
                  if p.name.endswith(".json"))


def load_config_file(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    return ModelConfig.from_hf_dict(raw, name=str(path))


def resolve_config(spec: str | os.PathLike) -> ModelConfig:
    """`--config` value: a shipped name (see `shipped_config_names()`), a JSON path, or a checkpoint directory."""
    s = str(spec)
    names = shipped_config_names()
    if s in names:
        with resources.as_file(resources.files("dsv3.configs") / f"{s}.json") as p:
            cfg = load_config_file(p)
        return cfg.replace(name=s)
    p = Path(s)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ConfigError(f"{p} is a directory without config.json; pass a checkpoint directory, a JSON file, "
                              f"or one of the shipped configs: {', '.join(names)}")
        return load_config_file(p / "config.json")
    if p.suffix == ".json" or p.exists():
        return load_config_file(p)
    raise ConfigError(f"unknown config {s!r}: not a shipped config ({', '.join(names)}), a JSON file, "
                      "or a checkpoint directory")


def default_max_seq_len(cfg: ModelConfig) -> int:
    return min(cfg.max_position_embeddings, 4096)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
