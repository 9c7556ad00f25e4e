"""DSnoT (Zhang et al., ICLR 2024): training-free prune-and-regrow refinement of a base mask (docs/methods.md).

Any registered method (``base``, default Wanda) prunes the linear first; DSnoT then swaps pruned and
kept weights, one pair per row and cycle, to drive each row's expected output error towards 0:

    e_i = Σ_j (W_ij − W'_ij)·s_j,   s_j = (1/N) Σ_k Σ_t x_{k,t,j}

with W the dense weight, W' the current pruned one and s_j the per-sample token sum of input j
averaged over the N calibration samples (the reference's ``sum_metric_row``, i.e. seqlen·E[x_j]; that
scale is what its ``update_threshold`` = 0.1 is measured in). For a base without weight update this
is DSnoT's Σ_{j pruned} W_ij·s_j (docs/methods.md#dsnot).

Per cycle, in rows still updating (vectorised over rows):
  * regrow the pruned weight with the largest sign(e_i)·W_ij·s_j / Var[x_j]^γ among those whose
    contribution has the sign of e_i (regrowing it moves e_i towards 0);
  * prune the kept weight with the lowest Wanda score |W'_ij|·‖X_j‖ among those whose contribution
    has the opposite sign (pruning it also moves e_i towards 0); N:M: within the regrown weight's
    M-group, so every group keeps its zero count;
  * accept while |e_i| > ``update_threshold`` and e_i keeps its initial sign; a row stops at its
    first rejected swap or after ``max_cycles`` cycles. So |e_i| decreases strictly at every swap,
    and each row keeps exactly its number of zeros.

Weights: DSnoT performs no weight update. Kept weights keep the base's values (its OBS update for
SparseGPT/D²Prune), regrown weights take their dense values, newly pruned ones become 0. (The
reference uses a SparseGPT *score* without the update, so there all weights are dense values; the
two agree for bases without update.)

Differences from the reference (github.com/zyxxmu/DSnoT, ``prune_DSnoT``), all edge cases: its
candidate lists run past the weights of the right sign (it can then "regrow" a kept weight, changing
the sparsity, or prune a weight that increases |e_i|); here such candidates end the row's loop. In
N:M, a regrow candidate whose group has no kept weight of the right sign is passed over (the cycle
is spent) instead of pruning one of the wrong sign. Var[x_j] is the variance over all calibration
tokens (the reference pools per-batch variances, which depends on batching).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from d2prune.errors import UserError
from d2prune.methods.base import (
    Gram,
    LinearPruner,
    MethodConfig,
    Statistic,
    count_tensor,
    method_config,
    option,
    register,
)
from d2prune.methods.wanda import InputNormStats
from d2prune.patterns import SparsityTarget

# Linears left as the base pruned them, by default the MLP ones (the reference's skip_layer=mlp):
# "mlp" names the MLP block of LLaMA-like, GPT-NeoX and Phi-3 layers, fc1/fc2 OPT's MLP linears.
DEFAULT_SKIP = ("mlp", "fc1", "fc2")


class MeanVarStats(Statistic):
    """Per-input sums of x and x² over all calibration tokens (float64), with token and sample counts."""

    def __init__(self, cols: int, device: torch.device | str):
        self.sum = torch.zeros(cols, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(cols, dtype=torch.float64, device=device)
        self.ntokens = 0
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float().reshape(-1, x.shape[-2], x.shape[-1])  # (samples, tokens, cols)
        flat = x.reshape(-1, x.shape[-1]).double()  # float32 values and their squares are exact in float64
        self.sum += flat.sum(dim=0)
        self.sq_sum += flat.pow(2).sum(dim=0)
        self.ntokens += flat.shape[0]
        self.nsamples += x.shape[0]

    def token_sum(self) -> torch.Tensor:
        """s_j: the per-sample sum of x_j over tokens, averaged over samples (float64)."""
        return self.sum / max(self.nsamples, 1)

    def variance(self) -> torch.Tensor:
        """Var[x_j] over all tokens, E[x²] − E[x]² (float64, clamped at 0 against rounding)."""
        n = max(self.ntokens, 1)
        mean = self.sum / n
        return (self.sq_sum / n - mean.pow(2)).clamp_min(0)

    def statistics(self) -> dict[str, torch.Tensor]:
        device = self.sum.device
        return {
            "sum": self.sum,
            "sq_sum": self.sq_sum,
            "ntokens": count_tensor(self.ntokens, device),
            "nsamples": count_tensor(self.nsamples, device),
        }

    def load_statistics(self, sums: dict[str, torch.Tensor]) -> None:
        self.sum, self.sq_sum = sums["sum"], sums["sq_sum"]
        self.ntokens, self.nsamples = int(sums["ntokens"].item()), int(sums["nsamples"].item())


def expected_row_error(dense: torch.Tensor, pruned: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e_i = Σ_j (W_ij − W'_ij)·s_j per row, in float64."""
    return (dense.double() - pruned.double()) @ s.double()


def dsnot_refine(
    dense: torch.Tensor,
    pruned: torch.Tensor,
    s: torch.Tensor,
    var: torch.Tensor,
    sq_norm: torch.Tensor,
    target: SparsityTarget,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Refine the mask of ``pruned`` (zeros = pruned) against ``dense``; returns a new float32 weight.

    ``s``: per-input token sums (see module docstring), ``var``: Var[x_j], ``sq_norm``: Wanda's ‖X_j‖².
    """
    dense, out = dense.float(), pruned.float().clone()
    rows, cols = out.shape
    mask = out == 0  # True = pruned
    s32 = s.float()
    gain = dense * s32  # change of e_i when a pruned weight is regrown (its dense value): −gain
    loss = out * s32  # change of e_i when a kept weight is pruned: +loss (0 for pruned weights)
    e0 = expected_row_error(dense, out, s)
    sign = torch.sign(e0)
    steps = min(max_cycles, cols)
    if steps <= 0:
        return out
    # Regrow candidates: pruned weights whose contribution has e_i's sign, best first by
    # contribution / Var^γ (a zero variance is clamped, so a constant input ranks first, not NaN).
    denom = var.double().clamp_min(1e-12).pow(gamma).float().clamp(torch.finfo(torch.float32).tiny)
    signed = gain * sign.float().unsqueeze(1)
    regrow_ok = mask & (signed > 0)
    key = torch.where(regrow_ok, signed / denom.unsqueeze(0), float("-inf"))
    r_idx = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :steps]
    r_ok = regrow_ok.gather(1, r_idx)
    del key, signed
    # Prune candidates: kept weights whose contribution has the opposite sign, lowest Wanda first.
    prune_ok = ~mask & (loss * sign.float().unsqueeze(1) < 0)
    wanda = out.abs() * sq_norm.float().sqrt().unsqueeze(0)
    rows_idx = torch.arange(rows, device=out.device)
    if target.pattern.is_nm:
        regrown, pruned_now = _nm_swaps(
            e0, sign, r_idx, r_ok, gain, loss, prune_ok, wanda, target.pattern.m, update_threshold
        )
    else:
        score = torch.where(prune_ok, wanda, float("inf"))
        p_idx = torch.sort(score, dim=1, stable=True).indices[:, :steps]
        p_ok = prune_ok.gather(1, p_idx)
        del score
        # Each row's swaps are fixed in advance (the next candidate of each list), so its errors
        # after t swaps are a cumulative sum and the accepted swaps are the leading run of valid ones.
        valid = r_ok & p_ok
        delta = torch.where(valid, loss.gather(1, p_idx).double() - gain.gather(1, r_idx).double(), 0.0)
        after = e0.unsqueeze(1) + delta.cumsum(dim=1)
        before = after - delta
        ok = valid & (before.abs() > update_threshold) & (torch.sign(after) == sign.unsqueeze(1))
        accepted = ok.int().cumprod(dim=1).bool()
        rr = rows_idx.unsqueeze(1).expand_as(accepted)[accepted]
        regrown, pruned_now = (rr, r_idx[accepted]), (rr, p_idx[accepted])
    out[regrown] = dense[regrown]
    out[pruned_now] = 0
    return out


def _nm_swaps(e0, sign, r_idx, r_ok, gain, loss, prune_ok, wanda, m, threshold):
    """N:M swaps, one cycle per regrow candidate: the pruned partner is the lowest-Wanda kept weight
    of the right sign in the same M-group (it depends on earlier swaps in that group, hence a loop)."""
    rows = e0.shape[0]
    rows_idx = torch.arange(rows, device=e0.device)
    e = e0.clone()
    active = sign != 0
    prune_ok = prune_ok.clone()
    offsets = torch.arange(m, device=e0.device)
    reg_r, reg_c, pr_r, pr_c = [], [], [], []
    for t in range(r_idx.shape[1]):
        j = r_idx[:, t]
        group = (j - j % m).unsqueeze(1) + offsets  # (rows, m)
        cand = prune_ok.gather(1, group)
        p = torch.where(cand, wanda.gather(1, group), float("inf")).argmin(dim=1)
        has_partner = cand.gather(1, p.unsqueeze(1)).squeeze(1)
        p = group.gather(1, p.unsqueeze(1)).squeeze(1)
        after = e + loss[rows_idx, p].double() - gain[rows_idx, j].double()
        # Out of regrow candidates, at or below the threshold, or a sign flip: the row stops.
        active &= r_ok[:, t] & (e.abs() > threshold) & ~(has_partner & (torch.sign(after) != sign))
        swap = active & has_partner  # no partner in the group: this candidate is passed over
        if not bool(active.any()):
            break
        e = torch.where(swap, after, e)
        prune_ok[rows_idx[swap], p[swap]] = False
        reg_r.append(rows_idx[swap]), reg_c.append(j[swap]), pr_r.append(rows_idx[swap]), pr_c.append(p[swap])
    empty = torch.zeros(0, dtype=torch.long, device=e0.device)
    cat = lambda parts: torch.cat(parts) if parts else empty  # noqa: E731
    return (cat(reg_r), cat(reg_c)), (cat(pr_r), cat(pr_c))


class DSnoTPruner(LinearPruner):
    """Wraps the base method's pruner: both observe the inputs; the base's mask is then refined."""

    def __init__(self, name: str, weight: torch.Tensor, base: LinearPruner, config: DSnoTConfig):
        super().__init__(name, weight)
        self.base = base
        self.config = config
        # Follow the base: the engine gives it a Gram, and reports its weight update.
        self.needs_gram = base.needs_gram  # type: ignore[misc]
        self.updates_weights = base.updates_weights  # type: ignore[misc]
        self.moments = MeanVarStats(self.cols, self.device)
        self.norms = InputNormStats(self.cols, self.device)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.base.observe(x, y)
        self.moments.add(x)
        self.norms.add(x)

    def prune(self, weight: torch.Tensor, target: SparsityTarget, gram: Gram | None) -> torch.Tensor:
        pruned = self.base.prune(weight, target, gram)
        c = self.config
        return dsnot_refine(
            weight,
            pruned,
            self.moments.token_sum(),
            self.moments.variance(),
            self.norms.sq_norm,
            target,
            c.max_cycles,
            c.update_threshold,
            c.gamma,
        )

    # Data-parallel statistics: ours plus the base pruner's, under a "base." prefix.

    def begin(self, first_sample: int) -> None:
        super().begin(first_sample)
        self.base.begin(first_sample)

    def statistics(self) -> dict[str, torch.Tensor]:
        own = super().statistics()
        return {**own, **{f"base.{k}": t for k, t in self.base.statistics().items()}}

    def load_statistics(self, sums: dict[str, torch.Tensor]) -> None:
        super().load_statistics({k: t for k, t in sums.items() if not k.startswith("base.")})
        self.base.load_statistics({k[5:]: t for k, t in sums.items() if k.startswith("base.")})

    def work(self) -> int:
        return self.base.work()


def skipped(name: str, patterns: list[str]) -> bool:
    """Whether a pattern is the linear's full name or one of its dot-separated parts."""
    parts = {name, *name.split(".")}
    return any(p in parts for p in patterns)


OPTIONS_GROUP = "DSnoT options"


def _skip_option(values: list[str]) -> list[str]:
    return [] if [v.lower() for v in values] == ["none"] else values


@register
@dataclass
class DSnoTConfig(MethodConfig):
    """``base``: the method whose mask is refined (a registry name or a config); ``skip``: linears
    left as the base pruned them, by full name or a dot-separated part of it (default: MLP linears;
    [] refines every linear)."""

    name = "dsnot"
    base: Any = field(
        default="wanda",
        metadata=option(
            "--dsnot-base",
            group=OPTIONS_GROUP,
            method_name=True,
            help="method whose mask DSnoT refines, with its own options from the flags here (default wanda)",
        ),
    )
    max_cycles: int = field(
        default=50,
        metadata=option("--dsnot-cycles", help="at most this many swaps per row (default 50)", group=OPTIONS_GROUP),
    )
    update_threshold: float = field(
        default=0.1,
        metadata=option(
            "--dsnot-threshold",
            help="stop a row once its |expected error| is at most this (default 0.1)",
            group=OPTIONS_GROUP,
        ),
    )
    gamma: float = field(
        default=1.0,
        metadata=option(
            "--dsnot-gamma", help="variance exponent of the regrow ranking (default 1)", group=OPTIONS_GROUP
        ),
    )
    skip: list[str] = field(
        default_factory=lambda: list(DEFAULT_SKIP),
        metadata=option(
            "--dsnot-skip",
            nargs="+",
            parse=_skip_option,
            group=OPTIONS_GROUP,
            help="linears left as the base pruned them, by name or a dot part of it "
            "(default: mlp fc1 fc2, the MLP linears; 'none' for none)",
        ),
    )

    def __post_init__(self) -> None:
        self.base = method_config(self.base)
        if isinstance(self.base, DSnoTConfig):
            raise UserError("dsnot cannot refine its own mask: choose another base method (e.g. wanda)")
        if self.base.needs_gradients:
            raise UserError(f"dsnot cannot wrap {self.base.name}, which needs a full-model gradient pass")
        if isinstance(self.max_cycles, bool) or int(self.max_cycles) != self.max_cycles or self.max_cycles < 0:
            raise UserError(f"dsnot max_cycles must be a whole number ≥ 0, got {self.max_cycles}")
        self.max_cycles = int(self.max_cycles)
        if not self.update_threshold >= 0:
            raise UserError(f"dsnot update_threshold must be ≥ 0, got {self.update_threshold}")
        if not self.gamma >= 0:
            raise UserError(f"dsnot gamma (variance exponent) must be ≥ 0, got {self.gamma}")
        self.skip = [str(p) for p in self.skip]

    def resolve(self, model_info: dict[str, Any]) -> DSnoTConfig:
        base = self.base.resolve(model_info)
        return self if base is self.base else dataclasses.replace(self, base=base)

    def prepare(
        self,
        model: torch.nn.Module,
        batches: list[dict[str, torch.Tensor]],
        device: torch.device,
        progress: bool,
        dtype: torch.dtype | None = None,
    ) -> DSnoTConfig:
        base = self.base.prepare(model, batches, device, progress, dtype)
        return self if base is self.base else dataclasses.replace(self, base=base)

    def validate(self, linear_names: list[str], layer_class: str) -> None:
        self.base.validate(linear_names, layer_class)
        # The defaults cover several architectures at once, so only user-given names must match.
        unknown = [p for p in self.skip if p not in DEFAULT_SKIP and not any(skipped(n, [p]) for n in linear_names)]
        if unknown:
            raise UserError(
                f"dsnot skip {unknown[0]!r} matches no linear of {layer_class}; its linears are: {', '.join(linear_names)}"
            )

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        base = self.base.make_pruner(name, weight, path)
        return base if skipped(name, self.skip) else DSnoTPruner(name, weight, base, self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": self.base.to_dict(),
            "max_cycles": self.max_cycles,
            "update_threshold": self.update_threshold,
            "gamma": self.gamma,
            "skip": list(self.skip),
        }
