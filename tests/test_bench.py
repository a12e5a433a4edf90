"""`dsv3c bench` on CPU (smoke: no timings asserted) and the roofline byte count against a hand count."""

from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner

from dsv3.cli import main
from dsv3.config import resolve_config
from dsv3.model import Transformer
from dsv3.runtime.bench import expected_unique_experts, step_bytes


def test_expected_unique_experts():
    assert expected_unique_experts(64, 6, 1) == pytest.approx(6)
    assert expected_unique_experts(64, 6, 1000) == pytest.approx(64, rel=1e-6)
    assert 6 < expected_unique_experts(64, 6, 8) < 48


def test_step_bytes_hand_count():
    cfg = resolve_config("tiny")  # bf16 weights
    with torch.device("meta"):
        m = Transformer(cfg, dtype=torch.bfloat16, max_batch_size=2, max_seq_len=64)
    d, v, e, i, k = cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts, cfg.moe_intermediate_size, 4
    expert = 3 * i * d * 2
    total_params = sum(t.numel() * 2 for n, t in m.state_dict().items() if t.dtype == torch.bfloat16)
    bias = sum(t.numel() * 4 for n, t in m.state_dict().items() if t.dtype == torch.float32)
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    non_expert = total_params + bias - v * d * 2 - moe_layers * e * expert
    cache = 1 * 40 * cfg.latent_dim * 2 * cfg.num_hidden_layers
    expected = non_expert + 1 * d * 2 + int(expert * k * moe_layers) + cache
    assert step_bytes(m, batch=1, context=40) == pytest.approx(expected, rel=1e-6)


def test_step_bytes_same_for_the_rank_layout():
    """Stacking the shared experts and fusing the input projections moves bytes between tensors, not the total:
    the shared slots are read every step, like the shared MLP they replace."""
    from dsv3.runtime.parallel import ParallelPlan, build_rank_model

    cfg = resolve_config("tiny-v2")
    with torch.device("meta"):
        plain = Transformer(cfg, dtype=torch.bfloat16, max_batch_size=2, max_seq_len=64)
    laid_out = build_rank_model(cfg, ParallelPlan(0, 1), dtype=torch.bfloat16, device="meta", max_batch_size=2,
                                max_seq_len=64)
    assert laid_out.layers[-1].mlp.n_shared_slots == 2
    for batch in (1, 8):
        assert step_bytes(laid_out, batch, 40) == pytest.approx(step_bytes(plain, batch, 40), rel=1e-9)


def test_prefill_flops_hand_count():
    """prefill_flops against the config's formula written out here, for the plain and the runtime's rank layout."""
    from dsv3.runtime.bench import prefill_flops
    from dsv3.runtime.parallel import ParallelPlan, build_rank_model

    cfg = resolve_config("tiny")
    d, h, lat, rope = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    qk, v = cfg.qk_nope_head_dim + rope, cfg.v_head_dim
    attn_w = d * cfg.q_lora_rank + cfg.q_lora_rank * h * qk + d * (lat + rope) + h * v * d
    dense_w = 3 * d * cfg.intermediate_size
    moe_w = (cfg.n_routed_experts * d + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size
             + 3 * d * cfg.moe_intermediate_size * cfg.n_shared_experts)
    n_dense = cfg.first_k_dense_replace
    n_moe = cfg.num_hidden_layers - n_dense
    length = 50
    per_token = 2 * (cfg.num_hidden_layers * attn_w + n_dense * dense_w + n_moe * moe_w)
    per_token += 2 * cfg.vocab_size * d / length  # the head, for the last token only
    dn = cfg.qk_nope_head_dim
    # one chunk: kv_b_proj decompresses every token, naive causal attention (nope + rope scores, v values)
    one_chunk = per_token * length + cfg.num_hidden_layers * length * (
        2 * h * lat * (dn + v) + 2 * h * (dn + rope + v) * (length + 1) / 2)
    # chunks of 30 + 20: the second one decompresses the 30 rows before it again and attends them in the same form
    first_two = per_token * length + cfg.num_hidden_layers * (
        30 * (2 * h * lat * (dn + v) + 2 * h * (dn + rope + v) * 31 / 2)
        + 20 * (2 * h * lat * (dn + v) + 2 * h * (dn + rope + v) * 21 / 2))
    two_chunks = first_two + cfg.num_hidden_layers * (30 * 2 * h * lat * (dn + v) + 20 * 2 * h * (dn + rope + v) * 30)
    # DSV3_PREFILL_PREFIX=absorbed: the second one also absorbs q and o and attends those rows in latent space
    two_absorbed = first_two + cfg.num_hidden_layers * 20 * (2 * h * lat * (dn + v) + 2 * h * (2 * lat + rope) * 30)
    with torch.device("meta"):
        plain = Transformer(cfg, dtype=torch.bfloat16, max_batch_size=1, max_seq_len=64)
    laid_out = build_rank_model(cfg, ParallelPlan(0, 1), dtype=torch.bfloat16, device="meta", max_batch_size=1,
                                max_seq_len=64)
    assert laid_out.layers[-1].mlp.n_shared_slots == 1 and laid_out.layers[0].self_attn.qkv_a_rows
    for model in (plain, laid_out):
        assert prefill_flops(model, length) == pytest.approx(one_chunk, rel=1e-12)
        assert prefill_flops(model, length, 30) == pytest.approx(two_chunks, rel=1e-12)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSV3_PREFILL_PREFIX", "absorbed")
        assert prefill_flops(plain, length, 30) == pytest.approx(two_absorbed, rel=1e-12)


def test_sustained_mfu_fields():
    """The prefill rows' MFU against the sustained FP8 GEMM rate: FLOPs / (ttft) / rate, recorded and printed; no
    FP8 GEMM on the CPU (neither rate is measured there)."""
    from dsv3.runtime.bench import add_sustained_mfu, fp8_gemm_peak, fp8_gemm_sustained

    rows = [{"prompt_len": 4095, "flops": 20.68e12, "ttft_ms": 40.0}, {"prompt_len": 14, "flops": 6e10, "ttft_ms": 5.0}]
    lines = []
    add_sustained_mfu(rows, 1.2e15, echo=lines.append)
    assert rows[0]["fp8_sustained_tflops_per_s"] == 1200.0
    assert rows[0]["mfu_sustained"] == round(20.68e12 / 0.040 / 1.2e15, 4) == 0.4308
    assert rows[1]["mfu_sustained"] == 0.01
    assert lines == ["FP8 GEMM sustained 1200 TFLOP/s (the peak's GEMM back to back for 2 s, as far as the GPU's "
                     "power cap lets it); prefill MFU against it: 4095 tokens 43.1%, 14 tokens 1.0%"]
    assert fp8_gemm_peak(torch.device("cpu")) is None and fp8_gemm_sustained(torch.device("cpu")) is None


def test_back_to_back_windows(monkeypatch):
    """back_to_back (the sustained-rate loop of dsv3c bench and the power scripts) on stand-in CUDA events: every run
    timed between its own two events, the host never more than `ahead` runs past the last one it waited for, and
    each run's enqueue time reported."""
    from dsv3.runtime import bench

    class Event:
        made = []

        def __init__(self, enable_timing=False):
            self.t, self.waited = None, False
            Event.made.append(self)

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            self.waited = True

        def elapsed_time(self, end):
            return 1e3 * (end.t - self.t)

    calls = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def work():
        ends = Event.made[1::2]
        waited = max((i for i, e in enumerate(ends) if e.waited), default=-1)
        calls.append(len(ends) - 1 - waited)  # runs enqueued since the last waited-for end (this one included)
        time.sleep(0.002)

    runs = bench.back_to_back(work, 0.05, ahead=3)
    assert len(runs) == len(calls) >= 5 and max(calls) <= 4
    assert all(ms >= 2.0 for ms, _ in runs) and [t for _, t in runs] == sorted(t for _, t in runs)


def test_bench_cli_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3_NORM_QUANT", "torch")  # a switch in the environment: reported with the numbers
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--random-weights", "--config", "tiny", "--eager", "--device", "cpu",
                                    "--dtype", "float32", "--batch-sizes", "1,2", "--context", "8,24", "--steps", "3",
                                    "--prompt-len", "5,16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "copy bandwidth" in res.output and "roofline" in res.output and "prefill 16 tokens" in res.output
    assert "prefill 5 tokens" in res.output and "TFLOP/s" in res.output
    report = json.loads(out.read_text())
    assert [(p["prompt_len"], p["repeats"]) for p in report["prefill"]] == [(5, 3), (16, 3)]
    assert all(p["ttft_ms"] > 0 and p["tokens_per_s"] > 0 for p in report["prefill"])
    assert [(r["batch"], r["context"]) for r in report["decode"]] == [(1, 8), (1, 24), (2, 8), (2, 24)]
    assert all(r["ms_per_token"] > 0 and 0 < r["fraction_of_roofline"] for r in report["decode"])
    assert report["kernel_overrides"] == {"DSV3_NORM_QUANT": "torch"} and "DSV3_NORM_QUANT=torch" in res.output
    res = CliRunner().invoke(main, ["bench", "--eager", "--config", "tiny"])
    assert res.exit_code == 2 and "--random-weights" in res.output
    res = CliRunner().invoke(main, ["bench", "--random-weights", "--config", "tiny", "--eager", "--device", "cpu",
                                    "--prompt-len", "0,8"])
    assert res.exit_code == 2 and "prompt lengths must be at least 1" in res.output


def test_bench_hf_baseline(tmp_path):
    from dsv3.init_random import write_random_checkpoint

    ckpt = write_random_checkpoint(resolve_config("tiny"), tmp_path / "ck", dtype="bf16", progress=False)
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", "--checkpoint", str(ckpt), "--eager", "--device", "cpu", "--dtype",
                                    "float32", "--batch-sizes", "1", "--context", "8", "--steps", "3",
                                    "--prompt-len", "8", "--baseline", "hf", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["baseline_hf"][0]["batch"] == 1 and report["baseline_hf"][0]["ms_per_token"] > 0
    assert "vs hf" in res.output


def test_plot_svg_maps_points():
    """The SVG puts each point where its value says: larger context further right, larger ms/token higher up
    (smaller y), one polyline per series (ours, roofline, HF baseline per batch size), and it parses as XML."""
    import xml.etree.ElementTree as ET

    from dsv3.runtime.bench import plot_svg

    decode = [{"batch": b, "context": c, "ms_per_token": ms, "roofline_ms": roof}
              for b, c, ms, roof in [(1, 128, 4.0, 0.6), (1, 4096, 5.0, 0.9), (8, 128, 6.0, 2.1), (8, 4096, 9.0, 2.5)]]
    hf = [{"batch": 1, "context": 128, "ms_per_token": 90.0}, {"batch": 1, "context": 4096, "ms_per_token": 95.0}]
    svg = plot_svg({"config": "16B", "mode": "artifacts", "device": "cuda", "decode": decode, "baseline_hf": hf})
    root = ET.fromstring(svg)
    lines = {p.get("data-label"): [tuple(map(float, xy.split(","))) for xy in p.get("points").split()]
             for p in root.iter("{http://www.w3.org/2000/svg}polyline")}
    assert set(lines) == {"dsv3c b1", "roofline b1", "hf b1", "dsv3c b8", "roofline b8"}
    (x0, y0), (x1, y1) = lines["dsv3c b1"]
    assert x1 > x0 and y1 < y0                      # 4096 right of 128; 5.0 ms above 4.0 ms
    assert lines["hf b1"][0][1] < lines["dsv3c b8"][1][1] < lines["dsv3c b1"][0][1] < lines["roofline b1"][0][1]
    assert lines["roofline b8"][0][0] == x0         # same context, same x


def test_bench_cli_plot(tmp_path):
    plot = tmp_path / "decode.svg"
    args = ["bench", "--random-weights", "--config", "tiny", "--eager", "--device", "cpu", "--dtype", "float32",
            "--batch-sizes", "1", "--context", "8,16", "--steps", "2", "--prompt-len", "8", "--plot", str(plot)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert plot.read_text().startswith("<svg") and "dsv3c b1" in plot.read_text()
    assert not list(tmp_path.glob("*.tmp*"))        # written through a temp file, then renamed


def _png_pixels(path):
    """(width, height, rows of RGBA tuples) of a PNG as matplotlib's Agg backend writes it (8-bit RGBA,
    non-interlaced): decoded here with zlib and the PNG row filters, independently of matplotlib."""
    import struct
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 6)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, bpp, stride = zlib.decompress(idat), 4, width * 4
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            pred = {0: 0, 1: a, 2: b, 3: (a + b) // 2}.get(f)
            if f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            line[i] = (line[i] + pred) & 0xFF
        rows.append([tuple(line[i:i + 4]) for i in range(0, stride, 4)])
        prev = line
    return width, height, rows


def test_plot_png(tmp_path):
    """--plot x.png: the same lines drawn by matplotlib (a test dependency) into a PNG, checked by decoding it: the
    right size and the series' colours present; written through a temp file."""
    from dsv3.runtime.bench import PLOT_COLORS, write_plot

    decode = [{"batch": b, "context": c, "ms_per_token": ms, "roofline_ms": roof}
              for b, c, ms, roof in [(1, 128, 4.0, 0.6), (1, 4096, 5.0, 0.9), (8, 128, 6.0, 2.1), (8, 4096, 9.0, 2.5)]]
    out = tmp_path / "decode.png"
    write_plot(str(out), {"config": "16B", "mode": "artifacts", "device": "cuda", "decode": decode})
    width, height, rows = _png_pixels(out)
    assert (width, height) == (720, 420)
    seen = {px[:3] for row in rows for px in row}
    for color in PLOT_COLORS[:2]:  # batch 1 and batch 8
        assert tuple(int(color[i:i + 2], 16) for i in (1, 3, 5)) in seen
    assert not list(tmp_path.glob("*.tmp*"))


def test_bench_cli_plot_format_checked_first(tmp_path, monkeypatch):
    """A plot path the bench cannot write fails before anything is timed, naming the path and the fix."""
    args = ["bench", "--random-weights", "--config", "tiny", "--eager", "--device", "cpu", "--batch-sizes", "1",
            "--context", "8", "--steps", "2", "--plot"]
    res = CliRunner().invoke(main, args + [str(tmp_path / "decode.pdf")])
    assert res.exit_code == 2 and "must end in .svg or .png" in res.output
    from dsv3.runtime import bench

    monkeypatch.setattr(bench, "_has_matplotlib", lambda: False)  # a host without it
    res = CliRunner().invoke(main, args + [str(tmp_path / "decode.png")])
    assert res.exit_code == 2 and "needs matplotlib (pip install matplotlib)" in res.output
    assert "ms/token" not in res.output and not list(tmp_path.iterdir())  # nothing was timed or written
