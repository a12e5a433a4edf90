"""`torchrun --nproc-per-node N -m dsv3.runtime --artifacts DIR --checkpoint CKPT ...`: the `dsv3c run` command."""

import sys

from dsv3.cli import main

if __name__ == "__main__":
    main(args=["run", *sys.argv[1:]], prog_name="python -m dsv3.runtime")
