"""Full-protocol quality: SparseGPT, ALPS and D²Prune (``--target-layers auto``) at 50 % and 70 % on
SmolLM2-135M with the paper's protocol, the closest this machine gets to the published setting.

Calibration: 128 C4 windows of 2048 tokens (seed 0); evaluation: WikiText-2 test, every window of
2048 tokens. That is d2prune's defaults, so each cell is ``d2prune prune smollm2-135m --method ...
--sparsity S`` with nothing else. The six cells are one ``d2prune sweep`` in ``runs/full/sweep``
(70 % first), resumable cell by cell: a cell takes about an hour here, so the sweep spans sessions;
rerun the same command to continue. D²Prune auto prunes four candidates (~30 min each) before its
evaluation, longer than one session, and resumes within its cell candidate by candidate. The cells share the machine with other
work (and may be paused for a timing benchmark), so their times are not reported. ``--table-only`` writes the table of the
cells finished so far (missing ones shown as such) to ``benchmarks/README.md`` and
``benchmarks/results/full_protocol_smollm2.json``.

    .venv/bin/python benchmarks/full_protocol.py               # run (or resume) the sweep, then the table
    .venv/bin/python benchmarks/full_protocol.py --table-only  # the table of the finished cells
"""

from __future__ import annotations

import argparse
import json

from quality import METHODS, summarize, sweep_command

from common import BENCH_README, RESULTS_DIR, ROOT, replace_block, run_d2prune, save_results, shown, start_launcher

RESULTS = RESULTS_DIR / "full_protocol_smollm2.json"
SWEEP = ROOT / "runs" / "full" / "sweep"
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
    head = "| method | 50 % | 70 % | 70 %: vs SparseGPT |"
    lines = [head, "|---|---|---|---|"]
    base70 = by_name.get("sparsegpt-0.7")
    for variant in VARIANTS:
        cells = []
        for s in ("0.5", "0.7"):
            r = by_name.get(f"{variant}-{s}")
            cells.append(f"{r['ppl']:.2f}" if r else "not yet run")
        r70 = by_name.get(f"{variant}-0.7")
        vs = f"{100 * (r70['ppl'] / base70['ppl'] - 1):+.0f} %" if r70 and base70 and variant != "sparsegpt" else "-"
        label = METHODS[variant]
        lines.append(f"| {variant} (`{' '.join(label)}`) | {' | '.join(cells)} | {vs} |")
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


def main() -> None:
    start_launcher()  # before torch is imported (see common.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table-only", action="store_true", help="only write the table of the finished cells")
    ap.add_argument("--dry-run", action="store_true", help="print the sweep command and stop")
    args = ap.parse_args()
    if args.dry_run:
        print(shown([*command(), "--output-dir", str(SWEEP.relative_to(ROOT))]))
        return
    if not args.table_only:
        print(f"running {shown([*command(), '--output-dir', str(SWEEP.relative_to(ROOT))])}", flush=True)
        run_d2prune("full-protocol", command(), SWEEP)
    rows, dense = finished_rows()
    for r in rows:
        print(f"{r['name']}: ppl {r['ppl']:.2f}  sparsity {r['achieved']:.4f}  prune {r['prune_s'] or 0:.0f}s")
    write_table(rows, dense)


if __name__ == "__main__":
    main()
