"""Pruner-Zero: S = |W ⊙ W| ⊙ mms(G), per output row, no weight update (docs/methods.md#pruner-zero)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import d2prune
from conftest import build_tiny_model, make_calibration_ids
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.errors import UserError
from d2prune.methods import METHODS, PrunerZeroConfig
from d2prune.methods.gradients import gradient_norms
from d2prune.methods.pruner_zero import min_max_scale
from d2prune.patterns import Pattern, SparsityTarget


def _pruner(w: torch.Tensor, g: torch.Tensor):
    return PrunerZeroConfig(gradients={"model.layers.0.fc": g}).make_pruner("fc", w, "model.layers.0.fc")


def _config(method, **kw) -> d2prune.PruneConfig:
    return d2prune.PruneConfig(method=method, sparsity=0.5, progress=False, **kw)


def _decoder_linears(model):
    stack = find_decoder_stack(model)
    layers = enumerate(stack.layers)
    return {f"{stack.path}.{i}.{n}": lin for i, layer in layers for n, lin in find_linears(layer).items()}


def test_registered_and_needs_gradients():
    assert METHODS["pruner-zero"] is PrunerZeroConfig
    assert PrunerZeroConfig.needs_gradients


def test_min_max_scale_over_whole_matrix():
    g = torch.tensor([[3.0, 5.0], [1.0, 9.0]])
    torch.testing.assert_close(min_max_scale(g), (g - 1.0) / 8.0)
    assert torch.equal(min_max_scale(torch.full((2, 3), 4.0)), torch.zeros(2, 3))


def test_mask_equals_brute_force_argsort():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=gen)
    g = torch.rand(8, 32, generator=gen) * 5 + 0.5
    out = _pruner(w, g).prune(w, SparsityTarget(0.6), None)
    score = w**2 * (g - g.min()) / (g.max() - g.min())
    k = math.floor(0.6 * 32)
    for r in range(8):
        expected = set(torch.argsort(score[r])[:k].tolist())
        assert set(torch.nonzero(out[r] == 0).flatten().tolist()) == expected
    assert torch.equal(out[out != 0], w[out != 0])  # no weight update


def test_scaling_is_over_the_whole_matrix_not_per_row():
    # Row 0: per-row scaling would give G[0,0] weight 0 and prune it; whole-matrix scaling keeps it.
    w = torch.tensor([[5.0, 1.0], [1.0, 1.0]])
    g = torch.tensor([[10.0, 11.0], [0.0, 11.0]])
    out = _pruner(w, g).prune(w, SparsityTarget(0.5), None)
    assert out[0].tolist() == [5.0, 0.0]
    assert out[1].tolist() == [0.0, 1.0]


def test_nm_groups():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 16, generator=gen)
    g = torch.rand(4, 16, generator=gen)
    out = _pruner(w, g).prune(w, SparsityTarget(0.5, Pattern(2, 4)), None)
    zeros = out.reshape(4, 4, 4) == 0
    assert (zeros.sum(-1) == 2).all()
    score = (w**2 * min_max_scale(g)).reshape(4, 4, 4)
    kept = torch.topk(score, 2, dim=-1).indices
    assert not zeros.gather(-1, kept).any()


def test_missing_or_mismatched_gradients_are_user_errors():
    w = torch.randn(3, 4)
    with pytest.raises(UserError, match="needs gradients"):
        PrunerZeroConfig().make_pruner("fc", w, "a.fc")
    with pytest.raises(UserError, match="no gradients for 'a.fc'"):
        PrunerZeroConfig(gradients={"b.fc": w}).make_pruner("fc", w, "a.fc")
    with pytest.raises(UserError, match="shape"):
        PrunerZeroConfig(gradients={"a.fc": w.t()}).make_pruner("fc", w, "a.fc")


def test_record_holds_no_tensors():
    source = torch.zeros(3, 8, dtype=torch.long)
    method = PrunerZeroConfig(gradients={"a": torch.ones(2)}, gradient_cache="g.safetensors", gradient_source=source)
    record = method.to_dict()
    assert record == {
        "name": "pruner-zero",
        "gradients": "given",
        "gradient_cache": "g.safetensors",
        "gradient_source": "separate token ids 3x8",
    }
    assert PrunerZeroConfig().to_dict()["gradients"] is None
    assert repr(method) == "PrunerZeroConfig(gradient_cache='g.safetensors', gradient_origin=None)"


def test_end_to_end_reaches_exact_per_row_sparsity():
    model = build_tiny_model("llama-gqa")
    ids = make_calibration_ids(6, 16)
    report = d2prune.prune(model, ids, _config("pruner-zero"))
    for path, lin in _decoder_linears(model).items():
        zeros = (lin.weight == 0).sum(dim=1)
        assert (zeros == lin.in_features // 2).all(), path
    record = json.loads(json.dumps(report.to_dict()))
    assert record["config"]["method"]["gradients"] == "computed"


def test_given_gradients_match_computed_and_nm(tmp_path):
    ids = make_calibration_ids(6, 16)
    a, b = build_tiny_model("opt"), build_tiny_model("opt")
    grads = gradient_norms(b, ids, progress=False)
    d2prune.prune(a, ids, _config("pruner-zero", pattern="2:4"))
    d2prune.prune(b, ids, _config(PrunerZeroConfig(gradients=grads), pattern="2:4"))
    for (path, la), lb in zip(_decoder_linears(a).items(), _decoder_linears(b).values()):
        assert torch.equal(la.weight, lb.weight), path
        assert ((la.weight.reshape(la.out_features, -1, 4) == 0).sum(-1) == 2).all(), path


def test_gradient_cache_is_reused_only_for_the_same_calibration(tmp_path, monkeypatch):
    dense = build_tiny_model("llama-gqa")
    ids = make_calibration_ids(6, 16)
    cache = str(tmp_path / "grads.safetensors")
    first = copy.deepcopy(dense)
    d2prune.prune(first, ids, _config(PrunerZeroConfig(gradient_cache=cache)))

    def refuse(*args, **kwargs):
        raise AssertionError("gradients recomputed")

    monkeypatch.setattr("d2prune.methods.gradients.gradient_norms", refuse)
    second = copy.deepcopy(dense)
    report = d2prune.prune(second, ids, _config(PrunerZeroConfig(gradient_cache=cache)))
    assert report.config["method"]["gradients"] == "cache"
    for name, p in first.named_parameters():
        assert torch.equal(p, second.get_parameter(name)), name
    with pytest.raises(AssertionError, match="recomputed"):
        other = make_calibration_ids(6, 16, seed=1)
        d2prune.prune(copy.deepcopy(dense), other, _config(PrunerZeroConfig(gradient_cache=cache)))
