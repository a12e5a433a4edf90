"""`dsv3.kernels.top_p`'s Triton kernels run by the Triton CPU interpreter against the float64 reference.

Not collected by the normal suite: tests/test_top_p.py runs it in a subprocess with TRITON_INTERPRET=1. By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_top_p.py

The launcher (`top_p_scores_triton`) is called directly on CPU tensors (the op itself takes the reference off
CUDA), with 128-element steps and several chunks per row, so that every level's histogram gathers several
programs' atomics (level 0 through their private histograms).

Boundary guard: the kernels compute p = exp2(l * log2(e) / T - max) and the masses in fp32 (the interpreter's
numpy exp2 and sums, not torch's), the reference in float64, so a token whose mass above it lies within rounding
of top_p may legitimately land on either side. Random rows are compared on every token except those
`near_boundary(p64, top_p, rel=1e-5)` flags (its status could flip if each p moved by 1e-5 relative, or the
masses and top_p by 1e-5 of the row's mass: far above the ~1e-6 the fp32 paths differ by), and each row may
excuse at most two. The planted rows (ties at the threshold, peaked and uniform rows) are built with margins
of percents: there the guard must flag nothing and the kept sets must be equal exactly.
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_top_p.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import top_p as TP  # noqa: E402

NEG_INF = float("-inf")
SUB = 128  # elements per inner step here (the GPU's 1024 would leave one chunk per row at these sizes)


def check(logits, noise, temperature, top_p, chunks, exact=False):
    """Run the kernels, compare against the float64 reference; returns the scores."""
    out = TP.top_p_scores_triton(logits, noise, temperature, top_p, chunks=chunks, sub=SUB)
    assert out.shape == logits.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.isfinite(out).all() and (out >= 0).all()
    p64 = torch.softmax(logits.double() / temperature, -1)
    ref = TP.top_p_scores_reference(logits.double(), noise.double(), temperature, top_p)
    kept, want = out > 0, ref > 0
    amb = TP.near_boundary(p64, top_p, rel=1e-5)
    if exact:
        assert not amb.any(), "a planted case sits within rounding of its boundary"
        assert torch.equal(kept, want)
    else:
        assert (amb.sum(-1) <= 2).all(), amb.sum(-1)
        bad = (kept != want) & ~amb
        assert not bad.any(), (bad.nonzero()[:10].tolist(), kept.sum(-1).tolist(), want.sum(-1).tolist())
    both = kept & want
    torch.testing.assert_close(out[both].double(), ref[both], rtol=2e-5, atol=0)
    return out


def random_rows(b, v, gen):
    """randn * 3 logits; row 0 top-k filtered (only its 300 best finite, as sample_scores' top-k leaves them),
    row 1 (if any) with a scattering of -inf."""
    logits = torch.randn(b, v, generator=gen) * 3
    kth = logits[0].topk(min(300, v)).values[-1]
    logits[0] = logits[0].masked_fill(logits[0] < kth, NEG_INF)
    if b > 1:
        logits[1, torch.randint(0, v, (v // 10,), generator=gen)] = NEG_INF
    return logits, torch.empty(b, v).exponential_(generator=gen)


@pytest.mark.parametrize("b, v, chunks", [(1, 1000, 4), (3, 3001, 5), (2, 5000, 8), (2, 3001, None)])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_random_rows(b, v, chunks, temperature):
    gen = torch.Generator().manual_seed(v * 10 + b + int(temperature * 100))
    logits, noise = random_rows(b, v, gen)
    assert TP.top_p_plan(b, v, chunks, SUB)[0] >= 4  # several programs per row
    for top_p in (0.5, 0.9, 0.95, 1.0):
        out = check(logits, noise, temperature, top_p, chunks)
        if top_p == 1.0:  # every finite token kept
            assert torch.equal(out > 0, torch.isfinite(logits))
        assert (out.gather(-1, logits.argmax(-1, keepdim=True)) > 0).all()  # the most probable token always kept


def test_strided_rows_and_determinism():
    """Row strides other than V (slices of wider buffers), and bitwise-equal repeated runs."""
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(3, 1700, generator=gen) * 2
    noise_wide = torch.empty(3, 1900).exponential_(generator=gen)
    logits, noise = wide[:, 100:1600], noise_wide[:, 7:1507]
    a = check(logits, noise, 0.8, 0.9, 3)
    assert torch.equal(a, TP.top_p_scores_triton(logits, noise, 0.8, 0.9, chunks=3, sub=SUB))


def planted_ties(v, tie_idx, head, tie_logit, gen):
    """Rows with a low tail (logits ~ -12), head tokens of the given logits at indices 1.., and the tokens
    tie_idx all at tie_logit (exactly equal: equal p in any arithmetic)."""
    logits = torch.randn(v, generator=gen) - 12.0
    for i, h in enumerate(head):
        logits[i + 1] = h
    logits[tie_idx] = tie_logit
    return logits


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_planted_ties_at_the_threshold(temperature):
    """A group of 7 tied tokens, spread over all 4 chunks, right after the head in descending order: top_p inside
    the group's mass keeps the whole group (f(p_tie) = head mass < top_p), top_p below the head mass (but above the
    mass before the last head token) drops the whole group; never a tail token."""
    gen = torch.Generator().manual_seed(11)
    v = 1000
    tie_idx = torch.tensor([10, 260, 511, 700, 999, 300, 12])
    head = [6.0, 5.0, 4.2]
    row = planted_ties(v, tie_idx, head, 3.0, gen)
    p = torch.softmax(row.double() / temperature, -1)
    head_mass = p[1:4].sum().item()
    p_tie = p[tie_idx[0]].item()
    cases = {
        "group kept (top_p in its middle)": (head_mass + 3.5 * p_tie, True),
        "group kept (top_p just above head)": (head_mass + 0.3 * p_tie, True),
        "group dropped": (head_mass - 0.5 * p[3].item(), False),
        "group kept, tail dropped (top_p just below the group's end)": (head_mass + 6.7 * p_tie, True),
    }
    logits = row.expand(len(cases), v).contiguous()
    noise = torch.empty(len(cases), v).exponential_(generator=gen)
    for r, (name, (top_p, group_kept)) in enumerate(cases.items()):
        assert 0 < top_p < 1, name
        out = check(logits[r:r + 1], noise[r:r + 1], temperature, top_p, 4, exact=True)[0]
        kept = out > 0
        assert kept[1:4].all(), name  # the head
        assert kept[tie_idx].all() if group_kept else not kept[tie_idx].any(), name
        others = torch.ones(v, dtype=torch.bool)
        others[1:4] = False
        others[tie_idx] = False
        assert not kept[others].any(), name  # the tail


def test_peaked_uniform_and_tiny_top_p():
    """One token above top_p alone; a uniform row (every token tied with the first: all kept); top_p tiny (the
    most probable token only); two tokens tied for the top with top_p below either (both kept)."""
    gen = torch.Generator().manual_seed(3)
    v = 2000
    logits = torch.randn(4, v, generator=gen)
    logits[0, 1234] = 15.0
    logits[1] = 0.25
    logits[3, 17] = logits[3, 1900] = 12.0
    noise = torch.empty(4, v).exponential_(generator=gen)
    for top_p in (0.9, 1e-4):
        out = check(logits, noise, 1.0, top_p, 4, exact=top_p < 0.5)  # row 2 at 0.9: a random row, guarded
        kept = out > 0
        assert kept[0].nonzero().flatten().tolist() == [1234]
        assert kept[1].all()
        assert kept[2, logits[2].argmax()] and (top_p > 0.5 or kept[2].sum() == 1)
        assert kept[3].nonzero().flatten().tolist() == [17, 1900]


def test_top_p_one_keeps_all_finite():
    gen = torch.Generator().manual_seed(8)
    logits, noise = random_rows(2, 1500, gen)
    logits[1, :1400] = NEG_INF  # a chunk of -inf only: its partial sum must be 0, not NaN
    out = check(logits, noise, 0.9, 1.0, 3, exact=True)
    assert torch.equal(out > 0, torch.isfinite(logits))
