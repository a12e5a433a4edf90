#!/usr/bin/env bash
# GPU checks and benchmarks for dsv3.kernels, for one device call. Run from the repository root:
#   bash scripts/gpu_kernels.sh [tests] [bench] [sweep] [aoti]      (default: tests bench)
#   tests : pytest -m gpu tests/test_kernels.py, except the AOTInductor packages (add `aoti` for those)
#   bench : python -m dsv3.kernels.bench (ceilings, linears, MLA, MoE, baselines) -> $OUT/bench_kernels.json
#   sweep : bench with launch-config sweeps on a few shapes
# Logs and the JSON land in $OUT (the device tool's output folder; ./gpu_out elsewhere).
# Budgets (seconds, environment): TEST_TIMEOUT (300), BENCH_TIMEOUT (240). PYTEST_K narrows the tests (-k).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/dsv3-inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/dsv3-triton}
# compile_stack.md §3: AOTInductor .so files built with the image's /opt/gcc wrapper crash at load.
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++

# Make `dsv3.kernels` importable (the package maps kernels/ -> dsv3.kernels): editable install, offline.
if ! $PY -c "import dsv3.kernels" 2>/dev/null; then
  if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.log" 2>&1; then
    echo "editable install failed (see pip.log); falling back to a copied package tree" | tee -a "$OUT/pip.log"
    SHIM=/tmp/dsv3-shim; rm -rf "$SHIM"; mkdir -p "$SHIM"
    cp -r dsv3 "$SHIM/dsv3"
    for sub in kernels configs compiler runtime export; do [ -d "$sub" ] && cp -r "$sub" "$SHIM/dsv3/$sub"; done
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  $PY -c "import torch, triton, dsv3.kernels, torch.nn.functional as F; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'scaled_mm', hasattr(F, 'scaled_mm'), 'gpu', torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests bench)
has() { local s; for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

rc=0
if has tests || has aoti; then
  sel="not aoti"
  has aoti && sel="aoti"
  has tests && has aoti && sel=""
  kexpr="${PYTEST_K:-$sel}"
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -m gpu -q -p no:cacheprovider -p no:logging --tb=short -rfE ${kexpr:+-k "$kexpr"} \
    tests/test_kernels.py 2>&1 | tee "$OUT/tests.log"
  rc=$((rc | PIPESTATUS[0]))
fi
if has bench || has sweep; then
  extra=""
  has sweep && extra="--sweep"
  timeout "${BENCH_TIMEOUT:-240}" $PY -m dsv3.kernels.bench --out "$OUT" ${BENCH_ONLY:+--only "$BENCH_ONLY"} $extra \
    2>&1 | tee "$OUT/bench.log" | grep -v "^| sweep"
  rc=$((rc | PIPESTATUS[0]))
fi
echo "gpu_kernels.sh: exit $rc"
exit $rc
