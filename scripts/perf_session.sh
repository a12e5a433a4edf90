#!/usr/bin/env bash
# One device session of decode-performance work on a fresh nvidia-h200, meant to run in the background while
# short device calls poll it (a single call may not exceed 10 minutes):
#   setsid nohup bash scripts/perf_session.sh > /tmp/perf.out 2>&1 &      then: tail /tmp/perf.out
# Phases; logs under $OUT/<phase>/ (default OUT=/tmp/perf), a line "PERF_SESSION_DONE" at the end:
#   k/  env; the 16B checkpoint (CPU, background) while the GPU kernel tests run (KGPU=0 skips them) and, with
#       EST671=1, one 671B world-size-8 rank is compiled at 4 and 6 layers and timed; SWEEP=1 adds the GEMV (quick)
#       and MoE decode sweeps; TUNE=1 then builds with the measured GEMV table (DSV3_GEMV_TABLE)
#   a/  16B compile (3 build processes; the BF16 copy for transformers converts meanwhile, BASELINE=0 skips it), run
#       from the artifacts, decode profile, bench (context 128 and 4032, transformers side by side)
# Everything ends up in /tmp/perf.tgz (one file for the device tool to bring back).
set -u
cd "$(dirname "$0")/.."
OUT=${PERF_OUT:-/tmp/perf}  # never the device tool's $OUT: each device call empties that folder
WORK=${WORK:-/tmp/dsv3-work}
export WORK
mkdir -p "$OUT/k" "$OUT/a"
G="bash scripts/gpu_check.sh"
stamp() { echo "=== $1 $(date -u +%T)"; }

stamp env; OUT=$OUT/k $G env
stamp "ckpt16 (background) + kgpu"
OUT=$OUT/k $G ckpt16 > "$OUT/k/ckpt16.out" 2>&1 &
[ "${KGPU:-1}" = 1 ] && OUT=$OUT/k $G kgpu
[ "${EST671:-0}" = 1 ] && { stamp est671; OUT=$OUT/k $G est671; }
wait
tail -3 "$OUT/k/ckpt16.out"
[ "${SWEEP:-0}" = 1 ] && { stamp "sweep-gemv (quick) + sweep-moe"; OUT=$OUT/k SWEEP_ARGS=--quick $G sweep-gemv;
                            OUT=$OUT/k $G sweep-moe moe-grouped; }

# TUNE=1 (with SWEEP=1): build the artifacts with the GEMV table the sweep just measured on this GPU (trace-time knob)
[ "${TUNE:-0}" = 1 ] && [ -f "$OUT/k/sweep_gemv.json" ] && { export DSV3_GEMV_TABLE=$OUT/k/sweep_gemv.json;
                                                         echo "DSV3_GEMV_TABLE=$DSV3_GEMV_TABLE"; }
stamp "compile16 (+ ckpt16bf16 in the background)"
[ "${BASELINE:-1}" = 1 ] && { OUT=$OUT/a $G ckpt16bf16 > "$OUT/a/ckpt16bf16.out" 2>&1 & }
OUT=$OUT/a JOBS=3 $G compile16
wait
cat "$OUT/a/ckpt16bf16.out" 2>/dev/null | tail -3
stamp "run16 prof16 bench16"
OUT=$OUT/a $G run16 prof16 bench16
tar czf /tmp/perf.tgz -C "$(dirname "$OUT")" "$(basename "$OUT")" /tmp/perf.out 2>/dev/null
stamp PERF_SESSION_DONE
