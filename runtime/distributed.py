"""Process-group set-up for `dsv3c run`: one rank per GPU under torchrun (NCCL), or gloo on CPU."""

from __future__ import annotations

import os
import sys

import torch

from dsv3.runtime.parallel import ParallelPlan


def maybe_relaunch(world_size: int | None) -> None:
    """`--world-size N` outside torchrun: re-execute this command as N ranks under torchrun (rank 0 prints)."""
    if not world_size or world_size == 1 or "LOCAL_RANK" in os.environ:
        return
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--world-size") if "--world-size" in argv else None
    if i is not None:
        del argv[i: i + 2]
    else:
        argv = [a for a in argv if not a.startswith("--world-size=")]
    if argv and argv[0] == "run":
        argv = argv[1:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
           "-m", "dsv3.runtime", *argv]
    os.execv(sys.executable, cmd)


def init_from_env(device: str | None) -> tuple[ParallelPlan, str]:
    """(plan, this rank's device) from torchrun's environment; a single process gets world size 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world_size == 1:
        return ParallelPlan(0, 1), device
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return ParallelPlan(rank, world_size), device


def shutdown(plan: ParallelPlan, *holders: object) -> None:
    """End a multi-rank run cleanly: finish queued work, free the CUDA graphs (they hold NCCL work captured from
    this process group) before the group goes, then leave together. Without this a rank can sit in the NCCL
    communicator's teardown at interpreter exit. A no-op at world size 1."""
    if plan.world_size == 1:
        return
    import gc

    import torch.distributed as dist

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    for h in holders:
        if hasattr(h, "release_graphs"):  # GraphStepper; the eager model holds no graphs
            h.release_graphs()
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def stub_process_group(world_size: int) -> None:
    """A stand-in process group of `world_size` in this one process (torch's fake backend): every collective
    returns at once and moves no data, so one rank's graphs run (and can be timed) alone. Not for real runs."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
