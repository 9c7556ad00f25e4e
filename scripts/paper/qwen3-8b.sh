#!/usr/bin/env bash
# D²Prune paper run for Qwen3-8B, 50% and 2:4; see run.sh. The paper's per-model scripts do not include
# Qwen3, so its un-updated projection is unknown: it is chosen on held-out C4 windows
# (--target-layers auto, docs/methods.md#target-layers). Qwen3's max_position_embeddings is 40960, longer
# than almost every C4 document, so the windows are 4096 tokens (LLaMA-2's context length); the
# arguments given to this script come last and override these.
exec bash "$(dirname "$0")/run.sh" qwen3-8b Qwen/Qwen3-8B auto --seqlen 4096 "$@"
