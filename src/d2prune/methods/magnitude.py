"""Magnitude pruning: drop the weights of smallest |W| in each output row. Needs no data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from d2prune.methods.base import Gram, LinearPruner, MethodConfig, register
from d2prune.patterns import SparsityTarget, row_mask


class MagnitudePruner(LinearPruner):
    def prune(self, weight: torch.Tensor, target: SparsityTarget, gram: Gram | None) -> torch.Tensor:
        w = weight.float().clone()
        w[row_mask(w.abs(), target)] = 0
        return w


@register
@dataclass
class MagnitudeConfig(MethodConfig):
    name = "magnitude"

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        return MagnitudePruner(name, weight)
