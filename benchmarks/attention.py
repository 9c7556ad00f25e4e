"""Attention diagnostics benchmark: does D²Prune cut attention-block RMSE against SparseGPT?

The paper claims D²Prune lowers the RMSE between dense and pruned attention-block outputs (61.2% on
average). On SmolLM2-135M (quick protocol: calibration 32×512 C4 windows, seed 0) we prune with
D²Prune (v_proj un-updated) and SparseGPT at 50% and 70%, save each model (shared with
``benchmarks/zeroshot.py`` under ``runs/pruned/``), and run ``d2prune attention`` on 8 held-out C4
windows of 512 tokens (seed 1234). Results: ``benchmarks/results/attention_smollm2.json``, an overlay
plot per sparsity in ``benchmarks/results/attention_smollm2_<p>.png``, a table in ``benchmarks/README.md``.

    .venv/bin/python benchmarks/attention.py [--table-only]
"""

from __future__ import annotations

import json
import sys

from common import (
    BENCH_README,
    RESULTS_DIR,
    ROOT,
    load_results,
    pruned_model,
    replace_block,
    run_d2prune,
    save_results,
    start_launcher,
)

MARK_BEGIN, MARK_END = "<!-- attention-table:begin -->", "<!-- attention-table:end -->"
METHODS = {
    "d2prune": ["--method", "d2prune", "--target-layers", "self_attn.v_proj"],
    "sparsegpt": ["--method", "sparsegpt"],
}
SPARSITIES = ["0.5", "0.7"]
RESULTS = RESULTS_DIR / "attention_smollm2.json"


def main() -> None:
    if sys.argv[1:] == ["--table-only"]:
        write_table(load_results(RESULTS))
        return
    start_launcher()  # before torch is imported (peak RSS, see common.py)
    from d2prune.evaluation.attention import plot_attention_diagnostics

    records = []
    for p in SPARSITIES:
        results = {}
        for name, method in METHODS.items():
            model_dir, prune_cmd = pruned_model(f"{name}-{p}", method, p)
            out = ROOT / "runs" / "attention" / f"{name}-{p}"
            att = ["attention", "smollm2-135m", str(model_dir), "--windows", "8", "--seqlen", "512", "--seed", "1234"]
            run = run_d2prune(f"attention {name}-{p}", att, out)
            res = json.loads((out / "attention.json").read_text())["result"]
            results[name] = res
            records.append(
                {
                    "method": name,
                    "sparsity": float(p),
                    "mean": res["mean"],
                    "layers": res["layers"],
                    "commands": [prune_cmd, run["command"]],
                    "attention_wall_s": run["wall_s"],
                }
            )
        plot_attention_diagnostics(results, RESULTS_DIR / f"attention_smollm2_{p}.png")
    save_results(RESULTS, records)
    write_table(records)


def write_table(records: list[dict]) -> None:
    """The mean-over-layers table, and D²Prune's RMSE change against SparseGPT per sparsity."""
    lines = [
        "| sparsity | method | RMSE | relative RMSE | KL | entropy change | top-8 mass (dense → pruned) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = r["mean"]
        lines.append(
            f"| {r['sparsity']:.0%} | {r['method']} | {m['rmse']:.4g} | {m['relative_rmse']:.4g} | {m['kl']:.4g} | "
            f"{m['entropy_change']:+.4g} | {m['topk_mass_dense']:.3f} → {m['topk_mass_pruned']:.3f} |"
        )
    for p in SPARSITIES:
        d = next(r for r in records if r["method"] == "d2prune" and r["sparsity"] == float(p))["mean"]["rmse"]
        s = next(r for r in records if r["method"] == "sparsegpt" and r["sparsity"] == float(p))["mean"]["rmse"]
        change = 100 * (d / s - 1)
        lines.append(
            f"\nAt {float(p):.0%}: D²Prune's mean attention RMSE is {abs(change):.1f}% "
            f"{'lower' if change < 0 else 'higher'} than SparseGPT's."
        )
    replace_block(BENCH_README, MARK_BEGIN, MARK_END, "\n".join(lines))


if __name__ == "__main__":
    main()
