"""Layer-by-layer pruning of any decoder-only causal LM (spec §1.9 step 4).

For each decoder layer: run the dense layer over all calibration windows with hooks on its linears
(statistics), prune every linear, run the pruned layer again to make the next layer's inputs. Only
the current layer and the activations need to be on the compute device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from d2prune.engine import distributed
from d2prune.engine.activations import Activations
from d2prune.engine.architecture import DecoderStack, find_decoder_stack, find_linears
from d2prune.engine.channels import find_producers, permute_channels
from d2prune.config import PruneConfig
from d2prune.report import LinearReport, PruneReport
from d2prune.errors import UserError
from d2prune.methods import Gram, LinearPruner
from d2prune.methods.least_squares import refit_on_support
from d2prune.patterns import SparsityTarget, nm_violations

# Keyword arguments a decoder layer may get for a KV cache; layer-wise calibration runs without one.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _Stop(Exception):
    """Raised by the catcher once the first decoder layer's inputs are stored."""


class _Catcher(nn.Module):
    """Stands in for a decoder layer: stores its inputs, then stops the forward pass (or, with
    ``passthrough``, hands its input on unchanged so later layers' arguments can be recorded)."""

    def __init__(self, layer: nn.Module, passthrough: bool = False):
        super().__init__()
        self.layer = layer
        self.passthrough = passthrough
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.calls.append((hidden, rest, kwargs))
        if self.passthrough:
            return hidden
        raise _Stop

    def __getattr__(self, name: str) -> Any:
        # Models read attributes of their layers (e.g. ``attention_type``): answer as the layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b.to(a.device)))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b if type(a) is type(b) else False


def move_module_tensors(modules: Iterable[nn.Module], device: torch.device | None) -> dict:
    """Move every parameter and buffer of ``modules`` to ``device`` (``None``: only record them).

    Returns their previous devices so ``restore_outside_stack`` can put them back.
    """
    previous: dict[int, tuple[torch.Tensor, torch.device]] = {}
    for module in modules:
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                # Meta tensors belong to a streamed model that loads what it needs itself.
                if tensor is None or id(tensor) in previous or tensor.is_meta:
                    continue
                previous[id(tensor)] = (tensor, tensor.device)
                if device is not None:
                    tensor.data = tensor.data.to(device)
    return previous


def move_outside_stack(model: nn.Module, stack: DecoderStack, device: torch.device | None) -> dict:
    """Move every parameter and buffer outside the decoder stack to ``device`` (see ``move_module_tensors``)."""
    prefix = stack.path + "."
    outside = (m for path, m in model.named_modules() if path != stack.path and not path.startswith(prefix))
    return move_module_tensors(outside, device)


def restore_outside_stack(previous: dict) -> None:
    for tensor, device in previous.values():
        tensor.data = tensor.data.to(device)


def calibration_batches(calibration: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Normalize the calibration data to a list of model-input dicts with ``input_ids``."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise UserError(f"calibration token ids must be 2-D (windows, tokens), got shape {tuple(calibration.shape)}")
        calibration = [] if calibration.numel() == 0 else calibration.split(batch_size)
    batches = []
    for item in calibration if isinstance(calibration, Iterable) else [calibration]:
        if isinstance(item, torch.Tensor):
            item = {"input_ids": item if item.dim() == 2 else item.unsqueeze(0)}
        elif not (isinstance(item, dict) and "input_ids" in item):
            raise UserError("calibration batches must be token-id tensors or dicts with 'input_ids'")
        ids = item["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise UserError(f"calibration input_ids must be non-empty 2-D (windows, tokens) tensors, got {shape}")
        batches.append(dict(item))
    if not batches:
        raise UserError("no calibration data given")
    lengths = sorted({b["input_ids"].shape[1] for b in batches})
    if len(lengths) > 1:
        raise UserError(f"all calibration windows must have the same number of tokens, got lengths {lengths}")
    return batches


def _record_layer_calls(
    model: nn.Module,
    stack: DecoderStack,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    upto: int,
    on_batch: Callable[[int, list[tuple[torch.Tensor, tuple, dict]]], None],
) -> None:
    """Run every batch through the model with decoder layers 0..upto replaced by catchers; hands
    ``on_batch`` the batch index and each of those layers' (hidden states, positional args, keyword
    args). Layers before ``upto`` hand their input on unchanged; layer ``upto`` stops the forward pass."""
    catchers = [_Catcher(stack.layers[i], passthrough=i < upto) for i in range(upto + 1)]
    for i, catcher in enumerate(catchers):
        stack.layers[i] = catcher
    previous = move_outside_stack(model, stack, device)
    try:
        for b, batch in enumerate(batches):
            try:
                model(**to_device(batch, device), use_cache=False)
            except _Stop:
                pass
            else:
                raise RuntimeError(f"{type(model).__name__} finished a forward pass without calling decoder layer {upto}")
            on_batch(b, [catcher.calls.pop() for catcher in catchers])
    finally:
        for i, catcher in enumerate(catchers):
            stack.layers[i] = catcher.layer
        restore_outside_stack(previous)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    stack: DecoderStack,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    activations: Activations | None = None,
    keep_inputs: bool = False,
) -> tuple[torch.Tensor | None, list[tuple[tuple, dict]]]:
    """Run the model up to decoder layer 0 for every batch.

    Returns the hidden states (windows, tokens, hidden) in the model dtype, and per batch the other
    positional and keyword arguments the layer receives (masks, positions, rotary embeddings).
    With ``activations`` the hidden states are written into its input buffer (allocated here) batch
    by batch; with ``keep_inputs`` they are dropped (the buffer already holds a resumed run's inputs)
    and only the arguments are returned.
    """
    extras: list[tuple[tuple, dict]] = []
    hidden_list: list[torch.Tensor] = []
    total = sum(b["input_ids"].shape[0] for b in batches)
    start = 0

    def on_batch(_: int, calls: list) -> None:
        nonlocal start
        [(hidden, rest, kwargs)] = calls
        extras.append(_layer_extra(rest, kwargs, extras))
        if keep_inputs:
            return
        if activations is None:
            hidden_list.append(hidden)
            return
        if not activations.allocated:
            activations.allocate((total, *hidden.shape[1:]), hidden.dtype)
        # Written as it comes, so a disk buffer never needs all windows in memory at once.
        activations.inps[start : start + hidden.shape[0]] = hidden
        start += hidden.shape[0]

    _record_layer_calls(model, stack, batches, device, 0, on_batch)
    if keep_inputs:
        return None, extras
    return (activations.inps if activations is not None else torch.cat(hidden_list)), extras


def _layer_extra(rest: tuple, kwargs: dict, seen: list) -> tuple[tuple, dict]:
    """A layer call's arguments with the KV cache off; an equal earlier one is reused (stored once)."""
    for key in _CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    extra = (rest, kwargs)
    return next((old for old in seen[-4:] if _same(old, extra)), extra)


def _mixed_layer_types(model: nn.Module) -> bool:
    return len(set(getattr(model.config, "layer_types", None) or [])) > 1


@torch.no_grad()
def capture_inputs_and_arguments(
    model: nn.Module,
    stack: DecoderStack,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    activations: Activations | None = None,
    keep_inputs: bool = False,
) -> tuple[torch.Tensor | None, list[list[tuple[tuple, dict]]]]:
    """Layer-0 hidden states and, per decoder layer, per batch, the other arguments it receives.

    Most models give every layer the same arguments. Models that mix attention types across layers
    (``config.layer_types``: sliding-window and full attention) give each type its own mask, so for
    them every layer's arguments are recorded in a pass where each layer hands its input on unchanged.
    ``activations`` and ``keep_inputs`` are as for ``capture_layer_inputs``.
    """
    inps, extras = capture_layer_inputs(model, stack, batches, device, activations, keep_inputs)
    num_layers = len(stack.layers)
    if not _mixed_layer_types(model):
        return inps, [extras] * num_layers
    per_layer: list[list[tuple[tuple, dict]]] = [[] for _ in range(num_layers)]
    seen: list = []

    def on_batch(_: int, layer_calls: list) -> None:
        for i, (_, rest, kwargs) in enumerate(layer_calls):
            extra = _layer_extra(rest, kwargs, seen)
            if not any(extra is old for old in seen):
                seen.append(extra)
            per_layer[i].append(extra)

    _record_layer_calls(model, stack, batches, device, num_layers - 1, on_batch)
    return inps, per_layer


class _LayerStats:
    """Forward hooks feeding each linear's pruner, plus one Gram per distinct linear input."""

    def __init__(self, linears: dict[str, nn.Linear], pruners: dict[str, LinearPruner], gram_names: set[str]):
        self.pruners = pruners
        self.gram_names = gram_names
        self.grams: dict[str, Gram] = {}
        self._seen: dict[int, tuple[torch.Tensor, Gram]] = {}
        self._added: dict[int, torch.Tensor] = {}
        self.order: list[str] = []  # the linears in the order the forward ran them (see channels.py)
        self.handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            if name not in self.order:
                self.order.append(name)
            self.pruners[name].observe(x, output)
            if name not in self.gram_names:
                return
            gram = self.grams.get(name)
            if gram is None:
                # Linears that read the very same tensor (q/k/v, gate/up) share one Gram.
                seen = self._seen.get(id(x))
                gram = seen[1] if seen is not None and seen[0] is x else Gram(x.shape[-1], x.device)
                self.grams[name] = gram
            # Holding x keeps its id from being reused by another tensor within this batch.
            if self._added.get(id(gram)) is not x:
                gram.add(x)
                self._added[id(gram)] = x
            self._seen[id(x)] = (x, gram)

        return hook

    def end_batch(self) -> None:
        self._seen.clear()
        self._added.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _LastUseGram(Gram):
    """A Gram read for the last time: its Hessian is scaled in place and the float64 sum is freed as
    soon as the float32 Hessian is made, so the solve runs without the sum and without a second c×c
    float64 (a 6912-wide down_proj: 364 MiB each). Same values as ``Gram.hessian``. The sum is gone
    afterwards, loudly. Under torchrun the sum was already summed over the ranks."""

    def __init__(self, gram: Gram):
        self.sum: torch.Tensor | None = gram.sum
        self.nsamples = gram.nsamples
        self.cache = gram.cache

    def hessian(self) -> torch.Tensor:
        h, self.sum = self.sum, None
        assert h is not None, "a last-use Gram gives its Hessian once"
        return h.mul_(2.0 / max(self.nsamples, 1)).float()


def _relative_error(old: torch.Tensor, new: torch.Tensor, gram: Gram) -> float:
    """‖WX − ŴX‖² / ‖WX‖² over the calibration inputs, from the Gram: tr(ΔW S ΔWᵀ)/tr(W S Wᵀ)."""
    return _relative_errors(old, [new], gram)[0]


def _relative_errors(old: torch.Tensor, news: list[torch.Tensor], gram: Gram) -> list[float]:
    """``_relative_error`` of each of ``news``, with one float32 copy of the Gram."""
    total = gram.sum.float()
    den = ((old @ total) * old).sum()
    out = []
    for new in news:
        delta = old - new
        num = ((delta @ total) * delta).sum()
        out.append(float(num / den) if den > 0 else 0.0)
    return out


class LayerStore:
    """Where the decoder layers' weights live between their turns; this default keeps them in the
    model and moves each to the compute device for its turn. ``offload.StreamedStore`` instead loads
    each layer from the checkpoint, writes it out pruned and frees it, and can resume a run."""

    def __init__(self) -> None:
        self._homes: dict[int, torch.device] = {}

    def restore(self, report: PruneReport) -> int:
        """The first layer still to prune (0, or more when resuming; ``report`` then gets the earlier
        layers' entries)."""
        return 0

    def activations(self, config: PruneConfig, device: torch.device) -> Activations:
        """Empty activation buffers, or a resumed run's (already holding the inputs of its next layer)."""
        return Activations(config.activation_offload, device, config.activation_dir, config.offload_threshold,
                           rank=distributed.current().file_rank)

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
        """Called once layer ``index`` is pruned and its outputs are the current activations."""

    def close(self, activations: Activations, completed: bool) -> None:
        activations.close(delete=True)


@torch.no_grad()
def prune(
    model: nn.Module, calibration: Any, config: PruneConfig | None = None, *, store: LayerStore | None = None
) -> PruneReport:
    """Prune ``model`` in place, layer by layer, with ``calibration`` token ids; returns a report.

    ``calibration``: a LongTensor (windows, tokens), or an iterable of such batches or of dicts with
    ``input_ids`` (and optionally ``attention_mask``). ``store``: where the layers live (default: in
    ``model``); see ``offload.prune_checkpoint`` for models streamed from disk.

    Under ``torchrun`` (a process group of several ranks) this is a collective call: every rank
    passes the same model, calibration and config, runs its share of the windows, and ends with the
    same pruned weights (see ``d2prune.engine.distributed``).
    """
    config = config or PruneConfig()
    store = store or LayerStore()
    world = distributed.current()  # [distributed] one process unless a process group is running
    t_start = time.perf_counter()
    device = torch.device(config.device)
    model_info = {"max_position_embeddings": getattr(model.config, "max_position_embeddings", None)}
    method = config.method.resolve(model_info)
    stack = find_decoder_stack(model)
    layers = stack.layers
    num_layers = len(layers)

    names = list(find_linears(layers[0]))
    method.validate(names, stack.layer_class)
    for name, lin in find_linears(layers[0]).items():
        config.pattern.check_width(lin.in_features, f"{stack.layer_class}.{name}")

    was_training = model.training
    model.eval()
    batches = calibration_batches(calibration, config.batch_size)
    # [distributed] this rank's calibration batches (``report.nsamples`` stays the global count);
    # ``first_window`` is the global index of its first window
    local, lo = world.shard(batches)
    first_window = sum(b["input_ids"].shape[0] for b in batches[:lo])
    if method.needs_gradients:
        from d2prune.methods.gradients import attach_gradients

        method = attach_gradients(method, model, batches, device, config.progress)
    report = PruneReport(config={**config.to_dict(), "method": method.to_dict()})
    timings = {"capture": 0.0, "statistics": 0.0, "prune": 0.0, "pruned_forward": 0.0}
    start = store.restore(report)
    # A resumed run's timings add to those of the run it continues.
    timings.update(report.timings)
    earlier_total = timings.pop("total", 0.0)

    targets = [config.target(i, num_layers) for i in range(num_layers)]
    if report.layer_sparsities:  # restored by a resumed run: no second OWL pass
        targets = [SparsityTarget(p, config.pattern) for p in report.layer_sparsities]
    elif config.sparsity_profile == "owl":
        from d2prune.allocation.owl import outlier_ratios, owl_sparsities

        t0 = time.perf_counter()
        report.outlier_ratios = outlier_ratios(model, batches, config.owl_m, device, config.progress, store)
        layer_sparsities = owl_sparsities(report.outlier_ratios, config.sparsity, config.owl_lambda)
        targets = [SparsityTarget(p, config.pattern) for p in layer_sparsities]
        timings["owl"] = time.perf_counter() - t0
    report.layer_sparsities = [t.sparsity for t in targets]
    report.nsamples, report.seqlen = sum(b["input_ids"].shape[0] for b in batches), batches[0]["input_ids"].shape[1]
    sizes = [b["input_ids"].shape[0] for b in local]

    acts = store.activations(config, device)
    completed = False
    try:
        if start < num_layers:
            # A resumed run whose activation file was kept starts from it; without one it re-runs
            # the pruned layers before ``start`` (deterministic, so the result is the same).
            kept = acts.allocated
            first = start if kept else 0
            t0 = time.perf_counter()
            with world.sync("capturing the layer-0 inputs"), store.outside_stack(device):
                _, layer_extras = capture_inputs_and_arguments(model, stack, local, device, acts, kept)
            timings["capture"] += time.perf_counter() - t0
            report.activations = acts.describe()
            t0 = time.perf_counter()
            forward_layers(stack, store, acts, layer_extras, sizes, range(first, start), device, pruned=True,
                           progress=config.progress, desc="re-running pruned layers")
            if start > first:
                timings["resume_forward"] = timings.get("resume_forward", 0.0) + time.perf_counter() - t0
            for index in tqdm(range(start, num_layers), desc="pruning layers", disable=not config.progress):
                layer = layers[index]
                with world.sync(f"loading layer {index}"):
                    store.fetch(index, layer, device)
                _prune_layer(layer, index, stack, method, targets[index], config, acts, layer_extras[index], sizes,
                             report, timings, world, first_window)
                with world.sync(f"saving layer {index}"):
                    store.release(index, layer, save=True)
                    acts.swap()
                    report.timings = timings
                    store.layer_done(index, report, acts)
        completed = True
    finally:
        store.close(acts, completed)
        if was_training:
            model.train()
    timings["total"] = earlier_total + time.perf_counter() - t_start
    report.timings = timings
    return report


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
) -> None:
    """Run decoder layers ``indices`` in turn over the activations (no pruning): each layer's
    outputs become the next one's inputs."""
    indices = list(indices)
    for index in tqdm(indices, desc=desc, disable=not progress or not indices):
        layer = stack.layers[index]
        store.fetch(index, layer, device, pruned=pruned)
        run_layer(layer, acts.inps, layer_extras[index], sizes, acts.outs)
        store.release(index, layer, save=False)
        acts.swap()


def _prune_layer(
    layer: nn.Module,
    index: int,
    stack: DecoderStack,
    method: Any,
    target: SparsityTarget,
    config: PruneConfig,
    acts: Activations,
    extras: list,
    sizes: list[int],
    report: PruneReport,
    timings: dict[str, float],
    world: distributed.World,
    first_window: int,
) -> None:
    """Statistics pass, pruning of every linear, pruned forward (outputs into ``acts.outs``).

    ``world``: the ranks that share the calibration windows; ``first_window`` is the global index of
    this rank's first window.
    """
    linears = find_linears(layer)
    pruners = {
        name: method.make_pruner(name, lin.weight, f"{stack.path}.{index}.{name}") for name, lin in linears.items()
    }
    # Linears to refit read the Gram after their method has pruned them.
    refits = {n for n, p in pruners.items() if config.refit != "none" and p.refit_allowed}
    gram_names = {n for n, p in pruners.items() if p.needs_gram or config.measure_error or n in refits}
    for pruner in pruners.values():
        pruner.begin(first_window)

    t0 = time.perf_counter()
    stats = _LayerStats(linears, pruners, gram_names)
    try:
        with world.sync(f"collecting statistics in layer {index}"):
            run_layer(layer, acts.inps, extras, sizes, None, stats)
    finally:
        stats.remove()
    # [distributed] sum the statistics over ranks (every pruner's Statistic tensors, and each Gram
    # once even when q/k/v or gate/up share it), before any Gram is read or made a Hessian in place
    distributed.reduce_statistics(world, [*pruners.values(), *stats.grams.values()], f"statistics of layer {index}")
    timings["statistics"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    # [distributed] each rank prunes its share of the linears, then every pruned weight is broadcast
    # A refit costs about iterations × rows·cols² multiply-adds, on top of the method's work.
    owners = distributed.assign(
        {name: p.work() + (p.rows * p.cols * p.cols if name in refits else 0) for name, p in pruners.items()},
        world.size,
    )
    updates = {name: p.updates_weights or name in refits for name, p in pruners.items()}
    # Linears whose input channels may be permuted together with their producers' outputs, for
    # pruners that permute (RIA with --ria-permute). All ranks hold every pruner here: same answer.
    producers: dict[str, list[str]] = {}
    if any(p.may_permute_inputs for p in pruners.values()):
        producers = {c: ps for c, ps in find_producers(layer, linears, stats.order).items()
                     if pruners[c].may_permute_inputs}
    for name in producers:
        pruners[name].inputs_permutable = True
    perms: dict[str, torch.Tensor] = {}
    for name in linears:
        if owners[name] != world.rank:  # another rank's: its statistics are not needed here
            del pruners[name]
            stats.grams.pop(name, None)
    done: dict[str, tuple[float | None, float | None, float]] = {}
    with world.sync(f"pruning layer {index}"):
        for name, lin in linears.items():
            if name not in pruners:
                continue
            # Popped, so each Gram (c×c) is freed as soon as the last linear reading it is done.
            pruner, gram = pruners.pop(name), stats.grams.pop(name, None)
            last_use = gram is not None and not config.measure_error and not any(g is gram for g in stats.grams.values())
            # The last reader gets it as a _LastUseGram: the refit if there is one, else the method.
            refit_gram = (_LastUseGram(gram) if last_use else gram) if name in refits else None
            if last_use and name not in refits:
                gram = _LastUseGram(gram)
            done[name] = _prune_linear(lin, pruner, target, gram, config, refit_gram)
            if pruner.input_permutation is not None:
                perms[name] = pruner.input_permutation.cpu()
            del pruner, gram, refit_gram
    done = distributed.share_pruned(world, linears, owners, done)
    if producers:
        _apply_permutations(world, linears, producers, perms)
    for name, lin in linears.items():
        error, error_before_refit, seconds = done[name]
        zeros = int((lin.weight.data == 0).sum())
        report.zeros += zeros
        report.weights += lin.weight.numel()
        nm = target.pattern
        report.linears.append(
            LinearReport(
                name=f"{stack.path}.{index}.{name}",
                layer=index,
                target_sparsity=target.sparsity,
                sparsity=zeros / lin.weight.numel(),
                relative_error=error,
                nm_violations=nm_violations(lin.weight.data, nm.n, nm.m) if nm.is_nm else None,
                weight_update=updates[name],
                seconds=seconds,
                relative_error_before_refit=error_before_refit,
            )
        )
    del stats, pruners
    timings["prune"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    with world.sync(f"running the pruned layer {index}"):
        run_layer(layer, acts.inps, extras, sizes, acts.outs)
    timings["pruned_forward"] += time.perf_counter() - t0


def _apply_permutations(
    world: distributed.World, linears: dict[str, nn.Linear], producers: dict[str, list[str]], perms: dict[str, torch.Tensor]
) -> None:
    """Store the input-channel permutations the pruners chose: each consumer's columns and its
    producers' output rows (and biases) are permuted together, so the layer computes the same function
    and an N:M mask chosen in permuted order holds in stored order. Row and column permutations
    commute, so a linear that is both producer and consumer gets both. Producers were pruned along
    their inputs: permuting their rows keeps their N:M groups."""
    if world.size > 1:  # [distributed] each permutation is known to the rank that pruned its consumer
        perms = {name: perm for share in world.all_gathered(perms, "sharing the channel permutations")
                 for name, perm in share.items()}
    for name in linears:
        if name in perms:
            permute_channels(linears[name], [linears[p] for p in producers[name]], perms[name])


def _prune_linear(
    lin: nn.Linear,
    pruner: LinearPruner,
    target: SparsityTarget,
    gram: Gram | None,
    config: PruneConfig,
    refit_gram: Gram | None = None,
) -> tuple[float | None, float | None, float]:
    """Prune ``lin`` in place, then refit it on its mask when ``refit_gram`` is given; returns its
    relative reconstruction error (if measured), the error before the refit (if measured and
    refitted) and the seconds taken."""
    t0 = time.perf_counter()
    measure = config.measure_error
    old = lin.weight.data.float().clone() if measure or refit_gram is not None else None
    new = pruner.prune(lin.weight.data, target, gram)
    pruned = None
    if refit_gram is not None:
        pruned = new.to(lin.weight.dtype).float() if measure else None  # as stored without the refit
        # Values exactly representable in the weight's dtype, no kept one rounding to 0 there.
        new = refit_on_support(
            old, new, refit_gram.hessian(), config.refit_percdamp, config.refit_iters, config.refit_tol,
            dtype=lin.weight.dtype, consume_hessian=True,
        )
    lin.weight.data.copy_(new.to(lin.weight.dtype))
    del new
    if not measure:
        return None, None, time.perf_counter() - t0
    news = [lin.weight.data.float()] if pruned is None else [lin.weight.data.float(), pruned]
    errors = _relative_errors(old, news, gram if gram is not None else refit_gram)
    return errors[0], (errors[1] if pruned is not None else None), time.perf_counter() - t0


def run_layer(
    layer: nn.Module, inps: torch.Tensor, extras: list, sizes: list[int], outs: torch.Tensor | None, stats=None
) -> None:
    """Run ``layer`` over all calibration batches (``outs`` receives its outputs when given).

    The activations may live elsewhere than the layer (a file on disk, host memory for a GPU layer):
    each batch is moved to the layer's device and its output back.
    """
    device = next(layer.parameters()).device
    start = 0
    for size, (rest, kwargs) in zip(sizes, extras):
        out = layer(inps[start : start + size].to(device), *rest, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if outs is not None:
            outs[start : start + size] = out
        if stats is not None:
            stats.end_batch()
        start += size
