"""Wanda (Sun et al., ICLR 2024): score |W_ij|·‖X_j‖₂, per output row, no weight update (spec §3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import SparsityTarget, row_mask
from .base import Gram, LinearPruner, MethodConfig, register


class InputNormStats:
    """Running mean over samples of ‖X_{k,j}‖² (Wanda's ``scaler_row``), float32."""

    def __init__(self, cols: int, device: torch.device | str):
        self.sq_norm = torch.zeros(cols, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float().reshape(-1, x.shape[-2], x.shape[-1])  # (samples, tokens, cols)
        batch = x.shape[0]
        total = self.nsamples + batch
        # Same running-mean form as the reference: rescale, then add the new samples' share.
        self.sq_norm *= self.nsamples / total
        self.sq_norm += x.pow(2).sum(dim=(0, 1)) / total
        self.nsamples = total


class WandaPruner(LinearPruner):
    def __init__(self, name: str, weight: torch.Tensor):
        super().__init__(name, weight)
        self.stats = InputNormStats(self.cols, self.device)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.stats.add(x)

    def prune(self, weight: torch.Tensor, target: SparsityTarget, gram: Gram | None) -> torch.Tensor:
        w = weight.float().clone()
        score = w.abs() * self.stats.sq_norm.sqrt().unsqueeze(0)
        w[row_mask(score, target)] = 0
        return w


@register
@dataclass
class WandaConfig(MethodConfig):
    name = "wanda"

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        return WandaPruner(name, weight)
