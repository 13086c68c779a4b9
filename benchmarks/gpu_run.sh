#!/usr/bin/env bash
# One prepared device call: GPU correctness, then `normlab bench` on CUDA (see benchmarks/README).
# Usage (on the lent GPU machine, from the repository root): bash benchmarks/gpu_run.sh PHASES
# PHASES: any of check bench compile bf16 (default: check bench compile). Each phase has its own
# time limit so that a slow one cannot eat the others' results; logs and JSON go to $OUT.
set -u
OUT=${OUT:-/tmp/normlab-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
if ls .whl/*.whl >/dev/null 2>&1; then  # Liger-Kernel travels as a wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
phases=${*:-check bench compile}
for phase in $phases; do
  start=$(date +%s)
  case $phase in
    check) timeout 120 python3 benchmarks/gpu_check.py --json "$OUT/check.json" \
             > "$OUT/check.log" 2>&1; echo "check rc=$?"; grep -E "FAIL|passed|took" "$OUT/check.log" ;;
    bench) timeout 200 python3 -m normlab.bench --device cuda --min-time 0.02 \
             --json "$OUT/bench_fp32.json" > "$OUT/bench_fp32.log" 2>&1; echo "bench rc=$?" ;;
    compile) timeout 200 python3 -m normlab.bench --device cuda --min-time 0.02 --compile \
               --ops layer_norm rms_norm add_rms_norm --json "$OUT/bench_compile.json" \
               > "$OUT/bench_compile.log" 2>&1; echo "compile rc=$?" ;;
    bf16) timeout 150 python3 -m normlab.bench --device cuda --min-time 0.02 --dtype bfloat16 \
            --ops layer_norm rms_norm add_layer_norm add_rms_norm --json "$OUT/bench_bf16.json" \
            > "$OUT/bench_bf16.log" 2>&1; echo "bf16 rc=$?" ;;
    *) echo "unknown phase $phase" ;;
  esac
  echo "phase $phase took $(( $(date +%s) - start )) s"
done
