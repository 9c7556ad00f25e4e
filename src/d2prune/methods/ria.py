"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play"): relative importance times activations (docs/methods.md).

Score ``S_ij = (|W_ij| / Σ_i' |W_i'j| + |W_ij| / Σ_j' |W_ij'|) · ‖X_j‖₂^a``: each weight's share of its
input column plus its share of its output row, times the input-channel norm (Wanda's statistic) to
the power ``a``. No weight update. The comparison group is the whole matrix (``group="linear"``, one
threshold) or each output row (``group="row"``); N:M drops the N lowest of every M-group of a row.

With ``permute`` and an N:M pattern, a linear whose input columns the engine may permute (its input
is an elementwise function of other linears' outputs, e.g. ``mlp.down_proj``; see ``channels.py``)
gets RIA's channel permutation: columns are ranked by their score sum and dealt over the M slots of
the groups in zig-zag order, optionally refined per slot by a linear-sum assignment (scipy), and N:M
is chosen on the permuted matrix. The engine then stores the permuted order physically.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from d2prune.errors import UserError
from d2prune.methods.base import Gram, LinearPruner, MethodConfig, option, register
from d2prune.methods.wanda import InputNormStats
from d2prune.patterns import SparsityTarget, lowest_k_mask, nm_mask, row_mask

GROUPS = ("linear", "row")
# Groups per linear-sum-assignment problem: the score matrix costs blocks·B²·rows·M, so large linears
# are refined in blocks of consecutive groups (as RIA's "fast" mode does).
LSA_BLOCK = 64
LSA_ROWS = 512


def ria_score(weight: torch.Tensor, sq_norm: torch.Tensor, a: float) -> torch.Tensor:
    """RIA's score of every weight (float32) from ``sq_norm`` = mean ‖X_j‖² per input column."""
    w = weight.float().abs()
    col = w.sum(dim=0, keepdim=True)  # Σ_i' |W_i'j|: one per input column
    row = w.sum(dim=1, keepdim=True)  # Σ_j' |W_ij'|: one per output row
    # A dead column or row (all zeros) has |W_ij| = 0 in every entry: its term is 0, not 0/0 = NaN.
    rel = w / torch.where(col > 0, col, torch.ones_like(col)) + w / torch.where(row > 0, row, torch.ones_like(row))
    return rel * sq_norm.float().sqrt().pow(a).unsqueeze(0)


def retained_nm_score(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per M-group (all rows summed) score kept by N:M, shape (cols // m,): the M−N largest of each row."""
    rows, cols = score.shape
    grouped = score.reshape(rows, cols // m, m).sort(dim=-1).values
    return grouped[..., n:].sum(dim=(0, 2))


def zigzag_permutation(score: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's heuristic channel reallocation: ``perm`` with the permuted matrix ``score[:, perm]``.

    Columns sorted by ascending score sum are cut into M equal runs; run s fills slot s of the groups
    in order for even s and in reverse for odd s, so every group mixes weak and strong columns.
    """
    cols = score.shape[1]
    order = torch.sort(score.sum(dim=0), stable=True).indices
    perm = torch.empty_like(order)
    per = cols // m
    for s in range(m):
        run = order[s * per : (s + 1) * per]
        perm[s::m] = run.flip(0) if s % 2 else run
    return perm


def lsa_refine(score: torch.Tensor, perm: torch.Tensor, n: int, m: int, block: int = LSA_BLOCK) -> torch.Tensor:
    """One linear-sum-assignment pass per slot: reassign the columns in slot s among the groups of a
    block to maximise the total retained N:M score, the other M−1 columns of each group fixed."""
    from scipy.optimize import linear_sum_assignment

    perm = perm.clone()
    groups = score.shape[1] // m
    for s in range(m):
        others = [t for t in range(m) if t != s]
        for g0 in range(0, groups, block):
            g = torch.arange(g0, min(g0 + block, groups))
            cand = score[:, perm[g * m + s]]  # (rows, B): slot-s column of each group
            rest = score[:, perm[(g * m).unsqueeze(1) + torch.tensor(others)]]  # (rows, B, M-1)
            # value[i, j]: retained score of group j with its slot-s column replaced by group i's
            value = torch.zeros(len(g), len(g), dtype=torch.float64, device=score.device)
            for r0 in range(0, score.shape[0], LSA_ROWS):  # row chunks bound the (rows, B, B, M) temporary
                c, r = cand[r0 : r0 + LSA_ROWS], rest[r0 : r0 + LSA_ROWS]
                trial = torch.cat(
                    [c[:, :, None, None].expand(-1, -1, len(g), 1), r[:, None].expand(-1, len(g), -1, -1)], dim=3
                )  # (rows, B_i, B_j, M)
                value += trial.sort(dim=-1).values[..., n:].sum(dim=(0, 3)).double()
            rows_i, cols_j = linear_sum_assignment(value.cpu().numpy(), maximize=True)
            moved = perm[g * m + s].clone()
            new = moved.clone()
            new[torch.as_tensor(cols_j)] = moved[torch.as_tensor(rows_i)]
            # Keep the assignment only if it does not lower the total (ties: keep the current one).
            if value[torch.as_tensor(rows_i), torch.as_tensor(cols_j)].sum() > value.diagonal().sum():
                perm[g * m + s] = new
    return perm


def have_scipy() -> bool:
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return False
    return True


class RIAPruner(LinearPruner):
    def __init__(self, name: str, weight: torch.Tensor, config: RIAConfig):
        super().__init__(name, weight)
        self.config = config
        self.may_permute_inputs = config.permute
        self.stats = InputNormStats(self.cols, self.device)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.stats.add(x)

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        return ria_score(weight, self.stats.sq_norm, self.config.a)

    def prune(self, weight: torch.Tensor, target: SparsityTarget, gram: Gram | None) -> torch.Tensor:
        w = weight.float().clone()
        score = self.score(w)
        pattern = target.pattern
        if pattern.is_nm:
            if self.config.permute and self.inputs_permutable:
                perm = self.choose_permutation(score, pattern.n, pattern.m)
                if perm is not None:
                    mask = torch.empty_like(score, dtype=torch.bool)
                    mask[:, perm] = nm_mask(score[:, perm], pattern.n, pattern.m)
                    self.input_permutation = perm
                    w[mask] = 0
                    return w
            mask = nm_mask(score, pattern.n, pattern.m)
        elif self.config.group == "row":
            mask = row_mask(score, target)
        else:
            # One threshold over the whole matrix: exactly ⌊p·rows·cols⌋ zeros (ties: lower flat index).
            mask = lowest_k_mask(score.reshape(1, -1), target.prune_count(score.numel())).reshape(score.shape)
        w[mask] = 0
        return w

    def choose_permutation(self, score: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
        """The input-column permutation to prune N:M under, or None when it would keep less score
        than the stored order (the heuristic is not guaranteed to help; RIA applies it regardless)."""
        perm = zigzag_permutation(score, m)
        if self.config.lsa:
            if have_scipy():
                perm = lsa_refine(score, perm, n, m)
            else:
                warnings.warn(
                    "ria: scipy is not installed, so the channel permutation skips its "
                    "linear-sum-assignment refinement (zig-zag heuristic only)",
                    stacklevel=2,
                )
        kept = retained_nm_score(score[:, perm], n, m).double().sum()
        if kept <= retained_nm_score(score, n, m).double().sum():
            return None
        return perm


OPTIONS_GROUP = "RIA options"


@register
@dataclass
class RIAConfig(MethodConfig):
    """``a``: exponent of ‖X_j‖₂; ``group``: "linear" (one threshold per matrix) or "row";
    ``permute``: channel permutation for N:M where exact; ``lsa``: refine it by linear-sum assignment
    (needs scipy; skipped without it)."""

    name = "ria"

    a: float = field(
        default=0.5,
        metadata=option(
            "--ria-a", help="exponent a of the activation norm ‖X_j‖₂^a (default 0.5)", group=OPTIONS_GROUP
        ),
    )
    group: str = field(
        default="linear",
        metadata=option(
            "--ria-group",
            help="comparison group: linear (one threshold per matrix, default) or row",
            group=OPTIONS_GROUP,
        ),
    )
    permute: bool = field(
        default=False,
        metadata=option(
            "--ria-permute",
            help="N:M channel permutation where exact (MLP down/fc2 inputs, with their producers)",
            group=OPTIONS_GROUP,
        ),
    )
    # No command-line option: the linear-sum-assignment refinement is always on there.
    lsa: bool = field(default=True, metadata={"help": "refine the permutation by linear-sum assignment"})

    def __post_init__(self) -> None:
        self.group = str(self.group).strip().lower()
        if self.group not in GROUPS:
            raise UserError(f"ria: unknown group {self.group!r}: use 'linear' or 'row'")
        try:
            self.a = float(self.a)
        except (TypeError, ValueError):
            raise UserError(f"ria: the activation exponent a must be a number, got {self.a!r}") from None
        if not (self.a == self.a and abs(self.a) != float("inf")):
            raise UserError(f"ria: the activation exponent a must be finite, got {self.a}")
        if self.a < 0:
            raise UserError(f"ria: the activation exponent a must be ≥ 0, got {self.a}")

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        return RIAPruner(name, weight, self)
