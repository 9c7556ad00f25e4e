"""One decoder layer's turn: statistics pass, pruning of every linear (with the optional refit and
input-channel permutations), and the pruned forward that makes the next layer's inputs."""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from d2prune.config import PruneConfig
from d2prune.engine.activations import Activations
from d2prune.engine.architecture import DecoderStack, find_linears, weight_matrix
from d2prune.engine.channels import find_producers, permute_channels
from d2prune.engine.executor import Executor
from d2prune.engine.precision import computing_in
from d2prune.methods.base import Gram, LinearPruner, MethodConfig
from d2prune.methods.least_squares import refit_on_support
from d2prune.patterns import SparsityTarget, nm_violations
from d2prune.report import LinearReport, PruneReport


class _LayerStats:
    """Forward hooks feeding each linear's pruner, plus one Gram per distinct linear input."""

    def __init__(self, linears: dict[str, nn.Module], pruners: dict[str, LinearPruner], gram_names: set[str]):
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


def prune_layer(
    layer: nn.Module,
    index: int,
    stack: DecoderStack,
    method: MethodConfig,
    target: SparsityTarget,
    config: PruneConfig,
    acts: Activations,
    extras: list,
    sizes: list[int],
    report: PruneReport,
    timings: dict[str, float],
    executor: Executor,
    dtype: torch.dtype | None = None,
) -> None:
    """Statistics pass, pruning of every linear, pruned forward (outputs into ``acts.outs``).

    ``executor``: the processes that share the calibration windows and the linears (its
    ``first_window`` is the global index of this process's first window). ``dtype``: the
    forwards' (the resolved ``config.compute_dtype``; None: the layer's own).
    """
    linears = find_linears(layer)
    pruners = {
        name: method.make_pruner(name, weight_matrix(lin), f"{stack.path}.{index}.{name}")
        for name, lin in linears.items()
    }
    # Linears to refit read the Gram after their method has pruned them.
    refits = {n for n, p in pruners.items() if config.refit != "none" and p.refit_allowed}
    gram_names = {n for n, p in pruners.items() if p.needs_gram or config.measure_error or n in refits}
    for pruner in pruners.values():
        pruner.begin(executor.first_window)

    t0 = time.perf_counter()
    stats = _LayerStats(linears, pruners, gram_names)
    try:
        with executor.sync(f"collecting statistics in layer {index}"):
            run_layer(layer, acts.inps, extras, sizes, None, stats, dtype)
    finally:
        stats.remove()
    # [distributed] each rank prunes its share of the linears, then every pruned weight is broadcast.
    # A refit costs about iterations × rows·cols² multiply-adds, on top of the method's work.
    owners = executor.owners(
        {name: p.work() + (p.rows * p.cols * p.cols if name in refits else 0) for name, p in pruners.items()}
    )
    # [distributed] sum the statistics over ranks into the ranks that read them: a pruner's into its
    # owner, a Gram (once, even when q/k/v or gate/up share it) into the owners of its readers; before
    # any Gram is read or made a Hessian in place
    gram_readers: dict[int, set[int]] = {}
    for name, gram in stats.grams.items():
        gram_readers.setdefault(id(gram), set()).add(owners[name])
    executor.reduce_statistics(
        [*pruners.values(), *stats.grams.values()],
        f"statistics of layer {index}",
        [*({owners[n]} for n in pruners), *(gram_readers[id(g)] for g in stats.grams.values())],
    )
    timings["statistics"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    updates = {name: p.updates_weights or name in refits for name, p in pruners.items()}
    # Linears whose input channels may be permuted together with their producers' outputs, for
    # pruners that permute (RIA with --ria-permute). All ranks hold every pruner here: same answer.
    producers: dict[str, list[str]] = {}
    if any(p.may_permute_inputs for p in pruners.values()):
        producers = {
            c: ps for c, ps in find_producers(layer, linears, stats.order).items() if pruners[c].may_permute_inputs
        }
    for name in producers:
        pruners[name].inputs_permutable = True
    perms: dict[str, torch.Tensor] = {}
    for name in linears:
        if owners[name] != executor.rank:  # another rank's: its statistics are not needed here
            del pruners[name]
            stats.grams.pop(name, None)
    done: dict[str, tuple[float | None, float | None, float]] = {}
    with executor.sync(f"pruning layer {index}"):
        for name, lin in linears.items():
            if name not in pruners:
                continue
            # Popped, so each Gram (c×c) is freed as soon as the last linear reading it is done.
            pruner, gram = pruners.pop(name), stats.grams.pop(name, None)
            last_use = (
                gram is not None and not config.measure_error and not any(g is gram for g in stats.grams.values())
            )
            # The last reader gets it as a _LastUseGram: the refit if there is one, else the method.
            refit_gram = (_LastUseGram(gram) if last_use else gram) if name in refits else None
            if last_use and name not in refits:
                gram = _LastUseGram(gram)
            done[name] = _prune_linear(lin, pruner, target, gram, config, refit_gram)
            if pruner.input_permutation is not None:
                perms[name] = pruner.input_permutation.cpu()
            del pruner, gram, refit_gram
    done = executor.share_pruned(linears, owners, done)
    if producers:
        _apply_permutations(executor, linears, producers, perms)
    for name, lin in linears.items():
        error, error_before_refit, seconds = done[name]
        weight = weight_matrix(lin)  # (out, in): N:M groups run along the inputs
        zeros = int((weight == 0).sum())
        report.zeros += zeros
        report.weights += weight.numel()
        nm = target.pattern
        report.linears.append(
            LinearReport(
                name=f"{stack.path}.{index}.{name}",
                layer=index,
                target_sparsity=target.sparsity,
                sparsity=zeros / weight.numel(),
                relative_error=error,
                nm_violations=nm_violations(weight, nm.n, nm.m) if nm.is_nm else None,
                weight_update=updates[name],
                seconds=seconds,
                relative_error_before_refit=error_before_refit,
            )
        )
    del stats, pruners
    timings["prune"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    with executor.sync(f"running the pruned layer {index}"):
        run_layer(layer, acts.inps, extras, sizes, acts.outs, dtype=dtype)
    timings["pruned_forward"] += time.perf_counter() - t0


def _apply_permutations(
    executor: Executor, linears: dict[str, nn.Module], producers: dict[str, list[str]], perms: dict[str, torch.Tensor]
) -> None:
    """Store the input-channel permutations the pruners chose: each consumer's columns and its
    producers' output rows (and biases) are permuted together, so the layer computes the same function
    and an N:M mask chosen in permuted order holds in stored order. Row and column permutations
    commute, so a linear that is both producer and consumer gets both. Producers were pruned along
    their inputs: permuting their rows keeps their N:M groups."""
    # [distributed] each permutation is known to the rank that pruned its consumer
    perms = executor.share_permutations(perms)
    for name in linears:
        if name in perms:
            permute_channels(linears[name], [linears[p] for p in producers[name]], perms[name])


def _prune_linear(
    lin: nn.Module,
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
    weight = weight_matrix(lin)  # (out, in); a transposed view for Conv1D, written through below
    old = weight.float().clone(memory_format=torch.contiguous_format) if measure or refit_gram is not None else None
    # Methods get a contiguous (out, in) matrix (a copy only for Conv1D), as for nn.Linear.
    new = pruner.prune(weight.contiguous(), target, gram)
    pruned = None
    if refit_gram is not None:
        pruned = new.to(weight.dtype).float() if measure else None  # as stored without the refit
        # Values exactly representable in the weight's dtype, no kept one rounding to 0 there.
        new = refit_on_support(
            old,
            new,
            refit_gram.hessian(),
            config.refit_percdamp,
            config.refit_iters,
            config.refit_tol,
            dtype=weight.dtype,
            consume_hessian=True,
        )
    weight.copy_(new.to(weight.dtype))
    del new
    if not measure:
        return None, None, time.perf_counter() - t0
    news = [weight.float()] if pruned is None else [weight.float(), pruned]
    errors = _relative_errors(old, news, gram if gram is not None else refit_gram)
    return errors[0], (errors[1] if pruned is not None else None), time.perf_counter() - t0


def run_layer(
    layer: nn.Module,
    inps: torch.Tensor,
    extras: list,
    sizes: list[int],
    outs: torch.Tensor | None,
    stats: _LayerStats | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Run ``layer`` over all calibration batches (``outs`` receives its outputs when given), its
    parameters in ``dtype`` for the pass (None: as they are; see ``engine.precision``).

    The activations may live elsewhere than the layer (a file on disk, host memory for a GPU layer):
    each batch is moved to the layer's device and its output back.
    """
    device = next(layer.parameters()).device
    start = 0
    with computing_in(layer, dtype):
        for size, (rest, kwargs) in zip(sizes, extras):
            x = inps[start : start + size].to(device)
            out = layer(x if dtype is None else x.to(dtype), *rest, **kwargs)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if outs is not None:
                outs[start : start + size] = out
            if stats is not None:
                stats.end_batch()
            start += size
