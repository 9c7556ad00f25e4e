"""Exact least squares on a fixed support: the weights a mask deserves (docs/methods.md#least-squares).

For one linear with dense weight W (rows × cols) and damped Hessian H (cols × cols), a mask with
support S_i in each row i asks for

    Ŵ = argmin Σ_i (w_i − ŵ_i) H (w_i − ŵ_i)ᵀ   subject to ŵ_ij = 0 for j ∉ S_i,

which splits into one small system per row, H[S_i, S_i] ŵ_i,S = (w_i H)_S. Every row has its own
support, so instead of factorising one matrix per row we run conjugate gradients on all rows at
once: each iteration is a single (rows × cols) @ (cols × cols) product, masked. A Jacobi (diagonal)
preconditioner and a warm start (the method's own weights) make a few tens of iterations enough.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def damp_hessian(hessian: torch.Tensor, percdamp: float, inplace: bool = False) -> torch.Tensor:
    """``hessian`` with dead inputs (zero diagonal) set to 1 and ``percdamp`` · mean diagonal added to
    the diagonal, as SparseGPT damps it; a new tensor unless ``inplace``."""
    h = hessian if inplace else hessian.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1
    diag.add_(percdamp * diag.mean())
    return h


@dataclass
class CGResult:
    weight: torch.Tensor
    iterations: int
    residual: float  # max over rows of ‖r_i‖ / ‖b_i‖ at the end


def masked_pcg(
    target: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor,
    start: torch.Tensor | None = None,
    max_iters: int = 100,
    tol: float = 1e-6,
) -> CGResult:
    """Minimise Σ_i (t_i − x_i) H (t_i − x_i)ᵀ over x supported on ``keep`` by batched Jacobi-PCG.

    ``target``: the dense weights t (rows × cols); ``hessian``: a symmetric positive definite H (its
    dtype is the working dtype); ``keep``: bool mask of the support; ``start``: warm start (its
    values off the support are ignored). Each row stops once its relative residual is ≤ ``tol``;
    the solve ends when all have, or after ``max_iters`` iterations. Entries off the support are
    exactly 0 in the result.
    """
    dtype = hessian.dtype
    keep_f = keep.to(dtype)
    b = (target.to(dtype) @ hessian) * keep_f
    x = (start if start is not None else target).to(dtype) * keep_f
    inv_diag = 1.0 / hessian.diagonal()
    r = b - (x @ hessian) * keep_f
    b_norm = b.norm(dim=1).clamp_min(torch.finfo(dtype).tiny)
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(dim=1)
    iterations = 0
    rel = r.norm(dim=1) / b_norm
    residual = float(rel.max()) if r.numel() else 0.0
    while iterations < max_iters and residual > tol:
        ap = (p @ hessian) * keep_f
        pap = (p * ap).sum(dim=1)
        # Rows already within ``tol`` take no more steps: in float32 their tiny residuals are mostly
        # rounding, and stepping on them only adds noise while the slowest row converges.
        step = (rel > tol) & (pap > 0)
        alpha = torch.where(step, rz / pap.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(rz))
        x.add_(alpha.unsqueeze(1) * p)
        r.sub_(alpha.unsqueeze(1) * ap)
        z = r * inv_diag
        rz_new = (r * z).sum(dim=1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(rz))
        p = z + beta.unsqueeze(1) * p
        rz = rz_new
        iterations += 1
        rel = torch.where(step, r.norm(dim=1) / b_norm, rel)
        residual = float(rel.max())
    return CGResult(x * keep_f, iterations, residual)


def row_errors(target: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """(t_i − w_i) H (t_i − w_i)ᵀ for every row i, in ``hessian``'s dtype."""
    delta = (target - weight).to(hessian.dtype)
    return ((delta @ hessian) * delta).sum(dim=1)


def reconstruction_error(target: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((T − W) H (T − W)ᵀ) / tr(T H Tᵀ): the relative output error of ``weight`` under H."""
    t = target.to(hessian.dtype)
    den = float(((t @ hessian) * t).sum())
    return float(row_errors(target, weight, hessian).sum()) / den if den > 0 else 0.0


def nonzero_in(values: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` rounded to ``dtype`` (as float32), with kept entries that are 0 or subnormal there
    set to the smallest normal number of ``dtype`` (same sign), so storing them in ``dtype`` keeps
    the zero pattern (some kernels flush subnormals to zero). In float32 and bfloat16 that number is
    1.2e-38; in float16 6.1e-5."""
    out = values.to(dtype).float()
    tiny = torch.finfo(dtype).tiny
    fill = torch.where(values < 0, -tiny, tiny).to(out.dtype)
    return torch.where(keep & (out.abs() < tiny), fill, out)


def refit_on_support(
    dense: torch.Tensor,
    pruned: torch.Tensor,
    hessian: torch.Tensor,
    percdamp: float = 0.01,
    max_iters: int = 100,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.float32,
    consume_hessian: bool = False,
) -> torch.Tensor:
    """The optimal weights for the zero pattern of ``pruned`` (float32, same zeros), warm-started
    from ``pruned``; no row worse than ``pruned``'s under the undamped ``hessian``.

    ``dtype``: the dtype the result will be stored in. The values returned are exactly
    representable in it and no kept weight is 0 or subnormal there, so the mask survives, and
    the row-by-row comparison with ``pruned`` is made on the rounded values of both.
    ``consume_hessian``: damp ``hessian`` in place (its contents are lost) instead of copying it,
    so one c×c matrix is alive instead of two.

    The solve uses the damped Hessian (so a rank-deficient H still has one answer); the undamped
    comparison guards the rare case where damping's optimum is worse on the true objective. The
    objective splits over rows, so each row keeps the better of the two.
    """
    keep = pruned != 0
    undamped_diag = hessian.diagonal().clone()
    h = damp_hessian(hessian, percdamp, inplace=consume_hessian)
    # H_damped − H is diagonal: the undamped row errors are the damped ones minus Σ_j δ_j² d_j.
    added = h.diagonal() - undamped_diag
    del undamped_diag
    refit = masked_pcg(dense, h, keep, start=pruned, max_iters=max_iters, tol=tol).weight
    refit = nonzero_in(refit, keep, dtype)
    before = pruned.to(dtype).float()  # what would be stored without the refit

    def undamped(weight: torch.Tensor) -> torch.Tensor:
        delta = (dense - weight).to(h.dtype)
        return ((delta @ h) * delta).sum(dim=1) - (delta.pow(2) * added).sum(dim=1)

    better = undamped(refit) <= undamped(before)
    return torch.where(better.unsqueeze(1), refit, before)
