"""The gradient statistic of gradient-based pruning metrics (Pruner-Zero, GBLM-Pruner; docs/methods.md#pruner-zero).

For every linear of every decoder layer, G = sqrt(Σ_k (scale·g_k)²) with g_k = ∂L_k/∂W, where L_k is
the causal-LM loss of calibration window k over all its tokens (for an image classifier: the
cross-entropy of image k against its label). Each window is its own sample, even
when a batch holds several. The sums are float32, whatever the model dtype.

The pass only *reads* gradients: no optimizer, so the weights stay bit-identical (the D²Prune repo's
baseline steps AdamW here, see docs/methods.md#pruner-zero). Dropout is off (eval mode), only the decoder linears'
weights require grad during the pass, and ``requires_grad`` flags, train/eval modes and devices are
restored afterwards. Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is touched.

Two ways give the same G:

* whole model: one forward and backward per window on ``device``; the model is moved there and back.
* layer by layer (``layerwise=True``; chosen by itself when a CUDA device cannot hold the model and
  its gradients): the decoder layers are visited one at a time, so only one layer is on the device.
  Forward sweep: capture layer 0's inputs (``capture_layer_inputs``), run each layer over a group of
  windows and keep every layer's input on the CPU. Head: the model's own forward with every decoder
  layer replaced by a stand-in (``engine.standin``: the first returns the last hidden state, the
  others pass it on), so whatever the model does after its stack (final norm, projection, LM head,
  softcapping, loss) runs its own code; the gradient of the loss with respect to the last hidden
  state comes back. Backward sweep, last layer first: recompute the layer's forward from its stored
  input, backpropagate the incoming gradient, accumulate the weight gradients, hand the input's
  gradient to the layer below. Like the layer walk, it feeds every layer the keyword arguments
  captured at layer 0, so models whose layers get different masks (mixed sliding-window/global
  layers) are refused.

Longer than 400 lines because the two modes, the losses (causal LM, image classification) and the
cache keyed on the same batches share their helpers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from d2prune.engine import distributed
from d2prune.engine.architecture import DecoderStack, as_out_in, find_decoder_stack, find_linears
from d2prune.engine.capture import (
    batch_rows,
    calibration_batches,
    capture_layer_inputs,
    input_key,
    model_inputs,
    outside_stack_on,
    tensors_on,
    to_device,
)
from d2prune.engine.precision import computing_in
from d2prune.engine.standin import standing_in
from d2prune.errors import UserError

CACHE_FORMAT = "d2prune-gradients"


# --------------------------------------------------------------------------------------------------
# the gradient pass
# --------------------------------------------------------------------------------------------------


def gradient_norms(
    model: nn.Module,
    batches: Any,
    device: torch.device | str = "cpu",
    progress: bool = True,
    scale: float = 100.0,
    *,
    layerwise: bool | None = None,
    fit_fraction: float = 0.8,
    windows_per_sweep: int = 8,
) -> dict[str, torch.Tensor]:
    """G = sqrt(Σ_k (scale·∂L_k/∂W)²) for every decoder linear, by full module path (float32, CPU, (out, in)).

    ``batches``: token ids (windows, tokens) or a list of dicts with ``input_ids`` (and optionally
    ``attention_mask``). ``layerwise``: None chooses by itself (see ``plan_gradient_pass``).
    ``windows_per_sweep``: windows whose per-layer activations the layer-by-layer mode keeps on the
    CPU between its forward and backward sweeps (each layer moves to the device twice per group).
    """
    device = _normalize(torch.device(device))
    stack = find_decoder_stack(model)
    world = distributed.current()
    # [distributed] each rank takes the gradients of its share of the windows; the sums are added up below
    windows, _ = world.shard(_single_windows(calibration_batches(batches, 1)), allow_empty=True)
    layer_linears = [
        {f"{stack.path}.{i}.{name}": lin for name, lin in find_linears(layer).items()}
        for i, layer in enumerate(stack.layers)
    ]
    linears = {path: lin for layer in layer_linears for path, lin in layer.items()}
    auto_layerwise, sums_device = plan_gradient_pass(model, linears.values(), device, fit_fraction)
    layerwise = auto_layerwise if layerwise is None else layerwise

    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for lin in linears.values():
            lin.weight.requires_grad_(True)
        with torch.enable_grad(), world.sync("the gradient pass"):
            if layerwise:
                sums = _layerwise(model, stack, layer_linears, windows, device, scale, progress, windows_per_sweep)
            else:
                sums = _whole_model(model, linears, windows, device, sums_device, scale, progress)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
    world.all_reduce_sum(list(sums.values()), "summing the squared gradients")  # [distributed]
    # G in each weight's (out, in) orientation, the one pruners see (Conv1D stores its weight transposed).
    return {path: as_out_in(linears[path], total.sqrt_()).cpu().contiguous() for path, total in sums.items()}


def plan_gradient_pass(
    model: nn.Module, linears: Any, device: torch.device, fit_fraction: float = 0.8
) -> tuple[bool, torch.device]:
    """(layerwise?, where the whole-model pass keeps its float32 sums).

    Off CUDA: whole model, sums on ``device``. On CUDA, against ``fit_fraction`` of the free memory:
    the model (what is not there yet) + the linears' gradients + float32 sums → sums on the device;
    without the sums → sums on the CPU; otherwise layer by layer.
    """
    device = _normalize(device)
    if device.type != "cuda":
        return False, device
    free, _ = torch.cuda.mem_get_info(device)
    budget = fit_fraction * free
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    to_move = sum(t.numel() * t.element_size() for t in tensors if t.device != device)
    weights = [lin.weight for lin in linears]
    grads = sum(w.numel() * w.element_size() for w in weights)
    sums = sum(w.numel() * 4 for w in weights)
    if to_move + grads + sums <= budget:
        return False, device
    if to_move + grads <= budget:
        return False, torch.device("cpu")
    return True, torch.device("cpu")


def _whole_model(model, linears, windows, device, sums_device, scale, progress) -> dict[str, torch.Tensor]:
    weights = [lin.weight for lin in linears.values()]
    with tensors_on(model.modules(), device):
        sums = [torch.zeros(w.shape, dtype=torch.float32, device=sums_device) for w in weights]
        for window in tqdm(windows, desc="gradients", disable=not progress):
            loss = _loss(model, to_device(window, device))
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for total, grad in zip(sums, grads):
                _accumulate(total, grad, scale)
            del loss, grads
    return dict(zip(linears, sums))


def _layerwise(model, stack, layer_linears, windows, device, scale, progress, per_sweep) -> dict[str, torch.Tensor]:
    _check_layerwise(model, stack)
    sums = {
        path: torch.zeros(lin.weight.shape, dtype=torch.float32)
        for layer in layer_linears
        for path, lin in layer.items()
    }
    bar = tqdm(total=len(windows), desc="gradients (layer by layer)", disable=not progress)
    try:
        _sweeps(model, stack, layer_linears, windows, device, scale, per_sweep, sums, bar)
    finally:
        bar.close()
    return sums


def _sweeps(model, stack, layer_linears, windows, device, scale, per_sweep, sums, bar) -> None:
    for start in range(0, len(windows), max(1, per_sweep)):
        group = windows[start : start + per_sweep]
        hidden, extras = capture_layer_inputs(model, stack, group, device)
        acts = [hidden.cpu()]
        del hidden
        template = None
        with torch.no_grad():  # forward sweep: every layer's input, kept on the CPU
            for layer in stack.layers:
                with tensors_on(layer.modules(), device):
                    out_all = torch.empty_like(acts[-1])
                    for k, (rest, kwargs) in enumerate(extras):
                        out, template = _split_output(layer(acts[-1][k : k + 1].to(device), *rest, **kwargs), stack)
                        out_all[k : k + 1] = out
                acts.append(out_all)
        grad = _head_gradients(model, stack, group, acts.pop(), device, template)
        for i in reversed(range(len(stack.layers))):  # backward sweep
            inputs, layer, paths = acts.pop(), stack.layers[i], list(layer_linears[i])
            weights = [lin.weight for lin in layer_linears[i].values()]
            with tensors_on(layer.modules(), device):
                layer_sums = [torch.zeros(w.shape, dtype=torch.float32, device=device) for w in weights]
                for k, (rest, kwargs) in enumerate(extras):
                    x = inputs[k : k + 1].to(device).requires_grad_(i > 0)
                    out, _ = _split_output(layer(x, *rest, **kwargs), stack)
                    wrt = weights + ([x] if i > 0 else [])
                    grads = torch.autograd.grad(out, wrt, grad_outputs=grad[k : k + 1].to(device), allow_unused=True)
                    for total, g in zip(layer_sums, grads):
                        _accumulate(total, g, scale)
                    if i > 0:
                        grad[k : k + 1] = grads[-1]
                    del out, grads
            for path, total in zip(paths, layer_sums):
                sums[path] += total.cpu()
        bar.update(len(group))


def _head_gradients(model, stack, windows, last_hidden, device, template) -> torch.Tensor:
    """∂L_k/∂h_k for the last decoder layer's output h_k of each window (CPU, model dtype)."""
    grads = torch.empty_like(last_hidden)
    # The first stand-in returns the last hidden state, the others hand it on.
    with (
        standing_in(stack, range(len(stack.layers)), rest=template) as standins,
        outside_stack_on(model, stack, device),
    ):
        for k, window in enumerate(windows):
            hidden = last_hidden[k : k + 1].to(device).requires_grad_(True)
            standins[0].inject = hidden
            for standin in standins:
                standin.count = 0
            loss = _loss(model, to_device(window, device))
            if any(standin.count != 1 for standin in standins):
                raise UserError(
                    f"{type(model).__name__} does not call each {stack.layer_class} once per forward pass; "
                    "layer-by-layer gradients cannot be used for this architecture (use layerwise=False)"
                )
            grads[k : k + 1] = torch.autograd.grad(loss, hidden)[0]
    return grads


def _check_layerwise(model: nn.Module, stack: DecoderStack) -> None:
    layer_types = getattr(model.config, "layer_types", None) or []
    if len(set(layer_types)) > 1:
        raise UserError(
            f"{type(model).__name__} mixes decoder layer types {sorted(set(layer_types))}: its layers get different "
            "attention masks, which layer-by-layer gradients do not support (use layerwise=False)"
        )


def _split_output(out: Any, stack: DecoderStack) -> tuple[torch.Tensor, tuple | None]:
    """A layer's output hidden states, and the rest of its output tuple (None if a bare tensor)."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], tuple(out[1:])
    raise UserError(
        f"{stack.layer_class} returns {type(out).__name__}, not hidden states; "
        "layer-by-layer gradients cannot be used for this architecture (use layerwise=False)"
    )


def _loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss over all tokens of the window (padding, if a mask marks any, excluded), or
    for images the classification loss on their labels."""
    if input_key(inputs) == "pixel_values":
        return _classification_loss(model, inputs)
    labels = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    loss = getattr(model(**inputs, labels=labels, use_cache=False), "loss", None)
    if loss is None:
        raise UserError(f"{type(model).__name__} returns no loss for labels; gradients need a causal LM")
    return loss


def _classification_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the model's logits against the images' ``labels``. Computed here rather than by
    the model, so classifiers whose forward takes no labels (DeiT with a distillation head: its logits
    are the mean of both heads') get the same loss."""
    labels = inputs.get("labels")
    if labels is None:
        raise UserError(
            "gradients of an image classifier need the calibration images' labels "
            "(an image folder with class sub-folders, or dicts with 'pixel_values' and 'labels')"
        )
    logits = getattr(model(**model_inputs(inputs)), "logits", None)
    if logits is None:
        raise UserError(f"{type(model).__name__} returns no logits; gradients need an image classifier")
    if int(labels.max()) >= logits.shape[-1] or int(labels.min()) < 0:
        raise UserError(f"calibration labels must lie in 0..{logits.shape[-1] - 1}, got {sorted(set(labels.tolist()))}")
    return torch.nn.functional.cross_entropy(logits.float(), labels.to(logits.device))


def _accumulate(total: torch.Tensor, grad: torch.Tensor | None, scale: float) -> None:
    if grad is not None:
        scaled = grad.to(total.device, torch.float32) * scale
        total.addcmul_(scaled, scaled)


def _single_windows(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Split batches into one-window batches (per-window tensors sliced along dim 0)."""
    windows = []
    for batch in batches:
        n = batch_rows(batch)
        for k in range(n):
            windows.append(
                {
                    key: v[k : k + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
                    for key, v in batch.items()
                }
            )
    return windows


def _normalize(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# --------------------------------------------------------------------------------------------------
# cache, and attaching G to the method (``PrunerZeroConfig.prepare``)
# --------------------------------------------------------------------------------------------------


def gradient_cache_key(model: nn.Module, batches: Any, scale: float = 100.0) -> str:
    """sha256 of the model config, the first and last decoder linears' weights, the scale and the
    calibration token ids (and masks). Independent of how the windows are batched."""
    digest = hashlib.sha256()
    try:
        config = model.config.to_json_string(use_diff=False)
    except Exception:  # a config that does not serialize: its repr still tells models apart
        config = repr(getattr(model, "config", type(model).__name__))
    digest.update(config.encode())
    stack = find_decoder_stack(model)
    first = next(iter(find_linears(stack.layers[0]).values())).weight
    last = list(find_linears(stack.layers[-1]).values())[-1].weight
    for weight in (first, last):
        data = weight.detach().cpu().contiguous()
        digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(f"scale={scale!r}".encode())
    windows = 0
    for batch in calibration_batches(batches, 1):
        windows += batch_rows(batch)
        for key in ("input_ids", "attention_mask"):
            if key in batch:
                digest.update(key.encode())
                digest.update(batch[key].detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
        if input_key(batch) == "pixel_values":
            _digest_images(digest, batch)
    digest.update(f"windows={windows}".encode())
    return digest.hexdigest()


def _digest_images(digest: Any, batch: dict[str, torch.Tensor]) -> None:
    """Each image's exact bytes and its label, image by image (so batching does not change the key)."""
    pixels = batch["pixel_values"].detach().cpu().contiguous()
    labels = batch.get("labels")
    for k in range(pixels.shape[0]):
        digest.update(f"pixel_values{pixels.dtype}{tuple(pixels.shape[1:])}".encode())
        digest.update(pixels[k].reshape(-1).view(torch.uint8).numpy().tobytes())
        if labels is not None:
            digest.update(f"label={int(labels[k])}".encode())


def save_gradients(grads: dict[str, torch.Tensor], path: str | os.PathLike, key: str | None = None) -> None:
    """Write ``grads`` as float32 safetensors (atomically), with ``key`` in the metadata."""
    from d2prune.io.atomic import atomic_path

    tensors = {name: g.detach().to("cpu", torch.float32).contiguous() for name, g in grads.items()}
    metadata = {"format": CACHE_FORMAT, **({"key": key} if key else {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_gradients(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def cached_gradient_key(path: str | os.PathLike) -> str | None:
    """The key stored in a gradient cache file, or None if there is no readable cache there."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:
        return None
    return metadata.get("key") if metadata.get("format") == CACHE_FORMAT else None


def attach_gradients(
    method: Any,
    model: nn.Module,
    batches: Any,
    device: torch.device | str,
    progress: bool = True,
    dtype: torch.dtype | None = None,
) -> Any:
    """``method`` with its ``gradients`` set: as given, from its ``gradient_cache`` when the cache
    key matches, or computed (on ``method.gradient_source`` token ids if set, else on ``batches``)
    and then written to the cache path if one is given. ``dtype``: the forwards' and backwards'
    (None: the model's); the cache key then covers the weights as cast, so a pass in another dtype
    does not reuse the cache."""
    if getattr(method, "gradients", None) is not None:
        return method
    # The whole model is cast for the pass (a host copy of the weights in ``dtype``): the layer-by-layer
    # mode moves layers to the device one at a time, but the cast copy lives on the host.
    with computing_in(model, dtype):
        return _attach_gradients(method, model, batches, device, progress)


def _attach_gradients(method: Any, model: nn.Module, batches: Any, device: torch.device | str, progress: bool) -> Any:
    source = getattr(method, "gradient_source", None)
    batches = calibration_batches(source if source is not None else batches, 1)
    cache = getattr(method, "gradient_cache", None)
    key = gradient_cache_key(model, batches) if cache else None
    grads, origin = None, "cache"
    world = distributed.current()
    with world.sync("reading the gradient cache"):
        if cache and Path(cache).is_file() and cached_gradient_key(cache) == key:
            grads = load_gradients(cache)
            if set(grads) != set(_linear_paths(model)):  # a stale or foreign file: recompute
                grads = None
    # [distributed] the ranks compute together unless every one of them found the cache (the
    # machines of a multi-node run need not share a file system); only rank 0 writes it
    if not world.all_true(grads is not None, "checking the gradient cache"):
        grads, origin = gradient_norms(model, batches, device, progress), "computed"
        if cache and world.rank == 0:
            save_gradients(grads, cache, key)
    changes = {"gradients": grads}
    if "gradient_origin" in {f.name for f in dataclasses.fields(method)}:
        changes["gradient_origin"] = origin
    return dataclasses.replace(method, **changes)


def _linear_paths(model: nn.Module) -> list[str]:
    stack = find_decoder_stack(model)
    return [f"{stack.path}.{i}.{name}" for i, layer in enumerate(stack.layers) for name in find_linears(layer)]
