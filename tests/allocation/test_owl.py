import pytest
import torch

import d2prune
from conftest import build_tiny_model, make_calibration_ids
from d2prune.allocation.owl import outlier_ratios, owl_sparsities
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.errors import UserError


@pytest.mark.parametrize(
    "ratios",
    [[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.1, 9.0, 0.2, 0.3, 0.1, 0.2, 0.2, 0.1], [3.0, 3.0, 3.0]],
)
@pytest.mark.parametrize("p,lam", [(0.5, 0.08), (0.7, 0.1), (0.05, 0.08)])
def test_owl_sparsities_mean_p_and_stay_in_band(ratios, p, lam):
    s = torch.tensor(owl_sparsities(ratios, p, lam), dtype=torch.float64)
    assert abs(float(s.mean()) - p) < 1e-6
    assert float(s.min()) >= max(p - lam, 0) - 1e-12 and float(s.max()) <= p + lam + 1e-12
    # More outliers, lower sparsity (ties aside).
    order = torch.argsort(torch.tensor(ratios), stable=True)
    assert all(s[order[i]] >= s[order[i + 1]] - 1e-12 for i in range(len(ratios) - 1))


def test_owl_sparsities_equal_the_paper_mapping_inside_the_band():
    ratios = [1.0, 2.0, 3.0]  # normalised to 0, λ, 2λ: sparsities p+λ, p, p−λ
    assert owl_sparsities(ratios, 0.6, 0.08) == pytest.approx([0.68, 0.6, 0.52], abs=1e-12)
    assert owl_sparsities([2.0, 2.0], 0.6, 0.08) == pytest.approx([0.6, 0.6])


def test_outlier_ratios_match_brute_force_on_dense_activations():
    model = build_tiny_model("llama-gqa", num_hidden_layers=3)
    ids = make_calibration_ids(windows=4, tokens=16)
    got = outlier_ratios(model, [{"input_ids": ids}], 3.0, torch.device("cpu"), progress=False)
    # Brute force: record every linear's input in a dense full-model forward.
    stack = find_decoder_stack(model)
    inputs = {}
    hooks = []
    for i, layer in enumerate(stack.layers):
        for name, lin in find_linears(layer).items():
            hooks.append(lin.register_forward_hook(lambda m, inp, out, k=(i, name): inputs.__setitem__(k, inp[0])))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    expected = []
    for i, layer in enumerate(stack.layers):
        scores = []
        for name, lin in find_linears(layer).items():
            x = inputs[(i, name)].reshape(-1, lin.in_features)
            scores.append((lin.weight.abs() * x.norm(dim=0)).flatten())
        s = torch.cat(scores)
        expected.append(float((s > 3.0 * s.mean()).float().mean()) * 100)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "d2prune"])
def test_pipeline_with_owl_profile_prunes_each_layer_to_its_sparsity(method):
    model = build_tiny_model("llama-gqa", num_hidden_layers=4)
    ids = make_calibration_ids(windows=4, tokens=16)
    cfg = d2prune.PruneConfig(
        method=method, sparsity=0.6, sparsity_profile="owl", owl_lambda=0.1, owl_m=3.0, progress=False
    )
    report = d2prune.prune(model, ids, cfg)
    layer_s = report.layer_sparsities
    assert len(layer_s) == 4 and abs(sum(layer_s) / 4 - 0.6) < 1e-6
    assert all(0.5 - 1e-9 <= s <= 0.7 + 1e-9 for s in layer_s)
    assert len(set(round(s, 6) for s in layer_s)) > 1 and report.outlier_ratios is not None
    for lin in report.linears:
        assert lin.target_sparsity == layer_s[lin.layer]
        assert abs(lin.sparsity - lin.target_sparsity) <= 0.02
    assert report.to_dict()["layer_sparsities"] == layer_s


def test_explicit_layer_sparsities_and_errors():
    model = build_tiny_model("llama-gqa")
    ids = make_calibration_ids(windows=2, tokens=16)
    report = d2prune.prune(model, ids, d2prune.PruneConfig(method="wanda", layer_sparsities=[0.3, 0.7], progress=False))
    q = [lin for lin in report.linears if lin.name.endswith("q_proj")]
    assert [lin.sparsity for lin in q] == [int(0.3 * 64) / 64, int(0.7 * 64) / 64]
    with pytest.raises(UserError, match="2 decoder layers"):
        d2prune.prune(build_tiny_model("llama-gqa"), ids, d2prune.PruneConfig(layer_sparsities=[0.5], progress=False))
    with pytest.raises(UserError):
        d2prune.PruneConfig(sparsity_profile="owl", pattern="2:4")
    with pytest.raises(UserError):
        d2prune.PruneConfig(sparsity_profile="alpha")
