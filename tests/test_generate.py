"""Sampling (dsv3.generate.sample) against independent computations, and eager generation over the static cache:
batching of mixed-length prompts, eos, the end of the cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dsv3
from dsv3.generate import GenerationError, SamplingParams, generate, generate_in_batches, sample

MAX_SEQ_LEN = 32
LAYERS = 2  # one dense and one MoE layer of the tiny config: all the kinds of block, less CPU time


# ---------------------------------------------------------------------- sample()
def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n independent draws from one row of logits, as one batch."""
    g = torch.Generator().manual_seed(seed)
    return sample(logits.view(1, -1).expand(n, -1).contiguous(), params, g)


def chi_square(tokens: torch.Tensor, probs: np.ndarray) -> float:
    counts = np.bincount(tokens.numpy(), minlength=len(probs)).astype(np.float64)
    expected = probs * len(tokens)
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# chi-square 99.99% quantiles for the degrees of freedom used below (tests are seeded, so they are deterministic)
CHI2_9999 = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 7: 29.88}


def test_greedy_is_argmax():
    logits = torch.randn(6, 257, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))
    assert sample(logits, SamplingParams()).dtype == torch.int64


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0, 50.0])
def test_top_k_1_is_greedy(temperature):
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample(logits, SamplingParams(temperature=temperature, top_k=1), g), logits.argmax(-1))


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    a = sample(logits, p, torch.Generator().manual_seed(7))
    b = sample(logits, p, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    many = [sample(logits, p, torch.Generator().manual_seed(s)) for s in range(5)]
    assert any(not torch.equal(many[0], m) for m in many[1:])


def test_sample_distribution_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    n = 20_000
    for temperature in (1.0, 2.0):
        tokens = draws(logits, SamplingParams(temperature=temperature), n, seed=11)
        probs = softmax64(logits.double().numpy() / temperature)
        assert chi_square(tokens, probs) < CHI2_9999[7], temperature


def top_p_support(logits: np.ndarray, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p (written independently)."""
    probs = softmax64(logits)
    keep: set[int] = set()
    total = 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        keep.add(i)
        total += probs[i]
        if total >= top_p:
            break
    return keep


@pytest.mark.parametrize("top_p,expected", [(0.3, {3}), (0.6, {3, 0}), (0.7, {3, 0, 5}), (0.95, {3, 0, 5, 1, 4}),
                                            (1.0, {0, 1, 2, 3, 4, 5})])
def test_top_p_masks_the_tail(top_p, expected):
    # probabilities 0.40, 0.25, 0.15, 0.10, 0.06, 0.04 placed out of order
    probs = {3: 0.40, 0: 0.25, 5: 0.15, 1: 0.10, 4: 0.06, 2: 0.04}
    logits = torch.tensor([math.log(probs[i]) for i in range(6)], dtype=torch.float32)
    assert top_p_support(logits.double().numpy(), top_p) == expected
    tokens = draws(logits, SamplingParams(temperature=1.0, top_p=top_p), 20_000, seed=3)
    assert set(tokens.tolist()) == expected
    renorm = np.array([probs[i] if i in expected else 0.0 for i in range(6)])
    renorm /= renorm.sum()
    dof = len(expected) - 1
    if dof:
        assert chi_square(tokens, renorm) < CHI2_9999[dof]


def test_top_p_on_random_logits_rows_against_reference():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 30, generator=g) * 2
    top_p = 0.8
    support = [top_p_support(row.double().numpy(), top_p) for row in logits]
    seen: list[set[int]] = [set() for _ in support]
    for seed in range(300):
        toks = sample(logits, SamplingParams(temperature=1.0, top_p=top_p), torch.Generator().manual_seed(seed))
        for i, t in enumerate(toks.tolist()):
            seen[i].add(t)
    for i in range(len(support)):
        assert seen[i] <= support[i], i
        assert max(support[i], key=lambda j: logits[i, j]) in seen[i]


def test_top_k_masks_all_but_k():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5, 2.5, -2.0, 1.0])
    tokens = draws(logits, SamplingParams(temperature=1.0, top_k=3), 20_000, seed=4)
    assert set(tokens.tolist()) == {1, 3, 5}
    probs = np.zeros(8)
    probs[[1, 3, 5]] = softmax64(logits.double().numpy()[[1, 3, 5]])
    assert chi_square(tokens, probs) < CHI2_9999[2]


def test_top_k_and_top_p_with_temperature():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    t = 2.0
    # top_k=4 first: {0,1,2,3}; then top_p over softmax(logits[:4] / 2) = [.455, .276, .167, .102]:
    # 0.8 is reached with three tokens (0.898)
    assert top_p_support(logits.double().numpy()[:4] / t, 0.8) == {0, 1, 2}
    tokens = draws(logits, SamplingParams(temperature=t, top_k=4, top_p=0.8), 20_000, seed=9)
    assert set(tokens.tolist()) == {0, 1, 2}
    p = softmax64(logits.double().numpy()[:3] / t)
    assert chi_square(tokens, np.concatenate([p, np.zeros(3)])) < CHI2_9999[2]


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_params(kw):
    with pytest.raises(GenerationError):
        SamplingParams(**kw)


# ---------------------------------------------------------------------- generate()
@pytest.fixture(scope="module")
def model(random_checkpoint):
    return dsv3.load(random_checkpoint("tiny", "bf16"), dtype=torch.float32, max_batch_size=3,
                     max_seq_len=MAX_SEQ_LEN, num_layers=LAYERS, progress=False)


PROMPTS = [[0, 17, 250, 3, 999, 45, 8], [0, 5, 6], [0, 300, 301, 302, 12]]


def test_greedy_generation_follows_argmax_of_full_recompute(model):
    comps, stats = generate(model, [PROMPTS[0]], max_new_tokens=5)
    tokens = comps[0].tokens
    assert len(tokens) == 5 and comps[0].finish_reason == "length"
    assert stats.decode_steps == 4
    seq = list(PROMPTS[0])
    for t in tokens:
        model.reset_caches()
        logits = model(torch.tensor([seq]), torch.arange(len(seq)), last_only=True)
        assert logits.argmax(-1).item() == t
        seq.append(t)


def test_mixed_length_batch_equals_each_prompt_alone(model):
    batch, _ = generate(model, PROMPTS, max_new_tokens=6)
    for i, p in enumerate(PROMPTS):
        alone, _ = generate(model, [p], max_new_tokens=6)
        assert batch[i].tokens == alone[0].tokens, i
        assert batch[i].prompt_tokens == p
        assert batch[i].finish_reason == "length"


def test_seeded_generation_is_reproducible(model):
    sp = SamplingParams(temperature=1.0)
    a, _ = generate(model, PROMPTS, max_new_tokens=6, sampling=sp, seed=123)
    b, _ = generate(model, PROMPTS, max_new_tokens=6, sampling=sp, seed=123)
    c, _ = generate(model, PROMPTS, max_new_tokens=6, sampling=sp, seed=124)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def _spy_positions(model, monkeypatch) -> list[int]:
    seen: list[int] = []
    real = model.forward

    def forward(tokens, input_pos, *a, **k):
        seen.append(int(input_pos.max()))
        return real(tokens, input_pos, *a, **k)

    monkeypatch.setattr(model, "forward", forward)
    return seen


def test_cache_end_stops_and_never_writes_past_it(random_checkpoint, model, monkeypatch):
    small = dsv3.load(random_checkpoint("tiny", "bf16"), dtype=torch.float32, max_batch_size=2, max_seq_len=10,
                      num_layers=LAYERS, progress=False)
    positions = _spy_positions(small, monkeypatch)
    prompts = [[0, 1, 2, 3, 4, 5], [0, 9]]
    comps, _ = generate(small, prompts, max_new_tokens=50)
    for p, c in zip(prompts, comps):
        assert c.finish_reason == "cache_end"
        assert len(p) + len(c.tokens) == small.max_seq_len
    assert len(comps[0].tokens) == 4 and len(comps[1].tokens) == 8
    assert positions and max(positions) < small.max_seq_len
    # the tokens before the cache ran out are those of an unconstrained run
    for p, c in zip(prompts, comps):
        ref, _ = generate(model, [p], max_new_tokens=len(c.tokens))
        assert ref[0].tokens == c.tokens


def test_prompt_one_short_of_cache_gets_one_token(random_checkpoint):
    small = dsv3.load(random_checkpoint("tiny", "bf16"), dtype=torch.float32, max_seq_len=6, num_layers=LAYERS,
                      progress=False)
    comps, stats = generate(small, [[0, 1, 2, 3, 4]], max_new_tokens=10)
    assert len(comps[0].tokens) == 1 and comps[0].finish_reason == "cache_end"
    assert stats.decode_steps == 0


def test_prompt_filling_the_cache_is_refused(model):
    with pytest.raises(GenerationError, match=r"prompt 1 has 32 tokens but the cache holds 32"):
        generate(model, [[0, 1], list(range(MAX_SEQ_LEN))], max_new_tokens=1)


def test_request_errors(model):
    with pytest.raises(GenerationError, match="max_batch_size 3"):
        generate(model, [[0]] * 4, max_new_tokens=1)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, [[0], []], max_new_tokens=1)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(model, [], max_new_tokens=1)


def test_eos_stops_a_row(model):
    base, _ = generate(model, PROMPTS[:2], max_new_tokens=6)
    t0, t1 = base[0].tokens, base[1].tokens
    # an eos id that row 0 produces at step k (not earlier) and row 1 never produces
    k, eos = next((k, t) for k, t in enumerate(t0) if k >= 1 and t not in t0[:k] and t not in t1)
    streamed: list[tuple[int, int]] = []
    comps, _ = generate(model, PROMPTS[:2], max_new_tokens=6, eos_id=eos,
                        on_token=lambda row, tok: streamed.append((row, tok)))
    assert comps[0].tokens == t0[: k + 1] and comps[0].finish_reason == "eos"
    assert comps[1].tokens == t1 and comps[1].finish_reason == "length"
    assert [t for r, t in streamed if r == 0] == comps[0].tokens
    assert [t for r, t in streamed if r == 1] == comps[1].tokens


def test_all_rows_eos_ends_early(model):
    base, _ = generate(model, [PROMPTS[1]], max_new_tokens=3)
    first = base[0].tokens[0]
    comps, stats = generate(model, [PROMPTS[1]], max_new_tokens=10, eos_id=first)
    assert comps[0].tokens == [first] and comps[0].finish_reason == "eos"
    # the host sees the eos only after the next step was launched (the token copy overlaps it): one step at most
    assert stats.decode_steps <= 1


def test_more_prompts_than_the_batch_run_in_batches(model):
    """generate_in_batches: five prompts on a model of max batch 3 run as two batches, in order, each prompt's
    greedy tokens its tokens alone; on_token and should_stop see rows numbered in the whole list; a prompt that
    cannot run in the second batch is refused before the first one runs, numbered in the whole list."""
    prompts = PROMPTS + [[0, 9, 10, 11], [0, 42]]
    seen: list[tuple[int, int]] = []
    comps, stats = generate_in_batches(model, prompts, max_new_tokens=4,
                                       on_token=lambda row, t: seen.append((row, t)),
                                       should_stop=lambda row, tokens: row == 4 and len(tokens) == 2)
    assert stats.batches == 2 and stats.decoded_tokens > 0 and 0 < stats.ttft_s <= stats.prefill_s
    for i, p in enumerate(prompts):
        alone, _ = generate(model, [p], max_new_tokens=4)
        want = alone[0].tokens[:2] if i == 4 else alone[0].tokens
        assert comps[i].tokens == want, i
        assert [t for row, t in seen if row == i] == want
    assert comps[4].finish_reason == "stop"
    calls = []
    with pytest.raises(GenerationError, match="prompt 4 is empty"):
        generate_in_batches(model, PROMPTS + [[0, 1], []], max_new_tokens=2,
                            on_token=lambda row, t: calls.append(row))
    assert calls == []


def test_max_new_tokens_must_be_positive(model):
    with pytest.raises(GenerationError, match="max_new_tokens must be >= 1"):
        generate(model, [PROMPTS[0]], max_new_tokens=0)


@pytest.mark.gpu
def test_cuda_graph_greedy_loop_equals_eager(random_checkpoint):
    """The JIT stepper on the GPU captures a greedy loop graph per bucket (decode, argmax, next inputs in place):
    its tokens equal eager decode + argmax on the same model, with a padding row (2 prompts in the 4-row bucket)
    and with a row that reaches the end of the cache while the other goes on."""
    from dsv3.generate import PlainSteps
    from dsv3.runtime.engine import jit_stepper

    model = dsv3.load(random_checkpoint("tiny", "fp8"), dtype=torch.bfloat16, max_batch_size=4,
                      max_seq_len=MAX_SEQ_LEN, num_layers=LAYERS, device="cuda", progress=False)
    stepper, _ = jit_stepper(model, (1, 4), prefill_chunk=16)
    assert sorted(stepper.loop_graphs) == [1, 4]
    prompts = [PROMPTS[0], list(range(1, MAX_SEQ_LEN - 3))]
    for batch in ([prompts[0]], prompts):
        ours, _ = generate(stepper, batch, max_new_tokens=8)
        ref, _ = generate(PlainSteps(stepper), batch, max_new_tokens=8)
        assert [c.tokens for c in ours] == [c.tokens for c in ref]
        assert [c.finish_reason for c in ours] == [c.finish_reason for c in ref]
    assert [c.finish_reason for c in ours] == ["length", "cache_end"]



@pytest.mark.gpu
def test_cuda_graph_batches_past_the_max_batch(random_checkpoint):
    """generate_in_batches through the JIT stepper's CUDA graphs (the runtime's GraphStepper): five prompts on a
    model of max batch 2 run as batches of 2, 2 and 1, each batch reusing the captured graphs after the last one
    left its rows in the cache; every prompt's greedy tokens equal those of its batch run alone as eager decode +
    argmax (the same batch: a row's logits depend on the rows beside it at rounding level)."""
    from dsv3.generate import PlainSteps
    from dsv3.runtime.engine import jit_stepper

    model = dsv3.load(random_checkpoint("tiny", "fp8"), dtype=torch.bfloat16, max_batch_size=2,
                      max_seq_len=MAX_SEQ_LEN, num_layers=LAYERS, device="cuda", progress=False)
    stepper, _ = jit_stepper(model, (1, 4), prefill_chunk=16)
    prompts = PROMPTS + [[0, 9, 10, 11, 12, 13], [0, 42], list(range(3, 20))]
    comps, stats = generate_in_batches(stepper, prompts, max_new_tokens=6)
    assert stats.batches == 3 and len(comps) == len(prompts)
    for first in range(0, len(prompts), 2):
        ref, _ = generate(PlainSteps(stepper), prompts[first:first + 2], max_new_tokens=6)
        assert [c.tokens for c in comps[first:first + 2]] == [c.tokens for c in ref], first


@pytest.mark.gpu
def test_capture_warm_up_reads_zeroed_inputs(monkeypatch):
    """The decode graphs' warm-up runs on a side stream: it must wait for the current stream's zero-fill of each
    bucket's static tokens and positions. A race here read the allocator's recycled bytes as token ids (a device-side
    assert in the embedding, one whole-suite run in four). torch.zeros is made late on purpose (the tensor holds 7s
    until a zero-fill queued behind a ~25 ms sleep), so a warm-up that does not wait sees the 7s."""
    from types import SimpleNamespace

    from dsv3.runtime.engine import GraphStepper

    vocab, seen = 64, []
    table = torch.randn(vocab, vocab, device="cuda")
    real_zeros = torch.zeros

    def late_zeros(*shape, **kw):
        t = torch.empty(*shape, **kw).fill_(7)
        if t.is_cuda and not torch.cuda.is_current_stream_capturing():
            torch.cuda._sleep(50_000_000)
            t.zero_()
        return t

    def step(tok, *rest):  # a decode (tok, pos) or prefill (tok, pos, rows, last) graph's stand-in
        if not torch.cuda.is_current_stream_capturing():
            seen.append(tok.clone())  # on the stream the caller runs it on
        return table[tok[:, -1].clamp(0, vocab - 1)]

    model = SimpleNamespace(max_batch_size=4, max_seq_len=32, rope_cos=real_zeros(1, device="cuda"))
    monkeypatch.setattr(torch, "zeros", late_zeros)
    stepper = GraphStepper(model, step, {1: step, 4: step}, prefill_chunk=16, cuda_graphs=True)
    torch.cuda.synchronize()
    monkeypatch.setattr(torch, "zeros", real_zeros)
    assert sorted(stepper.graphs) == [1, 4] and len(seen) >= 6
    assert all(int(t.abs().max()) == 0 for t in seen), [t.flatten().tolist() for t in seen]


@pytest.mark.gpu
def test_cuda_graph_sampled_loop(random_checkpoint):
    """Sampled generation through the JIT stepper's sampled loop graphs (decode, temperature / top-k / top-p, the
    random draws and the next inputs in one graph, captured on first use): a batch that fills its bucket draws what
    eager decode + sample draws from the same seed, so the tokens are equal; with padding rows (2 prompts in the
    4-row bucket) top-k 1 gives the greedy tokens; a seed reproduces a run; the oldest graph goes past the limit."""
    from dsv3.generate import PlainSteps
    from dsv3.runtime.engine import jit_stepper

    model = dsv3.load(random_checkpoint("tiny", "fp8"), dtype=torch.bfloat16, max_batch_size=4,
                      max_seq_len=MAX_SEQ_LEN, num_layers=LAYERS, device="cuda", progress=False)
    stepper, _ = jit_stepper(model, (1, 4), prefill_chunk=16)
    four = [PROMPTS[i % len(PROMPTS)][: 3 + i] for i in range(4)]
    for params in (SamplingParams(temperature=0.8), SamplingParams(temperature=0.7, top_k=20, top_p=0.9)):
        for batch in (four[:1], four):
            ours, _ = generate(stepper, batch, max_new_tokens=10, sampling=params, seed=3)
            again, _ = generate(stepper, batch, max_new_tokens=10, sampling=params, seed=3)
            ref, _ = generate(PlainSteps(stepper), batch, max_new_tokens=10, sampling=params, seed=3)
            assert [c.tokens for c in ours] == [c.tokens for c in ref] == [c.tokens for c in again]
    assert set(stepper.sampled_graphs) == {(b, p) for b in (1, 4) for p in (
        SamplingParams(temperature=0.8), SamplingParams(temperature=0.7, top_k=20, top_p=0.9))}

    greedy, _ = generate(stepper, four[:2], max_new_tokens=10)
    top1, _ = generate(stepper, four[:2], max_new_tokens=10, sampling=SamplingParams(temperature=1.0, top_k=1))
    assert [c.tokens for c in top1] == [c.tokens for c in greedy]
    draws = {tuple(generate(stepper, four[:2], max_new_tokens=10, sampling=SamplingParams(temperature=1.5),
                            seed=s)[0][0].tokens) for s in (1, 1, 2)}
    assert len(draws) == 2  # seed 1 twice: one sequence; seed 2: another (vocab 1024, 10 tokens: no collision)

    stepper.MAX_SAMPLED_GRAPHS = 2
    stepper.prepare_sampling(SamplingParams(temperature=0.5), 1)
    assert list(stepper.sampled_graphs)[-1] == (1, SamplingParams(temperature=0.5))
    assert len(stepper.sampled_graphs) == 2


def test_prefill_buckets_and_which_one_a_call_takes():
    """The first-chunk buckets of a 16B build (decode buckets 1 and 8, chunk 4096, a static 1x16 graph) and the one
    a call of `rows` prompts right-padded to `width` tokens takes: the smallest that holds it, unless its padding
    costs more than a replay saves (the cases measured in GraphStepper's comments); None is the plain call."""
    from types import SimpleNamespace

    from dsv3.runtime.engine import GraphStepper as G

    consts = ("SHORT_PREFILL_WIDTHS", "SHORT_PREFILL_TOKENS", "LONG_PREFILL_WIDTHS", "PREFILL_PAD_FREE_TOKENS",
              "PREFILL_PAD_TOKENS")
    st = SimpleNamespace(**{k: getattr(G, k) for k in consts}, prefill_chunk=4096, buckets=[1, 8],
                         prefill_first_rows=8, static_first_fns={(1, 16): None})
    st._padding_pays = lambda *a: G._padding_pays(st, *a)
    shapes = G._short_prefill_shapes(st)
    one_row = {(1, w) for w in (16, 32, 64, 128, 256, *range(384, 2049, 128), 4096)}  # and the whole chunk
    assert sorted(shapes) == sorted(one_row | {(8, 16), (8, 32), (8, 64), (8, 128)})
    assert shapes[:3] == [(1, 4096), (1, 2048), (1, 1920)] and shapes[-1] == (1, 16)  # captured largest first
    st.short_prefill = {rw: rw for rw in shapes}  # stand-ins: the chosen key comes back

    def pick(rows, width):
        return G._short_prefill_for(st, rows, width)

    assert [pick(1, w) for w in (14, 17, 129, 257, 385, 1000, 1153, 2048)] == [
        (1, 16), (1, 32), (1, 256), (1, 384), (1, 512), (1, 1024), (1, 1280), (1, 2048)]
    assert pick(1, 2049) is None and pick(1, 3839) is None  # the next bucket is the chunk: too much padding
    assert pick(1, 3840) == (1, 4096) and pick(1, 4095) == (1, 4096)
    assert pick(2, 60) == (8, 64) and pick(5, 14) == (8, 16)  # 512 tokens or fewer: any padding
    assert pick(8, 100) == (8, 128)  # 224 padded tokens
    assert pick(2, 100) is None and pick(5, 100) is None  # 824 / 524: the plain call
    assert pick(2, 200) is None  # no bucket holds it
    # a later chunk: the whole-chunk bucket of the general graph while its padding pays and its padded positions
    # stay inside the cache
    st.later_prefill, st.max_seq_len = SimpleNamespace(width=4096), 16384
    later = [G._later_prefill_for(st, start, n) for start, n in ((4096, 4096), (8192, 3840), (12288, 4096),
                                                                    (8192, 3839), (12289, 4095), (4096, 1))]
    assert later == [st.later_prefill] * 3 + [None] * 3
    st.later_prefill = None
    assert G._later_prefill_for(st, 4096, 4096) is None
    st.prefill_chunk = 512  # no bucket wider than the chunk
    assert max(w for _, w in G._short_prefill_shapes(st)) == 512
    st.buckets = [8]  # decode buckets without 1: the short buckets take 8 rows, the long ones still one
    assert sorted(G._short_prefill_shapes(st)) == [(1, 16), (1, 384), (1, 512), (8, 16), (8, 32), (8, 64), (8, 128)]


@pytest.mark.gpu
def test_short_prefill_cuda_graphs(random_checkpoint, monkeypatch):
    """The JIT stepper captures a CUDA graph of the first-chunk graph per (rows, width) bucket: short prompts
    (one, and a batch the bucket pads with repeated rows) replayed through them give the logits of the plain calls
    (bf16: the padded width changes the GEMMs' M, so close, not equal), with fresh inputs on every replay; greedy
    generation after them gives the tokens it gives after plain prefills. A long one-prompt width (here 24) adds a
    one-row bucket between the short ones."""
    from dsv3.runtime.engine import GraphStepper, jit_stepper

    monkeypatch.setattr(GraphStepper, "LONG_PREFILL_WIDTHS", (24, 64))  # 64: wider than the chunk, no bucket
    model = dsv3.load(random_checkpoint("tiny", "fp8"), dtype=torch.bfloat16, max_batch_size=4,
                      max_seq_len=MAX_SEQ_LEN, num_layers=LAYERS, device="cuda", progress=False)
    stepper, _ = jit_stepper(model, (1, 4), prefill_chunk=32)
    assert sorted(stepper.short_prefill) == [(1, 16), (1, 24), (1, 32), (4, 16), (4, 32)]
    assert all(s.graph is not None for s in stepper.short_prefill.values())
    graphs = dict(stepper.short_prefill)
    assert stepper._short_prefill_for(1, 20) is graphs[(1, 24)]
    for prompts in ([PROMPTS[0]], [p[:5 + i] for i, p in enumerate(PROMPTS)][:3], [list(range(3, 30))],
                    [list(range(5, 25))], [[7, 8]]):
        stepper.short_prefill.update(graphs)
        replayed = stepper.prefill(prompts).clone()
        stepper.short_prefill.clear()
        plain = stepper.prefill(prompts)
        assert replayed.argmax(-1).tolist() == plain.argmax(-1).tolist()
        assert ((replayed - plain).abs().max() / plain.abs().max()).item() < 2e-2
    stepper.short_prefill.update(graphs)
    ours, _ = generate(stepper, [PROMPTS[1], PROMPTS[0]], max_new_tokens=6)
    stepper.short_prefill.clear()
    ref, _ = generate(stepper, [PROMPTS[1], PROMPTS[0]], max_new_tokens=6)
    assert [c.tokens for c in ours] == [c.tokens for c in ref]


@pytest.mark.gpu
def test_later_chunks_replayed_from_the_full_chunk_graph(random_checkpoint):
    """A prompt's chunks after the first replay a CUDA graph of the general prefill graph at a whole chunk, its
    positions an input of the graph: a full chunk, and a shorter last one padded to it. Logits close to the plain
    calls' (bf16: the padded width changes the GEMMs' M) with the same argmax, and the same greedy tokens after."""
    from dsv3.runtime.engine import jit_stepper

    model = dsv3.load(random_checkpoint("tiny", "fp8"), dtype=torch.bfloat16, max_batch_size=4, max_seq_len=64,
                      num_layers=LAYERS, device="cuda", progress=False)
    stepper, _ = jit_stepper(model, (1, 4), prefill_chunk=16)
    later = stepper.later_prefill
    assert later is not None and later.graph is not None and later.fn is stepper.prefill_fn and later.width == 16
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 1000, (n,), generator=g).tolist() for n in (40, 32, 19)]  # 16+16+8, 16+16, 16+3
    for batch in ([prompts[0]], prompts):
        replayed = stepper.prefill(batch).clone()
        stepper.later_prefill = None
        plain = stepper.prefill(batch)
        stepper.later_prefill = later
        assert replayed.argmax(-1).tolist() == plain.argmax(-1).tolist()
        assert ((replayed - plain).abs().max() / plain.abs().max()).item() < 2e-2
    ours, _ = generate(stepper, prompts, max_new_tokens=6)
    stepper.later_prefill = None
    ref, _ = generate(stepper, prompts, max_new_tokens=6)
    assert [c.tokens for c in ours] == [c.tokens for c in ref]
