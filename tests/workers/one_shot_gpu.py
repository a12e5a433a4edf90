"""Under torchrun with one GPU per rank (NCCL): dsv3::one_shot_all_reduce through a symmetric buffer, eager and
replayed in a CUDA graph, against the float64 sum of every rank's input; rank 0 writes a JSON report to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

import dsv3.collectives as coll
from dsv3.runtime.distributed import init_from_env
from dsv3.runtime.parallel import AllReduce


def main() -> None:
    plan, device = init_from_env("cuda")
    ws, hidden = plan.world_size, 7168
    reducer = AllReduce(plan.group_name, 8 * hidden, torch.bfloat16, device)
    plain = reducer.one_shot_buffer
    report = {"symmetric": reducer.use_symmetric_memory_(), "checks": []}
    report["plain_is_symmetric"] = coll.is_symmetric(plain, plan.group_name)
    for batch in (1, 3, 8):
        # every rank draws every rank's input (same seed), so each can form the float64 reference
        gen = torch.Generator(device=device).manual_seed(100 + batch)
        inputs = [torch.randn(batch, 1, hidden, generator=gen, device=device).to(torch.bfloat16) for _ in range(ws)]
        want = torch.stack([t.double() for t in inputs]).sum(0)
        x = inputs[plan.rank].clone()
        eager = reducer(x)
        static_out = {}
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            reducer(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out["y"] = reducer(x)
        x.copy_(inputs[plan.rank])
        static_out["y"].fill_(float("nan"))  # poisoned: the replay must write every element
        graph.replay()
        torch.cuda.synchronize()
        for name, got in (("eager", eager), ("graph", static_out["y"])):
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            report["checks"].append({"batch": batch, "path": name, "max_rel_err": err,
                                     "finite": bool(torch.isfinite(got).all())})
        del graph
    if plan.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
