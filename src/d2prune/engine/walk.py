"""The walk over the decoder layers of any decoder-only causal LM (docs/methods.md#pipeline).

For each decoder layer from ``start`` on: run the dense layer over all calibration windows with hooks
on its linears (statistics), prune every linear, run the pruned layer again to make the next layer's
inputs (``engine.layer``). Only the current layer and the activations need to be on the compute
device; a ``LayerStore`` says where the layers live between their turns. What happens before the
walk (the method's model-level preparation, the layer-wise sparsities, resuming) is the caller's:
``d2prune.api.prune``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from d2prune.config import PruneConfig
from d2prune.engine import distributed
from d2prune.engine.activations import Activations
from d2prune.engine.architecture import DecoderStack, find_decoder_stack
from d2prune.engine.capture import batch_rows, capture_inputs_and_arguments
from d2prune.engine.executor import Executor
from d2prune.engine.finite import DAMAGED, check_activations, check_layer_weights, half_precision_hint
from d2prune.engine.layer import prune_layer, run_layer
from d2prune.engine.precision import as_dtype
from d2prune.methods.base import MethodConfig
from d2prune.patterns import SparsityTarget
from d2prune.report import PruneReport


class LayerStore:
    """Where the decoder layers' weights live between their turns; this default keeps them in the
    model and moves each to the compute device for its turn. ``streaming.StreamedStore`` instead loads
    each layer from the checkpoint, writes it out pruned and frees it, and can resume a run."""

    def __init__(self) -> None:
        self._homes: dict[int, torch.device] = {}

    def restore(self, report: PruneReport) -> int:
        """The first layer still to prune: 0, or more when the store continues an interrupted run, whose
        entries (linears, layer sparsities, timings) it then puts into ``report``. Called by the caller of
        the walk (``d2prune.api.prune``), which passes the result as the walk's ``start``."""
        return 0

    def activations(self, config: PruneConfig, device: torch.device) -> Activations:
        """Empty activation buffers, or a resumed run's (already holding the inputs of its next layer)."""
        return Activations(
            config.activation_offload,
            device,
            config.activation_dir,
            config.offload_threshold,
            rank=distributed.current().file_rank,
        )

    @contextmanager
    def outside_stack(self, device: torch.device) -> Iterator[None]:
        """Make the weights outside the decoder stack that the forward up to layer 0 needs available."""
        yield

    def fetch(self, index: int, layer: nn.Module, device: torch.device, pruned: bool = False) -> None:
        """Put layer ``index`` on ``device``; ``pruned``: as written after pruning (re-runs on resume)."""
        self._homes[index] = next(layer.parameters()).device
        layer.to(device)

    def release(self, index: int, layer: nn.Module, save: bool) -> None:
        """Done with layer ``index``; ``save``: it was just pruned and must be kept."""
        layer.to(self._homes.pop(index))

    def layer_done(self, index: int, report: PruneReport, activations: Activations) -> None:
        """Layer ``index`` is pruned and its outputs are the current activations (the caller of the
        walk calls this from its ``on_layer_done``)."""

    def close(self, activations: Activations, completed: bool) -> None:
        activations.close(delete=True)


def layers_in_turn(
    stack: DecoderStack,
    store: LayerStore,
    acts: Activations,
    indices: Iterable[int],
    device: torch.device,
    *,
    pruned: bool = False,
    progress: bool = False,
    desc: str = "layers",
    sync: Callable[[str], AbstractContextManager] | None = None,
) -> Iterator[tuple[int, nn.Module]]:
    """Decoder layers ``indices`` in turn, each on ``device`` while the caller has it; the caller
    runs it from ``acts.inps`` into ``acts.outs``, after which it is released unchanged and the
    buffers swap. ``pruned`` as for ``LayerStore.fetch``; ``sync`` wraps the fetch (see ``Executor.sync``)."""
    indices = list(indices)
    for index in tqdm(indices, desc=desc, disable=not progress or not indices):
        layer = stack.layers[index]
        with sync(f"loading layer {index}") if sync is not None else nullcontext():
            store.fetch(index, layer, device, pruned=pruned)
        yield index, layer
        store.release(index, layer, save=False)
        acts.swap()


def forward_layers(
    stack: DecoderStack,
    store: LayerStore,
    acts: Activations,
    layer_extras: list,
    sizes: list[int],
    indices: Iterable[int],
    device: torch.device,
    pruned: bool,
    progress: bool = False,
    desc: str = "layers",
    dtype: torch.dtype | None = None,
) -> None:
    """Run decoder layers ``indices`` in turn over the activations (no pruning), in ``dtype`` (None:
    the layers' own): each layer's outputs become the next one's inputs."""
    for index, layer in layers_in_turn(
        stack, store, acts, indices, device, pruned=pruned, progress=progress, desc=desc
    ):
        run_layer(layer, acts.inps, layer_extras[index], sizes, acts.outs, dtype=dtype)


@torch.no_grad()
def prune_layers(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    method: MethodConfig,
    targets: list[SparsityTarget],
    config: PruneConfig,
    report: PruneReport,
    timings: dict[str, float],
    *,
    store: LayerStore,
    executor: Executor,
    start: int = 0,
    on_layer_done: Callable[[int, Activations], None] | None = None,
) -> None:
    """Prune decoder layers ``start``, ``start + 1``, ... of ``model`` in place, each to ``targets[i]``.

    ``batches``: this process's calibration batches (``executor.shard``). ``report`` gets each pruned
    linear's entry and the activations' description; ``timings`` (with the keys capture, statistics,
    prune and pruned_forward) the seconds spent. With ``start > 0`` the inputs of layer ``start`` are
    the store's kept activations when it has them (``store.activations``), else layers before
    ``start``, as already pruned, are re-run from the layer-0 inputs (deterministic, so the result is
    that of a walk from layer 0). ``on_layer_done(i, activations)``: layer i is pruned and saved, its
    outputs are the current activations.
    """
    stack = find_decoder_stack(model)
    layers, num_layers = stack.layers, len(stack.layers)
    device = torch.device(config.device)
    dtype = as_dtype(config.compute_dtype, device)
    sizes = [batch_rows(b) for b in batches]
    acts = store.activations(config, device)
    completed = False
    try:
        if start < num_layers:
            kept = acts.allocated
            first = start if kept else 0
            t0 = time.perf_counter()
            with executor.sync("capturing the layer-0 inputs"), store.outside_stack(device):
                _, layer_extras = capture_inputs_and_arguments(model, stack, batches, device, acts, kept, dtype)
            if not kept:
                check_activations(
                    acts.inps, "the inputs of decoder layer 0", f"(the weights before the decoder stack: {DAMAGED})"
                )
            timings["capture"] += time.perf_counter() - t0
            report.activations = acts.describe()
            t0 = time.perf_counter()
            forward_layers(
                stack,
                store,
                acts,
                layer_extras,
                sizes,
                range(first, start),
                device,
                pruned=True,
                progress=config.progress,
                desc="re-running pruned layers",
                dtype=dtype,
            )
            if start > first:
                timings["resume_forward"] = timings.get("resume_forward", 0.0) + time.perf_counter() - t0
            for index in tqdm(range(start, num_layers), desc="pruning layers", disable=not config.progress):
                layer = layers[index]
                with executor.sync(f"loading layer {index}"):
                    store.fetch(index, layer, device)
                    # Streamed layers are checked as they come from the checkpoint, in-memory ones here.
                    check_layer_weights(layer, f"{stack.path}.{index}")
                prune_layer(
                    layer,
                    index,
                    stack,
                    method,
                    targets[index],
                    config,
                    acts,
                    layer_extras[index],
                    sizes,
                    report,
                    timings,
                    executor,
                    dtype,
                )
                with executor.sync(f"checking the outputs of layer {index}"):
                    weights = next(layer.parameters()).dtype
                    check_activations(
                        acts.outs,
                        f"the outputs of decoder layer {index}",
                        f"after pruning: {half_precision_hint(dtype, weights)}",
                    )
                with executor.sync(f"saving layer {index}"):
                    store.release(index, layer, save=True)
                    acts.swap()
                    if on_layer_done is not None:
                        on_layer_done(index, acts)
        completed = True
    finally:
        store.close(acts, completed)
