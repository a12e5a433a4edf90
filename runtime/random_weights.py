"""Random weights generated in place on the model's device, for models too large for a checkpoint on disk
(benchmarks of 671B shards) and for checking compiled packages against the eager model.

Same distributions as init-random (dsv3.init_random), drawn on the device: the values differ from an init-random
checkpoint of the same seed, the statistics do not.
"""

from __future__ import annotations

import math
import re

import torch
from tqdm.auto import tqdm

from dsv3.kernels.fp8_blocks import FP8_DTYPE, quantize_weight
from dsv3.model import Transformer

_RESIDUAL_OUT = re.compile(r"\.(o_proj|down_proj)(\.weight)?$")


@torch.no_grad()
def fill_random_(model: Transformer, seed: int = 0, progress: bool = False) -> Transformer:
    device = model.rope_cos.device
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    state = model.state_dict()  # persistent tensors only: caches and rope tables stay as they are
    total = sum(t.numel() * t.element_size() for t in state.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="random weights", disable=not progress, leave=False)
    for name, t in state.items():
        bar.update(t.numel() * t.element_size())
        if name.endswith("_scale_inv"):
            continue  # written with its weight
        if name.endswith("e_score_correction_bias"):
            t.copy_(torch.rand(t.shape, generator=g, device=device) * 0.1)
        elif t.dim() == 1:
            t.copy_(1.0 + 0.05 * torch.randn(t.shape, generator=g, device=device))
        else:
            std = min(0.02, 1.0 / math.sqrt(t.shape[-1]))
            if _RESIDUAL_OUT.search(name):
                std /= math.sqrt(2 * model.cfg.num_hidden_layers)
            if t.dtype == FP8_DTYPE:
                # one expert (or one matrix) at a time keeps the fp32 temporary small
                scales = state[name + "_scale_inv"]  # x.weight -> x.weight_scale_inv; experts.gate_proj likewise
                flat_w, flat_s = t.view(-1, *t.shape[-2:]), scales.view(-1, *scales.shape[-2:])
                for i in range(flat_w.shape[0]):
                    q, s = quantize_weight(torch.randn(flat_w.shape[1:], generator=g, device=device) * std)
                    flat_w[i].copy_(q)
                    flat_s[i].copy_(s)
            else:
                t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=torch.float32) * std)
    bar.close()
    return model.refresh_prefill_copies_()
