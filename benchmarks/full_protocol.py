"""Full-protocol quality: SparseGPT, ALPS and D²Prune (``--target-layers auto``) at 50 % and 70 % on
SmolLM2-135M with the paper's protocol, the closest this machine gets to the published setting.

Calibration: 128 C4 windows of 2048 tokens (seed 0); evaluation: WikiText-2 test, every window of
2048 tokens. That is d2prune's defaults, so each cell is ``d2prune prune smollm2-135m --method ...
--sparsity S`` with nothing else. The cells run as ``d2prune sweep`` commands in ``runs/full/sweep``
(70 % first), resumable cell by cell: a cell takes about an hour here, so the table spans sessions.
A cell already in ``benchmarks/results/full_protocol_smollm2.json`` is not run again (the sweep
folder is git-ignored, so a fresh checkout has only that file); ``--cells`` picks which missing ones
to run. D²Prune auto prunes four candidates (~37 min each) before its evaluation, longer than one
session: its held-out scores are kept in ``benchmarks/results/full_protocol_progress/`` by every
``--table-only`` and restored by the next run, which scores the remaining candidates and prunes the
winner again if its weights were left behind. ``--table-only`` writes the table of the cells finished
so far (missing ones shown as such) to ``benchmarks/README.md`` and ``full_protocol_smollm2.json``.

    .venv/bin/python benchmarks/full_protocol.py                           # run the missing cells, then the table
    .venv/bin/python benchmarks/full_protocol.py --cells alps-0.5          # only some of them
    .venv/bin/python benchmarks/full_protocol.py --table-only              # the table; keeps the progress
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from quality import METHODS, summarize, sweep_command

from common import BENCH_README, RESULTS_DIR, ROOT, replace_block, run_d2prune, save_results, shown, start_launcher

RESULTS = RESULTS_DIR / "full_protocol_smollm2.json"
SWEEP = ROOT / "runs" / "full" / "sweep"
# The sweep folder is git-ignored and a fresh checkout lacks it; the small files that let the next
# checkout resume are kept here: the dense perplexity (~25 min to measure again) and each unfinished
# held-out search's scores (progress.json; its best weights are ~0.5 GB and stay behind: the resumed
# search prunes a lost winner again and checks its digest, see d2prune.selection).
KEPT = RESULTS_DIR / "full_protocol_progress"
DENSE_CACHE = "dense_perplexity.json"
MARK_BEGIN, MARK_END = "<!-- full-protocol:begin -->", "<!-- full-protocol:end -->"
VARIANTS = ["sparsegpt", "alps", "d2prune-auto"]
SPARSITIES = ["0.7", "0.5"]  # the sweep's order: the setting that separates the methods most comes first
PROTOCOL = ["--calib", "c4", "--seed", "0", "--eval", "wikitext2"]  # with the defaults: 128 × 2048, every window


def command() -> list[str]:
    return sweep_command("smollm2-135m", VARIANTS, SPARSITIES, PROTOCOL)


def finished_rows() -> tuple[list[dict], dict | None]:
    """The finished cells' result rows and the dense perplexity, from the sweep folder."""
    rows, dense = [], None
    for path in sorted((SWEEP / "cells").glob("*/run.json")):
        record = json.loads(path.read_text())
        name = record["sweep_cell"]["name"]
        rows.append(
            summarize(
                {"name": name, "command": record["command"], "wall_s": None, "peak_rss_mb": None, "record": record}
            )
        )
        rows[-1]["timings"] = record.get("prune_timings")
        measured = record["perplexity"].get("dense", {}).get("wikitext2")
        if measured and dense is None:
            dense = {"ppl": measured["ppl"], "windows": measured["n_windows"]}
    cache = SWEEP / "dense_perplexity.json"  # measured before the first cell finishes
    if dense is None and cache.is_file():
        measured = next(iter(json.loads(cache.read_text()).values()), {}).get("wikitext2")
        dense = {"ppl": measured["ppl"], "windows": measured["n_windows"]} if measured else None
    return rows, dense


def write_table(rows: list[dict], dense: dict | None) -> None:
    by_name = {r["name"]: r for r in rows}
    head = "| method | 50 % | 70 % | vs SparseGPT: 50 % | 70 % |"
    lines = [head, "|---|---|---|---|---|"]
    for variant in VARIANTS:
        cells, versus = [], []
        for s in ("0.5", "0.7"):
            r, base = by_name.get(f"{variant}-{s}"), by_name.get(f"sparsegpt-{s}")
            cells.append(f"{r['ppl']:.2f}" if r else "not yet run")
            ok = r and base and variant != "sparsegpt"
            versus.append(f"{100 * (r['ppl'] / base['ppl'] - 1):+.0f} %" if ok else "-")
        label = METHODS[variant]
        lines.append(f"| {variant} (`{' '.join(label)}`) | {' | '.join(cells)} | {' | '.join(versus)} |")
    done = len(rows)
    lines += [
        "",
        f"Dense: **{dense['ppl']:.2f}** ({dense['windows']} windows)." if dense else "Dense: not yet measured.",
        f"{done} of {len(VARIANTS) * len(SPARSITIES)} cells measured. Command (resumable; "
        f"`.venv/bin/python benchmarks/full_protocol.py` reruns it): "
        f"`{shown([*command(), '--output-dir', str(SWEEP.relative_to(ROOT))])}`",
    ]
    replace_block(BENCH_README, MARK_BEGIN, MARK_END, "\n".join(lines))
    save_results(RESULTS, [*rows, *([{"name": "dense", **dense}] if dense else [])])


def sweep_path(kept: str) -> Path:
    """Where a file kept under ``KEPT`` lives in the sweep folder."""
    if kept == DENSE_CACHE:
        return SWEEP / DENSE_CACHE
    return SWEEP / "cells" / kept.removesuffix(".progress.json") / "heldout-progress" / "progress.json"


def restore_progress() -> list[str]:
    """Copy the kept state into a sweep folder that lacks it; the names restored."""
    restored = []
    for kept in sorted(KEPT.glob("*.json")) if KEPT.is_dir() else []:
        target = sweep_path(kept.name)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, target)
            restored.append(kept.name)
    return restored


def keep_progress(finished: set[str]) -> None:
    """Copy the sweep folder's resumable state to ``KEPT``; forget the held-out searches of finished cells."""
    KEPT.mkdir(parents=True, exist_ok=True)
    searches = [
        f"{p.parent.parent.name}.progress.json" for p in (SWEEP / "cells").glob("*/heldout-progress/progress.json")
    ]
    for name in [DENSE_CACHE, *searches]:
        if sweep_path(name).is_file():
            shutil.copyfile(sweep_path(name), KEPT / name)
    for kept in KEPT.glob("*.progress.json"):
        if kept.name.removesuffix(".progress.json") in finished:
            kept.unlink()


def committed_rows() -> tuple[list[dict], dict | None]:
    """The cells and dense perplexity already in ``RESULTS``: the sweep folder is git-ignored, so a fresh
    checkout has only these, and the sweep need not run them again."""
    if not RESULTS.is_file():
        return [], None
    saved = json.loads(RESULTS.read_text())
    dense = next(({"ppl": r["ppl"], "windows": r["windows"]} for r in saved if r["name"] == "dense"), None)
    return [r for r in saved if r["name"] != "dense"], dense


def all_rows() -> tuple[list[dict], dict | None]:
    """The committed cells, replaced by the sweep folder's where that has run them (again)."""
    old, old_dense = committed_rows()
    new, new_dense = finished_rows()
    names = {r["name"] for r in new}
    return [r for r in old if r["name"] not in names] + new, new_dense or old_dense


def missing_groups(done: set[str], only: list[str] | None) -> list[tuple[str, list[str]]]:
    """The cells still to run, as (sparsity, variants) sweeps in the grid's order; ``only`` limits them."""
    groups = []
    for s in SPARSITIES:
        todo = [v for v in VARIANTS if f"{v}-{s}" not in done and (only is None or f"{v}-{s}" in only)]
        if todo:
            groups.append((s, todo))
    return groups


def main() -> None:
    start_launcher()  # before torch is imported (see common.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table-only", action="store_true", help="only write the table of the finished cells")
    ap.add_argument("--dry-run", action="store_true", help="print the sweep commands still to run and stop")
    cells = [f"{v}-{s}" for s in SPARSITIES for v in VARIANTS]
    ap.add_argument("--cells", nargs="+", choices=cells, metavar="CELL", help=f"run only these of {cells}")
    args = ap.parse_args()
    rows, _ = all_rows()
    groups = missing_groups({r["name"] for r in rows}, args.cells)
    out = ["--output-dir", str(SWEEP.relative_to(ROOT))]
    if args.dry_run:
        for s, variants in groups:
            print(shown([*sweep_command("smollm2-135m", variants, [s], PROTOCOL), *out]))
        return
    if not args.table_only:
        for name in restore_progress():
            print(f"resuming from {(KEPT / name).relative_to(ROOT)}", flush=True)
        for s, variants in groups:
            # One folder for every group: a cell's run record depends only on its own arguments.
            cmd = sweep_command("smollm2-135m", variants, [s], PROTOCOL)
            print(f"running {shown([*cmd, *out])}", flush=True)
            run_d2prune("full-protocol", cmd, SWEEP)
    rows, dense = all_rows()
    keep_progress({r["name"] for r in rows})
    for r in rows:
        print(f"{r['name']}: ppl {r['ppl']:.2f}  sparsity {r['achieved']:.4f}  prune {r['prune_s'] or 0:.0f}s")
    write_table(rows, dense)


if __name__ == "__main__":
    main()
