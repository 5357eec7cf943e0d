#!/usr/bin/env bash
# SmolLM2-135M (8K context, RoPE base 1e5) -> 64K in two stages; fits one GPU per stage, or 2-8 GPUs with
# zigzag ring attention. A small-model recipe to try schedules quickly before spending a 7B budget.
#
# RoPE formula: NTK-aware (bloc97 2023, easy_context.training.ntk_rope_base), head_dim 64:
#   base(T) = 1e5 * (T/8192)^(64/62)   -> 16K 2.0e5, 32K 4.2e5, 64K 8.6e5
# Set ROPE=scaling-law for the scaling-law base instead (32K 9.3e5, 64K 2.8e6).
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=${NGPUS:-1}
DATA=${DATA:-austen}
ROPE=${ROPE:-ntk}
OUT=${OUT:-outputs/smollm2}

base() {
    python -m easy_context.training rope-base --formula "$ROPE" --original-base 1e5 --original-length 8192 \
        --target-length "$1" --head-dim 64
}
# Rerunning the script continues where it stopped: a stage whose final model is saved is skipped, an interrupted
# stage resumes from its newest intact checkpoint (train.py refuses to start afresh over a previous run).
launch() {  # launch OUTPUT_DIR TRAIN_OPTIONS...
    local out=$1; shift
    if [ -f "$out/config.json" ]; then echo "stage already done: $out"; return; fi
    local resume=""; if ls -d "$out"/checkpoint-* >/dev/null 2>&1; then resume=--resume; fi
    if [ "$NGPUS" = 1 ]; then python train.py "$@" --output-dir "$out" $resume
    else accelerate launch --multi_gpu --num_processes "$NGPUS" train.py "$@" --output-dir "$out" $resume; fi
}

launch "$OUT/32k" --model smollm2 --dataset "$DATA" --seq-length 32768 --rope-theta "$(base 32768)" \
    --parallel-mode zigzag_ring_attn --steps 200 --grad-accum 8 --learning-rate 5e-5 --warmup-steps 10 \
    --save-every 50
launch "$OUT/64k" --model "$OUT/32k" --dataset "$DATA" --seq-length 65536 --rope-theta "$(base 65536)" \
    --parallel-mode zigzag_ring_attn --steps 200 --grad-accum 4 --learning-rate 5e-5 --warmup-steps 10 \
    --save-every 50
