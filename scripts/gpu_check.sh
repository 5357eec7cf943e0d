#!/usr/bin/env bash
# One command for a GPU machine: kernels against the math backend and a float64 reference, every method at world size
# 1, tiny-model and SmolLM2 checks, and the emulated-ring compute-efficiency table (scripts/gpu_check.py). On a node
# with several GPUs it also runs benchmarks/attention_scaling.py over all of them with torchrun (NCCL).
#
#   bash scripts/gpu_check.sh                      # CUDA; results in outputs/gpu_check/
#   bash scripts/gpu_check.sh --device cpu --lengths 1024 --ranks 4   # the same script as a CPU smoke test
#
# Other options go to scripts/gpu_check.py (--sections, --lengths, --ranks, --output-dir, ...).
# Exit status: 0 all checks passed, 1 a check failed, 2 no CUDA device for a CUDA run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"

device=cuda
output_dir=outputs/gpu_check
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --device) device="${args[$((i + 1))]:-}" ;;
    --device=*) device="${args[$i]#--device=}" ;;
    --output-dir) output_dir="${args[$((i + 1))]:-}" ;;
    --output-dir=*) output_dir="${args[$i]#--output-dir=}" ;;
  esac
done

if [ "$device" = cuda ]; then
  gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [ "$gpus" = 0 ]; then
    echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); run on a GPU machine or pass --device cpu" >&2
    exit 2
  fi
fi

status=0
"$PYTHON" scripts/gpu_check.py "$@" || status=$?

if [ "$device" = cuda ] && [ "$gpus" -gt 1 ]; then
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$gpus" benchmarks/attention_scaling.py \
    --device cuda --dtype bfloat16 --heads 32 --kv-heads 8 --head-dim 128 --lengths 16384 32768 65536 131072 \
    --output-file "$output_dir/attention_scaling_${gpus}gpu.md" || status=1
fi
exit "$status"
