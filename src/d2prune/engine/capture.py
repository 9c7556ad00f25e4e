"""Calibration data and the layer-0 capture: what the decoder (or encoder) stack receives.

The model's own forward runs up to its decoder stack with stand-ins for the layers
(``engine.standin``), so whatever the model computes before the stack (embeddings, masks, positions,
rotary embeddings) is recorded as it is, for any architecture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from d2prune.engine.activations import Activations
from d2prune.engine.architecture import DecoderStack
from d2prune.engine.precision import computing_in, own_parameters
from d2prune.engine.standin import StopForward, standing_in
from d2prune.errors import UserError

# Keyword arguments a decoder layer may get for a KV cache; layer-wise calibration runs without one.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


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


def _move_tensors(modules: Iterable[nn.Module], device: torch.device) -> dict:
    """Move every parameter and buffer of ``modules`` to ``device``; returns their previous devices."""
    previous: dict[int, tuple[torch.Tensor, torch.device]] = {}
    for module in modules:
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                # Meta tensors belong to a streamed model that loads what it needs itself.
                if tensor is None or id(tensor) in previous or tensor.is_meta:
                    continue
                previous[id(tensor)] = (tensor, tensor.device)
                tensor.data = tensor.data.to(device)
    return previous


@contextmanager
def tensors_on(modules: Iterable[nn.Module], device: torch.device) -> Iterator[None]:
    """``modules``' parameters and buffers on ``device`` for the body, back where they were after it."""
    previous = _move_tensors(modules, device)
    try:
        yield
    finally:
        for tensor, home in previous.values():
            tensor.data = tensor.data.to(home)


def outside_modules(model: nn.Module, stack: DecoderStack) -> list[nn.Module]:
    """Every module of ``model`` outside its decoder stack (the stack's module itself excluded)."""
    prefix = stack.path + "."
    return [m for path, m in model.named_modules() if path != stack.path and not path.startswith(prefix)]


def outside_stack_on(model: nn.Module, stack: DecoderStack, device: torch.device) -> Any:
    """``tensors_on`` for every module of ``model`` outside its decoder stack."""
    return tensors_on(outside_modules(model, stack), device)


@contextmanager
def outside_stack_computing(
    model: nn.Module, stack: DecoderStack, device: torch.device, dtype: torch.dtype | None
) -> Iterator[None]:
    """The modules outside the stack on ``device`` and computing in ``dtype`` (None: their own), so the
    hidden states, masks and rotary embeddings the stack receives come in the dtype the layers run in."""
    outside = outside_modules(model, stack)
    with tensors_on(outside, device), computing_in(own_parameters(outside), dtype):
        yield


# The model input that carries the calibration samples (dim 0: one row per sample): token ids
# (windows, tokens) of a causal LM, or images (N, C, H, W) of an image classifier.
INPUT_KEYS = ("input_ids", "pixel_values")


def input_key(batch: dict[str, Any]) -> str:
    """The key of ``batch``'s samples: ``input_ids`` or ``pixel_values``."""
    return next(key for key in INPUT_KEYS if key in batch)


def batch_rows(batch: dict[str, Any]) -> int:
    """The number of samples (windows or images) in ``batch``."""
    return batch[input_key(batch)].shape[0]


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model's forward gets of a calibration batch: all but its ``labels`` (used only by
    gradient passes that compute their own loss)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def forward_options(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """``use_cache=False`` for a model that takes it (a causal LM): layer-wise passes keep no KV cache.
    Token batches always get it (as they always did); image models only when their forward names it."""
    if input_key(batch) == "input_ids":
        return {"use_cache": False}
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - an odd forward without a signature
        takes = False
    return {"use_cache": False} if takes else {}


def calibration_batches(calibration: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Normalize the calibration data to a list of model-input dicts with ``input_ids`` (token windows)
    or ``pixel_values`` (images, optionally with ``labels``). A tensor, or one dict of images, is split
    into batches of ``batch_size``."""
    if isinstance(calibration, torch.Tensor):
        if calibration.is_floating_point():
            if calibration.dim() != 4:
                raise UserError(
                    f"calibration images must be 4-D (images, channels, height, width), got shape "
                    f"{tuple(calibration.shape)}"
                )
        elif calibration.dim() != 2:
            raise UserError(
                f"calibration token ids must be 2-D (windows, tokens), got shape {tuple(calibration.shape)}"
            )
        calibration = [] if calibration.numel() == 0 else calibration.split(batch_size)
    elif isinstance(calibration, dict) and "pixel_values" in calibration:
        calibration = _split_images(calibration, batch_size)
    batches = []
    for item in calibration if isinstance(calibration, Iterable) else [calibration]:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            item = {"pixel_values": item if item.dim() == 4 else item.unsqueeze(0)}
        elif isinstance(item, torch.Tensor):
            item = {"input_ids": item if item.dim() == 2 else item.unsqueeze(0)}
        elif not (isinstance(item, dict) and any(key in item for key in INPUT_KEYS)):
            raise UserError(
                "calibration batches must be token-id tensors, image tensors or dicts with 'input_ids' or 'pixel_values'"
            )
        if input_key(item) == "input_ids":
            _check_ids(item["input_ids"])
        else:
            _check_images(item)
        batches.append(dict(item))
    if not batches:
        raise UserError("no calibration data given")
    kinds = sorted({input_key(b) for b in batches})
    if len(kinds) > 1:
        raise UserError(f"calibration batches mix {' and '.join(kinds)}")
    if kinds == ["pixel_values"]:
        shapes = sorted({tuple(b["pixel_values"].shape[1:]) for b in batches})
        if len(shapes) > 1:
            raise UserError(f"all calibration images must have the same shape, got {shapes}")
        if len({"labels" in b for b in batches}) > 1:
            raise UserError("some calibration batches have labels and others do not")
        return batches
    lengths = sorted({b["input_ids"].shape[1] for b in batches})
    if len(lengths) > 1:
        raise UserError(f"all calibration windows must have the same number of tokens, got lengths {lengths}")
    return batches


def _split_images(images: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    """One dict of images (``pixel_values`` and the like, one row per image) as batches of ``batch_size``."""
    pixels = images["pixel_values"]
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
        return [images]  # _check_images says what is wrong
    n = pixels.shape[0]
    return [
        {
            k: v[i : i + batch_size] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in images.items()
        }
        for i in range(0, n, batch_size)
    ]


def _check_ids(ids: Any) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise UserError(f"calibration input_ids must be non-empty 2-D (windows, tokens) tensors, got {shape}")


def _check_images(batch: dict[str, Any]) -> None:
    pixels = batch["pixel_values"]
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.numel() == 0:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise UserError(
            f"calibration pixel_values must be non-empty 4-D (images, channels, height, width) tensors, got {shape}"
        )
    if not pixels.is_floating_point():
        raise UserError(f"calibration pixel_values must be floating point, got {pixels.dtype}")
    labels = batch.get("labels")
    if labels is not None and (
        not isinstance(labels, torch.Tensor) or labels.is_floating_point() or tuple(labels.shape) != (pixels.shape[0],)
    ):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise UserError(
            f"calibration labels must be integer class indices, one per image ({pixels.shape[0]}), got {shape}"
        )


def _record_layer_calls(
    model: nn.Module,
    stack: DecoderStack,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    upto: int,
    on_batch: Callable[[int, list[tuple[torch.Tensor, tuple, dict]]], None],
    dtype: torch.dtype | None = None,
) -> None:
    """Run every batch through the model with decoder layers 0..upto replaced by stand-ins; hands
    ``on_batch`` the batch index and each of those layers' (hidden states, positional args, keyword
    args). Layers before ``upto`` hand their input on unchanged; layer ``upto`` stops the forward pass."""
    with (
        standing_in(stack, range(upto + 1), record=True, stop_at=upto) as standins,
        outside_stack_computing(model, stack, device, dtype),
    ):
        for b, batch in enumerate(batches):
            try:
                model(**to_device(model_inputs(batch), device), **forward_options(model, batch))
            except StopForward:
                pass
            else:
                raise RuntimeError(
                    f"{type(model).__name__} finished a forward pass without calling decoder layer {upto}"
                )
            on_batch(b, [standin.calls.pop() for standin in standins])


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    stack: DecoderStack,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    activations: Activations | None = None,
    keep_inputs: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, list[tuple[tuple, dict]]]:
    """Run the model up to decoder layer 0 for every batch.

    Returns the hidden states (windows, tokens, hidden) in ``dtype`` (None: the model's), and per batch the other
    positional and keyword arguments the layer receives (masks, positions, rotary embeddings).
    With ``activations`` the hidden states are written into its input buffer (allocated here) batch
    by batch; with ``keep_inputs`` they are dropped (the buffer already holds a resumed run's inputs)
    and only the arguments are returned.
    """
    extras: list[tuple[tuple, dict]] = []
    hidden_list: list[torch.Tensor] = []
    total = sum(batch_rows(b) for b in batches)
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

    _record_layer_calls(model, stack, batches, device, 0, on_batch, dtype)
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
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, list[list[tuple[tuple, dict]]]]:
    """Layer-0 hidden states and, per decoder layer, per batch, the other arguments it receives.

    Most models give every layer the same arguments. Models that mix attention types across layers
    (``config.layer_types``: sliding-window and full attention) give each type its own mask, so for
    them every layer's arguments are recorded in a pass where each layer hands its input on unchanged.
    ``activations``, ``keep_inputs`` and ``dtype`` are as for ``capture_layer_inputs``.
    """
    inps, extras = capture_layer_inputs(model, stack, batches, device, activations, keep_inputs, dtype)
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

    _record_layer_calls(model, stack, batches, device, num_layers - 1, on_batch, dtype)
    return inps, per_layer
