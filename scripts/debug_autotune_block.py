"""Build one graph of the 16B FP8 config in this process and, if Inductor's compile-time autotuning block (the
Python code that compiles the package's Triton kernels) does not parse, print the offending lines and save the
block: a diagnostic for "Failed to run autotuning code block: invalid decimal literal".

    python scripts/debug_autotune_block.py OUT_DIR [--layers 2] [--width 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch._inductor.codegen import wrapper as W

from dsv3.compiler.build import CompileOptions, GraphSpec, build_graph
from dsv3.config import FP8Quantization, resolve_config

_original = W.PythonWrapperCodegen.generate_and_run_autotune_block


def _checked(self):
    code = self.kernel_autotune_defs.getvalue() + "\n" + self.kernel_autotune_calls.getvalue()
    try:
        compile(code, "<autotune>", "exec")
    except SyntaxError as e:
        lines = code.splitlines()
        lo = max(0, (e.lineno or 1) - 6)
        print(f"autotune block SyntaxError {e.msg} at line {e.lineno}:", flush=True)
        for i in range(lo, min(len(lines), (e.lineno or 1) + 3)):
            print(f"{i + 1:6d}: {lines[i][:400]}", flush=True)
        Path(OUT, "autotune_block.py").write_text(code)
    return _original(self)


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=16)
    args = ap.parse_args()
    OUT = args.out
    W.PythonWrapperCodegen.generate_and_run_autotune_block = _checked
    cfg = resolve_config("16B").replace(quantization_config=FP8Quantization(), num_hidden_layers=args.layers,
                                        first_k_dense_replace=1)
    opts = CompileOptions(cfg, max_batch_size=8, max_seq_len=4096, batch_sizes=(1,), device="cuda", verify=False)
    spec = GraphSpec(f"prefill_first_1x{args.width}", "prefill", batch=1, first_chunk=True, width=args.width)
    try:
        print(build_graph(opts, spec, Path(args.out)))
    except Exception as e:  # noqa: BLE001 - a diagnostic: say what failed and exit non-zero
        print(f"build failed: {type(e).__name__}: {str(e)[:600]}", file=sys.stderr)
        sys.exit(1)


OUT = "."

if __name__ == "__main__":
    main()
