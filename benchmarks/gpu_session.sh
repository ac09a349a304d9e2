#!/usr/bin/env bash
# The GPU checks and figures issues 9-11 still need, in phases that each write their results to $OUT as they end
# (a phase cut short by its time limit leaves the others' results). Prepare here first:
# ../shared/tools/gpu-prep.sh (wheels in .whl/, ../shared copied to .gpu-shared/), then on the device, after the
# line gpu-prep.sh prints, with carry [".whl", ".gpu-shared"]:
#   bash benchmarks/gpu_session.sh                      # PHASES="check speed runs": about 9 minutes on an H100/H200
#   PHASES="memory" bash benchmarks/gpu_session.sh      # one phase
# Phases (each under its own time limit, seconds):
#   check  (120) benchmarks/gpu_check.py --quick: CUDA graph replays against eager steps (fp32/bf16, dropout)
#   speed  (300) benchmarks/throughput.py --device cuda --quick --whole-job: the seed's loop vs sftune vs packed
#                (real tok/s, ms/step, MFU, peak GPU memory, compile time apart), and the whole seed job
#   runs   (300) benchmarks/gpu_check.py: whole runs --compile off/graphs/torch (fp32, bf16), SIGTERM resume
#                under graphs (bitwise?), the non-finite guard under graphs
#   memory (240) benchmarks/memory.py: full / activation checkpointing / LoRA, GPT-2 small and the 1B Llama
# A dry run of the same steps on a CPU, with tiny models and few steps, checks the script itself:
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results}
PHASES=${PHASES:-check speed runs}
mkdir -p "$OUT"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -n "${QUICK:-}" ]; then
  small=(--model-config tests/fixtures/tiny-llama --batch-size 4 --words 30 --steps 2)
  big=(--model-config tests/fixtures/tiny-llama --batch-size 2 --words 60 --steps 2)
  speed=(--steps 4 --warmup 2)
  runs=(--model tests/fixtures/tiny-llama --dataset examples/quickstart/data --steps 3)
else
  small=(--steps 5)
  big=(--model-config examples/llama-1b --batch-size 8 --words 700 --steps 5)
  speed=(--quick --whole-job)  # (add --packed-compile torch to measure compile on the packed run)
  runs=()
fi
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt"
date=$(date +%Y-%m-%d)
card=$($py -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'cpu')")

phase() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) ==="
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "=== $name: exit $code after $((SECONDS - started)) s ==="
  tail -n 25 "$OUT/$name.log"
}

for p in $PHASES; do
  case $p in
    check) [ "$DEVICE" = cuda ] && phase check 120 $py benchmarks/gpu_check.py --quick --json "$OUT/gpu-check-quick.json" ;;
    speed) phase speed 300 $py benchmarks/throughput.py --device "$DEVICE" "${speed[@]}" --json "$OUT/$card-$date.json" ;;
    runs) phase runs 300 $py benchmarks/gpu_check.py --device "$DEVICE" "${runs[@]}" --json "$OUT/gpu-check.json" ;;
    memory)
      phase memory-small 120 $py benchmarks/memory.py --device "$DEVICE" "${small[@]}" --json
      phase memory-big 120 $py benchmarks/memory.py --device "$DEVICE" "${big[@]}" --json ;;
    *) echo "unknown phase $p (check, speed, runs, memory)" ;;
  esac
done
ls -la "$OUT"
