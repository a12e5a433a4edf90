"""The calling convention of the compiled graphs, shared by the compiler (which exports these modules) and the
runtime (which calls the packages, or compiles these same modules with --jit).

- decode, one graph per batch bucket B: tokens [B, 1], input_pos [B, 1] -> logits [B, vocab] (fp32). Batch row b
  uses cache row b.
- prefill, one graph with a dynamic chunk length S: tokens [1, S], input_pos [1, S], cache_row [1],
  logits_index [1] -> logits [1, vocab] for token `logits_index` of the chunk; writes the chunk into `cache_row`.
  A second prefill graph with the same signature, `first_chunk`, serves chunks at position 0 (a prompt's first):
  it attends to the chunk alone and skips the absorbed half over the cached prefix (Transformer's first_chunk).
  Its row count R is dynamic too (1..`max_batch` of its manifest entry; 1 in artifacts from before it): the first
  chunks of R prompts, right-padded to one S, each into its own cache_row[r], logits [R, vocab].

Both wrap the same `Transformer`, so their constants (weights, latent caches, rope tables) have the same names
(`model.<name>`) and the runtime hands one set of tensors to every graph.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.model import Transformer

PREFIX = "model."


class DecodeStep(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos, last_only=True)


class PrefillStep(nn.Module):
    """first_chunk=True: only for chunks whose input_pos starts at 0 (see Transformer.forward)."""

    def __init__(self, model: Transformer, first_chunk: bool = False):
        super().__init__()
        self.model = model
        self.first_chunk = first_chunk

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache_row: torch.Tensor,
                logits_index: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos, logits_index=logits_index, cache_rows=cache_row,
                          first_chunk=self.first_chunk)


def constants(model: Transformer) -> dict[str, torch.Tensor]:
    """Every tensor the graphs read or write (weights, caches, rope tables, rank buffers), by graph FQN."""
    out = {PREFIX + n: t for n, t in model.named_parameters()}
    out.update({PREFIX + n: t for n, t in model.named_buffers()})
    return out


def decode_inputs(batch: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.zeros(batch, 1, dtype=torch.long, device=device)
    return z, z.clone()


def prefill_inputs(seq: int, device: torch.device | str, rows: int = 1) -> tuple[torch.Tensor, ...]:
    """rows chunks of seq tokens at positions 0.., into cache rows 0..rows-1, logits of each last token."""
    return (torch.zeros(rows, seq, dtype=torch.long, device=device),
            torch.arange(seq, device=device).unsqueeze(0).repeat(rows, 1),
            torch.arange(rows, dtype=torch.long, device=device),
            torch.full((rows,), seq - 1, dtype=torch.long, device=device))
