#!/usr/bin/env bash
# The README demo: long-context training mechanics on a laptop-class CPU, in a few minutes.
#
# SmolLM2-135M truncated to its first 2 decoder layers is trained on Jane Austen's novels for 30 steps of
# 2,048-token sequences, split over 2 CPU processes with zigzag ring attention (each process holds 1,024 tokens),
# with the RoPE base raised as for a 4x context extension (8K -> 32K).
# RoPE formula: scaling-law (Liu et al. 2023): 1e5 * (32768/8192)^(ln 1e5 / ln(8192/2pi)) ~ 9.25e5.
#
#   bash scripts/setup.sh && bash train_scripts/cpu_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
OUT=${OUT:-outputs/cpu_demo-$(date +%Y%m%d-%H%M%S)}  # a new folder each run: earlier runs are kept
STEPS=${STEPS:-30}
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

THETA=$($PY -m easy_context.training rope-base --formula scaling-law \
    --original-base 1e5 --original-length 8192 --target-length 32768)
echo "RoPE base: 1e5 -> $THETA (scaling-law formula, 8K -> 32K)"

start=$(date +%s)
$ACCELERATE launch --config_file accelerate_configs/cpu_2proc.yaml train.py \
    --model smollm2 --num-layers 2 \
    --dataset austen \
    --seq-length 2048 \
    --parallel-mode zigzag_ring_attn \
    --rope-theta "$THETA" \
    --learning-rate 3e-4 --warmup-steps 5 \
    --steps "$STEPS" --save-every 10 \
    --output-dir "$OUT"
echo "demo finished in $(( $(date +%s) - start )) s"
echo "checkpoint: $(cd "$OUT" && pwd)/$(cat "$OUT/latest")   final model: $(cd "$OUT" && pwd)"
