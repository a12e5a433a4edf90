"""Does v1 `torch._scaled_mm` (the AOTInductor path of dsv3.kernels.fp8_linear) take a weight whose N is not a
multiple of 128 as it is, with ceil(N/128) scale rows? Today the weight is padded with zero rows per call (16B's
fused q / kv_a projection, N = 3648: ~160 us per 4095-token prefill). Eager and inside an AOTInductor package, each
result compared with the padded call (bitwise) and with a float64 reference.

    python scripts/try_scaled_mm_ragged_n.py
"""

from __future__ import annotations

import sys
import tempfile

import torch

sys.path.insert(0, "tests")
from kernel_checks import fp8_ref64  # noqa: E402

from dsv3.kernels.fp8_blocks import quantize_weight  # noqa: E402
from dsv3.kernels.fp8_linear import act_quant  # noqa: E402


class RaggedMM(torch.nn.Module):
    def forward(self, xq, xs, w, s):
        return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s.float().t(), out_dtype=torch.bfloat16)


def padded(xq, xs, w, s):
    pad = s.shape[0] * 128 - w.shape[0]
    wp = torch.nn.functional.pad(w.view(torch.uint8), (0, 0, 0, pad)).view(w.dtype)
    return torch._scaled_mm(xq, wp.t(), scale_a=xs, scale_b=s.float().t(), out_dtype=torch.bfloat16)[:, :w.shape[0]]


def main() -> None:
    torch.manual_seed(0)
    for n, k in ((3648, 2048), (2112, 7168), (576, 2048)):
        w, s = quantize_weight(torch.randn(n, k, device="cuda") * 0.05)
        x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = act_quant(x, pad_rows_to=4, scales_m_major=True, pad_k=True)
        ref = padded(xq, xs, w, s)
        exact = fp8_ref64(x, w, s)
        rel = lambda a: ((a.double() - exact).norm() / exact.norm()).item()  # noqa: E731
        print(f"N {n} K {k}: padded call rel err {rel(ref):.2e}")
        try:
            got = RaggedMM()(xq, xs, w, s)
            print(f"  eager ragged: shape {tuple(got.shape)}, bitwise equal to padded {torch.equal(got, ref)}, "
                  f"rel err {rel(got):.2e}")
        except Exception as e:  # noqa: BLE001
            print(f"  eager ragged: {type(e).__name__}: {str(e)[:300]}")
            continue
        try:
            m = torch.export.Dim("m", min=64, max=8192)
            ep = torch.export.export(RaggedMM(), (xq, xs, w, s), dynamic_shapes=({0: m}, {0: m}, None, None))
            with tempfile.TemporaryDirectory() as d:
                runner = torch._inductor.aoti_load_package(
                    torch._inductor.aoti_compile_and_package(ep, package_path=f"{d}/r.pt2"))
                got = runner(xq, xs, w, s)
            print(f"  AOTI ragged: bitwise equal to padded {torch.equal(got, ref)}, rel err {rel(got):.2e}")
        except Exception as e:  # noqa: BLE001
            print(f"  AOTI ragged: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
