#!/usr/bin/env bash
# Everything the GPU host checks, for device calls: bash scripts/gpu_check.sh STEP...
#   env        install the package (offline) and print versions
#   cpu-suite  the fast CPU tests under this host's torch (2.11 on the device): compatibility check
#   kernels    the GPU kernel tests (scripts/gpu_kernels.sh tests)
#   kgpu       all GPU-marked kernel tests but the AOTI ones (test_kernels, test_router, test_gemv_variants,
#              test_prefill, test_norm, test_mla_prep)
#   sweep-gemv scripts/sweep_gemv.py: decode GEMV variants and launch configs (JSON in $OUT)
#   sweep-mla  scripts/sweep_mla.py: decode launch plans of the MLA kernel (checked against the reference, timed)
#   sweep-moe  scripts/sweep_moe.py: FP8 decode launch plans of routed_experts (16B, 671B ws8 rank; T 1, 8), checked
#              against the default plan, timed; prints a suggested MOE_DECODE_TUNED table (JSON in $OUT)
#   rows       scripts/bench_rows.py: row-parallel M=1 GEMV, T=1 MoE and absorb kernels vs the serial-K / MMA
#              ones (ROWS_ONLY=gemv|moe|absorb: one part; JSON in $OUT)
#   pdl        scripts/bench_pdl.py: a chain of dependent FP8 GEMVs in a CUDA graph, plain vs programmatic dependent
#              launch (weights loaded before gdc_wait): does PDL hide a decode kernel's fixed cost? (JSON in $OUT)
#   persistent-chain scripts/try_persistent_chain.py: a chain of dependent FP8 GEMVs as one persistent kernel (grid
#              barriers, the next link's weights loaded before the wait or after) against one launch per link, in
#              CUDA graphs, outputs compared (JSON in $OUT): is a persistent decode layer kernel worth building?
#   cublas-ws  scripts/try_cublaslt_workspace.py on quick16's artifacts: the 4095-token prefill with
#              CUBLASLT_WORKSPACE_SIZE unset / 0 / 64 / 1024 KiB (WS_SIZES), memsets and cuBLAS kernels profiled
#   prefetch   scripts/bench_prefetch.py: o_proj + MoE T=1 (16B) after a latency window, with and without the shared
#              experts' weights prefetched into L2 during the window (its l2_prefetch kernel; JSON in $OUT)
#   moe-grouped the MoE half of sweep-prefill (scripts/sweep_prefill.py --only moe; it replaced bench_grouped_moe.py)
#   schedule   the grouped MoE tile schedule's GPU tests and scripts/bench_schedule.py (torch vs counting sort)
#   ab-moe     scripts/ab_grouped_moe.py: this tree's grouped MoE against AB_OLD (a copy of kernels/routed_experts.py
#              sent with the tree), one process, outputs compared, timed interleaved (JSON in $OUT)
#   ab-moe-decode scripts/ab_moe_decode.py: this tree's decode MoE (T = 2, 4, 8) against AB_OLD (a copy of
#              kernels/routed_experts.py sent with the tree), bitwise compared, timed over weight copies, per kernel
#   ab-moe-residual scripts/ab_moe_residual.py: a prefill MoE layer's end, Inductor's combine + add + norm kernel and
#              act_quant against dsv3.moe_residual_norm_quant (outputs compared, timed interleaved; JSON in $OUT)
#   ab-mla     scripts/ab_mla.py: this tree's MLA decode op against AB_OLD_MLA (a copy of kernels/mla_attention.py
#              sent with the tree), H 16 batch 1/8/32 at 1k-32k and H 128 at 8k, bitwise compared, timed interleaved
#   ab-prefill-attn scripts/ab_prefill_attn.py: this tree's prefill attention kernel against AB_OLD_ATTN (a copy of
#              kernels/mla_prefill.py sent with the tree), one process, outputs compared, timed interleaved
#   o-quant    dsv3.mla_prefill_attention_o_proj (o_proj's input quantized by the prefill attention kernel): its GPU
#              tests, then scripts/ab_prefill_o_proj.py against the two ops it replaces (JSON in $OUT)
#   norm-quant the prefill MoE layer's x quantized by the post-attention norm in cuBLAS's layout: its GPU tests
#              (op level eager / compiled / packaged, model level), then scripts/ab_prefill_norm_quant.py (JSON in $OUT)
#   ab-act-quant scripts/ab_act_quant.py: act_quant and silu_mul_quant (the prefill's activation quantization) against
#              AB_OLD_LINEAR / AB_OLD_SWIGLU (copies of kernels/fp8_linear.py, fp8_swiglu.py sent with the tree), then
#              at other rows-per-program / warps (outputs compared, timed interleaved; JSON in $OUT)
#   ab-prep    scripts/ab_prep.py: dsv3.mla_decode_prep against AB_OLD_PREP (a copy of kernels/mla_decode_prep.py
#              sent with the tree) at batch 1 / 8, and dsv3.mla_prefill_prep's kernel against the composition it replaced
#   run16q     dsv3c run --random-weights on quick16's artifacts: batch 1 and 8, 64 new tokens, --stats (the user's loop),
#              greedy and sampled
#   ragged-n   scripts/try_scaled_mm_ragged_n.py: v1 torch._scaled_mm with N not a multiple of 128, eager and in AOTI
#   loop16     scripts/bench_decode_loop.py on quick16's artifacts: per-token time as replay, as a synced step with the
#              logits graph or the greedy loop graph, and through generate() on either path (tokens compared), greedy
#              and sampled (temperature 0.6, top-p 0.95: decode + sample against the sampled loop graph)
#   ttft16     scripts/bench_ttft.py on quick16's artifacts: a short prompt's prefill at lengths 5..1000, batch 1 and 8:
#              the plain calls (first at a new length, again, host time) against the short-prefill CUDA graphs
#   gemm-power scripts/bench_gemm_power.py: the FP8 GEMM peak (per-tensor, block-scaled; 8192^3) as dsv3c bench's
#              ~15 ms burst and for 3 s back to back, with nvidia-smi's power, SM clock, clock event reasons
#   sustain-moe scripts/sustain_moe.py: grouped MoE launch configs (16B routed, T 4096) timed as a burst and sustained
#              at the power cap, with nvidia-smi's power and SM clock (JSON in $OUT)
#   ggen       the GPU tests of the loop graphs (greedy, sampled), the short-prefill graphs, greedy_next_ and
#              top_p_scores (tests/test_generate.py, tests/test_greedy.py, tests/test_top_p.py -m gpu)
#   topp       scripts/bench_top_p.py: dsv3.top_p_scores against the sort-based top-p it replaced, in CUDA graphs,
#              batch 1 / 8 / 64 at the 16B vocab, 1 / 8 at the 671B one (JSON in $OUT)
#   rope       scripts/bench_rope.py: the prefill's q_pe RoPE compiled by Inductor, apply_rope's cat form against an
#              indexed form of the same values (bitwise compared, timed)
#   sweep-prefill scripts/sweep_prefill.py: launch configs of the grouped MoE and the causal prefill attention at
#              T=4096 (SWEEP_ARGS), checked, timed, TFLOP/s vs the peaks (JSON in $OUT)
#   kpre       the GPU tests of the prefill kernels: test_prefill, the routed-experts and AOTI-package ones of test_kernels
#   ncu-moe    Nsight Compute sections of the routed-experts kernels (scripts/ncu_moe.py: grouped T=4096, decode T=1;
#              full report text in $OUT/ncu_moe.txt)
#   attnout    the GPU tests of dsv3.mla_attention_out and of the MLA kernels, then scripts/sweep_attn_out.py (the op's
#              launch block and warps against the two ops it replaces; JSON in $OUT)
#   mla-splits scripts/sweep_mla_splits.py: the MLA decode op's split count (the plan's vs whole waves of programs)
#              at H 16 / 128, batch 1 / 8 / 32, context 1k-32k (checked, timed; JSON in $OUT)
#   sel-up     scripts/try_select_in_up.py: one-token MoE up kernel that computes the router's top-k itself vs the
#              select kernel + up kernel (16B, 671B rank; checked, timed; JSON in $OUT; 2026-11-24: slower)
#   moe-a16    scripts/sweep_moe_a16.py: W8A16 one-token routed experts, the row-parallel up / down kernels' (block_n,
#              warps) at the 16B and 671B-rank expert shapes against today's configs (JSON in $OUT)
#   mla-pipe   scripts/sweep_mla_pipeline.py: the MLA decode op's plan against the 2-stage plan of before and 32- / 64-row
#              key blocks in 2-4 stages at the plan's split count; H 16, batch 1-32, context 128-32k (JSON in $OUT)
#   ncu-mla    Nsight Compute sections of the MLA decode kernels (scripts/ncu_mla.py: batch 1 at 128 / 8k / 32k, batch 8
#              at 4k; full report text in $OUT/ncu_mla.txt)
#   tma-op     scripts/try_tma_op.py (a host-side TMA descriptor through a triton_op: eager, torch.compile, AOTInductor
#              package at 3 sizes), then the GPU tests of the prefill attention's descriptor form (incl. an AOTI package)
#   tma-moe    scripts/try_grouped_tma.py: the grouped MoE kernels with TMA descriptor loads vs the production ones
#              (bitwise compared, timed interleaved; JSON in $OUT)
#   small-gemm scripts/sweep_small_m_gemm.py: the 16B prefill's dense FP8 GEMMs at M 300-1024, cuBLAS against the
#              Triton tiled GEMM's tile shapes / warps / stages (checked against float64, timed; JSON in $OUT)
#   sdpa       scripts/bench_prefill_sdpa.py: the first-chunk prefill attention, our kernel vs PyTorch's cuDNN / flash
#              SDPA (timed, checked, and inside AOTInductor packages; JSON in $OUT)
#   gpu-all    the whole GPU-marked suite (`pytest -m gpu tests/`) in one run, GPU_WORKERS (6) pytest-xdist workers
#              sharing the GPU (Triton compiles in parallel; carry .whl/ with pytest-xdist and execnet wheels if the
#              image lacks them), durations and the summary in $OUT/gpu_all.log
#   build16both the 16B config compiled twice: FP8 (quick16's) into $WORK/art16q and BF16 (the published V2-Lite
#              form, no conversion) into $WORK/art16b (BUILD16=fp8 or bf16: one of them); bench16both times both
#   bench16both dsv3c bench --random-weights on both builds of build16both, one after the other in one call
#   static16   the eager 16B (3 layers) at static prompt widths 16-128 and decode batches 1-32 with synchronous launches,
#              then (STATIC16_BUILD=1) a 3-layer build with static first-chunk graphs and bench_ttft.py on it
#   kdec       the GPU tests of the decode phase merges (test_norm_route, test_mla_prep, test_norm) and of the router
#   ckpt16     init-random 16B FP8 checkpoint into $WORK/ckpt16 (kept while the machine stays warm)
#   compile16  dsv3c compile the 16B config for cuda into $WORK/art16 (decode b1,b8 + prefill), times and sizes
#   run16      dsv3c run from the artifacts: batch 1 and 8, TTFT and decode ms/token, plus the eager baseline
#   loadprof   where the artifact cold start goes (scripts/profile_load.py on art16 + ckpt16)
#   prof16     where a batch-1 decode step goes (scripts/profile_decode.py: graph replay vs kernel time, top kernels)
#   prof16q    the same on quick16's artifacts with weights generated on the GPU (no checkpoint); PROF_CTX sets the
#              decode context (default 128)
#   select     scripts/bench_select.py: the router select kernel at 671B's grouping, group view vs membership grid
#   prof671    batch-1 decode profile of rank 0 of 671B at world size 8 (est671's 4-layer artifacts; collectives stubbed)
#   det16q     run-to-run determinism: dsv3c run twice from quick16's artifacts (random weights, batch 8), tokens compared
#   ckpt16bf16 dsv3c convert --dtype bf16 of ckpt16 (CPU; transformers' baseline loads it)
#   bench16    dsv3c bench on the 16B artifacts (batch 1,8; context 128,4032: the 32 timed steps must fit the 4096 cache)
#              with --baseline hf when ckpt16bf16 exists, and the eager model, JSON and SVG in $OUT
#   bench16q   quick16's bench alone, on artifacts already in $WORK/art16q (quick16 or build16both)
#   long16     the FP8 16B config compiled for 32768-token sequences ($WORK/art16long; LONG16=build,bench picks), then
#              dsv3c bench --random-weights at contexts up to 32640 and prompts up to 32767 tokens (8 chunks);
#              PROF_ART=art16long with prof16q profiles it
#   quick16    no checkpoint: the FP8 16B config compiled, then dsv3c bench --random-weights (weights made on the GPU)
#   wide16     serving-sized batches: the FP8 16B config compiled with decode buckets WIDE16_BATCHES (1,8,32: with 64
#              the build passes 600 s) into $WORK/art16w (WIDE16=build,bench picks), then dsv3c bench --random-weights
#              at those batches and contexts 128 / 4032;
#              PROF_ART=art16w PROF_BATCH=32 prof16q profiles a batch-32 step
#   compile16-ws2  the same for world size 2 into $WORK/art16_ws2 (per-rank TP+EP graphs)
#   nccl2      needs 2 GPUs: scripts/nccl_check.py (ws2 artifacts over NCCL vs ws1 eager) + dsv3c run --world-size 2
#   est671     rank 0 of 671B at world size 8: compile 4, 6 and 8 layers (EST671_LAYERS), time decode round-robin
#              (collectives stubbed), least-squares line to 61 layers
#   ab16       A/B of trace-time switches: the 16B FP8 config at AB_LAYERS (8) layers built once per variant
#              (default + AB_VARIANTS, by default "DSV3_NORM_ROUTE=torch": the last adopted merge off; variants
#              space-separated, settings within one comma-separated; a variant starting with -- is a list of
#              compile options instead, e.g. --batch1-activations=fp8),
#              decode batch 1 and 8 timed round-robin (scripts/rank_timing.py --repeats AB_REPEATS);
#              AB_PARALLEL=1 builds the variants concurrently
#   ab671      A/B on rank 0 of 671B at world size 8, AB671_LAYERS (4) layers, one build per variant (default +
#              AB_VARIANTS, default "--batch1-activations=fp8"), decode timed round-robin (collectives stubbed)
#   ar2        needs 2 GPUs: scripts/allreduce_latency.py (a decode step's collectives over NCCL, CUDA graph)
#   run671ws   needs 2 or 4 GPUs (issue 8 until 8 are lent): 671B truncated to LAYERS671WS (8) layers at world size
#              WS671 (all visible GPUs): compile, dsv3c run --random-weights at batch 1 and 8, rank 0 alone stubbed
#   coll2      needs 2 GPUs: tests/test_collectives.py (dsv3::one_shot_all_reduce over NCCL + symmetric memory;
#              the tiny config compiled with each all-reduce, logits of 2-rank runs compared)
#   ab671ws    needs 2 GPUs: 671B truncated to LAYERS671WS (8) layers at world size 2, compiled twice (--all-reduce
#              nccl and one-shot, one build per GPU at once), dsv3c run of each at batch 1 and 8 with the same
#              random weights: ms/token side by side and the greedy tokens compared
#   run671     needs 8 GPUs: dsv3c run --world-size 8 --random-weights from art671, batch 1 and 8 (TTFT, ms/token)
#   anatomy16  16B FP8 at 3 layers compiled with its own Inductor cache, prefill + decode profiles, and the generated
#              Triton kernels' sources in $OUT/anatomy16/kernels.tgz (what each profiled glue kernel computes)
#   compile671 dsv3c compile 671B at world size 8 (per-rank graphs), NUM_LAYERS_671 layers (default 61);
#              NO_VERIFY_671=1 skips verification (verify with a few layers: same per-layer graph code)
# A failed AOTInductor build leaves its newest generated wrapper.cpp in $OUT for offline reading.
# Logs land in $OUT (the device tool's output folder; ./gpu_out elsewhere).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
WORK=${WORK:-/tmp/dsv3-work}
mkdir -p "$OUT" "$WORK"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/dsv3-inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/dsv3-triton}
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++  # the image's default wrapper builds .so files that crash at load

install() {
  $PY -c "import dsv3.kernels, dsv3.runtime" 2>/dev/null && return 0
  if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.log" 2>&1; then
    echo "editable install failed (pip.log); using a copied package tree" | tee -a "$OUT/pip.log"
    local shim=/tmp/dsv3-shim
    rm -rf "$shim" && mkdir -p "$shim" && cp -r dsv3 "$shim/dsv3"
    for sub in kernels configs compiler runtime export; do cp -r "$sub" "$shim/dsv3/$sub"; done
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  fi
}
dsv3c() { $PY -m dsv3.cli "$@"; }

step_env() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null || true
}

step_cpu_suite() {
  CUDA_VISIBLE_DEVICES= timeout 420 $PY -m pytest -q -x -p no:cacheprovider -m "not gpu and not slow" \
    tests/test_config.py tests/test_parity_hf.py tests/test_routing.py tests/test_ops_reference.py \
    tests/test_checkpoint.py tests/test_generate.py tests/test_parallel.py 2>&1 | tail -15
}

step_kernels() { bash scripts/gpu_kernels.sh tests; }

step_kgpu() {  # every GPU-marked kernel test except the AOTInductor packages (those run in `kernels`), 9 min cap
  timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE -k "not aoti" tests/test_kernels.py \
    $(ls tests/test_router.py tests/test_gemv_variants.py tests/test_prefill.py 2>/dev/null) 2>&1 \
    | tee "$OUT/kgpu.log" | tail -15
  # the fused decode-prep and norm ops (2026-11-23), on their own clock so one part's timeout spares the other
  timeout 240 $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE tests/test_norm.py tests/test_mla_prep.py tests/test_swiglu.py 2>&1 \
    | tee "$OUT/kgpu_fused.log" | tail -15
}

step_gpu_all() {  # the whole GPU suite in one run; pytest-xdist from .whl/ when the image has none
  $PY -c "import xdist" 2>/dev/null || $PY -m pip install -q --no-index --find-links .whl pytest-xdist >"$OUT/xdist_pip.log" 2>&1
  local par=()
  $PY -c "import xdist" 2>/dev/null && par=(-n "${GPU_WORKERS:-6}")
  timeout "${GPU_ALL_TIMEOUT:-540}" $PY -m pytest -m gpu "${par[@]}" -q -p no:cacheprovider -p no:logging --tb=short -rfEs \
    --durations=15 tests/ 2>&1 | tee "$OUT/gpu_all.log" | grep -v -i warn | tail -40
}

cfg16fp8() {  # the 16B config with DeepSeek-V3's FP8 quantization_config, into $WORK/cfg16fp8
  mkdir -p "$WORK/cfg16fp8"
  $PY -c "import json, sys; from dsv3.config import resolve_config, FP8Quantization
cfg = resolve_config('16B').replace(quantization_config=FP8Quantization())
json.dump(cfg.to_hf_dict(), open(sys.argv[1] + '/config.json', 'w'), indent=1)" "$WORK/cfg16fp8"
}

step_build16both() {  # FP8 then BF16 16B builds, one after the other (each build's processes hold a model on the GPU:
  # two builds at once ran out of its memory); BUILD16 (fp8,bf16) picks, so that one call per build fits the time limit;
  # BUILD_VERIFY=0 skips the compile-time verification (~50 s) when the call only measures; SHORT16 replaces the
  # default --short-prefill shapes
  local kinds=${BUILD16:-fp8,bf16} cfg out
  cfg16fp8
  for k in ${kinds//,/ }; do
    if [ "$k" = fp8 ]; then cfg=$WORK/cfg16fp8 out=art16q; else cfg=16B out=art16b; fi
    dsv3c compile --config "$cfg" --out "$WORK/$out" --device cuda --max-batch-size 8 --batch-sizes 1,8 --max-seq-len 4096 \
      --overwrite --jobs "${Q16_JOBS:-6}" $([ "${BUILD_VERIFY:-1}" = 0 ] && echo --no-verify) \
      ${SHORT16:+--short-prefill "$SHORT16"} > "$OUT/compile_$out.log" 2>&1
    echo "compile $out ($k): exit $?"
    grep -v Warning "$OUT/compile_$out.log" | tail -4
  done
}

step_bench16both() {
  local a
  for a in art16q art16b; do
    echo "--- $a"
    dsv3c bench --artifacts "$WORK/$a" --random-weights --batch-sizes 1,8 --context 128,4032 --steps 32 \
      --prompt-len 14,4096 --json "$OUT/bench_$a.json" 2>&1 | grep --line-buffered -v -E "Warning|%\|" | tail -13
  done
}

step_attnout() {
  timeout 240 $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE tests/test_attn_out.py \
    tests/test_kernels.py -k "attn_out or mla or compiled_and_graph" 2>&1 | tee "$OUT/attnout.log" | tail -12
  timeout 300 $PY scripts/sweep_attn_out.py --json "$OUT/sweep_attn_out.json" 2>&1 | grep -v -i warn | tail -20
}

step_sdpa() { timeout 400 $PY scripts/bench_prefill_sdpa.py --json "$OUT/bench_prefill_sdpa.json" 2>&1 | grep -v -i warn | tail -60; }

step_small_gemm() {  # the prefill's FP8 GEMMs at short-prompt M: cuBLAS against the Triton tiled GEMM's configs
  timeout 400 $PY scripts/sweep_small_m_gemm.py ${SMALL_GEMM_ARGS:-} --json "$OUT/sweep_small_m_gemm.json" 2>&1 \
    | grep -v -i warn | tail -24
}

step_sel_up() { timeout 300 $PY scripts/try_select_in_up.py --json "$OUT/try_select_in_up.json" 2>&1 | grep -v -i warn | tail -6; }

step_moe_a16() {  # A16_SHAPES: a subset of sweep_moe's shapes (default all)
  timeout 400 $PY scripts/sweep_moe_a16.py ${A16_SHAPES:+--shapes "$A16_SHAPES"} --json "$OUT/sweep_moe_a16.json" 2>&1 \
    | grep -v -i warn | tail -12
}

step_mla_pipe() { timeout 400 $PY scripts/sweep_mla_pipeline.py --json "$OUT/sweep_mla_pipeline.json" 2>&1 | grep -v -i warn | tail -24; }

step_mla_splits() { timeout 400 $PY scripts/sweep_mla_splits.py ${SPLITS_ARGS:-} --json "$OUT/sweep_mla_splits.json" 2>&1 | grep -v -i warn | tail -20; }

step_tma_moe() { timeout 400 $PY scripts/try_grouped_tma.py --json "$OUT/try_grouped_tma.json" 2>&1 | grep -v -i warn | tail -30; }

step_select() {  # the router select kernel at 671B's grouping: group view vs membership grid (scripts/bench_select.py)
  timeout 200 $PY scripts/bench_select.py --json "$OUT/bench_select.json" 2>&1 | grep -v -i warn | tail -16
}
step_pdl() { timeout 300 $PY scripts/bench_pdl.py --json "$OUT/pdl.json" 2>&1 | grep -v Warning | tail -8; }

step_persistent_chain() {  # one persistent kernel with grid barriers vs one launch per link (CHAIN_ARGS passed on)
  timeout 300 $PY scripts/try_persistent_chain.py ${CHAIN_ARGS:-} --json "$OUT/persistent_chain.json" 2>&1 \
    | grep -v Warning | tail -8
}

step_sweep_gemv() {  # decode GEMV variants x launch configs on the 16B and 671B-TP8 shapes, in CUDA graphs
  timeout 300 $PY scripts/sweep_gemv.py ${SWEEP_ARGS:-} --json "$OUT/sweep_gemv.json" 2>&1 | tee "$OUT/sweep_gemv.log" \
    | tail -60
}

step_sweep_mla() {  # decode launch plans of dsv3.mla_attention at H = 16, batch 1/8, context 128..8k (JSON in $OUT)
  timeout 300 $PY scripts/sweep_mla.py --json "$OUT/sweep_mla.json" 2>&1 | grep -v -i warn | tail -45
}

step_moe_grouped() { SWEEP_ARGS="--only moe ${SWEEP_ARGS:-}" step_sweep_prefill; }

step_tma_op() {
  timeout 200 $PY scripts/try_tma_op.py 2>&1 | grep -v -i warn | tee "$OUT/tma_op.log" | tail -12
  timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE tests/test_prefill.py \
    2>&1 | tee "$OUT/tma_tests.log" | tail -12
}

step_schedule() {  # the grouped MoE tile schedule: GPU tests (bitwise vs torch; the pairs op under torch.compile),
  # then scripts/bench_schedule.py (torch schedule vs the counting sort, alone and in the grouped op; JSON in $OUT)
  timeout 200 $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE tests/test_kernels.py \
    -k "grouped_schedule or routed_experts_pairs_gpu" 2>&1 | tee "$OUT/schedule_tests.log" | grep -E "^E |passed|failed" | tail -20
  timeout 120 $PY scripts/bench_schedule.py --json "$OUT/bench_schedule.json" 2>&1 | grep -v -i warn | tail -8
}

step_ab_moe() {
  timeout 400 $PY scripts/ab_grouped_moe.py --old "${AB_OLD:?AB_OLD: a copy of kernels/routed_experts.py to compare with}" --json "$OUT/ab_moe.json" \
    2>&1 | grep -v -i warn | tee "$OUT/ab_moe.log" | tail -12
}

step_ab_moe_decode() {
  timeout 400 $PY scripts/ab_moe_decode.py --old "${AB_OLD:?AB_OLD: a copy of kernels/routed_experts.py to compare with}" \
    ${AB_DECODE_ARGS:-} --json "$OUT/ab_moe_decode.json" 2>&1 | grep -v -i warn | tee "$OUT/ab_moe_decode.log" | tail -30
}

step_ab_mla() {
  timeout 400 $PY scripts/ab_mla.py --old "${AB_OLD_MLA:?AB_OLD_MLA: a copy of kernels/mla_attention.py to compare with}" \
    ${AB_MLA_ARGS:-} --json "$OUT/ab_mla.json" 2>&1 | grep -v -i warn | tee "$OUT/ab_mla.log" | tail -14
}

step_ab_prefill_attn() {
  timeout 300 $PY scripts/ab_prefill_attn.py --old "${AB_OLD_ATTN:?AB_OLD_ATTN: a copy of kernels/mla_prefill.py to compare with}" \
    --json "$OUT/ab_prefill_attn.json" 2>&1 | grep -v -i warn | tail -6
}

step_o_quant() {  # dsv3.mla_prefill_attention_o_proj: its GPU tests (fused == the two ops bitwise, compiled, in
  # packages), then scripts/ab_prefill_o_proj.py (fused vs DSV3_PREFILL_O_QUANT=off, timed interleaved; JSON in $OUT)
  timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE tests/test_prefill.py \
    -k "attention_o_proj" 2>&1 | tee "$OUT/o_quant_tests.log" | grep -E "^E |passed|failed" | tail -12
  timeout 200 $PY scripts/ab_prefill_o_proj.py --json "$OUT/ab_prefill_o_proj.json" 2>&1 | grep -v -i warn | tail -6
}

step_norm_quant() {  # x quantized once by add_rms_norm_quant for the prefill's shared and routed experts: GPU tests
  # (bitwise against each op quantizing x, eager / compiled / in packages / the model), then the timed A/B
  # (JSON in $OUT)
  timeout 400 $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE tests/test_swiglu.py \
    tests/test_norm.py 2>&1 | tee "$OUT/norm_quant_tests.log" | grep -E "^E |passed|failed" | tail -12
  timeout 200 $PY scripts/ab_prefill_norm_quant.py --json "$OUT/ab_prefill_norm_quant.json" 2>&1 | grep -v -i warn \
    | tail -6
}

step_run16q() {  # needs quick16's artifacts ($WORK/art16q)
  local prompts=("Tell me about the weather." "Write a poem about GPUs." "What is 2+2?" "Hello" \
                 "Explain attention." "A long story begins" "Once upon a time" "The capital of France")
  local b p args
  for b in 1 8; do
    args=()
    for p in "${prompts[@]:0:$b}"; do args+=(--prompt "$p"); done
    /usr/bin/time -f "batch $b, cold start to exit: %e s" $PY -m dsv3.cli run --artifacts "$WORK/art16q" --random-weights \
      "${args[@]}" --max-new-tokens 64 --stats --output-file "$OUT/run16q_b$b.jsonl" 2>&1 | grep -E "load|error|Error|cold" | tail -4
    echo "  sampled (temperature 0.6, top-p 0.95, seed 0):"
    $PY -m dsv3.cli run --artifacts "$WORK/art16q" --random-weights "${args[@]}" --max-new-tokens 64 --stats \
      --temperature 0.6 --top-p 0.95 --seed 0 2>&1 | grep -E "load|error|Error" | tail -3
  done
  # more prompts than the artifacts' max batch (8): 12 lines of an input file run as batches of 8 and 4, in order
  local file=$WORK/prompts12.txt
  printf '%s\n' "${prompts[@]}" "${prompts[@]:0:4}" > "$file"
  echo "  12 prompts from --input-file (max batch 8):"
  $PY -m dsv3.cli run --artifacts "$WORK/art16q" --random-weights --input-file "$file" --max-new-tokens 32 --stats \
    --output-file "$OUT/run16q_12.jsonl" 2>&1 | grep -E "load|batch|error|Error" | tail -4
  $PY - "$OUT/run16q_12.jsonl" "$OUT/run16q_b8.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first8 = [json.loads(line) for line in open(sys.argv[2])]
print(f"  {len(rows)} records; prompts in input order: {[r.get('prompt', '')[:12] for r in rows]}")
same = sum(a["token_ids"] == b["token_ids"][:32] for a, b in zip(rows[:8], first8))
print(f"  first batch's greedy tokens equal the 8-prompt run's first 32: {same}/8; batches {rows[0]['timings']['batches']}")
PYEOF
}

step_ragged_n() {
  timeout 400 $PY scripts/try_scaled_mm_ragged_n.py 2>&1 | grep -v -i warn | tail -20
}

step_loop16() {  # needs quick16's artifacts ($WORK/art16q)
  $PY scripts/bench_decode_loop.py "$WORK/art16q" --batches 1,8 --context 128 --steps 64 --rounds 5 --sampled 2>&1 \
    | grep -v Warning | tail -20
}

step_ttft16() {  # needs quick16's artifacts ($WORK/art16q)
  timeout 300 $PY scripts/bench_ttft.py "$WORK/art16q" ${TTFT_ARGS:-} --json "$OUT/bench_ttft.json" 2>&1 | grep -v -i warn | tail -16
}

step_cublas_ws() {  # needs quick16's artifacts ($WORK/art16q)
  timeout 400 $PY scripts/try_cublaslt_workspace.py "$WORK/art16q" --sizes "${WS_SIZES:-default,0,64,1024}" \
    --json "$OUT/cublaslt_workspace.json" 2>&1 | grep -v -i warn | tail -16
}

step_gemm_power() {
  timeout 120 $PY scripts/bench_gemm_power.py --json "$OUT/gemm_power.json" 2>&1 | grep -v -i warn | tail -8
}

step_sustain_moe() {
  timeout 300 $PY scripts/sustain_moe.py --json "$OUT/sustain_moe.json" 2>&1 | grep -v -i warn | tail -16
}

step_topp() {
  timeout 200 $PY scripts/bench_top_p.py --batch 1,8,64 --json "$OUT/bench_top_p.json" 2>&1 | grep -v -i warn | tail -6
  timeout 200 $PY scripts/bench_top_p.py --batch 1,8 --vocab 129280 --temperature 1.0 --top-p 0.9 2>&1 \
    | grep -v -i warn | tail -4
}

step_ggen() {
  timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE tests/test_generate.py tests/test_greedy.py \
    tests/test_top_p.py 2>&1 \
    | grep -v -i warn | tail -8
}

step_rope() {  # scripts/bench_rope.py: the prefill q_pe RoPE as Inductor compiles it, cat form vs indexed form
  timeout 200 $PY scripts/bench_rope.py --json "$OUT/bench_rope.json" 2>&1 | grep -v -i warn | tail -3
}

step_ab_prep() {  # scripts/ab_prep.py: decode prep old (AB_OLD_PREP) vs new, prefill prep kernel vs composition
  timeout 300 $PY scripts/ab_prep.py --old "${AB_OLD_PREP:?AB_OLD_PREP: a copy of kernels/mla_decode_prep.py}" \
    ${AB_PREP_ARGS:-} --json "$OUT/ab_prep.json" 2>&1 | grep -v -i warn | tail -10
}

step_ab_act_quant() {  # scripts/ab_act_quant.py: act_quant / silu_mul_quant old (AB_OLD_LINEAR, AB_OLD_SWIGLU) vs new
  timeout 300 $PY scripts/ab_act_quant.py --old-linear "${AB_OLD_LINEAR:?AB_OLD_LINEAR: a copy of kernels/fp8_linear.py}" \
    --old-swiglu "${AB_OLD_SWIGLU:?AB_OLD_SWIGLU: a copy of kernels/fp8_swiglu.py}" --json "$OUT/ab_act_quant.json" 2>&1 \
    | grep -v -i warn | tail -20
}

step_ab_moe_residual() {  # scripts/ab_moe_residual.py: combine + norm + act_quant vs moe_residual_norm_quant
  timeout 300 $PY scripts/ab_moe_residual.py ${AB_RESIDUAL_ARGS:-} --json "$OUT/ab_moe_residual.json" 2>&1 \
    | grep -v -i warn | tail -6
}

step_sweep_prefill() {
  timeout 560 $PY scripts/sweep_prefill.py ${SWEEP_ARGS:-} --json "$OUT/sweep_prefill.json" 2>&1 | grep -v -i warn \
    | tee "$OUT/sweep_prefill.log" | tail -60
}

step_kpre() {
  timeout 240 $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE -k "prefill or routed or grouped or aoti" tests/test_prefill.py \
    tests/test_kernels.py 2>&1 | tee "$OUT/kpre.log" | tail -15
}

step_ncu_moe() {  # Nsight Compute on the routed-experts kernels (scripts/ncu_moe.py): prefill grouped + decode T=1
  local ncu; ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  if [ -z "$ncu" ]; then echo "ncu not found on this host"; return 1; fi
  timeout 400 "$ncu" --profile-from-start off --kernel-name 'regex:_moe_(up|down|up_rows|up_grouped|down_grouped)_kernel' \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
    $PY scripts/ncu_moe.py >"$OUT/ncu_moe.txt" 2>&1
  echo "ncu exit $?; $(grep -c '_moe_' "$OUT/ncu_moe.txt") kernel lines"
  grep -E '^  _moe_|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issued Ipc|Stall|Executed Ipc|Shared Memory Configuration Size|Block Limit' \
    "$OUT/ncu_moe.txt" | head -90
}

step_prefetch() { timeout 300 $PY scripts/bench_prefetch.py --json "$OUT/bench_prefetch.json" 2>&1 | grep -v -i warn | tail -20; }

step_ncu_mla() {  # Nsight Compute on the MLA decode kernels (scripts/ncu_mla.py): batch 1 at 128 / 8k / 32k, batch 8 at 4k
  local ncu; ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  if [ -z "$ncu" ]; then echo "ncu not found on this host"; return 1; fi
  timeout 300 "$ncu" --profile-from-start off --kernel-name 'regex:_mla_(fwd|combine)_kernel' \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    --section LaunchStats --section SchedulerStats --section SourceCounters \
    $PY scripts/ncu_mla.py >"$OUT/ncu_mla.txt" 2>&1
  echo "ncu exit $?; $(grep -c '_mla_' "$OUT/ncu_mla.txt") kernel lines"
  grep -E '^  _mla_|Duration|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Issued Ipc|Stall|Local Memory|Dynamic Shared|Grid Size|Block Size' \
    "$OUT/ncu_mla.txt" | head -120
}

step_kdec() {
  local files=(tests/test_norm_route.py tests/test_norm.py tests/test_mla_prep.py tests/test_router.py)
  timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE "${files[@]}" 2>&1 \
    | tee "$OUT/kdec.log" | tail -25
}

step_sweep_moe() {  # FP8 decode MoE launch plans (up/down block_n, warps, stages) on the 16B and 671B-ws8 shapes
  timeout 300 $PY scripts/sweep_moe.py ${SWEEP_ARGS:-} --json "$OUT/sweep_moe.json" 2>&1 | grep -v -i warn \
    | tee "$OUT/sweep_moe.log" | tail -80
}

LAYERS16=${LAYERS16:-27}
ART16=${ART16:-$WORK/art16}  # the 16B artifact directory of compile16/run16/prof16/bench16/loadprof
step_ckpt16() {
  [ -f "$WORK/ckpt16/config.json" ] && { echo "ckpt16 exists"; return 0; }
  /usr/bin/time -f "init-random 16B: %e s, max RSS %M KB" \
    $PY -m dsv3.cli init-random --config 16B --dtype "${DTYPE16:-fp8}" --num-layers "$LAYERS16" --out "$WORK/ckpt16" \
    --overwrite 2>&1 | tr '\r' '\n' | tail -3
  du -sh "$WORK/ckpt16"
}

step_compile16() {
  dsv3c compile --config "$WORK/ckpt16" --out "$ART16" --device cuda --max-batch-size 8 --batch-sizes 1,8 \
    --max-seq-len 4096 --prefill-chunk ${PREFILL_CHUNK16:-4096} --overwrite ${JOBS:+--jobs $JOBS} 2>&1 | grep --line-buffered -v Warning | tee "$OUT/compile16.log" \
    | tail -25
  dsv3c inspect "$ART16" | tee "$OUT/inspect16.txt" || keep_wrapper
  ls -la "$ART16"
}

keep_wrapper() {  # the C++ AOTInductor generated last (after a failed build), compressed, for offline reading
  local f
  f=$(ls -t $(find "$TORCHINDUCTOR_CACHE_DIR" -name '*.wrapper.cpp' 2>/dev/null) 2>/dev/null | head -1)
  [ -n "$f" ] && gzip -c "$f" > "$OUT/failed_wrapper.cpp.gz" && echo "kept $f"
}

step_loadprof() { $PY scripts/profile_load.py "$ART16" "$WORK/ckpt16" 2>&1 | grep -v Warning | tail -12; }

step_prof16() { $PY scripts/profile_decode.py "$ART16" "$WORK/ckpt16" "$OUT" 128 4095 2>&1 | grep -v Warning | tail -90; }
step_rows() { timeout 400 $PY scripts/bench_rows.py ${ROWS_ONLY:+--only $ROWS_ONLY} --json "$OUT/rows.json" 2>&1 \
  | grep -v -i warn | tail -30; }
step_prof671() {  # rank 0 of 671B at world size 8 (est671's 4-layer artifacts, built if missing): batch-1 profile
  build671_layers 4
  $PY scripts/profile_decode.py "$WORK/art671_l4" random "$OUT/prof671" 1024 0 2>&1 | grep -v Warning | tail -45
}
step_prof16q() {  # PROF_CTX: the decode step's context (128; quick16's cache holds 4096 rows); PROF_BATCH (1 or 8);
  # PROF_PREFILL: prompt tokens of the prefill profile (4095; 0: none). Outputs in $OUT/prof_b<batch>/
  # PROF_ART: the artifacts under $WORK (art16q; art16b: build16both's BF16 build)
  local dir=$OUT/prof_b${PROF_BATCH:-1}
  $PY scripts/profile_decode.py "$WORK/${PROF_ART:-art16q}" random "$dir" "${PROF_CTX:-128}" "${PROF_PREFILL:-4095}" \
    "${PROF_BATCH:-1}" 2>&1 | grep -v Warning | tail -90
}

step_ckpt16bf16() {  # CPU only: the BF16 copy transformers loads for bench16's --baseline hf
  [ -f "$WORK/ckpt16bf16/config.json" ] && { echo "ckpt16bf16 exists"; return 0; }
  /usr/bin/time -f "convert --dtype bf16: %e s" dsv3c convert --checkpoint "$WORK/ckpt16" --out "$WORK/ckpt16bf16" \
    --dtype bf16 --overwrite 2>&1 | tr '\r' '\n' | grep -v "%|" | tail -3
}

step_bench16() {  # with transformers side by side when ckpt16bf16 exists (BASELINE=0 skips it)
  local base=()
  [ "${BASELINE:-1}" = 1 ] && [ -f "$WORK/ckpt16bf16/config.json" ] && \
    base=(--baseline hf --baseline-checkpoint "$WORK/ckpt16bf16")
  dsv3c bench --artifacts "$ART16" --checkpoint "$WORK/ckpt16" --batch-sizes 1,8 --context 128,4032 \
    --steps 32 --prompt-len 14,4096 "${base[@]}" --json "$OUT/bench16_artifacts.json" --plot "$OUT/bench16_decode.svg" \
    2>&1 | grep --line-buffered -v Warning | tail -17
  dsv3c bench --eager --checkpoint "$WORK/ckpt16" --batch-sizes 1 --context 128 --steps 8 --prompt-len 128 \
    --json "$OUT/bench16_eager.json" 2>&1 | grep --line-buffered -v Warning | tail -4
}

step_run16() {
  local prompts=("Tell me about the weather." "Write a poem about GPUs." "What is 2+2?" "Hello" \
                 "Explain attention." "A long story begins" "Once upon a time" "The capital of France")
  local args=()
  for p in "${prompts[@]}"; do args+=(--prompt "$p"); done
  /usr/bin/time -f "cold start to exit (b1, 64 tokens): %e s" $PY -m dsv3.cli run --artifacts "$ART16" --checkpoint "$WORK/ckpt16" --prompt "${prompts[0]}" \
    --max-new-tokens 64 --stats --output-file "$OUT/run16_b1.jsonl" 2>&1 | grep -E "load|error|Error|cold" | tail -5
  dsv3c run --artifacts "$ART16" --checkpoint "$WORK/ckpt16" "${args[@]}" \
    --max-new-tokens 64 --stats --output-file "$OUT/run16_b8.jsonl" 2>&1 | grep -E "load|error|Error|cold" | tail -5
  dsv3c run --eager --checkpoint "$WORK/ckpt16" --prompt "${prompts[0]}" --max-new-tokens 16 --stats \
    --output-file "$OUT/run16_eager.jsonl" 2>&1 | grep -E "load|error|Error|cold" | tail -5
}

step_det16q() {  # run-to-run determinism on one GPU: quick16's artifacts, random weights, batch 8, twice; tokens compared
  local prompts=("Tell me about the weather." "Write a poem about GPUs." "What is 2+2?" "Hello" \
                 "Explain attention." "A long story begins" "Once upon a time" "The capital of France")
  local args=() r
  for p in "${prompts[@]}"; do args+=(--prompt "$p"); done
  for r in 1 2; do
    dsv3c run --artifacts "$WORK/art16q" --random-weights "${args[@]}" --max-new-tokens 128 --stats \
      --output-file "$OUT/det16q_r$r.jsonl" 2>&1 | grep -E "ms/token|error|Error" | tail -2
  done
  $PY - "$OUT/det16q_r1.jsonl" "$OUT/det16q_r2.jsonl" <<'PYEOF'
import json, sys
a, b = ([json.loads(line)["token_ids"] for line in open(p)] for p in sys.argv[1:3])
same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]
print(f"  greedy tokens, run 1 vs run 2: {same}/{sum(len(r) for r in a)} equal; first difference per prompt: {first}")
PYEOF
}

step_quick16() {  # no checkpoint on disk: FP8 16B config -> compile -> bench with weights generated on the GPU
  local cfg=$WORK/cfg16fp8
  cfg16fp8
  dsv3c compile --config "$cfg" --out "$WORK/art16q" --device cuda --max-batch-size 8 --batch-sizes 1,8 \
    --max-seq-len 4096 --overwrite --jobs "${Q16_JOBS:-6}" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/compile16q.log" | tail -8
  step_bench16q
}

step_long16() {  # decode and prefill at long context: the cache holds 32768 rows per sequence (batch 1 and 8)
  local parts=${LONG16:-build,bench}
  cfg16fp8
  if [[ $parts == *build* ]]; then
    dsv3c compile --config "$WORK/cfg16fp8" --out "$WORK/art16long" --device cuda --max-batch-size 8 --batch-sizes 1,8 \
      --max-seq-len 32768 --overwrite --jobs "${Q16_JOBS:-6}" --no-verify --short-prefill "${SHORT16:-1x16}" \
      > "$OUT/compile_art16long.log" 2>&1
    echo "compile art16long: exit $?"
    grep -v Warning "$OUT/compile_art16long.log" | tail -3
  fi
  if [[ $parts == *bench* ]]; then
    dsv3c bench --artifacts "$WORK/art16long" --random-weights --batch-sizes 1,8 --context 128,4032,16384,32640 \
      --steps 32 --prompt-len 4096,16384,32767 --json "$OUT/bench16long.json" 2>&1 \
      | grep --line-buffered -v -E "Warning|%\|" | tail -20
  fi
}

step_wide16() {  # decode at a server's batch sizes next to 1 and 8, from one build
  local parts=${WIDE16:-build,bench} batches=${WIDE16_BATCHES:-1,8,32}
  cfg16fp8
  if [[ $parts == *build* ]]; then
    dsv3c compile --config "$WORK/cfg16fp8" --out "$WORK/art16w" --device cuda --max-batch-size "${batches##*,}" \
      --batch-sizes "$batches" --max-seq-len 4096 --overwrite ${Q16_JOBS:+--jobs $Q16_JOBS} --no-verify \
      --short-prefill "${SHORT16:-1x16}" > "$OUT/compile_art16w.log" 2>&1
    echo "compile art16w: exit $?"
    grep -v Warning "$OUT/compile_art16w.log" | tail -3
  fi
  if [[ $parts == *bench* ]]; then
    dsv3c bench --artifacts "$WORK/art16w" --random-weights --batch-sizes "$batches" --context 128,4032 --steps 32 \
      --prompt-len 4096 --json "$OUT/bench16w.json" 2>&1 | grep --line-buffered -v -E "Warning|%\|" | tail -16
  fi
}

step_bench16q() {  # dsv3c bench on quick16's (or build16both's FP8) artifacts, weights generated on the GPU
  dsv3c bench --artifacts "$WORK/art16q" --random-weights --batch-sizes 1,8 --context 128,4032 --steps 32 \
    --prompt-len 14,4096 --json "$OUT/bench16q.json" 2>&1 | grep --line-buffered -v -E "Warning|%\|" | tail -13
}

step_anatomy16() {  # the 16B FP8 config at 3 layers (dense + 2 MoE) compiled with its own Inductor cache, then the
  # prefill / decode profiles of prof16q on it; the Inductor-generated Triton kernels' sources land in
  # $OUT/anatomy16/kernels.tgz, so each profiled glue kernel can be read
  local cfg=$WORK/cfg16fp8 cache=$WORK/ind_anatomy16 dir=$OUT/anatomy16
  cfg16fp8
  rm -rf "$cache"
  TORCHINDUCTOR_CACHE_DIR=$cache dsv3c compile --config "$cfg" --num-layers 3 --out "$WORK/art16l3" --device cuda \
    --max-batch-size 1 --batch-sizes 1 --max-seq-len 4096 --overwrite --no-verify 2>&1 | grep -v Warning | tail -3
  $PY scripts/profile_decode.py "$WORK/art16l3" random "$dir" 128 4095 1 2>&1 | grep -v Warning | tail -45
  # one archive (the device tool brings back a bounded number of files): tar xzf kernels.tgz, grep '^def triton_'
  (cd "$cache" && grep -rl --include='*.py' -E '^def triton_' . | tar czf "$dir/kernels.tgz" -T -)
}

step_static16() {  # static prompt widths on the 16B FP8 config at 3 layers (dense + 2 MoE), every launch synchronous
  # (CUDA_LAUNCH_BLOCKING=1: a fault is reported by the launch that made it): the eager model at prompt lengths
  # STATIC16_LENS (16,32,64,128) and decode batches 1, 8, 32, then (STATIC16_BUILD=1) a build with static first-chunk
  # graphs STATIC16_SHORT (1x64,1x128) and scripts/bench_ttft.py replaying them
  local cfg=$WORK/cfg16fp8
  cfg16fp8
  $PY -c "import dsv3.kernels.routed_experts as r; print('routed_experts:', r.__file__, 'sparse tiles:', hasattr(r, 'SPARSE_TILE_PAIRS'))"
  CUDA_LAUNCH_BLOCKING=1 timeout 240 $PY -m dsv3.cli bench --eager --random-weights --config "$cfg" --num-layers 3 \
    --batch-sizes 1,8,32 --context 128 --steps 4 --prompt-len "${STATIC16_LENS:-16,32,64,128}" 2>&1 \
    | grep --line-buffered -v -E "Warning|%\|" | tail -14
  [ "${STATIC16_BUILD:-0}" = 1 ] || return 0
  /usr/bin/time -f "build %e s" timeout 300 $PY -m dsv3.cli compile --config "$cfg" --num-layers 3 --out "$WORK/art16s" \
    --device cuda --max-batch-size 1 --batch-sizes 1 --max-seq-len 4096 --short-prefill "${STATIC16_SHORT:-1x64,1x128}" \
    --overwrite --no-verify --jobs 4 > "$OUT/compile_static16.log" 2>&1; echo "compile exit $?"
  grep -v Warning "$OUT/compile_static16.log" | tail -3
  CUDA_LAUNCH_BLOCKING=1 timeout 200 $PY scripts/bench_ttft.py "$WORK/art16s" --lengths 50,100 --batches 1 --repeats 2 \
    2>&1 | grep -v -i warn | tail -14
}

step_ab16() {  # A/B of trace-time fusion switches on the 16B FP8 config at AB_LAYERS layers (default 8): one build
  # per variant (the default, then each DSV3_* setting in AB_VARIANTS), timed round-robin by rank_timing.py
  local cfg=$WORK/cfg16fp8 layers=${AB_LAYERS:-8} v dirs=() name
  cfg16fp8
  # built variants stay in $WORK while the machine is warm: a call that ran out of time can be repeated
  for v in default ${AB_VARIANTS:-DSV3_NORM_ROUTE=torch}; do
    name=ab16_${v//[^A-Za-z0-9]/_}
    dirs+=("$WORK/$name")
    [ -f "$WORK/$name/manifest.json" ] && continue
    ( verify=(); extra=(); if [ "$v" = default ]; then verify=(--no-verify)
      elif [ "${v:0:2}" = -- ]; then extra=(${v//,/ }); else export ${v//,/ }; fi
      /usr/bin/time -f "$v: build %e s" $PY -m dsv3.cli compile --config "$cfg" --num-layers "$layers" \
        --out "$WORK/$name" --device cuda --max-batch-size 8 --batch-sizes 1,8 --max-seq-len 4096 --overwrite \
        --jobs 3 "${verify[@]}" "${extra[@]}" 2>&1 | grep --line-buffered -v Warning | tail -4 ) &
    # AB_PARALLEL=1: all variants build at once (3 processes each; the host has 16 cores), else one at a time
    [ "${AB_PARALLEL:-0}" = 1 ] || wait
  done
  wait
  $PY scripts/rank_timing.py --json "$OUT/ab16.json" --repeats ${AB_REPEATS:-5} "${dirs[@]}" 2>&1 | grep -v Warning \
    | tail -12
  if [ "${AB_PROFILE:-0}" = 1 ]; then  # kernels per step of the default and the last variant (decode only)
    for name in "${dirs[0]}" "${dirs[-1]}"; do
      mkdir -p "$OUT/$(basename "$name")"
      $PY scripts/profile_decode.py "$name" random "$OUT/$(basename "$name")" 128 0 2>&1 | grep -v Warning \
        | grep -E -i "replay|kernels|launch" | head -6
    done
  fi
}

step_compile16_ws2() {
  dsv3c compile --config "$WORK/ckpt16" --out "$WORK/art16_ws2" --world-size 2 --device cuda --max-batch-size 8 \
    --batch-sizes 1,8 --max-seq-len 4096 --prefill-chunk ${PREFILL_CHUNK16:-4096} --overwrite ${JOBS:+--jobs $JOBS} 2>&1 \
    | grep --line-buffered -v Warning | tee "$OUT/compile16_ws2.log" | tail -12
}

step_nccl2() {  # each under a timeout (a hung collective must not eat the device call); full logs in $OUT
  timeout 300 $PY -m torch.distributed.run --standalone --nproc-per-node 2 scripts/nccl_check.py "$WORK/art16_ws2" \
    "$WORK/ckpt16" "$OUT/nccl2.json" >"$OUT/nccl2.log" 2>&1; echo "nccl_check exit $?"
  grep -v -E "Warning|warn|tokenizer you are" "$OUT/nccl2.log" | tail -30
  /usr/bin/time -f "ws2 run, cold start to exit: %e s" timeout 240 $PY -m dsv3.cli run --world-size 2 \
    --artifacts "$WORK/art16_ws2" --checkpoint "$WORK/ckpt16" --prompt "Hello there" \
    --prompt "Write a poem about GPUs." --max-new-tokens 32 --stats >"$OUT/run16_ws2.log" 2>&1; echo "run exit $?"
  grep -E "load|error|Error|cold" "$OUT/run16_ws2.log" | tail -5
}

step_compile671() {
  dsv3c compile --config 671B --world-size 8 --num-layers "${NUM_LAYERS_671:-61}" --out "$WORK/art671" \
    --device cuda --max-batch-size 8 --batch-sizes 1,8 --max-seq-len 4096 --prefill-chunk 512 --overwrite \
    ${NO_VERIFY_671:+--no-verify} 2>&1 | grep --line-buffered -v Warning | tee "$OUT/compile671.log" | tail -25
  dsv3c inspect "$WORK/art671" | tee "$OUT/inspect671.txt" || keep_wrapper
}

build671_layers() {  # 671B rank graphs at world size 8 with $1 layers into $WORK/art671_l$1 (kept while warm)
  [ -f "$WORK/art671_l$1/manifest.json" ] && return 0
  dsv3c compile --config 671B --world-size 8 --num-layers $1 --out "$WORK/art671_l$1" --device cuda \
    --max-batch-size 8 --batch-sizes 1,8 --max-seq-len 4096 --prefill-chunk 512 --overwrite --no-verify \
    --jobs 3 2>&1 | grep --line-buffered -v Warning | tail -3
}
step_est671() {  # one rank of 671B at world size 8 on this GPU: decode at 4, 6 and 8 layers, fitted line to 61
  local n dirs=()
  for n in ${EST671_LAYERS:-4 6 8}; do
    dirs+=("$WORK/art671_l$n")
    build671_layers $n
  done
  $PY scripts/rank_timing.py --json "$OUT/rank671.json" --full-layers 61 --repeats 3 "${dirs[@]}" 2>&1 \
    | grep -v Warning | tail -12
  # the same rank through the CLI (roofline of the rank's bytes, prefill MFU)
  dsv3c bench --artifacts "${dirs[-1]}" --random-weights --stub-collectives --batch-sizes 1,8 --context 1024 \
    --steps 16 --prompt-len 512 --json "$OUT/bench671_rank0.json" 2>&1 | grep -v -i warn | tail -8
}

step_ab671() {  # A/B of compile options / trace-time switches on rank 0 of 671B at world size 8 (AB671_LAYERS, 4):
  # one build per variant (default + AB_VARIANTS, syntax as ab16's), decode timed round-robin (collectives stubbed)
  local layers=${AB671_LAYERS:-4} v dirs=() name
  for v in default ${AB_VARIANTS:---batch1-activations=fp8}; do
    name=ab671_${v//[^A-Za-z0-9]/_}
    dirs+=("$WORK/$name")
    [ -f "$WORK/$name/manifest.json" ] && continue
    ( extra=(); if [ "${v:0:2}" = -- ]; then extra=(${v//,/ }); elif [ "$v" != default ]; then export ${v//,/ }; fi
      /usr/bin/time -f "$v: build %e s" dsv3c compile --config 671B --world-size 8 --num-layers "$layers" \
        --out "$WORK/$name" --device cuda --max-batch-size 8 --batch-sizes 1,8 --max-seq-len 4096 \
        --prefill-chunk 512 --overwrite --no-verify --jobs 3 "${extra[@]}" 2>&1 | grep --line-buffered -v Warning \
        | tail -3 ) &
    [ "${AB_PARALLEL:-0}" = 1 ] || wait
  done
  wait
  $PY scripts/rank_timing.py --json "$OUT/ab671.json" --repeats ${AB_REPEATS:-5} "${dirs[@]}" 2>&1 | grep -v Warning \
    | tail -12
}

step_ar2() {  # needs 2 GPUs: NCCL all-reduce / all-gather latency of a decode step's collectives, in a CUDA graph
  timeout 240 $PY -m torch.distributed.run --standalone --nproc-per-node 2 scripts/allreduce_latency.py \
    "$OUT/allreduce_ws2.json" 2>&1 | grep -v -i warn | tail -8
}

step_run671ws() {  # issue 8 on a 2- or 4-GPU host: 671B truncated to LAYERS671WS (8) layers at world size WS671
  # (default: every visible GPU), TP + EP over NCCL with each rank's weights made on its GPU: dsv3c run at batch 1
  # and 8 (TTFT, ms/token), then rank 0's graphs timed alone on GPU 0 with the collectives stubbed: the difference
  # is what the collectives cost at 671B shapes. Per rank: ~11.3 GB of experts per layer / WS, so 8 layers fit at 2.
  local ws=${WS671:-$(nvidia-smi -L | wc -l)} n=${LAYERS671WS:-8} b args dir
  dir=$WORK/art671_ws${ws}_l$n
  [ -f "$dir/manifest.json" ] || dsv3c compile --config 671B --world-size "$ws" --num-layers "$n" --out "$dir" \
    --device cuda --max-batch-size 8 --batch-sizes 1,8 --max-seq-len 4096 --prefill-chunk 512 --overwrite \
    --no-verify 2>&1 | grep --line-buffered -v Warning | tail -4
  local prompts=("Tell me about the weather." "Write a poem about GPUs." "What is 2+2?" "Hello" \
                 "Explain attention." "A long story begins" "Once upon a time" "The capital of France")
  for b in 1 8; do
    args=()
    for p in "${prompts[@]:0:$b}"; do args+=(--prompt "$p"); done
    timeout 300 $PY -m dsv3.cli run --world-size "$ws" --artifacts "$dir" --random-weights "${args[@]}" \
      --max-new-tokens 64 --stats --output-file "$OUT/run671_ws${ws}_b$b.jsonl" > "$OUT/run671_ws${ws}_b$b.log" 2>&1
    echo "ws$ws batch $b: run exit $?"
    grep -E "load|error|Error|ms/token|TTFT|tok/s" "$OUT/run671_ws${ws}_b$b.log" | tail -5
  done
  $PY scripts/rank_timing.py --json "$OUT/rank671_ws${ws}_l$n.json" --repeats 3 "$dir" 2>&1 | grep -v Warning | tail -4
}

step_coll2() {  # needs 2 GPUs: the one-shot all-reduce op's GPU test (symmetric memory, eager and in a CUDA graph)
  timeout 580 $PY -m pytest -m gpu -q -s -p no:cacheprovider -rfEs tests/test_collectives.py 2>&1 | grep -v -i warn | tail -25
}

step_ab671ws() {
  local n=${LAYERS671WS:-8} ar b args dir gpu=0
  for ar in nccl one-shot; do
    dir=$WORK/art671_ws2_l${n}_$ar
    [ -f "$dir/manifest.json" ] || CUDA_VISIBLE_DEVICES=$gpu timeout 500 $PY -m dsv3.cli compile --config 671B \
      --world-size 2 --num-layers "$n" --out "$dir" --device cuda --max-batch-size 8 --batch-sizes 1,8 \
      --max-seq-len 4096 --prefill-chunk 512 --all-reduce $ar --overwrite --no-verify > "$OUT/compile671_$ar.log" 2>&1 &
    gpu=$((gpu + 1))
  done
  wait
  for ar in nccl one-shot; do tail -2 "$OUT/compile671_$ar.log"; done
  local prompts=("Tell me about the weather." "Write a poem about GPUs." "What is 2+2?" "Hello" \
                 "Explain attention." "A long story begins" "Once upon a time" "The capital of France")
  for b in 1 8; do
    args=()
    for p in "${prompts[@]:0:$b}"; do args+=(--prompt "$p"); done
    local run=0
    for ar in nccl one-shot nccl one-shot; do  # twice each, interleaved; each run's tokens kept (run 1, run 2)
      run=$((run + 1)); local tag="${ar}_b${b}_r$(( (run + 1) / 2 ))"
      timeout 200 $PY -m dsv3.cli run --world-size 2 --artifacts "$WORK/art671_ws2_l${n}_$ar" --random-weights \
        "${args[@]}" --max-new-tokens 128 --stats --output-file "$OUT/ab671_$tag.jsonl" > "$OUT/ab671_$tag.log" 2>&1
      echo "$ar batch $b: exit $? $(grep -E 'ms/token' "$OUT/ab671_$tag.log" | tail -1)"
    done
    # run to run (the same build twice) and build to build: greedy tokens compared
    local pair
    for pair in "nccl_b${b}_r1 nccl_b${b}_r2" "one-shot_b${b}_r1 one-shot_b${b}_r2" "nccl_b${b}_r1 one-shot_b${b}_r1"; do
      set -- $pair
      $PY - "$OUT/ab671_$1.jsonl" "$OUT/ab671_$2.jsonl" "$1 vs $2" <<'PYEOF'
import json, sys
a, b = ([json.loads(line)["token_ids"] for line in open(p)] for p in sys.argv[1:3])
same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
total = sum(len(r) for r in a)
first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]
print(f"  greedy tokens, {sys.argv[3]}: {same}/{total} equal; first difference per prompt: {first}")
PYEOF
    done
  done
}

step_run671() {  # needs 8 GPUs: 671B from the world-size-8 artifacts of compile671, weights generated on each rank
  local prompts=("Tell me about the weather." "Write a poem about GPUs." "What is 2+2?" "Hello" \
                 "Explain attention." "A long story begins" "Once upon a time" "The capital of France")
  local b args
  for b in 1 8; do
    args=()
    for p in "${prompts[@]:0:$b}"; do args+=(--prompt "$p"); done
    /usr/bin/time -f "671B ws8 batch $b, cold start to exit: %e s" timeout 900 $PY -m dsv3.cli run --world-size 8 \
      --artifacts "$WORK/art671" --random-weights "${args[@]}" --max-new-tokens 64 --stats \
      --output-file "$OUT/run671_b$b.jsonl" > "$OUT/run671_b$b.log" 2>&1; echo "run exit $?"
    grep -E "load|error|Error|cold" "$OUT/run671_b$b.log" | tail -5
  done
}

install
for s in "$@"; do
  echo "=== $s ($(date -u +%T))"
  "step_${s//-/_}"
done
