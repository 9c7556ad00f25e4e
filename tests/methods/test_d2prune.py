import math

import pytest
import torch

from d2prune.errors import UserError
from d2prune.methods import D2PruneConfig, Gram, SparseGPTConfig
from d2prune.methods.d2prune import D2SparseGPTPruner, D2WandaPruner
from d2prune.methods.sparsegpt import inverse_hessian_factor
from d2prune.patterns import Pattern, SparsityTarget

S = 7.0


def _data(rows=6, cols=16, tokens=9, batches=(1, 3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    xs = [torch.randn(b, tokens, cols, generator=g) * (1 + torch.rand(cols, generator=g)) for b in batches]
    ys = [x @ w.t() + 0.3 for x in xs]  # with a bias, as OPT's outputs include it
    return w, xs, ys


def _observe(pruner, xs, ys):
    for x, y in zip(xs, ys):
        pruner.observe(x, y)


def _per_sample_norms(xs, ys):
    x = torch.cat(xs)  # (N, T, c)
    y = torch.cat(ys)
    return x.norm(dim=1), y.norm(dim=1)  # (N, c), (N, r)


@pytest.mark.parametrize("branch", ["wanda", "sparsegpt"])
def test_mean_mode_statistics_are_true_means(branch):
    w, xs, ys = _data()
    cfg = D2PruneConfig(s=S, target_layers=["fc"] if branch == "wanda" else [])
    pruner = cfg.make_pruner("fc", w)
    _observe(pruner, xs, ys)
    xn, yn = _per_sample_norms(xs, ys)
    torch.testing.assert_close(pruner.norms.y, yn.mean(0) / S, rtol=1e-5, atol=0)
    torch.testing.assert_close(pruner.norms.dx, xn.mean(0) / S, rtol=1e-5, atol=0)


def test_reference_mode_statistics_follow_the_index_weighted_closed_forms():
    w, xs, ys = _data()
    xn, yn = _per_sample_norms(xs, ys)
    n = xn.shape[0]
    k = torch.arange(1, n + 1, dtype=torch.float32).unsqueeze(1)

    upd = D2PruneConfig(s=S, target_layers=[], stats_mode="reference").make_pruner("fc", w)
    _observe(upd, xs, ys)
    assert isinstance(upd, D2SparseGPTPruner)
    # reference mode (docs/methods.md#stats-mode): y_i = (1/(N s)) Σ k‖Y_k,i‖ ; dx_j = (1/(N s)) Σ sqrt(2k)‖X_k,j‖ (sqrt(2/k)-scaled inputs).
    torch.testing.assert_close(upd.norms.y, (k * yn).sum(0) / (n * S), rtol=1e-5, atol=0)
    torch.testing.assert_close(upd.norms.dx, (torch.sqrt(2 * k) * xn).sum(0) / (n * S), rtol=1e-5, atol=0)

    nou = D2PruneConfig(s=S, target_layers=["fc"], stats_mode="reference").make_pruner("fc", w)
    _observe(nou, xs, ys)
    assert isinstance(nou, D2WandaPruner)
    torch.testing.assert_close(nou.norms.y, (k * yn).sum(0) / (n * S), rtol=1e-5, atol=0)
    torch.testing.assert_close(nou.norms.dx, (k * xn).sum(0) / (n * S), rtol=1e-5, atol=0)
    torch.testing.assert_close(nou.sq_norm.sq_norm, (xn**2).mean(0), rtol=1e-5, atol=0)


def test_reference_mode_is_sequential_per_sample_recurrence():
    """The exact float recurrence of the reference code, sample by sample, batch = 1."""
    w, xs, ys = _data(batches=(4,))
    pruner = D2PruneConfig(s=S, target_layers=[], stats_mode="reference").make_pruner("fc", w)
    _observe(pruner, xs, ys)
    y = torch.zeros(6)
    dx = torch.zeros(16)
    for kk, (x, out) in enumerate(zip(xs[0], ys[0]), start=1):
        y *= (kk - 1) / kk
        dx *= (kk - 1) / kk
        x = math.sqrt(2 / kk) * x.float()
        y += torch.norm(out, p=2, dim=0) / S
        dx += torch.norm(x, p=2, dim=0) / S
    assert torch.equal(pruner.norms.y, y) and torch.equal(pruner.norms.dx, dx)


@pytest.mark.parametrize("mode", ["mean", "reference"])
@pytest.mark.parametrize("r1,r2,e", [(1.0, 0.0, 1.0), (0.5, 0.3, 1.0), (1.0, 0.0, 0.0)])
def test_wanda_branch_score_and_mask_match_formula(mode, r1, r2, e):
    w, xs, ys = _data()
    cfg = D2PruneConfig(s=S, r1=r1, r2=r2, target_layers=["fc"], stats_mode=mode, wanda_x_exponent=e)
    pruner = cfg.make_pruner("fc", w)
    _observe(pruner, xs, ys)
    sr, y, dx = pruner.sq_norm.sq_norm, pruner.norms.y, pruner.norms.dx
    expected = w**2 * sr + r1 * y[:, None] * w.abs() * dx[None, :] ** e - r2 * w**2 * dx[None, :] ** 2
    torch.testing.assert_close(pruner.score(w), expected, rtol=1e-6, atol=1e-7)
    out = pruner.prune(w, SparsityTarget(0.5), None)
    k = 8
    for r in range(6):
        assert set(torch.nonzero(out[r] == 0).flatten().tolist()) == set(torch.argsort(expected[r])[:k].tolist())
    assert torch.equal(out[out != 0], w[out != 0])  # no weight update
    # With the extra terms off, the branch is squared Wanda.
    plain = D2PruneConfig(s=S, target_layers=["fc"], stats_mode=mode, d2_wanda=False).make_pruner("fc", w)
    _observe(plain, xs, ys)
    torch.testing.assert_close(plain.score(w), w**2 * sr)


@pytest.mark.parametrize("mode", ["mean", "reference"])
def test_sparsegpt_branch_score_matches_formula_and_picks_first_block_mask(mode):
    w, xs, ys = _data(cols=16)
    cfg = D2PruneConfig(s=S, r1=1.0, r2=0.2, target_layers=[], stats_mode=mode)
    pruner = cfg.make_pruner("fc", w)
    _observe(pruner, xs, ys)
    gram = Gram(16, "cpu")
    for x in xs:
        gram.add(x)
    u = inverse_hessian_factor(gram.hessian(), 0.01, "fc")
    d = torch.diag(u)
    y, dx = pruner.norms.y, pruner.norms.dx
    expected = w**2 / d[None, :] ** 2 + 1.0 * y[:, None] * w.abs() * dx[None, :] - 0.2 * w**2 * dx[None, :] ** 2
    torch.testing.assert_close(pruner.score(w, d, slice(0, 16)), expected, rtol=1e-5, atol=1e-6)
    # One block covering all columns: the mask is the block-global lowest ⌊p·r·c⌋ of that score.
    out = pruner.prune(w, SparsityTarget(0.5), gram)
    chosen = set(torch.argsort(expected.flatten())[:48].tolist())
    assert set(torch.nonzero((out == 0).flatten()).flatten().tolist()) == chosen


def test_sparsegpt_branch_without_extra_terms_is_sparsegpt():
    w, xs, ys = _data(cols=32)
    gram = Gram(32, "cpu")
    for x in xs:
        gram.add(x)
    for target in (SparsityTarget(0.6), SparsityTarget(0.5, Pattern(2, 4))):
        ref = SparseGPTConfig().make_pruner("fc", w).prune(w, target, gram)
        for cfg in (D2PruneConfig(target_layers=[], d2_sparsegpt=False), D2PruneConfig(target_layers=[], r1=0.0)):
            p = cfg.make_pruner("fc", w)
            _observe(p, xs, ys)
            assert torch.equal(p.prune(w, target, gram), ref)


def test_extra_terms_change_the_mask_when_large():
    w, xs, ys = _data(cols=32)
    gram = Gram(32, "cpu")
    for x in xs:
        gram.add(x)
    masks = []
    for s in (1e6, 1e-3):
        p = D2PruneConfig(s=s, target_layers=[]).make_pruner("fc", w)
        _observe(p, xs, ys)
        masks.append(p.prune(w, SparsityTarget(0.5), gram) == 0)
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("mode", ["mean", "reference"])
def test_statistics_do_not_depend_on_batching(mode):
    w, xs, ys = _data(batches=(6,))
    split_x, split_y = list(xs[0].split(2)), list(ys[0].split(2))
    a = D2PruneConfig(s=S, target_layers=["fc"], stats_mode=mode).make_pruner("fc", w)
    b = D2PruneConfig(s=S, target_layers=["fc"], stats_mode=mode).make_pruner("fc", w)
    _observe(a, xs, ys)
    _observe(b, split_x, split_y)
    torch.testing.assert_close(a.norms.y, b.norms.y, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.norms.dx, b.norms.dx, rtol=1e-6, atol=0)


def test_config_validation_and_auto_s():
    with pytest.raises(UserError, match="stats_mode"):
        D2PruneConfig(stats_mode="exact")
    with pytest.raises(UserError):
        D2PruneConfig(s=0)
    with pytest.raises(UserError, match="self_attn.x_proj"):
        D2PruneConfig(target_layers=["self_attn.x_proj"]).validate(["self_attn.q_proj"], "LlamaDecoderLayer")
    cfg = D2PruneConfig(auto_s=True).resolve({"max_position_embeddings": 4096})
    assert cfg.s == 4096.0 and not cfg.auto_s
    with pytest.raises(UserError):
        D2PruneConfig(auto_s=True).resolve({})
    assert D2PruneConfig().to_dict()["name"] == "d2prune"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_norms_are_l2_norms_over_the_token_axis(dtype):
    from d2prune.methods.d2prune import token_norms

    x = torch.randn(3, 50, 7, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected = torch.linalg.vector_norm(x.double(), dim=1)
    got = token_norms(x)
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
