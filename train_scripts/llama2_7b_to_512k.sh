#!/usr/bin/env bash
# Llama-2-7B (4K context, RoPE base 1e4) -> 512K (and optionally 1M) in stages, on one 8-GPU node with
# DeepSpeed ZeRO-3 + CPU offload, zigzag ring attention from 64K on.
#
# RoPE formula: scaling-law (Liu et al. 2023, easy_context.training.scaling_law_rope_base):
#   base(T) = 1e4 * (T/4096)^(ln 1e4 / ln(4096/2pi))   -> 32K 1.9e5, 64K 5.1e5, 128K 1.4e6, 256K 3.7e6, 512K 9.9e6
# That is the smallest base whose trained RoPE channels cover T. EasyContext's published Llama-2-7B schedule used
# far larger, empirically chosen bases: 32K@1M, 64K@5M, 256K@10M -> 25M -> 50M, 512K@100M -> 250M (and 1B set in
# the final config). To reproduce EasyContext's bases instead, set ROPE=easycontext.
#
# Batch: 1 sequence x GRAD_ACCUM per step, so about 1M tokens per optimizer step at every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
DATA=${DATA:-PY007/slimpajama_llama_tokenized_upsample_4096_chunk_1M}
CONFIG=${CONFIG:-accelerate_configs/single_node.yaml}
ROPE=${ROPE:-scaling-law}
OUT=${OUT:-outputs/llama2-7b}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

base() {  # base for target length $1 (EasyContext value $2 when ROPE=easycontext)
    if [ "$ROPE" = easycontext ]; then echo "$2"; else
        python -m easy_context.training rope-base --formula "$ROPE" --original-base 1e4 --original-length 4096 \
            --target-length "$1" --head-dim 128; fi
}

# Rerunning the script continues where it stopped: a stage whose final model is saved is skipped, an interrupted
# stage resumes from its newest intact checkpoint (train.py refuses to start afresh over a previous run).
progress() {  # progress FOLDER: "done", "--resume" or nothing
    if [ -f "$1/config.json" ]; then echo done; elif ls -d "$1"/checkpoint-* >/dev/null 2>&1; then echo --resume; fi
}

stage() {  # stage NAME FROM SEQ_LEN EASYCONTEXT_BASE STEPS GRAD_ACCUM LR MODE
    local state; state=$(progress "$OUT/$1")
    if [ "$state" = done ]; then echo "stage $1 already done: $OUT/$1"; return; fi
    accelerate launch --config_file "$CONFIG" train.py \
        --model "$2" --dataset "$DATA" --seq-length "$3" --rope-theta "$(base "$3" "$4")" \
        --steps "$5" --grad-accum "$6" --learning-rate "$7" --parallel-mode "$8" \
        --batch-size 1 --warmup-steps 20 --save-every 100 --output-dir "$OUT/$1" \
        ${WANDB:+--wandb "$WANDB"} $state
}

stage 32k  "$MODEL"        32768   1000000   1000 32 2e-5 zigzag_ring_attn
stage 64k  "$OUT/32k"      65536   5000000   1000 16 2e-5 zigzag_ring_attn
stage 256k "$OUT/64k"      262144  50000000  500  4  2e-5 zigzag_ring_attn
stage 512k "$OUT/256k"     524288  250000000 300  2  2e-5 zigzag_ring_attn
if [ "${ONE_M:-0}" = 1 ]; then
    stage 1m "$OUT/512k"   1048576 1000000000 100 1  1e-5 zigzag_ring_attn
fi
