#!/usr/bin/env bash
# The GPU checks and figures issues 9-11 still need, in phases that each write their results to $OUT as they end
# (a phase cut short by its time limit leaves the others' results). Prepare here first:
# ../shared/tools/gpu-prep.sh (wheels in .whl/, ../shared copied to .gpu-shared/), then on the device, after the
# line gpu-prep.sh prints, with carry [".whl", ".gpu-shared"]:
#   bash benchmarks/gpu_session.sh                      # PHASES="check speed": about 6 minutes on an H100/H200
#   PHASES="runs fusion" bash benchmarks/gpu_session.sh # then, in a second call while the machine is warm
# (one call may run 10 minutes at most: the phases' limits below add up to more, so split them over calls)
# Phases (each under its own time limit, seconds):
#   check  (260) benchmarks/gpu_check.py --quick: CUDA graph replays against eager steps (fp32/bf16, dropout;
#                graphs that assign their gradients and graphs that add them; steps of two micro-batches),
#                --attention varlen: the kernel vs SDPA per sequence, the packed loss, a graph of it, its speed;
#                --attention flex the same; the fused loss's chunk math; --compile-blocks (inductor) against the
#                plain blocks, its graph against its eager step, replay times (96 s in try 89, before the blocks)
#   speed  (540) benchmarks/throughput.py --device cuda --quick --whole-job --varlen --flex: the seed's loop vs
#                sftune vs packed (and both under --attention varlen)
#                (real tok/s, ms/step, MFU, peak GPU memory, compile time apart), and the whole seed job
#   runs   (300) benchmarks/gpu_check.py: SIGTERM resume under graphs (bitwise?), the non-finite guard under
#                graphs, then whole runs --compile off/graphs/torch (fp32, bf16) and LoRA (with 2 added tokens), each saved as it ends
#   probe  (200) benchmarks/blocks_probe.py: whether a step with compiled blocks captures (GPT-2 small, dropout 0.1,
#                sftune's attention function, then transformers'), the replay times, and the step after a failure
#   blocks-1b (300) the 1B Llama (packed, bf16, 40 steps) under --compile graphs, without then with --compile-blocks,
#                each its own process: ms a step and losses in blocks-1b*.metrics.jsonl (whether `auto` may take
#                compiled blocks for Llama-shaped models, `step_mode.BLOCKS_MEASURED`; try 148)
#   runs-lora (300) the runs phase's LoRA runs (eager against graphs: issue 11 on the GPU path), then its compiled
#                blocks' runs, LoRA with two added tokens, and fp16 (loss-scaled, eager) against fp32, without the
#                checks before them
#   fusion (300) benchmarks/throughput.py --only packed,packed-flex --packed-compile torch: the packed runs with
#                inductor's fused kernels instead of graphs (for packed rows the step is compute, not launches)
#   blocks (300) benchmarks/throughput.py --compile-blocks --only seed,sftune,packed-flex: the seed's loop, then
#                sftune's seed recipe and packed flex with each transformer block compiled by inductor inside the
#                CUDA graphs (try 89: the packed step's norms, residual adds, GELU, dropout and casts as fused kernels)
#   fusion-seed (200) the seed's recipe under --compile torch --compile-mode reduce-overhead (fusion and graphs)
#   peers  (540) TRL's SFTTrainer (benchmarks/trl_baseline.py) next to sftune: the seed's recipe (TRL's defaults,
#                then without gradient checkpointing), and the 1B Llama packed, full and LoRA r16, both tools;
#                then sftune's 1B run with --attention flex_attention, and with --attention varlen
#   peers-1b (480) the peers phase's 1B Llama runs only (TRL and sftune, full and LoRA r16: issues 10 and 11)
#   memory (360) benchmarks/memory.py: full / activation checkpointing / LoRA, GPT-2 small; the 1B Llama: LoRA
#                (its frozen base kept in bf16, the default) against LoRA with --lora-base-dtype fp32, then full
#   profile (240) --profile-steps: torch.profiler over 10 steps of the seed's recipe (after its graphs are captured;
#                then eagerly) and 4 packed steps; their summaries (wall and GPU-busy ms a step, top kernels) as
#                profile-*.txt, their traces as profile-*.trace.json.gz (PROFILE_KINDS="seed seed-eager seed-blocks
#                packed packed-varlen packed-flex packed-flex-blocks": which runs; the packed-* as the speed
#                phase's, graphs and compiled loss included; -blocks with --compile-blocks, as the blocks phase)
#   loss    (90) benchmarks/gpu_check.py --loss-only: the fused loss on 32,768 rows, eager/compiled x chunk sizes
#   startup (60) python -X importtime -c "import sftune.train", twice: where a job's first seconds go (the whole
#                job spent 14 s before its first line on the H100 machine, 1.8 s on a 2-core CPU; try 64)
#   speed-steps (360) the speed phase without the whole job (about 6 minutes with --flex on an H100)
#   whole-job (300) the seed ratio's two runs and the whole seed job, the notebook against sftune train (issue 9's
#                quarter; its timeline says where sftune's seconds go)
#   samples (60) benchmarks/samples.py --dtype bf16: the seed job's sample prompts one at a time against one batch
#                (what each evaluation's samples cost: try 129)
#   workers (240) benchmarks/data_workers.py: tokenizing with 1, 4, 8 and 16 processes (--data-workers) on 100,000
#                chat rows and SST-2, on the machine's 16 cores (try 133: the default to choose)
# One call for a whole lease: DEADLINE=SECONDS caps every phase at what is left (a phase with under 20 s left is
# skipped), and BUNDLE=DIR keeps DIR/results.tgz up to date after each phase, e.g. on the device
#   OUT=/tmp/gpu BUNDLE=$OUT DEADLINE=560 PHASES="speed check runs fusion" bash benchmarks/gpu_session.sh
# A dry run of the same steps on a CPU, with tiny models and few steps, checks the script itself:
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results}
PHASES=${PHASES:-check speed}
mkdir -p "$OUT"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -n "${QUICK:-}" ]; then
  small=(--model-config tests/fixtures/tiny-llama --batch-size 4 --words 30 --steps 2)
  big=(--model-config tests/fixtures/tiny-llama --batch-size 2 --words 60 --steps 2)
  speed=(--steps 4 --warmup 2)
  speed_steps=("${speed[@]}")
  blocks=("${speed[@]}" --only seed,sftune)
  whole=("${speed[@]}" --only seed,sftune)
  runs=(--model tests/fixtures/tiny-llama --tokenizer bundled:gpt2 --dataset examples/quickstart/data --steps 3)
  seed_trl=(--steps 3 --warmup 1 --model-config tests/fixtures/tiny-llama --tokenizer bundled:gpt2 --batch-size 4 --max-length 64)
  big_trl=(--steps 2 --warmup 1 --model-config tests/fixtures/tiny-llama --tokenizer bundled:gpt2 --packing --max-length 128 --batch-size 2 --lr 3e-4)
  big_sftune=(--model tests/fixtures/tiny-llama --max-length 128 --batch-size 2 --max-steps 3)
  big_blocks=("${big_sftune[@]}" --device cpu --precision fp32 --compile off --compile-backend aot_eager)
  prof_seed=(--model tests/fixtures/tiny-llama --tokenizer bundled:gpt2 --dataset examples/quickstart/data --text-column text --max-steps 4 --profile-steps 3-4)
  no_attention_dropout=attention_dropout=0
  samples=(--model-config tests/fixtures/tiny-llama --repeats 1)
  workers=(--workers 1 2 --rows 2000 --repeats 1)
  prof_packed=(--model tests/fixtures/tiny-llama --tokenizer bundled:gpt2 --dataset examples/quickstart/data --text-column text --max-length 128 --max-steps 3 --profile-steps 2-3)
else
  small=(--steps 5)
  big=(--model-config examples/llama-1b --batch-size 8 --words 700 --steps 5)
  speed=(--quick --whole-job --varlen --flex --packed-compile graphs)  # (explicit graphs: the loss softmax compiled)
  speed_steps=(--quick --varlen --flex --packed-compile graphs)
  blocks=(--quick --only seed,sftune,packed-flex --packed-compile graphs)
  whole=(--quick --only seed,sftune)
  runs=()
  seed_trl=()
  big_trl=(--steps 10 --warmup 3 --model-config examples/llama-1b --tokenizer bundled:gpt2 --packing --max-length 1024 --batch-size 8 --lr 3e-4)
  big_sftune=(--max-steps 13)
  big_blocks=(--max-steps 40 --compile graphs)
  prof_seed=(--model ../shared/models/gpt2 --dataset ../shared/data/sst2 --max-steps 230 --profile-steps 221-230)
  no_attention_dropout=attn_pdrop=0
  samples=()
  workers=(--workers 1 4 8 16 --rows 100000 --repeats 1)
  prof_packed=(--model ../shared/models/gpt2 --dataset ../shared/data/sst2 --max-length 1024 --max-steps 14 --profile-steps 11-14)
fi
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt"
date=$(date +%Y-%m-%d)
card=$($py -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'cpu')")

phase() {  # name, seconds, command...: under the phase's limit, or what is left of DEADLINE if that is less
  local name=$1 limit=$2; shift 2
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt 20 ] && { echo "=== $name: skipped, ${left}s left of DEADLINE ==="; return; }
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "=== $name (limit ${limit}s) ==="
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "=== $name: exit $code after $((SECONDS - started)) s ==="
  tail -n 25 "$OUT/$name.log"
  bundle
}

bundle() {  # BUNDLE=DIR: everything in $OUT also as DIR/results.tgz, renewed after each phase (the device tool
  # brings back at most 8 files from its $OUT)
  [ -n "${BUNDLE:-}" ] || return 0
  # (written outside $OUT, then moved: a tar of a folder it writes into fails, "file changed as we read it")
  tar czf /tmp/results-new.tgz --exclude=results.tgz -C "$OUT" . && mv /tmp/results-new.tgz "$BUNDLE/results.tgz"
}

for p in $PHASES; do
  case $p in
    check) [ "$DEVICE" = cuda ] && phase check 260 $py benchmarks/gpu_check.py --quick --json "$OUT/gpu-check-quick.json" ;;
    loss) [ "$DEVICE" = cuda ] && phase loss 90 $py benchmarks/gpu_check.py --loss-only --json "$OUT/gpu-check-loss.json" ;;
    startup) phase startup 60 bash -c "$py -c 'import os, sys, glob, torch, transformers; d = os.path.dirname; print(\"PYTHONDONTWRITEBYTECODE:\", os.environ.get(\"PYTHONDONTWRITEBYTECODE\"), \"| site-packages writable:\", os.access(d(d(torch.__file__)), os.W_OK), \"| .pyc under torch:\", len(glob.glob(d(torch.__file__) + \"/**/*.pyc\", recursive=True)), \"| under transformers:\", len(glob.glob(d(transformers.__file__) + \"/**/*.pyc\", recursive=True)), \"| modules:\", len(sys.modules))'; df -h \$($py -c 'import torch, os; print(os.path.dirname(torch.__file__))') | tail -1; for i in 1 2; do $py -X importtime -c 'import time; t = time.perf_counter(); import sftune.train; print(f\"import sftune.train: {time.perf_counter() - t:.2f} s\")' 2> \"$OUT/importtime-\$i.txt\"; done; sort -t'|' -k2 -n \"$OUT/importtime-1.txt\" | tail -25" ;;
    speed) phase speed 540 $py benchmarks/throughput.py --device "$DEVICE" "${speed[@]}" --json "$OUT/$card-$date.json" ;;
    speed-steps) phase speed-steps 360 $py benchmarks/throughput.py --device "$DEVICE" "${speed_steps[@]}" --json "$OUT/$card-$date.json" ;;
    whole-job) phase whole-job 300 $py benchmarks/throughput.py --device "$DEVICE" "${whole[@]}" --whole-job --json "$OUT/whole-job-$card-$date.json" ;;
    samples) phase samples 60 $py benchmarks/samples.py --device "$DEVICE" --dtype bf16 "${samples[@]}" ;;
    workers) phase workers 240 $py benchmarks/data_workers.py "${workers[@]}" ;;
    runs) phase runs 300 $py benchmarks/gpu_check.py --device "$DEVICE" --runs-only "${runs[@]}" --json "$OUT/gpu-check.json" ;;
    probe) [ "$DEVICE" = cuda ] && phase probe 200 $py benchmarks/blocks_probe.py ;;
    runs-lora) phase runs-lora 300 $py benchmarks/gpu_check.py --device "$DEVICE" --runs-only --only-runs lora,blocks,lora-tokens,fp16 "${runs[@]}" --json "$OUT/gpu-check-lora.json" ;;
    fusion) [ "$DEVICE" = cuda ] && phase fusion 300 $py benchmarks/throughput.py --device cuda --quick --only packed,packed-flex --packed-compile torch --json "$OUT/packed-compiled-$card-$date.json"
      ;;
    blocks) phase blocks 300 $py benchmarks/throughput.py --device "$DEVICE" "${blocks[@]}" --compile-blocks --json "$OUT/blocks-$card-$date.json" ;;
    fusion-seed) [ "$DEVICE" = cuda ] && phase fusion-seed 200 $py benchmarks/throughput.py --device cuda --quick --only sftune --compile torch --compile-mode reduce-overhead --json "$OUT/seed-compiled-$card-$date.json" ;;
    peers|peers-1b)
      if [ "$p" = peers ]; then
        phase trl-seed 90 $py benchmarks/trl_baseline.py --device "$DEVICE" "${seed_trl[@]}" --json "$OUT/trl-seed.json"
        phase trl-seed-nogc 90 $py benchmarks/trl_baseline.py --device "$DEVICE" "${seed_trl[@]}" --no-gradient-checkpointing --json "$OUT/trl-seed-nogc.json"
      fi
      for lora in "" "--lora-r 16"; do
        tag=${lora:+-lora}
        phase "trl-1b$tag" 120 $py benchmarks/trl_baseline.py --device "$DEVICE" "${big_trl[@]}" --no-gradient-checkpointing $lora --json "$OUT/trl-1b$tag.json"
        phase "sftune-1b$tag" 120 $py -m sftune train --config configs/llama-1b.yaml --dataset ../shared/data/sst2 --device "$DEVICE" "${big_sftune[@]}" --log-every 1 --eval-every 1000 --report-to none --output-dir "/tmp/sftune-1b$tag" --overwrite $lora
        cp "/tmp/sftune-1b$tag/metrics.jsonl" "$OUT/sftune-1b$tag.metrics.jsonl" 2>/dev/null
      done
      [ "$p" = peers ] && for attention in flex_attention varlen; do
        phase "sftune-1b-$attention" 120 $py -m sftune train --config configs/llama-1b.yaml --dataset ../shared/data/sst2 --device "$DEVICE" "${big_sftune[@]}" --log-every 1 --eval-every 1000 --report-to none --output-dir "/tmp/sftune-1b-$attention" --overwrite --attention $attention
        cp "/tmp/sftune-1b-$attention/metrics.jsonl" "$OUT/sftune-1b-$attention.metrics.jsonl" 2>/dev/null
      done ;;
    blocks-1b)
      for blocks in no-compile-blocks compile-blocks; do
        phase "blocks-1b-$blocks" 150 $py -m sftune train --config configs/llama-1b.yaml --dataset ../shared/data/sst2 --device "$DEVICE" "${big_blocks[@]}" "--$blocks" --log-every 1 --eval-every 1000 --sample-prompts "" --report-to none --no-run-report --output-dir "/tmp/blocks-1b-$blocks" --overwrite
        cp "/tmp/blocks-1b-$blocks/metrics.jsonl" "$OUT/blocks-1b-$blocks.metrics.jsonl" 2>/dev/null
      done ;;
    memory)
      phase memory-small 120 $py benchmarks/memory.py --device "$DEVICE" "${small[@]}" --json
      phase memory-big 240 $py benchmarks/memory.py --device "$DEVICE" "${big[@]}" --modes lora,lora-fp32-base,full --json ;;
    profile)
      for kind in ${PROFILE_KINDS:-seed seed-eager packed}; do  # (seed-eager: every kernel launched on its own;
        # packed-varlen: as the speed phase's packed-varlen run, CUDA graphs and the compiled loss included)
        # (-blocks: with --compile-blocks, as the blocks phase measures)
        case $kind in seed) args=("${prof_seed[@]}") ;; seed-eager) args=("${prof_seed[@]}" --compile off) ;;
          seed-blocks) args=("${prof_seed[@]}" --compile-blocks) ;;
          packed) args=("${prof_packed[@]}" --packing) ;;
          packed-varlen|packed-flex|packed-flex-blocks) attention=${kind#packed-}
                               args=("${prof_packed[@]}" --packing --attention "${attention%-blocks}"
                               --model-config-overrides "$no_attention_dropout"
                               $([ "$DEVICE" = cuda ] && echo --compile graphs)
                               $([ "$kind" = packed-flex-blocks ] && echo --compile-blocks)) ;; esac
        phase "profile-$kind" 120 $py -m sftune train --config configs/gpt2-sst2.yaml --init random --device "$DEVICE" \
          "${args[@]}" --eval-every 100000 --sample-prompts "" --report-to none --no-run-report \
          --output-dir "/tmp/sftune-profile-$kind" --overwrite
        cp "/tmp/sftune-profile-$kind/profile/summary.txt" "$OUT/profile-$kind.txt" 2>/dev/null
        cp "/tmp/sftune-profile-$kind/profile/trace.json.gz" "$OUT/profile-$kind.trace.json.gz" 2>/dev/null
      done
      bundle ;;
    *) echo "unknown phase $p (check, loss, startup, speed, speed-steps, whole-job, samples, workers, blocks, blocks-1b, runs, fusion, fusion-seed, peers, peers-1b, memory, profile)" ;;
  esac
done
ls -la "$OUT"
