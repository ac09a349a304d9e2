#!/usr/bin/env bash
# The GPU figures issues 9, 10 and 11 still need, in one device call (about 6-8 minutes on an H100/H200).
# Prepare here first: ../shared/tools/gpu-prep.sh (wheels in .whl/, ../shared copied to .gpu-shared/), then run
# on the device, after the line gpu-prep.sh prints, with carry [".whl", ".gpu-shared"]:
#   bash benchmarks/gpu_session.sh            # results (JSON and logs) in $OUT, else benchmarks/results/
# A dry run of the same steps on a CPU, with tiny models and few steps, checks the script itself:
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
py=${PYTHON:-python3}
if [ -n "${QUICK:-}" ]; then
  small=(--model-config tests/fixtures/tiny-llama --batch-size 4 --words 30 --steps 2)
  big=(--model-config tests/fixtures/tiny-llama --batch-size 2 --words 60 --steps 2)
  seed_steps=4
  seed_extra=(--batch-size 4 --max-length 64)  # (on a CPU, 32 packed rows of 1,024 tokens would not fit)
else
  small=(--steps 5)
  big=(--model-config examples/llama-1b --batch-size 8 --words 700 --steps 5)
  seed_steps=300
  seed_extra=()
fi
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" || true

# issue 10/11: peak memory and step time, full vs activation checkpointing vs LoRA (GPT-2 small, then 1B Llama)
$py benchmarks/memory.py --device "$DEVICE" "${small[@]}" --json > "$OUT/memory-small.json"
$py benchmarks/memory.py --device "$DEVICE" "${big[@]}" --json > "$OUT/memory-big.json"

# issue 9: the seed's job (GPT-2 small, random init, SST-2) at sftune's defaults and packed: tok/s and MFU per log line
for mode in defaults packing; do
  extra=(); [ "$mode" = packing ] && extra=(--packing)
  $py -m sftune train --config configs/gpt2-sst2.yaml --model ../shared/models/gpt2 --init random \
    --dataset ../shared/data/sst2 --device "$DEVICE" --max-steps "$seed_steps" --log-every 50 --eval-every 100000 \
    --report-to none --output-dir "/tmp/sftune-gpu-$mode" --overwrite "${seed_extra[@]}" "${extra[@]}" \
    > "$OUT/seed-$mode.log" 2>&1
  cp "/tmp/sftune-gpu-$mode/metrics.jsonl" "$OUT/seed-$mode.metrics.jsonl"
done
ls -la "$OUT"
