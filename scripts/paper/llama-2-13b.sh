#!/usr/bin/env bash
# D²Prune paper run for llama-2-13b (un-updated projection self_attn.k_proj), 50% and 2:4; see run.sh.
exec bash "$(dirname "$0")/run.sh" llama-2-13b meta-llama/Llama-2-13b-hf self_attn.k_proj "$@"
