"""Does a host-side TMA descriptor survive a `triton_op` through torch.compile and an AOTInductor package?

`dsv3.kernels._launch.launch_with_descriptors` records the launch HOP with its descriptor table (what torch's own
`wrap_triton` leaves empty). This probe runs one small op that reads a 3-D FP8 tensor through a [1, 128, 128] box
(the grouped MoE down kernel's weight box) and scales it, four ways: eager, `wrap_triton` enabled eagerly (the HOP's
own launch), torch.compile(fullgraph=True), and an AOTInductor package with a dynamic leading size run at two
sizes; every output is compared bitwise with the plain torch result.

    python scripts/try_tma_op.py            # on the GPU
    TRITON_INTERPRET=1 python scripts/try_tma_op.py --cpu   # the eager forms under the interpreter
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from dsv3.kernels._launch import launch_with_descriptors


@triton.jit
def _scale_rows_kernel(w_desc, s_ptr, y_ptr, E, D, I, BLOCK_N: tl.constexpr):
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, 128)
    s = tl.load(s_ptr + e)
    for kb in range(0, tl.cdiv(I, 128)):
        w = w_desc.load([e, pid_n * BLOCK_N, kb * 128]).reshape(BLOCK_N, 128)
        cols = kb * 128 + offs_i
        tl.store(y_ptr + e * D * I + offs_r[:, None] * I + cols[None, :], w.to(tl.float32) * s,
                 mask=(offs_r < D)[:, None] & (cols < I)[None, :])


def _launch(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    e, d, i = w.shape
    y = torch.empty((e, d, i), dtype=torch.float32, device=w.device)
    launch_with_descriptors(_scale_rows_kernel, (e, triton.cdiv(d, 128)), {"w_desc": [1, 128, 128]},
                            w_desc=w, s_ptr=s, y_ptr=y, E=e, D=d, I=i, BLOCK_N=128, num_warps=4)
    return y


@triton_op("dsv3probe::scale_rows", mutates_args=())
def scale_rows(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return _launch(w, s)


@scale_rows.register_fake
def _(w, s):
    return w.new_empty(w.shape, dtype=torch.float32)


def reference(w, s):
    return w.float() * s[:, None, None]


def make(e, d, i, device):
    w = (torch.randn(e, d, i, device=device) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(e, device=device) + 0.5
    return w, s


def check(name, got, want):
    ok = torch.equal(got, want)
    print(f"{name}: {'bitwise equal' if ok else 'DIFFERS, max abs ' + str((got - want).abs().max().item())}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="eager forms only, under TRITON_INTERPRET=1")
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    ok = True
    w, s = make(3, 200, 1408, device)   # D past a whole box (zero fill), I ragged in no way: 11 blocks
    from torch._library.triton import set_wrap_triton_enabled

    with set_wrap_triton_enabled(False):
        ok &= check("eager, direct launch", scale_rows(w, s), reference(w, s))
    if args.cpu:  # the interpreter's kernels are not traceable: the HOP paths need the GPU
        print("ALL OK" if ok else "FAILED")
        return 0 if ok else 1
    with set_wrap_triton_enabled(True):  # the launch HOP run eagerly (what a direct call outside an op does)
        ok &= check("eager, through the HOP", _launch(w, s), reference(w, s))
    compiled = torch.compile(lambda a, b: scale_rows(a, b) + 1.0, fullgraph=True)
    ok &= check("torch.compile", compiled(w, s), reference(w, s) + 1.0)

    class M(torch.nn.Module):
        def forward(self, a, b):
            return scale_rows(a, b) + 1.0

    e_dim = torch.export.Dim("e", min=2, max=64)
    ep = torch.export.export(M(), (w, s), dynamic_shapes=({0: e_dim}, {0: e_dim}))
    with tempfile.TemporaryDirectory() as tmp:
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp, "p.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        for e in (3, 7, 5):
            w2, s2 = make(e, 200, 1408, device)
            ok &= check(f"AOTInductor package, E={e}", runner(w2, s2), reference(w2, s2) + 1.0)
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
