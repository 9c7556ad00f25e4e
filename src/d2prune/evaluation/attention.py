"""Attention diagnostics: how far a pruned model's attention blocks drift from the dense model's.

D²Prune claims its attention-aware update lowers the RMSE between the dense and the pruned
attention-block outputs (61.2 % on average in the paper). :func:`attention_diagnostics` measures,
per decoder layer, on the same token windows fed to both models:

* ``rmse``: root mean square of (dense − pruned) attention-block output, over windows, positions and
  hidden features. The attention-block output is the output of the layer's self-attention sub-module
  (after its output projection), i.e. what the layer adds to the residual stream.
  ``relative_rmse`` = ``rmse`` / RMS of the dense output.
* ``kl``: KL(dense ‖ pruned) of the attention probabilities of each (window, head, query position),
  averaged. Keys that are masked (future tokens) have probability 0 in both and contribute 0.
* ``entropy_dense`` / ``entropy_pruned`` (nats) and ``entropy_change`` = pruned − dense.
* ``topk_mass_dense`` / ``topk_mass_pruned``: per query the sum of its ``top_k`` largest probabilities
  (the "long tail" is 1 − this).

Probabilities need the eager attention path: both models are switched to
``set_attn_implementation("eager")`` for the run and switched back afterwards.
:func:`run_attention` is the end-to-end entry (load, draw windows, compute, write JSON + PNG).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from d2prune.engine.architecture import find_decoder_stack, find_linears, is_attention_class, owns_qkv
from d2prune.errors import UserError

METRICS = (
    "rmse",
    "relative_rmse",
    "kl",
    "entropy_dense",
    "entropy_pruned",
    "entropy_change",
    "topk_mass_dense",
    "topk_mass_pruned",
)

# Probabilities are clamped to this before a log; a zero dense probability contributes exactly 0.
EPS = 1e-12

# --------------------------------------------------------------------------------------------------
# Finding the attention sub-module


def find_attention_module(layer: nn.Module) -> tuple[str, nn.Module]:
    """``(relative name, module)`` of the self-attention sub-module of one decoder layer.

    Looked for, in order: a direct child whose class name contains "Attention" and that holds linears
    (one named ``*self*`` first when there are several, e.g. self- and cross-attention); any deeper
    module of such a class (outermost first); the module that owns the q/k/v projections
    (``q_proj/k_proj/v_proj``, ``qkv_proj``, ``query_key_value``, ``c_attn``, ``Wqkv``, ...).
    """
    direct = [(n, m) for n, m in layer.named_children() if is_attention_class(m) and find_linears(m)]
    if direct:
        selfish = [(n, m) for n, m in direct if "self" in n.lower()]
        return (selfish or direct)[0]
    for name, module in layer.named_modules():
        if name and is_attention_class(module) and find_linears(module):
            return name, module
    for name, module in layer.named_modules():
        if owns_qkv(module):
            if not name:  # the layer itself owns q/k/v: no separate attention output to hook
                break
            return name, module
    raise UserError(
        f"cannot find the self-attention sub-module of decoder layer class {type(layer).__name__}: no child "
        "module whose class name contains 'Attention' and no module owning q/k/v projections"
    )


# --------------------------------------------------------------------------------------------------
# Eager attention switch


def _attn_impl(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


@contextmanager
def eager_attention(*models: nn.Module) -> Iterator[None]:
    """Run ``models`` with eager attention (probabilities available), restoring the previous setting.

    transformers 5.x: ``model.config._attn_implementation`` is the current implementation and
    ``model.set_attn_implementation(name)`` switches the model and its sub-models. A model passed twice
    (the same object) is switched once.
    """
    unique: list[nn.Module] = []
    for m in models:
        if all(m is not u for u in unique):
            unique.append(m)
    previous: list[tuple[nn.Module, Any]] = []
    try:
        for m in unique:
            prev = _attn_impl(m)
            previous.append((m, prev))
            if prev == "eager":
                continue
            setter = getattr(m, "set_attn_implementation", None)
            if callable(setter):
                setter("eager")
            elif getattr(m, "config", None) is not None:
                m.config._attn_implementation = "eager"
        yield
    finally:
        for m, prev in reversed(previous):
            if _attn_impl(m) == prev:
                continue
            setter = getattr(m, "set_attn_implementation", None)
            if callable(setter) and prev is not None:
                setter(prev)
            else:
                m.config._attn_implementation = prev


# --------------------------------------------------------------------------------------------------
# Diagnostics


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stack = find_decoder_stack(model)
    return [(f"{stack.path}.{i}.{name}", mod) for i, (name, mod) in enumerate(map(find_attention_module, stack.layers))]


def _capture(model: nn.Module, modules: list[tuple[str, nn.Module]], batch: torch.Tensor):
    """One forward pass: per layer the attention-block output and the attention probabilities."""
    n = len(modules)
    outs: list[torch.Tensor | None] = [None] * n
    probs: list[torch.Tensor | None] = [None] * n

    def hook(i: int):
        def fn(_module, _args, output):
            first = output[0] if isinstance(output, (tuple, list)) else output
            outs[i] = first.detach()
            if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                probs[i] = output[1].detach()

        return fn

    handles = [mod.register_forward_hook(hook(i)) for i, (_, mod) in enumerate(modules)]
    try:
        result = model(input_ids=batch, use_cache=False, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    if any(p is None for p in probs):
        recorded = getattr(result, "attentions", None)
        if recorded is not None and len(recorded) == n and all(isinstance(a, torch.Tensor) for a in recorded):
            probs = [a.detach() for a in recorded]
        else:
            raise UserError(
                f"{type(model).__name__} returned no attention probabilities with eager attention and "
                "output_attentions=True; attention diagnostics need them"
            )
    if any(o is None for o in outs):
        raise UserError(f"the attention sub-modules of {type(model).__name__} were not called in the forward pass")
    return outs, probs


class _LayerSums:
    """Running float64 sums for one layer across batches."""

    def __init__(self) -> None:
        self.sq_diff = 0.0
        self.sq_dense = 0.0
        self.n_elems = 0
        self.kl = 0.0
        self.ent_dense = 0.0
        self.ent_pruned = 0.0
        self.topk_dense = 0.0
        self.topk_pruned = 0.0
        self.n_rows = 0

    def add_outputs(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        d = dense.double()
        p = pruned.to(dense.device).double()
        self.sq_diff += float(((d - p) ** 2).sum())
        self.sq_dense += float((d**2).sum())
        self.n_elems += d.numel()

    def add_probs(self, dense: torch.Tensor, pruned: torch.Tensor, top_k: int) -> None:
        p = dense.double()
        q = pruned.to(dense.device).double()
        logp = p.clamp_min(EPS).log()
        logq = q.clamp_min(EPS).log()
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        # Per (…, head, query) row; rows with probability 0 on a key (masked) get 0 from that key.
        kl_rows = torch.where(p > 0, p * (logp - logq), zero).sum(-1).clamp_min(0.0)
        ent_p = -torch.where(p > 0, p * logp, zero).sum(-1)
        ent_q = -torch.where(q > 0, q * logq, zero).sum(-1)
        k = min(top_k, p.shape[-1])
        self.kl += float(kl_rows.sum())
        self.ent_dense += float(ent_p.sum())
        self.ent_pruned += float(ent_q.sum())
        self.topk_dense += float(p.topk(k, dim=-1).values.sum(-1).sum())
        self.topk_pruned += float(q.topk(k, dim=-1).values.sum(-1).sum())
        self.n_rows += kl_rows.numel()

    def result(self, index: int) -> dict[str, Any]:
        rmse = math.sqrt(self.sq_diff / self.n_elems)
        rms_dense = math.sqrt(self.sq_dense / self.n_elems)
        relative = rmse / rms_dense if rms_dense > 0 else (0.0 if rmse == 0 else None)
        ent_d = self.ent_dense / self.n_rows
        ent_q = self.ent_pruned / self.n_rows
        return {
            "layer": index,
            "rmse": rmse,
            "relative_rmse": relative,
            "kl": self.kl / self.n_rows,
            "entropy_dense": ent_d,
            "entropy_pruned": ent_q,
            "entropy_change": ent_q - ent_d,
            "topk_mass_dense": self.topk_dense / self.n_rows,
            "topk_mass_pruned": self.topk_pruned / self.n_rows,
        }


def _mean_over_layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {}
    for key in METRICS:
        values = [row[key] for row in layers if row[key] is not None]
        mean[key] = math.fsum(values) / len(values) if values else None
    return mean


def attention_diagnostics(
    dense_model: nn.Module,
    pruned_model: nn.Module,
    windows: torch.LongTensor,
    top_k: int = 8,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-layer attention drift between ``dense_model`` and ``pruned_model`` on ``windows`` (n, T).

    Returns ``{"layers": [{"layer", "rmse", "relative_rmse", "kl", "entropy_dense", "entropy_pruned",
    "entropy_change", "topk_mass_dense", "topk_mass_pruned"}, ...], "mean": {metric: mean over layers},
    "n_windows", "seqlen", "top_k"}`` (see the module docstring for the definitions).

    ``device`` None sends each batch to the device of each model's first parameter; otherwise batches
    go to ``device`` (the models must be there). Both models run in eval mode with eager attention;
    their training flag and attention implementation are restored afterwards. Only one batch's
    outputs and probabilities (of both models, all layers) are alive at a time: memory grows as
    2 · layers · batch_size · heads · T² floats, so keep ``batch_size`` small for long windows.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype.is_floating_point:
        raise UserError(f"windows must be an integer tensor of shape (n, T), got {getattr(windows, 'shape', windows)!r}")
    n, seqlen = (int(s) for s in windows.shape)
    if n < 1 or seqlen < 1:
        raise UserError(f"windows must hold at least one token window, got shape {tuple(windows.shape)}")
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")

    dense_mods = _attention_modules(dense_model)
    pruned_mods = _attention_modules(pruned_model)
    if len(dense_mods) != len(pruned_mods):
        raise UserError(
            f"the dense model has {len(dense_mods)} decoder layers and the pruned model {len(pruned_mods)}; "
            "they must be the same architecture"
        )
    dev_dense = torch.device(device) if device is not None else _model_device(dense_model)
    dev_pruned = torch.device(device) if device is not None else _model_device(pruned_model)

    sums = [_LayerSums() for _ in dense_mods]
    training = [(m, m.training) for m in (dense_model, pruned_model)]
    try:
        dense_model.eval()
        pruned_model.eval()
        with eager_attention(dense_model, pruned_model), torch.inference_mode(), tqdm(
            total=n, desc="attention", unit="win", disable=not progress
        ) as bar:
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size].long()
                d_outs, d_probs = _capture(dense_model, dense_mods, batch.to(dev_dense))
                p_outs, p_probs = _capture(pruned_model, pruned_mods, batch.to(dev_pruned))
                for i, s in enumerate(sums):
                    if d_outs[i].shape != p_outs[i].shape or d_probs[i].shape != p_probs[i].shape:
                        raise UserError(
                            f"layer {i}: dense and pruned attention shapes differ "
                            f"({tuple(d_outs[i].shape)}/{tuple(d_probs[i].shape)} vs "
                            f"{tuple(p_outs[i].shape)}/{tuple(p_probs[i].shape)}); they must be the same architecture"
                        )
                    s.add_outputs(d_outs[i], p_outs[i])
                    s.add_probs(d_probs[i], p_probs[i], top_k)
                    d_outs[i] = p_outs[i] = d_probs[i] = p_probs[i] = None  # free as we go
                bar.update(batch.shape[0])
    finally:
        for m, was in reversed(training):
            m.train(was)

    layers = [s.result(i) for i, s in enumerate(sums)]
    return {"layers": layers, "mean": _mean_over_layers(layers), "n_windows": n, "seqlen": seqlen, "top_k": top_k}


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
    shared_dense = all(
        series(res, key) == series(first_res, key) for res in results.values() for key in dense_keys
    )
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
    batch_size: int = 1,
    cache_dir: str | Path | bool | None = None,
) -> dict[str, Any]:
    """Load ``dense`` and ``pruned`` (paths / ids for :func:`d2prune.io.models.load_model`), compare their
    attention on ``nwindows`` windows of ``seqlen`` tokens, write ``out_dir/attention.json`` and
    ``out_dir/attention.png``; return the :func:`attention_diagnostics` result.

    The windows are drawn like calibration windows (``d2prune.data.get_calibration``) but with
    ``seed`` (default 1234) instead of the calibration default 0, so they are other text than a
    default calibration draw — held-out windows. They come from the same pool of documents, so an
    overlap with calibration text is unlikely but not excluded. Both models must share the tokenizer
    (same vocabulary size), since the same token ids are fed to both.
    """
    from d2prune.data import get_calibration, source_info
    from d2prune.io.models import load_model, load_sparsity_record, model_seqlen
    from d2prune.io.record import command_line, package_versions, write_json_atomic

    started = time.time()
    out_dir = Path(out_dir)
    dense_model, dense_tok = load_model(dense, dtype=dtype, device=device)
    pruned_model, pruned_tok = load_model(pruned, dtype=dtype, device=device)
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
    windows = get_calibration(dense_tok, data_source, nwindows, seqlen, seed, data_dir_path, cache_dir=cache_dir)
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
            "device": str(device),
            "data_dir": str(data_dir) if data_dir is not None else None,
        },
        "inputs": {
            "data": source_info(str(data_source), data_dir_path, purpose="calibration"),
            "windows": "held-out: drawn like calibration windows but with seed "
            f"{seed} (calibration default 0)",
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
