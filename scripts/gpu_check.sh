#!/usr/bin/env bash
# Verify d2prune's CUDA paths on one NVIDIA GPU in about 5 minutes (docs/gpu.md): the tests marked
# `cuda`, then benchmarks/gpu_check.py (every method on a synthetic 1B-class LLaMA in bf16, the tiny
# trained model against the CPU, 2:4 semi-structured matmuls and a whole prefill), one JSON in all.
#
#   bash scripts/gpu_check.sh [--out FILE] [other benchmarks/gpu_check.py options]
#
# Runs the package from src/ (nothing is installed). Environment:
#   PYTHON                the interpreter (default .venv/bin/python if present, else python3)
#   D2PRUNE_TINY_MODEL    the tiny trained LLaMA folder (default ../shared/models/aidreams260K)
#   OUT                   if set and no --out is given, the JSON goes to $OUT/gpu_check.json
#   GPU_CHECK_TOTAL_S     the time for everything (default 280 s; the benchmark gets what the tests leave)
#   GPU_CHECK_PYTEST_S    the time limit of the tests (default 90 s)
#   GPU_CHECK_DRY_RUN=1   rehearse the script without a GPU: small shapes on the CPU (for development)
# Exit status 0 when every test passed and no check failed (skipped ones are fine), 1 otherwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

out="${OUT:+$OUT/gpu_check.json}"
out="${out:-gpu_check.json}"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out) out="${args[i + 1]:-$out}" ;;
    --out=*) out="${args[i]#--out=}" ;;
  esac
done
mkdir -p "$(dirname "$out")"
log="$(dirname "$out")/gpu_check_pytest.log"

dry="${GPU_CHECK_DRY_RUN:-0}"
if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "gpu_check: $py cannot import torch; set PYTHON to an interpreter that has torch with CUDA" >&2
  exit 1
fi
if [[ "$dry" != 1 ]] && ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU is visible to $py (torch.cuda.is_available() is False); this check needs one" >&2
  exit 1
fi

total_s="${GPU_CHECK_TOTAL_S:-280}"
pytest_s="${GPU_CHECK_PYTEST_S:-90}"
limit() {  # limit SECONDS CMD...: stop CMD after SECONDS where coreutils' timeout exists
  local s="$1"
  shift
  if command -v timeout >/dev/null; then timeout -k 10 "$s" "$@"; else "$@"; fi
}

start=$SECONDS
echo "gpu_check: [1/2] pytest -m cuda (at most ${pytest_s} s), log: $log"
set +e
limit "$pytest_s" "$py" -m pytest -m cuda tests -p no:cacheprovider -rfEs --durations=15 --continue-on-collection-errors 2>&1 | tee "$log"
test_rc=${PIPESTATUS[0]}
set -e

# The benchmark gets what is left: its parts stop starting work at the soft budget, and the hard
# limit 30 s later stops it whatever it is doing (its JSON is rewritten after every step).
left=$((total_s - (SECONDS - start)))
budget=$((left > 90 ? left - 30 : 60))
bench=(benchmarks/gpu_check.py --out "$out" --budget-s "$budget" --pytest-rc "$test_rc" --pytest-log "$log")
if [[ "$dry" == 1 ]]; then
  bench+=(--device cpu --small)
fi
echo "gpu_check: [2/2] benchmarks/gpu_check.py (budget ${budget} s) -> $out"
set +e
limit $((budget + 30)) "$py" "${bench[@]}" "$@"
bench_rc=$?
set -e

elapsed=$((SECONDS - start))
if [[ $bench_rc == 124 || $bench_rc == 137 ]]; then
  echo "gpu_check: the benchmark ran past its time limit; $out holds what it measured" >&2
fi
if [[ $test_rc == 0 || $test_rc == 5 ]] && [[ $bench_rc == 0 ]]; then
  echo "gpu_check: OK in ${elapsed} s (pytest exit $test_rc, benchmark exit $bench_rc); results: $out"
  exit 0
fi
echo "gpu_check: FAILED in ${elapsed} s (pytest exit $test_rc, benchmark exit $bench_rc); results: $out" >&2
exit 1
