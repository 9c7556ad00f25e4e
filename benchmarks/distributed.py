"""Data-parallel calibration benchmark: 1 process vs 2 gloo ranks (torchrun) on SmolLM2-135M.

The same ``d2prune prune`` (SparseGPT 50%, the quick protocol: calibration 32 × 512 C4 windows,
seed 0; first 64 WikiText-2 windows of 512 tokens; the model saved) runs three times, each its own
process tree:

* one process, 2 threads (OMP_NUM_THREADS=2: the whole 2-core machine);
* one process, 1 thread (the same compute per process as one rank below);
* ``torchrun --standalone --nproc-per-node 2``, 1 thread per rank.

Measured: wall time of the whole command, the prune phase (rank 0's), peak RSS of the largest process
over the whole run (``os.wait4`` on the command: for torchrun the largest of the agent and the ranks
it waited for), each rank's own peak RSS up to the end of the perplexity evaluation (``ru_maxrss``,
from the run record's ``distributed.ranks``), perplexity, and whether the saved weights equal those of the
1-thread single process (identical masks; largest |ΔW| relative to max |W| per linear). Results go to
``benchmarks/results/distributed_smollm2.json`` and the table between the ``distributed-table``
markers in ``benchmarks/README.md``.

    .venv/bin/python benchmarks/distributed.py --dry-run      # print the commands only
    .venv/bin/python benchmarks/distributed.py                # about 10-15 min on an idle 2-core machine
    .venv/bin/python benchmarks/distributed.py --model ../shared/models/aidreams260K --nsamples 4 \\
        --seqlen 64 --eval-windows 4 --results /tmp/d.json --readme /tmp/README.md --runs-dir /tmp/runs   # smoke test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import BENCH_README as README
from common import RESULTS_DIR, parse_in_root, protocol_arguments, replace_block, run_d2prune, save_results, shown

RESULTS = RESULTS_DIR / "distributed_smollm2.json"
RUNS = Path("runs") / "distributed"  # relative to the project root, so the recorded commands are short
MARK_BEGIN = "<!-- distributed-table:begin -->"
MARK_END = "<!-- distributed-table:end -->"
TORCHRUN = ["torchrun", "--standalone", "--nproc-per-node", "2"]

# (label, launcher, threads per process); the reference for the weight comparison comes second.
RUNS_PLAN = [
    ("1 process, 2 threads", None, 2),
    ("1 process, 1 thread", None, 1),
    ("2 ranks (torchrun), 1 thread each", TORCHRUN, 1),
]
REFERENCE = "1 process, 1 thread"


def prune_args(a: argparse.Namespace, model_dir: Path) -> list[str]:
    return [
        "prune",
        a.model,
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--nsamples",
        str(a.nsamples),
        "--seqlen",
        str(a.seqlen),
        "--calib",
        "c4",
        "--seed",
        "0",
        "--eval",
        "wikitext2",
        "--eval-windows",
        str(a.eval_windows),
        "--save-model",
        str(model_dir),
    ]


def compare_weights(reference: Path, other: Path) -> dict:
    """Mask and value agreement of the pruned decoder linears of two saved models."""
    import torch
    from safetensors.torch import load_file

    ref, oth = load_file(str(reference / "model.safetensors")), load_file(str(other / "model.safetensors"))
    names = [k for k in ref if k.endswith(".weight") and ".layers." in k and ref[k].dim() == 2]
    mismatched = sum(int((ref[k] == 0).ne(oth[k] == 0).sum()) for k in names)
    worst = max(float((ref[k] - oth[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in names)
    identical = all(torch.equal(ref[k], oth[k]) for k in names)
    return {"linears": len(names), "mask_mismatches": mismatched, "max_rel_diff": worst, "identical": identical}


def summarize(label: str, threads: int, run: dict) -> dict:
    rec = run["record"]
    dist = rec.get("distributed")
    return {
        "name": label,
        "command": f"OMP_NUM_THREADS={threads} {run['command']}",
        "threads_per_process": threads,
        "ranks": dist["world_size"] if dist else 1,
        "wall_s": run["wall_s"],
        "prune_s": rec["timings"]["prune"],
        "peak_rss_mb": run["peak_rss_mb"],
        "rank_peak_rss_to_eval_end_mb": [r["peak_rss_mb"] for r in dist["ranks"]] if dist else None,
        "ppl": rec["perplexity"]["pruned"]["wikitext2"]["ppl"],
        "eval_windows": rec["perplexity"]["pruned"]["wikitext2"]["n_windows"],
        "overall_sparsity": rec["overall_sparsity"],
        "model_dir": rec["saved_model"],
    }


def write_table(rows: list[dict], readme: Path) -> None:
    lines = [
        "| run | wall s | prune s | peak RSS MB, largest process (whole run) | peak RSS MB per rank (to end of evaluation) "
        "| WikiText-2 ppl | weights vs 1 process, 1 thread |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ranks = (
            " / ".join(f"{m:.0f}" for m in r["rank_peak_rss_to_eval_end_mb"])
            if r["rank_peak_rss_to_eval_end_mb"]
            else "–"
        )
        c = r.get("vs_reference")
        if c is None:
            same = "(reference)"
        elif c["identical"]:
            same = "identical"
        else:
            same = f"{c['mask_mismatches']} mask differences; max rel. diff {c['max_rel_diff']:.1e}"
        lines.append(
            f"| {r['name']} | {r['wall_s']:.0f} | {r['prune_s']:.0f} | {r['peak_rss_mb']:.0f} | {ranks} "
            f"| {r['ppl']:.2f} | {same} |"
        )
    if rows:
        lines.append("")
        lines.append("Commands: " + "; ".join(f"`{r['command']}`" for r in rows) + ".")
    replace_block(readme, MARK_BEGIN, MARK_END, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocol_arguments(ap, RESULTS, README, RUNS)
    a = parse_in_root(ap, RUNS)
    if a.table_only:
        write_table(json.loads(a.results.read_text()), a.readme)
        return

    rows = []
    for label, launcher, threads in RUNS_PLAN:
        slug = label.split(",")[0].replace(" ", "-").replace("(", "").replace(")", "") + f"-{threads}t"
        out = a.runs_dir / slug
        args = prune_args(a, out / "model")
        print(f"[{label}] OMP_NUM_THREADS={threads} {shown(args, launcher)} --output-dir {out}", flush=True)
        if a.dry_run:
            continue
        run = run_d2prune(label, args, out, launcher=launcher, env={"OMP_NUM_THREADS": str(threads)})
        row = summarize(label, threads, run)
        print(
            f"[{label}] wall {row['wall_s']:.0f} s, prune {row['prune_s']:.0f} s, "
            f"peak RSS {row['peak_rss_mb']:.0f} MB, ppl {row['ppl']:.2f}",
            flush=True,
        )
        rows.append(row)
    if a.dry_run:
        return
    reference = next(r for r in rows if r["name"] == REFERENCE)
    for r in rows:
        if r is not reference:
            r["vs_reference"] = compare_weights(Path(reference["model_dir"]), Path(r["model_dir"]))
    save_results(a.results, rows)
    write_table(rows, a.readme)
    print(f"results: {a.results}")


if __name__ == "__main__":
    main()
