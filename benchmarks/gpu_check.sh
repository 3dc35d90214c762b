#!/usr/bin/env bash
# Full-size checks on a CUDA machine with torch (CUDA) and mlx-cuda installed (e.g. one H200):
#   1. the torch parity tier at the real sizes in bfloat16 (random weights unless ZIMAGE_WEIGHTS is set),
#   2. the benchmark: MLX vs diffusers, bf16, full configs, 512² and 1024²,
#   3. one full-size DiT step at 1024² with and without the prepared caption path, mx.compile and fused projections.
# Budget: about 8 minutes on an H200 (parity ~3 min: 21 GB of random weights drawn on the GPU, saved and
# loaded back; bench ~4 min). Results go to $OUT (default ./gpu_check_out): parity.json, bench.json, logs.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   OUT=/somewhere ZIMAGE_WEIGHTS=/models/Z-Image-Turbo bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python - <<'EOF' || { echo "gpu_check: needs torch with CUDA and MLX with a GPU backend (pip install mlx[cuda])"; exit 2; }
import mlx.core as mx, torch
assert torch.cuda.is_available(), "torch has no CUDA"
assert mx.is_available(mx.gpu), "MLX has no GPU backend"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; MLX {mx.__version__}")
EOF
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>/dev/null | tee "$OUT/gpu.txt"

status=0
start=$(date +%s)
# 1. parity tier (prints the table; JSON report in $OUT/parity.json). Temp weights default to the system temp dir;
#    set ZIMAGE_PARITY_TMP to a disk with >= 25 GB free if /tmp is small.
ZIMAGE_PARITY_SIZE=full ZIMAGE_PARITY_REPORT="$OUT/parity.json" \
    timeout 330 python -m pytest -m parity tests/parity -s -q -p no:cacheprovider 2>&1 | tee "$OUT/parity.log"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu_check: parity tier failed (exit $rc)"; status=1; }
echo "parity: $(( $(date +%s) - start )) s"

# 2. benchmark (MLX then diffusers on the same GPU and dtype; one model resident at a time).
start=$(date +%s)
timeout 300 python benchmarks/bench.py --device gpu --dtype bfloat16 --config full --sizes 512,1024 --diffusers \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu_check: benchmark failed (exit $rc)"; status=1; }
echo "bench: $(( $(date +%s) - start )) s"

# 3. one full-size DiT step at 1024²: per-call / prepared / compiled / fused / fused-compiled (step_bench.py).
start=$(date +%s)
timeout 180 python benchmarks/step_bench.py --device gpu --config full-width --layers 30 --size 1024 --repeats 5 \
    --json "$OUT/step.json" 2>&1 | tee "$OUT/step.log"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu_check: step benchmark failed (exit $rc)"; status=1; }
echo "step: $(( $(date +%s) - start )) s"
exit $status
