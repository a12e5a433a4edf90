"""Which parts of a prefill change a row's logits with the batch around it (device script).

`bench_ttft.py` found a bucket replay's first-token logits of 2 prompts x 30 tokens (an 8 x 32 bucket: six
padding rows repeating prompt 0 into its cache row) 1.7e-1 (rel L2) from the plain call's ([2, 30]), top-1 equal,
while one prompt x 30 and 8 x 30 matched bitwise (2026-11-26). This script separates the candidates:

1. the FP8 GEMMs as the AOTInductor packages run them (v1 `torch._scaled_mm` with block scales, `scaled_mm_quantized`
   inside compilation) at the 16B's shapes: is a row's output bitwise the same at M = 32 .. 256?
2. on a build's artifacts (weights generated on the GPU): per row, the replayed logits against the plain call's, and
   both against each prompt prefilled alone. If rows that no padding row repeats differ too, the difference is the
   token count (M) of some kernel, not the padding rows' cache writes.

3. the model run eagerly (`--eager 70x2,30x2`): per row, the first module whose output differs from the prompt's
   alone.

    python scripts/check_batch_invariance.py [ART_DIR] [--eager 70x2,30x3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gemms() -> None:
    from dsv3.kernels.fp8_blocks import quantize_weight
    from dsv3.kernels.fp8_linear import act_quant

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((3648, 2048), (2048, 2048), (2816, 2048), (2048, 1408)):
        w, s = quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.05)
        x = torch.randn(256, k, device="cuda", generator=g).bfloat16()
        outs = {}
        for m in (32, 60, 64, 128, 240, 256):
            xq, xs = act_quant(x[:m], pad_rows_to=4, scales_m_major=True, pad_k=True, pad_k_blocks_to=4)
            wp = F.pad(w.view(torch.uint8), (0, xq.shape[1] - k)).view(w.dtype)
            sc = F.pad(s.float(), (0, xq.shape[1] // 128 - s.shape[1]))
            outs[m] = torch._scaled_mm(xq, wp.t(), scale_a=xs, scale_b=sc.t(), out_dtype=torch.bfloat16)[:32, :n]
        same = [m for m in outs if torch.equal(outs[m], outs[256])]
        print(f"v1 _scaled_mm N {n} K {k}: the first 32 rows bitwise equal to M = 256's at M = {same}, not at "
              f"{[m for m in outs if m not in same]}", flush=True)


def rows(art: str) -> None:
    from dsv3.runtime.engine import artifact_stepper
    from dsv3.runtime.parallel import ParallelPlan

    stepper, _ = artifact_stepper(art, None, ParallelPlan(0, 1), "cuda", progress=False)
    graphs = dict(stepper.short_prefill)
    vocab = stepper.model.cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    for length, batch in ((30, 2), (30, 3), (14, 2), (60, 2), (30, 8)):
        prompts = [torch.randint(1, vocab, (length,), generator=gen).tolist() for _ in range(batch)]
        entry = stepper._short_prefill_for(batch, max(2, length))
        replay = stepper.prefill(prompts).clone()
        stepper.short_prefill.clear()
        plain = stepper.prefill(prompts).clone()
        alone = torch.stack([stepper.prefill([p])[0].clone() for p in prompts])
        stepper.short_prefill.update(graphs)
        bucket = None if entry is None else f"{entry.rows} x {entry.width}"
        print(f"{batch} x {length} (bucket {bucket}): per row rel L2 replay vs plain "
              f"{[f'{rel(replay[r], plain[r]):.1e}' for r in range(batch)]}, plain vs alone "
              f"{[f'{rel(plain[r], alone[r]):.1e}' for r in range(batch)]}, replay vs alone "
              f"{[f'{rel(replay[r], alone[r]):.1e}' for r in range(batch)]}", flush=True)


def eager(length: int, batch: int, config: str = "16B", device: str = "cuda") -> None:
    """The 16B model run eagerly (random weights, the runtime's layout) on `batch` prompts as one first-chunk call and
    on each prompt alone: for each row, the first module (in call order) whose output for that row's tokens is not
    bitwise the alone call's, and by how much."""
    from dsv3.config import resolve_config
    from dsv3.runtime.parallel import ParallelPlan, build_rank_model
    from dsv3.runtime.random_weights import fill_random_

    model = fill_random_(build_rank_model(resolve_config(config), ParallelPlan(0, 1), dtype=torch.bfloat16,
                                          device=device, max_batch_size=batch, max_seq_len=256))
    records: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def fn(_mod, _inp, out):
            for j, t in enumerate(out if isinstance(out, tuple) else (out,)):
                if isinstance(t, torch.Tensor):
                    records.append((f"{name}[{j}]", t.detach().clone()))
        return fn

    for i, layer in enumerate(model.layers):
        layer.self_attn.register_forward_hook(hook(f"layer {i} attention"))
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(hook(f"layer {i} router"))
            layer.mlp.experts.register_forward_hook(hook(f"layer {i} routed experts"))
        layer.register_forward_hook(hook(f"layer {i} block"))
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, model.cfg.vocab_size, (batch, length), generator=gen).to(device)

    def call(tokens, rows):
        records.clear()
        pos = torch.arange(length, device=device)
        with torch.no_grad():
            out = model(tokens, pos, logits_index=torch.full((len(rows),), length - 1, device=device),
                        cache_rows=torch.tensor(rows, device=device), first_chunk=True)
        return out, list(records)

    together, rec_b = call(prompts, list(range(batch)))
    for r in range(batch):
        alone, rec_a = call(prompts[r:r + 1], [r])
        first = None
        for (name, tb), (_, ta) in zip(rec_b, rec_a):
            # [B, S, ...] outputs: row r; flat [B * S, ...] outputs: its S tokens
            part = tb[r:r + 1] if tb.shape[0] == batch and ta.shape[0] == 1 else tb[r * length:(r + 1) * length]
            if part.shape != ta.shape:
                continue
            if not torch.equal(part, ta):
                first = f"{name}: rel L2 {rel(part, ta):.1e}"
                break
        print(f"eager {batch} x {length}, row {r}: logits rel L2 vs alone {rel(together[r], alone[0]):.1e}; first "
              f"difference: {first}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="?", help="a 16B build (gpu_check.sh build16both); without: the GEMMs only")
    ap.add_argument("--eager", default="", help="LENGTHxBATCH,...: the eager model's first differing module per row")
    ap.add_argument("--config", default="16B", help="the eager model's config (default 16B)")
    ap.add_argument("--no-gemms", action="store_true", help="skip part 1")
    args = ap.parse_args()
    if not args.no_gemms:
        gemms()
    if args.artifacts:
        rows(args.artifacts)
    for spec in filter(None, args.eager.split(",")):
        length, batch = (int(v) for v in spec.split("x"))
        eager(length, batch, args.config, "cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    main()
