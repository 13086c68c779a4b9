#!/usr/bin/env bash
# One prepared device call: GPU correctness, then `normlab bench` on CUDA (see gpu_notes.md).
# Usage (on the lent GPU machine, from the repository root): bash benchmarks/gpu_run.sh PHASES
# PHASES: any of check bench compile bf16 tiny probe bnprobe (default: check bench compile);
# CHECK_ONLY=REGEX limits the check to matching cases (gpu_check.py --only). Each phase has its own
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
log="$OUT/run.log"
summary() {  # compact table from a bench JSON, for the reply's tail
  python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["results"]:
    t, sp = r["times_ms"], r.get("speedup", {})
    cols = " ".join(f"{p}={t[p]:.3f}" for p in ("normlab", "torch", "compile", "liger", "copy") if p in t)
    rat = " ".join(f"x{k[3:]}={v:.2f}" for k, v in sp.items() if k != "vs_reference")
    shape = "x".join(map(str, r["shape"])) + (" CL" if r["layout"] == "channels_last" else "")
    print(f"{r['case'][:14]:14s} {shape:17s} {r['pass']:7s} {cols} | {rat} | {100 * r.get('fraction_of_copy', 0):.0f}%copy")
PY
}
phases=${*:-check bench compile}
for phase in $phases; do
  start=$(date +%s)
  echo "=== $phase" >> "$log"
  case $phase in
    check) timeout 150 python3 benchmarks/gpu_check.py --dtypes float32 bfloat16 \
             ${CHECK_ONLY:+--only "$CHECK_ONLY"} --json "$OUT/check.json" >> "$log" 2>&1
           echo "check rc=$?"
           grep -E "^FAIL|passed" "$log" ;;
    bench) timeout 150 python3 -m normlab.bench --device cuda --min-time 0.02 --repeats 5 \
             --json "$OUT/bench_fp32.json" >> "$log" 2>&1; echo "bench rc=$?"
           [ -f "$OUT/bench_fp32.json" ] && summary "$OUT/bench_fp32.json" ;;
    compile) for op in layer_norm rms_norm; do
               timeout 42 python3 -m normlab.bench --device cuda --min-time 0.02 --repeats 5 \
                 --compile --ops $op --json "$OUT/compile_$op.json" >> "$log" 2>&1
               echo "compile $op rc=$?"
               [ -f "$OUT/compile_$op.json" ] && summary "$OUT/compile_$op.json"
             done ;;
    bf16) timeout 100 python3 -m normlab.bench --device cuda --min-time 0.02 --repeats 5 \
            --dtype bfloat16 --ops layer_norm rms_norm add_layer_norm add_rms_norm \
            --json "$OUT/bench_bf16.json" >> "$log" 2>&1; echo "bf16 rc=$?"
          [ -f "$OUT/bench_bf16.json" ] && summary "$OUT/bench_bf16.json" ;;
    tiny) timeout 60 python3 -m normlab.bench --device cuda --tiny --min-time 0.02 --repeats 5 \
            --json "$OUT/bench_tiny.json" >> "$log" 2>&1; echo "tiny rc=$?"
          [ -f "$OUT/bench_tiny.json" ] && summary "$OUT/bench_tiny.json" ;;
    probe) timeout 240 python3 benchmarks/gpu_probe_vec.py 2>&1 | tee -a "$log" | grep -v Warn
           echo "probe rc=$?" ;;
    bnprobe) timeout 90 python3 benchmarks/gpu_probe_bn.py 2>&1 | tee -a "$log"
             echo "bnprobe rc=$?" ;;
    *) echo "unknown phase $phase" ;;
  esac
  echo "phase $phase took $(( $(date +%s) - start )) s"
done
