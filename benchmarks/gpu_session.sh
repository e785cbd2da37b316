#!/usr/bin/env bash
# What a GPU session records, as one command on one GPU machine, in under 8 minutes on an H200:
# the correctness checks first, then the benchmarks, each part under its own time limit and
# the whole under a budget (a part that no longer fits is skipped, and says so).
#
#   correctness (tests/test_gpu.py, one part each)
#     sync            no host-device sync between log lines (bf16, fp16, compiled; 1 process)
#     vote            the stop vote under NCCL (1 rank): answered a step later, cheap
#     prefetch        the prefetch thread on the run's device (GPU 0's context: 2 GPUs only)
#     head            compiled fixed-shape head == eager boolean path, seq 128 and 512
#     gloo            2 processes sharing the GPU through gloo == 1 process
#     compiled-wwm    2 ranks (gloo), compiled, whole-word masks, 30 steps: <= 1 recompile
#                     per rank, a finite loss
#     sigterm         SIGTERM during a 20,000-step run: exit 143 within seconds
#   benchmarks
#     trainer-eager     benchmarks/trainer.py --device cuda: the loop against the recipe, and
#                       against its own bare step (bert-base, 512 x 32, bf16)
#     trainer-compiled  the same, compile = true
#     t4-shape          the 2xT4 config's shape (fp16, 16 x 2 accumulation): loop / step
#     step              train_step.py, bf16 512 x 32, eager: the step with the fixed-shape head
#
# Every part prints "=== NAME: PASS|FAIL|TIMEOUT|SKIPPED (seconds)" and its numbers (lines
# starting with RESULT, or the benchmark's summary lines); its whole output is in
# $OUT/parts/NAME.log. The last lines are a table to paste into benchmarks/README.md.
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh      # $OUT/gpu_session.log, $OUT/parts/
#   ONLY='trainer|t4' bash benchmarks/gpu_session.sh     # the parts whose name matches
#   DRY_RUN=1 bash benchmarks/gpu_session.sh             # the plan: parts, limits, commands
#
# Needs torch with CUDA, transformers and datasets (the references); installs nothing.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # minibert without pip install -e .
OUT="${OUT:-runs/gpu_session}"
BUDGET=${BUDGET:-470}  # seconds for all parts; each gets min(its limit, what is left)
start=$SECONDS
rows=()

if [[ -z "${DRY_RUN:-}" ]]; then
  mkdir -p "$OUT/parts"
  exec > >(tee "$OUT/gpu_session.log") 2>&1
fi

part() {  # part NAME LIMIT NUMBERS_REGEX COMMAND...
  local name=$1 limit=$2 numbers=$3
  shift 3
  [[ -n "${ONLY:-}" && ! $name =~ $ONLY ]] && return
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "=== $name: limit $limit s: $*"
    return
  fi
  local left=$(( BUDGET - (SECONDS - start) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "=== $name: SKIPPED ($left s of the budget left)"
    rows+=("| $name | SKIPPED | - | $left s of the $BUDGET s budget left |")
    return
  fi
  local log="$OUT/parts/$name.log" began=$SECONDS status
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  case $? in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  # A pytest part whose tests were all skipped (no GPU) passed nothing.
  if [[ $status == PASS ]] && grep -qE '[0-9]+ skipped' "$log" \
      && ! grep -qE '[0-9]+ passed' "$log"; then
    status=SKIPPED
  fi
  local seconds=$(( SECONDS - began ))
  echo "=== $name: $status ($seconds s, limit $limit s)"
  local found
  found=$(grep -E "$numbers" "$log" | sed -E 's/^RESULT //')
  [[ -n $found ]] && sed 's/^/    /' <<< "$found"
  [[ $status == FAIL || $status == TIMEOUT ]] && tail -n 25 "$log" | sed 's/^/    | /'
  local cell  # the numbers as one table cell: lines joined by "; ", no "|"
  cell=$(tr '\n' ';' <<< "$found" | sed 's/;$//; s/;/; /g; s/|/\//g')
  rows+=("| $name | $status | $seconds s | $cell |")
}

GPU_TEST="python3 -m pytest -q -s -rs tests/test_gpu.py"
TESTED='^RESULT|^SKIPPED|[0-9]+ (passed|failed|skipped|errors?)'
BENCH='^(trainer:|train_step:|minibert|transformers|ratio|round)'

if [[ -z "${DRY_RUN:-}" ]]; then
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}')"
fi

# Correctness first: these decide whether the loop is right on a GPU.
part sync 120 "$TESTED" $GPU_TEST -k "no_host_device_sync or sync_check_sees"
part vote 45 "$TESTED" $GPU_TEST -k "stop_vote_under_nccl"
part prefetch 45 "$TESTED" $GPU_TEST -k "prefetch_thread"
part head 100 "$TESTED" $GPU_TEST -k "compiled_fixed_shape_head"
part gloo 75 "$TESTED" $GPU_TEST -k "sharing_one_gpu_through_gloo"
part compiled-wwm 150 "$TESTED" $GPU_TEST -k "compiled_whole_word_two_ranks"
part sigterm 60 "$TESTED" $GPU_TEST -k "sigterm_ends_a_long_run"

# Then the numbers, the most wanted first.
part trainer-eager 90 "$BENCH" python3 benchmarks/trainer.py --device cuda --step-baseline
part trainer-compiled 150 "$BENCH" python3 benchmarks/trainer.py --device cuda --compile \
  --rounds 1 --step-baseline
part t4-shape 60 "$BENCH" python3 benchmarks/trainer.py --device cuda --precision fp16 \
  --batch 16 --grad-accum 2 --steps 40 --rounds 1 --step-baseline
part step 60 "$BENCH" python3 benchmarks/train_step.py --preset base --device cuda --warmup 5 \
  --steps 20 --precision bf16 --seq 512 --batch 32

if [[ -n "${DRY_RUN:-}" ]]; then
  echo "budget $BUDGET s"
  exit 0
fi
echo
echo "gpu_session.sh: done in $(( SECONDS - start )) s; for benchmarks/README.md:"
echo
echo "| part | status | time | numbers |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
