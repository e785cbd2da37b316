#!/usr/bin/env bash
# Everything the GPU numbers of benchmarks/README.md need, as one command on one GPU machine,
# in under 8 minutes (each part has its own time limit; a part that runs out is reported and
# the next one starts):
#   1. benchmarks/gpu.sh: the training step, minibert against transformers (bf16, fp16,
#      compiled), and torch.compile's max-autotune mode
#   2. benchmarks/trainer.py --device cuda: the whole loop against the transformers recipe,
#      eager and compiled, with train.py's steady state against its bare step (same shape)
#   3. the 2xT4 config's shape (fp16, 16 x 2 accumulation) on this GPU: loop against step
#   4. tests/test_gpu.py: no host-device sync between log lines (bf16, fp16, compiled), and
#      2 processes sharing the GPU through gloo equal to 1 process
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh    # the log goes to $OUT/gpu_session.log
#
# Needs torch with CUDA, transformers and datasets (the references); installs nothing.
# DRY_RUN=1 runs every part on the CPU with tiny sizes, to check the script itself.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # minibert without pip install -e .
OUT="${OUT:-runs/gpu_session}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_session.log") 2>&1

BUDGET=${BUDGET:-470}  # seconds for everything; each part gets min(its limit, what is left)
start=$SECONDS
part() {  # part NAME LIMIT COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - (SECONDS - start) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "=== $name: skipped, $left s of the budget left"
    return
  fi
  echo "=== $name (limit ${limit} s, $(( SECONDS - start )) s in): $*"
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  (( rc == 124 || rc == 137 )) && echo "=== $name: stopped at its ${limit} s limit"
  (( rc != 0 && rc != 124 && rc != 137 )) && echo "=== $name: failed (exit $rc)"
  echo "=== $name: $(( SECONDS - start )) s in"
}

date -u
if [[ -n "${DRY_RUN:-}" ]]; then
  echo "DRY_RUN: every part on the CPU with tiny sizes"
  part "trainer, cpu dry run" 300 python3 benchmarks/trainer.py --device cpu --steps 20 \
    --warmup 10 --rounds 1 --batch 4 --step-baseline
  part "2xT4 shape, cpu dry run" 200 python3 benchmarks/trainer.py --device cpu --steps 20 \
    --warmup 10 --rounds 1 --batch 2 --grad-accum 2 --precision fp16 --step-baseline
  part "GPU tests (skipped without CUDA)" 60 python3 -m pytest -q -rs tests/test_gpu.py
  echo "gpu_session.sh: done in $(( SECONDS - start )) s"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}')"

part "gpu.sh: training step, minibert vs transformers" 170 env OUT="$OUT" bash benchmarks/gpu.sh
part "trainer, eager" 80 python3 benchmarks/trainer.py --device cuda --step-baseline
part "trainer, compiled" 120 python3 benchmarks/trainer.py --device cuda --compile --rounds 1 \
  --step-baseline
part "GPU tests: sync check, 2 ranks on one GPU through gloo" 70 \
  python3 -m pytest -q -rs tests/test_gpu.py
part "2xT4 shape (fp16, 16 x 2) on this GPU" 45 python3 benchmarks/trainer.py --device cuda \
  --precision fp16 --batch 16 --grad-accum 2 --steps 40 --rounds 1 --step-baseline
part "step, compiled with max-autotune" 60 python3 benchmarks/train_step.py --preset base \
  --device cuda --warmup 5 --steps 20 --precision bf16 --seq 512 --batch 32 --compile \
  --compile-mode max-autotune --no-memory
echo "gpu_session.sh: done in $(( SECONDS - start )) s"
