"""A/B the grouped (prefill) MoE path of this tree against another version of kernels/routed_experts.py, side by
side in one process on the GPU: outputs compared with torch.equal, whole op timed in CUDA graphs, interleaved
rounds.

    git show REF:kernels/routed_experts.py > /tmp/old_routed_experts.py      # on the development machine
    python3 scripts/ab_grouped_moe.py --old /tmp/old_routed_experts.py [--t 4096] [--rounds 5] [--json out.json]

The old file's kernels and launcher are imported from a copy cut before its first `@triton_op` (registering the
`dsv3::` ops twice would fail); its own imports (`dsv3.kernels.fp8_linear`, `_launch`, ...) are this tree's, so the
file must not depend on helpers this tree has since removed. Shapes (FP8 weights, bf16 activations, random
distinct routing, as `scripts/sweep_prefill.py`): 16B (64 routed + 2 shared slots, top-6 + 2, D 2048, I 1408) and
one rank of 671B at world size 8 (32 local experts, 1 id per token, D 7168, I 2048). Each round times both modules
(`dsv3.kernels.bench.graph_us`, 3 calls per graph), alternating which goes first; the median per module is
reported with TFLOP/s (2 x 3 x D x I per pair). Inputs: `sweep_prefill.moe_inputs`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_prefill import MOE_SHAPES, moe_inputs  # noqa: E402


def load_old(path: str, name: str = "routed_experts"):
    """The kernels and launchers of an old copy of kernels/NAME.py, cut before its first `@triton_op`."""
    src = open(path).read()
    cut = src.find("\n@triton_op(")
    if cut < 0:
        raise SystemExit(f"{path}: no '@triton_op(' found; is it a copy of kernels/{name}.py?")
    fd, tmp = tempfile.mkstemp(prefix=f"ab_old_{name}_", suffix=".py")
    with os.fdopen(fd, "w") as f:  # triton.jit reads kernel sources from a real file
        f.write(src[:cut] + "\n")
    spec = importlib.util.spec_from_file_location(f"ab_old_{name}", tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed_old_new(calls: dict, rounds: int, flops: float) -> dict:
    """calls {'old': fn, 'new': fn} timed in CUDA graphs of 3 calls (`dsv3.kernels.bench.graph_us`), `rounds`
    rounds alternating which goes first: {'old'/'new': {us (median), tflops, rounds}, 'speedup': old / new}."""
    from dsv3.kernels.bench import graph_us

    times = {k: [] for k in calls}
    for r in range(rounds):
        for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
            times[k].append(graph_us([calls[k]] * 3))
    out = {}
    for k in calls:
        us = statistics.median(times[k])
        out[k] = dict(us=round(us, 1), tflops=round(flops / us / 1e6, 1), rounds=[round(v, 1) for v in times[k]])
    out["speedup"] = round(out["old"]["us"] / out["new"]["us"], 3)
    return out


def timed_env_switch(name: str, fn, rounds: int, flops: float, old: str = "off", new: str = "on") -> dict:
    """fn() with the trace-time switch `name` at `old` and at `new` (read at each eager call): outputs compared
    bitwise, both timed by `timed_old_new`; the switch is unset afterwards. {outputs_equal, old, new, speedup}."""
    def call(mode):
        os.environ[name] = mode
        return fn()

    calls = {"old": lambda: call(old), "new": lambda: call(new)}
    try:
        equal = torch.equal(calls["old"](), calls["new"]())
        return dict(outputs_equal=equal, **timed_old_new(calls, rounds, flops))
    finally:
        os.environ.pop(name, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="a copy of kernels/routed_experts.py to compare against")
    ap.add_argument("--shapes", default=",".join(MOE_SHAPES), help=f"comma-separated, of {list(MOE_SHAPES)}")
    ap.add_argument("--t", type=int, default=4096, help="tokens")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    from dsv3.kernels import routed_experts as new

    old = load_old(opts.old)
    rows = []
    for name in opts.shapes.split(","):
        x, idx, wt, w, flops = moe_inputs(name, opts.t)
        mods = {"old": old, "new": new}
        calls = {k: (lambda m=m: m.routed_experts_triton(x, idx, wt, *w, grouped=True)) for k, m in mods.items()}
        outs = {k: c() for k, c in calls.items()}
        equal = torch.equal(outs["old"], outs["new"])
        ref = new.routed_experts_reference(x[:64], idx[:64], wt[:64], *w).double()
        ref_err = {k: ((o[:64].double() - ref).norm() / ref.norm()).item() for k, o in outs.items()}
        row = dict(shape=name, t=opts.t, outputs_equal=equal, ref_rel_err=ref_err,
                   **timed_old_new(calls, opts.rounds, flops))
        rows.append(row)
        print(f"{name} T={opts.t}: old {row['old']['us']:.1f} us ({row['old']['tflops']:.0f} TFLOP/s), new "
              f"{row['new']['us']:.1f} us ({row['new']['tflops']:.0f} TFLOP/s): {row['speedup']:.3f}x; outputs "
              f"{'equal' if equal else 'DIFFER'}; rel err vs reference (64 tokens) old {ref_err['old']:.2e} new "
              f"{ref_err['new']:.2e}; rounds old {row['old']['rounds']} new {row['new']['rounds']}", flush=True)
    if opts.json:
        from dsv3.kernels.bench import save_json
        save_json(opts.json, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows))


if __name__ == "__main__":
    main()
