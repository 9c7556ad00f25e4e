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
``set_attn_implementation("eager")`` for the run and switched back afterwards. The table, the plot and the end-to-end run are in
:mod:`d2prune.evaluation.attention`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
        raise UserError(
            f"windows must be an integer tensor of shape (n, T), got {getattr(windows, 'shape', windows)!r}"
        )
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
        with (
            eager_attention(dense_model, pruned_model),
            torch.inference_mode(),
            tqdm(total=n, desc="attention", unit="win", disable=not progress) as bar,
        ):
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
