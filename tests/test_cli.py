"""The `dsv3c` command line: help texts, `init-random` then `run --eager`, the JSONL it writes, and its errors."""

from __future__ import annotations

import json
import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dsv3
from dsv3.cli import main
from dsv3.config import shipped_config_names
from dsv3.generate import SamplingParams, generate

PROMPT = "Hello world"
MAX_SEQ_LEN = 64  # a small cache keeps the reference attention cheap


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def stderr_of(res) -> str:
    try:
        return res.stderr
    except ValueError:  # older click without separate stderr
        return res.output


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """Written by the CLI: bf16 (the plain linear path is the cheapest on CPU), 2 layers, several shards."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    res = invoke("init-random", "--config", "tiny", "--out", str(out), "--dtype", "bf16", "--num-layers", "2",
                 "--max-shard-size", "1MB", "--seed", "5")
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "bf16" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and "quantization_config" not in cfg
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    return out


def test_init_random_fp8_default(tmp_path):
    out = tmp_path / "fp8"
    res = invoke("init-random", "--config", "tiny-ragged", "--out", str(out), "--num-layers", "1")
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8" and cfg["num_hidden_layers"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]


def test_init_random_refuses_what_does_not_fit(tmp_path, monkeypatch):
    """A checkpoint larger than the free space is refused before anything is written (the 671B is ~690 GB),
    with its size, the free space and the ways out; the bytes counted are the shards' (the tiny config's ~4 MB)."""
    free = {"bytes": 1 << 20}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 0, free["bytes"]))
    out = tmp_path / "ck"
    res = CliRunner().invoke(main, ["init-random", "--config", "tiny", "--out", str(out)])
    assert res.exit_code == 2 and "GB free" in res.output and "--num-layers" in res.output
    assert list(tmp_path.iterdir()) == []  # not even the staging directory
    free["bytes"] = 1 << 30
    assert invoke("init-random", "--config", "tiny", "--out", str(out)).exit_code == 0


def run(ckpt: Path, tmp_path: Path, *extra: str, name: str = "out.jsonl", max_seq_len: int = MAX_SEQ_LEN
        ) -> tuple[object, list[dict]]:
    out = tmp_path / name
    res = invoke("run", "--checkpoint", str(ckpt), "--eager", "--device", "cpu", "--max-new-tokens", "4",
                 "--temperature", "0", "--max-seq-len", str(max_seq_len), "--output-file", str(out), *extra)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return res, records


# ---------------------------------------------------------------------- help
def test_main_help():
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in ("init-random", "run", "configs"):
        assert cmd in res.output


def test_commands_run_without_a_cublaslt_workspace_unless_the_user_set_one(monkeypatch):
    """Every dsv3c command sets CUBLASLT_WORKSPACE_SIZE=0 before its first GEMM (dsv3.runtime.gemm_env: the block-scaled
    FP8 GEMMs' statically scheduled kernels, no memset before each), and keeps a value the user exported."""
    import os

    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE", raising=False)
    assert invoke("configs").exit_code == 0
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "0"
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "4096")
    assert invoke("configs").exit_code == 0
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "4096"


def test_init_random_help():
    res = invoke("init-random", "--help")
    assert res.exit_code == 0
    for opt in ("--config", "--out", "--num-layers", "--dtype", "fp8", "bf16", "--seed", "--max-shard-size",
                "--overwrite"):
        assert opt in res.output, opt


def test_run_help():
    res = invoke("run", "--help")
    assert res.exit_code == 0
    for opt in ("--checkpoint", "--eager", "--prompt", "--input-file", "--max-new-tokens", "--temperature",
                "--top-k", "--top-p", "--seed", "--dtype", "float32", "bfloat16", "--max-seq-len", "--output-file"):
        assert opt in res.output, opt


def test_console_script_installed():
    # (no subprocess: starting Python + torch costs seconds; the entry point and the script are what matter)
    eps = [ep for ep in entry_points(group="console_scripts") if ep.name == "dsv3c"]
    assert len(eps) == 1 and eps[0].value == "dsv3.cli:main"
    assert eps[0].load() is main
    exe = Path(sys.executable).parent / "dsv3c"
    assert exe.exists() or shutil.which("dsv3c")


def test_configs_command():
    res = invoke("configs")
    assert res.exit_code == 0
    for n in shipped_config_names():
        assert n in res.output
    assert "sigmoid/noaux_tc fp8" in res.output


# ---------------------------------------------------------------------- init-random + run
def test_run_writes_jsonl(ckpt, tmp_path):
    res, records = run(ckpt, tmp_path, "--prompt", PROMPT)
    assert res.exit_code == 0, res.output
    assert len(records) == 1
    r = records[0]
    assert r["prompt"] == PROMPT
    assert isinstance(r["prompt_token_ids"], list) and all(isinstance(t, int) for t in r["prompt_token_ids"])
    assert r["prompt_token_ids"][0] == 0  # bos (chat template is on by default)
    assert all(isinstance(t, int) and 0 <= t < 1024 for t in r["token_ids"])
    if r["finish_reason"] == "eos":
        assert r["token_ids"][-1] == 1 and len(r["token_ids"]) <= 4
    else:
        assert r["finish_reason"] == "length" and len(r["token_ids"]) == 4
    assert isinstance(r["text"], str)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    assert r["text"] == tok.decode(r["token_ids"], skip_special_tokens=True)
    assert r["prompt_token_ids"] == list(tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False))
    assert r["text"] in res.output


@pytest.mark.parametrize("kind,dtype", [("cli-bf16", "float32"), ("cli-bf16", "bfloat16"), ("fp8", "bfloat16")])
def test_run_greedy_equals_library_generate(ckpt, random_checkpoint, tmp_path, kind, dtype):
    if kind == "fp8":
        ckpt = random_checkpoint("tiny", "fp8", num_layers=2)
    prompts = ["Hello world", "The weather is cold today"]
    args = ["--dtype", dtype]
    for p in prompts:
        args += ["--prompt", p]
    res, records = run(ckpt, tmp_path, *args)
    assert res.exit_code == 0, res.output
    assert [r["prompt"] for r in records] == prompts
    model = dsv3.load(ckpt, dtype=getattr(torch, dtype), max_batch_size=len(prompts), max_seq_len=MAX_SEQ_LEN,
                      progress=False)
    comps, _ = generate(model, [r["prompt_token_ids"] for r in records], max_new_tokens=4,
                        sampling=SamplingParams(temperature=0.0), eos_id=1)
    assert [c.tokens for c in comps] == [r["token_ids"] for r in records]
    assert [c.finish_reason for c in comps] == [r["finish_reason"] for r in records]


def test_run_no_chat_encodes_plain_text(ckpt, tmp_path):
    from transformers import AutoTokenizer

    res, records = run(ckpt, tmp_path, "--no-chat", "--prompt", PROMPT)
    assert res.exit_code == 0, res.output
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    assert records[0]["prompt_token_ids"] == tok.encode(PROMPT)


def test_run_sampling_with_seed_is_reproducible(ckpt, tmp_path):
    extra = ("--prompt", PROMPT, "--temperature", "1.0", "--top-k", "50", "--seed", "3")
    _, a = run(ckpt, tmp_path, *extra, name="a.jsonl")
    _, b = run(ckpt, tmp_path, *extra, name="b.jsonl")
    assert a[0]["token_ids"] == b[0]["token_ids"] and len(a[0]["token_ids"]) >= 1


def test_input_file_plain_lines(ckpt, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\nsecond prompt\n")
    res, records = run(ckpt, tmp_path, "--input-file", str(f))
    assert res.exit_code == 0, res.output
    assert [r["prompt"] for r in records] == ["first prompt", "second prompt"]
    assert all(r["token_ids"] for r in records)


def test_input_file_jsonl(ckpt, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt": "alpha", "id": 1}) + "\n" + json.dumps({"prompt": "beta {x}"}) + "\n")
    res, records = run(ckpt, tmp_path, "--input-file", str(f), "--prompt", "gamma")
    assert res.exit_code == 0, res.output
    assert [r["prompt"] for r in records] == ["gamma", "alpha", "beta {x}"]


def test_input_file_plain_line_starting_with_brace(ckpt, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("{curly} braces in a plain prompt\nsecond prompt\n")
    res, records = run(ckpt, tmp_path, "--input-file", str(f))
    assert res.exit_code == 0, res.output
    assert [r["prompt"] for r in records] == ["{curly} braces in a plain prompt", "second prompt"]


def test_input_file_jsonl_without_prompt_field(ckpt, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "alpha"}) + "\n")
    res, records = run(ckpt, tmp_path, "--input-file", str(f))
    assert res.exit_code == 2
    assert "line 1" in res.output and "prompt" in res.output
    assert records == []


def test_no_prompt_given(ckpt, tmp_path):
    res, _ = run(ckpt, tmp_path)
    assert res.exit_code == 2
    assert "--prompt" in res.output


# ---------------------------------------------------------------------- errors
def test_run_without_eager_fails_clearly(ckpt, tmp_path):
    res = invoke("run", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--output-file", str(tmp_path / "o.jsonl"))
    assert res.exit_code == 2
    assert "--eager" in res.output
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_config_name(tmp_path):
    res = invoke("init-random", "--config", "nonexistent-model", "--out", str(tmp_path / "x"))
    assert res.exit_code == 2
    msg = stderr_of(res)
    assert "nonexistent-model" in msg
    for n in shipped_config_names():
        assert n in msg
    assert "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


def test_bad_max_shard_size(tmp_path):
    res = invoke("init-random", "--config", "tiny", "--out", str(tmp_path / "x"), "--max-shard-size", "lots")
    assert res.exit_code == 2
    assert "--max-shard-size" in res.output


def test_prompt_longer_than_max_seq_len(ckpt, tmp_path):
    res, records = run(ckpt, tmp_path, "--prompt", "a rather long prompt " * 4, max_seq_len=8)
    assert res.exit_code == 2
    msg = stderr_of(res)
    assert "prompt 0 has" in msg and "cache holds 8" in msg and "max_seq_len" in msg
    assert records == []


def test_missing_checkpoint_dir(tmp_path):
    res = invoke("run", "--checkpoint", str(tmp_path / "nope"), "--eager", "--prompt", "x")
    assert res.exit_code == 2
    assert "nope" in res.output


def test_broken_checkpoint_reports_checkpoint_error(ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    (d / "model.safetensors.index.json").write_text("{")
    res, _ = run(d, tmp_path, "--prompt", PROMPT)
    assert res.exit_code == 2
    assert "error:" in stderr_of(res) and "not a valid safetensors index" in stderr_of(res)


def test_interactive_session(ckpt, tmp_path):
    """Turns go through the chat template with the history; /clear forgets it; /exit (or EOF) ends."""
    res = CliRunner().invoke(main, ["run", "--checkpoint", str(ckpt), "--eager", "--interactive", "--dtype",
                                    "float32", "--max-new-tokens", "3"],
                             input="hello there\nand again\n/clear\nfresh start\n/exit\n")
    assert res.exit_code == 0, res.output
    assert res.output.count("tokens]") == 3 and "(conversation cleared)" in res.output


def test_stop_strings_end_a_row(ckpt, tmp_path):
    base = run(ckpt, tmp_path, "--prompt", "hello", "--max-new-tokens", "12", name="base.jsonl")[1][0]
    assert len(base["text"]) > 2
    stop = base["text"][1:3]  # some text the model will produce
    res, records = run(ckpt, tmp_path, "--prompt", "hello", "--max-new-tokens", "12", "--stop", stop)
    assert res.exit_code == 0, res.output
    assert records[0]["finish_reason"] == "stop" and stop not in records[0]["text"]
    assert base["text"].startswith(records[0]["text"])


@pytest.mark.parametrize("name,value", [("DSV3_DECODE_PREP", "fast"), ("DSV3_PREFILL_PREP", "1"),
                                        ("DSV3_PREFILL_PREFIX", "naive"), ("DSV3_PREFILL_DECOMPRESS", "cublas"),
                                        ("DSV3_NORM_QUANT", "yes"),
                                        ("DSV3_NORM_ROUTE", "on"),
                                        ("DSV3_GEMV_VARIANT", "rows:8"), ("DSV3_FP8_GEMM", "cublas")])
def test_compile_refuses_bad_kernel_switch(tmp_path, monkeypatch, name, value):
    """A bad trace-time switch is named before any graph is built (not as a traceback per build process)."""
    monkeypatch.setenv(name, value)
    res = invoke("compile", "--config", "tiny", "--device", "cpu", "--out", str(tmp_path / "art"))
    assert res.exit_code == 2
    msg = stderr_of(res)
    assert name in msg and value in msg and "Traceback" not in res.output
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("config,noted", [("tiny", True), ("fp8", False)])
def test_compile_for_cuda_notes_fp8_for_bf16_weights(tmp_path, monkeypatch, config, noted):
    """`dsv3c compile --device cuda` of a config with BF16 weights (as DeepSeek publishes V2 / V2-Lite) says what
    FP8 gains and how to convert; an FP8 config does not. (The build itself is stubbed: no GPU here.)"""
    import dsv3.compiler.build as build
    from dsv3.config import FP8Quantization, resolve_config

    if config == "fp8":
        config = str(tmp_path / "fp8.json")
        Path(config).write_text(json.dumps(resolve_config("tiny").replace(
            quantization_config=FP8Quantization()).to_hf_dict()))
    built = []
    monkeypatch.setattr(build, "compile_artifacts", lambda opts, out, **kw: built.append(opts))
    res = invoke("compile", "--config", config, "--device", "cuda", "--out", str(tmp_path / "art"))
    assert res.exit_code == 0 and len(built) == 1, res.output
    assert ("dsv3c convert --checkpoint CKPT --out CKPT-fp8 --dtype fp8" in stderr_of(res)) == noted
