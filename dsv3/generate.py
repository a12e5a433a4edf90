"""Eager generation over the static latent cache: the plain path every faster path is compared against.

Prompts of different lengths run as one batch: right-padded, each row at its own positions (`input_pos` is
[B, S]); the padding writes cache rows that the row's own later tokens overwrite before anything attends to them.
Sampling runs on the device (exponential race, so no host sync inside it); the host reads one token per step.
Steps run through a `DecodeLoop`: a stepper may offer its own (the CUDA-graph stepper replays one graph per token,
sampling and input updates included); otherwise decode + sample as separate calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

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


def sample_scores(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """[B, V] fp32 logits -> [B, V] scores whose row argmax is the sampled token: the logits themselves when greedy,
    else the kept probabilities over exponential noise (`dsv3.top_p_scores`: temperature, the top-p filter without
    a sort, p / E). Torch ops only, no host sync: the runtime captures them in its sampled loop graphs, where
    `dsv3.greedy_next_` takes the argmax. Top-p keeps the smallest most-probable set whose mass reaches top_p, and
    every token tied with its least probable member."""
    if params.temperature == 0.0:
        return logits
    if params.top_k:  # on the raw logits: dividing by the temperature keeps their order
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # argmax(p / E) with E ~ Exp(1) draws from p (exponential race): no multinomial, no host sync.
    noise = torch.empty_like(logits, dtype=torch.float32).exponential_(generator=generator)
    return torch.ops.dsv3.top_p_scores(logits, noise, params.temperature, params.top_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] fp32 logits -> [B] int64 tokens, on the logits' device."""
    return sample_scores(logits, params, generator).argmax(-1)


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "eos" | "stop" | "length" | "cache_end"


@dataclass
class GenerationStats:
    prefill_s: float = 0.0  # every batch's prefill
    decode_s: float = 0.0
    decode_steps: int = 0
    ttft_s: float = 0.0  # the first batch's prefill: the time to the first token
    batches: int = 1
    decoded_tokens: int = 0  # rows x steps over the batches (padding rows aside)

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.decoded_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper(Protocol):
    """What generation needs from a model: eager (below), AOT packages or JIT graphs (dsv3.runtime.engine).
    Optional: `decode_loop(tokens, positions, sampling, generator) -> DecodeLoop | None`, its own stepping for
    these sampling settings (see `decode_loop` below)."""

    max_batch_size: int
    max_seq_len: int
    device: torch.device

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Reset the cache, write prompt i into cache row i, return [B, vocab] logits of each last prompt token."""

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions: [B] on the device (row i at position positions[i]) -> [B, vocab] logits."""


class EagerStepper:
    """The plain model: mixed-length prompts right-padded into one prefill batch, then one token per step."""

    def __init__(self, model: Transformer):
        self.model = model
        self.max_batch_size, self.max_seq_len = model.max_batch_size, model.max_seq_len
        self.device = model.rope_cos.device

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        self.model.reset_caches()
        longest = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self.model(tokens.to(self.device), torch.arange(longest, device=self.device), logits_index=last)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(tokens.view(-1, 1), positions.view(-1, 1), last_only=True)


class DecodeLoop(Protocol):
    def step(self) -> torch.Tensor:
        """Run one decode step on the tokens the previous step produced (the first on those the loop started
        from), each row at its next position, and return the [n] sampled tokens on the device. The result may be
        a view of a static buffer that the next step overwrites (read it, or queue its copy, before stepping)."""


class EagerDecodeLoop:
    """`stepper.decode`, then `sample`: works with every stepper. Positions stop at the cache's last slot (a row
    there has stopped; its later tokens are discarded)."""

    def __init__(self, stepper: Stepper, tokens: torch.Tensor, positions: torch.Tensor, sampling: SamplingParams,
                 generator: torch.Generator | None = None):
        self.stepper, self.sampling, self.generator = stepper, sampling, generator
        self.limit = stepper.max_seq_len - 1
        self.tokens, self.positions = tokens, positions.clamp(max=self.limit)

    def step(self) -> torch.Tensor:
        self.tokens = sample(self.stepper.decode(self.tokens, self.positions), self.sampling, self.generator)
        self.positions = (self.positions + 1).clamp_(max=self.limit)
        return self.tokens


class PlainSteps:
    """A stepper seen without its own `decode_loop`: generate() then runs `decode` + `sample` per step. What a
    stepper's own loop is checked and timed against."""

    def __init__(self, stepper: Stepper):
        self.stepper = stepper
        self.max_batch_size, self.max_seq_len, self.device = stepper.max_batch_size, stepper.max_seq_len, stepper.device

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.stepper.prefill(prompts)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.stepper.decode(tokens, positions)


def decode_loop(stepper: Stepper, tokens: torch.Tensor, positions: torch.Tensor, sampling: SamplingParams,
                generator: torch.Generator | None = None) -> DecodeLoop:
    """The stepper's own loop when it has one for these sampling settings (`stepper.decode_loop`), else the eager
    one. tokens: [n] the first step's inputs; positions: [n] where each goes."""
    own = getattr(stepper, "decode_loop", None)
    loop = own(tokens, positions, sampling, generator) if own is not None else None
    return loop if loop is not None else EagerDecodeLoop(stepper, tokens, positions, sampling, generator)


def check_prompts(prompts: Sequence[Sequence[int]], max_batch_size: int, max_seq_len: int,
                  first_index: int = 0) -> None:
    """Refuse, before any work, what cannot run: too many prompts, empty ones, ones that fill the cache. Errors
    number the prompts from `first_index` (a caller's batch of a longer list)."""
    if not prompts:
        raise GenerationError("no prompts given")
    if len(prompts) > max_batch_size:
        raise GenerationError(f"{len(prompts)} prompts but the model was built for max_batch_size "
                              f"{max_batch_size}; load (or compile) it with a larger max_batch_size")
    for i, p in enumerate(prompts, start=first_index):
        if not p:
            raise GenerationError(f"prompt {i} is empty")
        if len(p) >= max_seq_len:
            raise GenerationError(f"prompt {i} has {len(p)} tokens but the cache holds {max_seq_len} "
                                  "(max_seq_len), leaving no room to generate; use a larger max_seq_len")


@torch.inference_mode()
def generate(
    model: Transformer | Stepper, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(), eos_id: int | None = None, seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
) -> tuple[list[Completion], GenerationStats]:
    """Generate for a batch of token-id prompts. `on_token(row, token)` is called as each token is produced;
    `should_stop(row, tokens)` (e.g. a stop-string check) ends a row with finish_reason "stop".

    The host reads each step's sampled tokens while the device already runs the next step (the copy overlaps);
    stop decisions therefore lag by one step, and a step computed after every row stopped is discarded.
    """
    stepper: Stepper = EagerStepper(model) if isinstance(model, Transformer) else model
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_prompts(prompts, stepper.max_batch_size, stepper.max_seq_len)
    device = stepper.device
    bsz = len(prompts)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    stats = GenerationStats()
    out = [Completion(list(p)) for p in prompts]
    t0 = time.perf_counter()
    tok = sample(stepper.prefill(prompts), sampling, generator)
    _sync(device)
    stats.prefill_s = time.perf_counter() - t0

    pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)  # where each next token goes
    loop = decode_loop(stepper, tok, pos, sampling, generator)
    done = [False] * bsz
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        host_tok = tok.to("cpu", non_blocking=True, copy=True)  # a copy even on the CPU: the step may overwrite tok
        copied = torch.cuda.Event() if device.type == "cuda" else None
        if copied is not None:
            copied.record()
        # Launch the next step unless every row is certain to stop at this token (length or cache end: known on
        # the host without waiting; an eos is seen only after the copy, so it costs one discarded step).
        will_stop = [done[i] or len(out[i].tokens) + 1 >= max_new_tokens
                     or len(prompts[i]) + len(out[i].tokens) + 1 >= stepper.max_seq_len for i in range(bsz)]
        if not all(will_stop):
            # Rows that stopped keep stepping (static batch) at a position inside the cache. The step may
            # overwrite `tok` in place: its copy to the host above is queued first.
            next_tok = loop.step()
            stats.decode_steps += 1
        if copied is not None:
            copied.synchronize()
        for i, t in enumerate(host_tok.tolist()):
            if done[i]:
                continue
            out[i].tokens.append(t)
            if on_token is not None:
                on_token(i, t)
            if eos_id is not None and t == eos_id:
                done[i], out[i].finish_reason = True, "eos"
            elif should_stop is not None and should_stop(i, out[i].tokens):
                done[i], out[i].finish_reason = True, "stop"
            elif len(out[i].tokens) >= max_new_tokens:
                done[i], out[i].finish_reason = True, "length"
            elif len(prompts[i]) + len(out[i].tokens) >= stepper.max_seq_len:
                done[i], out[i].finish_reason = True, "cache_end"
        if all(done) or all(will_stop):
            break
        tok = next_tok
    _sync(device)
    stats.decode_s = time.perf_counter() - t0
    stats.ttft_s, stats.decoded_tokens = stats.prefill_s, bsz * stats.decode_steps
    return out, stats


def generate_in_batches(model: Transformer | Stepper, prompts: Sequence[Sequence[int]], *,
                        seed: int | None = None, on_token: Callable[[int, int], None] | None = None,
                        should_stop: Callable[[int, list[int]], bool] | None = None, **kwargs
                        ) -> tuple[list[Completion], GenerationStats]:
    """`generate` for any number of prompts: consecutive batches of at most the model's max batch size (its decode
    graphs are static in batch), in order. Every prompt is checked before the first batch runs; rows are numbered
    in the whole list (errors, on_token, should_stop); batch k draws from seed + k. Stats summed over the batches,
    ttft_s the first batch's."""
    stepper: Stepper = EagerStepper(model) if isinstance(model, Transformer) else model
    if not prompts:
        raise GenerationError("no prompts given")
    b = stepper.max_batch_size
    batches = [range(i, min(i + b, len(prompts))) for i in range(0, len(prompts), b)]
    for rows in batches:
        check_prompts([prompts[i] for i in rows], b, stepper.max_seq_len, first_index=rows.start)
    out: list[Completion] = []
    stats = GenerationStats(batches=len(batches))
    for k, rows in enumerate(batches):
        first = rows.start
        done, part = generate(
            stepper, [prompts[i] for i in rows], seed=None if seed is None else seed + k,
            on_token=None if on_token is None else (lambda row, t, first=first: on_token(first + row, t)),
            should_stop=None if should_stop is None else (lambda row, tokens, first=first:
                                                          should_stop(first + row, tokens)),
            **kwargs)
        out += done
        stats.ttft_s = part.ttft_s if k == 0 else stats.ttft_s
        stats.prefill_s += part.prefill_s
        stats.decode_s += part.decode_s
        stats.decode_steps += part.decode_steps
        stats.decoded_tokens += part.decoded_tokens
    return out, stats
