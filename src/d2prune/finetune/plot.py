"""The training-loss plot of a fine-tuning run."""

from __future__ import annotations

import logging
from pathlib import Path

from d2prune.io.atomic import atomic_path

log = logging.getLogger(__name__)


def plot_loss(curve: list[dict[str, float]], path: str | Path, title: str = "LoRA fine-tuning") -> Path | None:
    """Training loss per optimizer step as a PNG (None, with a warning, when matplotlib is missing)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot (pip install 'd2prune[plot]')")
        return None
    path = Path(path)
    fig = Figure(figsize=(7, 4), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], "-", marker="o" if len(curve) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean CE per token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
