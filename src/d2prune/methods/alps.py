"""ALPS (Meng et al., NeurIPS 2024): ADMM on the exact layer reconstruction, then PCG on the support.

Per linear, with H the damped Hessian and W the dense weight, ALPS solves

    min_Ŵ  tr((W − Ŵ) H (W − Ŵ)ᵀ)   subject to Ŵ in the sparsity set

(one budget of ⌊p·rows·cols⌋ zeros over the whole matrix, or N zeros in every group of M inputs).
Columns are rescaled so H has a unit diagonal (|W̃| is then Wanda's score). ADMM splits Ŵ into a
dense iterate B and a sparse copy D with scaled dual V:

    B ← (W̃G̃ − V + ρD)(G̃ + ρI)⁻¹     (one eigendecomposition G̃ = QΛQᵀ serves every ρ)
    D ← projection of B + V/ρ onto the sparsity set
    V ← V + ρ(B − D)

ρ rises as the support settles (schedule below, as in the authors' code); at the end the support of
D is fixed and the weights on it are solved exactly by preconditioned CG (``least_squares``).
Linears that share an input (q/k/v, gate/up) share the Gram and with it the eigendecomposition.

See docs/methods.md (ALPS) for the derivation in our words and where we differ from the code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from d2prune.errors import UserError
from d2prune.methods.base import AUTO, Gram, LinearPruner, MethodConfig, derived, option, register
from d2prune.methods.least_squares import damp_hessian, masked_pcg, nonzero_in
from d2prune.methods.sparsegpt import PERCDAMP_OPTION
from d2prune.patterns import SparsityTarget

# score(Z̃, norm) -> selection score of every entry of Z̃ (normalised space; larger is kept).
SupportScore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def magnitude_score(z: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """ALPS's own projection: the largest |Z̃| (= |Z|·sqrt(H_jj), Wanda's score) are kept."""
    return z.pow(2)


@dataclass
class NormalizedGram:
    """H damped, rescaled to a unit diagonal, and its eigendecomposition (shared by the linears
    that read the same input)."""

    g: torch.Tensor  # G̃ = S⁻¹ (H + λI) S⁻¹
    norm: torch.Tensor  # S = sqrt(diag(H + λI))
    eigvals: torch.Tensor
    eigvecs: torch.Tensor
    dead: torch.Tensor  # inputs that never fired (H_jj = 0)

    def inverse(self, rho: float) -> torch.Tensor:
        """(G̃ + ρI)⁻¹ from the eigendecomposition."""
        q = self.eigvecs
        return (q * (1.0 / (self.eigvals + rho)).unsqueeze(0)) @ q.t()


def normalized_gram(gram: Gram, percdamp: float) -> NormalizedGram:
    """The normalised, damped Hessian of ``gram``, computed once per Gram and percdamp."""
    return derived(gram, ("alps", percdamp), lambda: _normalized(gram.hessian(), percdamp))


def _normalized(h: torch.Tensor, percdamp: float) -> NormalizedGram:
    dead = h.diagonal() == 0
    damp_hessian(h, percdamp, inplace=True)
    norm = h.diagonal().sqrt()
    h.div_(norm.unsqueeze(0)).div_(norm.unsqueeze(1))
    # float64 eigendecomposition (as the authors do): float32 loses the small eigenvalues that
    # matter most once ρ is small.
    vals, vecs = torch.linalg.eigh(h.double())
    return NormalizedGram(h, norm, vals.float(), vecs.float(), dead)


def project(z: torch.Tensor, score: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    """Keep mask: the highest scores, ``prune_count`` zeros over the whole matrix (unstructured)
    or N zeros per group of M consecutive inputs in every row. Ties: the lower index is kept."""
    rows, cols = z.shape
    pattern = target.pattern
    if pattern.is_nm:
        grouped = score.reshape(rows, cols // pattern.m, pattern.m)
        idx = torch.sort(grouped, dim=-1, stable=True, descending=True).indices[..., : pattern.m - pattern.n]
        keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, idx, True)
        return keep.reshape(rows, cols)
    flat = score.reshape(-1)
    keep_count = flat.numel() - target.prune_count(flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if keep_count > 0:
        keep[torch.topk(flat, keep_count, sorted=False).indices] = True
    return keep.reshape(rows, cols)


@dataclass
class ADMMTrace:
    iterations: int
    rho: float
    support_changes: list[int]


def alps_solve(
    weight: torch.Tensor,
    ngram: NormalizedGram,
    target: SparsityTarget,
    rho: float = 0.1,
    max_iters: int = 300,
    update_every: int = 3,
    switch_iter: int = 30,
    cg_iters: int = 10,
    score: SupportScore = magnitude_score,
    trace: list[ADMMTrace] | None = None,
) -> torch.Tensor:
    """ALPS on one linear: returns the pruned weight (float32, same shape)."""
    w = weight.float().clone()
    w[:, ngram.dead] = 0
    norm, g = ngram.norm, ngram.g
    w_n = w * norm.unsqueeze(0)  # W̃
    wg = w_n @ g  # W̃G̃: the dense layer's outputs against the inputs
    rows, cols = w.shape
    pattern = target.pattern
    kept = (
        rows * cols * (pattern.m - pattern.n) // pattern.m
        if pattern.is_nm
        else rows * cols - target.prune_count(rows * cols)
    )
    keep_total = max(kept, 1)  # support changes are counted relative to it

    b = w_n.clone()
    keep = project(b, score(b, norm), target)
    d = b * keep
    d_init = d.clone()
    v = torch.zeros_like(b)
    inverse = ngram.inverse(rho)
    keep_prev = keep
    rho_started = False
    changes: list[int] = []
    it = 0
    for it in range(1, max_iters + 1):
        b = (wg - v + rho * d) @ inverse
        z = b + v / rho
        keep = project(z, score(z, norm), target)
        d = z * keep
        v.add_(rho * (b - d))
        if it % update_every:
            continue
        change = int((keep != keep_prev).sum())
        changes.append(change)
        keep_prev = keep
        frac = change / keep_total
        if frac > 0.1:
            rho, rho_started = rho * 1.3, True
        elif frac > 0.005:
            rho, rho_started = rho * 1.2, True
        elif change > 0:
            if rho_started:
                rho *= 1.1
            else:
                # ρ too large from the start (the support froze before it moved): restart lower.
                rho /= 5
                b, d, v = w_n.clone(), d_init.clone(), torch.zeros_like(b)
        elif rho_started:
            break
        else:
            rho /= 5
        rho = min(rho, 1e6)
        inverse = ngram.inverse(rho)
        if it >= switch_iter and frac < 0.0003:
            break
    # The support of the last projection of B itself, then the exact weights on it.
    keep = project(b, score(b, norm), target)
    out = masked_pcg(w_n, g, keep, start=b * keep, max_iters=cg_iters, tol=0.0).weight
    if trace is not None:
        trace.append(ADMMTrace(it, rho, changes))
    # Stored in the weight's dtype, no kept weight may round to 0 (the mask must survive).
    return nonzero_in(out / norm.unsqueeze(0), keep, weight.dtype)


class ALPSPruner(LinearPruner):
    needs_gram = True
    updates_weights = True

    def __init__(self, name: str, weight: torch.Tensor, config: ALPSConfig):
        super().__init__(name, weight)
        self.config = config

    def support_score(self) -> SupportScore:
        return magnitude_score

    def prune(self, weight: torch.Tensor, target: SparsityTarget, gram: Gram | None) -> torch.Tensor:
        assert gram is not None
        c = self.config
        ngram = normalized_gram(gram, c.percdamp)
        return alps_solve(
            weight, ngram, target, rho=c.rho, max_iters=c.admm_iters, cg_iters=c.cg_iters, score=self.support_score()
        )

    def work(self) -> int:
        # ~2 (rows × cols × cols) products per ADMM iteration, like an OBS update many times over.
        return self.rows * self.cols * self.cols * 8


# ``rho`` = AUTO: the initial ADMM penalty is chosen on held-out data among RHO_CANDIDATES.
# The authors' 0.1 and a factor of three either side: the schedule then moves ρ by factors of 1.1-5.
RHO_CANDIDATES = (0.03, 0.1, 0.3)


def _rho_option(value: str) -> float | str:
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--alps-rho must be a positive number or 'auto', got {value!r}") from None


def check_rho(rho: float | str) -> None:
    """A UserError unless ``rho`` is a positive number or "auto"."""
    if rho != AUTO and not (isinstance(rho, (int, float)) and rho > 0):
        raise UserError(f"ALPS's initial rho must be positive or 'auto', got {rho!r}")


def rho_choices(config: MethodConfig) -> dict[str, MethodConfig]:
    """``config`` once per candidate ρ₀ when its ``rho`` is "auto" (labelled ``rho=…``), else as it is (label "")."""
    if config.rho != AUTO:
        return {"": config}
    return {f"rho={r:g}": dataclasses.replace(config, rho=r) for r in RHO_CANDIDATES}


def refuse_auto_rho(config: MethodConfig) -> None:
    if config.rho == AUTO:
        raise UserError(
            "rho 'auto' is chosen on held-out data: prune through d2prune.selection.choose_on_heldout "
            "(or the command line's --alps-rho auto)"
        )


# Shared with D²-ALPS (one flag each).
OPTIONS_GROUP = "ALPS options (alps, d2alps)"
RHO_OPTION = option(
    "--alps-rho",
    help=f"initial ADMM penalty rho (default 0.1; 'auto': the best of {', '.join(map(str, RHO_CANDIDATES))} on held-out data)",
    group=OPTIONS_GROUP,
    parse=_rho_option,
    heldout={"value": AUTO, "choice": "ALPS's initial rho", "for": "ALPS methods"},
)
ADMM_ITERS_OPTION = option("--alps-iters", help="at most this many ADMM iterations (default 300)", group=OPTIONS_GROUP)
CG_ITERS_OPTION = option(
    "--alps-cg-iters", help="PCG iterations on the final support (default 10)", group=OPTIONS_GROUP
)


@register
@dataclass
class ALPSConfig(MethodConfig):
    """ALPS with the authors' defaults: ρ₀ 0.1, ≤ 300 ADMM iterations, 10 PCG steps, 1% damping."""

    name = "alps"
    rho: float | str = field(default=0.1, metadata=RHO_OPTION)
    admm_iters: int = field(default=300, metadata=ADMM_ITERS_OPTION)
    cg_iters: int = field(default=10, metadata=CG_ITERS_OPTION)
    percdamp: float = field(default=0.01, metadata=PERCDAMP_OPTION)

    def __post_init__(self) -> None:
        check_rho(self.rho)
        if self.admm_iters < 1 or self.cg_iters < 0:
            raise UserError(f"ALPS needs admm_iters >= 1 and cg_iters >= 0, got {self.admm_iters}, {self.cg_iters}")

    def chooses_on_heldout(self) -> bool:
        return self.rho == AUTO

    def heldout_candidates(self, linear_names: list[str]) -> dict[str, MethodConfig]:
        return rho_choices(self) if self.rho == AUTO else {}

    def validate(self, linear_names: list[str], layer_class: str) -> None:
        refuse_auto_rho(self)

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        return ALPSPruner(name, weight, self)
