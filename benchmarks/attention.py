"""Attention diagnostics benchmark: does D²Prune cut attention-block RMSE against SparseGPT?

The paper claims D²Prune lowers the RMSE between dense and pruned attention-block outputs (61.2% on
average). On SmolLM2-135M (quick protocol: calibration 32×512 C4 windows, seed 0) we prune with
D²Prune (v_proj un-updated) and SparseGPT at 50% and 70%, save each model, and run
``d2prune attention`` on 8 held-out C4 windows of 512 tokens (seed 1234). Results:
``benchmarks/results/attention_smollm2.json``, an overlay plot per sparsity in
``benchmarks/results/attention_smollm2_<p>.png``, and a table in ``benchmarks/README.md``.

    .venv/bin/python benchmarks/attention.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
RUNS = ROOT / "runs" / "attention"
MARK_BEGIN, MARK_END = "<!-- attention-table:begin -->", "<!-- attention-table:end -->"
METHODS = {
    "d2prune": ["--method", "d2prune", "--target-layers", "self_attn.v_proj"],
    "sparsegpt": ["--method", "sparsegpt"],
}
SPARSITIES = ["0.5", "0.7"]


def d2prune(*args: str) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "d2prune"), *args, "--no-progress"]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return ["d2prune", *args]


def main() -> None:
    from d2prune.attention import plot_attention_diagnostics

    records = []
    for p in SPARSITIES:
        results = {}
        for name, method in METHODS.items():
            out = RUNS / f"{name}-{p}"
            prune_cmd = d2prune("prune", "smollm2-135m", *method, "--sparsity", p, "--nsamples", "32", "--seqlen", "512",
                                "--calib", "c4", "--seed", "0", "--eval", "none", "--output-dir", str(out), "--save-model")
            att_cmd = d2prune("attention", "smollm2-135m", str(out / "model"), "--output-dir", str(out / "attention"),
                              "--windows", "8", "--seqlen", "512", "--seed", "1234")
            res = json.loads((out / "attention" / "attention.json").read_text())["result"]
            results[name] = res
            records.append({"method": name, "sparsity": float(p), "mean": res["mean"], "layers": res["layers"],
                            "commands": [" ".join(prune_cmd), " ".join(att_cmd)]})
        plot_attention_diagnostics(results, RESULTS / f"attention_smollm2_{p}.png")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "attention_smollm2.json").write_text(json.dumps(records, indent=2) + "\n")

    lines = ["| sparsity | method | RMSE | relative RMSE | KL | entropy change | top-8 mass (dense → pruned) |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        m = r["mean"]
        lines.append(f"| {r['sparsity']:.0%} | {r['method']} | {m['rmse']:.4g} | {m['relative_rmse']:.4g} | {m['kl']:.4g} | "
                     f"{m['entropy_change']:+.4g} | {m['topk_mass_dense']:.3f} → {m['topk_mass_pruned']:.3f} |")
    for p in SPARSITIES:
        d = next(r for r in records if r["method"] == "d2prune" and r["sparsity"] == float(p))["mean"]["rmse"]
        s = next(r for r in records if r["method"] == "sparsegpt" and r["sparsity"] == float(p))["mean"]["rmse"]
        lines.append(f"\nAt {float(p):.0%}: D²Prune's mean attention RMSE is {100 * (1 - d / s):.1f}% lower than SparseGPT's.")
    text = README.read_text()
    if MARK_BEGIN not in text:
        text += f"\n## Attention diagnostics (`benchmarks/attention.py`)\n\n{MARK_BEGIN}\n{MARK_END}\n"
    begin, end = text.index(MARK_BEGIN) + len(MARK_BEGIN), text.index(MARK_END)
    README.write_text(text[:begin] + "\n" + "\n".join(lines) + "\n" + text[end:])


if __name__ == "__main__":
    main()
