import torch

from d2prune.methods import WandaConfig
from d2prune.patterns import Pattern, SparsityTarget


def _observe(pruner, xs):
    for x in xs:
        pruner.observe(x, torch.zeros(x.shape[0], x.shape[1], pruner.rows))


def test_wanda_statistic_is_mean_squared_norm_over_samples():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 12, generator=g)
    xs = [torch.randn(b, 7, 12, generator=g) for b in (1, 3, 2)]
    pruner = WandaConfig().make_pruner("fc", w)
    _observe(pruner, xs)
    samples = torch.cat(xs)  # (N, T, c)
    expected = (samples.norm(dim=1) ** 2).mean(0)
    torch.testing.assert_close(pruner.stats.sq_norm, expected, rtol=1e-5, atol=0)


def test_wanda_mask_equals_brute_force_argsort():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 32, generator=g)
    xs = [torch.randn(4, 10, 32, generator=g) * torch.rand(32, generator=g) * 3]
    pruner = WandaConfig().make_pruner("fc", w)
    _observe(pruner, xs)
    out = pruner.prune(w, SparsityTarget(0.6), None)
    x_all = torch.cat(xs).reshape(-1, 32)
    score = w.abs() * x_all.norm(dim=0)  # |W|·‖X_j‖₂ over all calibration tokens
    k = int(0.6 * 32)
    for r in range(8):
        pruned = set(torch.argsort(score[r])[:k].tolist())
        assert set(torch.nonzero(out[r] == 0).flatten().tolist()) == pruned
        assert (out[r] != 0).sum() == 32 - k
    # Kept weights are unchanged: Wanda has no update.
    assert torch.equal(out[out != 0], w[out != 0])


def test_wanda_nm_groups():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 16, generator=g)
    pruner = WandaConfig().make_pruner("fc", w)
    _observe(pruner, [torch.randn(2, 5, 16, generator=g)])
    out = pruner.prune(w, SparsityTarget(0.75, Pattern(3, 4)), None)
    assert ((out.reshape(4, 4, 4) == 0).sum(-1) == 3).all()
    score = (w.abs() * pruner.stats.sq_norm.sqrt()).reshape(4, 4, 4)
    kept = torch.argmax(score, dim=-1)
    assert (out.reshape(4, 4, 4).gather(-1, kept.unsqueeze(-1)) != 0).all()
