"""Logits parity with transformers' DeepseekV3ForCausalLM (float32) on random checkpoints from init-random.

Prefill (one chunk of <= 16 tokens: absorbed attention; chunks of 20: the prefill form), then single-token decode
steps through our static latent cache, each compared with HF's logits for the same positions from one full forward
(an independent computation: HF expands the latent cache per head, we absorb). Bound: max |ours - hf| / max |hf|
<= 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import dsv3
from dsv3.config import resolve_config
from dsv3.init_random import write_random_checkpoint

PROMPT_LEN, DECODE_STEPS, BATCH = 12, 8, 2
REL_TOL = 1e-4


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("config", ["tiny", "tiny-noqlora", "tiny-ragged"])
def test_prefill_and_decode_match_transformers(tmp_path, config):
    cfg = resolve_config(config)
    ckpt = write_random_checkpoint(cfg, tmp_path / config, dtype="bf16", seed=7, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = dsv3.load(ckpt, dtype=torch.float32, max_batch_size=BATCH, max_seq_len=64, progress=False)

    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, cfg.vocab_size, (BATCH, PROMPT_LEN + DECODE_STEPS), generator=g)
    with torch.no_grad():
        ref = hf(seq).logits.float()

        logits = ours(seq[:, :PROMPT_LEN], torch.arange(PROMPT_LEN))
        assert logits.shape == (BATCH, PROMPT_LEN, cfg.vocab_size)
        assert _rel_err(logits, ref[:, :PROMPT_LEN]) <= REL_TOL

        for step in range(DECODE_STEPS):
            pos = PROMPT_LEN + step
            logits = ours(seq[:, pos: pos + 1], torch.tensor([pos]), last_only=True)
            assert logits.shape == (BATCH, cfg.vocab_size)
            err = _rel_err(logits, ref[:, pos])
            assert err <= REL_TOL, f"decode step {step}: rel err {err:.2e}"


@pytest.mark.parametrize("config", ["tiny", "tiny-ragged"])
def test_long_prompt_chunks_match_transformers(tmp_path, config):
    """A 40-token prompt in two chunks of 20: chunks longer than 16 tokens take the prefill form (the chunk's keys
    decompressed, naive attention; the second chunk also attends the first one's cache rows in absorbed form and
    merges them through their log-sum-exp), then decode steps; every logit against HF's one full forward."""
    cfg = resolve_config(config)
    ckpt = write_random_checkpoint(cfg, tmp_path / config, dtype="bf16", seed=11, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = dsv3.load(ckpt, dtype=torch.float32, max_batch_size=BATCH, max_seq_len=64, progress=False)
    prompt, steps = 40, 4
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, cfg.vocab_size, (BATCH, prompt + steps), generator=g)
    with torch.no_grad():
        ref = hf(seq).logits.float()
        for start in (0, 20):
            logits = ours(seq[:, start: start + 20], torch.arange(start, start + 20))
            err = _rel_err(logits, ref[:, start: start + 20])
            assert err <= REL_TOL, f"prefill chunk at {start}: rel err {err:.2e}"
        for pos in range(prompt, prompt + steps):
            logits = ours(seq[:, pos: pos + 1], torch.tensor([pos]), last_only=True)
            assert _rel_err(logits, ref[:, pos]) <= REL_TOL


def test_routing_matches_transformers_router(tmp_path):
    """Expert choices and weights of every MoE layer equal HF's DeepseekV3TopkRouter (sigmoid, bias, groups)."""
    cfg = resolve_config("tiny")
    ckpt = write_random_checkpoint(cfg, tmp_path / "ck", dtype="bf16", seed=11, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = dsv3.load(ckpt, dtype=torch.float32, max_seq_len=16, progress=False)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        _, ref_w, ref_idx = hf.model.layers[i].mlp.gate(x)
        idx, w = ours.layers[i].mlp.gate(x)
        ref_order, order = ref_idx.argsort(-1), idx.argsort(-1)
        assert torch.equal(ref_idx.gather(1, ref_order), idx.gather(1, order))
        torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-6, atol=1e-7)
