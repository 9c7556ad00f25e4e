"""Pruner-Zero (Dong et al., ICML 2024): the evolved metric S = |W ⊙ W| ⊙ mms(G), per output row,
no weight update (docs/methods.md#pruner-zero).

G = sqrt(Σ_k (100·∂L_k/∂W)²) over the calibration windows is computed once, on the dense model,
before the layer-wise pass (``d2prune.methods.gradients``, run by ``PrunerZeroConfig.prepare``), so
pruning earlier layers does not change the metric of later ones.
``mms`` is min-max scaling over the whole weight matrix. The input statistic X is a terminal of the
search but not of the best tree, so the pruner observes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from d2prune.errors import UserError
from d2prune.methods.base import Gram, LinearPruner, MethodConfig, option, optional_text, register
from d2prune.patterns import SparsityTarget, row_mask


def min_max_scale(g: torch.Tensor) -> torch.Tensor:
    """(G − min G)/(max G − min G) over the whole tensor; zeros where G is constant."""
    lo, hi = g.min(), g.max()
    if hi > lo:
        return (g - lo) / (hi - lo)
    return torch.zeros_like(g)


class PrunerZeroPruner(LinearPruner):
    def __init__(self, name: str, weight: torch.Tensor, gradient: torch.Tensor):
        super().__init__(name, weight)
        self.gradient = gradient

    def prune(self, weight: torch.Tensor, target: SparsityTarget, gram: Gram | None) -> torch.Tensor:
        w = weight.float().clone()
        g = self.gradient.to(w.device, torch.float32)
        score = (w * w).abs() * min_max_scale(g)
        w[row_mask(score, target)] = 0
        return w


OPTIONS_GROUP = "Pruner-Zero options"


@register
@dataclass
class PrunerZeroConfig(MethodConfig):
    """``gradients``: G by full module path (computed by ``prepare`` when not given);
    ``gradient_cache``: a safetensors file to reuse G from (when its key matches the model and the
    token ids) and to write it to; ``gradient_source``: token ids (windows, tokens) to compute G on
    instead of the calibration batches (the official recipe uses WikiText2 train windows)."""

    name = "pruner-zero"
    needs_gradients = True

    gradients: dict[str, torch.Tensor] | None = field(
        default=None, repr=False, compare=False, metadata={"help": "G by full module path"}
    )
    gradient_cache: str | None = field(
        default=None,
        metadata=option(
            "--gradient-cache",
            help="safetensors file to store / reuse the gradient statistic",
            group=OPTIONS_GROUP,
            parse=optional_text,
        ),
    )
    gradient_source: Any = field(
        default=None,
        repr=False,
        compare=False,
        metadata=option(
            "--gradient-source",
            help="text for the gradient pass (default: the calibration source)",
            group=OPTIONS_GROUP,
            text_source="gradient",
        ),
    )
    gradient_origin: str | None = field(  # set by attach_gradients
        default=None, compare=False, metadata={"help": "where G came from: computed, cache or given"}
    )

    def prepare(
        self,
        model: torch.nn.Module,
        batches: list[dict[str, torch.Tensor]],
        device: torch.device,
        progress: bool,
        dtype: torch.dtype | None = None,
    ) -> PrunerZeroConfig:
        """G from ``gradients``, the cache, or a gradient pass over the dense model."""
        # Imported here: gradients.py imports the engine, which imports the methods package.
        from d2prune.methods.gradients import attach_gradients

        return attach_gradients(self, model, batches, device, progress, dtype)

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        if self.gradients is None:
            raise UserError("pruner-zero needs gradients: prune through d2prune.prune, or pass gradients=...")
        g = self.gradients.get(path)
        if g is None:
            raise UserError(f"pruner-zero: no gradients for {path!r} (a gradient file for another model?)")
        if tuple(g.shape) != tuple(weight.shape):
            raise UserError(
                f"pruner-zero: gradients for {path!r} have shape {tuple(g.shape)}, the weight {tuple(weight.shape)}"
            )
        return PrunerZeroPruner(name, weight, g)

    def to_dict(self) -> dict[str, Any]:
        # The record holds neither the gradient tensors nor the token ids, only where G came from.
        source = self.gradient_source
        return {
            "name": self.name,
            "gradients": self.gradient_origin or ("given" if self.gradients is not None else None),
            "gradient_cache": None if self.gradient_cache is None else str(self.gradient_cache),
            "gradient_source": "calibration" if source is None else f"separate token ids {_shape(source)}",
        }


def _shape(source: Any) -> str:
    return "x".join(map(str, source.shape)) if isinstance(source, torch.Tensor) else type(source).__name__
