"""The report of ``d2prune sweep``: ``sweep.json`` (grid, cells, result rows), ``report.md`` (the table)
and ``ppl_vs_sparsity.png`` (the metric against the achieved sparsity, one line per method variant).

The metric is read from what the run records hold: perplexity (``perplexity.pruned.SET.ppl``, log
scale) or, for a record that has one, accuracy (``accuracy.pruned.SET.<top1|accuracy>``, linear).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2prune.io.atomic import atomic_path, write_json_atomic, write_text_atomic

OUTPUTS = ("sweep.json", "report.md", "ppl_vs_sparsity.png")
# (record section, value keys, plot in log scale): the first a record provides is its metric.
METRICS = (("perplexity", ("ppl",), True), ("accuracy", ("top1", "accuracy"), False))


def metric(record: dict, label: str) -> tuple[str, float] | None:
    """(metric name, value) of the ``label`` ("dense" or "pruned") model in a run record, if any."""
    for section, keys, _ in METRICS:
        sets = (record.get(section) or {}).get(label) or {}
        for set_name, values in sets.items():
            for key in keys:
                if isinstance(values, dict) and isinstance(values.get(key), (int, float)):
                    return f"{key} ({set_name})", float(values[key])
    return None


def result_row(name: str, variant: str, record: dict) -> dict[str, Any]:
    """One table row from a cell's run record."""
    config = record.get("config", {})
    pruned, dense = metric(record, "pruned"), metric(record, "dense")
    return {
        "cell": name,
        "variant": variant,
        "method": config.get("method", {}).get("name"),
        "pattern": config.get("pattern"),
        "target": config.get("sparsity"),
        "achieved": record.get("overall_sparsity"),
        "metric": pruned[0] if pruned else None,
        "dense": dense[1] if dense else None,
        "pruned": pruned[1] if pruned else None,
        "prune_s": record.get("timings", {}).get("prune"),
    }


def write(out: Path, grid: dict, cells: list, records: dict[str, dict | None]) -> str:
    """Write sweep.json, report.md and the plot for a finished grid; returns the report's table."""
    rows = [result_row(c.name, c.variant, records[c.name]) for c in cells if not c.skipped]
    summary = {
        "grid": grid,
        "cells": [
            {
                "name": c.name,
                "variant": c.variant,
                "command": "d2prune prune " + " ".join(c.argv),
                "argv": c.argv,
                **({"skipped": c.skipped} if c.skipped else {"run_record": f"cells/{c.folder}/run.json"}),
            }
            for c in cells
        ],
        "results": rows,
    }
    plotted = plot(rows, out / "ppl_vs_sparsity.png")
    table = markdown_table(rows)
    skipped = [f"- `{c.name}`: skipped ({c.skipped})" for c in cells if c.skipped]
    dense = next((r["dense"] for r in rows if r["dense"] is not None), None)
    text = "\n".join(
        [
            f"# d2prune sweep: {grid.get('model')}",
            "",
            f"Dense {rows[0]['metric'] if rows and rows[0]['metric'] else 'metric'}: "
            + (f"{dense:.2f}" if dense is not None else "not measured"),
            "",
            table,
            *(["", "Skipped cells:", *skipped] if skipped else []),
            *(["", "![metric vs sparsity](ppl_vs_sparsity.png)"] if plotted else []),
            "",
            "Each cell's run record: `cells/<cell>/run.json`; its command reruns it alone (`sweep.json`).",
            "",
        ]
    )
    write_text_atomic(out / "report.md", text)
    write_json_atomic(out / "sweep.json", summary)  # last: its presence marks a finished report
    return table


def markdown_table(rows: list[dict]) -> str:
    """method variant, pattern, target, achieved sparsity, dense/pruned metric, prune seconds."""
    name = rows[0]["metric"] if rows and rows[0]["metric"] else "metric"
    lines = [
        f"| cell | method | pattern | target | achieved | dense {name} | pruned {name} | prune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    num = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['method']} | {r['pattern']} | {num(r['target'], '.4g')} | "
            f"{num(r['achieved'], '.4f')} | {num(r['dense'], '.2f')} | {num(r['pruned'], '.2f')} | "
            f"{num(r['prune_s'], '.1f')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str | None = None) -> bool:
    """The pruned metric against the achieved sparsity, one line per variant over its unstructured
    cells, N:M cells as marked points, the dense value dashed; False (nothing written) without values."""
    rows = [r for r in rows if r["pruned"] is not None and r["achieved"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = next(log for section, keys, log in METRICS if rows[0]["metric"].split(" ")[0] in keys)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    # Beyond ten lines the default colours repeat: tab20's twenty, then the line style tells them apart.
    colors = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20").colors
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for i, variant in enumerate(variants):
        color, style = colors[i % len(colors)], ("o-", "o--", "o:")[i // len(colors) % 3]
        mine = [r for r in rows if r["variant"] == variant]
        line = sorted((r for r in mine if r["pattern"] == "unstructured"), key=lambda r: r["achieved"])
        if line:
            ax.plot([r["achieved"] for r in line], [r["pruned"] for r in line], style, color=color, label=variant)
        for k, r in enumerate(r for r in mine if r["pattern"] != "unstructured"):
            ax.plot(
                r["achieved"], r["pruned"], "s", color=color, mfc="none", ms=9, label=None if line or k else variant
            )
            ax.annotate(
                r["pattern"], (r["achieved"], r["pruned"]), textcoords="offset points", xytext=(5, 3), fontsize=7
            )
    dense = next((r["dense"] for r in rows if r["dense"] is not None), None)
    if dense is not None:
        ax.axhline(dense, color="grey", ls="--", lw=1, label="dense")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("achieved sparsity (N:M cells: open squares)")
    ax.set_ylabel(rows[0]["metric"])
    ax.set_title(title or f"{rows[0]['metric']} vs sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True
