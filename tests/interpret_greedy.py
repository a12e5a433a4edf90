"""`dsv3.kernels.greedy`'s kernel run by the Triton CPU interpreter against torch.argmax / clamp (exact).

Not collected by the normal suite: tests/test_greedy.py runs it in a subprocess with TRITON_INTERPRET=1. By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_greedy.py
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_greedy.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import greedy as G  # noqa: E402


def run_kernel(logits, tokens, positions, active, best, count, max_pos, block):
    """The launcher's kernel call on CPU tensors (the op itself takes the reference off CUDA)."""
    b, v = logits.shape
    G._greedy_next_kernel[(b, G.cdiv(v, block))](
        logits, tokens, positions, active, best, count, v, logits.stride(0), max_pos,
        BLOCK=block, V_PAD=G.next_pow2(G.cdiv(v, block) * block))


@pytest.mark.parametrize("v, block", [(1000, 128), (300, 512), (4096, 256)])
def test_greedy_next_kernel_matches_argmax_over_steps(v, block):
    """Three consecutive steps on the same scratch (the last program resets it), a padding row, a row at the
    position limit, exact ties (lowest index wins, as torch.argmax), negative and -inf logits."""
    g = torch.Generator().manual_seed(v)
    b, max_pos = 4, 50
    best, count = G.greedy_scratch(b, "cpu")
    tokens = torch.tensor([[3], [7], [0], [1]])
    positions = torch.tensor([[10], [50], [0], [49]])
    active = torch.tensor([[1], [1], [0], [1]])
    for step in range(3):
        logits = torch.randn(b, v, generator=g) - 5.0
        logits[0, v // 3] = logits[0, v - 1] = 9.0  # a tie across programs: the lower index
        logits[1, :] = float("-inf")
        logits[1, v // 2] = -100.0
        if step == 2:
            logits[3, :] = -1.0  # all equal: index 0
        want_tok, want_pos = G.greedy_next_reference(logits, positions, active, max_pos)
        run_kernel(logits, tokens, positions, active, best, count, max_pos, block)
        assert torch.equal(tokens, want_tok), step
        assert torch.equal(positions, want_pos), step
        assert tokens[0, 0].item() == v // 3 and tokens[2, 0].item() == 0
        assert best.eq(G.INT64_MIN).all() and count.eq(0).all()
