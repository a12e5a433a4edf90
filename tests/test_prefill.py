"""Prefill attention in naive (decompressed) form with the cache prefix in absorbed form (dsv3.kernels.mla_prefill).

- The two references combined equal plain causal attention over prefix + chunk in float64 (the merge through the
  prefix log-sum-exp is exact), and the model's prefill path equals its absorbed decode path token by token.
- The Triton kernels under the interpreter: tests/interpret_prefill.py (subprocess, TRITON_INTERPRET=1).
- GPU: the kernels against the references on H200-sized shapes (marked gpu).
"""

from __future__ import annotations


import pytest
import torch

import dsv3.kernels  # noqa: F401
from dsv3.kernels import mla_prefill as P
from kernel_checks import interpreter_failure, rel_err, run_interpreted


def test_prefill_kernels_interpreted():
    res = run_interpreted("interpret_prefill.py")
    assert res.returncode == 0, interpreter_failure(res)


def _naive_full(q_nope, q_pe, k_nope_all, k_pe_all, v_all, q_pos, scale):
    """Causal attention of the chunk's queries over every key so far (prefix + chunk), float64, no merging."""
    sc = (torch.einsum("bshd,bthd->bhst", q_nope, k_nope_all) + torch.einsum("bshr,btr->bhst", q_pe, k_pe_all)) * scale
    t = torch.arange(k_nope_all.shape[1])
    sc = sc.masked_fill(~(t[None, None, None, :] <= q_pos[:, None, :, None]), float("-inf"))
    return torch.einsum("bhst,bthd->bshd", torch.softmax(sc, -1), v_all)


@pytest.mark.parametrize("start", [0, 9])
def test_references_merge_prefix_exactly(start):
    """Keys of the prefix in absorbed form (latent c, W_UK/W_UV), the chunk's own in naive form: the two ops'
    references together equal one causal softmax over all keys, in float64."""
    g = torch.Generator().manual_seed(start)
    b, s, h, dn, r, dv, c = 2, 6, 3, 8, 4, 5, 12
    d = torch.float64
    total = start + s
    lat = torch.randn(b, total, c, generator=g, dtype=d)        # latent c_kv of every token so far
    k_pe = torch.randn(b, total, r, generator=g, dtype=d)
    w_uk = torch.randn(h, dn, c, generator=g, dtype=d)
    w_uv = torch.randn(h, dv, c, generator=g, dtype=d)
    k_nope = torch.einsum("btc,hdc->bthd", lat, w_uk)
    v = torch.einsum("btc,hdc->bthd", lat, w_uv)
    q_nope = torch.randn(b, s, h, dn, generator=g, dtype=d)
    q_pe = torch.randn(b, s, h, r, generator=g, dtype=d)
    pos = (start + torch.arange(s))[None].expand(b, s)
    scale = 0.3
    want = _naive_full(q_nope, q_pe, k_nope, k_pe, v, pos, scale)

    cache = torch.cat([lat, k_pe], -1)
    q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
    o_lat, lse = P.mla_prefix_attention_reference(q_latent, q_pe, cache, pos, scale)
    prefix_out = torch.einsum("bshc,hdc->bshd", o_lat, w_uv)
    got = P.mla_prefill_attention_reference(q_nope, q_pe, k_nope[:, start:], k_pe[:, start:], v[:, start:], pos,
                                            scale, prefix_out, lse)
    assert torch.isneginf(lse).all() == (start == 0)
    assert (got - want).abs().max() < 1e-10
    # every key decompressed from the cache (dsv3.mla_cached_prefill_attention): kv_b_proj's rows per head are W_UK's
    # then W_UV's; cache rows past the chunk hold other values and must be masked out
    w_kv_b = torch.cat([w_uk, w_uv], dim=1).reshape(h * (dn + dv), c)
    stale = torch.cat([cache, torch.randn(b, 5, c + r, generator=g, dtype=d)], dim=1)
    cached = P.mla_cached_prefill_attention_reference(q_nope, q_pe, stale, pos, w_kv_b, scale, dn, dv)
    assert (cached - want).abs().max() < 1e-10
    if start == 0:  # no prefix at all (the first-chunk graph's call): the same attention
        alone = P.mla_prefill_attention_reference(q_nope, q_pe, k_nope, k_pe, v, pos, scale)
        assert (alone - want).abs().max() < 1e-10


def test_prefill_attention_launch_rule():
    """The attention's launch config by size: 64-row query blocks where the 128-row config's programs (heads x rows x
    query blocks) fit in one wave, else 128-row. Static sizes take one launch; dynamic ones (SymInts, as the
    prefill packages trace the chunk length and rows) get both launches, and at every size exactly the static
    rule's launch has query blocks, the other zero (no launch), with no guard added on the sizes."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    long, short = P.PREFILL_ATTN_LONG, P.PREFILL_ATTN_SHORT
    env = ShapeEnv()
    s_sym, b_sym = (env.create_symbol(hint, source=ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
                    for name, hint in (("s", 700), ("b", 2)))
    s_dyn, b_dyn = env.create_symintnode(s_sym, hint=700), env.create_symintnode(b_sym, hint=2)
    cases = [(16, 1, n) for n in (1, 16, 333, 1023, 1024, 1025, 2048, 4096, 70000)]
    cases += [(16, 8, 128), (16, 8, 129), (128, 1, 128), (128, 1, 129), (128, 2, 1024), (4, 3, 1408), (4, 3, 1409)]
    for heads, bsz, n in cases:
        (cfg, blocks), = P.prefill_attention_launches(n, heads, bsz, 132)
        assert cfg == (short if heads * bsz * -(-n // 128) <= 132 else long), (heads, bsz, n)
        assert blocks == -(-n // cfg.block_m)
        for seqlen, rows in ((s_dyn, bsz), (s_dyn, b_dyn)):
            dynamic = P.prefill_attention_launches(seqlen, heads, rows, 132)
            assert [c for c, _ in dynamic] == [long, short]
            at = {c: int(b.node.expr.xreplace({s_sym: n, b_sym: bsz})) for c, b in dynamic}
            assert at == {cfg: blocks, ({long, short} - {cfg}).pop(): 0}, (heads, bsz, n)
    assert not env.guards


def test_descriptor_launch_support_and_layout_checks():
    """The private torch classes `launch_with_descriptors` leans on exist in this torch (CI fails here, not by a
    silent fallback to pointer tiles, when an upgrade removes them), and `tma_descriptor_ok` takes the model's key
    layouts and refuses the rest: no GPU and no interpreter, a misaligned column slice, a last dim not contiguous."""
    import os

    from dsv3.kernels._launch import descriptor_launch_supported, tma_descriptor_ok

    assert descriptor_launch_supported()
    kv = torch.zeros(1, 7, 2, 256, dtype=torch.bfloat16)
    latent = torch.zeros(1, 7, 576, dtype=torch.bfloat16)
    k_nope, v = kv.split([128, 128], dim=-1)
    cases = [(k_nope, True), (v, True), (latent[..., 512:], True), (latent[..., 3:], False),
             (kv.transpose(-1, -2), False)]
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        assert not any(tma_descriptor_ok(t) for t, _ in cases)   # a CPU tensor outside the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
        assert [tma_descriptor_ok(t) for t, _ in cases] == [ok for _, ok in cases]
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def test_ops_fake_and_schema():
    g = torch.Generator().manual_seed(0)
    b, s, h, dn, r, dv, c, t = 1, 5, 2, 8, 4, 8, 12, 16
    q_latent = torch.randn(b, s, h, c, generator=g)
    q_pe = torch.randn(b, s, h, r, generator=g)
    cache = torch.randn(b, t, c + r, generator=g)
    pos = (3 + torch.arange(s))[None]
    torch.library.opcheck(torch.ops.dsv3.mla_prefix_attention.default, (q_latent, q_pe, cache, pos, 0.2),
                          test_utils=("test_schema", "test_faketensor"))
    args = (torch.randn(b, s, h, dn, generator=g), q_pe, torch.randn(b, s, h, dn, generator=g),
            torch.randn(b, s, r, generator=g), torch.randn(b, s, h, dv, generator=g), pos, 0.2,
            torch.randn(b, s, h, dv, generator=g), torch.randn(b, s, h, generator=g))
    torch.library.opcheck(torch.ops.dsv3.mla_prefill_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.dsv3.mla_prefill_attention.default, args[:7],
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(Exception, match="together"):
        torch.ops.dsv3.mla_prefill_attention(*args[:8])
    from dsv3.kernels.fp8_blocks import quantize_weight

    w_kv_b = torch.randn(h * (dn + dv), c, generator=g)
    cached = (args[0], q_pe, cache, pos, w_kv_b, 0.2, dn, dv)
    torch.library.opcheck(torch.ops.dsv3.mla_cached_prefill_attention.default, cached,
                          test_utils=("test_schema", "test_faketensor"))
    o_w, o_s = quantize_weight(torch.randn(24, h * dv, generator=g))
    torch.library.opcheck(torch.ops.dsv3.mla_cached_prefill_attention_o_proj.default, (*cached, o_w, o_s),
                          test_utils=("test_faketensor",))  # (test_schema multiplies the FP8 weight: not on CPU)
    with pytest.raises(Exception, match="does not give"):
        torch.ops.dsv3.mla_cached_prefill_attention(*(a.to("meta") for a in (args[0], q_pe, cache, pos)),
                                                    w_kv_b[:-1].to("meta"), 0.2, dn, dv)
    # the batch's sequence at a chosen row of a larger cache (read in place on CUDA)
    whole = torch.cat([torch.randn(2, t, c + r, generator=g), cache])
    rows = torch.tensor([2])
    chosen = (args[0], q_pe, whole, pos, w_kv_b, 0.2, dn, dv, rows)
    torch.library.opcheck(torch.ops.dsv3.mla_cached_prefill_attention.default, chosen,
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.dsv3.mla_cached_prefill_attention_o_proj.default, (*chosen[:8], o_w, o_s, rows),
                          test_utils=("test_faketensor",))
    assert torch.equal(torch.ops.dsv3.mla_cached_prefill_attention(*chosen),
                       torch.ops.dsv3.mla_cached_prefill_attention(*cached))
    with pytest.raises(Exception, match="one row per sequence"):
        torch.ops.dsv3.mla_cached_prefill_attention(*(a.to("meta") for a in chosen[:5]), 0.2, dn, dv,
                                                    torch.tensor([2, 0], device="meta"))


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("start", [0, 300])
@pytest.mark.parametrize("s", [17, 1000, 1500])
def test_prefill_kernels_gpu(s, start):
    """16B shapes (H=16, Dn=128, R=64, Dv=128, C=512), bf16, against float64 references."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(s + start)
    b, h, dn, r, dv, c = 1, 16, 128, 64, 128, 512
    rn = lambda *shape: torch.randn(*shape, device=dev, generator=g).bfloat16()  # noqa: E731
    cache = rn(b, 2048, c + r)
    pos = (start + torch.arange(s, device=dev))[None]
    cache[:, start:] = float("nan")  # rows from the chunk on are never read by the prefix half
    q_latent, q_pe = rn(b, s, h, c), rn(b, s, h, r)
    out, lse = torch.ops.dsv3.mla_prefix_attention(q_latent, q_pe, cache, pos, 0.07)
    clean = torch.nan_to_num(cache.double(), nan=0.0)
    ref, ref_lse = P.mla_prefix_attention_reference(q_latent.double(), q_pe.double(), clean, pos, 0.07)
    if start:
        assert rel_err(out, ref) < 8e-3 and (lse.double() - ref_lse).abs().max() < 1e-2
    else:
        assert (out == 0).all() and torch.isneginf(lse).all()
    args = (rn(b, s, h, dn), q_pe, rn(b, s, h, dn), rn(b, s, r), rn(b, s, h, dv), pos, 0.07)
    prefix_out = rn(b, s, h, dv)
    o = torch.ops.dsv3.mla_prefill_attention(*args, prefix_out, lse)
    want = P.mla_prefill_attention_reference(*(x.double() if x.is_floating_point() else x for x in args[:6]), 0.07,
                                             prefix_out.double(), lse.double())
    assert rel_err(o, want) < 8e-3
    if start == 0:  # no prefix passed at all (the first-chunk graph): the same result as an empty one
        alone = torch.ops.dsv3.mla_prefill_attention(*args)
        assert rel_err(alone, want) < 8e-3 and torch.equal(alone, o)


class _FirstChunkAttention(torch.nn.Module):
    """The first-chunk attention as the model calls it: k_nope and v split out of one kv_b output, k_pe a column
    slice of the latent rows (the layouts the keys' TMA descriptors are built over)."""

    def forward(self, q_nope, q_pe, kv, latent, pos):
        k_nope, v = kv.split([128, 128], dim=-1)
        return torch.ops.dsv3.mla_prefill_attention(q_nope, q_pe, k_nope, latent[..., 512:], v, pos, 0.07)


@pytest.mark.gpu
def test_prefill_keys_through_descriptors_gpu(monkeypatch, tmp_path):
    """The prefill attention's keys through TMA descriptors (the default on sm_90) give the pointer tiles' output
    bit for bit, eagerly, under torch.compile(fullgraph=True) and inside an AOTInductor package with a dynamic
    chunk length run at five lengths (the descriptors are rebuilt from each call's sizes; both launch configs);
    16B shapes, 2 sequences."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(3)
    rn = lambda *shape: torch.randn(*shape, device=dev, generator=g).bfloat16()  # noqa: E731

    def inputs(s):
        return (rn(2, s, 16, 128), rn(2, s, 16, 64), rn(2, s, 16, 256), rn(2, s, 576),
                torch.arange(s, device=dev)[None].repeat(2, 1))

    mod = _FirstChunkAttention()
    a = inputs(700)
    outs = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("DSV3_PREFILL_ATTN_TMA", mode)
        outs[mode] = mod(*a)
    assert torch.isfinite(outs["on"]).all() and torch.equal(outs["on"], outs["off"])
    torch._dynamo.reset()
    assert torch.equal(torch.compile(mod, fullgraph=True)(*a), outs["on"])
    s_dim = torch.export.Dim("s", min=65, max=4096)
    ep = torch.export.export(mod, a, dynamic_shapes=({1: s_dim}, {1: s_dim}, {1: s_dim}, {1: s_dim}, {1: s_dim}))
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "attn.pt2")))
    for s in (700, 333, 1024, 1025, 4096):  # both launch configs (`prefill_attention_launches`), each side of the bar
        b = a if s == 700 else inputs(s)
        monkeypatch.setenv("DSV3_PREFILL_ATTN_TMA", "off")
        assert torch.equal(runner(*b), mod(*b)), s


class _StaticChunkAttention(torch.nn.Module):
    """_FirstChunkAttention on keys computed inside the graph (Inductor's own buffers, as in the model's graph)."""

    def forward(self, q_nope, q_pe, kv, latent, pos):
        kv, latent = kv * 2, latent * 2
        k_nope, v = kv.split([128, 128], dim=-1)
        return torch.ops.dsv3.mla_prefill_attention(q_nope, q_pe, k_nope, latent[..., 512:], v, pos, 0.07)


@pytest.mark.gpu
def test_prefill_attention_in_a_static_package_gpu(monkeypatch, tmp_path):
    """A short prompt's first-chunk graph has static shapes (`dsv3c compile --short-prefill`): the op inside an
    AOTInductor package exported without dynamic dims builds and gives the eager op's output bit for bit. With the
    keys' TMA descriptors over views of Inductor buffers in such a graph, torch 2.11 wrote C++ into the package's
    Python autotuning block: the 16B short-prefill graph failed to build, and this package, built with them (the
    fix reverted on the H200, 2026-11-25), failed when run (docs/KERNELS.md)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(5)
    rn = lambda *shape: torch.randn(*shape, device=dev, generator=g).bfloat16()  # noqa: E731
    mod = _StaticChunkAttention()
    for s in (16, 32):
        a = (rn(1, s, 16, 128), rn(1, s, 16, 64), rn(1, s, 16, 256), rn(1, s, 576), torch.arange(s, device=dev)[None])
        ep = torch.export.export(mod, a)
        runner = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / f"attn{s}.pt2")))
        monkeypatch.setenv("DSV3_PREFILL_ATTN_TMA", "off")
        want = mod(*a)
        monkeypatch.delenv("DSV3_PREFILL_ATTN_TMA")
        got = runner(*a)
        assert torch.isfinite(got).all() and torch.equal(got, want), s


class _AttentionOProj(torch.nn.Module):
    """The model's first-chunk attention + o_proj on keys computed inside the graph, FP8 o_proj weights."""

    def __init__(self, o_weight, o_scale):
        super().__init__()
        self.register_buffer("o_weight", o_weight)
        self.register_buffer("o_scale", o_scale)

    def forward(self, q_nope, q_pe, kv, latent, pos):
        kv, latent = kv * 2, latent * 2
        k_nope, v = kv.split([128, 128], dim=-1)
        return torch.ops.dsv3.mla_prefill_attention_o_proj(q_nope, q_pe, k_nope, latent[..., 512:], v, pos, 0.07,
                                                           self.o_weight, self.o_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("b,s,prefix", [(1, 4095, False), (2, 301, True), (1, 4096, True)])
def test_attention_o_proj_fused_gpu(b, s, prefix, monkeypatch):
    """dsv3.mla_prefill_attention_o_proj's fused path (o_proj's input quantized by the attention kernel) equals the
    two ops it replaces bit for bit, eagerly and under torch.compile(fullgraph=True) with a dynamic chunk length:
    16 heads, Dv 128 (the 16B's attention, and a 671B-ws8 rank's), o_proj 2048 -> 2048, B * S not a multiple of 4
    (padding rows), with and without a prefix; poisoned allocations."""
    from dsv3.kernels.fp8_blocks import quantize_weight
    from kernel_checks import poison_allocator

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(b + s)
    rn = lambda *shape: torch.randn(*shape, device=dev, generator=g).bfloat16()  # noqa: E731
    h = 16
    q_nope, q_pe, k_nope, k_pe, v = rn(b, s, h, 128), rn(b, s, h, 64), rn(b, s, h, 128), rn(b, s, 64), rn(b, s, h, 128)
    pos = torch.arange(s, device=dev)[None].repeat(b, 1)
    extra = ()
    if prefix:
        pos = pos + 37
        extra = (rn(b, s, h, 128), torch.randn(b, s, h, device=dev, generator=g) * 3)
    w, ws = quantize_weight(torch.randn(2048, h * 128, device=dev, generator=g) * 0.05)
    args = (q_nope, q_pe, k_nope, k_pe, v, pos, 0.07)
    dense = (q_nope, q_pe, k_nope, k_pe, v) + extra[:1]
    assert P.prefill_o_proj_fused(q_nope, v, dense, w)

    def composition(*a):
        o = torch.ops.dsv3.mla_prefill_attention(*a[:7], *a[9:])
        return torch.ops.dsv3.fp8_linear(o.reshape(b, a[0].shape[1], h * 128), a[7], a[8])

    poison_allocator()
    want = composition(*args, w, ws, *extra)
    poison_allocator()
    got = torch.ops.dsv3.mla_prefill_attention_o_proj(*args, w, ws, *extra)
    assert got.shape == (b, s, 2048) and torch.isfinite(got).all() and torch.equal(got, want)
    monkeypatch.setenv("DSV3_PREFILL_O_QUANT", "off")
    assert not P.prefill_o_proj_fused(q_nope, v, dense, w)
    assert torch.equal(torch.ops.dsv3.mla_prefill_attention_o_proj(*args, w, ws, *extra), want)
    monkeypatch.delenv("DSV3_PREFILL_O_QUANT")
    torch._dynamo.reset()
    dyn = [t.clone() for t in (*args[:6], *extra)]
    for t in dyn:
        torch._dynamo.mark_dynamic(t, 1)
    fn = torch.compile(lambda *a: torch.ops.dsv3.mla_prefill_attention_o_proj(*a[:6], 0.07, w, ws, *a[6:]),
                       fullgraph=True)
    assert torch.equal(fn(*dyn), want)


@pytest.mark.gpu
def test_attention_o_proj_in_a_package_gpu(monkeypatch, tmp_path):
    """Inside AOTInductor packages with a dynamic chunk length (v1 `_scaled_mm` there), the fused path and the two
    ops it replaces (DSV3_PREFILL_O_QUANT=off at export) give the same output bit for bit at three lengths, and
    close to the eager op's (cuBLAS's v2 entry point outside packages)."""
    from dsv3.kernels.fp8_blocks import quantize_weight

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(11)
    rn = lambda *shape: torch.randn(*shape, device=dev, generator=g).bfloat16()  # noqa: E731

    def inputs(s):
        return (rn(1, s, 16, 128), rn(1, s, 16, 64), rn(1, s, 16, 256), rn(1, s, 576), torch.arange(s, device=dev)[None])

    mod = _AttentionOProj(*quantize_weight(torch.randn(2048, 2048, device=dev, generator=g) * 0.05))
    a = inputs(700)
    s_dim = torch.export.Dim("s", min=65, max=4096)
    runners = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("DSV3_PREFILL_O_QUANT", mode)
        ep = torch.export.export(mod, a, dynamic_shapes=({1: s_dim}, {1: s_dim}, {1: s_dim}, {1: s_dim}, {1: s_dim}))
        runners[mode] = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / f"attn_o_{mode}.pt2")))
    monkeypatch.delenv("DSV3_PREFILL_O_QUANT")
    for s in (700, 333, 4095):
        b = a if s == 700 else inputs(s)
        got = runners["on"](*b)
        assert torch.isfinite(got).all() and torch.equal(got, runners["off"](*b)), s
        assert rel_err(got, mod(*b)) < 1e-2, s


# ---------------------------------------------------------------------------------------------------------------
# The model's prefill path (CPU, float32: the references)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(random_checkpoint):
    # bf16 weights in float32: the forms must agree to float32 rounding. (With FP8 weights the per-token activation
    # quantization amplifies summation-order differences between any two chunkings, already between chunks of 8 and
    # single tokens in the absorbed form: ~2% with routing flips, not a property of the prefill form.)
    import dsv3

    return dsv3.load(random_checkpoint("tiny", "bf16"), dtype=torch.float32, max_batch_size=2, max_seq_len=64,
                     num_layers=2, progress=False)


def _logits(model, tokens, pos):
    return model(tokens, pos, last_only=False)


def test_model_prefill_form_matches_absorbed_decode(tiny_model):
    """A 40-token prompt: in one prefill chunk (naive form, > 16 tokens), in two chunks of 20 (the second one
    continues through the absorbed prefix), and token by token (the absorbed decode form) give the same logits."""
    model = tiny_model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, model.cfg.vocab_size, (2, 40), generator=g)
    pos = torch.arange(40)[None].expand(2, 40)
    model.reset_caches()
    whole = _logits(model, tokens, pos)
    model.reset_caches()
    halves = torch.cat([_logits(model, tokens[:, :20], pos[:, :20]), _logits(model, tokens[:, 20:], pos[:, 20:])], 1)
    model.reset_caches()
    steps = torch.cat([_logits(model, tokens[:, i:i + 1], pos[:, i:i + 1]) for i in range(40)], 1)
    assert rel_err(whole, steps) < 1e-5
    assert rel_err(halves, steps) < 1e-5


def test_model_first_chunk_form_reads_no_cache(tiny_model):
    """first_chunk=True (the runtime's prefill_first graph): a chunk at position 0 gives the general prefill form's
    logits and writes the same cache rows, and never reads the cache (NaN everywhere before the call changes
    nothing); the absorbed prefix half is not called at all."""
    from unittest import mock

    from dsv3.kernels import mla_prefill as P
    from dsv3.runtime.steps import PrefillStep

    model = tiny_model
    tokens = torch.randint(1, model.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    args = (tokens, torch.arange(20)[None], torch.tensor([1]), torch.tensor([19]))
    model.reset_caches()
    want = PrefillStep(model)(*args)
    want_caches = [c[1, :20].clone() for c in model.latent_caches()]
    for c in model.latent_caches():
        c.fill_(float("nan"))
    with mock.patch.object(P, "mla_prefix_attention_reference", side_effect=AssertionError("prefix half called")):
        got = PrefillStep(model, first_chunk=True)(*args)
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5
    for c, w in zip(model.latent_caches(), want_caches):
        assert rel_err(c[1, :20], w) < 1e-5
    model.reset_caches()


def test_jit_prefill_graph_is_one_graph_for_every_chunk_length(tiny_model):
    """The runtime's prefill step under torch.compile(dynamic=True) takes the prefill form for any chunk length:
    no recompile between a 3-token and a 20-token chunk (a comparison of the symbolic length with the decode
    threshold used to specialize the graph to <= 16 tokens and recompile on the first longer prompt)."""
    import torch._dynamo

    from dsv3.runtime.steps import PrefillStep, prefill_inputs

    torch._dynamo.reset()
    step = torch.compile(PrefillStep(tiny_model), fullgraph=True, dynamic=True)
    tiny_model.reset_caches()
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        step(*prefill_inputs(3, "cpu"))
        tokens = torch.randint(1, tiny_model.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
        args = (tokens, torch.arange(20)[None], torch.zeros(1, dtype=torch.long), torch.tensor([19]))
        got = step(*args)
    tiny_model.reset_caches()
    want = PrefillStep(tiny_model)(*args)
    assert rel_err(got, want) < 1e-5
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("s,start", [(17, 300), (1000, 4096), (4096, 4096), (301, 0)])
def test_cached_prefill_attention_gpu(s, start, monkeypatch):
    """dsv3.mla_cached_prefill_attention at 16B shapes (16 heads, C 512, R 64, Dn = Dv = 128) over an 8192-row
    cache: against the float64 reference; against the absorbed prefix (dsv3.mla_prefix_attention, W_UV, merged by
    dsv3.mla_prefill_attention), the form it replaces, within bf16 rounding; the cache past the decompressed row
    tiles NaN and allocations poisoned (nothing unwritten is read); the o_proj op bitwise the attention op followed
    by dsv3.fp8_linear, fused (o_proj's input quantized by the attention) or not, eagerly and compiled with a
    dynamic chunk length."""
    from dsv3.kernels.fp8_blocks import quantize_weight
    from kernel_checks import poison_allocator

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(s + start)
    b, h, dn, r, dv, c, t = 1, 16, 128, 64, 128, 512, 8192
    rn = lambda *shape: torch.randn(*shape, device=dev, generator=g).bfloat16()  # noqa: E731
    cache = rn(b, t, c + r)
    w = (torch.randn(h * (dn + dv), c, device=dev, generator=g) * c ** -0.5).bfloat16()
    q_nope, q_pe = rn(b, s, h, dn), rn(b, s, h, r)
    pos = (start + torch.arange(s, device=dev))[None]
    clean = cache.clone()
    cache[:, -(-(start + s) // P.KEY_TILE_ROWS) * P.KEY_TILE_ROWS:] = float("nan")
    args = (q_nope, q_pe, cache, pos, w, 0.07, dn, dv)
    poison_allocator()
    out = torch.ops.dsv3.mla_cached_prefill_attention(*args)
    ref = P.mla_cached_prefill_attention_reference(q_nope.double(), q_pe.double(), clean.double(), pos, w.double(),
                                                   0.07, dn, dv)
    assert rel_err(out, ref) < 8e-3
    # the absorbed prefix (the form before): q absorbed by W_UK, the prefix's latent output by W_UV
    w4 = w.view(h, dn + dv, c)
    q_latent = torch.einsum("bshd,hdc->bshc", q_nope.float(), w4[:, :dn].float()).bfloat16()
    o_lat, lse = torch.ops.dsv3.mla_prefix_attention(q_latent, q_pe, clean, pos, 0.07)
    prefix_out = torch.einsum("bshc,hdc->bshd", o_lat.float(), w4[:, dn:].float()).bfloat16()
    kv = torch.nn.functional.linear(clean[:, start:start + s, :c], w).view(b, s, h, dn + dv)
    absorbed = torch.ops.dsv3.mla_prefill_attention(q_nope, q_pe, kv[..., :dn], clean[:, start:start + s, c:],
                                                    kv[..., dn:], pos, 0.07, prefix_out, lse)
    assert rel_err(out, absorbed) < 1e-2
    # the sequence at row 1 of a 3-sequence cache (the others NaN), read in place through cache_rows: the same
    whole = torch.full((3, t, c + r), float("nan"), device=dev, dtype=cache.dtype)
    whole[1] = cache[0]
    rows = torch.tensor([1], device=dev)
    assert torch.equal(torch.ops.dsv3.mla_cached_prefill_attention(*args[:2], whole, *args[3:], rows), out)
    o_w, o_s = quantize_weight(torch.randn(2048, h * dv, device=dev, generator=g) * 0.05)
    want = torch.ops.dsv3.fp8_linear(out.reshape(b, s, h * dv), o_w, o_s)
    for fused in ("on", "off"):
        monkeypatch.setenv("DSV3_PREFILL_O_QUANT", fused)
        poison_allocator()
        got = torch.ops.dsv3.mla_cached_prefill_attention_o_proj(*args, o_w, o_s)
        assert got.shape == (b, s, 2048) and torch.equal(got, want), fused
        got = torch.ops.dsv3.mla_cached_prefill_attention_o_proj(*args[:2], whole, *args[3:], o_w, o_s, rows)
        assert torch.equal(got, want), fused
    monkeypatch.delenv("DSV3_PREFILL_O_QUANT")
    torch._dynamo.reset()
    dyn = [q_nope.clone(), q_pe.clone(), pos.clone()]
    for x in dyn:
        torch._dynamo.mark_dynamic(x, 1)
    fn = torch.compile(lambda qn, qp, p: torch.ops.dsv3.mla_cached_prefill_attention_o_proj(
        qn, qp, cache, p, w, 0.07, dn, dv, o_w, o_s), fullgraph=True)
    # (a dynamic chunk length takes cuBLAS for o_proj; an eager 17-row call another FP8 GEMM: rounding apart)
    got = fn(*dyn)
    assert torch.equal(got, want) if s >= 300 else rel_err(got, want) < 1e-2


class _CachedChunkAttention(torch.nn.Module):
    """A later chunk's attention + o_proj as the model calls it: cache and weights as buffers, the sequence's cache
    row an input."""

    def __init__(self, cache, w, o_weight, o_scale):
        super().__init__()
        for name, t in (("cache", cache), ("w", w), ("o_weight", o_weight), ("o_scale", o_scale)):
            self.register_buffer(name, t)

    def forward(self, q_nope, q_pe, pos, rows):
        return torch.ops.dsv3.mla_cached_prefill_attention_o_proj(q_nope, q_pe, self.cache, pos, self.w, 0.07, 128,
                                                                  128, self.o_weight, self.o_scale, rows)


@pytest.mark.gpu
def test_cached_prefill_attention_in_a_package_gpu(tmp_path):
    """dsv3.mla_cached_prefill_attention_o_proj inside an AOTInductor package with a dynamic chunk length (the
    runtime's later-chunk prefill graph) builds and gives the eager op's output bit for bit at two lengths. Its keys
    are views of a buffer of static shape: with TMA descriptors over them the 16B prefill package failed to build
    ("invalid decimal literal" in its autotuning block, 2026-11-26), so compiled graphs take pointer tiles."""
    from dsv3.kernels.fp8_blocks import quantize_weight

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(9)
    rn = lambda *shape: torch.randn(*shape, device=dev, generator=g).bfloat16()  # noqa: E731
    o_w, o_s = quantize_weight(torch.randn(2048, 16 * 128, device=dev, generator=g) * 0.05)
    mod = _CachedChunkAttention(rn(2, 4096, 576), (rn(16 * 256, 512) * 512 ** -0.5).bfloat16(), o_w, o_s)

    def inputs(s, start, row):
        return (rn(1, s, 16, 128), rn(1, s, 16, 64), (start + torch.arange(s, device=dev))[None],
                torch.tensor([row], device=dev))

    seq = torch.export.Dim("seq", min=2, max=2048)
    ep = torch.export.export(mod, inputs(64, 100, 1), dynamic_shapes=({1: seq}, {1: seq}, {1: seq}, None))
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "cached.pt2")))
    for s, start, row in ((300, 1000, 1), (2048, 2048, 0)):
        a = inputs(s, start, row)
        got, want = runner(*a), mod(*a)
        assert torch.isfinite(got).all() and torch.equal(got, want), (s, start)
