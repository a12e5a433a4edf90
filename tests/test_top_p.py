"""`torch.ops.dsv3.top_p_scores` (dsv3.kernels.top_p): sort-free top-p filtering and the exponential race.

- CPU: the Triton kernels under the interpreter against the float64 reference (tests/interpret_top_p.py,
  subprocess); the reference's threshold semantics against a brute-force definition (float64, ties planted) and
  against the eager sort path of dsv3.generate.sample_scores (the same kept sets away from ties); the op's CPU
  path and its registration (opcheck).
- GPU: the kernels at V = 102400 / 129280 (16B, 671B), B = 1 / 8 / 64, on fresh randn * 3 and peaked logits,
  against the float64 reference (kept sets equal except within rounding of the boundary, `near_boundary`; scores
  close); replayed in a CUDA graph with new inputs; bitwise run-to-run determinism; torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.kernels import top_p as TP
from kernel_checks import interpreter_failure, run_interpreted

NEG_INF = float("-inf")


def test_kernel_interpreted():
    res = run_interpreted("interpret_top_p.py", timeout=600)
    assert res.returncode == 0, interpreter_failure(res)


def brute_force_keep(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, f): f[b, i] = sum of p[b, j] over p[b, j] > p[b, i], computed directly ([B, V, V]); keep = f < top_p
    (everything when top_p >= 1)."""
    f = (probs[:, None, :] * (probs[:, None, :] > probs[:, :, None])).sum(-1)
    return (f < top_p) | (top_p >= 1.0), f


def tied_rows(gen: torch.Generator, v: int = 300) -> torch.Tensor:
    """Four float64 rows of logits with exact ties: random, with groups copied across the row; a row of few distinct
    values; a row with -inf entries; a uniform row."""
    logits = torch.randn(4, v, generator=gen, dtype=torch.float64) * 2
    logits[0, 50:60] = logits[0, 3]
    logits[0, 200:205] = logits[0].max()
    logits[1] = torch.randint(0, 6, (v,), generator=gen).double()
    logits[2, ::3] = NEG_INF
    logits[3] = 0.5
    return logits


def test_reference_threshold_semantics_float64():
    """The reference's kept set is {i : f(p_i) < top_p} exactly (ties kept together), on rows with exact ties, for
    top_p values placed away from every f (so that summation order cannot matter)."""
    gen = torch.Generator().manual_seed(0)
    logits = tied_rows(gen)
    noise = torch.empty_like(logits).exponential_(generator=gen)
    for temperature in (0.7, 1.0):
        probs = torch.softmax(logits / temperature, -1)
        _, f = brute_force_keep(probs, 1.0)
        for top_p in (1e-6, 0.1, 0.3, 0.5, 0.77, 0.9, 0.95, 0.999, 1.0):
            gap = (f - top_p).abs().min().item()
            if gap < 1e-9:  # a top_p sitting on an f: nudge it off
                top_p = top_p + 1e-6
            keep, _ = brute_force_keep(probs, top_p)
            assert torch.equal(TP.top_p_keep(probs, top_p), keep), (temperature, top_p)
            scores = TP.top_p_scores_reference(logits, noise, temperature, top_p)
            assert scores.dtype == torch.float64
            assert torch.equal(scores, torch.where(keep, probs / noise, torch.zeros_like(probs)))
            assert keep.gather(-1, probs.argmax(-1, keepdim=True)).all()  # the most probable token always kept
            assert keep[3].all()  # uniform: all tied with the first
            assert not (scores[2, ::3] != 0).any()  # -inf logits never score
            if top_p < 1.0:  # a tie group is kept or dropped as a whole
                for r in range(3):
                    for val in probs[r].unique():
                        grp = keep[r][probs[r] == val]
                        assert grp.all() or not grp.any()


def eager_sort_keep(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The kept set of dsv3.generate.sample_scores' sort path (as of this change): drop a token when the sorted
    tokens before it already reach top_p."""
    sorted_logits, order = (logits / temperature).sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    return ~drop_sorted.scatter(1, order, drop_sorted)


def test_reference_matches_eager_sort_path_without_ties():
    """Away from ties the threshold semantics are the sort path's: the same kept set (fp32, except tokens within
    rounding of the boundary) and the same argmax for the same noise."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5000, generator=gen) * 3
    logits[1] += torch.randn(5000, generator=gen).mul(8).clamp_min(0)  # peakier
    noise = torch.empty_like(logits).exponential_(generator=gen)
    for temperature in (0.6, 1.0):
        probs64 = torch.softmax(logits.double() / temperature, -1)
        for top_p in (0.5, 0.9, 0.95):
            keep = TP.top_p_keep(torch.softmax(logits / temperature, -1), top_p)
            amb = TP.near_boundary(probs64, top_p)
            assert not ((keep != eager_sort_keep(logits, temperature, top_p)) & ~amb).any()
            scores = TP.top_p_scores_reference(logits, noise, temperature, top_p)
            eager = torch.softmax((logits / temperature).masked_fill(
                ~eager_sort_keep(logits, temperature, top_p), NEG_INF), -1) / noise
            assert torch.equal(scores.argmax(-1), eager.argmax(-1))


def test_near_boundary():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    assert TP.near_boundary(probs, 0.7).tolist() == [[False, False, True, False]]  # f(0.2) = 0.7: on it
    assert not TP.near_boundary(probs, 0.69).any() and not TP.near_boundary(probs, 1.0).any()
    near_tie = torch.tensor([[0.5, 0.2499999, 0.25, 0.0000001]], dtype=torch.float64)
    assert TP.near_boundary(near_tie, 0.6).tolist() == [[False, True, True, False]]  # which of the two is first
    tie = torch.tensor([[0.5, 0.25, 0.25, 0.0]], dtype=torch.float64)
    assert not TP.near_boundary(tie, 0.6).any()  # exact ties stay tied


def test_cpu_path_and_opcheck():
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(3, 700, generator=gen) * 3
    logits = wide[:, :500]  # row stride 700
    logits[0, :100] = NEG_INF
    noise = torch.empty(3, 500).exponential_(generator=gen)
    for top_p in (0.9, 1.0):
        args = (logits, noise, 0.7, top_p)
        torch.library.opcheck(torch.ops.dsv3.top_p_scores.default, args, test_utils="test_faketensor")
        out = torch.ops.dsv3.top_p_scores(*args)
        assert out.is_contiguous() and out.dtype == torch.float32
        assert torch.equal(out, TP.top_p_scores_reference(*args))
        assert (out[0, :100] == 0).all() and torch.isfinite(out).all()


def test_plan():
    for b in (1, 2, 8, 64):
        for v in (1000, 102400, 129280):
            c, ch = TP.top_p_plan(b, v)
            assert ch % TP.SUB == 0 and (c - 1) * ch < v <= c * ch and 1 <= c <= TP.MAX_CHUNKS
    assert TP.top_p_plan(1, 102400) == TP.top_p_plan(8, 102400) == (100, 1024)  # ~one step per program
    assert TP.top_p_plan(64, 102400) == (17, 6144)
    assert TP.top_p_plan(3, 1000, chunks=4, sub=128) == (4, 256)


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------


def gpu_logits(b: int, v: int, kind: str, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(b, v, device="cuda", generator=g) * 3
    if kind == "peaked":  # a few dominant tokens, as a confident model gives
        x[:, torch.randint(0, v, (8,), device="cuda", generator=g)] += 18.0
    elif kind == "topk":  # sample_scores' top-k filter ran first: only the 50 best of each row finite
        kth = x.topk(50, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, NEG_INF)
    return x


def check_gpu(out: torch.Tensor, logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_p: float,
              rel: float = 1e-5) -> None:
    """Against the float64 reference. The kernels' p = exp2(l * log2(e) / T - max) carries ~1e-6 relative error at
    |l / T| ~ 40 (the argument's own fp32 rounding) and their masses another ~1e-6 of Z: the kept sets must agree
    on every token that `near_boundary` at rel = 1e-5 leaves, the scores to 1e-4, and
    the op's argmax must be a token whose reference score is within 1e-4 of the best. Flat rows of 1e5 tokens
    have boundary tokens of p ~ 1e-6, so that window holds a few of them: at most 8 + 1% of the kept set may be
    excused."""
    assert out.shape == logits.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.isfinite(out).all() and (out >= 0).all()
    p64 = torch.softmax(logits.double() / temperature, -1)
    ref = TP.top_p_scores_reference(logits.double(), noise.double(), temperature, top_p)
    kept, want = out > 0, ref > 0
    amb = TP.near_boundary(p64, top_p, rel)
    assert (amb.sum(-1) <= 8 + want.sum(-1) // 100).all(), (amb.sum(-1).tolist(), want.sum(-1).tolist())
    bad = (kept != want) & ~amb
    assert not bad.any(), (bad.nonzero()[:10].tolist(), kept.sum(-1).tolist(), want.sum(-1).tolist())
    both = kept & want
    torch.testing.assert_close(out[both].double(), ref[both], rtol=1e-4, atol=0)
    best = ref.max(-1).values
    assert (ref.gather(-1, out.argmax(-1, keepdim=True))[:, 0] >= best * (1 - 1e-4)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("b, v", [(1, 102400), (8, 102400), (1, 129280), (8, 129280), (64, 129280)])
@pytest.mark.parametrize("kind", ["randn3", "peaked", "topk"])
def test_gpu_matches_reference(b, v, kind):
    g = torch.Generator(device="cuda").manual_seed(b * 7 + v)
    for temperature in (0.6, 1.0):
        for top_p in (0.5, 0.9, 0.95, 1.0):
            logits = gpu_logits(b, v, kind, g)
            noise = torch.empty_like(logits).exponential_(generator=g)
            out = torch.ops.dsv3.top_p_scores(logits, noise, temperature, top_p)
            check_gpu(out, logits, noise, temperature, top_p)
            if top_p == 1.0:
                assert torch.equal(out > 0, torch.isfinite(logits))


@pytest.mark.gpu
def test_gpu_strided_rows():
    g = torch.Generator(device="cuda").manual_seed(3)
    wide = torch.randn(4, 102400 + 64, device="cuda", generator=g) * 3
    noise = torch.empty(4, 102400 + 32, device="cuda").exponential_(generator=g)
    logits, nz = wide[:, 64:], noise[:, :102400]
    check_gpu(torch.ops.dsv3.top_p_scores(logits, nz, 0.8, 0.9), logits, nz, 0.8, 0.9)


@pytest.mark.gpu
@pytest.mark.parametrize("b, v, top_p", [(1, 102400, 0.95), (8, 129280, 0.9), (8, 102400, 1.0)])
def test_gpu_cuda_graph_replays_and_determinism(b, v, top_p):
    """Captured once, replayed with new logits and noise copied into the captured inputs: each replay equals an eager
    call bitwise (and the reference within rounding); eager calls repeat bitwise."""
    g = torch.Generator(device="cuda").manual_seed(v + b)
    temperature = 0.7
    logits = gpu_logits(b, v, "randn3", g)
    noise = torch.empty_like(logits).exponential_(generator=g)
    first = torch.ops.dsv3.top_p_scores(logits, noise, temperature, top_p)  # compile outside the capture
    for _ in range(3):
        assert torch.equal(torch.ops.dsv3.top_p_scores(logits, noise, temperature, top_p), first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.dsv3.top_p_scores(logits, noise, temperature, top_p)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.dsv3.top_p_scores(logits, noise, temperature, top_p)
    for step in range(4):
        logits.copy_(gpu_logits(b, v, "peaked" if step % 2 else "randn3", g))
        noise.exponential_(generator=g)
        graph.replay()
        torch.cuda.synchronize()
        eager = torch.ops.dsv3.top_p_scores(logits, noise, temperature, top_p)
        assert torch.equal(out, eager), step
        check_gpu(out, logits, noise, temperature, top_p)


@pytest.mark.gpu
def test_gpu_compiled():
    """Through torch.compile (the runtime compiles the sampled step): bitwise the eager op's scores."""
    g = torch.Generator(device="cuda").manual_seed(9)
    logits = gpu_logits(2, 102400, "randn3", g)
    noise = torch.empty_like(logits).exponential_(generator=g)

    def step(x, n):
        return torch.ops.dsv3.top_p_scores(x, n, 0.6, 0.95).argmax(-1), torch.ops.dsv3.top_p_scores(x, n, 0.6, 0.95)

    tok, scores = torch.compile(step, fullgraph=True)(logits, noise)
    assert torch.equal(scores, torch.ops.dsv3.top_p_scores(logits, noise, 0.6, 0.95))
    assert torch.equal(tok, scores.argmax(-1))
