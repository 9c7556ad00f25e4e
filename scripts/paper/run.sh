#!/usr/bin/env bash
# One paper model (see docs/paper.md#per-model-settings): C4 calibration, 128 windows of the
# model's max context, WikiText-2 at max context, s=1500, r1=1, r2=0, the given un-updated
# projection; 50% unstructured and 2:4.
# Usage: run.sh NAME HUB_ID TARGET_LAYER [extra d2prune arguments, e.g. --stats-mode reference]
# Needs a GPU and a network that reaches the Hugging Face Hub.
set -euo pipefail
name=$1 model=$2 target=$3
shift 3
seqlen=$(python -c "from transformers import AutoConfig; print(AutoConfig.from_pretrained('$model').max_position_embeddings)")
for pattern in unstructured 2:4; do
  d2prune prune "$model" --method d2prune --sparsity 0.5 --pattern "$pattern" \
    --nsamples 128 --seqlen "$seqlen" --seed 0 --calib c4 --eval wikitext2 \
    --s 1500 --r1 1 --r2 0 --target-layers "$target" --dtype float16 --device cuda \
    --output-dir "runs/paper/$name-${pattern/:/-}" "$@"
done
