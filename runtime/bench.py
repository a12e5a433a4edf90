"""`dsv3c bench`: decode latency and prefill speed next to the bandwidth roofline, measured in one run.

For each batch size and context length: fill the cache up to the context (prefill of a random prompt), time
`--steps` greedy decode steps (host-timed with a device sync per step, the method of the peers' numbers in
shared/reference/baselines.md) and, separately, `generate()` over as many steps (the loop `dsv3c run` uses: the
host reads each token while the device runs the next step, so launch and sync latency overlap the step), and report
ms/token, tokens/s,
the bytes one step must read (from the loaded tensors, see `step_bytes`) and the fraction of the device's copy
bandwidth that this implies; the copy bandwidth is measured in the same run. Prefill: time to first token, tokens/s,
and the model FLOPs utilisation against an FP8 GEMM measured in the same run (`prefill_flops`, `fp8_gemm_peak`), and
against the rate that GEMM holds back to back (`fp8_gemm_sustained`: below the burst on a power-capped GPU).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence
from xml.sax.saxutils import escape

import torch

from dsv3.generate import SamplingParams, Stepper, decode_loop, generate
from dsv3.kernels.mla_prefill import cached_prefill_choice
from dsv3.model import Transformer


GREEDY = SamplingParams()
WARMUP_STEPS = 4


@dataclass
class DecodeResult:
    batch: int
    context: int
    ms_per_token: float
    tokens_per_s: float
    step_bytes: int
    roofline_ms: float
    fraction_of_roofline: float
    generate_ms_per_token: float  # generate()'s decode time per step at this batch and context (no sync per step)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Device-to-device copy, bytes read + written per second (the ceiling a decode step streams against)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)  # well past the L2 / a CPU smoke test
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * n * 4 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def expected_unique_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts a step reads when `tokens` tokens each pick top_k of n_experts uniformly at random."""
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


def step_bytes(model: Transformer, batch: int, context: int) -> int:
    """Bytes one decode step must read on this rank: every non-expert weight (not the embedding table: one row per
    token), the routed experts the batch selects (random routing), and each row's latent cache up to `context`."""
    cfg = model.cfg
    total = 0
    expert_bytes_per_layer = 0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        if name.startswith("embed_tokens."):
            total += batch * t.shape[-1] * t.element_size()
        elif ".mlp.experts." in name:
            expert_bytes_per_layer += nbytes  # summed over the moe layers; divided below
        else:
            total += nbytes
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if moe_layers:
        moe = model.layers[cfg.first_k_dense_replace].mlp
        slots = moe.experts.gate_proj.shape[0]
        shared_slots = moe.n_shared_slots  # shared experts kept as extra slots: read every step
        local_routed = slots - shared_slots
        per_expert = expert_bytes_per_layer / moe_layers / slots
        # this rank's share of the globally selected experts
        selected = expected_unique_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, batch)
        total += int(per_expert * (selected * local_routed / cfg.n_routed_experts + shared_slots) * moe_layers)
    cache = model.layers[0].self_attn.latent_cache
    total += batch * context * cache.shape[-1] * cache.element_size() * cfg.num_hidden_layers
    return total


def bench_decode(stepper: Stepper, model: Transformer, batch_sizes: Sequence[int], contexts: Sequence[int],
                 steps: int, bandwidth: float, echo: Callable[[str], None] = print) -> list[DecodeResult]:
    device = stepper.device
    out = []
    g = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        for ctx in contexts:
            if b > stepper.max_batch_size:
                echo(f"skip batch {b} context {ctx}: the model's max batch size is {stepper.max_batch_size}; "
                     "compile with a larger --max-batch-size")
                continue
            if ctx + max(steps, WARMUP_STEPS) + 1 > stepper.max_seq_len:
                echo(f"skip batch {b} context {ctx}: context + {steps} timed steps + 1 must fit the cache "
                     f"({stepper.max_batch_size} x {stepper.max_seq_len}); compile with a larger --max-seq-len")
                continue
            prompts = [torch.randint(0, model.cfg.vocab_size, (ctx,), generator=g).tolist() for _ in range(b)]
            tokens = stepper.prefill(prompts).argmax(-1)
            pos = torch.full((b,), ctx, dtype=torch.long, device=device)
            loop = decode_loop(stepper, tokens, pos, GREEDY)
            for _ in range(WARMUP_STEPS):  # untimed (clocks, first replays), then the loop again from the context
                loop.step()
            loop = decode_loop(stepper, tokens, pos, GREEDY)
            times = []
            for _ in range(steps):
                _sync(device)
                t0 = time.perf_counter()
                loop.step()
                _sync(device)
                times.append(time.perf_counter() - t0)
            ms = 1000 * statistics.median(times[1:] if len(times) > 2 else times)
            # the same prompts through generate(): its prefill rewrites the rows, then `steps` pipelined steps
            _, gen = generate(stepper, prompts, max_new_tokens=steps + 1)
            nbytes = step_bytes(model, b, ctx)
            roof = 1000 * nbytes / bandwidth
            r = DecodeResult(b, ctx, round(ms, 4), round(1000 * b / ms, 1), nbytes, round(roof, 4),
                             round(roof / ms, 4), round(gen.ms_per_token, 4))
            echo(f"decode batch {b:>3} context {ctx:>6}: {ms:8.3f} ms/token {r.tokens_per_s:9.1f} tok/s | "
                 f"reads {nbytes / 1e9:.3f} GB/step, roofline {roof:.3f} ms -> {100 * r.fraction_of_roofline:.1f}% | "
                 f"generate() {gen.ms_per_token:.3f} ms/token")
            out.append(r)
    return out


def _fp8_gemm(device: torch.device, n: int):
    """One n^3 FP8 x FP8 -> bf16 `torch._scaled_mm` with per-tensor scales (a zero-argument callable), or None where
    FP8 GEMMs do not run (CPU, GPUs before sm_89)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
    one = torch.ones((), device=device)
    return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def fp8_gemm_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float | None:
    """FP8 GEMM throughput (FLOP/s) of `reps` n^3 GEMMs (`_fp8_gemm`) in one burst (~15 ms on an H200), the ceiling
    prefill MFU is quoted against; None where FP8 GEMMs do not run."""
    gemm = _fp8_gemm(device, n)
    if gemm is None:
        return None
    gemm()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        gemm()
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def back_to_back(fn: Callable[[], object], seconds: float, ahead: int = 4) -> list[tuple[float, float]]:
    """Runs `fn` (GPU work, enqueued asynchronously) again and again for `seconds`, each run between two CUDA events
    and the host at most `ahead` runs ahead, so the GPU never idles: [(ms of each run, host time.time() when it was
    enqueued)]. For rates under sustained load: a power-capped GPU slows down after a burst."""
    runs = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        runs.append((start, end, time.time()))
        if len(runs) >= ahead:
            runs[-ahead][1].synchronize()
    torch.cuda.synchronize()
    return [(start.elapsed_time(end), t) for start, end, t in runs]


def fp8_gemm_sustained(device: torch.device, n: int = 8192, seconds: float = 2.0, window: int = 20) -> float | None:
    """The same GEMM back to back for `seconds` (`back_to_back`, windows of `window` calls): FLOP/s over the second
    half. A GPU at its power cap holds less than the burst: the H200 (700 W) settles at ~1220 TFLOP/s after ~50 ms
    at 1440 (SM clock 1980 -> ~1350 MHz; scripts/bench_gemm_power.py, 2026-11-26), so a long prefill's MFU is shown
    against both. None where FP8 GEMMs do not run."""
    gemm = _fp8_gemm(device, n)
    if gemm is None:
        return None
    def gemm_window():  # (a loop, not a list: the window's outputs are freed as they go)
        for _ in range(window):
            gemm()

    runs = back_to_back(gemm_window, seconds)
    ms = statistics.median(ms for ms, _ in runs[len(runs) // 2:])
    return 2 * n ** 3 * window / (ms / 1e3)


def prefill_flops(model: Transformer, prompt_len: int, chunk: int | None = None) -> float:
    """Matmul FLOPs one prefill of `prompt_len` tokens needs on this rank, in chunks of `chunk` tokens (default: one
    chunk), as the model computes it: 2 x the weights each token multiplies (every projection, its top-k routed
    experts, the shared ones; the LM head for the last token only), the chunk's keys and values decompressed by
    kv_b_proj, naive causal attention within the chunk (per head and query: scores over qk_nope + rope dims, values
    over v_head_dim, for the (S + 1) / 2 chunk keys it sees on average), and for a chunk that continues the prompt
    the P rows before it: by default (`cached_prefill_choice`) decompressed by kv_b_proj again and attended in the
    same naive form; otherwise in absorbed form (W_UK / W_UV absorption, scores over kv_lora_rank + rope, values
    over kv_lora_rank). Elementwise work (norms, rope, softmax) is not counted."""
    cfg = model.cfg
    per_token = 0.0
    for name, t in model.state_dict().items():
        if t.dim() < 2 or name.startswith("embed_tokens.") or name.endswith("_scale_inv") or ".kv_b_proj." in name:
            continue  # kv_b_proj is counted with attention below; embeddings are lookups
        if name.startswith("lm_head."):
            per_token += 2 * t.numel() / prompt_len
        elif ".mlp.experts." in name:
            moe = model.get_submodule(name.rsplit(".mlp.experts.", 1)[0] + ".mlp")
            slots = t.shape[0]
            used = cfg.num_experts_per_tok * (slots - moe.n_shared_slots) / cfg.n_routed_experts + moe.n_shared_slots
            per_token += 2 * t[0].numel() * used
        else:
            per_token += 2 * t.numel()
    heads = model.layers[0].self_attn.num_heads
    lat, rope, dn, dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    decompress = 2 * heads * lat * (dn + dv)
    absorb = 2 * heads * lat * (dn + dv)
    attn = model.layers[0].self_attn
    prefix_decompressed = cached_prefill_choice(attn.latent_cache, 1, heads, dn, dv)
    total = per_token * prompt_len
    chunk = chunk or prompt_len
    for p in range(0, prompt_len, chunk):
        s = min(chunk, prompt_len - p)
        attention = s * (decompress + 2 * heads * (dn + rope + dv) * (s + 1) / 2)
        if p and prefix_decompressed:
            attention += p * decompress + s * 2 * heads * (dn + rope + dv) * p
        elif p:
            attention += s * (absorb + 2 * heads * (lat + rope + lat) * p)
        total += cfg.num_hidden_layers * attention
    return total


def bench_prefill(stepper: Stepper, model: Transformer, prompt_len: int, echo: Callable[[str], None] = print,
                  fp8_peak: float | None = None, repeats: int = 3) -> dict:
    """One prompt of `prompt_len` tokens prefilled (a warm-up call, then the median of `repeats` timed calls, each
    synced): its time to first token, tokens/s, and TFLOP/s against the FP8 GEMM peak."""
    device = stepper.device
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1))
    stepper.prefill([prompt.tolist()])  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stepper.prefill([prompt.tolist()])
        _sync(device)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    flops = prefill_flops(model, prompt_len, getattr(stepper, "prefill_chunk", None))
    out = {"prompt_len": prompt_len, "ttft_ms": round(1000 * dt, 3), "tokens_per_s": round(prompt_len / dt, 1),
           "flops": flops, "tflops_per_s": round(flops / dt / 1e12, 2), "repeats": repeats}
    mfu = ""
    if fp8_peak:
        out["fp8_peak_tflops_per_s"] = round(fp8_peak / 1e12, 1)
        out["mfu"] = round(flops / dt / fp8_peak, 4)
        mfu = f", MFU {100 * out['mfu']:.1f}% of the measured FP8 GEMM peak {fp8_peak / 1e12:.0f} TFLOP/s"
    echo(f"prefill {prompt_len} tokens: {1000 * dt:.1f} ms ({prompt_len / dt:.0f} tokens/s) | "
         f"{flops / 1e12:.2f} TFLOP, {flops / dt / 1e12:.1f} TFLOP/s{mfu}")
    return out


def add_sustained_mfu(prefill: list[dict], fp8_sustained: float, echo: Callable[[str], None] = print) -> None:
    """Each prefill row's TFLOP/s against the rate the peak's GEMM sustains (`fp8_gemm_sustained`, measured after
    the prefills so they start from a rested GPU): fields fp8_sustained_tflops_per_s and mfu_sustained."""
    parts = []
    for row in prefill:
        row["fp8_sustained_tflops_per_s"] = round(fp8_sustained / 1e12, 1)
        row["mfu_sustained"] = round(row["flops"] / (row["ttft_ms"] / 1e3) / fp8_sustained, 4)
        parts.append(f"{row['prompt_len']} tokens {100 * row['mfu_sustained']:.1f}%")
    echo(f"FP8 GEMM sustained {fp8_sustained / 1e12:.0f} TFLOP/s (the peak's GEMM back to back for 2 s, as far as "
         f"the GPU's power cap lets it); prefill MFU against it: " + ", ".join(parts))


def _write_atomic(path: str, data: str | bytes) -> None:
    # a temp file beside the target, then a rename: an interrupted run never leaves half a report
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json(path: str, report: dict) -> None:
    _write_atomic(path, json.dumps(
        report, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


PLOT_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _field(r, name: str):
    return r[name] if isinstance(r, dict) else getattr(r, name)


def plot_series(report: dict) -> list[tuple[str, str, str, list[tuple[float, float]]]]:
    """What the decode plot draws: (label, colour, SVG dash pattern, [(context, ms/token)]) per line, one colour per
    batch size: ours (solid), the roofline (dashed) and the HF baseline (dotted) when the report has one."""
    series: list[tuple[str, str, str, list[tuple[float, float]]]] = []
    batches = sorted({_field(r, "batch") for r in report["decode"]})
    for i, b in enumerate(batches):
        color = PLOT_COLORS[i % len(PLOT_COLORS)]
        rows = sorted((r for r in report["decode"] if _field(r, "batch") == b), key=lambda r: _field(r, "context"))
        series.append((f"dsv3c b{b}", color, "", [(_field(r, "context"), _field(r, "ms_per_token")) for r in rows]))
        series.append((f"roofline b{b}", color, "6,4", [(_field(r, "context"), _field(r, "roofline_ms")) for r in rows]))
        hf = sorted((r for r in report.get("baseline_hf", []) if r["batch"] == b), key=lambda r: r["context"])
        if hf:
            series.append((f"hf b{b}", color, "2,3", [(r["context"], r["ms_per_token"]) for r in hf]))
    return series


def _plot_title(report: dict) -> str:
    return (f'{report.get("config", "")} decode ({report.get("mode", "")}, {report.get("device", "")}): '
            "ms/token vs context")


def plot_svg(report: dict, width: int = 720, height: int = 420) -> str:
    """Decode ms/token against context length (log scale), the lines of `plot_series`. Plain SVG: no plotting
    library needed."""
    series = plot_series(report)
    xs = [x for *_, pts in series for x, _ in pts]
    ys = [y for *_, pts in series for _, y in pts]
    left, right, top, bottom = 64, 170, 36, 48
    pw, ph = width - left - right, height - top - bottom
    lx0, lx1 = math.log10(min(xs)), math.log10(max(xs))
    lx1 = lx1 if lx1 > lx0 else lx0 + 1
    ymax = max(ys) * 1.1

    def px(x: float) -> float:
        return left + pw * (math.log10(x) - lx0) / (lx1 - lx0)

    def py(y: float) -> float:
        return top + ph * (1 - y / ymax)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">{escape(_plot_title(report))}</text>',
           f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>',
           f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">context (tokens, log scale)</text>',
           f'<text x="16" y="{top + ph / 2}" transform="rotate(-90 16 {top + ph / 2})" text-anchor="middle">'
           'ms/token</text>']
    for x in sorted(set(xs)):
        out.append(f'<text x="{px(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{x}</text>')
    for j in range(6):
        y = ymax * j / 5
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + pw}" y2="{py(y):.1f}" stroke="#ddd"/>')
    for k, (label, color, dash, pts) in enumerate(series):
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline data-label="{escape(label)}" points="{coords}" fill="none" stroke="{color}" '
                   f'stroke-width="2"{dash_attr}/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        ly = top + 14 + 18 * k
        out.append(f'<line x1="{left + pw + 16}" y1="{ly}" x2="{left + pw + 46}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="2"{dash_attr}/>')
        out.append(f'<text x="{left + pw + 52}" y="{ly + 4}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


PLOT_FORMATS = (".svg", ".png")


def check_plot_path(path: str) -> None:
    """Before a benchmark runs: the plot's format from its suffix. SVG needs nothing; PNG needs matplotlib."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in PLOT_FORMATS:
        raise ValueError(f"--plot {path}: the file name must end in .svg or .png")
    if suffix == ".png" and not _has_matplotlib():
        raise ValueError(f"--plot {path}: PNG output needs matplotlib (pip install matplotlib); an .svg path needs "
                         "no plotting library")


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_png(report: dict) -> bytes:
    """The SVG's plot drawn by matplotlib as PNG bytes (a bare Figure: no pyplot, no display, the process's backend
    untouched)."""
    import io

    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(7.2, 4.2), dpi=100)
    ax = fig.add_subplot()
    series = plot_series(report)
    for label, color, dash, pts in series:
        style = "-" if not dash else ("--" if dash == "6,4" else ":")
        ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=color, marker="o", markersize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(sorted({x for *_, pts in series for x, _ in pts}))
    ax.get_xaxis().set_major_formatter(ScalarFormatter())
    ax.minorticks_off()  # the measured contexts only
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context (tokens, log scale)")
    ax.set_ylabel("ms/token")
    ax.set_title(_plot_title(report), fontsize=10)
    ax.grid(True, color="#ddd")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plot(path: str, report: dict) -> None:
    if not report["decode"]:
        raise ValueError("no decode points to plot (every batch/context pair was skipped)")
    check_plot_path(path)
    _write_atomic(path, plot_png(report) if path.lower().endswith(".png") else plot_svg(report))


@torch.inference_mode()
def bench_hf(checkpoint: str, device: str, batch_sizes: Sequence[int], contexts: Sequence[int], steps: int,
             echo: Callable[[str], None] = print) -> list[dict]:
    """transformers' DeepseekV3ForCausalLM on the same weights, timed the same way (its own DynamicCache).

    Needs a BF16 checkpoint (transformers cannot load DeepSeek's FP8 layout on CPU or offline; make one with
    `dsv3c convert --dtype bf16`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report lists the MTP layer it skips, as we do
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16 if device.startswith("cuda")
                                              else torch.float32).to(device).eval()
    dev = torch.device(device)
    vocab = hf.config.vocab_size
    out = []
    g = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        for ctx in contexts:
            ids = torch.randint(0, vocab, (b, ctx), generator=g).to(dev)
            res = hf(ids, use_cache=True)
            past, tok = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for _ in range(steps):
                _sync(dev)
                t0 = time.perf_counter()
                res = hf(tok, past_key_values=past, use_cache=True)
                tok = res.logits[:, -1].argmax(-1, keepdim=True)
                _sync(dev)
                times.append(time.perf_counter() - t0)
                past = res.past_key_values
            ms = 1000 * statistics.median(times[1:] if len(times) > 2 else times)
            echo(f"hf     batch {b:>3} context {ctx:>6}: {ms:8.3f} ms/token")
            out.append({"batch": b, "context": ctx, "ms_per_token": round(ms, 4)})
    return out
