import torch

from d2prune.methods import MagnitudeConfig
from d2prune.patterns import Pattern, SparsityTarget


def test_magnitude_drops_smallest_abs_per_row():
    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    pruner = MagnitudeConfig().make_pruner("fc", w)
    out = pruner.prune(w, SparsityTarget(0.4), None)
    for r in range(6):
        order = torch.argsort(w[r].abs(), stable=True)
        assert (out[r, order[:8]] == 0).all()
        assert torch.equal(out[r, order[8:]], w[r, order[8:]])


def test_magnitude_nm():
    w = torch.randn(4, 16)
    out = MagnitudeConfig().make_pruner("fc", w).prune(w, SparsityTarget(0.5, Pattern(2, 4)), None)
    groups_w, groups_o = w.abs().reshape(4, 4, 4), out.reshape(4, 4, 4)
    for r in range(4):
        for g in range(4):
            kept = torch.argsort(groups_w[r, g])[2:]
            assert (groups_o[r, g] != 0).sum() == 2 and (groups_o[r, g, kept] != 0).all()
