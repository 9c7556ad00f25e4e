"""NaN/inf checks of the layer walk: the tensor or layer named, finite inputs untouched."""

from __future__ import annotations

import pytest
import torch

import d2prune
from conftest import build_tiny_model, make_calibration_ids
from d2prune.engine.finite import _CHUNK_WINDOWS, check_activations, check_layer_weights, half_precision_hint
from d2prune.errors import UserError
from d2prune.methods import method_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_activation_check_finds_one_bad_value_in_any_chunk(dtype, bad):
    acts = torch.randn(2 * _CHUNK_WINDOWS + 3, 5, 8).to(dtype)
    check_activations(acts, "x", "y")  # finite: nothing raised
    for window in (0, _CHUNK_WINDOWS + 1, acts.shape[0] - 1):
        broken = acts.clone()
        broken[window, 4, 7] = bad
        with pytest.raises(UserError, match=r"^the outputs hold NaN/inf because$"):
            check_activations(broken, "the outputs", "because")


def test_weight_check_names_the_parameter_and_hints_at_float16():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    check_layer_weights(layer, "model.layers.3")
    with torch.no_grad():
        layer[1].bias[2] = float("nan")
    with pytest.raises(UserError, match=r"^model\.layers\.3\.1\.bias holds NaN/inf values: the checkpoint is damaged"):
        check_layer_weights(layer, "model.layers.3")
    half = torch.nn.Linear(4, 4).half()
    with torch.no_grad():
        half.weight[0, 0] = 1e5  # beyond float16's 65504: inf
    with pytest.raises(UserError, match="exceeds the float16 range"):
        check_layer_weights(half, "m")
    assert "--compute-dtype float32" in half_precision_hint(torch.bfloat16, torch.float32)
    assert "--compute-dtype" not in half_precision_hint(None, torch.float32)


def _prune(model, method="sparsegpt"):
    config = d2prune.PruneConfig(method=method_config(method), sparsity=0.5, progress=False)
    return d2prune.prune(model, make_calibration_ids(), config)


def test_walk_names_a_nan_weight_of_a_later_layer_instead_of_a_hessian_error():
    model = build_tiny_model("llama-gqa")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(UserError, match=r"^model\.layers\.1\.mlp\.up_proj\.weight holds NaN/inf values"):
        _prune(model)


def test_walk_names_non_finite_layer_0_inputs():
    model = build_tiny_model("llama-gqa")
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("inf"))
    with pytest.raises(UserError, match=r"^the inputs of decoder layer 0 hold NaN/inf \(the weights before"):
        _prune(model)


def test_walk_names_the_layer_whose_pruned_outputs_overflow():
    model = build_tiny_model("llama-gqa")
    with torch.no_grad():  # finite weights whose products overflow float32
        model.model.layers[0].post_attention_layernorm.weight.fill_(100.0)
        model.model.layers[0].mlp.down_proj.weight.fill_(3e38)
    with pytest.raises(UserError, match=r"^the outputs of decoder layer 0 hold NaN/inf after pruning"):
        _prune(model, "magnitude")
