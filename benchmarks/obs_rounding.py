"""How much rounding alone moves a pruned model's perplexity: SparseGPT (or D²Prune) 50 % on
SmolLM2-135M, with the OBS loop's sub-block size changed and nothing else.

Every sub-block size computes the same OBS update in a different order (``methods.sparsegpt``), so
the runs differ only in the last bits of the updated weights. Printed per size: WikiText-2
perplexity (quick protocol: 32 × 512 C4 calibration windows, seed 0; first 64 test windows of 512)
and the mean relative reconstruction error of the pruned linears. Results:
``benchmarks/results/obs_rounding.json``.

    .venv/bin/python benchmarks/obs_rounding.py [--method sparsegpt|d2prune] [--sub-blocks 128 16 32 64 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import d2prune.methods.sparsegpt as sparsegpt  # noqa: E402
from d2prune import PruneConfig, prune  # noqa: E402
from d2prune.data import get_calibration  # noqa: E402
from d2prune.data.tokens import get_eval_tokens  # noqa: E402
from d2prune.evaluation.perplexity import evaluate_ppl  # noqa: E402
from d2prune.io.models import load_model  # noqa: E402
from d2prune.methods import D2PruneConfig, SparseGPTConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "obs_rounding.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["sparsegpt", "d2prune"], default="sparsegpt")
    ap.add_argument("--sub-blocks", type=int, nargs="+", default=[128, 16, 32, 64, 8])
    args = ap.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ids = get_calibration(tokenizer, "c4", 32, 512, 0)
    tokens = get_eval_tokens(tokenizer, "wikitext2")
    rows = []
    for sub in args.sub_blocks:
        sparsegpt.SUB_BLOCK = sub
        model.load_state_dict(dense)
        method = D2PruneConfig(target_layers=["self_attn.v_proj"]) if args.method == "d2prune" else SparseGPTConfig()
        t0 = time.perf_counter()
        report = prune(model, ids, PruneConfig(method=method, sparsity=0.5, progress=False, measure_error=True))
        seconds = time.perf_counter() - t0
        ppl = evaluate_ppl(model, tokens, 512, max_windows=64, progress=False).ppl
        errors = [lin.relative_error for lin in report.linears if lin.relative_error is not None]
        rows.append({"sub_block": sub, "ppl": ppl, "mean_relative_error": statistics.mean(errors), "prune_s": seconds})
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": f".venv/bin/python benchmarks/obs_rounding.py {' '.join(sys.argv[1:])}".strip(),
                "method": args.method,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
