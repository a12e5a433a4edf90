"""Under torchrun: load artifacts with random weights (generated on each rank), run a prefill of two prompts and
DECODE_STEPS teacher-forced decode steps (fixed tokens, so two runs stay comparable whatever they would sample);
rank 0 saves the fp32 logits of every step ([2, vocab] each) with torch.save to argv[2]."""

import sys

import torch

from dsv3.runtime.distributed import init_from_env, shutdown
from dsv3.runtime.engine import artifact_stepper

DECODE_STEPS = 6


def main() -> None:
    art, out = sys.argv[1], sys.argv[2]
    plan, device = init_from_env(None)
    stepper, _ = artifact_stepper(art, None, plan, device, progress=False)
    prompts = [[0, 5, 9, 13, 200, 7, 81, 44, 3, 17, 99, 12], [0, 33, 8]]
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        logits = [stepper.prefill(prompts).float().cpu()]
        for step in range(DECODE_STEPS):
            tokens = torch.randint(1, 1000, (2,), generator=g).to(device)
            positions = torch.tensor([len(p) + step for p in prompts], device=device)
            logits.append(stepper.decode(tokens, positions).float().cpu())
    if plan.rank == 0:
        torch.save({"logits": logits, "all_reduce": stepper.all_reduce}, out)
    shutdown(plan, stepper)


if __name__ == "__main__":
    main()
