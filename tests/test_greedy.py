"""`torch.ops.dsv3.greedy_next_` (dsv3.kernels.greedy): the greedy loop graph's argmax + next-input update.

- CPU: the Triton kernel under the interpreter against torch.argmax (tests/interpret_greedy.py, subprocess); the
  op's CPU path (the reference, in place) and its registration (opcheck).
- GPU: the kernel on a 102400 / 129280 vocab (16B, 671B) with planted ties, replayed in a CUDA graph for several
  steps (the scratch it resets must carry over between replays), against torch.argmax and clamp.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.kernels import greedy as G
from kernel_checks import interpreter_failure, run_interpreted


def test_kernel_interpreted():
    res = run_interpreted("interpret_greedy.py", timeout=300)
    assert res.returncode == 0, interpreter_failure(res)


def _state(b: int, device: str):
    tokens = torch.zeros(b, 1, dtype=torch.long, device=device)
    positions = torch.arange(b, dtype=torch.long, device=device).view(b, 1) * 7
    active = torch.ones(b, 1, dtype=torch.long, device=device)
    active[-1] = 0
    return tokens, positions, active, *G.greedy_scratch(b, device)


def test_cpu_path_and_opcheck():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    logits[0, 17] = logits[0, 400] = 50.0
    tokens, positions, active, best, count = _state(3, "cpu")
    args = (logits, tokens, positions, active, best, count, 20)
    torch.library.opcheck(torch.ops.dsv3.greedy_next_.default, args, test_utils="test_faketensor")
    tokens, positions, active, best, count = _state(3, "cpu")
    torch.ops.dsv3.greedy_next_(logits, tokens, positions, active, best, count, 8)
    assert tokens[:, 0].tolist() == [17, int(logits[1].argmax()), 0]
    assert positions[:, 0].tolist() == [1, 8, 8]  # one position on, at most max_pos; the padding row only clamped


@pytest.mark.gpu
@pytest.mark.parametrize("b, v", [(1, 102400), (8, 102400), (8, 129280), (3, 1000)])
def test_gpu_kernel_in_a_cuda_graph(b, v):
    g = torch.Generator(device="cuda").manual_seed(v + b)
    logits = torch.empty(b, v, device="cuda")
    tokens, positions, active, best, count = _state(b, "cuda")
    max_pos = 12
    graph = torch.cuda.CUDAGraph()
    torch.ops.dsv3.greedy_next_(logits.normal_(), tokens, positions, active, best, count, max_pos)  # compile first
    tokens, positions, active, best, count = _state(b, "cuda")
    with torch.cuda.graph(graph):
        torch.ops.dsv3.greedy_next_(logits, tokens, positions, active, best, count, max_pos)
    for step in range(4):
        logits.normal_(generator=g)
        logits[0, v // 5] = logits[0, v - 3] = 20.0  # tie across programs: the lower index
        if step == 3:
            logits[:, :] = -2.0  # all equal: index 0
        want_tok, want_pos = G.greedy_next_reference(logits, positions, active, max_pos)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tokens, want_tok), step
        assert torch.equal(positions, want_pos), step
        assert best.eq(G.INT64_MIN).all() and count.eq(0).all()
