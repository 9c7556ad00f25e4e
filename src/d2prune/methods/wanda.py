"""Wanda (Sun et al., ICLR 2024): score |W_ij|·‖X_j‖₂, per output row, no weight update (docs/methods.md#wanda)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from d2prune.methods.base import Gram, LinearPruner, MethodConfig, Statistic, count_tensor, register
from d2prune.patterns import SparsityTarget, row_mask


class InputNormStats(Statistic):
    """Mean over samples of ‖X_{k,j}‖² (Wanda's ``scaler_row``), as float32 ``sq_norm``.

    Each sample's squared norm over its tokens is float32; they are summed over samples in float64
    and divided at the end, so the result does not depend on how the samples were batched or split
    over data-parallel ranks (the reference's float32 running mean agrees to float32 rounding).
    """

    def __init__(self, cols: int, device: torch.device | str):
        self.sum = torch.zeros(cols, dtype=torch.float64, device=device)
        self.sq_norm = torch.zeros(cols, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float().reshape(-1, x.shape[-2], x.shape[-1])  # (samples, tokens, cols)
        self.sum += x.pow(2).sum(dim=1).sum(dim=0, dtype=torch.float64)
        self.nsamples += x.shape[0]
        self._update()

    def _update(self) -> None:
        self.sq_norm = (self.sum / max(self.nsamples, 1)).float()

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "nsamples": count_tensor(self.nsamples, self.sum.device)}

    def load_statistics(self, sums: dict[str, torch.Tensor]) -> None:
        self.sum, self.nsamples = sums["sum"], int(sums["nsamples"].item())
        self._update()


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
