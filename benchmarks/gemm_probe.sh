#!/bin/bash
# The decode step's matmuls under XLA's GEMM backends (benchmarks/gemm_probe.py once per flag set), then the
# engine's base decode step (benchmarks/decode_diag.py) under the default flags and the skeleton's best set.
#   OUT=$OUT bash benchmarks/gemm_probe.sh
set -u
OUT=${OUT:-.}
BATCHES=${BATCHES:-32,64,256}
declare -A SETS=(
  [default]=""
  [cublas]="--xla_gpu_enable_triton_gemm=false"
  [cublaslt]="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true"
  [exhaustive]="--xla_gpu_exhaustive_tiling_search=true"
)
for name in default cublas cublaslt exhaustive; do
  XLA_FLAGS="${SETS[$name]}" timeout 150 python benchmarks/gemm_probe.py --label "$name" --batches "$BATCHES" \
    --out "$OUT" 2>&1 | grep -v cuda_timer
done
# the flag set whose separate-weights skeleton is fastest summed over the batches
best=$(python - "$OUT" <<'PY'
import glob, json, sys
tot = {}
for f in glob.glob(f"{sys.argv[1]}/gemm_probe_*.json"):
    r = json.load(open(f))
    tot[r["label"]] = sum(row["ms"] for row in r["rows"] if row["layout"] == "separate")
print(min((t, n) for n, t in tot.items() if n != "default")[1])
PY
)
echo "best non-default flag set: $best"
for name in default "$best"; do
  XLA_FLAGS="${SETS[$name]}" timeout 150 python benchmarks/decode_diag.py --label "$name" --batches "$BATCHES" \
    --out "$OUT/decode_diag_$name.json" 2>&1 | grep -v cuda_timer
done
