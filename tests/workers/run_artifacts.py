"""Under torchrun (gloo): generate greedily from artifacts; rank 0 writes the tokens as JSON to argv[3]."""

import json
import sys

import torch.distributed as dist

from dsv3.generate import generate
from dsv3.runtime.distributed import init_from_env
from dsv3.runtime.engine import artifact_stepper


def main() -> None:
    art, ckpt, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    plan, device = init_from_env("cpu")
    stepper, _ = artifact_stepper(art, ckpt, plan, device, progress=False)
    comps, _ = generate(stepper, prompts, max_new_tokens=8)
    if plan.rank == 0:
        with open(out, "w") as f:
            json.dump([c.tokens for c in comps], f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
