"""`dsv3c compile --device cpu` -> `dsv3c run --artifacts` end to end on CPU, and every refusal with its message.

One compile per world size per test session (each ~1 minute on 2 cores), shared by the tests below.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dsv3
from dsv3.cli import main
from dsv3.config import resolve_config
from dsv3.generate import GenerationError, generate
from dsv3.init_random import write_random_checkpoint
from dsv3.runtime.engine import artifact_stepper
from dsv3.runtime.manifest import ArtifactError, check_host, read_manifest
from dsv3.runtime.parallel import ParallelPlan

MAX_BATCH, MAX_SEQ, CHUNK = 3, 48, 8
LAYERS = 2  # the tiny config's dense layer and its first MoE layer: every kind of block, a third less to build
PROMPTS = [[0, 5, 9, 13, 200, 7, 81, 44, 3, 17, 99, 12], [0, 33], [0, 7, 8, 9, 10]]


def _compile(out: Path, world_size: int = 1, batch_sizes: str = "1,3", extra: tuple[str, ...] = ()) -> None:
    res = CliRunner().invoke(main, ["compile", "--config", "tiny", "--device", "cpu", "--out", str(out),
                                    "--world-size", str(world_size), "--max-batch-size", str(MAX_BATCH),
                                    "--max-seq-len", str(MAX_SEQ), "--batch-sizes", batch_sizes,
                                    "--prefill-chunk", str(CHUNK), "--dtype", "float32", "--num-layers", str(LAYERS),
                                    *extra])
    assert res.exit_code == 0, res.output + repr(res.exception)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return write_random_checkpoint(resolve_config("tiny"), tmp_path_factory.mktemp("ck") / "tiny", dtype="bf16",
                                   seed=21, num_layers=LAYERS, progress=False)


@pytest.fixture(scope="session")
def art(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "tiny-cpu"
    _compile(out, extra=("--short-prefill", "1x4"))  # + a first-chunk graph of static shape (1, 4)
    return out


@pytest.fixture(scope="session")
def art_ws2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "tiny-cpu-ws2"
    # a trace-time kernel knob (no effect on CPU): the manifest must record it. One decode bucket (3): a smaller
    # batch is padded to it (the bench test's batch 1), and the ws1 fixture already covers choosing among buckets;
    # one AOTInductor graph fewer to build (~18 s of CI)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSV3_GEMV_VARIANT", "cc")
        _compile(out, world_size=2, batch_sizes="3", extra=("--no-verify",))
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_compile_writes_complete_artifacts(art):
    m = read_manifest(art)
    assert set(m["graphs"]) == {"decode_b1", "decode_b3", "prefill_first", "prefill", "prefill_first_1x4"}
    assert m["graphs"]["prefill_first"]["first_chunk"] and not m["graphs"]["prefill"]["first_chunk"]
    assert m["graphs"]["prefill_first_1x4"] == {"file": "prefill_first_1x4.pt2", "kind": "prefill", "max_chunk": 4,
                                                "first_chunk": True, "max_batch": 1, "static_shape": [1, 4]}
    assert "static_shape" not in m["graphs"]["prefill_first"] and m["short_prefill"] == [[1, 4]]
    assert {p.name for p in art.iterdir()} == {"decode_b1.pt2", "decode_b3.pt2", "prefill_first.pt2", "prefill.pt2",
                                               "prefill_first_1x4.pt2", "config.json", "manifest.json"}
    assert m["world_size"] == 1 and m["device"] == "cpu" and m["max_seq_len"] == MAX_SEQ
    assert m["host"]["torch"] == torch.__version__
    assert m["config_hash"] == resolve_config("tiny").replace(num_hidden_layers=LAYERS).config_hash()
    assert "model.layers.0.self_attn.kv_b_proj.weight" not in m["rank_weights"]["tensors"]  # names are the model's
    assert m["rank_weights"]["tensors"]["layers.0.self_attn.kv_b_proj.weight"]["shape"] == [4 * 64, 128]
    res = CliRunner().invoke(main, ["inspect", str(art)])
    assert res.exit_code == 0 and "integrity   ok" in res.output and "decode_b3" in res.output
    assert m["kernel_overrides"] == {k: v for k, v in os.environ.items() if k.startswith("DSV3_")}
    # the dense layer's gate and up as one linear (its 512 rows end on a block); the shared expert is in the slots
    assert m["rank_layout"] == {"shared_expert_slots": 1, "fused_qkv_a_proj": True, "fused_gate_up_proj": 1,
                                "prefill_copies": 0,  # bf16: nothing to dequantize or lay side by side
                                "deferred_moe_adds": 0}  # (FP8 only: the next block's projections take x quantized)
    assert ("layout      shared experts as 1 extra expert slot(s); q and kv_a projections fused; gate and up fused "
            "in 1 MLP(s)") in res.output
    assert "layers.0.mlp.gate_up_proj.weight" in m["rank_weights"]["tensors"]
    assert "layers.1.mlp.shared_experts.gate_proj.weight" not in m["rank_weights"]["tensors"]


def test_manifest_records_kernel_overrides(art_ws2):
    assert read_manifest(art_ws2)["kernel_overrides"].get("DSV3_GEMV_VARIANT") == "cc"
    res = CliRunner().invoke(main, ["inspect", str(art_ws2)])
    assert res.exit_code == 0 and "DSV3_GEMV_VARIANT=cc (pinned at build time)" in res.output
    # world size 2: the shared MLP is tensor-parallel, not stacked; the input projections are still fused, and
    # gate and up in the dense layer and the MoE layer's shared MLP
    assert read_manifest(art_ws2)["rank_layout"] == {"shared_expert_slots": 0, "fused_qkv_a_proj": True,
                                                     "fused_gate_up_proj": 2, "prefill_copies": 0,
                                                     "deferred_moe_adds": 0}


def _assert_greedy_equals_eager_and_alone(stepper, eager, prompts, max_new_tokens: int) -> None:
    """The batch's greedy tokens equal the eager model's, and each prompt's equal its own run alone (mixed lengths
    in one batch: each prompt in its own cache row)."""
    ours, _ = generate(stepper, prompts, max_new_tokens=max_new_tokens)
    ref, _ = generate(eager, prompts, max_new_tokens=max_new_tokens)
    assert [c.tokens for c in ours] == [c.tokens for c in ref]
    for i, p in enumerate(prompts):
        alone, _ = generate(stepper, [p], max_new_tokens=max_new_tokens)
        assert alone[0].tokens == ours[i].tokens


def test_artifacts_greedy_tokens_equal_eager(art, ckpt):
    stepper, timings = artifact_stepper(art, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    eager = dsv3.load(ckpt, dtype=torch.float32, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)
    _assert_greedy_equals_eager_and_alone(stepper, eager, PROMPTS, 10)


def test_first_chunks_of_several_prompts_in_one_prefill_call(art, ckpt):
    """The first-chunk graph takes several prompts per call (dynamic row count): short prompts are right-padded to
    one length and prefilled together while the call stays within the chunk's tokens; logits and greedy tokens
    equal the eager model's, and each prompt's own when prefilled alone (the padding writes only cache slots its
    decode steps overwrite first)."""
    stepper, _ = artifact_stepper(art, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    assert stepper.prefill_first_rows == MAX_BATCH == read_manifest(art)["graphs"]["prefill_first"]["max_batch"]
    prompts = [[0, 33], [0, 7, 8], [0, 1, 2, 3], [0]]  # first chunks 2, 3, 4, 1 tokens; CHUNK 8
    assert stepper._first_chunk_groups(prompts) == [[0, 1], [2, 3]]  # 2 x 3 <= 8; 3 x 4 > 8; 2 x 4 <= 8
    assert stepper._first_chunk_groups(PROMPTS) == [[0], [1], [2]]  # PROMPTS[0] fills a chunk
    calls = []
    real = stepper.prefill_first_fn
    stepper.prefill_first_fn = lambda *a: calls.append(a[0].shape) or real(*a)
    eager = dsv3.load(ckpt, dtype=torch.float32, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)
    batch = prompts[:3]
    got = stepper.prefill(batch)
    assert calls == [torch.Size([2, 3]), torch.Size([1, 4])]
    for i, p in enumerate(batch):
        want = eager(torch.tensor([p]), torch.arange(len(p)).unsqueeze(0), last_only=True)[0]
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
    _assert_greedy_equals_eager_and_alone(stepper, eager, batch, 8)


def test_short_prefills_padded_to_static_buckets(art, ckpt):
    """Short first chunks through the static (rows, width) buckets that CUDA graphs replay on the GPU (here called
    directly): fewer prompts than rows repeat the first prompt, shorter ones are right-padded; logits and greedy
    tokens equal the eager model's and each prompt's alone, and a chunk wider than every bucket takes the plain
    call. The long one-prompt widths add one-row buckets only, none wider than the chunk."""
    stepper, _ = artifact_stepper(art, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    stepper.SHORT_PREFILL_WIDTHS, stepper.SHORT_PREFILL_TOKENS = (4, 8), 16
    stepper.LONG_PREFILL_WIDTHS = (6, 2 * CHUNK)
    stepper.short_prefill_(capture=False)
    # rows: the decode buckets 1, 3 (3 x 8 > 16); the long width 6 in one row, 2 x CHUNK not at all
    assert sorted(stepper.short_prefill) == [(1, 4), (1, 6), (1, 8), (3, 4)]
    # the (1, 4) bucket runs the artifacts' static graph of that shape, the others the dynamic first-chunk graph
    static = stepper.static_first_fns[(1, 4)]
    assert list(stepper.static_first_fns) == [(1, 4)] and static is not stepper.prefill_first_fn
    assert [stepper.short_prefill[rw].fn is static for rw in [(1, 4), (1, 6), (1, 8), (3, 4)]] == [
        True, False, False, False]
    calls = []
    real = stepper.prefill_first_fn
    for short in stepper.short_prefill.values():
        short.fn = lambda *a, fn=short.fn: calls.append((a[0].tolist(), a[2].tolist(), a[3].tolist())) or fn(*a)
    stepper.prefill_first_fn = lambda *a: calls.append(("plain", a[0].shape)) or real(*a)
    prompts = [[0, 33], [0, 7, 8], [0, 1, 2, 3], [5]]
    eager = dsv3.load(ckpt, dtype=torch.float32, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)
    got = stepper.prefill(prompts[:3])  # groups [0, 1] and [2]
    assert calls == [([[0, 33, 0, 0], [0, 7, 8, 0], [0, 33, 0, 0]], [0, 1, 0], [1, 2, 1]),
                     ([[0, 1, 2, 3]], [2], [3])]
    for i, p in enumerate(prompts[:3]):
        want = eager(torch.tensor([p]), torch.arange(len(p)).unsqueeze(0), last_only=True)[0]
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
    _assert_greedy_equals_eager_and_alone(stepper, eager, [prompts[3], prompts[0], prompts[2]], 8)
    calls.clear()
    stepper.prefill([list(range(1, 6))])
    assert calls == [([[1, 2, 3, 4, 5, 0]], [0], [4])]  # 5 tokens: the (1, 6) bucket, padded
    del stepper.short_prefill[(1, 6)]
    calls.clear()
    stepper.prefill([list(range(1, 7))])
    assert calls == [([[1, 2, 3, 4, 5, 6, 0, 0]], [0], [5])]  # 6 tokens: the (1, 8) bucket
    del stepper.short_prefill[(1, 8)]
    calls.clear()
    stepper.prefill([list(range(1, 7))])
    assert calls == [("plain", torch.Size([1, 6]))]  # no bucket that wide: the plain call


def test_later_chunks_through_the_full_chunk_bucket(art, ckpt):
    """A prompt's chunks after the first go through the one-row bucket of the general prefill graph at a whole
    chunk (a CUDA graph on the GPU, called directly here) with their positions as inputs: full chunks as they are,
    a shorter last one right-padded (test_generate's bucket test has the cases that take the plain call).
    Logits equal the eager model's; greedy tokens equal its and each prompt's alone."""
    stepper, _ = artifact_stepper(art, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    stepper.short_prefill_(capture=False)
    later = stepper.later_prefill
    assert later is not None and later.fn is stepper.prefill_fn and (later.rows, later.width) == (1, CHUNK)
    assert stepper.short_prefill[(1, CHUNK)].fn is stepper.prefill_first_fn  # the first chunk's own bucket
    calls = []
    real = stepper.prefill_fn
    later.fn = lambda *a: calls.append((a[0].tolist(), a[1].tolist(), a[2].tolist(), a[3].tolist())) or real(*a)
    stepper.prefill_fn = lambda *a: calls.append(("plain", a[1].tolist())) or real(*a)
    prompts = [list(range(1, 2 * CHUNK + 4)), list(range(40, 40 + CHUNK + 1))]  # 8 + 8 + 3 tokens; 8 + 1
    got = stepper.prefill(prompts)
    pad = [0] * (CHUNK - 3)
    assert calls == [([list(range(1 + CHUNK, 1 + 2 * CHUNK))], [list(range(CHUNK, 2 * CHUNK))], [0], [CHUNK - 1]),
                     ([list(range(1 + 2 * CHUNK, 2 * CHUNK + 4)) + pad], [list(range(2 * CHUNK, 3 * CHUNK))], [0],
                      [2]),
                     ([[40 + CHUNK] + [0] * (CHUNK - 1)], [list(range(CHUNK, 2 * CHUNK))], [1], [0])]
    eager = dsv3.load(ckpt, dtype=torch.float32, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)
    for i, p in enumerate(prompts):
        want = eager(torch.tensor([p]), torch.arange(len(p)).unsqueeze(0), last_only=True)[0]
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
    _assert_greedy_equals_eager_and_alone(stepper, eager, prompts, 6)


def test_greedy_loop_feeds_itself_with_padding_rows(art, ckpt, monkeypatch):
    """Two prompts in the 3-row bucket: the stepper's own greedy loop (the body its CUDA graph captures, run plainly
    on the CPU) writes the next tokens and positions into its static buffers, leaves the padding row at token 0 /
    position 0, and gives the eager model's tokens. Sampled generation takes the eager decode + sample loop."""
    from dsv3.generate import EagerDecodeLoop, PlainSteps, SamplingParams, decode_loop

    stepper, _ = artifact_stepper(art, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    eager = dsv3.load(ckpt, dtype=torch.float32, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)
    prompts = PROMPTS[1:]
    starts = []
    real = stepper.decode_loop
    monkeypatch.setattr(stepper, "decode_loop", lambda *a: starts.append(a[2]) or real(*a))
    ours, _ = generate(stepper, prompts, max_new_tokens=6)
    ref, _ = generate(eager, prompts, max_new_tokens=6)
    assert [c.tokens for c in ours] == [c.tokens for c in ref]
    assert starts == [SamplingParams()]
    plain, _ = generate(PlainSteps(stepper), prompts, max_new_tokens=6)  # decode + argmax per step, no own loop
    assert [c.tokens for c in plain] == [c.tokens for c in ref] and starts == [SamplingParams()]
    buf = stepper.loops[3]
    # 5 steps ran (the 6th token is the 5th step's): each row 5 past its prompt; the padding row untouched
    assert buf.positions[:, 0].tolist() == [len(p) + 5 for p in prompts] + [0]
    assert buf.tokens[:, 0].tolist() == [c.tokens[-1] for c in ours] + [0]
    assert buf.active[:, 0].tolist() == [1, 1, 0]
    tok = torch.tensor([1, 2])
    assert isinstance(decode_loop(stepper, tok, tok, SamplingParams(temperature=1.0)), EagerDecodeLoop)


def test_prompt_longer_than_a_chunk_and_one_token_pieces(art, ckpt):
    stepper, _ = artifact_stepper(art, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    eager = dsv3.load(ckpt, dtype=torch.float32, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, progress=False)
    prompt = list(range(1, 2 * CHUNK + 2))  # chunks of 8, 8 and a 1-token piece
    calls = []  # which graph served each chunk: the first-chunk graph at position 0, the general one after
    first, general = stepper.prefill_first_fn, stepper.prefill_fn
    assert first is not general
    stepper.prefill_first_fn = lambda *a: calls.append(("first", int(a[1][0, 0]))) or first(*a)
    stepper.prefill_fn = lambda *a: calls.append(("general", int(a[1][0, 0]))) or general(*a)
    logits = stepper.prefill([prompt])
    assert calls == [("first", 0), ("general", CHUNK), ("general", 2 * CHUNK)]
    ref = eager(torch.tensor([prompt]), torch.arange(len(prompt)), last_only=True)
    assert ((logits - ref).abs().max() / ref.abs().max()).item() < 1e-4
    assert generate(stepper, [[0]], max_new_tokens=3)[0][0].tokens == generate(eager, [[0]], max_new_tokens=3)[0][0].tokens


def test_cache_end_stops_cleanly_and_long_prompt_refused(art, ckpt):
    stepper, _ = artifact_stepper(art, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    comps, _ = generate(stepper, [list(range(1, MAX_SEQ - 2))], max_new_tokens=50)
    assert comps[0].finish_reason == "cache_end" and len(comps[0].tokens) == 3
    with pytest.raises(GenerationError, match=f"cache holds {MAX_SEQ}"):
        generate(stepper, [list(range(MAX_SEQ))], max_new_tokens=1)
    res = CliRunner().invoke(main, ["run", "--artifacts", str(art), "--checkpoint", str(ckpt), "--no-chat",
                                    "--prompt", "word " * 200])
    assert res.exit_code == 2 and "max_seq_len" in res.output


def test_run_cli_from_artifacts(art, ckpt, tmp_path):
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(main, ["run", "--artifacts", str(art), "--checkpoint", str(ckpt), "--prompt", "hello",
                                    "--prompt", "a longer prompt here", "--max-new-tokens", "5", "--stats",
                                    "--output-file", str(out)])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(len(r["token_ids"]) <= 5 for r in records)
    assert "time to first token" in res.output and "artifacts" in res.output


def test_run_cli_more_prompts_than_the_batch(art, ckpt, tmp_path):
    """More prompts than the artifacts' max batch (3) run as consecutive batches of at most 3, in input order: each
    prompt's greedy tokens are its tokens alone; a prompt that cannot run, in any batch, is refused before the first
    batch runs, numbered in the whole list."""
    from transformers import AutoTokenizer

    prompts = ["hello", "a longer prompt here", "x", "the fourth one", "five"]
    out = tmp_path / "out.jsonl"
    args = ["run", "--artifacts", str(art), "--checkpoint", str(ckpt), "--max-new-tokens", "4"]
    res = CliRunner().invoke(main, args + [a for p in prompts for a in ("--prompt", p)]
                             + ["--stats", "--output-file", str(out)])
    assert res.exit_code == 0, res.output
    assert f"5 prompts in 2 batches of up to {MAX_BATCH}" in res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts and records[0]["timings"]["batches"] == 2
    stepper, _ = artifact_stepper(art, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    eos = AutoTokenizer.from_pretrained(str(ckpt)).eos_token_id
    for r in records:
        alone, _ = generate(stepper, [r["prompt_token_ids"]], max_new_tokens=4, eos_id=eos)
        assert alone[0].tokens == r["token_ids"] and alone[0].finish_reason == r["finish_reason"]
    res = CliRunner().invoke(main, args + [a for p in prompts + ["word " * 60] for a in ("--prompt", p)])
    assert res.exit_code != 0 and "prompt 5 has" in res.output and "### prompt" not in res.output


def test_random_weights_from_artifacts_equal_the_eager_random_model(art):
    """No checkpoint: the rank's weights are generated on the device for the artifacts' config (671B does not fit
    on a disk). The packages bound to them give the greedy tokens of the eager model with the same random weights."""
    from dsv3.config import load_config_file
    from dsv3.runtime.parallel import build_rank_model
    from dsv3.runtime.random_weights import fill_random_

    stepper, timings = artifact_stepper(art, None, ParallelPlan(0, 1), "cpu", progress=False, weights_seed=3)
    cfg = load_config_file(art / "config.json")
    eager = fill_random_(build_rank_model(cfg, ParallelPlan(0, 1), dtype=torch.float32, device="cpu",
                                          max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ), seed=3)
    ours, _ = generate(stepper, PROMPTS, max_new_tokens=8)
    ref, _ = generate(eager, PROMPTS, max_new_tokens=8)
    assert [c.tokens for c in ours] == [c.tokens for c in ref]
    assert timings["load_weights_s"] > 0 and timings["warmup_s"] > 0  # both prefill graphs ran once at load


def test_run_cli_random_weights(art, ckpt, tmp_path):
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(main, ["run", "--artifacts", str(art), "--random-weights", "--prompt", "hello",
                                    "--max-new-tokens", "4", "--stats", "--output-file", str(out)])
    assert res.exit_code == 0, res.output
    assert len(json.loads(out.read_text())["token_ids"]) <= 4 and "time to first token" in res.output
    res = CliRunner().invoke(main, ["bench", "--artifacts", str(art), "--random-weights", "--device", "cpu",
                                    "--batch-sizes", "1,4", "--context", "8", "--steps", "2", "--prompt-len", "8"])
    assert res.exit_code == 0, res.output
    assert "decode batch   1 context      8" in res.output and "prefill 8 tokens" in res.output
    assert f"skip batch 4 context 8: the model's max batch size is {MAX_BATCH}" in res.output
    res = CliRunner().invoke(main, ["run", "--eager", "--random-weights", "--prompt", "hello"])
    assert res.exit_code != 0 and "--random-weights needs --artifacts" in res.output
    # another world size than the artifacts': refused before torchrun starts ranks
    res = CliRunner().invoke(main, ["run", "--artifacts", str(art), "--random-weights", "--world-size", "2",
                                    "--prompt", "hello"])
    assert res.exit_code == 2 and "compiled for world size 1, this run asks for 2" in res.output
    res = CliRunner().invoke(main, ["run", "--artifacts", str(art), "--random-weights", "--checkpoint", str(ckpt),
                                    "--prompt", "hello"])
    assert res.exit_code != 0 and "give --checkpoint CKPT, or --random-weights" in res.output


def test_bench_one_rank_of_two_with_stubbed_collectives(art_ws2):
    """World-size-2 artifacts benchmarked as rank 0 alone (the 671B-per-rank measurement on one GPU)."""
    import torch.distributed as dist

    args = ["bench", "--artifacts", str(art_ws2), "--random-weights", "--device", "cpu", "--batch-sizes", "1",
            "--context", "8", "--steps", "2", "--prompt-len", "8"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "add --stub-collectives" in res.output
    res = CliRunner().invoke(main, [*args, "--stub-collectives"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "rank 0 of 2, collectives stubbed" in res.output and "decode batch   1 context      8" in res.output
    assert not dist.is_initialized()  # the stand-in group is gone after the command


def test_tampered_and_truncated_files_refused(art, ckpt, tmp_path):
    bad = _copy(art, tmp_path)
    with open(bad / "decode_b1.pt2", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match=r"decode_b1.pt2 does not match its sha256"):
        artifact_stepper(bad, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    with open(bad / "prefill.pt2", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ArtifactError, match=r"(?s)prefill.pt2 has 1000 bytes.*truncated"):
        artifact_stepper(bad, ckpt, ParallelPlan(0, 1), "cpu", progress=False)
    (bad / "manifest.json").unlink()
    res = CliRunner().invoke(main, ["inspect", str(bad)])
    assert res.exit_code == 2 and "no manifest.json" in res.output


def test_host_mismatches_refused(art, ckpt, tmp_path):
    m = read_manifest(art)
    other = json.loads(json.dumps(m))
    other["host"]["torch"] = "2.11.0+cu130"
    with pytest.raises(ArtifactError, match=r"torch build: built with 2.11.0\+cu130, this host has"):
        check_host(other, "cpu", 1)
    other = json.loads(json.dumps(m))
    other.update(device="cuda")
    other["host"].update(gpu="NVIDIA H200", compute_capability=[9, 0])
    with pytest.raises(ArtifactError, match=r"built for device cuda, asked to run on cpu"):
        check_host(other, "cpu", 1)
    with pytest.raises(ArtifactError, match=r"(?s)world size: built for 1, running with 2.*--world-size 2"):
        check_host(m, "cpu", 2)
    other = json.loads(json.dumps(m))
    other["host"]["machine"] = "aarch64"
    with pytest.raises(ArtifactError, match=r"CPU: built on aarch64/"):
        check_host(other, "cpu", 1)


def test_checkpoint_of_another_config_refused(art, tmp_path):
    other = write_random_checkpoint(resolve_config("tiny-noqlora"), tmp_path / "other", dtype="bf16", progress=False)
    with pytest.raises(ArtifactError, match=r"(?s)does not match the config.*q_lora_rank: 96 vs None"):
        artifact_stepper(art, other, ParallelPlan(0, 1), "cpu", progress=False)


def test_interrupted_compile_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "compile", "--config", "tiny", "--device", "cpu",
                             "--out", str(out), "--max-batch-size", "2", "--max-seq-len", "32",
                             "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    deadline = time.time() + 120
    while "[aoti decode_b1] ..." not in seen and time.time() < deadline:  # kill in the middle of a compile
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "[aoti decode_b1] ..." in seen
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "killed"]
    # a killed process cannot clean up its temp dir, but the temp dir never has the final name or a manifest
    assert all(p.name.startswith(".killed.tmp-") and not (p / "manifest.json").exists() for p in leftovers)


def test_compile_refuses_bad_options(tmp_path):
    res = CliRunner().invoke(main, ["compile", "--config", "671B", "--device", "cpu", "--out", str(tmp_path / "x"),
                                    "--world-size", "3"])
    assert res.exit_code == 2 and "num_attention_heads" in res.output and "world size 3" in res.output
    res = CliRunner().invoke(main, ["compile", "--config", "tiny", "--device", "cpu", "--out", str(tmp_path / "y"),
                                    "--max-batch-size", "2", "--batch-sizes", "1,4"])
    assert res.exit_code == 2 and "--batch-sizes [4]" in res.output
    for shapes, says in (("1x", "expected ROWSxWIDTH items"), ("4x8", "--short-prefill 4x8: rows must be between 1 "
                                                                       "and --max-batch-size (2)"),
                         ("1x9000", "the width between 2 and --prefill-chunk (4096)")):
        res = CliRunner().invoke(main, ["compile", "--config", "tiny", "--device", "cpu", "--out", str(tmp_path / "z"),
                                        "--max-batch-size", "2", "--short-prefill", shapes])
        assert res.exit_code == 2 and says in res.output, res.output
    assert not (tmp_path / "z").exists()


WORKER = Path(__file__).parent / "workers" / "run_artifacts.py"


def test_two_ranks_from_artifacts_match_one(art, art_ws2, ckpt, tmp_path):
    """2 ranks (gloo, torchrun) from world-size-2 artifacts give the greedy tokens of world size 1."""
    ref, _ = generate(artifact_stepper(art, ckpt, ParallelPlan(0, 1), "cpu", progress=False)[0], PROMPTS,
                      max_new_tokens=8)
    out = tmp_path / "ws2.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(art_ws2), str(ckpt), str(out), json.dumps(PROMPTS)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text()) == [c.tokens for c in ref]
    # random weights at world size 2: every rank generates its shard (same seed: replicated tensors agree)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(art_ws2), "-", str(out), json.dumps(PROMPTS)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [len(t) for t in json.loads(out.read_text())] == [8, 8, 8]
    with pytest.raises(ArtifactError, match="world size: built for 2, running with 1"):
        artifact_stepper(art_ws2, ckpt, ParallelPlan(0, 1), "cpu", progress=False)


def test_all_reduce_choice_is_recorded_and_one_shot_needs_cuda(art, art_ws2, tmp_path):
    """The manifest records the graphs' all-reduce; one-shot artifacts (symmetric memory) are CUDA-only: a CPU build
    asking for them is refused before anything is built; the default (auto) is NCCL's on CPU, one-shot on CUDA.
    (The one-shot packages themselves are checked on the device: tests/test_collectives.py and gpu_check.sh
    ab671ws.)"""
    from dsv3.compiler.build import CompileOptions

    assert read_manifest(art_ws2)["all_reduce"] == "nccl" and read_manifest(art)["all_reduce"] == "none"
    cfg = resolve_config("tiny")
    assert CompileOptions(cfg, world_size=2, device="cuda").plan().all_reduce == "one-shot"
    assert CompileOptions(cfg, world_size=2, device="cpu").plan().all_reduce == "nccl"
    assert CompileOptions(cfg, world_size=2, device="cuda", all_reduce="nccl").plan().all_reduce == "nccl"
    assert CompileOptions(cfg, world_size=1, device="cuda").plan().all_reduce == "none"
    res = CliRunner().invoke(main, ["compile", "--config", "tiny", "--device", "cpu", "--out", str(tmp_path / "x"),
                                    "--world-size", "2", "--all-reduce", "one-shot"])
    assert res.exit_code != 0 and "--all-reduce one-shot needs --device cuda" in res.output
    assert not (tmp_path / "x").exists()


def test_verify_reports_noise_floor_and_catches_a_wrong_graph(art, monkeypatch):
    from dsv3.runtime import verify as v

    results = v.verify(art)
    assert [r["graph"] for r in results] == ["decode_b1", "decode_b3", "prefill_first", "prefill",
                                             "prefill_first_1x4"]
    for r in results:  # fp32 CPU packages: the same math as eager up to reordering
        assert r["ok"] and r["rows"] >= v.MIN_ROWS and r["median_err"] <= 1e-4 and r["top1_agree"] == 1.0, r
        assert 0 < r["median_noise"] < 1e-4  # one fp32 ulp of cache noise moves the eager logits a little

    class ShiftedDecode(v.DecodeStep):  # the eager side now attends one position further than the package
        def forward(self, tokens, input_pos):
            return super().forward(tokens, (input_pos + 1).clamp_max(MAX_SEQ - 1))

    monkeypatch.setattr(v, "DecodeStep", ShiftedDecode)
    with pytest.raises(SystemExit, match="decode_b1 does not match the eager model"):
        v.verify(art)


def test_default_short_prefill_shapes():
    """The static first-chunk graphs a CUDA build makes by default: 1x16 and 1x32 for every config; the sparse-tile
    widths (1x64, 1x256, 8 rows x 16 / 32) only where the routed experts take sparse tiles (FP8, the measured 16B
    expert shape, one rank), their rows capped by --max-batch-size, widths by --prefill-chunk; none on CPU; an
    explicit list as given."""
    from dsv3.compiler.build import CompileOptions
    from dsv3.config import FP8Quantization

    c16 = resolve_config("16B")
    c16q = c16.replace(quantization_config=FP8Quantization())
    base = ((1, 16), (1, 32))
    assert CompileOptions(c16q).short_prefill_shapes() == base + ((1, 64), (1, 256), (8, 16), (8, 32))
    assert CompileOptions(c16q, max_batch_size=4, prefill_chunk=128).short_prefill_shapes() == base + (
        (1, 64), (4, 16), (4, 32))
    assert CompileOptions(c16).short_prefill_shapes() == base                      # bf16 experts: no sparse tiles
    assert CompileOptions(c16q, world_size=2).short_prefill_shapes() == base
    assert CompileOptions(resolve_config("671B")).short_prefill_shapes() == base   # expert shape not measured
    assert CompileOptions(c16q, device="cpu").short_prefill_shapes() == ()
    assert CompileOptions(c16q, short_prefill=((2, 8), (1, 4))).short_prefill_shapes() == ((1, 4), (2, 8))


def test_prefill_inputs_staged_in_one_aligned_buffer():
    """A prefill call's int64 inputs go to the device as views of one buffer (one copy): right-padded token rows,
    positions, cache rows, logits indices, each view contiguous and starting 16-byte aligned (the compiled kernels
    assume aligned inputs), also after parts of odd length."""
    import numpy as np

    from dsv3.runtime.engine import _int64_rows, _staged

    parts = [_int64_rows([[5, 6, 7], [8]], 3), np.broadcast_to(np.arange(3), (2, 3)),
             np.asarray([4, 1], dtype=np.int64), np.asarray([2, 0], dtype=np.int64), np.arange(7), np.arange(2)]
    buf, views = _staged(parts, torch.device("cpu"))
    assert [v.tolist() for v in views] == [[[5, 6, 7], [8, 0, 0]], [[0, 1, 2], [0, 1, 2]], [4, 1], [2, 0],
                                           list(range(7)), [0, 1]]
    assert all(v.is_contiguous() and v.dtype == torch.long and v.data_ptr() % 16 == 0 for v in views)
    assert all(v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for v in views)
