"""Run under torchrun (gloo): load this rank's part of a checkpoint (HF layout or pre-sharded), write rank 0's
logits to argv[2]."""

import sys

import torch
import torch.distributed as dist

from dsv3.runtime.engine import load_rank_model
from dsv3.runtime.parallel import ParallelPlan


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    plan = ParallelPlan(dist.get_rank(), dist.get_world_size())

    model = load_rank_model(ckpt, plan, dtype=torch.float32, device="cpu", max_batch_size=2, max_seq_len=32,
                            progress=False)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = [model(tokens[:, :8], torch.arange(8))]
        for p in range(8, 12):
            outs.append(model(tokens[:, p: p + 1], torch.tensor([p]), last_only=True))
    if plan.rank == 0:
        torch.save(outs, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
