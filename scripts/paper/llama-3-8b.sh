#!/usr/bin/env bash
# D²Prune paper run for llama-3-8b (un-updated projection self_attn.v_proj), 50% and 2:4; see run.sh.
exec bash "$(dirname "$0")/run.sh" llama-3-8b meta-llama/Meta-Llama-3-8B self_attn.v_proj "$@"
