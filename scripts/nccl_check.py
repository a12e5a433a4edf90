"""Multi-GPU check for the device: torchrun --nproc-per-node N scripts/nccl_check.py ARTIFACTS CHECKPOINT OUT_JSON

The N ranks run world-size-N artifacts (tensor + expert parallel over NCCL, decode in CUDA graphs) on two prompts
of different lengths: prefill, then decode steps on the greedy tokens. Rank 0 then runs the world-size-1 eager
model on GPU 0, teacher-forced on the same tokens, and compares the logits of every step. With FP8 activations
and MoE routing on random weights, one rounding unit anywhere moves the logits visibly (docs/DESIGN.md), so the
comparison is against the eager model's own noise floor: the same run with the embedding table perturbed by one
bf16 rounding unit. Passes when the median per-row relative L2 error is within max(2e-2, 2 x the noise median).
Also times world-size-N decode steps (CUDA graphs) at batch 2.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from dsv3.generate import EagerStepper
from dsv3.runtime.distributed import init_from_env, shutdown
from dsv3.runtime.engine import artifact_stepper, load_rank_model
from dsv3.runtime.parallel import ParallelPlan
from dsv3.runtime.verify import _row_errors

STEPS = 8


@torch.inference_mode()
def teacher_forced(stepper, prompts, forced: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], list]:
    """Prefill + STEPS decode steps; feeds `forced[i]` at step i when given, else the greedy token."""
    # .clone(): a CUDA-graph stepper returns a view of its static output buffer, rewritten by the next step
    logits = [stepper.prefill(prompts).float().clone()]
    fed = []
    pos = torch.tensor([len(p) for p in prompts], device=logits[0].device)
    for i in range(STEPS):
        tok = forced[i] if forced is not None else logits[-1].argmax(-1)
        fed.append(tok)
        logits.append(stepper.decode(tok, pos).float().clone())
        pos = pos + 1
    return logits, fed


def main() -> None:
    art, ckpt, out = sys.argv[1:4]
    plan, device = init_from_env(os.environ.get("DSV3_DEVICE", "cuda"))  # DSV3_DEVICE=cpu: gloo dry run
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    stepper, timings = artifact_stepper(art, ckpt, plan, device, progress=False)
    g = torch.Generator().manual_seed(0)
    vocab = stepper.model.cfg.vocab_size
    prompts = [[0] + torch.randint(1, vocab, (40,), generator=g).tolist(),
               [0] + torch.randint(1, vocab, (17,), generator=g).tolist()]
    got, fed = teacher_forced(stepper, prompts, None)
    # decode timing at batch 2 (bucket padding included), CUDA graphs replayed
    tok, pos = fed[-1], torch.tensor([len(p) + STEPS for p in prompts], device=device)
    n_timed = min(32, stepper.max_seq_len - max(len(p) for p in prompts) - STEPS - 1)  # stay inside the cache
    sync()
    t0 = time.perf_counter()
    for _ in range(n_timed):
        tok = stepper.decode(tok, pos).argmax(-1)
        pos = pos + 1
    sync()
    decode_ms = (time.perf_counter() - t0) / n_timed * 1e3
    dist.barrier()
    if plan.rank == 0:
        ref_model = load_rank_model(ckpt, ParallelPlan(0, 1), dtype=stepper.model.dtype, device=device,
                                    max_batch_size=2, max_seq_len=stepper.max_seq_len, progress=False)
        ref, _ = teacher_forced(EagerStepper(ref_model), prompts, fed)
        ref_model.reset_caches()
        w = ref_model.embed_tokens.weight
        eps = torch.finfo(w.dtype).eps
        w.mul_(1 + eps * torch.randn(w.shape, generator=torch.Generator(device=w.device).manual_seed(1),
                                     device=w.device).to(w.dtype))
        noisy, _ = teacher_forced(EagerStepper(ref_model), prompts, fed)
        err = torch.cat([_row_errors(a, b) for a, b in zip(got, ref)])
        noise = torch.cat([_row_errors(a, b) for a, b in zip(noisy, ref)])
        top1 = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(got, ref)]).mean().item()
        bound = max(2e-2, 2 * noise.median().item())
        res = {"world_size": plan.world_size, "rows": err.numel(), "median_err": err.median().item(),
               "max_err": err.max().item(), "median_noise": noise.median().item(), "max_noise": noise.max().item(),
               "bound": bound, "top1_agree": top1, "ok": err.median().item() <= bound,
               "decode_ms_per_step_b2": round(decode_ms, 3), "timings": timings}
        print(json.dumps(res, indent=1))
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    shutdown(plan, stepper)


if __name__ == "__main__":
    main()
