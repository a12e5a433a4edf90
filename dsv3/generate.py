"""Eager generation over the static latent cache: the plain path every faster path is compared against.

Prompts of different lengths run as one batch: right-padded, each row at its own positions (`input_pos` is
[B, S]); the padding writes cache rows that the row's own later tokens overwrite before anything attends to them.
Sampling runs on the device (exponential race, so no host sync inside it); the host reads one token per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from dsv3.model import Transformer


class GenerationError(ValueError):
    """A request that cannot run on this model (too many prompts, prompt longer than the cache, ...)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] fp32 logits -> [B] int64 tokens, on the logits' device."""
    if params.temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    # argmax(p / E) with E ~ Exp(1) draws from p (exponential race): no multinomial, no host sync.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "eos" | "length" | "cache_end"


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(), eos_id: int | None = None, seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> tuple[list[Completion], GenerationStats]:
    """Generate for a batch of token-id prompts. `on_token(row, token)` is called as each token is produced."""
    if not prompts:
        raise GenerationError("no prompts given")
    if len(prompts) > model.max_batch_size:
        raise GenerationError(f"{len(prompts)} prompts but the model was built for max_batch_size "
                              f"{model.max_batch_size}; load it with a larger max_batch_size")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty")
        if len(p) >= model.max_seq_len:
            raise GenerationError(f"prompt {i} has {len(p)} tokens but the cache holds {model.max_seq_len} "
                                  "(max_seq_len), leaving no room to generate; use a larger max_seq_len")
    device = model.rope_cos.device
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(bsz, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    model.reset_caches()
    stats = GenerationStats()
    out = [Completion(list(p)) for p in prompts]
    t0 = time.perf_counter()
    logits = model(tokens.to(device), torch.arange(longest, device=device), logits_index=lengths - 1)
    next_tok = sample(logits, sampling, generator)
    _sync(device)
    stats.prefill_s = time.perf_counter() - t0

    pos = lengths.clone()  # where each row's next token goes
    done = [False] * bsz
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        host_tok = next_tok.tolist()
        for i, t in enumerate(host_tok):
            if done[i]:
                continue
            out[i].tokens.append(t)
            if on_token is not None:
                on_token(i, t)
            if eos_id is not None and t == eos_id:
                done[i], out[i].finish_reason = True, "eos"
            elif len(out[i].tokens) >= max_new_tokens:
                done[i], out[i].finish_reason = True, "length"
            elif len(prompts[i]) + len(out[i].tokens) >= model.max_seq_len:
                done[i], out[i].finish_reason = True, "cache_end"
        if all(done):
            break
        # Finished rows keep stepping (static batch) but at a position inside the cache.
        step_pos = torch.minimum(pos, torch.full_like(pos, model.max_seq_len - 1))
        logits = model(next_tok.view(bsz, 1), step_pos.view(bsz, 1), last_only=True)
        next_tok = sample(logits, sampling, generator)
        pos += 1
        stats.decode_steps += 1
    _sync(device)
    stats.decode_s = time.perf_counter() - t0
    return out, stats
