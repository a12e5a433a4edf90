"""Latency of the collectives one decode step issues, inside a CUDA graph, over NCCL on this host's GPUs.

    torchrun --standalone --nproc-per-node N scripts/allreduce_latency.py OUT.json [hidden] [vocab]

Per batch size (1, 8): COUNT back-to-back all-reduces of [batch, hidden] bf16 (the per-layer attention and MoE
reductions: 2 per layer plus the embedding, 123 on 671B) captured in one CUDA graph, replayed; the per-op latency
is the replay time / COUNT. Two implementations side by side: NCCL (`dist.all_reduce`, what the compiled graphs
call through `_c10d_functional.all_reduce`) and PyTorch's symmetric-memory one-shot all-reduce
(`symm_mem.one_shot_all_reduce_copy`: each rank copies its input into its slot of a peer-mapped buffer, then reads
every peer's slot over NVLink and sums; no NVLink multicast). Each also with a dependent elementwise kernel between
reductions (as in a step, where each reduction waits on the layer before it). Every variant's result is checked
against the exact sum. Also one all-gather of the logits ([batch, vocab / N] fp32 per rank). Rank 0 writes the JSON. Back-to-back reductions with no compute between them are the best case for NCCL's launch pipelining;
in a real step each waits on the layer before it, so treat the result as a lower bound per op.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

# NVLink multicast stays off on the lent hosts (a program that uses it can take the shared GPUs out of service)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

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
    out_path = sys.argv[1]
    hidden = int(sys.argv[2]) if len(sys.argv) > 2 else 7168
    vocab = int(sys.argv[3]) if len(sys.argv) > 3 else 129280
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    ws = dist.get_world_size()
    report = {"world_size": ws, "hidden": hidden, "count": COUNT, "gpu": torch.cuda.get_device_name(),
              "nccl": ".".join(map(str, torch.cuda.nccl.version())), "batches": {}}
    group_name = dist.group.WORLD.group_name
    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(group_name)
        symm = symm_mem.empty(8 * hidden, dtype=torch.bfloat16, device="cuda")
        symm_mem.rendezvous(symm, group_name)
    except Exception as e:  # noqa: BLE001 (report what failed, keep the NCCL numbers)
        report["symm_mem_error"] = f"{type(e).__name__}: {e}"
        symm = None
        if rank == 0:
            print("symmetric memory unavailable:", report["symm_mem_error"], flush=True)
    if symm is not None:
        try:  # what a tensor from the ordinary allocator gives (the runtime's fallback test)
            symm_mem.rendezvous(torch.empty(16, device="cuda"), group_name)
            report["plain_tensor_rendezvous"] = "accepted"
        except Exception as e:  # noqa: BLE001
            report["plain_tensor_rendezvous"] = f"{type(e).__name__}: {str(e)[:200]}"
    for batch in (1, 8):
        # values whose bf16 sum over ranks is exact: small integers
        gen = torch.Generator(device="cuda").manual_seed(batch)  # the same on every rank
        base = torch.randint(-8, 8, (batch, hidden), device="cuda", generator=gen).to(torch.bfloat16)
        x = base * (rank + 1)
        expect = base * (ws * (ws + 1) // 2)
        row = {}

        def check(name, got):
            ok = torch.equal(got.float(), expect.float())
            row[name + "_exact"] = ok
            if not ok and rank == 0:
                print(f"  {name}: WRONG result (max abs diff {(got.float() - expect.float()).abs().max().item()})")

        y = x.clone()
        dist.all_reduce(y)
        check("nccl", y)

        def reduces():
            for _ in range(COUNT):
                dist.all_reduce(x)

        def reduces_dep():
            for _ in range(COUNT):
                y = x.clone()
                dist.all_reduce(y)
                y.mul_(0.5)
        row["nccl_us"] = round(timed_graph(reduces) / COUNT, 2)
        row["nccl_dependent_us"] = round(timed_graph(reduces_dep) / COUNT, 2)
        x.copy_(base * (rank + 1))
        if symm is not None:
            buf = symm[: batch * hidden].view(batch, hidden)
            check("one_shot", torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", group_name))

            def one_shot():
                for _ in range(COUNT):
                    torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", group_name)

            def one_shot_dep():
                y = x
                for _ in range(COUNT):
                    y = torch.ops.symm_mem.one_shot_all_reduce_copy(buf, y, "sum", group_name).mul_(0.5)
            row["one_shot_us"] = round(timed_graph(one_shot) / COUNT, 2)
            row["one_shot_dependent_us"] = round(timed_graph(one_shot_dep) / COUNT, 2)
            # and the result once more, replayed inside a graph
            out = {}

            def once():
                out["y"] = torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", group_name)
            timed_graph(once, reps=3)
            check("one_shot_graph", out["y"])

        logits = torch.randn(batch, vocab // ws, device="cuda")
        gathered = torch.empty(ws * batch, vocab // ws, device="cuda")

        def gather():
            dist.all_gather_into_tensor(gathered, logits)

        row["all_reduce_us"] = row["nccl_us"]  # the key earlier reports used
        row["all_gather_logits_us"] = round(timed_graph(gather), 2)
        report["batches"][str(batch)] = row
        if rank == 0:
            print(f"world size {ws}, batch {batch}: all-reduce [{batch}, {hidden}] bf16, us each ({COUNT} in one "
                  f"graph): " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if rank == 0:
        print({k: v for k, v in report.items() if k != "batches"}, flush=True)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
