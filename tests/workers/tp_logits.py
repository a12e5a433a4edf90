"""Run under torchrun (gloo): load this rank's part of a checkpoint (HF layout or pre-sharded), write rank 0's
logits to argv[2]. argv[3] "one-shot": the plan's one-shot all-reduce (dsv3::one_shot_all_reduce for the decode
steps; on gloo it reduces through the group's all-reduce)."""

import sys

import torch
import torch.distributed as dist

from dsv3.runtime.engine import load_rank_model
from dsv3.runtime.parallel import ParallelPlan


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    one_shot = len(sys.argv) > 3 and sys.argv[3] == "one-shot"
    plan = ParallelPlan(dist.get_rank(), dist.get_world_size(), one_shot_all_reduce=one_shot)

    model = load_rank_model(ckpt, plan, dtype=torch.float32, device="cpu", max_batch_size=2, max_seq_len=32,
                            progress=False)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = [model(tokens[:, :8], torch.arange(8))]
        for p in range(8, 12):
            outs.append(model(tokens[:, p: p + 1], torch.tensor([p]), last_only=True))
    if one_shot:  # the decode steps went through the op, prefill's [2, 8, hidden] through NCCL/gloo's
        assert model.tp_all_reduce.one_shot_buffer.numel() == 2 * model.cfg.hidden_size
    if plan.rank == 0:
        torch.save(outs, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
