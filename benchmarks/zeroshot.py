"""Zero-shot benchmark: lm-eval accuracy of SmolLM2-135M, dense and pruned, on the offline task data.

Dense, and SparseGPT, Wanda, D²Prune (v_proj un-updated) and ALPS at 50% and 70% (quick protocol: 32×512
C4 calibration windows, seed 0; the pruned models are saved under ``runs/pruned/`` and shared with
``benchmarks/attention.py``). Each model is scored by ``d2prune eval MODEL --zero-shot`` on the
paper's seven tasks plus PIQA (lm-eval 0.4.x, 0-shot, acc_norm where the task has it, else acc).

A full run is ~70,000 loglikelihood requests per model (HellaSwag alone is 40,000), 2.47 M tokens with
shared contexts: ~2.4 hours per model in float32 on 2 AVX2 cores (``benchmarks/zeroshot_cost.py``),
so the default is ``--limit 50`` (the first 50 items of each task); pass ``--limit 0`` for the full sets. Results: ``benchmarks/results/zeroshot_smollm2.json`` and a table
in ``benchmarks/README.md``.

    .venv/bin/python benchmarks/zeroshot.py [--limit 50]
"""

from __future__ import annotations

import argparse
import math

from common import (
    BENCH_README,
    RESULTS_DIR,
    ROOT,
    load_results,
    pruned_model,
    pruned_model_args,
    replace_block,
    run_d2prune,
    save_results,
    shown,
)

RESULTS = RESULTS_DIR / "zeroshot_smollm2.json"
MARK_BEGIN, MARK_END = "<!-- zeroshot-table:begin -->", "<!-- zeroshot-table:end -->"
METHODS = {
    "sparsegpt": ["--method", "sparsegpt"],
    "wanda": ["--method", "wanda"],
    "d2prune": ["--method", "d2prune", "--target-layers", "self_attn.v_proj"],
    "alps": ["--method", "alps"],
}
SPARSITIES = ["0.5", "0.7"]
TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa"]


def write_table(rows: list[dict]) -> None:
    head = ["model", *TASKS, "mean (7)", "mean (8)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        z = r["zero_shot"]
        cells = [f"{100 * z[t]['value']:.1f} ± {100 * z[t]['stderr']:.1f}" for t in TASKS]
        # The mean's standard error treats the tasks as independent samples.
        se7 = math.sqrt(sum(z[t]["stderr"] ** 2 for t in TASKS[:7])) / 7
        lines.append(
            f"| {r['name']} | " + " | ".join(cells) + f" | **{100 * z['mean']:.1f}** ± {100 * se7:.1f} | "
            f"{100 * z['mean_all']:.1f} |"
        )
    n = {t: rows[0]["zero_shot"][t]["n"] for t in TASKS} if rows else {}
    metric = {t: rows[0]["zero_shot"][t]["metric"] for t in TASKS} if rows else {}
    lines += [
        "",
        "Accuracy in % ± lm-eval's standard error. Metric per task: "
        + ", ".join(f"{t} {metric[t]}" for t in TASKS)
        + ". Items per task: "
        + ", ".join(f"{t} {n[t]}" for t in TASKS)
        + ".",
    ]
    replace_block(BENCH_README, MARK_BEGIN, MARK_END, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=50, help="items per task; 0 = full task sets (default 50)")
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    rows = load_results(RESULTS)
    if args.table_only:
        write_table(rows)
        return
    zs = ["--eval", "none", "--zero-shot", "--tasks", ",".join(TASKS), "--zero-shot-batch-size", str(args.batch_size)]
    if args.limit:
        zs += ["--limit", str(args.limit)]
    jobs = [("dense", None, "smollm2-135m")]
    jobs += [(f"{m}-{p}", (m, p), None) for p in SPARSITIES for m in METHODS]
    for name, pruned, model in jobs:
        prune_cmd = None
        if pruned:  # skipped before pruning when measured: the saved models are not kept in the repository
            prune_cmd = shown(pruned_model_args(METHODS[pruned[0]], pruned[1]))
            model = str((ROOT / "runs" / "pruned" / name / "model").relative_to(ROOT))
        cmd = ["eval", model, *zs]
        if any(r["name"] == name and r["command"] == shown(cmd) and r.get("prune_command") == prune_cmd for r in rows):
            print(f"skip {name} (already measured)")
            continue
        if pruned:
            model_dir, prune_cmd = pruned_model(name, METHODS[pruned[0]], pruned[1])
            model = str(model_dir.relative_to(ROOT))
            cmd = ["eval", model, *zs]
        res = run_d2prune(name, cmd, ROOT / "runs" / "zeroshot" / name)
        row = {
            "name": name,
            "command": res["command"],
            "prune_command": prune_cmd,
            "wall_s": res["wall_s"],
            "peak_rss_mb": res["peak_rss_mb"],
            "zero_shot": res["record"]["zero_shot"],
        }
        print(f"{name}: mean(7) {100 * row['zero_shot']['mean']:.1f}  {row['wall_s']:.0f}s", flush=True)
        rows = [r for r in rows if r["name"] != name] + [row]
        save_results(RESULTS, rows)
        write_table(rows)


if __name__ == "__main__":
    main()
