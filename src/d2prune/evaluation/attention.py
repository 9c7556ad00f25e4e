"""Attention diagnostics, end to end: the text table, the per-layer plot, and :func:`run_attention`
(load both models, draw windows, compute, write JSON + PNG).

The metrics themselves (what is measured, and how) are in :mod:`d2prune.evaluation.attention_metrics`;
its public names are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from d2prune.engine.precision import computing_in, resolve_compute_dtype
from d2prune.errors import UserError
from d2prune.evaluation.attention_metrics import (
    EPS,
    METRICS,
    attention_diagnostics,
    eager_attention,
    find_attention_module,
)

__all__ = [
    "EPS",
    "METRICS",
    "attention_diagnostics",
    "eager_attention",
    "find_attention_module",
    "format_attention_table",
    "plot_attention_diagnostics",
    "run_attention",
]


def format_attention_table(result: Mapping[str, Any]) -> str:
    """A fixed-width text table of the per-layer metrics and their mean (for the CLI)."""
    from d2prune.io.record import format_table

    rows = [dict(row) for row in result["layers"]]
    rows.append({"layer": "mean", **result["mean"]})
    return format_table(rows, ["layer", *METRICS])


# --------------------------------------------------------------------------------------------------
# Plot


def _as_results(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    if not isinstance(result, Mapping):
        raise UserError(f"expected an attention result or a mapping label -> result, got {type(result).__name__}")
    if "layers" in result:
        return {"pruned": result}
    if not result:
        raise UserError("no attention results to plot")
    for label, res in result.items():
        if not isinstance(res, Mapping) or "layers" not in res:
            raise UserError(f"attention result {label!r} has no 'layers'")
    return dict(result)


def plot_attention_diagnostics(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write a PNG with per-layer panels: RMSE, KL, entropy dense vs pruned, top-k mass dense vs pruned.

    ``result`` is one :func:`attention_diagnostics` result, or a mapping ``label -> result`` to overlay
    several methods (e.g. ``{"d2prune": r1, "sparsegpt": r2}``). Dense curves are dashed, pruned solid,
    one color per label; when all results share the same dense curves these are drawn once, in
    black. Uses matplotlib's Agg canvas directly (no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    results = _as_results(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(11, 8), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    (ax_rmse, ax_kl), (ax_ent, ax_top) = axes
    colors = [f"C{i % 10}" for i in range(len(results))]
    top_ks = {res.get("top_k") for res in results.values()}

    def series(res: Mapping[str, Any], key: str) -> list:
        return [row[key] for row in res["layers"]]

    # Results measured against the same dense model share their dense curves: draw those once.
    dense_keys = ("entropy_dense", "topk_mass_dense")
    first_res = next(iter(results.values()))
    shared_dense = all(series(res, key) == series(first_res, key) for res in results.values() for key in dense_keys)
    if shared_dense:
        x = series(first_res, "layer")
        ax_ent.plot(x, series(first_res, "entropy_dense"), "s--", color="black", alpha=0.7, label="dense")
        ax_top.plot(x, series(first_res, "topk_mass_dense"), "s--", color="black", alpha=0.7, label="dense")
    for color, (label, res) in zip(colors, results.items()):
        x = series(res, "layer")
        ax_rmse.plot(x, series(res, "rmse"), "o-", color=color, label=label)
        ax_kl.plot(x, series(res, "kl"), "o-", color=color, label=label)
        if not shared_dense:
            ax_ent.plot(x, series(res, "entropy_dense"), "--", color=color, alpha=0.7, label=f"{label}: dense")
            ax_top.plot(x, series(res, "topk_mass_dense"), "--", color=color, alpha=0.7, label=f"{label}: dense")
        ax_ent.plot(x, series(res, "entropy_pruned"), "o-", color=color, label=f"{label}: pruned")
        ax_top.plot(x, series(res, "topk_mass_pruned"), "o-", color=color, label=f"{label}: pruned")
    k_text = ", ".join(str(k) for k in sorted(top_ks, key=str))
    for ax, title, ylabel in (
        (ax_rmse, "attention-block output RMSE (dense vs pruned)", "RMSE"),
        (ax_kl, "KL(dense ‖ pruned) of attention probabilities", "KL (nats)"),
        (ax_ent, "attention entropy", "entropy (nats)"),
        (ax_top, f"attention mass on the top-{k_text} keys", "mass"),
    ):
        ax.set_title(title)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
    first = next(iter(results.values()))
    fig.suptitle(f"attention diagnostics ({first.get('n_windows')} windows × {first.get('seqlen')} tokens)")
    fig.savefig(path, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------------------------------
# End to end


def _vocab_size(tokenizer) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(tokenizer.vocab_size)


def run_attention(
    dense: str,
    pruned: str,
    out_dir: str | Path,
    data_source: str = "c4",
    nwindows: int = 8,
    seqlen: int = 512,
    seed: int = 1234,
    top_k: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    data_dir: str | Path | None = None,
    progress: bool = True,
    *,
    compute_dtype: str = "model",
    batch_size: int = 1,
    cache_dir: str | Path | bool | None = None,
    window_bos: str = "never",
) -> dict[str, Any]:
    """Load ``dense`` and ``pruned`` (paths / ids for :func:`d2prune.io.models.load_model`), compare their
    attention on ``nwindows`` windows of ``seqlen`` tokens, write ``out_dir/attention.json`` and
    ``out_dir/attention.png``; return the :func:`attention_diagnostics` result.

    The windows are drawn like calibration windows (``d2prune.data.get_calibration``) but with
    ``seed`` (default 1234) instead of the calibration default 0, so they are other text than a
    default calibration draw — held-out windows. They come from the same pool of documents, so an
    overlap with calibration text is unlikely but not excluded. Both models must share the tokenizer
    (same vocabulary size), since the same token ids are fed to both. ``window_bos`` ("never", "always"
    or "auto", resolved for the dense model and its tokenizer): BOS as each window's first token.
    """
    from d2prune.data import get_calibration, resolve_window_bos, source_info
    from d2prune.engine.finite import check_model_weights
    from d2prune.finetune import adapters as _adapters  # noqa: F401 - load_model then opens adapter folders
    from d2prune.io.atomic import write_json_atomic
    from d2prune.io.models import load_model, load_sparsity_record, model_seqlen
    from d2prune.io.record import command_line, package_versions

    started = time.time()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # found before the models are loaded, not after
        raise UserError(f"output path {out_dir} exists and is not a folder")
    dense_model, dense_tok = load_model(dense, dtype=dtype, device=device)
    pruned_model, pruned_tok = load_model(pruned, dtype=dtype, device=device)
    for model in (dense_model, pruned_model):
        check_model_weights(model)
    v_dense, v_pruned = _vocab_size(dense_tok), _vocab_size(pruned_tok)
    if v_dense != v_pruned:
        raise UserError(
            f"the dense and pruned models do not share a tokenizer: vocabulary sizes {v_dense} ({dense}) "
            f"and {v_pruned} ({pruned})"
        )
    e_dense = dense_model.get_input_embeddings().num_embeddings
    e_pruned = pruned_model.get_input_embeddings().num_embeddings
    if e_dense != e_pruned:
        raise UserError(
            f"the dense and pruned models have different embedding sizes ({e_dense} vs {e_pruned}); "
            "they must be the same model before and after pruning"
        )
    context = min(model_seqlen(dense_model), model_seqlen(pruned_model))
    if isinstance(seqlen, int) and not isinstance(seqlen, bool) and seqlen > context:
        raise UserError(f"seqlen {seqlen} is longer than the models' context length {context}")

    data_dir_path = Path(data_dir).expanduser() if data_dir is not None else None
    bos = resolve_window_bos(window_bos, dense_model, dense_tok)
    windows = get_calibration(
        dense_tok, data_source, nwindows, seqlen, seed, data_dir_path, cache_dir=cache_dir, window_bos=bos
    )
    compute = resolve_compute_dtype(compute_dtype, device)
    with computing_in([dense_model, pruned_model], compute.dtype):
        result = attention_diagnostics(
            dense_model, pruned_model, windows, top_k=top_k, batch_size=batch_size, progress=progress
        )

    json_path = out_dir / "attention.json"
    png_path = out_dir / "attention.png"
    record = {
        "kind": "attention",
        "command": command_line(),
        "config": {
            "dense": str(dense),
            "pruned": str(pruned),
            "data_source": str(data_source),
            "nwindows": nwindows,
            "seqlen": seqlen,
            "seed": seed,
            "top_k": top_k,
            "batch_size": batch_size,
            "dtype": dtype,
            "window_bos": bos.to_dict(),
            "compute_dtype": compute.to_dict(next(dense_model.parameters()).dtype),
            "device": str(device),
            "data_dir": str(data_dir) if data_dir is not None else None,
        },
        "inputs": {
            "data": source_info(str(data_source), data_dir_path, purpose="calibration"),
            "windows": f"held-out: drawn like calibration windows but with seed {seed} (calibration default 0)",
            "pruned_sparsity": load_sparsity_record(pruned) if Path(str(pruned)).expanduser().is_dir() else None,
        },
        "versions": package_versions(),
        "elapsed_s": None,
        "result": result,
        "files": {"json": str(json_path), "png": str(png_path)},
    }
    plot_attention_diagnostics({"pruned": result}, png_path)
    record["elapsed_s"] = round(time.time() - started, 3)
    write_json_atomic(json_path, record)
    return result
