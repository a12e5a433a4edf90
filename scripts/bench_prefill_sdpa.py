"""First-chunk prefill attention (no prefix, positions 0..S-1, causal, bf16): PyTorch's fused SDPA backends
(cuDNN, flash, mem-efficient) against `torch.ops.dsv3.mla_prefill_attention`: speed, numerics, and use inside an
AOTInductor package with a dynamic sequence length.

    python3 scripts/bench_prefill_sdpa.py [--json out.json] [--cases 16:1024,16:2048,16:4096,128:4096] [--no-aoti]
    python3 scripts/bench_prefill_sdpa.py --self-check      # CPU: layouts and references only

Inputs as dsv3.model.MLA makes them: q_nope a view of q [B,S,H,192], q_pe [B,S,H,64] (the roped copy), k_nope / v
views of kv_b_proj's output [B,S,H,256], k_pe a view of the latent [B,S,576] (shared by the heads); the 16B config's
softmax_scale. SDPA gets q = cat(q_nope, q_pe), k = cat(k_nope, k_pe expanded over the heads), v as [B,H,S,D]:
"view" = transposed views of BSHD tensors, "contig" = contiguous BHSD copies; flash gets v zero-padded to 192 (equal
head dims) and its output sliced back. "full" = cats / copies / pad + attention + output to contiguous [B,S,H,128]
(what the model would run); "alone" = the attention call on prebuilt inputs. Time: median over --rounds interleaved
rounds of (N calls captured back to back in one CUDA graph, replay / N; triton.testing.do_bench where capture fails,
as printed). TFLOP/s: causal 2 * B * H * S(S+1)/2 * (192 + 128). Errors: relative Frobenius norm against ours and
against float64 (S <= --ref-max-s); the direct `_scaled_dot_product_{cudnn,flash}_attention` ops also have their
log-sum-exp checked (continued chunks would need it). Kernels: the top GPU kernels of one call (profiler).
AOTI (--aoti, default on): modules taking (q_nope, q_pe, k_nope, k_pe, v) with S dynamic (17..8192) exported and
packaged (ours; cuDNN through sdpa_kernel in forward, also around export + compilation, and through the aten op), run
at S=1000 / 3000 against eager, timed at S=4096 against eager with do_bench (the package's runner does not capture
into a CUDA graph), plus the GPU time of each one's kernels (profiler).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

# AOTInductor needs the system g++ on the device image (its default wrapper builds .so files that crash at load,
# tests/conftest.py): set before Inductor is imported.
if shutil.which("nvidia-smi") and os.path.exists("/usr/bin/g++") and os.environ.get("CXX", "/opt/gcc/").startswith(
        "/opt/gcc/"):
    os.environ["CXX"] = "/usr/bin/g++"

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DN, R, DV, LAT = 128, 64, 128, 512
NAMES = ("q_nope", "q_pe", "k_nope", "k_pe", "v")
CUDNN, FLASH, EFFICIENT = SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION


def log(msg: str) -> None:
    print(msg, flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_inputs(b, s, h, device, dtype, seed) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype) * 0.5

    q, kv, latent = rnd(b, s, h, DN + R), rnd(b, s, h, DN + DV), rnd(b, s, LAT + R)
    return dict(q_nope=q[..., :DN], q_pe=rnd(b, s, h, R), k_nope=kv[..., :DN], k_pe=latent[..., LAT:],
                v=kv[..., DN:], input_pos=positions(q))


def positions(t: torch.Tensor) -> torch.Tensor:
    """input_pos of a first chunk: 0..S-1 on every row, [B, S] int64."""
    return torch.arange(t.shape[1], device=t.device).unsqueeze(0).expand(t.shape[0], t.shape[1])


def qkv_bhsd(q_nope, q_pe, k_nope, k_pe, v, mode="view", pad_v=False):
    """q, k, v as [B, H, S, D] for SDPA: transposed views of BSHD tensors ("view") or contiguous copies ("contig")."""
    q = torch.cat([q_nope, q_pe], dim=-1)
    k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, q_nope.shape[2], -1)], dim=-1)
    if pad_v:
        v = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return (q, k, v) if mode == "view" else tuple(t.contiguous() for t in (q, k, v))


def to_bshd(o: torch.Tensor) -> torch.Tensor:
    """[B, H, S, >=DV] -> contiguous [B, S, H, DV] (no copy where the backend already wrote BSHD memory)."""
    return o[..., :DV].transpose(1, 2).contiguous()


def reference64(x: dict, scale: float):
    """float64 causal attention: (out [B, S, H, DV], natural-log lse [B, H, S])."""
    qn, qp, kn, kp, v = (x[n].double() for n in NAMES)
    sc = (torch.einsum("bshd,bthd->bhst", qn, kn) + torch.einsum("bshr,btr->bhst", qp, kp)) * scale
    s = sc.shape[-1]
    sc = sc.masked_fill(torch.ones(s, s, dtype=torch.bool, device=sc.device).triu(1), float("-inf"))
    lse = torch.logsumexp(sc, dim=-1)
    return torch.einsum("bhst,bthd->bshd", torch.exp(sc - lse[..., None]), v), lse


def candidates(scale: float) -> dict:
    """name -> (prep(x) -> args, attn(*args) -> raw out (a tuple for the direct ops), post(raw) -> [B, S, H, DV])."""
    def sdpa(backend):
        def attn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return attn

    def cudnn_op(q, k, v):  # args: attn_bias None, compute_log_sumexp, dropout_p, is_causal, return_debug_mask
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)

    def flash_op(q, k, v):  # args: dropout_p, is_causal, return_debug_mask
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)

    def prep(mode="view", pad_v=False):
        return lambda x: qkv_bhsd(*(x[n] for n in NAMES), mode=mode, pad_v=pad_v)

    def ours(*a):  # the model has input_pos already: built once, with the inputs
        return torch.ops.dsv3.mla_prefill_attention(*a, scale)

    return {"ours": (lambda x: tuple(x[n] for n in NAMES + ("input_pos",)), ours, lambda o: o),
            "cudnn-view": (prep(), sdpa(CUDNN), to_bshd),
            "cudnn-contig": (prep("contig"), sdpa(CUDNN), to_bshd),
            "cudnn-op+lse": (prep(), cudnn_op, lambda o: to_bshd(o[0])),
            "flash-view-padv": (prep(pad_v=True), sdpa(FLASH), to_bshd),
            "flash-op+lse-padv": (prep(pad_v=True), flash_op, lambda o: to_bshd(o[0])),
            "efficient-view": (prep(), sdpa(EFFICIENT), to_bshd),
            "efficient-contig": (prep("contig"), sdpa(EFFICIENT), to_bshd)}


def interleaved(fns: dict, n: int, rounds: int, graphs: bool = True) -> dict:
    """name -> (median us per call, method): per round each fn once, timed as N calls in one CUDA graph
    (dsv3.kernels.bench.graph_us); a fn whose capture fails goes to triton.testing.do_bench from then on, and all do
    with graphs=False."""
    import triton.testing
    from dsv3.kernels.bench import graph_us

    method = {k: f"cuda-graph x{n}" if graphs else "do_bench" for k in fns}
    samples: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if method[k].startswith("cuda-graph"):
                try:
                    samples[k].append(graph_us([fn] * n))
                    continue
                except Exception as exc:
                    method[k] = f"do_bench (graph capture failed: {first_line(exc)})"
                    torch.cuda.synchronize()
            samples[k].append(triton.testing.do_bench(fn, return_mode="median") * 1e3)
    return {k: (statistics.median(v), method[k]) for k, v in samples.items()}


def kernels(fn, top: int = 3) -> tuple:
    """(the top GPU kernels of one call of fn, with their us; the GPU time of all its kernels in us), profiler."""
    from torch.profiler import ProfilerActivity, profile
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except Exception as exc:
        return [f"profiler failed: {first_line(exc)}"], None
    ev = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    return [f"{e.key[:90]} ({e.device_time_total:.0f} us)" for e in ev[:top]], round(
        sum(e.device_time_total for e in ev), 1)


def check_lse(lse: torch.Tensor, ref_lse) -> dict:
    """A direct op's log-sum-exp (expected [B, H, S] or [B, H, S, 1] fp32) against float64, natural log or log2."""
    out = dict(shape=list(lse.shape), dtype=str(lse.dtype), stride=list(lse.stride()))
    if ref_lse is not None and lse.numel() == ref_lse.numel():
        got = lse.double().reshape(ref_lse.shape)
        out.update(max_abs_err_ln=(got - ref_lse).abs().max().item(),
                   max_abs_err_log2=(got - ref_lse / 0.6931471805599453).abs().max().item())
    return out


def bench_case(b, s, h, scale, opts, rows) -> None:
    x = make_inputs(b, s, h, "cuda", torch.bfloat16, seed=s + h)
    flops = 2 * b * h * (s * (s + 1) // 2) * (DN + R + DV)
    ref, ref_lse = reference64(x, scale) if s <= opts.ref_max_s else (None, None)
    log(f"--- B={b} H={h} S={s}: {flops / 1e9:.1f} GFLOP causal{'' if ref is not None else ', no float64 ref'}")
    outs, fns, case_rows = {}, {}, {}
    for name, (prep, attn, post) in candidates(scale).items():
        row = case_rows[name] = dict(kind="time", b=b, h=h, s=s, candidate=name)
        rows.append(row)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pre = prep(x)
                raw = attn(*pre)
                outs[name] = post(raw)
                torch.cuda.synchronize()
        except Exception as exc:  # SDPA's reasons for refusing a backend come as warnings
            why = [str(w.message).strip().splitlines()[0] for w in caught][:3]
            row["unsupported"] = first_line(exc) + "".join(f" | {w}" for w in why)
            log(f"  {name:18s} unsupported: {row['unsupported']}")
            continue
        row["raw_out_stride"] = list((raw[0] if isinstance(raw, tuple) else raw).stride())
        if isinstance(raw, tuple):
            row["lse"] = check_lse(raw[1], ref_lse)
        fns[name + ":full"] = lambda prep=prep, attn=attn, post=post: post(attn(*prep(x)))
        if name != "ours":
            fns[name + ":alone"] = lambda attn=attn, pre=pre: attn(*pre)
        row["kernels"], row["kernel_us"] = kernels(lambda attn=attn, pre=pre: attn(*pre))
    timed = interleaved(fns, opts.n, opts.rounds)
    for name, out in outs.items():
        row = case_rows[name]
        if "ours" in outs:
            row["rel_vs_ours"] = rel(out, outs["ours"])
        if ref is not None:
            row["rel_vs_f64"] = rel(out, ref)
        line = f"  {name:18s}"
        for part in ("full", "alone"):
            if f"{name}:{part}" in timed:
                us, row[f"{part}_timing"] = timed[f"{name}:{part}"]
                row[f"{part}_us"], row[f"{part}_tflops"] = round(us, 1), round(flops / us / 1e6, 1)
                line += f" {part} {us:8.1f} us {flops / us / 1e6:5.0f} TFLOP/s"
        line += "".join(f" {k} {row[k]:.1e}" for k in ("rel_vs_ours", "rel_vs_f64") if k in row)
        line += f" [{row['full_timing']}] top kernel: {row['kernels'][0][:60] if row['kernels'] else '-'}"
        if "lse" in row:
            line += "\n      lse " + json.dumps(row["lse"])
        log(line)


class Prefill(torch.nn.Module):
    """(q_nope, q_pe, k_nope, k_pe, v) -> [B, S, H, DV]. form "ours": torch.ops.dsv3.mla_prefill_attention; "sdpa":
    F.scaled_dot_product_attention under sdpa_kernel(backend); "cudnn_op": aten._scaled_dot_product_cudnn_attention."""

    def __init__(self, scale: float, form: str, backend=CUDNN):
        super().__init__()
        self.scale, self.form, self.backend = scale, form, backend

    def forward(self, q_nope, q_pe, k_nope, k_pe, v):
        if self.form == "ours":
            return torch.ops.dsv3.mla_prefill_attention(q_nope, q_pe, k_nope, k_pe, v, positions(q_nope), self.scale)
        q, k, v = qkv_bhsd(q_nope, q_pe, k_nope, k_pe, v)
        if self.form == "cudnn_op":
            o = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True, False,
                                                                   scale=self.scale)[0]
        else:
            with sdpa_kernel(self.backend):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return o.transpose(1, 2)


def export_dynamic(mod, args):
    """torch.export with S (dim 1 of all five inputs) dynamic; (program, its attention / dsv3 ops)."""
    s = torch.export.Dim("s", min=17, max=8192)
    ep = torch.export.export(mod, args, dynamic_shapes=tuple({1: s} for _ in NAMES))
    return ep, sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"
                       and ("attention" in str(n.target) or "dsv3" in str(n.target))})


def aoti_check(b, h, scale, opts, rows) -> None:
    import torch._inductor

    def args_at(s):
        x = make_inputs(b, s, h, "cuda", torch.bfloat16, seed=s)
        return tuple(x[n].contiguous() for n in NAMES)

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.11's pytree LeafSpec notice, per package
    ours = Prefill(scale, "ours")
    sdpa = Prefill(scale, "sdpa")
    # (name, module, context around export and compilation)
    forms = [("ours", ours, None), ("cudnn:sdpa_kernel-in-forward", sdpa, None),
             ("cudnn:sdpa_kernel-in-forward+around-compile", sdpa, CUDNN),
             ("cudnn:aten-op", Prefill(scale, "cudnn_op"), None)]
    for name, mod, outer in forms:
        row = dict(kind="aoti", b=b, h=h, form=name)
        rows.append(row)
        t0 = time.time()
        try:
            with tempfile.TemporaryDirectory() as d, (sdpa_kernel(outer) if outer else contextlib.nullcontext()):
                ep, row["graph_ops"] = export_dynamic(mod, args_at(1024))
                path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{d}/pkg.pt2")
                runner = torch._inductor.aoti_load_package(path)
                row["compile_s"] = round(time.time() - t0, 1)
                for s in (1000, 3000):
                    a = args_at(s)
                    got = runner(*a)
                    assert tuple(got.shape) == (b, s, h, DV), f"package output shape {tuple(got.shape)}"
                    row[f"rel_vs_eager_s{s}"], row[f"rel_vs_ours_s{s}"] = rel(got, mod(*a)), rel(got, ours(*a))
                # the package's runner does not capture into a CUDA graph (torch 2.11: "operation not permitted
                # when stream is capturing"): both timed with do_bench, and their kernels' GPU time profiled
                a = args_at(4096)
                calls = {"package": lambda: runner(*a), "eager": lambda: mod(*a)}
                for k, (us, how) in interleaved(calls, opts.n, opts.rounds, graphs=False).items():
                    row[f"{k}_us_s4096"], row["timing"] = round(us, 1), how
                    row[f"{k}_kernels"], row[f"{k}_kernel_us_s4096"] = kernels(calls[k])
        except Exception as exc:
            row["error"] = first_line(exc)
        log(f"  AOTI {name}: " + json.dumps({k: v for k, v in row.items() if k not in ("kind", "form")}))
        torch.cuda.empty_cache()


def self_check() -> None:
    """CPU, fp32: the layouts (view / contig / padded v) through the math SDPA backend, the float64 reference, and the
    exported modules (dynamic S) against mla_prefill_attention_reference."""
    importlib.import_module("dsv3.kernels")  # registers torch.ops.dsv3
    from dsv3.kernels.mla_prefill import mla_prefill_attention_reference

    scale, (b, s, h) = scale_16b(), (1, 33, 2)
    x = make_inputs(b, s, h, "cpu", torch.float32, seed=0)
    ref = mla_prefill_attention_reference(*(x[n] for n in NAMES), x["input_pos"], scale)
    for mode in ("view", "contig"):
        for pad_v in (False, True):
            q, k, v = qkv_bhsd(*(x[n] for n in NAMES), mode=mode, pad_v=pad_v)
            assert q.shape == k.shape == (b, h, s, DN + R) and v.shape == (b, h, s, DN + R if pad_v else DV)
            assert (q.stride(1) == DN + R) == (mode == "view"), f"{mode}: q strides {q.stride()}"
            with sdpa_kernel(SDPBackend.MATH):
                err = rel(to_bshd(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)), ref)
            log(f"self-check: math SDPA, {mode}, pad_v={pad_v}: rel err {err:.2e} against the reference")
            assert err < 1e-5
    out64, lse64 = reference64(x, scale)
    err = rel(out64, mla_prefill_attention_reference(*(x[n].double() for n in NAMES), x["input_pos"], scale))
    log(f"self-check: float64 reference: rel err {err:.1e} against mla_prefill_attention_reference (float64)")
    assert lse64.shape == (b, h, s) and err < 1e-12
    lse_row = check_lse(lse64.float().unsqueeze(-1), lse64)  # as a [B, H, S, 1] fp32 op output would come
    assert lse_row["max_abs_err_ln"] < 1e-5 < lse_row["max_abs_err_log2"], lse_row
    prep, attn, post = candidates(scale)["ours"]  # CPU: the op runs its reference
    assert rel(post(attn(*prep(x))), ref) < 1e-6
    y = make_inputs(b, 40, h, "cpu", torch.float32, seed=1)
    ref_y = mla_prefill_attention_reference(*(y[n] for n in NAMES), y["input_pos"], scale)
    for mod in (Prefill(scale, "sdpa", SDPBackend.MATH), Prefill(scale, "ours")):
        ep, ops = export_dynamic(mod, tuple(x[n].contiguous() for n in NAMES))
        err = rel(ep.module()(*(y[n].contiguous() for n in NAMES)), ref_y)
        log(f"self-check: Prefill({mod.form!r}) exported at S=33 (dynamic S; {ops}), run at S=40: rel err {err:.2e}")
        assert err < 1e-5
    log("self-check: OK")


def scale_16b() -> float:
    from dsv3.config import resolve_config
    from dsv3.rope import softmax_scale
    return softmax_scale(resolve_config("16B"))


def first_calls(b, h, scale, rows, lengths=(1000, 1001, 1537, 2222, 3333, 4000, 4095)) -> None:
    """The cost of a sequence length seen for the first time: cuDNN builds an execution plan per shape (a serving
    system meets new prompt lengths all the time), our kernel compiles once for every length. Host-timed with a sync,
    first and second call at each new length, ours and the cuDNN op (layouts prepared outside the timing)."""
    cands = candidates(scale)
    for s in lengths:
        x = make_inputs(b, s, h, "cuda", torch.bfloat16, seed=s)
        row = dict(kind="first_call", b=b, h=h, s=s)
        for name in ("ours", "cudnn-op+lse"):
            prep, attn, _ = cands[name]
            args = prep(x)
            torch.cuda.synchronize()
            for which in ("first_ms", "second_ms"):
                t0 = time.perf_counter()
                attn(*args)
                torch.cuda.synchronize()
                row[f"{name}_{which}"] = round(1000 * (time.perf_counter() - t0), 3)
        rows.append(row)
        log(f"first call at S={s}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k.endswith("_ms")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="16:1024,16:2048,16:4096,128:4096", help="comma-separated HEADS:S")
    ap.add_argument("--b", type=int, default=1, help="batch (sequences)")
    ap.add_argument("--n", type=int, default=20, help="calls per CUDA graph")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    ap.add_argument("--ref-max-s", type=int, default=2048, help="float64 reference up to this S")
    ap.add_argument("--aoti", action=argparse.BooleanOptionalAction, default=True,
                    help="AOTInductor packages with a dynamic S, at the first case's H")
    ap.add_argument("--self-check", action="store_true", help="CPU check of the layouts and references, then exit")
    ap.add_argument("--first-call", action="store_true",
                    help="only the first- and second-call times at new sequence lengths (cuDNN plan builds)")
    ap.add_argument("--json", default=None, help="write all results here")
    opts = ap.parse_args()
    if opts.self_check:
        self_check()
        return 0
    if not torch.cuda.is_available():
        print("bench_prefill_sdpa: no CUDA device; this benchmark needs an NVIDIA GPU "
              "(on CPU, --self-check checks the layouts and references)", file=sys.stderr)
        return 2
    import triton

    importlib.import_module("dsv3.kernels")  # registers torch.ops.dsv3
    scale = scale_16b()
    meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), triton=triton.__version__, softmax_scale=scale,
                started=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:])
    log(json.dumps(meta))
    rows: list = []

    def dump():
        if opts.json:
            from dsv3.kernels.bench import save_json
            save_json(opts.json, dict(meta, rows=rows))

    cases = [tuple(int(v) for v in c.split(":")) for c in opts.cases.split(",")]
    if opts.first_call:
        with torch.no_grad():
            first_calls(opts.b, cases[0][0], scale, rows)
        dump()
        return 0
    with torch.no_grad():
        for h, s in cases:
            try:
                bench_case(opts.b, s, h, scale, opts, rows)
            except Exception as exc:  # keep what was measured (e.g. out of memory at 128 heads)
                rows.append(dict(kind="time", b=opts.b, h=h, s=s, error=first_line(exc)))
                log(f"--- H={h} S={s}: {rows[-1]['error']}")
            torch.cuda.empty_cache()
            dump()
        if opts.aoti:
            log(f"--- AOTInductor, S dynamic (17..8192), B={opts.b} H={cases[0][0]}")
            aoti_check(opts.b, cases[0][0], scale, opts, rows)
            dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
