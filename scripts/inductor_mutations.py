"""Which arguments Inductor believes each decode MoE kernel writes (runs on a CPU: Triton IR for sm_90, no GPU).

    python scripts/inductor_mutations.py            # per kernel: the arguments taken as written
    python scripts/inductor_mutations.py --copies   # per decode shape: copies Inductor keeps in the op's graph
    python scripts/inductor_mutations.py --schedule # the grouped tile schedule's two kernels: the arguments written
    python scripts/inductor_mutations.py --positions # the MLA kernels that read input_pos: the arguments written

torch's `identify_accessed_tensors` / `identify_mutated_tensors` (what `wrap_triton` functionalization uses) marks an
argument as written when a store's address is derived from it; a value loaded in the kernel's own body ends that
chain, but the result of a called `@triton.jit` function counts as derived from every argument of the call. The up
and down kernels once took their expert and pair rows from a helper given `idx_ptr` and were taken to write `idx`
(and the schedule), so where a later kernel (the combine) still read the ids Inductor kept the original with a copy
kernel before the "writer"; they load the ids themselves now (`_expert_columns` takes the loaded values).
tests/test_kernel_access.py checks every launch of the tiny models' generation on the GPU the same way. `--copies`
functionalizes `routed_experts_triton` on fake CUDA tensors, runs Inductor's reinplacing pass and prints the copies
left (tests/test_kernels.py asserts there are none). A diagnostic, not part of the runtime.
"""

from __future__ import annotations

import logging
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget


class _Sm90Driver:
    """Stands in for the CUDA driver: the analysis only asks it for the compile target."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


def decode_copies(t: int, e: int, i: int, d: int, k: int = 8, pairs: bool = False) -> list[str]:
    """The kernel arguments Inductor still copies before a kernel of `routed_experts_triton` (FP8, T = t tokens,
    ids produced inside the graph as the router's are) after functionalization and its reinplacing pass. pairs: the
    model's default form, the op without its combine (`routed_experts_pairs`) and `combine_pairs` reading the same
    ids after it in the graph."""
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functionalize

    from dsv3.kernels import _launch
    from dsv3.kernels import routed_experts as RE

    def body(x, ids, wt, g, u, dn, sg, su, sd, xq, xs):
        ids = ids + 0
        if pairs:
            y = RE.routed_experts_triton(x, ids, None, g, u, dn, sg, su, sd, x_q=xq, x_scale=xs, combine=False)
            return y, ids * 2, wt  # combine_pairs reads the ids after the op (its indexing does not trace here)
        return RE.routed_experts_triton(x, ids, wt, g, u, dn, sg, su, sd, x_q=xq, x_scale=xs)

    fp8, kb_d, kb_i = torch.float8_e4m3fn, -(-d // 128), -(-i // 128)
    sms, cap = RE.num_sms, _launch.capability
    RE.num_sms = lambda dev: 132
    _launch.capability = lambda dev: (9, 0)  # an H200: the kernels take their TMA descriptor forms, as on the device
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            c = dict(device="cuda")
            args = (torch.empty(t, d, dtype=torch.bfloat16, **c), torch.empty(t, k, dtype=torch.int64, **c),
                    torch.empty(t, k, **c), torch.empty(e, i, d, dtype=fp8, **c), torch.empty(e, i, d, dtype=fp8, **c),
                    torch.empty(e, d, i, dtype=fp8, **c), torch.empty(e, kb_i, kb_d, **c),
                    torch.empty(e, kb_i, kb_d, **c), torch.empty(e, kb_d, kb_i, **c),
                    torch.empty(t, d, dtype=fp8, **c), torch.empty(t, kb_d, **c))
            gm = make_fx(functionalize(body), tracing_mode="fake")(*args)
    finally:
        RE.num_sms, _launch.capability = sms, cap
    reinplace_inplaceable_ops_core(gm.graph)
    return [f"kernel {n.kwargs['kernel_idx']}: {name}" for n in gm.graph.nodes
            if "triton_kernel_wrapper_functional" in str(n.target) for name in n.kwargs["tensors_to_clone"]]


def schedule_writes() -> dict[str, list[str]]:
    """The arguments the analysis takes each kernel of the grouped schedule (`moe_schedule`) to write, at the 16B
    prefill's 4095 x 8 pairs. The scatter must write only the schedule: its store addresses derive from the keys it
    loads, so it reads them from the count kernel's private copy rather than from the routing ids."""
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors

    from dsv3.kernels import moe_schedule as MS

    p, e, e_pad, n_chunks, n_tiles = 4095 * 8, 66, 128, 32, 578
    ids, keys = torch.empty(p, dtype=torch.int64), torch.empty(n_chunks * MS.CHUNK, dtype=torch.int32)
    counts, sched = torch.empty(n_chunks, e_pad, dtype=torch.int32), torch.empty(3 * n_tiles + p, dtype=torch.int32)
    cases = {
        "_schedule_count_kernel": (MS._schedule_count_kernel, dict(
            idx_ptr=ids, keys_ptr=keys, counts_ptr=counts, P=p, E=e, CHUNK_=MS.CHUNK, E_PAD=e_pad)),
        "_schedule_scatter_kernel": (MS._schedule_scatter_kernel, dict(
            keys_ptr=keys, counts_ptr=counts, sched_ptr=sched, P=p, E=e, n_chunks=n_chunks, n_tiles=n_tiles,
            CHUNK_=MS.CHUNK, E_PAD=e_pad, COUNT_ROWS_=MS.COUNT_ROWS, TILE_ROWS_=MS.TILE_ROWS, BLOCK_T=64)),
    }
    return {name: sorted(w.name for w in identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes)
            for name, (kernel, kwargs) in cases.items()}


def _analysed_writes(kernel, tensors: dict, constexprs: dict, descriptors: dict | None = None) -> list[str]:
    """identify_accessed_tensors on `kernel` with these tensors and constexprs; every other parameter an int 32 (a
    size or stride, specialized as divisible by 16 as a real launch's would be) or, for eps / scale_log2, a float.
    descriptors: {parameter: block shape} for the tensors passed as host-side TMA descriptors (as
    `launch_with_descriptors` records them); torch expands each into the TTIR's descriptor, size and stride
    parameters only where it believes the device has TMA, so that check is answered yes here (no GPU)."""
    import torch._higher_order_ops.triton_kernel_wrap as tkw
    import torch.utils._triton as torch_triton
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors

    torch_triton.has_triton_tensor_descriptor_host_tma = lambda: True
    tma = {name: tkw.create_tma_stable_metadata(list(block)) for name, block in (descriptors or {}).items()}
    kwargs = {}
    for name in kernel.arg_names:
        if name in tensors:
            kwargs[name] = tensors[name]
        elif name in constexprs:
            kwargs[name] = constexprs[name]
        else:
            kwargs[name] = 1e-6 if name in ("eps", "scale_log2") else 32
    return sorted(w.name for w in identify_accessed_tensors(kernel, kwargs, tma).read_writes.writes)


def positions_writes() -> dict[str, list[str]]:
    """The arguments the analysis takes the MLA kernels that read input_pos (and cache_rows) to write, at 16B shapes
    (16 heads, C 512, rope 64). None may be input_pos or cache_rows: a helper returning values derived from them into a
    store address made the analysis take them as written (the prefill prep kernel's first multi-token form, whose
    compiled graphs then failed; `_mla_fwd_kernel` through its former `_block_bounds` helper)."""
    from dsv3.kernels import mla_attention as MA
    from dsv3.kernels import mla_decode_prep as MP

    bf, f32, i64 = torch.bfloat16, torch.float32, torch.int64

    def t(dtype):
        return torch.empty(64, dtype=dtype)

    prep = dict(q_ptr=t(bf), kv_ptr=t(bf), nw_ptr=t(bf), cos_ptr=t(f32), sin_ptr=t(f32), cache_ptr=t(bf),
                pos_ptr=t(i64), rows_ptr=t(i64), qpe_ptr=t(bf), lat_ptr=t(bf))
    decode = dict(prep, w_ptr=t(torch.float8_e4m3fn), s_ptr=t(f32), qlat_ptr=t(bf))
    attn = dict(q_ptr=t(bf), qpe_ptr=t(bf), cache_ptr=t(bf), pos_ptr=t(i64), out_ptr=t(bf), part_ptr=t(f32),
                ml_ptr=t(f32), lse_ptr=t(f32))
    red = dict(RED_N=2, RED_L=32, RED_V=8, LOG2_RED_L=5, RH_PAD=32, FUSED_ROPE=True)
    cases = {}
    for rows in (True, False):
        for bt in (1, 4):
            cases[f"_mla_prefill_prep_kernel (HAS_ROWS={rows}, BLOCK_T={bt})"] = _analysed_writes(
                MP._mla_prefill_prep_kernel, prep, dict(red, HAS_ROWS=rows, BLOCK_T=bt, H_PAD=16))
    cases["_mla_decode_prep_kernel"] = _analysed_writes(MP._mla_decode_prep_kernel, decode, dict(
        HAS_SCALE=True, BLOCK_M=16, BLOCK_DN=128, BLOCK_C=64, C_PAD=512, RH_PAD=32, H_PAD=16))
    for name, flags in (("split", dict(SPLIT=True, PREFIX=False)), ("one pass", dict(SPLIT=False, PREFIX=False)),
                        ("prefix", dict(SPLIT=False, PREFIX=True))):
        cases[f"_mla_fwd_kernel ({name})"] = _analysed_writes(MA._mla_fwd_kernel, attn, dict(
            flags, BLOCK_H=16, BLOCK_T=64, C_PAD=512, R_PAD=64, MIN_CHUNK_=64, SWAP=False))
    from dsv3.kernels import mla_prefill as PF

    for rows in (True, False):
        cases[f"_kv_decompress_kernel (HAS_ROWS={rows})"] = _analysed_writes(PF._kv_decompress_kernel, dict(
            c_ptr=t(bf), rows_ptr=t(i64), pos_ptr=t(i64), w_ptr=t(bf), out_ptr=t(bf)),
            dict(BLOCK_T=128, BLOCK_N=128, BLOCK_K=64, R_PAD=64, HAS_ROWS=rows))
    cases["_kv_decompress_tma_kernel"] = _analysed_writes(PF._kv_decompress_tma_kernel, dict(
        a_desc=torch.empty(2, 128, 576, dtype=bf), w_desc=torch.empty(256, 512, dtype=bf),
        o_desc=torch.empty(1, 128, 4160, dtype=bf), c_ptr=t(bf), rows_ptr=t(i64), pos_ptr=t(i64)),
        dict(BLOCK_T=128, BLOCK_N=256, BLOCK_K=64, O_BOX=64, HAS_ROWS=True, GROUP_T=8),
        {"a_desc": [1, 128, 64], "w_desc": [256, 64], "o_desc": [1, 128, 64]})
    chunk = dict(qn_ptr=t(bf), qp_ptr=t(bf), kn_ptr=t(bf), kp_ptr=t(bf), v_ptr=t(bf), pos_ptr=t(i64), po_ptr=t(bf),
                 plse_ptr=t(f32), out_ptr=t(bf), oq_ptr=t(torch.float8_e4m3fn), os_ptr=t(f32))
    for cached in (False, True):
        cases[f"_mha_prefill_kernel (KEYS_CACHED={cached})"] = _analysed_writes(PF._mha_prefill_kernel, chunk, dict(
            BLOCK_M=128, BLOCK_N=64, DN_PAD=128, R_PAD=64, DV_PAD=128, HAS_PREFIX=not cached, EXACT_D=True,
            KV_DESC=False, QUANT_OUT=True, HEAD_GROUP=16, KEYS_CACHED=cached))
    return cases


def main() -> None:
    triton.runtime.driver._active = _Sm90Driver()
    if "--positions" in sys.argv[1:]:
        for name, writes in positions_writes().items():
            print(f"{name} writes {writes}")
        return
    if "--schedule" in sys.argv[1:]:
        for name, writes in schedule_writes().items():
            print(f"{name} writes {writes}")
        return
    if "--copies" in sys.argv[1:]:
        for name, shape in (("16B T=1", (1, 66, 1408, 2048)), ("16B T=8", (8, 66, 1408, 2048)),
                            ("671B-ws8 rank T=1", (1, 32, 2048, 7168))):
            print(f"{name}: copies {decode_copies(*shape)}")
            print(f"{name} pairs + combine_pairs: copies {decode_copies(*shape, pairs=True)}")
        return
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors

    from dsv3.kernels import routed_experts as RE

    logging.basicConfig(level=logging.WARNING)
    e, i, d, k = 66, 1408, 2048, 8  # 16B: 64 routed + 2 shared slots, top-6 + 2
    fp8 = torch.float8_e4m3fn
    w_up, w_down = torch.empty(e, i, d, dtype=fp8), torch.empty(e, d, i, dtype=fp8)
    s_up, s_down = torch.empty(e, 11, 16), torch.empty(e, 16, 11)
    h, hs, y = torch.empty(8 * k, i, dtype=fp8), torch.empty(8 * k, 11), torch.empty(8 * k, d, dtype=torch.bfloat16)
    x, xs = torch.empty(8, d, dtype=fp8), torch.empty(8, 16)
    idx1, idx8 = torch.zeros(1, k, dtype=torch.int64), torch.zeros(8, k, dtype=torch.int64)
    common = dict(IS_FP8=True, GROUPED=False, QUANT_H=True, BLOCK_K=8, BLOCK_E=64)
    cases = {
        "_moe_up_rows_kernel (T=1)": (RE._moe_up_rows_kernel, dict(
            x_ptr=x, xs_ptr=xs, idx_ptr=idx1, wg_ptr=w_up, wu_ptr=w_up, sg_ptr=s_up, su_ptr=s_up, h_ptr=y, E=e, I=i,
            D=d, stride_we=i * d, stride_wn=d, stride_se=11 * 16, stride_sn=16, stride_h=i, ACT16=False, BLOCK_N=2,
            KB_PAD=16)),
        "_moe_up_kernel (T=8)": (RE._moe_up_kernel, dict(
            x_ptr=x, xs_ptr=xs, idx_ptr=idx8, sched_ptr=idx8, wg_ptr=w_up, wu_ptr=w_up, sg_ptr=s_up, su_ptr=s_up,
            h_ptr=h, hs_ptr=hs, dt_ptr=y, T=8, K=k, E=e, I=i, D=d, n_sched=0, stride_xt=d, stride_xst=16,
            stride_we=i * d, stride_wn=d, stride_se=11 * 16, stride_sn=16, stride_sk=1, stride_h=i, stride_hs=11,
            BLOCK_N=128, BLOCK_T=16, BLOCK_P=64, W_DESC=False, **common)),
        "_moe_down_kernel (T=1)": (RE._moe_down_kernel, dict(
            h_ptr=h, hs_ptr=hs, idx_ptr=idx1, sched_ptr=idx1, wd_ptr=w_down, sd_ptr=s_down, y_ptr=y, T=1, K=k, E=e,
            I=i, D=d, n_sched=0, stride_h=i, stride_hs=11, stride_we=d * i, stride_wn=i, stride_se=16 * 11,
            stride_sn=11, stride_sk=1, stride_y=d, BLOCK_N=64, BLOCK_T=16, BLOCK_P=8, EVEN=False, W_DESC=False,
            **common)),
        "_moe_combine_kernel (T=1)": (RE._moe_combine_kernel, dict(
            y_ptr=y, idx_ptr=idx1, wt_ptr=hs, out_ptr=y, K=k, E=e, D=d, stride_y=d, stride_ot=d, stride_od=1,
            FIRST_ONLY=True, BLOCK_K=8, BLOCK_D=512)),
    }
    for name, (kernel, kwargs) in cases.items():
        acc = identify_accessed_tensors(kernel, kwargs, {})
        print(f"{name:28s} writes {sorted(w.name for w in acc.read_writes.writes)}")


if __name__ == "__main__":
    main()
