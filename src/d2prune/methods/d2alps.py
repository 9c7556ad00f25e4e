"""D²-ALPS (ours): ALPS on the updated linears with D²Prune's dual-Taylor terms in the support choice,
and D²Prune's un-updated projections.

Two ideas of D²Prune carried over to ALPS (docs/methods.md, D²-ALPS):
  * the ADMM projection keeps the entries with the highest
        Z̃² + r1·y_i·|Z|·dx_j − r2·Z²·dx_j²
    (Z̃ = Z·sqrt(H_jj) the normalised iterate, y/dx D²Prune's output-row and input-column norms),
    the score D²Prune's update branch adds to SparseGPT's W²/U_jj²;
  * the linears in ``target_layers`` (one of q/k/v, chosen on held-out data by ``--target-layers auto``)
    are pruned without weight update by D²Prune's no-update branch.
With ``d2_sparsegpt`` off and ``target_layers`` empty it is plain ALPS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from d2prune.errors import UserError
from d2prune.methods.alps import (
    ADMM_ITERS_OPTION,
    AUTO,
    CG_ITERS_OPTION,
    RHO_OPTION,
    ALPSPruner,
    SupportScore,
    check_rho,
    magnitude_score,
    refuse_auto_rho,
    rho_choices,
)
from d2prune.methods.base import LinearPruner, MethodConfig, register
from d2prune.methods.d2prune import D2PruneConfig, D2WandaPruner, NormStats, d2_terms


class D2ALPSPruner(ALPSPruner):
    """ALPS whose projection score carries D²Prune's activation-perturbation terms."""

    def __init__(self, name: str, weight: torch.Tensor, config: D2ALPSConfig):
        super().__init__(name, weight, config)
        self.norms = NormStats(
            self.rows, self.cols, config.s, config.stats_mode, config.stats_mode == "reference", self.device
        )

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.norms.add(x, y)

    def support_score(self) -> SupportScore:
        c = self.config
        if not c.d2_sparsegpt:
            return magnitude_score

        def score(z: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
            return z.pow(2) + d2_terms(z / norm.unsqueeze(0), self.norms.y, self.norms.dx, c.r1, c.r2)

        return score


@register
@dataclass
class D2ALPSConfig(D2PruneConfig):
    """D²Prune's options (``d2_sparsegpt`` = D² terms in the ADMM projection; ``blocksize`` unused)
    plus ALPS's, with ALPS's defaults."""

    name = "d2alps"
    rho: float | str = field(default=0.1, metadata=RHO_OPTION)
    admm_iters: int = field(default=300, metadata=ADMM_ITERS_OPTION)
    cg_iters: int = field(default=10, metadata=CG_ITERS_OPTION)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rho(self.rho)
        if self.admm_iters < 1 or self.cg_iters < 0:
            raise UserError(f"ALPS needs admm_iters >= 1 and cg_iters >= 0, got {self.admm_iters}, {self.cg_iters}")

    def chooses_on_heldout(self) -> bool:
        return super().chooses_on_heldout() or self.rho == AUTO

    def heldout_candidates(self, linear_names: list[str]) -> dict[str, MethodConfig]:
        """Every pairing of the un-updated projection's candidates and ρ₀'s, whichever are "auto"."""
        if not self.chooses_on_heldout():
            return {}
        targets = super().heldout_candidates(linear_names) or {"": self}
        return {
            ", ".join(part for part in (target, rho) if part): config
            for target, base in targets.items()
            for rho, config in rho_choices(base).items()
        }

    def validate(self, linear_names: list[str], layer_class: str) -> None:
        super().validate(linear_names, layer_class)
        refuse_auto_rho(self)

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        if name in self.target_layers:
            return D2WandaPruner(name, weight, self)
        return D2ALPSPruner(name, weight, self)
