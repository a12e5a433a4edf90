"""`torchrun --nproc-per-node N -m dsv3.runtime --artifacts DIR --checkpoint CKPT ...`: the `dsv3c run` command."""

from dsv3.cli import run_cmd

if __name__ == "__main__":
    run_cmd()
