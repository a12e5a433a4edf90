"""`dsv3c`: the command line. Each command's --help says what it does and what it needs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from dsv3.config import ConfigError, resolve_config, shipped_config_names

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


class _Group(click.Group):
    """Turns the project's expected errors into one clear line and exit code 2, not a traceback."""

    def invoke(self, ctx: click.Context):
        from dsv3.checkpoint import CheckpointError
        from dsv3.generate import GenerationError

        try:
            return super().invoke(ctx)
        except (ConfigError, CheckpointError, GenerationError, FileExistsError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dsv3c")
def main() -> None:
    """dsv3c: take a DeepSeek-V3 / V2 / V2-Lite checkpoint from Hugging Face format to fast generation.

    \b
    Typical use:
      dsv3c init-random --config tiny --out ckpt/tiny     # a random checkpoint in the real HF layout
      dsv3c run --checkpoint ckpt/tiny --eager --prompt "Hello"
    Configs: a shipped name (see `dsv3c configs`), a config.json path, or a checkpoint directory.
    """


@main.command("configs")
def configs_cmd() -> None:
    """List the shipped configs with their main dimensions."""
    click.echo(f"{'name':<14}{'layers':>7}{'hidden':>8}{'heads':>6}{'experts':>9}{'top-k':>6}  routing")
    for name in shipped_config_names():
        c = resolve_config(name)
        click.echo(f"{name:<14}{c.num_hidden_layers:>7}{c.hidden_size:>8}{c.num_attention_heads:>6}"
                   f"{c.n_routed_experts:>9}{c.num_experts_per_tok:>6}  {c.scoring_func}/{c.topk_method}"
                   f"{' fp8' if c.is_fp8 else ''}")


@main.command("init-random")
@click.option("--config", "config", required=True, help="Config name, config.json path or checkpoint dir.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to create.")
@click.option("--num-layers", type=int, default=None, help="Keep only the first N decoder layers.")
@click.option("--dtype", type=click.Choice(["fp8", "bf16"]), default="fp8", show_default=True,
              help="fp8: block-quantized projections with weight_scale_inv, as DeepSeek ships V3; bf16: plain.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def init_random_cmd(config: str, out: str, num_layers: int | None, dtype: str, seed: int, max_shard_size: str,
                    overwrite: bool) -> None:
    """Write a random checkpoint in exactly the Hugging Face layout (shards + index, config.json, tokenizer).

    Weights are scaled so activations stay finite through every layer. A bf16 checkpoint of a V3-style
    config loads in transformers' DeepseekV3ForCausalLM as it is. The directory appears only when complete.
    """
    from dsv3.init_random import parse_size, write_random_checkpoint

    cfg = resolve_config(config)
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    t0 = time.perf_counter()
    try:
        path = write_random_checkpoint(cfg, out, dtype=dtype, seed=seed, num_layers=num_layers,
                                       max_shard_size=shard_bytes, overwrite=overwrite)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    size = sum(f.stat().st_size for f in path.iterdir())
    click.echo(f"wrote {path} ({size / 1e6:.1f} MB, {dtype}) in {time.perf_counter() - t0:.1f}s")


def _read_prompts(prompts: tuple[str, ...], input_file: str | None) -> list[str]:
    """--prompt values, then --input-file: JSONL records with a "prompt" field, or one plain prompt per line."""
    out = list(prompts)
    if input_file:
        jsonl = input_file.endswith(".jsonl")
        for i, line in enumerate(Path(input_file).read_text().splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and "prompt" in record:
                out.append(str(record["prompt"]))
            elif jsonl:
                raise click.BadParameter(f"line {i + 1}: JSONL lines need a \"prompt\" field",
                                         param_hint="--input-file")
            else:
                out.append(line)
    if not out:
        raise click.UsageError("give --prompt TEXT (repeatable) or --input-file FILE")
    return out


@main.command("run")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False),
              help="Hugging Face-layout checkpoint directory (config.json, safetensors, tokenizer).")
@click.option("--eager", is_flag=True, help="Run the plain eager PyTorch model (the reference path).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text; repeat for a batch.")
@click.option("--input-file", type=click.Path(exists=True, dir_okay=False),
              help="One prompt per line, or JSONL with a \"prompt\" field.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 means off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1.0 means off.")
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--chat/--no-chat", default=None,
              help="Wrap prompts in the tokenizer's chat template (default: on when the tokenizer has one).")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bfloat16", show_default=True,
              help="Activation dtype and dtype of the non-FP8 weights.")
@click.option("--device", default=None, help="cpu or cuda[:N] (default: cuda when available).")
@click.option("--max-seq-len", type=int, default=None, help="Cache capacity per sequence (default 4096).")
@click.option("--output-file", type=click.Path(dir_okay=False), help="Write JSONL: prompt, token ids, text, timings.")
@click.option("--stats", is_flag=True, help="Print load time, time to first token and decode speed.")
def run_cmd(checkpoint: str, eager: bool, prompts: tuple[str, ...], input_file: str | None, max_new_tokens: int,
            temperature: float, top_k: int, top_p: float, seed: int | None, chat: bool | None, dtype: str,
            device: str | None, max_seq_len: int | None, output_file: str | None, stats: bool) -> None:
    """Generate text from a checkpoint.

    This build runs the eager model (--eager); the AOT-artifact and --jit paths come with the compiler and
    runtime. Random checkpoints produce nonsense text: they exercise the real code, not a trained model.
    """
    import torch
    from transformers import AutoTokenizer

    import dsv3
    from dsv3.generate import SamplingParams, generate

    if not eager:
        raise click.UsageError("this build runs checkpoints with --eager only (AOT artifacts and --jit are not "
                               "available yet); add --eager")
    texts = _read_prompts(prompts, input_file)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tok = AutoTokenizer.from_pretrained(str(Path(checkpoint).resolve()))
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    if use_chat and not getattr(tok, "chat_template", None):
        raise click.UsageError(f"--chat: the tokenizer in {checkpoint} has no chat template")

    def encode(text: str) -> list[int]:
        if use_chat:
            return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
        return tok.encode(text)

    encoded = [encode(t) for t in texts]
    t0 = time.perf_counter()
    model = dsv3.load(checkpoint, dtype=getattr(torch, DTYPES[dtype]), device=device,
                      max_batch_size=len(encoded), max_seq_len=max_seq_len)
    load_s = time.perf_counter() - t0

    stream = len(encoded) == 1 and sys.stdout.isatty()
    streamed: list[int] = []

    def on_token(row: int, token: int) -> None:
        if stream:
            prev = tok.decode(streamed, skip_special_tokens=True)
            streamed.append(token)
            click.echo(tok.decode(streamed, skip_special_tokens=True)[len(prev):], nl=False)

    if stream:
        click.echo(texts[0], nl=False)
    completions, gen_stats = generate(model, encoded, max_new_tokens=max_new_tokens, sampling=sampling,
                                      eos_id=tok.eos_token_id, seed=seed, on_token=on_token)
    records = []
    for text, comp in zip(texts, completions):
        out_text = tok.decode(comp.tokens, skip_special_tokens=True)
        if not stream:
            click.echo(f"### prompt: {text}\n{out_text}\n[{comp.finish_reason}, {len(comp.tokens)} tokens]")
        records.append({"prompt": text, "prompt_token_ids": comp.prompt_tokens, "token_ids": comp.tokens,
                        "text": out_text, "finish_reason": comp.finish_reason})
    if stream:
        click.echo(f"\n[{completions[0].finish_reason}, {len(completions[0].tokens)} tokens]")
    timings = {"load_s": round(load_s, 4), "ttft_s": round(gen_stats.prefill_s, 4),
               "decode_ms_per_token": round(gen_stats.ms_per_token, 3), "decode_steps": gen_stats.decode_steps}
    if output_file:
        _write_jsonl(output_file, [dict(r, timings=timings) for r in records])
    if stats:
        tps = 1000 / gen_stats.ms_per_token * len(encoded) if gen_stats.decode_steps else float("nan")
        click.echo(f"load {load_s:.2f}s | time to first token {gen_stats.prefill_s * 1000:.1f} ms | decode "
                   f"{gen_stats.ms_per_token:.2f} ms/token, {tps:.1f} tokens/s (batch {len(encoded)}, eager, {device})")


def _write_jsonl(path: str, records: list[dict]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
