import pytest
import torch

from d2prune.errors import UserError
from d2prune.patterns import Pattern, SparsityTarget, lowest_k_mask, nm_mask, nm_violations, row_mask


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("3:4", 3, 4), ("1:3", 1, 3)])
def test_parse_nm(text, n, m):
    p = Pattern.parse(text)
    assert (p.n, p.m) == (n, m) and p.is_nm and p.sparsity == n / m


def test_parse_unstructured_and_errors():
    assert not Pattern.parse("unstructured").is_nm
    for bad in ["4:4", "5:4", "0:4", "2-4", "x"]:
        with pytest.raises(UserError):
            Pattern.parse(bad)
    with pytest.raises(UserError, match="does not divide"):
        Pattern.parse("2:3").check_width(64, "layer.fc")


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (3, 4), (1, 3)])
def test_nm_mask_exact_per_group(n, m):
    g = torch.Generator().manual_seed(0)
    score = torch.rand(7, 4 * m * 3, generator=g)
    mask = nm_mask(score, n, m)
    groups = mask.reshape(7, -1, m)
    assert (groups.sum(-1) == n).all()
    # The pruned entries of each group are its n lowest scores (brute force).
    sg = score.reshape(7, -1, m)
    for r in range(7):
        for j in range(sg.shape[1]):
            lowest = set(torch.argsort(sg[r, j])[:n].tolist())
            assert set(torch.nonzero(groups[r, j]).flatten().tolist()) == lowest
    w = torch.randn(7, 4 * m * 3)
    w[mask] = 0
    assert nm_violations(w, n, m) == 0
    assert nm_violations(torch.ones(7, 4 * m * 3), n, m) == 7 * 4 * 3


def test_row_mask_exact_count_and_ties():
    score = torch.tensor([[1.0, 1.0, 1.0, 0.5], [3.0, 2.0, 1.0, 0.0]])
    mask = row_mask(score, SparsityTarget(0.5))
    assert mask.sum(1).tolist() == [2, 2]
    # Ties go to the lower index, so the result is deterministic.
    assert mask[0].tolist() == [True, False, False, True]
    assert lowest_k_mask(score, 0).sum() == 0


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_row_mask_sparsity_is_floor(p):
    score = torch.rand(5, 37)
    mask = row_mask(score, SparsityTarget(p))
    assert (mask.sum(1) == int(p * 37)).all()


@pytest.mark.parametrize("shape", [(1, 64), (3, 300), (2, 5, 128), (4, 4)])
def test_lowest_k_mask_selection_equals_the_stable_sort_with_ties(shape):
    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 7, shape, generator=g).float()  # many ties
    score.view(-1)[:: max(1, score.numel() // 9)] = float("inf")
    n = shape[-1]
    for k in (0, 1, n // 3, n // 2, n - 1, n):
        mask = lowest_k_mask(score, k)
        # Brute force: the first k positions of a stable ascending sort of each row.
        flat = score.reshape(-1, n)
        expected = torch.zeros_like(flat, dtype=torch.bool)
        for r, row in enumerate(flat.tolist()):
            for j in sorted(range(n), key=lambda j: (row[j], j))[:k]:
                expected[r, j] = True
        assert torch.equal(mask.reshape(-1, n), expected), (shape, k)
        assert (mask.sum(-1) == k).all()
    with_nan = score.clone()
    with_nan.view(-1)[0] = float("nan")  # sorts last; the sort path handles it
    assert (lowest_k_mask(with_nan, n // 2).sum(-1) == n // 2).all()
