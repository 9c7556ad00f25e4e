"""``prune``: the public entry point. It orchestrates a run at the model level: the method's
resolution and model-level preparation (e.g. Pruner-Zero's gradient pass), the layer-wise sparsity
allocation (uniform, explicit per layer, or OWL), and then the engine's walk over the decoder layers.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from d2prune.allocation.owl import outlier_ratios, owl_sparsities
from d2prune.config import PruneConfig
from d2prune.engine.activations import Activations
from d2prune.engine.architecture import find_decoder_stack, find_linears, in_features
from d2prune.engine.capture import batch_rows, calibration_batches, input_key
from d2prune.engine.executor import current_executor
from d2prune.engine.precision import resolve_compute_dtype
from d2prune.engine.walk import LayerStore, prune_layers
from d2prune.patterns import SparsityTarget
from d2prune.report import PruneReport


@torch.no_grad()
def prune(
    model: nn.Module, calibration: Any, config: PruneConfig | None = None, *, store: LayerStore | None = None
) -> PruneReport:
    """Prune ``model`` in place, layer by layer, with ``calibration`` token ids or images; returns a report.

    ``calibration``: a LongTensor (windows, tokens), or an iterable of such batches or of dicts with
    ``input_ids`` (and optionally ``attention_mask``); for an image classifier (ViT, DeiT: its encoder
    blocks are pruned, the classifier head stays dense) a float tensor (images, channels, height, width),
    or batches of those or dicts with ``pixel_values`` (and ``labels``, which Pruner-Zero's gradients need). ``store``: where the layers live (default: in
    ``model``); see ``d2prune.streaming.prune_checkpoint`` for models streamed from disk, whose store
    can also continue an interrupted run (``LayerStore.restore``).

    Under ``torchrun`` (a process group of several ranks) this is a collective call: every rank
    passes the same model, calibration and config, runs its share of the windows, and ends with the
    same pruned weights (see ``d2prune.engine.distributed``).
    """
    config = config or PruneConfig()
    store = store or LayerStore()
    executor = current_executor()  # [distributed] one process unless a process group is running
    t_start = time.perf_counter()
    device = torch.device(config.device)
    compute = resolve_compute_dtype(config.compute_dtype, device)
    stack = find_decoder_stack(model)
    num_layers = len(stack.layers)
    names = list(find_linears(stack.layers[0]))
    model_info = {
        "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
        "linear_names": names,
    }
    method = config.method.resolve(model_info)
    method.validate(names, stack.layer_class)
    for name, lin in find_linears(stack.layers[0]).items():
        config.pattern.check_width(in_features(lin), f"{stack.layer_class}.{name}")

    was_training = model.training
    model.eval()
    try:
        batches = calibration_batches(calibration, config.batch_size)
        # [distributed] this rank's calibration batches (``report.nsamples`` stays the global count)
        local = executor.shard(batches)
        method = method.prepare(model, batches, device, config.progress, compute.dtype)
        report = PruneReport(config={**config.to_dict(), "method": method.to_dict()})
        report.compute_dtype = compute.to_dict(_model_dtype(model))
        timings = {"capture": 0.0, "statistics": 0.0, "prune": 0.0, "pruned_forward": 0.0}
        start = store.restore(report)
        # A continued run's timings add to those of the run it continues.
        timings.update(report.timings)
        earlier_total = timings.pop("total", 0.0)
        targets = _layer_targets(model, batches, config, device, store, report, timings, num_layers, compute.dtype)
        report.layer_sparsities = [t.sparsity for t in targets]
        report.nsamples = sum(batch_rows(b) for b in batches)
        images = input_key(batches[0]) == "pixel_values"
        if images:
            report.image_size = list(batches[0]["pixel_values"].shape[1:])
        else:
            report.seqlen = batches[0]["input_ids"].shape[1]

        def on_layer_done(index: int, activations: Activations) -> None:
            report.timings = timings
            store.layer_done(index, report, activations)

        prune_layers(
            model,
            local,
            method,
            targets,
            config,
            report,
            timings,
            store=store,
            executor=executor,
            start=start,
            on_layer_done=on_layer_done,
        )
        if images and report.activations and report.activations.get("shape"):
            report.seqlen = report.activations["shape"][1]  # tokens per image (patches and class tokens)
    finally:
        if was_training:
            model.train()
    timings["total"] = earlier_total + time.perf_counter() - t_start
    report.timings = timings
    return report


def _layer_targets(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    config: PruneConfig,
    device: torch.device,
    store: LayerStore,
    report: PruneReport,
    timings: dict[str, float],
    num_layers: int,
    dtype: torch.dtype | None = None,
) -> list[SparsityTarget]:
    """Each decoder layer's target: the sparsities of a continued run when the store restored them
    (no second OWL pass), OWL's allocation, or the config's (uniform or explicit per layer)."""
    targets = [config.target(i, num_layers) for i in range(num_layers)]  # also checks explicit ones' count
    if report.layer_sparsities:
        return [SparsityTarget(p, config.pattern) for p in report.layer_sparsities]
    if config.sparsity_profile == "owl":
        t0 = time.perf_counter()
        report.outlier_ratios = outlier_ratios(model, batches, config.owl_m, device, config.progress, store, dtype)
        layer_sparsities = owl_sparsities(report.outlier_ratios, config.sparsity, config.owl_lambda)
        timings["owl"] = time.perf_counter() - t0
        return [SparsityTarget(p, config.pattern) for p in layer_sparsities]
    return targets


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter that is not on the meta device."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.is_meta), None)
