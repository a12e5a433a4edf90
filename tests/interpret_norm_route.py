"""`dsv3.add_rms_norm_quant_route`'s fused kernel run by the Triton CPU interpreter against the op's reference
(`dsv3.add_rms_norm_quant` then `dsv3.route`). Run in its own process with TRITON_INTERPRET=1
(tests/test_norm_route.py does). h + delta lie on a coarse grid (`test_norm.grid_inputs`), so y, y_q and y_scale
are bitwise the reference's; routing is compared as tests/interpret_router.py does (exactly, except tokens within
1e-5 of a flip: the logits are summed in another order than the reference's fp32 GEMM). By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/interpret_norm_route.py
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interpret_norm_route.py must run in its own process with TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv3.kernels import norm_route as NR  # noqa: E402
from dsv3.kernels import rms_norm as N  # noqa: E402
from dsv3.kernels import router as R  # noqa: E402
import interpret_kernels as IK  # noqa: E402
from interpret_router import CONFIGS, check, decision_margin  # noqa: E402
from test_norm import grid_inputs  # noqa: E402

fixed_interpreter = IK.fixed_interpreter
EPS = 1e-6


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("t", [1, 2, 4])
@pytest.mark.parametrize("name,d,n_shared", [("16B", 256, 2), ("236B", 200, 0), ("671B", 384, 0),
                                             ("tiny-ragged", 200, 1)])
def test_fused_kernel(name, d, n_shared, t, fixed_interpreter):
    e, args = CONFIGS[name]
    gen = torch.Generator().manual_seed(e + d + t)
    h, delta, norm_w = grid_inputs(t, d, torch.bfloat16, gen)
    rw = (torch.randn(e, d, generator=gen) * d ** -0.5).bfloat16()
    bias = torch.rand(e, generator=gen) * 0.1 if args["group_top2"] else None
    got = NR.add_rms_norm_quant_route_triton(h, delta, norm_w, EPS, rw, bias, **args, n_shared=n_shared)
    ref = N.add_rms_norm_quant_reference(h, delta, norm_w, EPS)
    for a, b in zip(got[:4], ref):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    y = ref[1]
    idx, wt = got[4:]
    k = args["top_k"]
    assert idx.shape == (t, k + n_shared)
    ids = torch.arange(e, e + n_shared).expand(t, n_shared)
    assert torch.equal(idx[:, k:], ids) and torch.equal(wt[:, k:], torch.ones(t, n_shared))
    check((idx[:, :k], wt[:, :k]), R.route_reference(y, rw, bias, **args), decision_margin(y, rw, bias, **args))


@pytest.mark.parametrize("block_e,num_warps", [(1, 1), (4, 2), (16, 4)])
def test_launch_configs_and_leading_dims(block_e, num_warps, fixed_interpreter):
    """[B, S, D] rows, h a strided view, BLOCK_E not dividing E (the last program's experts masked)."""
    e, args = CONFIGS["tiny-ragged"]
    gen = torch.Generator().manual_seed(block_e)
    h, delta, norm_w = grid_inputs(4, 200, torch.bfloat16, gen)
    wide = torch.zeros(4, 216, dtype=torch.bfloat16)
    wide[:, 16:] = h
    hv = wide[:, 16:].reshape(2, 2, 200)
    rw = (torch.randn(e, 200, generator=gen) * 0.07).bfloat16()
    bias = torch.rand(e, generator=gen) * 0.1
    got = NR.add_rms_norm_quant_route_triton(hv, delta.view(2, 2, 200), norm_w, EPS, rw, bias, **args,
                                             block_e=block_e, num_warps=num_warps)
    ref = N.add_rms_norm_quant_reference(h.view(2, 2, 200), delta.view(2, 2, 200), norm_w, EPS)
    for a, b in zip(got[:4], ref):
        assert a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    y = ref[1].reshape(4, 200)
    check(got[4:], R.route_reference(y, rw, bias, **args), decision_margin(y, rw, bias, **args))
