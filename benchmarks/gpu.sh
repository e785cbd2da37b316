#!/usr/bin/env bash
# bert-base training step on one GPU, minibert against transformers' BertForMaskedLM:
# bf16 and fp16 (torch.autocast, GradScaler for fp16), seq 512 x batch 32 and seq 128 x batch
# 128 (16,384 tokens a step), 5 warm-up and 20 timed steps each; tokens/s, peak memory and MFU
# (against the table in minibert/flops.py) for both. Then, if time allows, minibert compiled.
#
#   bash benchmarks/gpu.sh                     # from anywhere; about 2-3 minutes on an H100
#   OUT=/some/folder bash benchmarks/gpu.sh    # also writes everything to $OUT/gpu.log
#
# Needs torch with CUDA and transformers (the reference only); it installs nothing.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # minibert without pip install -e .

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu.log") 2>&1
fi

if ! python3 -c "import transformers" 2>/dev/null; then
  echo "gpu.sh: transformers is not installed; it is the reference, install its wheel and rerun" >&2
  exit 1
fi
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu.sh: torch sees no CUDA device" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}')"
date -u

start=$SECONDS
bench() {
  python3 benchmarks/train_step.py --preset base --device cuda --warmup 5 --steps 20 "$@"
  echo
}
for precision in bf16 fp16; do
  bench --precision "$precision" --seq 512 --batch 32
  bench --precision "$precision" --seq 128 --batch 128
done

# torch.compile takes a minute or two to compile; run it only while the total stays < 5 minutes.
if (( SECONDS - start < 150 )); then
  timeout 130 python3 benchmarks/train_step.py --preset base --device cuda --warmup 5 \
    --steps 20 --precision bf16 --seq 512 --batch 32 --compile \
    || echo "gpu.sh: the compiled run did not finish in time (or failed); the eager results stand"
fi
echo "gpu.sh: done in $((SECONDS - start)) s"
