"""The prefill attention kernels (dsv3.kernels.mla_prefill) run by the Triton CPU interpreter against float64
references. Run in its own process with TRITON_INTERPRET=1 by tests/test_prefill.py (the flag must be set before
triton is imported); by hand: TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_prefill.py

fp16 inputs: the interpreter's fp32 -> bf16 cast truncates and its bf16 dot is wrong (see interpret_kernels.py),
fp16 is exact enough to check the kernels' logic (masks, causal bounds, the prefix merge) at 2e-3.
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_prefill.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import mla_prefill as P  # noqa: E402
from interpret_kernels import fixed_interpreter  # noqa: E402,F401  (fixture: RTNE casts, as the GPU's)
from kernel_checks import rel_err  # noqa: E402

# (batch, chunk length S, heads, Dn, R, Dv, first position of each sequence's chunk, cache rows)
CASES = [
    (1, 5, 2, 16, 8, 16, [0], 8),          # one chunk, no prefix, tiny
    (2, 37, 3, 24, 8, 20, [0, 11], 64),    # ragged dims, one sequence continues a prefix of 11 rows
    (1, 150, 2, 32, 16, 32, [70], 256),    # several query and key blocks, prefix longer than one block
]


def _inputs(case, gen, dtype=torch.float16):
    b, s, h, dn, r, dv, starts, t = case
    c = 40
    pos = torch.tensor(starts)[:, None] + torch.arange(s)[None]
    r_ = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    return dict(q_nope=r_(b, s, h, dn), q_pe=r_(b, s, h, r), k_nope=r_(b, s, h, dn), k_pe=r_(b, s, r),
                v=r_(b, s, h, dv), q_latent=r_(b, s, h, c), cache=r_(b, t, c + r), pos=pos)


@pytest.mark.parametrize("case", CASES)
def test_prefix_attention(case):
    a = _inputs(case, torch.Generator().manual_seed(1 + case[1]))
    starts = case[6]
    for i, st in enumerate(starts):  # rows at and after the chunk's first position must never be read
        a["cache"][i, st:] = float("nan")
    out, lse = P.mla_prefix_attention_triton(a["q_latent"], a["q_pe"], a["cache"], a["pos"], 0.15)
    clean = torch.nan_to_num(a["cache"].double(), nan=0.0)
    ref, ref_lse = P.mla_prefix_attention_reference(a["q_latent"].double(), a["q_pe"].double(), clean, a["pos"], 0.15)
    for i, st in enumerate(starts):
        if st == 0:
            assert (out[i] == 0).all() and torch.isneginf(lse[i]).all()
        else:
            assert rel_err(out[i], ref[i]) < 2e-3
            assert (lse[i].double() - ref_lse[i]).abs().max() < 1e-3


@pytest.mark.parametrize("case", CASES)
def test_prefill_attention(case):
    a = _inputs(case, torch.Generator().manual_seed(2 + case[1]))
    b, s, h, dn, r, dv, starts, t = case
    gen = torch.Generator().manual_seed(7)
    prefix_out = torch.randn(b, s, h, dv, generator=gen).half()
    prefix_lse = torch.randn(b, s, h, generator=gen) * 3
    for i, st in enumerate(starts):
        if st == 0:
            prefix_lse[i] = float("-inf")
            prefix_out[i] = float("nan")  # never read when the prefix is empty
    args = (a["q_nope"], a["q_pe"], a["k_nope"], a["k_pe"], a["v"], a["pos"], 0.15)
    out = P.mla_prefill_attention_triton(*args, prefix_out, prefix_lse, block_m=32, block_n=16, num_warps=4)
    ref = P.mla_prefill_attention_reference(*(x.double() if x.is_floating_point() else x for x in args[:6]), 0.15,
                                            torch.nan_to_num(prefix_out.double(), nan=0.0), prefix_lse.double())
    assert out.shape == (b, s, h, dv) and rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (128, 64)])
def test_prefill_attention_without_prefix(block_m, block_n):
    """prefix_out / prefix_lse None (HAS_PREFIX=False, the first-chunk graph): the softmax over the chunk's own
    keys, equal to the float64 reference and to the kernel seeded with an empty prefix."""
    case = (2, 150, 2, 24, 8, 20, [0, 0], 256)
    a = _inputs(case, torch.Generator().manual_seed(5 + block_m))
    args = (a["q_nope"], a["q_pe"], a["k_nope"], a["k_pe"], a["v"], a["pos"], 0.15)
    out = P.mla_prefill_attention_triton(*args, block_m=block_m, block_n=block_n, num_warps=4)
    ref = P.mla_prefill_attention_reference(*(x.double() if x.is_floating_point() else x for x in args[:6]), 0.15)
    assert out.shape == (2, 150, 2, 20) and rel_err(out, ref) < 2e-3
    empty = P.mla_prefill_attention_triton(*args, torch.full((2, 150, 2, 20), float("nan")).half(),
                                           torch.full((2, 150, 2), float("-inf")), block_m=block_m,
                                           block_n=block_n, num_warps=4)
    assert torch.equal(out, empty)


def test_default_launch_config():
    """The defaults the model gets (128-query blocks, 64-key blocks)."""
    case = (1, 150, 2, 32, 16, 32, [0], 256)
    a = _inputs(case, torch.Generator().manual_seed(3))
    lse = torch.full((1, 150, 2), float("-inf"))
    po = torch.zeros(1, 150, 2, 32).half()
    args = (a["q_nope"], a["q_pe"], a["k_nope"], a["k_pe"], a["v"], a["pos"], 0.15)
    out = P.mla_prefill_attention_triton(*args, po, lse)
    ref = P.mla_prefill_attention_reference(*(x.double() if x.is_floating_point() else x for x in args[:6]), 0.15,
                                            po.double(), lse.double())
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (64, 16), (32, 32)])
def test_prefill_attention_block_shapes(block_m, block_n):
    """Key blocks before a program's first query skip the position test: any block_m / block_n ratio (block_n
    larger than block_m puts the diagonal inside a block that starts before the program's queries)."""
    case = (1, 150, 2, 32, 16, 32, [0], 256)
    a = _inputs(case, torch.Generator().manual_seed(11 + block_m + block_n))
    lse = torch.full((1, 150, 2), float("-inf"))
    po = torch.zeros(1, 150, 2, 32).half()
    args = (a["q_nope"], a["q_pe"], a["k_nope"], a["k_pe"], a["v"], a["pos"], 0.15)
    out = P.mla_prefill_attention_triton(*args, po, lse, block_m=block_m, block_n=block_n, num_warps=4)
    ref = P.mla_prefill_attention_reference(*(x.double() if x.is_floating_point() else x for x in args[:6]), 0.15,
                                            po.double(), lse.double())
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("prefix", [False, True])
def test_prefill_keys_through_descriptors(prefix, monkeypatch):
    """The keys through TMA descriptors over their row views (the launcher's choice where the layout allows one)
    give the pointer tiles' output bit for bit, on the model's layouts: k_nope and v split out of one kv_b output,
    k_pe a column slice of the latent rows; two sequences, so a key block past the first one's S reads the second
    one's rows (masked out of the scores)."""
    from dsv3.kernels._launch import tma_descriptor_ok

    gen = torch.Generator().manual_seed(17)
    b, s, h, dn, r, dv, c = 2, 150, 2, 32, 16, 32, 40
    kv = torch.randn(b, s, h, dn + dv, generator=gen).half()
    k_nope, v = kv.split([dn, dv], dim=-1)
    k_pe = torch.randn(b, s, c + r, generator=gen).half()[..., c:]
    q_nope, q_pe = torch.randn(b, s, h, dn, generator=gen).half(), torch.randn(b, s, h, r, generator=gen).half()
    pos = torch.arange(s)[None].repeat(b, 1)
    extra = ()
    if prefix:
        pos = pos + torch.tensor([[0], [9]])
        extra = (torch.randn(b, s, h, dv, generator=gen).half(), torch.randn(b, s, h, generator=gen) * 3)
    assert all(tma_descriptor_ok(t) for t in (k_nope, k_pe, v))
    args = (q_nope, q_pe, k_nope, k_pe, v, pos, 0.15)
    outs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("DSV3_PREFILL_ATTN_TMA", mode)
        outs[mode] = P.mla_prefill_attention_triton(*args, *extra, block_m=32, block_n=32, num_warps=4)
    assert torch.equal(outs["on"], outs["off"])
    ref = P.mla_prefill_attention_reference(*(x.double() if x.is_floating_point() else x for x in args[:6]), 0.15,
                                            *(x.double() for x in extra))
    assert rel_err(outs["on"], ref) < 2e-3
    monkeypatch.setenv("DSV3_PREFILL_ATTN_TMA", "maybe")
    with pytest.raises(ValueError, match="DSV3_PREFILL_ATTN_TMA"):
        P.mla_prefill_attention_triton(*args, *extra, block_m=32, block_n=32, num_warps=4)


@pytest.mark.parametrize("b,s,prefix", [(1, 37, False), (2, 21, True), (3, 33, False)])
def test_prefill_attention_quantized_output(b, s, prefix, fixed_interpreter, monkeypatch):
    """QUANT_OUT (dsv3.mla_prefill_attention_o_proj's fused path): the kernel's output quantized for o_proj equals
    act_quant of its plain output in the layout cuBLAS takes (rows padded to 4 with quantized zeros, scales
    M-major): e4m3 values (up to a zero's sign) and scales bit for bit; B * S = 37, 42, 99 leave 3, 2, 1 padding rows
    (written by the last sequence's last query block), with and without a prefix, several query blocks."""
    from dsv3.kernels.fp8_linear import act_quant

    gen = torch.Generator().manual_seed(b * 100 + s)
    h, dn, r, dv = 2, 32, 16, 128
    r_ = lambda *shape: torch.randn(*shape, generator=gen).half()  # noqa: E731
    q_nope, q_pe, k_nope, k_pe, v = r_(b, s, h, dn), r_(b, s, h, r), r_(b, s, h, dn), r_(b, s, r), r_(b, s, h, dv)
    pos = torch.arange(s)[None].repeat(b, 1)
    extra = ()
    if prefix:
        pos = pos + torch.arange(b)[:, None] * 5
        extra = (r_(b, s, h, dv), torch.randn(b, s, h, generator=gen) * 3)
    args = (q_nope, q_pe, k_nope, k_pe, v, pos, 0.15, *extra)
    kw = dict(block_m=16, block_n=16, num_warps=4)
    out = P.mla_prefill_attention_triton(*args, **kw)
    empty = torch.empty

    def poisoned(*shape, **kwargs):  # every byte the kernel leaves unwritten reads as NaN
        t = empty(*shape, **kwargs)
        (t.view(torch.uint8).fill_(0x7F) if t.element_size() == 1 else t.fill_(float("nan")))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    oq, os_ = P.mla_prefill_attention_triton(*args, quant_out=True, **kw)
    monkeypatch.setattr(torch, "empty", empty)
    want_q, want_s = act_quant(out.reshape(b * s, h * dv), pad_rows_to=4, scales_m_major=True)
    assert oq.shape == want_q.shape == (-(-b * s // 4) * 4, h * dv) and os_.stride() == want_s.stride()
    assert torch.equal(oq.float(), want_q.float()) and torch.equal(os_, want_s)
    with pytest.raises(ValueError, match="v_head_dim 32"):
        P.mla_prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v[..., :32].contiguous(), pos, 0.15,
                                       quant_out=True)


@pytest.mark.parametrize("quant_out", [False, True])
def test_prefill_attention_head_groups(quant_out, fixed_interpreter, monkeypatch):
    """Heads scheduled in groups (PREFILL_HEAD_GROUP; 2 here: 5 heads in 3 groups, the last one partial) over 3
    sequences, with a prefix: every output element written (buffers poisoned), bitwise the one-group launch's (the
    default up to 16 heads), which matches the float64 reference; with QUANT_OUT the padding rows too."""
    gen = torch.Generator().manual_seed(41)
    b, s, h, dn, r, dv = 3, 21, 5, 32, 16, 128
    r_ = lambda *shape: torch.randn(*shape, generator=gen).half()  # noqa: E731
    pos = torch.arange(s)[None] + torch.tensor([[0], [5], [9]])
    args = (r_(b, s, h, dn), r_(b, s, h, r), r_(b, s, h, dn), r_(b, s, r), r_(b, s, h, dv), pos, 0.15,
            r_(b, s, h, dv), torch.randn(b, s, h, generator=gen) * 3)
    empty = torch.empty

    def poisoned(*shape, **kwargs):
        t = empty(*shape, **kwargs)
        (t.view(torch.uint8).fill_(0x7F) if t.element_size() == 1 else t.fill_(float("nan")))
        return t

    outs = {}
    for group in (16, 2):
        monkeypatch.setattr(P, "PREFILL_HEAD_GROUP", group)
        monkeypatch.setattr(torch, "empty", poisoned)
        res = P.mla_prefill_attention_triton(*args, quant_out=quant_out, block_m=16, block_n=16, num_warps=4)
        monkeypatch.setattr(torch, "empty", empty)
        outs[group] = res if quant_out else (res,)
    assert all(torch.equal(x.float(), y.float()) for x, y in zip(outs[16], outs[2]))
    if not quant_out:
        ref = P.mla_prefill_attention_reference(
            *(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args))
        assert rel_err(outs[2][0], ref) < 2e-3


# (batch, chunk length S, heads, Dn, R, Dv, kv_lora_rank C, first position of each row's chunk, cache rows T)
CACHED_CASES = [
    (2, 37, 3, 24, 8, 20, 40, [150, 0], 300),       # ragged dims (pointer tiles), a prefix past one row tile
    (1, 70, 2, 32, 16, 32, 64, [130], 256),         # exact dims: keys through TMA descriptors, chunk ends at 200
    (2, 16, 4, 32, 16, 32, 64, [0, 240], 256),      # the second row's chunk ends at the cache's last row; N = 256:
]                                                   # the persistent TMA decompression (the others: its pointer form)


@pytest.mark.parametrize("case", CACHED_CASES)
@pytest.mark.parametrize("blocks", [None, (32, 16)])
@pytest.mark.parametrize("chosen_rows", [False, True])
def test_cached_prefill_attention(case, blocks, chosen_rows, monkeypatch):
    """dsv3.mla_cached_prefill_attention's CUDA path on the interpreter: `kv_decompress_triton` decompresses each
    row's cache rows up to its chunk's last position in whole KEY_TILE_ROWS tiles (equal to F.linear there, k_pe
    copied after the heads bit for bit; the cache past those tiles NaN, never read), then the attention kernel with
    KEYS_CACHED (its keys past those tiles NaN too) equals the float64 reference, with the launcher's default blocks
    and small ones (several masked and unmasked key blocks per program). chosen_rows: the sequences sit at rows
    cache_rows of a larger cache (reversed, one spare row; the rows not chosen NaN) and are read there in place."""
    b, s, h, dn, r, dv, c, starts, t = case
    gen = torch.Generator().manual_seed(sum(starts) + s)
    r_ = lambda *shape: torch.randn(*shape, generator=gen).half()  # noqa: E731
    cache, w = r_(b, t, c + r), (torch.randn(h * (dn + dv), c, generator=gen) * c ** -0.5).half()
    q_nope, q_pe = r_(b, s, h, dn), r_(b, s, h, r)
    pos = torch.tensor(starts)[:, None] + torch.arange(s)[None]
    tile = P.KEY_TILE_ROWS
    ends = [min(t, -(-(st + s) // tile) * tile) for st in starts]  # rows the decompression computes
    clean = cache.clone()
    for i, e in enumerate(ends):
        cache[i, e:] = float("nan")
    rows = None
    if chosen_rows:
        rows = torch.arange(b, 0, -1)                      # sequence i at row b - i of b + 1 rows
        whole = torch.full((b + 1, t, c + r), float("nan"), dtype=cache.dtype)
        whole[rows] = cache
        cache = whole
    kv = P.kv_decompress_triton(cache, pos, w, rows)
    n = h * (dn + dv)
    assert kv.shape == (b, t, n + r)
    if n % P.DECOMPRESS_TMA_BLOCK_N == 0:  # the TMA kernel ran: the pointer kernel computes the same rows
        monkeypatch.setenv("DSV3_PREFILL_DECOMPRESS", "pointer")
        ptr = P.kv_decompress_triton(cache, pos, w, rows)
        monkeypatch.delenv("DSV3_PREFILL_DECOMPRESS")
        for i, e in enumerate(ends):
            assert torch.equal(ptr[i, :e], kv[i, :e])
    want_kv = torch.nn.functional.linear(clean.float()[..., :c], w.float())
    for i, e in enumerate(ends):
        assert rel_err(kv[i, :e, :n], want_kv[i, :e]) < 1e-3
        assert torch.equal(kv[i, :e, n:], clean[i, :e, c:])
        kv[i, e:] = float("nan")
    k_nope, k_pe, v = P._cached_keys(kv, h, dn, v_dim=dv)
    kw = {} if blocks is None else dict(block_m=blocks[0], block_n=blocks[1], num_warps=4)
    out = P.mla_prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v, pos, 0.15, keys_cached=True, **kw)
    ref = P.mla_cached_prefill_attention_reference(q_nope.double(), q_pe.double(), clean.double(), pos, w.double(),
                                                   0.15, dn, dv)
    assert out.shape == (b, s, h, dv) and rel_err(out, ref) < 2e-3
    if chosen_rows:  # the reference reads the chosen rows too
        whole = clean.new_zeros((b + 1, t, c + r))
        whole[rows] = clean
        chosen = P.mla_cached_prefill_attention_reference(q_nope.double(), q_pe.double(), whole.double(), pos,
                                                          w.double(), 0.15, dn, dv, rows)
        assert torch.equal(chosen, ref)
    with pytest.raises(ValueError, match="keys_cached"):
        P.mla_prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v, pos, 0.15, out, torch.zeros(b, s, h),
                                       keys_cached=True)
