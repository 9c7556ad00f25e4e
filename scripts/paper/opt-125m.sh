#!/usr/bin/env bash
# D²Prune paper run for opt-125m (spec §1.8): C4 calibration, 128 windows of the model's max context,
# WikiText-2 at max context, s=1500, r1=1, r2=0, un-updated projection self_attn.k_proj. 50% unstructured and 2:4.
# Needs a GPU and a network that reaches the Hugging Face Hub. Extra arguments are passed on
# (e.g. --stats-mode reference to use the reference code's statistics, --save-model).
set -euo pipefail
model=facebook/opt-125m
seqlen=$(python -c "from transformers import AutoConfig; print(AutoConfig.from_pretrained('$model').max_position_embeddings)")
for pattern in unstructured 2:4; do
  d2prune prune "$model" --method d2prune --sparsity 0.5 --pattern "$pattern" \
    --nsamples 128 --seqlen "$seqlen" --seed 0 --calib c4 --eval wikitext2 \
    --s 1500 --r1 1 --r2 0 --target-layers self_attn.k_proj --dtype float16 --device cuda \
    --output-dir "runs/paper/opt-125m-${pattern/:/-}" "$@"
done
