"""Quality benchmark: WikiText-2 perplexity of each method and sparsity on SmolLM2-135M.

Quick protocol: calibration 32 windows × 512 tokens from the shared C4 sample (seed 0); evaluation
on the first 64 WikiText-2 test windows of 512 tokens. A suite is one ``d2prune sweep`` (its methods
are the sweep's named variants, its settings the sweep's sparsities and N:M patterns) in its own
process, resumable in ``runs/quality/sweep-SUITE`` (``--force`` starts it afresh). Its cells replace
the rows of the same name in ``benchmarks/results/quality_smollm2.json``; the table in
``benchmarks/README.md`` is regenerated from that file, and the plot of every row to
``benchmarks/results/quality_smollm2.png``. The bf16 suite (pruned with bfloat16 forwards, scored in
float32) keeps one prune and one ``d2prune eval`` process per cell: a sweep scores in the forward dtype.

    .venv/bin/python benchmarks/quality.py --suite readme        # the project README's table (one sweep)
    .venv/bin/python benchmarks/quality.py                       # baseline suite
    .venv/bin/python benchmarks/quality.py --suite extended      # Pruner-Zero, OWL, D²Prune auto
    .venv/bin/python benchmarks/quality.py --suite exact         # ALPS, D²-ALPS, RIA, DSnoT, --refit cg
    .venv/bin/python benchmarks/quality.py --suite bf16          # pruned with bfloat16 forwards, scored in fp32
    .venv/bin/python benchmarks/quality.py --suite recheck       # held-out searches and refit at 70 %, current code
    .venv/bin/python benchmarks/quality.py --methods wanda --settings 0.5 2:4
    .venv/bin/python benchmarks/quality.py --dry-run             # print the sweep command and stop
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

from common import BENCH_README as README
from common import RESULTS_DIR, ROOT, load_results, replace_block, run_d2prune, save_results, shown, start_launcher

RESULTS = RESULTS_DIR / "quality_smollm2.json"
PLOT = RESULTS_DIR / "quality_smollm2.png"
SELECTION_PLOT = RESULTS_DIR / "quality_readme.png"  # the project README's plot (its table's rows)
RUNS = ROOT / "runs" / "quality"
SWEEP = RUNS / "sweep"  # one sweep folder for every suite: its cells are named by variant and setting
MARK_BEGIN = "<!-- quality-table:begin -->"
MARK_END = "<!-- quality-table:end -->"
SELECTION_BEGIN = "<!-- quality-selection:begin -->"
SELECTION_END = "<!-- quality-selection:end -->"

# name -> extra CLI arguments; D²Prune leaves v_proj un-updated, the paper's choice for LLaMA models.
METHODS = {
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "sparsegpt": ["--method", "sparsegpt"],
    "d2prune": ["--method", "d2prune", "--target-layers", "self_attn.v_proj"],
    "pruner-zero": ["--method", "pruner-zero"],
    "owl-wanda": ["--method", "wanda", "--sparsity-profile", "owl"],
    "owl-sparsegpt": ["--method", "sparsegpt", "--sparsity-profile", "owl"],
    "owl-d2prune": ["--method", "d2prune", "--target-layers", "self_attn.v_proj", "--sparsity-profile", "owl"],
    "d2prune-auto": ["--method", "d2prune", "--target-layers", "auto"],
    # Exact-reconstruction methods and the newer mask methods (issue #13).
    "alps": ["--method", "alps"],
    "d2alps-none": ["--method", "d2alps", "--target-layers", "none"],
    "d2alps-auto": ["--method", "d2alps", "--target-layers", "auto"],
    # ALPS plus D²Prune's held-out choice of one un-updated projection ("none" = plain ALPS).
    "alps-auto": ["--method", "d2alps", "--no-d2-sparsegpt", "--target-layers", "auto"],
    # ALPS with its initial rho chosen on held-out C4 (0.03 / 0.1 / 0.3).
    "alps-rho-auto": ["--method", "alps", "--alps-rho", "auto"],
    "ria": ["--method", "ria"],
    "ria-permute": ["--method", "ria", "--ria-permute"],
    "dsnot": ["--method", "dsnot"],
    "sparsegpt-refit": ["--method", "sparsegpt", "--refit", "cg"],
    "wanda-refit": ["--method", "wanda", "--refit", "cg"],
    # Forwards (calibration passes and the evaluation) in bfloat16, weights float32 (issue #15).
    "sparsegpt-bf16": ["--method", "sparsegpt", "--compute-dtype", "bfloat16"],
    "wanda-bf16": ["--method", "wanda", "--compute-dtype", "bfloat16"],
    "d2prune-bf16": ["--method", "d2prune", "--target-layers", "self_attn.v_proj", "--compute-dtype", "bfloat16"],
    "magnitude-bf16": ["--method", "magnitude", "--compute-dtype", "bfloat16"],
    "alps-bf16": ["--method", "alps", "--compute-dtype", "bfloat16"],
    # Their float32 twins, pruned and scored the same way in the same suite run: the bf16 rows' peers.
    "sparsegpt-fp32": ["--method", "sparsegpt", "--compute-dtype", "float32"],
    "wanda-fp32": ["--method", "wanda", "--compute-dtype", "float32"],
    "d2prune-fp32": ["--method", "d2prune", "--target-layers", "self_attn.v_proj", "--compute-dtype", "float32"],
}
# Methods whose model is pruned with --eval none --save-model and then scored by a separate
# `d2prune eval` in float32: the bf16 rows measure what bfloat16 forwards do to *pruning*, not
# bfloat16 logits (which move perplexity by themselves; see benchmarks/README.md#compute-dtype).
EVAL_SEPARATELY = {name for name in METHODS if name.endswith(("-bf16", "-fp32"))}
DTYPE_BEGIN, DTYPE_END = "<!-- dtype-quality:begin -->", "<!-- dtype-quality:end -->"
# Two suites: the baseline methods over every setting, and the later additions (OWL has no N:M form).
SUITES = {
    # The project README's table: every cell from one sweep, so one command regenerates it.
    "readme": (["wanda", "sparsegpt", "d2prune", "alps"], ["0.5", "0.6", "0.7", "0.8", "2:4"]),
    "base": (["magnitude", "wanda", "sparsegpt", "d2prune"], ["0.5", "0.6", "0.7", "0.8", "2:4", "4:8"]),
    "extended": (
        ["pruner-zero", "owl-wanda", "owl-sparsegpt", "owl-d2prune", "d2prune-auto"],
        ["0.5", "0.6", "0.7", "0.8", "2:4"],
    ),
    "exact": (
        [
            "alps",
            "ria",
            "dsnot",
            "sparsegpt-refit",
            "wanda-refit",
            "d2alps-none",
            "alps-auto",
            "d2alps-auto",
            "alps-rho-auto",
        ],
        ["0.5", "0.6", "0.7", "0.8", "2:4"],
    ),
    # The held-out projection searches and the refit at 70 % on the current engine (the extended and
    # exact suites' cells of these ran on earlier code or not at all); peer: sparsegpt-fp32-0.7.
    "recheck": (["d2prune-auto", "sparsegpt-refit", "alps-auto", "d2alps-auto"], ["0.7"]),
    "bf16": (
        ["sparsegpt-bf16", "wanda-bf16", "d2prune-bf16", "sparsegpt-fp32", "wanda-fp32", "d2prune-fp32"],
        ["0.7", "0.5"],
    ),
}


def summarize(result: dict) -> dict:
    rec = result["record"]
    ppl = rec["perplexity"]
    key = "pruned" if "pruned" in ppl else "model"
    wt = ppl[key]["wikitext2"]
    cfg = rec.get("config", {})
    search = rec.get("target_search") or rec.get("heldout_choice")
    return {
        "name": result["name"],
        "method": cfg.get("method", {}).get("name", "dense"),
        "pattern": cfg.get("pattern", "-"),
        "target": cfg.get("sparsity", 0.0),
        "achieved": rec.get("overall_sparsity", 0.0),
        "ppl": wt["ppl"],
        "windows": wt["n_windows"],
        # With a held-out choice the prune phase is the whole search (every candidate pruned).
        "prune_s": rec["timings"]["prune"] if search else rec.get("prune_timings", {}).get("total"),
        "target_search": search,
        "wall_s": result["wall_s"],
        "peak_rss_mb": result["peak_rss_mb"],
        "command": result["command"],
    }


def prune_then_evaluate(name: str, cmd: list[str], common: list[str]) -> dict:
    """``cmd`` with --eval none --save-model, then ``d2prune eval`` of the saved model (float32); the
    prune run's record with the evaluation's perplexity, the two processes' wall times summed."""
    folder = RUNS / name
    pruned = run_d2prune(name, [*cmd, "--eval", "none", "--save-model"], folder)
    # Relative to the repository root, where the runs start: the recorded command works in any clone.
    scored = run_d2prune(f"{name}-eval", ["eval", str((folder / "model").relative_to(ROOT)), *common], folder / "eval")
    record = {**pruned["record"], "perplexity": {"pruned": scored["record"]["perplexity"]["model"]}}
    return {
        **pruned,
        "command": f"{pruned['command']} && {scored['command']}",
        "wall_s": pruned["wall_s"] + scored["wall_s"],
        "peak_rss_mb": max(pruned["peak_rss_mb"], scored["peak_rss_mb"]),
        "record": record,
    }


def write_dtype_table(rows: list[dict]) -> None:
    """bfloat16 forwards against float32 forwards, pruned and scored the same way (the bf16 suite)."""
    by_name = {r["name"]: r for r in rows}
    lines = ["| method | sparsity | float32 forwards | bfloat16 forwards | change |", "|---|---|---|---|---|"]
    for method in ("sparsegpt", "wanda", "d2prune"):
        for s in ("0.5", "0.7"):
            f32, b16 = by_name.get(f"{method}-fp32-{s}"), by_name.get(f"{method}-bf16-{s}")
            change = f"{100 * (b16['ppl'] / f32['ppl'] - 1):+.1f} %" if f32 and b16 else ""
            cells = [f"{r['ppl']:.2f}" if r else "not measured" for r in (f32, b16)]
            lines.append(f"| {method} | {float(s):.0%} | {cells[0]} | {cells[1]} | {change} |")
    replace_block(README, DTYPE_BEGIN, DTYPE_END, "\n".join(lines), append=False)


def setting_args(setting: str) -> list[str]:
    return ["--pattern", setting] if ":" in setting else ["--sparsity", setting]


def time_and_rss(row: dict) -> str:
    rss = row.get("peak_rss_mb")
    return f"{row['prune_s']:.0f}" + (f" / {rss:.0f}" if rss is not None else "")


def write_table(rows: list[dict]) -> None:
    dense = next((r for r in rows if r["name"] == "dense"), None)
    settings = []
    for r in rows:
        if r["method"] != "dense":
            label = setting_label(r)
            r["_setting"] = label
            if label not in settings:
                settings.append(label)
    names = [n for n in METHODS if any(r["name"].rsplit("-", 1)[0] == n for r in rows)]
    lines = [
        f"Dense WikiText-2 perplexity: **{dense['ppl']:.2f}**" if dense else "Dense: not measured",
        "",
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    by_key = {(r["name"].rsplit("-", 1)[0], r.get("_setting")): r for r in rows}
    for n in names:
        cells = [f"{by_key[(n, s)]['ppl']:.2f}" if (n, s) in by_key else "–" for s in settings]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Prune-phase wall time (s) / peak RSS of the whole process (MB: load, calibrate, prune, evaluate); "
        "a cell without an RSS ran in a `d2prune sweep`, one process for all its cells (its peak RSS is "
        "in the results file):",
        "",
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for n in names:
        cells = [time_and_rss(by_key[(n, s)]) if (n, s) in by_key else "–" for s in settings]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for r in rows:
        if r.get("note"):
            lines.append(f"\n`{r['name']}`: {r['note']}.")
        search = r.get("target_search")
        if search:
            tried = ", ".join(f"{k.replace('self_attn.', '')} {v:.2f}" for k, v in search["heldout_ppl"].items())
            lines.append(
                f"\n`{r['name']}` chose **{search['chosen'].replace('self_attn.', '')}** "
                f"(held-out C4 perplexity per candidate: {tried})."
            )
    lines += [
        "",
        "Achieved overall sparsity: "
        + ", ".join(f"{r['name']} {r['achieved']:.4f}" for r in rows if r["method"] != "dense"),
    ]
    write_plot(rows)
    lines += ["", f"![WikiText-2 perplexity against sparsity]({PLOT.relative_to(README.parent).as_posix()})"]
    table = "\n".join(lines)
    # The table goes into benchmarks/README.md and, where it has the markers, the project README
    # (which no longer carries them: it shows a hand-picked selection that links to the full table).
    replace_block(README, MARK_BEGIN, MARK_END, table)
    replace_block(ROOT / "README.md", MARK_BEGIN, MARK_END, table, append=False)
    write_selection(rows)


def setting_label(row: dict) -> str:
    return row["pattern"] if row["pattern"] != "unstructured" else f"{row['target']:.0%}"


def write_selection(rows: list[dict]) -> bool:
    """The project README's table: the ``readme`` suite's cells from the results file, the lowest
    perplexity of each column in bold, and ALPS against SparseGPT. Left alone unless every cell has
    been measured by one sweep (the README says so)."""
    methods, settings = SUITES["readme"]
    by_key = {(r["name"].rsplit("-", 1)[0], setting_label(r)): r for r in rows if r["method"] != "dense"}
    labels = [f"{float(s):.0%}" if ":" not in s else s for s in settings]
    cells = {(m, lab): by_key.get((m, lab)) for m in methods for lab in labels}
    sweeps = {c["sweep"]["command"] if c and c.get("sweep") else None for c in cells.values()}
    dense = next((r for r in rows if r["name"] == "dense"), None)
    if None in sweeps or len(sweeps) != 1 or dense is None:
        print("README selection not rewritten: its cells are not all from one sweep (run --suite readme)")
        return False
    names = {"d2prune": "d2prune (v_proj un-updated)"}
    best = {lab: min(cells[(m, lab)]["ppl"] for m in methods) for lab in labels}
    lines = [
        f"WikiText-2 perplexity of SmolLM2-135M (dense **{dense['ppl']:.2f}**) with the quick protocol (calibration",
        "32×512 C4 windows, seed 0; first 64 WikiText-2 test windows of 512 tokens), every cell from one",
        "`d2prune sweep` (`.venv/bin/python benchmarks/quality.py --suite readme` reruns it and rewrites this",
        "table); a selection of the [full table](benchmarks/README.md#quality), which also has magnitude,",
        "Pruner-Zero, OWL, D²Prune's held-out projection choice, RIA, DSnoT, D²-ALPS, `--refit cg`, 4:8,",
        "prune times and peak memory:",
        "",
        "| method | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for m in methods:
        ppl = [cells[(m, lab)]["ppl"] for lab in labels]
        shown_ = [f"**{p:.2f}**" if p == best[lab] else f"{p:.2f}" for p, lab in zip(ppl, labels)]
        name = f"**{m}**" if all(p == best[lab] for p, lab in zip(ppl, labels)) else names.get(m, m)
        lines.append(f"| {name} | " + " | ".join(shown_) + " |")
    gain = [1 - cells[("alps", lab)]["ppl"] / cells[("sparsegpt", lab)]["ppl"] for lab in labels]
    seventy = "70%" if "70%" in labels else labels[0]
    slower = cells[("alps", seventy)]["prune_s"] / cells[("sparsegpt", seventy)]["prune_s"]
    lines += [
        "",
        f"ALPS is {' / '.join(f'{g:.0%}'.rstrip('%') for g in gain)} % below SparseGPT at "
        f"{' / '.join(lab.rstrip('%') for lab in labels[:-1])} % / {labels[-1]}, in {slower:.2f}× SparseGPT's "
        f"prune time ({seventy}, same sweep).",
        "",
        f"![WikiText-2 perplexity against sparsity]({SELECTION_PLOT.relative_to(ROOT).as_posix()})",
    ]
    write_plot([dense, *(c for c in cells.values())], SELECTION_PLOT)
    return replace_block(ROOT / "README.md", SELECTION_BEGIN, SELECTION_END, "\n".join(lines), append=False)


def sweep_command(model: str, methods: list[str], settings: list[str], protocol: list[str]) -> list[str]:
    """The ``d2prune sweep`` arguments of a suite: its methods as named variants, its settings as the
    sweep's sparsities and N:M patterns (OWL cells of N:M patterns are skipped by the sweep)."""
    sparsities = [s for s in settings if ":" not in s]
    patterns = (["unstructured"] if sparsities else []) + [s for s in settings if ":" in s]
    args = ["sweep", model]
    for m in methods:
        args += ["--variant", f"{m}={shlex.join(METHODS[m])}"]
    args += ["--methods", *methods, "--patterns", *patterns]
    return args + (["--sparsities", *sparsities] if sparsities else []) + protocol


def run_sweep(args: list[str], folder: Path) -> tuple[list[dict], dict | None]:
    """Run the sweep in its own process; its cells as result rows, and the dense row."""
    res = run_d2prune("sweep", args, folder)
    summary = json.loads((folder / "sweep.json").read_text())
    rows, dense = [], None
    for cell in summary["cells"]:
        if cell.get("skipped"):
            continue
        record = json.loads((folder / cell["run_record"]).read_text())
        # One process ran every cell: its wall time and peak RSS belong to the sweep, not to a cell.
        row = summarize(
            {"name": cell["name"], "command": record["command"], "wall_s": None, "peak_rss_mb": None, "record": record}
        )
        rows.append(
            {**row, "sweep": {"command": res["command"], "wall_s": res["wall_s"], "rss_mb": res["peak_rss_mb"]}}
        )
        measured = record["perplexity"].get("dense", {}).get("wikitext2")
        if measured and dense is None:
            dense = {
                "name": "dense",
                "method": "dense",
                "pattern": "-",
                "target": 0.0,
                "achieved": 0.0,
                "ppl": measured["ppl"],
                "windows": measured["n_windows"],
                "prune_s": None,
                "wall_s": None,
                "peak_rss_mb": None,
                "command": f"{res['command']} (its dense evaluation)",
            }
    return rows, dense


def write_plot(rows: list[dict], path: Path = PLOT) -> None:
    """Perplexity against achieved sparsity of the rows, one line per method (d2prune sweep's plot)."""
    from d2prune.cli.sweep_report import plot

    dense = next((r["ppl"] for r in rows if r["name"] == "dense"), None)
    points = [
        {
            "variant": r["name"].rsplit("-", 1)[0],
            "pattern": r["pattern"],
            "achieved": r["achieved"],
            "pruned": r["ppl"],
            "dense": dense,
            "metric": "ppl (wikitext2)",
        }
        for r in rows
        if r["method"] != "dense"
    ]
    plot(points, path, title="SmolLM2-135M, WikiText-2 (quick protocol)")


def main() -> None:
    start_launcher()  # before torch is imported (see common.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=list(SUITES), default="base")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="default: the suite's")
    ap.add_argument("--settings", nargs="+", default=None, help="default: the suite's")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--force", action="store_true", help="start the sweep afresh (remove its finished cells)")
    ap.add_argument("--dry-run", action="store_true", help="print the sweep command and stop")
    ap.add_argument("--table-only", action="store_true", help="only rewrite the table and plot from the results file")
    args = ap.parse_args()
    if args.table_only:
        rows = json.loads(RESULTS.read_text())
        write_table(rows)
        write_dtype_table(rows)
        return
    args.methods = args.methods or SUITES[args.suite][0]
    args.settings = args.settings or SUITES[args.suite][1]

    common = ["--seqlen", str(args.seqlen), "--eval", "wikitext2", "--eval-windows", str(args.eval_windows)]
    protocol = ["--nsamples", str(args.nsamples), "--calib", "c4", "--seed", "0", *common]
    swept = [m for m in args.methods if m not in EVAL_SEPARATELY]
    command = sweep_command(args.model, swept, args.settings, protocol)
    if args.dry_run:
        print(shown([*command, "--output-dir", str(SWEEP.relative_to(ROOT))]))
        return
    results = load_results(RESULTS)
    if swept:
        if args.force:
            shutil.rmtree(SWEEP, ignore_errors=True)
        # Its cells' progress is in the sweep folder (cells/*/run.json) while it runs.
        print(f"running {shown([*command, '--output-dir', str(SWEEP.relative_to(ROOT))])}", flush=True)
        rows, dense = run_sweep(command, SWEEP)
        if dense:
            before = next((r["ppl"] for r in results if r["name"] == "dense"), None)
            print(f"dense: ppl {dense['ppl']:.2f} (results file before: {before})")
            results = [r for r in results if r["name"] != "dense"] + [dense]
        for res in rows:
            print(
                f"{res['name']}: ppl {res['ppl']:.2f}  sparsity {res['achieved']:.4f}  prune {res['prune_s'] or 0:.0f}s"
            )
        names = {r["name"] for r in rows}
        results = [r for r in results if r["name"] not in names] + rows
        save_results(RESULTS, results)
    # Pruned with bfloat16 forwards, scored in float32 by a separate `d2prune eval`: one process each.
    for s in args.settings:
        for m in [m for m in args.methods if m in EVAL_SEPARATELY]:
            name = f"{m}-{s}"
            cmd = ["prune", args.model, *METHODS[m], *setting_args(s), *protocol]
            separately = shown([*cmd, "--eval", "none", "--save-model"]) + " && "
            if not args.force and any(r["command"].startswith(separately) for r in results):
                print(f"skip {name} (already measured)")
                continue
            res = summarize(prune_then_evaluate(name, cmd, common))
            print(f"{name}: ppl {res['ppl']:.2f}  sparsity {res['achieved']:.4f}  prune {res['prune_s'] or 0:.0f}s")
            results = [r for r in results if r["name"] != name] + [res]
            save_results(RESULTS, results)
            write_dtype_table(results)
    write_table(results)


if __name__ == "__main__":
    main()
