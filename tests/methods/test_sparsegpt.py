import logging

import pytest
import torch

from d2prune.errors import UserError
from d2prune.methods import Gram, SparseGPTConfig
from d2prune.methods.sparsegpt import inverse_hessian_factor, sparsegpt_solve
from d2prune.patterns import Pattern, SparsityTarget, lowest_k_mask, nm_mask


def _problem(rows=4, cols=12, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ torch.randn(
        cols, cols, generator=g, dtype=torch.float64
    )
    h = 2 * x.t() @ x / tokens
    return w, h


def _damped(h, percdamp):
    return h + percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def _sequential_ls_reference(w, h, mask):
    """Brute force: prune columns left to right; at each pruned column solve the exact least squares
    min ‖w' − w‖²_H with earlier columns fixed, the pruned entry 0 and all later columns free."""
    w = w.clone()
    cols = w.shape[1]
    for q in range(cols):
        for r in torch.nonzero(mask[:, q]).flatten().tolist():
            free = list(range(q + 1, cols))
            wq = w[r, q].item()
            if free:
                delta = torch.linalg.solve(h[free][:, free], h[free, q] * wq)
                w[r, free] += delta
            w[r, q] = 0.0
    return w


def test_removing_one_weight_is_the_exact_least_squares_optimum():
    w, h = _problem(rows=1, cols=10)
    q = 3
    fixed = torch.full((1, 10), 5.0, dtype=torch.float64)
    fixed[0, q] = -1.0
    out = sparsegpt_solve(
        w, h, SparsityTarget(1.5 / 10), percdamp=0.01, blocksize=10, score=lambda w1, d, cols: fixed[:, cols]
    ).double()
    hd = _damped(h, 0.01)
    # Closed form: columns < q fixed, w_q = 0, free columns move by H_FF⁻¹ H_Fq w_q.
    free = list(range(q + 1, 10))
    expected = w.clone()
    expected[0, free] += torch.linalg.solve(hd[free][:, free], hd[free, q] * w[0, q])
    expected[0, q] = 0
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # The optimum beats any other correction of the free columns (perturbation check).
    err = lambda v: float((v - w) @ hd @ (v - w).t())
    bumped = out.clone()
    bumped[0, free[0]] += 1e-2
    assert err(out) < err(bumped)


@pytest.mark.parametrize("blocksize", [3, 4, 6, 128])
def test_obs_updates_match_sequential_least_squares_across_blocks(blocksize):
    w, h = _problem(rows=3, cols=12)
    width = min(blocksize, 12)
    score = torch.rand(3, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 1
    # One forced entry per row in each block, so the block-global threshold takes exactly those.
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for b0 in range(0, 12, width):
        for r in range(3):
            mask[r, b0 + (2 * r + b0) % width] = True
    score[mask] = -1
    p = 3.5 / (3 * width)  # floor(p·rows·B) = 3 in every block
    out = sparsegpt_solve(w, h, SparsityTarget(p), 0.01, blocksize, score=lambda w1, d, cols: score[:, cols]).double()
    assert torch.equal(out == 0, mask)
    expected = _sequential_ls_reference(w, _damped(h, 0.01), mask)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_lazy_block_updates_do_not_change_nm_result():
    w, h = _problem(rows=5, cols=32)
    fixed = torch.rand(5, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = SparsityTarget(0.5, Pattern(2, 4))
    results = [sparsegpt_solve(w, h, target, 0.01, bs, score=lambda w1, d, cols: fixed[:, cols]) for bs in (4, 8, 128)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-4, atol=1e-5)
    mask = torch.zeros(5, 32, dtype=torch.bool)
    groups = fixed.reshape(5, 8, 4)
    mask.reshape(5, 8, 4).scatter_(-1, torch.argsort(groups, dim=-1)[..., :2], True)
    expected = _sequential_ls_reference(w, _damped(h, 0.01), mask)
    torch.testing.assert_close(results[0].double(), expected, rtol=1e-4, atol=1e-5)


def test_keeping_all_weights_changes_nothing():
    w, h = _problem()
    w = w.float()
    out = sparsegpt_solve(w, h.float(), SparsityTarget(0.0))
    assert torch.equal(out, w)


def test_unstructured_prunes_exact_count_per_block():
    w, h = _problem(rows=6, cols=40)
    out = sparsegpt_solve(w.float(), h.float(), SparsityTarget(0.55), blocksize=16)
    for b0 in range(0, 40, 16):
        block = out[:, b0 : b0 + 16]
        assert int((block == 0).sum()) == int(0.55 * block.numel())


def test_nm_exact_groups_and_default_score():
    w, h = _problem(rows=6, cols=32)
    out = sparsegpt_solve(w.float(), h.float(), SparsityTarget(0.75, Pattern(3, 4)))
    assert ((out.reshape(6, 8, 4) == 0).sum(-1) == 3).all()


def test_dead_inputs_are_zeroed_and_finite():
    w, h = _problem(rows=3, cols=8)
    h[2, :] = 0
    h[:, 2] = 0
    out = sparsegpt_solve(w.float(), h.float(), SparsityTarget(0.25))
    assert torch.isfinite(out).all() and (out[:, 2] == 0).all()


def test_inverse_hessian_factor_is_upper_cholesky_of_damped_inverse():
    _, h = _problem(cols=9)
    u = inverse_hessian_factor(h, 0.01, "fc")
    assert torch.equal(u, torch.triu(u))
    torch.testing.assert_close(u.t() @ u, torch.linalg.inv(_damped(h, 0.01)), rtol=1e-6, atol=1e-8)


def test_cholesky_failure_retries_with_more_damping(caplog):
    # Mean diagonal 1 with one eigenvalue -0.05: 1% damping fails, 10% succeeds.
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    eig = torch.tensor([-0.05, 1.0, 1.2, 1.0, 1.5, 1.35], dtype=torch.float64)
    h = q @ torch.diag(eig) @ q.t()
    with caplog.at_level(logging.WARNING):
        u = inverse_hessian_factor(h, 0.01, "layers.3.mlp.up_proj")
    assert torch.isfinite(u).all()
    assert any("layers.3.mlp.up_proj" in r.message and "retrying" in r.message for r in caplog.records)


def test_cholesky_failure_after_retries_names_the_layer():
    with pytest.raises(UserError, match="layers.7.self_attn.q_proj"):
        inverse_hessian_factor(-torch.eye(4, dtype=torch.float64), 0.01, "layers.7.self_attn.q_proj")


def test_pruner_uses_gram_hessian():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 8, generator=g)
    xs = [torch.randn(2, 6, 8, generator=g) for _ in range(3)]
    gram = Gram(8, "cpu")
    for x in xs:
        gram.add(x)
    assert gram.nsamples == 6
    flat = torch.cat(xs).reshape(-1, 8)
    torch.testing.assert_close(gram.hessian(), 2 / 6 * flat.t() @ flat, rtol=1e-5, atol=1e-5)
    pruner = SparseGPTConfig().make_pruner("fc", w)
    out = pruner.prune(w, SparsityTarget(0.5), gram)
    torch.testing.assert_close(out, sparsegpt_solve(w, gram.hessian(), SparsityTarget(0.5)))


def test_in_place_factor_is_bit_identical_to_fresh_tensors():
    # The memory-saving path (overwrite / consume) must not change a single bit.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(400, 64, generator=g)
    h = x.t() @ x / 400
    damped = h.clone()
    damped.diagonal().add_(0.01 * torch.mean(torch.diag(h)))
    fresh = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert torch.equal(inverse_hessian_factor(h, 0.01, "fc"), fresh)
    kept = h.clone()
    assert torch.equal(inverse_hessian_factor(kept.clone(), 0.01, "fc", overwrite=True), fresh)
    assert torch.equal(h, kept)  # overwrite=False leaves the input alone
    w = torch.randn(16, 64, generator=g)
    for target in (SparsityTarget(0.6), SparsityTarget(0.5, Pattern(2, 4))):
        copied = sparsegpt_solve(w, h, target)
        assert torch.equal(h, kept)
        assert torch.equal(sparsegpt_solve(w, h.clone(), target, consume_hessian=True), copied)


def test_retry_with_overwrite_restores_the_hessian_before_more_damping():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    h = q @ torch.diag(torch.tensor([-0.05, 1.0, 1.2, 1.0, 1.5, 1.35], dtype=torch.float64)) @ q.t()
    u = inverse_hessian_factor(h.clone(), 0.01, "fc", overwrite=True)
    # 1% failed, so 10% of the mean diagonal was added to the *original* diagonal, once.
    torch.testing.assert_close(u.t() @ u, torch.linalg.inv(_damped(h, 0.1)), rtol=1e-8, atol=1e-10)


def test_gram_hessian_in_row_chunks_equals_whole_conversion():
    gram = Gram(2100, "cpu")  # a 32 MiB float64 chunk holds 1997 rows of 2100: two chunks
    gram.add(torch.randn(3, 40, 2100, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(gram.hessian(), (gram.sum * (2.0 / 3)).float())


@pytest.mark.parametrize("width", [7, 128, 300, 576, 1100])
def test_gram_block_products_equal_the_full_product(width):
    # add() multiplies only the blocks on and above the diagonal; reading the sum mirrors them.
    gram = Gram(width, "cpu")
    expected = torch.zeros(width, width, dtype=torch.float64)
    for seed in range(3):
        x = torch.randn(2, 24, width, generator=torch.Generator().manual_seed(seed))
        gram.add(x)
        flat = x.reshape(-1, width)
        expected += flat.t() @ flat
    torch.testing.assert_close(gram.sum, expected, rtol=1e-12, atol=1e-9)
    assert torch.equal(gram.sum, gram.sum.t()) or width <= 128  # one block: the product itself
    assert gram.nsamples == 6
    stats = gram.statistics()["sum"]
    other = Gram(width, "cpu")
    other.load_statistics({"sum": stats.clone(), "nsamples": torch.tensor([6.0], dtype=torch.float64)})
    assert torch.equal(other.sum, gram.sum)


def test_transposed_solve_matches_the_column_loop_of_the_reference():
    """The solver works on Wᵀ; the textbook loop on W's columns (SparseGPT's code) gives the same weights."""
    g = torch.Generator().manual_seed(4)
    rows, cols = 24, 64
    x = torch.randn(256, cols, generator=g)
    h = 2 * x.t() @ x / 256
    w = torch.randn(rows, cols, generator=g)
    for target in (SparsityTarget(0.6, Pattern.parse("unstructured")), SparsityTarget(0.5, Pattern.parse("2:4"))):
        ours = sparsegpt_solve(w, h, target, blocksize=32)
        u = inverse_hessian_factor(h.clone(), 0.01, "ref")
        ref = w.clone()
        for i1 in range(0, cols, 32):
            w1, q1, err1 = ref[:, i1 : i1 + 32].clone(), torch.zeros(rows, 32), torch.zeros(rows, 32)
            u1, d1 = u[i1 : i1 + 32, i1 : i1 + 32], torch.diag(u[i1 : i1 + 32, i1 : i1 + 32])
            if target.pattern.is_nm:
                mask1 = torch.zeros(rows, 32, dtype=torch.bool)
            else:
                score = (w1**2 / d1**2).reshape(1, -1)
                mask1 = lowest_k_mask(score, target.prune_count(score.numel())).reshape(rows, 32)
            for i in range(32):
                if target.pattern.is_nm and i % 4 == 0:
                    mask1[:, i : i + 4] = nm_mask(w1[:, i : i + 4] ** 2 / d1[i : i + 4] ** 2, 2, 4)
                q = w1[:, i].masked_fill(mask1[:, i], 0.0)
                q1[:, i] = q
                err = (w1[:, i] - q) / d1[i]
                w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
                err1[:, i] = err
            ref[:, i1 : i1 + 32] = q1
            ref[:, i1 + 32 :] -= err1 @ u[i1 : i1 + 32, i1 + 32 :]
        assert torch.equal(ours == 0, ref == 0)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sub", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "3:4"])
def test_sub_blocks_of_the_column_loop_match_sequential_least_squares(monkeypatch, sub, pattern):
    """The per-column loop runs in sub-blocks (later columns of the block updated by one matmul per
    sub-block); any sub-block size gives the textbook sequential OBS result."""
    import d2prune.methods.sparsegpt as sparsegpt

    monkeypatch.setattr(sparsegpt, "SUB_BLOCK", sub)
    w, h = _problem(rows=5, cols=24)
    fixed = torch.rand(5, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if pattern == "unstructured":
        target = SparsityTarget(0.5)
        mask = torch.zeros(5, 24, dtype=torch.bool)
        for b0 in (0, 12):
            block = fixed[:, b0 : b0 + 12].reshape(1, -1)
            mask[:, b0 : b0 + 12] = lowest_k_mask(block, target.prune_count(block.numel())).reshape(5, 12)
    else:
        n, m = map(int, pattern.split(":"))
        target = SparsityTarget(n / m, Pattern(n, m))
        mask = torch.zeros(5, 24, dtype=torch.bool)
        mask.reshape(5, -1, m).scatter_(-1, torch.argsort(fixed.reshape(5, -1, m), dim=-1)[..., :n], True)
    out = sparsegpt_solve(w, h, target, 0.01, 12, score=lambda w1, d, cols: fixed[:, cols]).double()
    assert torch.equal(out == 0, mask)
    torch.testing.assert_close(out, _sequential_ls_reference(w, _damped(h, 0.01), mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [SparseGPTConfig(), "d2prune"])
def test_linears_sharing_a_gram_factor_its_hessian_once(monkeypatch, config):
    """q/k/v (and gate/up) share one Gram: the Cholesky factor of its inverse is computed once, and
    each linear's result is bit-identical to a solve of its own."""
    import d2prune.methods.sparsegpt as sparsegpt
    from d2prune.methods import D2PruneConfig

    if config == "d2prune":
        config = D2PruneConfig(target_layers=[])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 24, generator=g)
    gram = Gram(24, "cpu")
    gram.add(x)
    weights = [torch.randn(rows, 24, generator=g) for rows in (12, 6, 6)]
    calls, real = [], sparsegpt.inverse_hessian_factor
    monkeypatch.setattr(sparsegpt, "inverse_hessian_factor", lambda *a, **k: calls.append(1) or real(*a, **k))
    target = SparsityTarget(0.5)
    shared = []
    for i, w in enumerate(weights):
        pruner = config.make_pruner(f"lin{i}", w)
        pruner.observe(x, x @ w.t())
        shared.append(pruner.prune(w, target, gram))
    assert len(calls) == 1
    for i, w in enumerate(weights):
        alone = Gram(24, "cpu")
        alone.add(x)
        pruner = config.make_pruner(f"lin{i}", w)
        pruner.observe(x, x @ w.t())
        assert torch.equal(pruner.prune(w, target, alone), shared[i])
    assert len(calls) == 1 + len(weights)
