"""SparseGPT (Frantar & Alistarh, ICML 2023): OBS mask + weight update per 128-column block (docs/methods.md#sparsegpt).

The solver takes an optional block score so D²Prune's update branch can reuse it with its own mask
score; the OBS update itself is the same for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from d2prune.errors import UserError
from d2prune.methods.base import Gram, LinearPruner, MethodConfig, derived, option, register
from d2prune.patterns import SparsityTarget, lowest_k_mask, nm_mask

log = logging.getLogger(__name__)

# score(W1, d, cols) -> scores of the block W1 (rows × len(cols)); d = diag of U on those columns.
BlockScore = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]

CHOLESKY_RETRIES = 3
SUB_BLOCK = 16  # columns per inner step of the OBS loop (see sparsegpt_solve)


def obs_score(w1: torch.Tensor, d: torch.Tensor, cols: slice) -> torch.Tensor:
    """SparseGPT's saliency w²/[U_jj]² (U the upper Cholesky factor of H⁻¹)."""
    return w1.pow(2) / d.pow(2).unsqueeze(0)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, name: str, overwrite: bool = False) -> torch.Tensor:
    """Upper Cholesky factor U of the damped H⁻¹ (H⁻¹ = UᵀU), retrying with 10× damping.

    ``overwrite=True`` lets it use ``hessian``'s memory (its contents are lost): then at most two
    c×c matrices are alive at once, which is what bounds the peak memory on wide linears.
    """
    mean_diag = torch.mean(torch.diag(hessian))
    h = hessian if overwrite else hessian.clone()
    diag = h.diagonal().clone()  # damping only touches the diagonal, so a retry restores just it
    damp = percdamp
    for attempt in range(CHOLESKY_RETRIES + 1):
        h.diagonal().copy_(diag).add_(damp * mean_diag)
        factor, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            # H⁻¹ and its factor overwrite the first factor in place (bit-identical to fresh
            # tensors), so h and one factor are the only c×c matrices alive.
            torch.cholesky_inverse(factor, out=factor)
            torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
            if info == 0:
                return factor
        if attempt < CHOLESKY_RETRIES:
            log.warning("%s: Cholesky failed with damping %.3g; retrying with %.3g", name, damp, damp * 10)
            damp *= 10
    raise UserError(
        f"{name}: the Hessian is not positive definite even with damping {damp:g}; "
        "use more calibration samples or a larger --percdamp"
    )


def obs_factor(hessian: torch.Tensor, percdamp: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead) of a float32 Hessian, which it overwrites: U the upper Cholesky factor of the damped
    H⁻¹, ``dead`` the inputs that never fired (H_jj = 0; their weights are pruned for free)."""
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    return inverse_hessian_factor(hessian, percdamp, name, overwrite=True), dead


def shared_obs_factor(gram: Gram, percdamp: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`obs_factor` of ``gram``'s Hessian, computed once for the linears that share the Gram
    (q/k/v, gate/up; every candidate of a held-out search) and kept in its cache."""
    return derived(gram, ("obs_factor", percdamp), lambda: obs_factor(gram.hessian(), percdamp, name))


def sparsegpt_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    target: SparsityTarget,
    percdamp: float = 0.01,
    blocksize: int = 128,
    score: BlockScore = obs_score,
    name: str = "linear",
    consume_hessian: bool = False,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Prune ``weight`` (rows × cols) with the OBS update; returns a new float32 tensor.

    ``consume_hessian=True`` lets the solver overwrite a float32 ``hessian`` instead of copying it
    (pruners pass a fresh one), which halves the c×c memory of the widest linear. ``factor``:
    :func:`obs_factor` of the Hessian, computed already (``hessian`` is then not read).

    Unstructured: per block, exactly ⌊p·rows·B⌋ lowest-score entries are pruned (the upstream
    ``<= threshold`` prunes one more; we don't copy that). N:M: at each group start the ``n``
    lowest scores per row among the group's *current* (already updated) weights are pruned.
    """
    # Worked on transposed (cols × rows): a column of W is then a contiguous row, and the
    # per-column steps below run ~1.5× faster than on strided columns (benchmarks/README.md#speed).
    wt = weight.float().t().contiguous()
    if factor is None:
        h = hessian.float()
        if h is hessian and not consume_hessian:
            h = h.clone()
        factor = obs_factor(h, percdamp, name)
    u, dead = factor
    cols, rows = wt.shape
    wt[dead] = 0

    pattern = target.pattern
    m = pattern.m if pattern.is_nm else 1
    if pattern.is_nm:
        # Groups must not straddle blocks, so the block is a multiple of M.
        blocksize = max(m, blocksize - blocksize % m)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = wt[i1:i2].clone()  # the block's columns, one per row
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diag(u1)

        if pattern.is_nm:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            block_score = score(w1.t(), d1, slice(i1, i2)).reshape(1, -1)
            k = target.prune_count(block_score.numel())
            mask1 = lowest_k_mask(block_score, k).reshape(rows, count).t().contiguous()
        # 1/U_ii where pruned, 0 where kept: the error of column i is w_i · scale_i (w − q = w on
        # the pruned entries, 0 on the kept ones).
        inv_d = d1.reciprocal().unsqueeze(1)
        scale = mask1 * inv_d
        u_cols = u1.unsqueeze(2)
        # Sub-blocks of SUB_BLOCK columns: column i's error updates the rest of its sub-block at
        # once (two fused ops per column), and the later columns of the block get the sub-block's
        # errors in one matmul, the lazy batch update one level down. The per-column updates then
        # touch SUB_BLOCK columns instead of up to the whole block: ~3x less solve time.
        sub = max(m, SUB_BLOCK - SUB_BLOCK % m)  # N:M groups must not straddle sub-blocks
        for s1 in range(0, count, sub):
            s2 = min(s1 + sub, count)
            for i in range(s1, s2):
                if pattern.is_nm and i % m == 0:
                    group_score = score(w1[i : i + m].t(), d1[i : i + m], slice(i1 + i, i1 + i + m))
                    mask1[i : i + m] = nm_mask(group_score, pattern.n, m).t()
                    scale[i : i + m] = mask1[i : i + m] * inv_d[i : i + m]
                err = torch.mul(w1[i], scale[i], out=err1[i])
                w1[i:s2].addcmul_(u_cols[i, i:s2], err.unsqueeze(0), value=-1.0)
            if s2 < count:
                w1[s2:] -= u1[s1:s2, s2:].t() @ err1[s1:s2]

        # The kept weights of column i are final after step i (their error is 0); zero the pruned.
        wt[i1:i2] = w1.masked_fill_(mask1, 0.0)
        # Lazy batch update: later blocks get this block's error in one matmul.
        wt[i2:] -= u[i1:i2, i2:].t() @ err1
    return wt.t().contiguous()


class SparseGPTPruner(LinearPruner):
    needs_gram = True
    updates_weights = True

    def __init__(self, name: str, weight: torch.Tensor, config: SparseGPTConfig):
        super().__init__(name, weight)
        self.config = config

    def prune(self, weight: torch.Tensor, target: SparsityTarget, gram: Gram | None) -> torch.Tensor:
        assert gram is not None
        c = self.config
        factor = shared_obs_factor(gram, c.percdamp, self.name)
        return sparsegpt_solve(weight, None, target, c.percdamp, c.blocksize, name=self.name, factor=factor)


# Shared by the methods that damp a Hessian or solve it in column blocks (one flag each).
OPTIONS_GROUP = "D²Prune / SparseGPT options"
PERCDAMP_OPTION = option(
    "--percdamp", help="Hessian damping, fraction of mean diag (default 0.01)", group=OPTIONS_GROUP
)
BLOCKSIZE_OPTION = option("--blocksize", help="SparseGPT column block (default 128)", group=OPTIONS_GROUP)


@register
@dataclass
class SparseGPTConfig(MethodConfig):
    name = "sparsegpt"
    percdamp: float = field(default=0.01, metadata=PERCDAMP_OPTION)
    blocksize: int = field(default=128, metadata=BLOCKSIZE_OPTION)

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        return SparseGPTPruner(name, weight, self)
