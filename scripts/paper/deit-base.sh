#!/usr/bin/env bash
# D²Prune paper runs for DeiT-B (the paper's Table 7: 60% and 80% unstructured) on ImageNet-1k; needs a GPU
# and a network that reaches the Hugging Face Hub. IMAGENET: a folder holding train/ and val/ in ImageNet
# layout (class sub-folders n01440764, ... sort into the model's class order; docs/vision.md).
# Calibration: 128 random training images (seed 0), as many as the LLM runs' windows; the un-updated
# projection is chosen on held-out training images (--target-layers auto), since the paper's per-model
# scripts do not cover DeiT. Top-1/top-5 on the whole validation folder, dense and pruned.
# Usage: IMAGENET=/data/imagenet bash scripts/paper/deit-base.sh [extra d2prune arguments]
set -euo pipefail
imagenet=${IMAGENET:-data/imagenet}
for sparsity in 0.6 0.8; do
  d2prune prune facebook/deit-base-patch16-224 --method d2prune --sparsity "$sparsity" \
    --calib "$imagenet/train" --nsamples 128 --seed 0 --eval-images "$imagenet/val" --eval-dense \
    --s 1500 --r1 1 --r2 0 --target-layers auto --device cuda \
    --output-dir "runs/paper/deit-base-$sparsity" "$@"
done
