#!/usr/bin/env bash
# D²Prune paper run for opt-125m (un-updated projection self_attn.k_proj), 50% and 2:4; see run.sh.
exec bash "$(dirname "$0")/run.sh" opt-125m facebook/opt-125m self_attn.k_proj "$@"
