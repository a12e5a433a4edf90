"""Latency of the collectives one decode step issues, inside a CUDA graph, over NCCL on this host's GPUs.

    torchrun --standalone --nproc-per-node N scripts/allreduce_latency.py OUT.json [hidden] [vocab]

Per batch size (1, 8): COUNT back-to-back all-reduces of [batch, hidden] bf16 (the per-layer attention and MoE
reductions: 2 per layer plus the embedding, 123 on 671B) captured in one CUDA graph, replayed; the per-op latency
is the replay time / COUNT. Also one all-gather of the logits ([batch, vocab / N] fp32 per rank). Rank 0 writes
the JSON. Back-to-back reductions with no compute between them are the best case for NCCL's launch pipelining;
in a real step each waits on the layer before it, so treat the result as a lower bound per op.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

COUNT = 123


def timed_graph(body, reps: int = 50) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def main() -> None:
    out = sys.argv[1]
    hidden = int(sys.argv[2]) if len(sys.argv) > 2 else 7168
    vocab = int(sys.argv[3]) if len(sys.argv) > 3 else 129280
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    ws = dist.get_world_size()
    report = {"world_size": ws, "hidden": hidden, "count": COUNT, "gpu": torch.cuda.get_device_name(),
              "nccl": ".".join(map(str, torch.cuda.nccl.version())), "batches": {}}
    for batch in (1, 8):
        x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)

        def reduces():
            for _ in range(COUNT):
                dist.all_reduce(x)

        logits = torch.randn(batch, vocab // ws, device="cuda")
        gathered = torch.empty(ws * batch, vocab // ws, device="cuda")

        def gather():
            dist.all_gather_into_tensor(gathered, logits)

        ar = timed_graph(reduces) / COUNT
        ag = timed_graph(gather)
        report["batches"][str(batch)] = {"all_reduce_us": round(ar, 2), "all_gather_logits_us": round(ag, 2)}
        if rank == 0:
            print(f"world size {ws}, batch {batch}: all-reduce [{batch}, {hidden}] bf16 {ar:.2f} us each "
                  f"({COUNT} in one graph); all-gather of the logits {ag:.2f} us", flush=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
