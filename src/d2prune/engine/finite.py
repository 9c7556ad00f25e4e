"""NaN/inf checks of the layer walk: a decoder layer's weights before it is pruned, the layer-0
inputs after the capture, each layer's outputs after its pruned pass.

Without them a single NaN weight surfaces layers later as "the Hessian is not positive definite",
which sends the user to the calibration data; with them the error names the tensor or the layer and
the likely cause. Each check is one min/max reduction, a few windows at a time (disk-backed
activations are read in the pages just written).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from d2prune.errors import UserError

# Windows per reduction over the activations (disk-backed ones are read in pieces this size).
_CHUNK_WINDOWS = 16

DAMAGED = "the checkpoint is damaged or was saved from a diverged run"


def _finite(t: torch.Tensor) -> bool:
    """No NaN or ±inf in ``t``: its min and max are finite (``aminmax`` propagates NaN). One
    reduction without a temporary, 15-25x faster on CPU than ``isfinite(t).all()``."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_weight(name: str, tensor: torch.Tensor) -> None:
    """``tensor`` (a stored weight named ``name``) is finite; else a UserError naming it."""
    if not _finite(tensor):
        # A finite float32 weight beyond ±65504 becomes inf when the model is loaded in float16.
        fp16 = (
            " (or it exceeds the float16 range: use --dtype bfloat16 or float32)"
            if tensor.dtype == torch.float16
            else ""
        )
        raise UserError(f"{name} holds NaN/inf values: {DAMAGED}{fp16}")


def check_layer_weights(layer: nn.Module, prefix: str) -> None:
    """Every parameter of ``layer`` (named ``{prefix}.{name}``) is finite; else a UserError naming it."""
    for name, p in layer.named_parameters():
        if not p.is_meta:
            check_weight(f"{prefix}.{name}" if prefix else name, p.detach())


def check_model_weights(model: nn.Module) -> None:
    """Every parameter of a model in memory is finite (for the commands that run it whole: eval,
    finetune, attention, whose NaN perplexity or loss would not say where it came from)."""
    check_layer_weights(model, "")


def check_activations(acts: torch.Tensor, what: str, cause: str) -> None:
    """All of ``acts`` (windows first) is finite; else a UserError ``"{what} hold NaN/inf {cause}"``."""
    for start in range(0, acts.shape[0], _CHUNK_WINDOWS):
        if not _finite(acts[start : start + _CHUNK_WINDOWS]):
            raise UserError(f"{what} hold NaN/inf {cause}")


def half_precision_hint(dtype: torch.dtype | None, weights: torch.dtype) -> str:
    """What to try when activations overflow: float32 forwards, unless they already run in float32."""
    if (dtype or weights) in (torch.float16, torch.bfloat16):
        return "the forward overflowed in half precision: try --compute-dtype float32 (or --dtype float32)"
    return "the layer's weights or inputs are out of range: check the model with d2prune eval before pruning"
