#!/usr/bin/env bash
# Set up, then prune SmolLM2-135M to 50% with D²Prune (calibration 32×512 C4 windows, seed 0)
# and print dense vs pruned WikiText-2 perplexity (first 64 windows of 512 tokens).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1
exec .venv/bin/d2prune prune smollm2-135m --method d2prune --sparsity 0.5 \
  --nsamples 32 --seqlen 512 --calib c4 --eval wikitext2 --eval-windows 64 --eval-dense \
  --output-dir runs/demo "$@"
