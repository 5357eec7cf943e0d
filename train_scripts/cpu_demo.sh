#!/usr/bin/env bash
# The README demo: long-context fine-tuning of the whole SmolLM2-135M-Instruct (30 layers) on 2 CPU processes.
#
# 1. Train: Jane Austen's novels except Persuasion, 12 steps of one 2,048-token sequence split over 2 processes with
#    zigzag ring attention (1,024 tokens each), with the RoPE base raised as for a 4x context extension (8K -> 32K).
#    RoPE formula: scaling-law (Liu et al. 2023): 1e5 * (32768/8192)^(ln 1e5 / ln(8192/2pi)) ~ 9.25e5.
# 2. Measure what the run bought: perplexity on Persuasion, which training never saw, at 2K tokens and at 16K tokens
#    (twice the model's 8K window), for the model before and after, sequence-parallel over the same 2 processes.
# 3. Print both, and plot them with the training loss (demo.png).
#
#   bash scripts/setup.sh && bash train_scripts/cpu_demo.sh
#
# About 7 minutes on 2 idle CPU cores and 5.2 GB of memory per process. STEPS, SEQ_LENGTH and LENGTHS change the size.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
OUT=${OUT:-outputs/cpu_demo-$(date +%Y%m%d-%H%M%S)}  # a new folder each run: earlier runs are kept
STEPS=${STEPS:-12}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
LENGTHS=${LENGTHS:-"2048 16384"}
LAUNCH="$ACCELERATE launch --config_file accelerate_configs/cpu_2proc.yaml"
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

THETA=$($PY -m easy_context.training rope-base --formula scaling-law \
    --original-base 1e5 --original-length 8192 --target-length 32768)
echo "RoPE base: 1e5 -> $THETA (scaling-law formula, 8K -> 32K)"

# Persuasion is held out for the evaluation; the other five novels are the training set.
AUSTEN=$($PY -c "from easy_context.assets import austen_dir; print(austen_dir().resolve())")
mkdir -p "$OUT/data/train" "$OUT/data/heldout"
for novel in "$AUSTEN"/*.txt; do
    case "$(basename "$novel")" in
        persuasion.txt) ln -sf "$novel" "$OUT/data/heldout/" ;;
        *) ln -sf "$novel" "$OUT/data/train/" ;;
    esac
done

start=$(date +%s)
$LAUNCH train.py \
    --model smollm2 \
    --dataset "$OUT/data/train" \
    --seq-length "$SEQ_LENGTH" \
    --parallel-mode zigzag_ring_attn \
    --rope-theta "$THETA" \
    --learning-rate 5e-5 --warmup-steps 0 --checkpointing none \
    --steps "$STEPS" \
    --output-dir "$OUT/model"
echo "training finished in $(( $(date +%s) - start )) s"

# shellcheck disable=SC2086  # LENGTHS is a list
$LAUNCH eval_ppl.py -m @zigzag_ring_attn -m "$OUT/model@zigzag_ring_attn" --lengths $LENGTHS \
    --dataset "$OUT/data/heldout" --output-file "$OUT/perplexity.csv" --no-plot
$PY train_scripts/demo_summary.py "$OUT"
echo "demo finished in $(( $(date +%s) - start )) s; the fine-tuned model is in $(cd "$OUT/model" && pwd)"
