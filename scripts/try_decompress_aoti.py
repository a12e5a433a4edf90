"""Which form of the TMA decompression runs inside an AOTInductor package (GPU experiment, forty-fourth session):
the default `_kv_decompress_tma_kernel` (TMA loads and stores) failed there with "CUDA driver error: invalid
argument" while running eagerly. Variants, each as a triton_op in a package of its own, run against its eager
output, then timed eagerly against the pointer kernel:
  store:  the default (descriptors for the cache, the weight and the output)
  loads:  TMA loads, pointer stores (the output and k_pe through out_ptr)

    python3 scripts/try_decompress_aoti.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import zipfile

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from dsv3.kernels import mla_prefill as P
from dsv3.kernels._launch import launch_with_descriptors, num_sms


@triton.jit
def _tma_loads_kernel(
    out_ptr, c_ptr, rows_ptr, pos_ptr, T, C, N, R, S, s_c_b, s_c_t, s_rows, s_pos_b, s_pos_s, s_o_b, s_o_t, progs,
    a_desc, w_desc, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    HAS_ROWS: tl.constexpr, GROUP_T: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    limit = tl.load(pos_ptr + b * s_pos_b + (S - 1) * s_pos_s).to(tl.int32) + 1
    if HAS_ROWS:
        row = tl.load(rows_ptr + b * s_rows).to(tl.int64)
    else:
        row = b
    n_t = tl.minimum(tl.cdiv(limit, BLOCK_T), tl.cdiv(T, BLOCK_T))
    offs_r = tl.arange(0, R_PAD)
    for pt in range(pid, n_t, progs):
        offs_t = pt * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & (offs_r < R)[None, :]
        k_pe = tl.load(c_ptr + row * s_c_b + offs_t[:, None] * s_c_t + C + offs_r[None, :], mask=mask)
        tl.store(out_ptr + b * s_o_b + offs_t[:, None] * s_o_t + N + offs_r[None, :], k_pe, mask=mask)
    row32 = row.to(tl.int32)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_T * n_n
    for tile in tl.range(pid, n_t * n_n, progs, flatten=True):
        first_t = (tile // per_group) * GROUP_T
        size = tl.minimum(n_t - first_t, GROUP_T)
        t0 = (first_t + (tile % per_group) % size) * BLOCK_T
        n0 = ((tile % per_group) // size) * BLOCK_N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            a = a_desc.load([row32, t0, k0]).reshape(BLOCK_T, BLOCK_K)
            acc = tl.dot(a, w_desc.load([n0, k0]).T, acc)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + b * s_o_b + offs_t[:, None] * s_o_t + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_t < T)[:, None] & (offs_n < N)[None, :])


def decompress_loads(latent_cache, input_pos, w, cache_rows=None):
    t_cap, cr = latent_cache.shape[1:]
    bsz = input_pos.shape[0]
    n, c = w.shape
    r = cr - c
    out = torch.empty((bsz, t_cap, n + r), dtype=latent_cache.dtype, device=latent_cache.device)
    rows = input_pos if cache_rows is None else cache_rows
    progs = max(1, num_sms(latent_cache.device) // bsz)
    launch_with_descriptors(
        _tma_loads_kernel, (progs, bsz), {"a_desc": [1, 128, 64], "w_desc": [256, 64]},
        out_ptr=out, c_ptr=latent_cache, rows_ptr=rows, pos_ptr=input_pos, T=t_cap, C=c, N=n, R=r,
        S=input_pos.shape[1], s_c_b=latent_cache.stride(0), s_c_t=latent_cache.stride(1), s_rows=rows.stride(0),
        s_pos_b=input_pos.stride(0), s_pos_s=input_pos.stride(1), s_o_b=out.stride(0), s_o_t=out.stride(1),
        progs=progs, a_desc=latent_cache, w_desc=w, BLOCK_T=128, BLOCK_N=256, BLOCK_K=64, R_PAD=64,
        HAS_ROWS=cache_rows is not None, GROUP_T=8, num_warps=8, num_stages=3)
    return out


@triton_op("dsv3try::decompress_store", mutates_args=())
def decompress_store_op(cache: torch.Tensor, pos: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return P.kv_decompress_triton(cache, pos, w)


@triton_op("dsv3try::decompress_loads", mutates_args=())
def decompress_loads_op(cache: torch.Tensor, pos: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return decompress_loads(cache, pos, w)


for op in (decompress_store_op, decompress_loads_op):
    op.register_fake(lambda cache, pos, w: cache.new_empty((pos.shape[0], cache.shape[1],
                                                            w.shape[0] + cache.shape[2] - w.shape[1])))


class _Mod(torch.nn.Module):
    def __init__(self, op, cache, w):
        super().__init__()
        self.op = op
        self.register_buffer("cache", cache)
        self.register_buffer("w", w)

    def forward(self, pos):
        return self.op(self.cache, pos, self.w)


def graph_us(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    cache = torch.randn(1, 8192, 576, device=dev, generator=g).bfloat16()
    w = (torch.randn(4096, 512, device=dev, generator=g) * 512 ** -0.5).bfloat16()
    pos = (4096 + torch.arange(4096, device=dev))[None]
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["store", "loads"]
    ops = {"store": torch.ops.dsv3try.decompress_store, "loads": torch.ops.dsv3try.decompress_loads}
    for name, op in ((n, ops[n]) for n in names):
        want = op(cache, pos, w)
        print(f"{name}: eager {graph_us(lambda: op(cache, pos, w)):.1f} us", flush=True)
        try:
            mod = _Mod(op, cache, w)
            seq = torch.export.Dim("seq", min=2, max=4096)
            ep = torch.export.export(mod, (pos,), dynamic_shapes=({1: seq},))
            with tempfile.TemporaryDirectory() as tmp:
                path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{tmp}/{name}.pt2")
                out_dir = os.environ.get("OUT")
                if out_dir:  # the package's generated sources, to read offline
                    with zipfile.ZipFile(path) as zf:
                        for member in zf.namelist():
                            if member.endswith((".cpp", ".py", ".json")):
                                dst = os.path.join(out_dir, name, os.path.basename(member))
                                os.makedirs(os.path.dirname(dst), exist_ok=True)
                                with open(dst, "wb") as f:
                                    f.write(zf.read(member))
                runner = torch._inductor.aoti_load_package(path)
                got = runner(pos)
                torch.cuda.synchronize()
            print(f"{name}: package ran, equal to eager: {torch.equal(got, want)}", flush=True)
        except Exception as exc:  # noqa: BLE001 (the experiment's answer)
            print(f"{name}: package failed: {type(exc).__name__}: {str(exc)[-300:]}", flush=True)
            torch.cuda.synchronize()
    ptr = graph_us(lambda: P.kv_decompress_triton(cache, pos, w, block_n=128))
    print(f"pointer kernel: {ptr:.1f} us", file=sys.stdout)


if __name__ == "__main__":
    main()
