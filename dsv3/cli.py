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
        from dsv3.model import DeviceMemoryError
        from dsv3.runtime.manifest import ArtifactError
        from dsv3.staging import NoSpaceError

        try:
            return super().invoke(ctx)
        except (ConfigError, CheckpointError, GenerationError, ArtifactError, FileExistsError, NoSpaceError,
                DeviceMemoryError) as e:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
                click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dsv3c")
def main() -> None:
    """dsv3c: take a DeepSeek-V3 / V2 / V2-Lite checkpoint from Hugging Face format to fast generation.

    \b
    Typical use (a GPU host; a real checkpoint directory instead of ckpt/16b):
      dsv3c init-random --config 16B --out ckpt/16b            # a random checkpoint in the real HF layout
      dsv3c compile --config ckpt/16b --out art/16b            # AOT graphs, no weights needed (~10 min)
      dsv3c run --artifacts art/16b --checkpoint ckpt/16b --prompt "Hello"
      dsv3c bench --artifacts art/16b --checkpoint ckpt/16b    # ms/token, TTFT, MFU, against the roofline
    Without a GPU or a build: `dsv3c run --checkpoint ckpt/tiny --eager --prompt "Hello"` on the tiny config.
    Configs: a shipped name (see `dsv3c configs`), a config.json path, or a checkpoint directory.
    """
    from dsv3.runtime.gemm_env import prefer_static_gemm_schedules

    prefer_static_gemm_schedules()  # before any GEMM of the process (dsv3.runtime.gemm_env says why)


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
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="Hugging Face-layout checkpoint directory (config.json, safetensors, tokenizer).")
@click.option("--random-weights", is_flag=True,
              help="With --artifacts, instead of --checkpoint: each rank generates its weights on the device "
                   "(the artifacts' config; for models whose checkpoint does not fit on disk) and uses the "
                   "tokenizer init-random writes.")
@click.option("--artifacts", type=click.Path(file_okay=False),
              help="Artifact directory from `dsv3c compile` (production path: AOT packages + CUDA graphs).")
@click.option("--jit", is_flag=True, help="Compile the same graphs at start-up with torch.compile (development).")
@click.option("--eager", is_flag=True, help="Run the plain eager PyTorch model (the reference path).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text; repeat for a batch.")
@click.option("--input-file", type=click.Path(exists=True, dir_okay=False),
              help="One prompt per line, or JSONL with a \"prompt\" field.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 means off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1.0 means off.")
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--chat/--no-chat", default=None,
              help="Wrap prompts in the tokenizer's chat template (default: on when the tokenizer has one).")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bfloat16", show_default=True,
              help="Activations and non-FP8 weights (--eager/--jit; artifacts fix their own).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--max-seq-len", type=int, default=None, help="Cache capacity per sequence (--eager/--jit).")
@click.option("--batch-sizes", default=None, help="--jit decode buckets (default 1,2,4,... up to the batch).")
@click.option("--prefill-chunk", type=int, default=None,
              help="--jit prefill chunk length [default: 4096, at most the cache length].")
@click.option("--world-size", type=int, default=None,
              help="Run on N ranks (GPUs), started with torchrun; under torchrun it is read from the environment.")
@click.option("--stop", "stops", multiple=True, help="Stop a sequence when its text contains this (repeatable).")
@click.option("--interactive", is_flag=True, help="Chat in the terminal: /clear forgets the conversation, /exit ends.")
@click.option("--output-file", type=click.Path(dir_okay=False), help="Write JSONL: prompt, token ids, text, timings.")
@click.option("--stats", is_flag=True, help="Print load time, time to first token and decode speed.")
def run_cmd(checkpoint: str | None, random_weights: bool, artifacts: str | None, jit: bool, eager: bool,
            prompts: tuple[str, ...],
            input_file: str | None, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
            seed: int | None, chat: bool | None, dtype: str, device: str | None, max_seq_len: int | None,
            batch_sizes: str | None, prefill_chunk: int | None, world_size: int | None, stops: tuple[str, ...],
            interactive: bool, output_file: str | None, stats: bool) -> None:
    """Generate text from a checkpoint: from AOT artifacts (--artifacts), compiled at start-up (--jit), or eager.

    \b
    dsv3c run --artifacts art/16B --checkpoint ckpt/16B --prompt "Hello" --stats
    dsv3c run --artifacts art/671B-tp8 --checkpoint ckpt/671B --world-size 8 --prompt "Hello"
    dsv3c run --artifacts art/671B-tp8 --random-weights --world-size 8 --prompt "Hello" --stats
    Random checkpoints produce nonsense text: they exercise the real code, not a trained model.
    More prompts than the artifacts' max batch size (--input-file with many lines) run as consecutive batches.
    """
    import torch
    from transformers import AutoTokenizer

    from dsv3.generate import SamplingParams, generate_in_batches
    from dsv3.runtime.distributed import init_from_env, maybe_relaunch, shutdown

    if sum([bool(artifacts), jit, eager]) != 1:
        raise click.UsageError("choose one of --artifacts DIR, --jit or --eager")
    if random_weights == bool(checkpoint):
        raise click.UsageError("give --checkpoint CKPT, or --random-weights (with --artifacts)")
    if random_weights and not artifacts:
        raise click.UsageError("--random-weights needs --artifacts DIR (its config.json says what to generate); "
                               "for --eager/--jit write a checkpoint with `dsv3c init-random`")
    if artifacts:  # a missing or partial artifact directory, or another world size, before anything starts
        from dsv3.runtime.manifest import read_manifest

        built = read_manifest(artifacts)["world_size"]
        asked = world_size or 1
        if "LOCAL_RANK" not in os.environ and asked != built:
            raise click.UsageError(f"{artifacts} was compiled for world size {built}, this run asks for {asked}: "
                                   f"run with --world-size {built}, or compile for {asked} "
                                   f"(dsv3c compile ... --world-size {asked})")
    maybe_relaunch(world_size)  # re-executes under torchrun when --world-size N > 1 is asked outside it
    plan, device = init_from_env(device)
    stepper = None
    try:
        echo = click.echo if plan.rank == 0 else (lambda *a, **k: None)
        texts = [] if interactive and not (prompts or input_file) else _read_prompts(prompts, input_file)
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        if plan.world_size > 1 and seed is None and temperature > 0:
            seed = 0  # every rank samples the same token only if all draw from one seed
        tok_dir = Path(checkpoint).resolve() if checkpoint else _random_tokenizer(Path(artifacts))
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
        if use_chat and not getattr(tok, "chat_template", None):
            raise click.UsageError(f"--chat: the tokenizer in {tok_dir} has no chat template")

        def encode(text: str) -> list[int]:
            if use_chat:
                return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False))
            return tok.encode(text)

        encoded = [encode(t) for t in texts]
        batch = max(1, len(encoded))
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        if artifacts:
            from dsv3.runtime.engine import artifact_stepper

            stepper, timings = artifact_stepper(artifacts, checkpoint, plan, device, progress=plan.rank == 0)
            mode = "artifacts"
        else:
            from dsv3.runtime.engine import load_rank_model

            max_seq = max_seq_len or min(4096, _max_positions(checkpoint))
            model = load_rank_model(checkpoint, plan, dtype=getattr(torch, DTYPES[dtype]), device=device,
                                    max_batch_size=batch, max_seq_len=max_seq, progress=plan.rank == 0)
            if jit:
                from dsv3.runtime.engine import jit_stepper

                buckets = _int_list(batch_sizes) if batch_sizes else (batch,)
                stepper, timings = jit_stepper(model, buckets, prefill_chunk or min(4096, max_seq))
                mode = "jit"
            else:
                stepper, mode = model, "eager"
        if hasattr(stepper, "prepare_sampling"):  # a sampled run's loop graph, captured now rather than on request
            # (more prompts than the artifacts' max batch run as consecutive batches)
            stepper.prepare_sampling(sampling, min(batch, stepper.max_batch_size))
            timings["capture_s"] = stepper.capture_s
        load_s = time.perf_counter() - t0

        def should_stop(row: int, tokens: list[int]) -> bool:
            tail = tok.decode(tokens[-32:], skip_special_tokens=True)  # a stop string ends within the last tokens
            return any(s in tail for s in stops)

        def finish_text(tokens: list[int]) -> str:
            text = tok.decode(tokens, skip_special_tokens=True)
            cuts = [text.index(s) for s in stops if s in text]
            return text[: min(cuts)] if cuts else text

        gen_kwargs = dict(max_new_tokens=max_new_tokens, sampling=sampling, eos_id=tok.eos_token_id, seed=seed,
                          should_stop=should_stop if stops else None)
        if interactive:
            _interactive(stepper, tok, encode_turn=lambda history: (
                list(tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False))
                if use_chat else tok.encode(history[-1]["content"])), plan=plan, finish_text=finish_text,
                gen_kwargs=gen_kwargs)
            return

        stream = len(encoded) == 1 and sys.stdout.isatty() and plan.rank == 0
        on_token = _streamer(tok) if stream else None
        if stream:
            click.echo(texts[0], nl=False)
        completions, gen_stats = generate_in_batches(stepper, encoded, on_token=on_token, **gen_kwargs)
        records = []
        for text, comp in zip(texts, completions):
            out_text = finish_text(comp.tokens)
            if not stream:
                echo(f"### prompt: {text}\n{out_text}\n[{comp.finish_reason}, {len(comp.tokens)} tokens]")
            records.append({"prompt": text, "prompt_token_ids": comp.prompt_tokens, "token_ids": comp.tokens,
                            "text": out_text, "finish_reason": comp.finish_reason})
        if stream:
            click.echo(f"\n[{completions[0].finish_reason}, {len(completions[0].tokens)} tokens]")
        timings = {k: round(v, 4) for k, v in timings.items()}
        timings.update(load_s=round(load_s, 4), ttft_s=round(gen_stats.ttft_s, 4),
                       decode_ms_per_token=round(gen_stats.ms_per_token, 3), decode_steps=gen_stats.decode_steps,
                       batches=gen_stats.batches, prefill_s=round(gen_stats.prefill_s, 4))
        if output_file and plan.rank == 0:
            _write_jsonl(output_file, [dict(r, timings=timings) for r in records])
        if stats:
            tps = gen_stats.tokens_per_s
            extra = "".join(f", {k[:-2]} {timings[k]:.2f}s" for k in ("compile_s", "capture_s", "warmup_s")
                            if timings.get(k))
            extra = f" (incl.{extra[1:]})" if extra else ""
            batches = (f"{len(encoded)} prompts in {gen_stats.batches} batches of up to {stepper.max_batch_size}"
                       if gen_stats.batches > 1 else f"batch {len(encoded)}")
            echo(f"load {load_s:.2f}s{extra} | time to first token {gen_stats.ttft_s * 1000:.1f} ms | decode "
                 f"{gen_stats.ms_per_token:.2f} ms/token, {tps:.1f} tokens/s ({batches}, {mode}, {device}, "
                 f"world size {plan.world_size}"
                 + (f", all-reduce {stepper.all_reduce})" if plan.world_size > 1 else ")"))
    finally:
        if sys.exc_info()[0] is None:  # after an error the other ranks may never reach the barrier: just exit
            shutdown(plan, stepper)  # multi-rank: release the CUDA graphs, then leave the NCCL group together


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _random_tokenizer(artifacts: Path) -> Path:
    """The tokenizer init-random would write for the artifacts' config, in a per-user cache directory (written once;
    the same on every rank)."""
    import hashlib
    import tempfile

    from dsv3.config import load_config_file
    from dsv3.tokenizer import write_tokenizer

    cfg = load_config_file(artifacts / "config.json")
    key = hashlib.sha256(f"{cfg.vocab_size}:{cfg.bos_token_id}:{cfg.eos_token_id}".encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"dsv3c-tokenizer-{os.getuid() if hasattr(os, 'getuid') else 0}-{key}"
    if not (out / "tokenizer_config.json").exists():
        write_tokenizer(out, cfg.vocab_size, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    return out


def _streamer(tok):
    """on_token callback printing each row-0 token's text as it arrives (decoding the whole tail keeps multi-byte
    characters intact)."""
    streamed: list[int] = []

    def on_token(row: int, token: int) -> None:
        if row:
            return
        prev = tok.decode(streamed, skip_special_tokens=True)
        streamed.append(token)
        click.echo(tok.decode(streamed, skip_special_tokens=True)[len(prev):], nl=False)

    return on_token


def _interactive(stepper, tok, *, encode_turn, plan, finish_text, gen_kwargs) -> None:
    """Rank 0 reads a line and every rank gets it; the conversation is re-encoded and generated each turn."""
    from dsv3.generate import GenerationError, generate

    history: list[dict[str, str]] = []
    if plan.rank == 0:
        click.echo("interactive: type a message; /clear forgets the conversation, /exit ends")
    while True:
        line = None
        if plan.rank == 0:
            try:
                line = input("> ").strip()
            except EOFError:
                line = "/exit"
        if plan.world_size > 1:
            import torch.distributed as dist

            box = [line]
            dist.broadcast_object_list(box, src=0)
            line = box[0]
        if line == "/exit":
            return
        if line == "/clear":
            history = []
            if plan.rank == 0:
                click.echo("(conversation cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            completions, _ = generate(stepper, [encode_turn(history)], on_token=_streamer(tok) if plan.rank == 0
                                      else None, **gen_kwargs)
        except GenerationError as e:
            history.pop()
            if plan.rank == 0:
                click.echo(f"error: {e}; /clear to start over")
            continue
        answer = finish_text(completions[0].tokens)
        history.append({"role": "assistant", "content": answer})
        if plan.rank == 0:
            click.echo(f"\n[{completions[0].finish_reason}, {len(completions[0].tokens)} tokens]")


def _max_positions(checkpoint: str) -> int:
    return json.loads((Path(checkpoint) / "config.json").read_text()).get("max_position_embeddings", 4096)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None


def _shape_list(text: str | None) -> tuple[tuple[int, int], ...] | None:
    """--short-prefill: 'ROWSxWIDTH,...' -> ((rows, width), ...); 'none' -> (); None -> None (the default)."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        shapes = tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip())
    except ValueError:
        shapes = ((),)
    if not shapes or any(len(rw) != 2 for rw in shapes):
        raise click.BadParameter(f"{text!r}: expected ROWSxWIDTH items, e.g. 1x16,1x32, or none",
                                 param_hint="--short-prefill")
    return shapes


@main.command("compile")
@click.option("--config", "config", required=True, help="Config name, config.json path or checkpoint dir.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory to create.")
@click.option("--world-size", type=int, default=1, show_default=True,
              help="Ranks (GPUs) the artifacts run on; graphs get each rank's TP/EP shard shapes.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Target: cuda packages (build on a GPU like the production one) or cpu packages.")
@click.option("--max-batch-size", type=int, default=8, show_default=True, help="Sequences in flight at once.")
@click.option("--max-seq-len", type=int, default=4096, show_default=True, help="Latent-cache length per sequence.")
@click.option("--batch-sizes", default=None, help="Decode buckets (default 1,2,4,... up to --max-batch-size).")
@click.option("--prefill-chunk", type=int, default=None,
              help="Longest prompt chunk one prefill call takes; longer prompts run in chunks "
                   "[default: 4096, at most --max-seq-len]. Larger chunks stream the expert weights fewer times.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Activation dtype (FP8 weights stay FP8).")
@click.option("--num-layers", type=int, default=None, help="Build only the first N layers (quick trials).")
@click.option("--jobs", type=int, default=None,
              help="Graphs built at once, one process each [default: cuda: as many as the CPU cores (3 per 8 cores) "
                   "and free GPU memory allow; cpu: 1].")
@click.option("--all-reduce", "all_reduce", type=click.Choice(["auto", "nccl", "one-shot"]), default="auto",
              show_default=True,
              help="World size > 1, decode steps' all-reduces: one-shot over NVLink through symmetric memory (one "
                   "kernel instead of a copy + NCCL's; 671B at 8 layers on 2 H200s: 2.0 vs 2.14 ms/token), or "
                   "NCCL's. auto: one-shot for --device cuda, nccl for cpu. Choose nccl for GPUs without "
                   "peer-to-peer access (no NVLink). Prefill always uses NCCL.")
@click.option("--batch1-activations", "batch1_activations", type=click.Choice(["fp8", "bf16"]), default="bf16",
              show_default=True,
              help="FP8 checkpoints, the batch-1 decode graph: bf16 keeps activations in bf16 (W8A16: the FP8 "
                   "weights scaled in the GEMV, the official DeepSeek code's default numerics, no quantization "
                   "step; H200: 671B rank 7% and 16B 2% faster per step); fp8 quantizes them per token per 128 "
                   "channels before each FP8 GEMV (W8A8, as every other graph). Other graphs are W8A8 either way.")
@click.option("--short-prefill", "short_prefill", default=None, metavar="ROWSxWIDTH,...|none",
              help="First-chunk graphs of static shape for short prompts, e.g. 1x16,1x32: a prompt of up to WIDTH "
                   "tokens is padded to it and replayed from that graph (with a static token count the routed "
                   "experts take the decode path or sparse grouped tiles, FP8 linears up to 64 tokens the GEMV: "
                   "16B on the H200, a 14-token prompt's first token ~2.5 ms sooner, 8 prompts of 14 ~1.8 ms). "
                   "Each is one more package to build. 'none': only the dynamic graphs. [default: cuda 1x16,1x32, "
                   "plus 1x64,1x256,8x16,8x32 where the experts take sparse tiles (FP8 16B on one GPU); cpu none]")
@click.option("--no-verify", is_flag=True, help="Skip loading every package in a fresh process to check it.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def compile_cmd(config: str, out: str, world_size: int, device: str, max_batch_size: int, max_seq_len: int,
                batch_sizes: str | None, prefill_chunk: int | None, dtype: str, num_layers: int | None, jobs: int | None,
                all_reduce: str, batch1_activations: str, short_prefill: str | None, no_verify: bool,
                overwrite: bool) -> None:
    """Capture prefill and decode graphs into AOTInductor packages plus a manifest; no weights needed.

    \b
    The output directory holds one decode package per batch bucket, two prefill packages of dynamic chunk length
    (a prompt's first chunk, the chunks after it), first-chunk packages of static shape for short prompts
    (--short-prefill), config.json and manifest.json (versions, host, expected weight shapes, sha256 of every
    file). It appears only when complete and verified. Run it with `dsv3c run --artifacts DIR --checkpoint CKPT`.

    \b
    Kernel choices are made from the static shapes and measured tables; these environment variables pin them
    at build time (recorded in the manifest, shown by `dsv3c inspect`; docs/KERNELS.md has the measurements):
      DSV3_DECODE_PREP=fused|torch   decode: MLA's norm, RoPE, cache write and W_UK absorption in one kernel
                                     (default fused) or as the torch ops + absorb kernel
      DSV3_PREFILL_PREP=fused|torch  prefill: MLA's norm, RoPE and cache write in one kernel (default fused)
                                     or as the torch ops
      DSV3_NORM_QUANT=fused|torch    FP8 MoE layers: residual add + norm + FP8 quantization in one kernel
                                     (default fused) or as the torch ops + a quantization kernel
      DSV3_NORM_ROUTE=fused|torch    FP8 MoE layers, 1-4 tokens: that kernel also computes the router logits
                                     (default fused) or the router runs its own logits kernel
      DSV3_GEMV_VARIANT=NAME[:BLOCK_N:WARPS:STAGES]   decode FP8 GEMV variant (default: the tuned table)
      DSV3_GEMV_TABLE=sweep_gemv.json                 a GEMV table measured by scripts/sweep_gemv.py
      DSV3_MOE_DECODE=UP_BN:UP_WARPS:UP_STAGES:DOWN_BN:DOWN_WARPS:DOWN_STAGES   MoE decode launch plan
      DSV3_FP8_GEMM=auto|gemv|scaled_mm|triton        FP8 linear path
    """
    from dsv3.compiler.build import CompileOptions, compile_artifacts

    cfg = resolve_config(config)
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.num_hidden_layers:
            raise click.BadParameter(f"must be between 1 and {cfg.num_hidden_layers}", param_hint="--num-layers")
        cfg = cfg.replace(num_hidden_layers=num_layers, first_k_dense_replace=min(cfg.first_k_dense_replace,
                                                                                   num_layers))
    buckets = _int_list(batch_sizes) if batch_sizes else tuple(
        b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch_size) + (max_batch_size,)
    opts = CompileOptions(cfg, world_size=world_size, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                          batch_sizes=buckets, prefill_chunk=prefill_chunk or min(4096, max_seq_len), dtype=dtype, device=device,
                          verify=not no_verify, jobs=jobs, all_reduce=all_reduce,
                          batch1_activations=batch1_activations, short_prefill=_shape_list(short_prefill))
    compile_artifacts(opts, out, overwrite=overwrite, echo=click.echo)
    if device == "cuda" and not cfg.is_fp8:
        # the published V2 / V2-Lite weights are BF16: say what FP8 gains before the user deploys these artifacts
        click.echo("note: this config has BF16 weights (no quantization_config); FP8 decodes ~1.5x faster on the H200 "
                   "(16B: 1.62 vs 2.41 ms/token, docs/BENCHMARKS.md). To use FP8: dsv3c convert --checkpoint CKPT "
                   "--out CKPT-fp8 --dtype fp8, then compile --config CKPT-fp8.", err=True)


@main.command("inspect")
@click.argument("artifact_dir", type=click.Path(file_okay=False))
def inspect_cmd(artifact_dir: str) -> None:
    """Print an artifact directory's manifest and check every file against its sha256."""
    from dsv3.runtime.manifest import read_manifest, verify_files

    m = read_manifest(artifact_dir)
    h = m["host"]
    click.echo(f"artifacts   {artifact_dir}")
    click.echo(f"config      {m['config_name'] or '?'} (hash {m['config_hash']})")
    click.echo(f"target      {m['device']}, world size {m['world_size']}, {m['dtype']} activations"
               + (f", {m.get('all_reduce', 'nccl')} all-reduce" if m["world_size"] > 1 else "")
               + (", batch-1 FP8 layers on bf16 activations (W8A16)"
                  if m.get("batch1_activations", "fp8") == "bf16" else ""))
    click.echo(f"cache       max batch {m['max_batch_size']}, max seq {m['max_seq_len']}, "
               f"prefill chunk <= {m['prefill_chunk']}")
    click.echo("graphs      " + ", ".join(m["graphs"]))
    click.echo(f"built       {m['built_at']} with torch {h['torch']}, CUDA {h['cuda']}, triton {h['triton']}"
               + (f", on {h['gpu']} (sm {'.'.join(map(str, h['compute_capability']))})" if h.get('gpu') else "")
               + f", CPU {h['machine']}/{h['cpu_capability']}")
    overrides = m.get("kernel_overrides") or {}
    click.echo("kernels     " + (", ".join(f"{k}={v}" for k, v in overrides.items()) + " (pinned at build time)"
                                 if overrides else "default choices (no DSV3_* overrides at build time)"))
    wall = m.get("build_wall_seconds", sum(m["build_seconds"].values()))
    click.echo(f"build time  {wall:.1f}s before verification ({m.get('build_jobs', 1)} graph(s) at a time); "
               f"stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in m["build_seconds"].items()))
    n = len(m["rank_weights"]["tensors"])
    click.echo(f"weights     {n} tensors per rank (names, shapes, dtypes in manifest.json)")
    lay = m.get("rank_layout") or {}
    parts = ([f"shared experts as {lay['shared_expert_slots']} extra expert slot(s)"]
             if lay.get("shared_expert_slots") else []) + (
            ["q and kv_a projections fused"] if lay.get("fused_qkv_a_proj") else []) + (
            [f"gate and up fused in {lay['fused_gate_up_proj']} MLP(s)"] if lay.get("fused_gate_up_proj") else []) + (
            [f"{lay['prefill_copies']} prefill copies of weights"] if lay.get("prefill_copies") else [])
    click.echo("layout      " + ("; ".join(parts) if parts else "as in the checkpoint"))
    size = sum(f["bytes"] for f in m["files"].values())
    click.echo(f"files       {len(m['files'])}, {size / 1e6:.1f} MB")
    verify_files(artifact_dir, m)
    click.echo("integrity   ok (every sha256 matches)")


@main.command("convert")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False),
              help="Hugging Face-layout checkpoint directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to create.")
@click.option("--world-size", type=int, default=None, help="Pre-shard into one file per rank for N ranks.")
@click.option("--dtype", type=click.Choice(["bf16", "fp8"]), default=None,
              help="bf16: dequantize an FP8 checkpoint to BF16 in HF layout (loads in transformers as it is). "
                   "fp8: quantize a BF16 checkpoint (V2, V2-Lite as published) to DeepSeek-V3's FP8 format, "
                   "e4m3 weights with 128x128 block scales (the FP8 kernels, half the weight bytes).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="--dtype fp8: where the block quantization runs (auto: the GPU if there is one; same result).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def convert_cmd(checkpoint: str, out: str, world_size: int | None, dtype: str | None, device: str,
                overwrite: bool) -> None:
    """Pre-shard a checkpoint per rank (fast rank loading), dequantize FP8 to BF16, or quantize BF16 to FP8.

    \b
    dsv3c convert --checkpoint ckpt/671B --out ckpt/671B-tp8 --world-size 8
    dsv3c convert --checkpoint ckpt/671B --out ckpt/671B-bf16 --dtype bf16
    dsv3c convert --checkpoint DeepSeek-V2-Lite --out ckpt/16B-fp8 --dtype fp8
    Streams one tensor at a time; the output directory appears only when complete.
    """
    import torch

    from dsv3.runtime.convert import convert_to_bf16, convert_to_fp8, convert_to_ranks

    if (world_size is None) == (dtype is None):
        raise click.UsageError("give exactly one of --world-size N (pre-shard), --dtype bf16 (dequantize) or "
                               "--dtype fp8 (quantize); to pre-shard a quantized checkpoint, convert twice")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    t0 = time.perf_counter()
    if dtype == "bf16":
        path = convert_to_bf16(checkpoint, out, overwrite=overwrite)
    elif dtype == "fp8":
        path = convert_to_fp8(checkpoint, out, overwrite=overwrite, device=device)
    else:
        path = convert_to_ranks(checkpoint, out, world_size, overwrite=overwrite)
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    click.echo(f"wrote {path} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")


@main.command("bench")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), help="Checkpoint to load.")
@click.option("--random-weights", is_flag=True, help="No checkpoint: random weights generated on the device.")
@click.option("--config", "config", default=None, help="With --random-weights: the config (name or path).")
@click.option("--artifacts", type=click.Path(file_okay=False), help="Benchmark the AOT packages in this directory.")
@click.option("--jit", is_flag=True, help="Benchmark torch.compile graphs compiled at start-up.")
@click.option("--eager", is_flag=True, help="Benchmark the eager model.")
@click.option("--batch-sizes", default="1,8", show_default=True)
@click.option("--context", "contexts", default="128,4096", show_default=True, help="Cache lengths to decode at.")
@click.option("--prompt-len", "prompt_lens", default="512", show_default=True,
              help="Prompt lengths to prefill, comma-separated: each one's time to first token (median of 3), "
                   "tokens/s and MFU, e.g. 14,4096 (a short request's latency and a long prompt's throughput).")
@click.option("--steps", type=int, default=32, show_default=True, help="Decode steps per point (median).")
@click.option("--num-layers", type=int, default=None, help="With --random-weights: only the first N layers.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bfloat16", show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--baseline", type=click.Choice(["hf"]), default=None,
              help="Also time transformers' DeepseekV3ForCausalLM on the same weights and print the ratio.")
@click.option("--baseline-checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="BF16 checkpoint for --baseline hf (default --checkpoint; `dsv3c convert --dtype bf16` makes one).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the full report as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False),
              help="Write a plot of decode ms/token vs context (ours, the roofline and the --baseline): .svg (no "
                   "plotting library needed) or .png (needs matplotlib).")
@click.option("--stub-collectives", is_flag=True,
              help="Artifacts built for world size N > 1: run rank 0 alone on this device, its all-reduces and "
                   "all-gathers stubbed (no data moves): the rank's compute and memory time per step. Add the "
                   "collectives' latency (scripts/allreduce_latency.py) for the real step.")
def bench_cmd(checkpoint: str | None, random_weights: bool, config: str | None, artifacts: str | None, jit: bool,
              eager: bool, batch_sizes: str, contexts: str, prompt_lens: str, steps: int, num_layers: int | None,
              dtype: str, device: str | None, baseline: str | None, baseline_checkpoint: str | None,
              json_out: str | None, plot_out: str | None, stub_collectives: bool) -> None:
    """Decode ms/token and prefill speed per batch size and context, next to the bandwidth roofline.

    \b
    dsv3c bench --artifacts art/16B --checkpoint ckpt/16B --batch-sizes 1,8 --context 128,4096
    dsv3c bench --random-weights --config 16B --jit --num-layers 4
    dsv3c bench --artifacts art/16B --random-weights --batch-sizes 1,8   (weights generated on the device)
    dsv3c bench --artifacts art/671B-tp8 --random-weights --stub-collectives   (one rank of 8, on one GPU)
    The roofline: bytes one step must read on this rank (non-expert weights, the experts a batch selects under
    random routing, the latent cache up to the context) over the copy bandwidth measured in the same run.
    """
    import torch

    from dsv3.runtime import bench
    from dsv3.runtime.engine import artifact_stepper, jit_stepper, load_rank_model
    from dsv3.runtime.manifest import read_manifest
    from dsv3.runtime.parallel import ParallelPlan

    if sum([bool(artifacts), jit, eager]) != 1:
        raise click.UsageError("choose one of --artifacts DIR, --jit or --eager")
    if random_weights == bool(checkpoint) or (random_weights and not (config or artifacts)):
        raise click.UsageError("give --checkpoint CKPT, or --random-weights with --config NAME (with --artifacts "
                               "DIR the artifacts' config is used)")
    if artifacts and config:
        raise click.UsageError("--config: with --artifacts the config is the one the artifacts were built for")
    if plot_out:
        try:  # before the benchmark runs, not after
            bench.check_plot_path(plot_out)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    buckets, ctxs, lengths = _int_list(batch_sizes), _int_list(contexts), _int_list(prompt_lens)
    if not lengths or min(lengths) < 1:
        raise click.BadParameter(f"{prompt_lens!r}: prompt lengths must be at least 1", param_hint="--prompt-len")
    max_seq = max(max(ctxs), max(lengths)) + steps + 2
    plan = ParallelPlan(0, 1)
    if artifacts:
        built_ws = read_manifest(artifacts)["world_size"]
        if built_ws > 1 and not stub_collectives:
            raise click.UsageError(f"{artifacts} was built for world size {built_ws}: bench runs one process; "
                                   "add --stub-collectives to time rank 0 alone (or use `dsv3c run --world-size`)")
        if built_ws > 1:
            from dsv3.runtime.distributed import stub_process_group

            stub_process_group(built_ws)
            click.get_current_context().call_on_close(_destroy_process_group)
            plan = ParallelPlan(0, built_ws)
            if baseline:
                raise click.UsageError("--baseline with --stub-collectives: the baseline runs the whole model")
            click.echo(f"rank 0 of {built_ws}, collectives stubbed: compute and memory time of one rank per step")
    elif stub_collectives:
        raise click.UsageError("--stub-collectives needs --artifacts built for world size > 1")
    t0 = time.perf_counter()
    timings: dict = {}
    if artifacts:
        stepper, timings = artifact_stepper(artifacts, checkpoint, plan, device)
        model = stepper.model
    else:
        if random_weights:
            from dsv3.runtime.parallel import build_rank_model
            from dsv3.runtime.random_weights import fill_random_

            cfg = resolve_config(config)
            if num_layers:
                cfg = cfg.replace(num_hidden_layers=num_layers,
                                  first_k_dense_replace=min(cfg.first_k_dense_replace, num_layers))
            model = fill_random_(build_rank_model(cfg, plan, dtype=getattr(torch, DTYPES[dtype]), device=device,
                                                  max_batch_size=max(buckets), max_seq_len=max_seq))
        else:
            model = load_rank_model(checkpoint, plan, dtype=getattr(torch, DTYPES[dtype]), device=device,
                                    max_batch_size=max(buckets), max_seq_len=max_seq)
        if jit:
            stepper, timings = jit_stepper(model, buckets, min(512, max_seq))
        else:
            from dsv3.generate import EagerStepper

            stepper = EagerStepper(model)
    load_s = time.perf_counter() - t0
    # the trace-time kernel switches behind these numbers: the artifacts' (fixed at build time) or this process's
    overrides = (read_manifest(artifacts).get("kernel_overrides") or {}) if artifacts else {
        k: v for k, v in sorted(os.environ.items()) if k.startswith("DSV3_")}
    if os.environ.get("CUBLASLT_WORKSPACE_SIZE", "0") != "0":  # dsv3c's default is 0 (dsv3.runtime.gemm_env)
        overrides = {**overrides, "CUBLASLT_WORKSPACE_SIZE": os.environ["CUBLASLT_WORKSPACE_SIZE"]}
    if overrides:
        click.echo("kernel switches " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    bw = bench.copy_bandwidth(torch.device(device))
    click.echo(f"copy bandwidth {bw / 1e12:.3f} TB/s (measured) | load {load_s:.2f}s "
               + " ".join(f"{k} {v:.2f}s" for k, v in timings.items() if v))
    decode = bench.bench_decode(stepper, model, buckets, ctxs, steps, bw, echo=click.echo)
    cuda = device.startswith("cuda")
    # the model's peak memory, not the FP8 GEMM measurements' (their 8192^2 operands and outputs): the peak up to
    # here, then again over the prefills
    model_peak = torch.cuda.max_memory_allocated() if cuda else 0
    peak = bench.fp8_gemm_peak(torch.device(device))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prefill = [bench.bench_prefill(stepper, model, min(n, stepper.max_seq_len - 1), echo=click.echo, fp8_peak=peak)
               for n in lengths]
    if cuda:
        model_peak = max(model_peak, torch.cuda.max_memory_allocated())
    sustained = bench.fp8_gemm_sustained(torch.device(device)) if prefill and peak else None
    if sustained:
        bench.add_sustained_mfu(prefill, sustained, echo=click.echo)
    report = {"mode": "artifacts" if artifacts else ("jit" if jit else "eager"), "device": device,
              "world_size": plan.world_size, "collectives": "stubbed" if plan.world_size > 1 else "none",
              "config": model.cfg.name, "copy_bandwidth_Bps": bw, "load_s": load_s, "timings": timings,
              "decode": decode, "prefill": prefill, "kernel_overrides": overrides}
    if baseline == "hf":
        source = baseline_checkpoint or checkpoint
        if not source:
            raise click.UsageError("--baseline hf needs --baseline-checkpoint (a BF16 checkpoint) with --random-weights")
        del stepper, model  # free the device for the baseline
        hf = bench.bench_hf(source, device, buckets, ctxs, steps, echo=click.echo)
        for ours, theirs in zip(decode, hf):
            click.echo(f"batch {ours.batch} context {ours.context}: dsv3c {ours.ms_per_token:.3f} ms vs hf "
                       f"{theirs['ms_per_token']:.3f} ms -> {theirs['ms_per_token'] / ours.ms_per_token:.1f}x")
        report["baseline_hf"] = hf
    if cuda:
        report["peak_memory_bytes"] = model_peak
        click.echo(f"peak GPU memory {model_peak / 2**30:.2f} GiB (load, decode, prefill)")
    if json_out:
        bench.write_json(json_out, report)
    if plot_out:
        if not decode:
            raise click.ClickException("--plot: no decode point was measured (see the skip lines above)")
        bench.write_plot(plot_out, report)
        click.echo(f"wrote {plot_out}")


@main.command("export-onnx")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="Checkpoint directory (only the block's tensors are read; FP8 ones are dequantized).")
@click.option("--config", "config", default=None,
              help="Config name or path instead of a checkpoint: random weights as init-random writes them.")
@click.option("--block", required=True,
              type=click.Choice(["attention", "dense-mlp", "shared-expert", "dense-layer", "router"]),
              help="attention: MLA prefill (no cache); dense-mlp / dense-layer: layers < first_k_dense_replace; "
                   "shared-expert / router: MoE layers.")
@click.option("--layer", required=True, type=int, help="Decoder layer index.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--opset", type=click.Choice(["20", "23"]), default="20", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weights and activations in the graph (bf16 does not run in onnxruntime's CPU provider).")
@click.option("--seq-len", type=int, default=16, show_default=True, help="Example sequence length (axes stay dynamic).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="onnx.checker full check, then onnxruntime CPU vs the PyTorch block on random inputs.")
@click.option("--keep-fp8", is_flag=True,
              help="Keep FP8 projections as e4m3 initializers + block scales; dsv3.fp8_linear becomes plain ONNX "
                   "(float8 Cast, block-scale Gather, per-128 activation quantization, MatMul).")
def export_onnx_cmd(checkpoint: str | None, config: str | None, block: str, layer: int, out: str, opset: str,
                    dtype: str, seq_len: int, verify: bool, keep_fp8: bool) -> None:
    """Export one dense block of one layer as ONNX (dynamic batch and sequence), verified in onnxruntime.

    Initializers carry the checkpoint tensor names; metadata_props hold the config, layer, block and source.
    Exits non-zero when the verified error is above the tolerance (relative 1e-4 for fp32, 1e-2 for fp16).
    """
    from dsv3.export.onnx_export import export_onnx, format_summary, format_verify

    if (checkpoint is None) == (config is None):
        raise click.UsageError("give exactly one of --checkpoint or --config")
    result = export_onnx(block=block, layer=layer, out=out, checkpoint=checkpoint, config=config, opset=int(opset),
                         dtype=dtype, seq_len=seq_len, do_verify=verify, keep_fp8=keep_fp8)
    click.echo(f"wrote {result.path} ({block}, layer {layer}, {dtype}, opset {opset})")
    click.echo(format_summary(result.summary))
    if result.verify is not None:
        click.echo(format_verify(result.verify))
        if not result.ok:
            sys.exit(1)


def _write_jsonl(path: str, records: list[dict]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
