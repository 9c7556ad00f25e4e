"""The gradient pass for gradient-based metrics (d2prune.methods.gradients): G = sqrt(Σ_k (100·∂L_k/∂W)²)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny_model, make_calibration_ids
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.errors import UserError
from d2prune.methods import PrunerZeroConfig
from d2prune.methods.gradients import (
    attach_gradients,
    cached_gradient_key,
    gradient_cache_key,
    gradient_norms,
    load_gradients,
    plan_gradient_pass,
    save_gradients,
)


def _linear_paths(model) -> list[str]:
    stack = find_decoder_stack(model)
    return [f"{stack.path}.{i}.{n}" for i, layer in enumerate(stack.layers) for n in find_linears(layer)]


def _brute_force(model, ids: torch.Tensor, path: str, scale: float = 100.0) -> torch.Tensor:
    weight = model.get_submodule(path).weight
    total = torch.zeros(weight.shape, dtype=torch.float64)
    with torch.enable_grad():
        for k in range(ids.shape[0]):
            window = ids[k : k + 1]
            (g,) = torch.autograd.grad(model(input_ids=window, labels=window).loss, weight)
            total += (scale * g.double()) ** 2
    return total.sqrt().float()


def _assert_same_g(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=rtol * float(a[k].abs().max()))


@pytest.mark.parametrize("layerwise", [False, True])
def test_pass_leaves_weights_flags_and_modes_untouched(layerwise):
    model = build_tiny_model("llama-gqa")
    model.train()
    model.model.layers[1].eval()  # a mixed train/eval state must come back exactly
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = copy.deepcopy(model)
    gradient_norms(model, make_calibration_ids(4, 16), progress=False, layerwise=layerwise)
    after_params = dict(model.named_parameters())
    for name, p in before.named_parameters():
        assert torch.equal(after_params[name], p), name
        assert after_params[name].requires_grad == p.requires_grad, name
        assert after_params[name].grad is None, name
    for (name, m), (_, m0) in zip(model.named_modules(), before.named_modules()):
        assert m.training == m0.training, name
    for name, b in before.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], b), name


def test_g_equals_brute_force_per_window():
    model = build_tiny_model("llama-gqa")
    ids = make_calibration_ids(5, 16, seed=1)
    grads = gradient_norms(model, ids, progress=False)
    assert list(grads) == _linear_paths(model)
    for path, g in grads.items():
        assert g.dtype == torch.float32 and g.device.type == "cpu"
        assert g.shape == model.get_submodule(path).weight.shape
    for path in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        torch.testing.assert_close(grads[path], _brute_force(model, ids, path), rtol=1e-5, atol=0)


def test_scale_only_scales():
    model = build_tiny_model("opt")
    ids = make_calibration_ids(3, 16)
    a = gradient_norms(model, ids, progress=False, scale=100.0)
    b = gradient_norms(model, ids, progress=False, scale=1.0)
    for k in a:
        torch.testing.assert_close(a[k], 100.0 * b[k], rtol=1e-5, atol=0)


def test_batching_invariance():
    model = build_tiny_model("llama-gqa")
    ids = make_calibration_ids(6, 16, seed=2)
    singles = gradient_norms(model, [{"input_ids": w} for w in ids.split(1)], progress=False)
    triples = gradient_norms(model, [{"input_ids": w} for w in ids.split(3)], progress=False)
    _assert_same_g(singles, triples, 1e-5)


def test_dropout_is_off_during_the_pass():
    model = build_tiny_model("opt", dropout=0.5, attention_dropout=0.5, activation_dropout=0.5).train()
    ids = make_calibration_ids(3, 16)
    first = gradient_norms(model, ids, progress=False)
    second = gradient_norms(model, ids, progress=False)
    for k in first:
        assert torch.equal(first[k], second[k]), k
    assert model.training  # restored
    path = "model.decoder.layers.1.fc1"
    torch.testing.assert_close(first[path], _brute_force(model.eval(), ids, path), rtol=1e-5, atol=0)


@pytest.mark.parametrize("key", ["llama-gqa", "opt"])
def test_layerwise_equals_whole_model(key):
    model = build_tiny_model(key)
    ids = make_calibration_ids(6, 16, seed=3)
    whole = gradient_norms(model, ids, progress=False, layerwise=False)
    by_layer = gradient_norms(model, ids, progress=False, layerwise=True, windows_per_sweep=4)
    _assert_same_g(whole, by_layer, 1e-4)


def test_layerwise_refuses_mixed_layer_types():
    model = build_tiny_model("llama-gqa")
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(UserError, match="layer types"):
        gradient_norms(model, make_calibration_ids(2, 8), progress=False, layerwise=True)


def test_low_precision_model_accumulates_in_float32():
    model = build_tiny_model("llama-gqa").to(torch.bfloat16)
    grads = gradient_norms(model, make_calibration_ids(2, 8), progress=False)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() and (g > 0).any() for g in grads.values())


def test_plan_chooses_layerwise_when_the_model_does_not_fit(monkeypatch):
    model = build_tiny_model("llama-gqa")
    linears = [model.get_submodule(p) for p in _linear_paths(model)]
    params = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(lin.weight.numel() * 4 for lin in linears)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = torch.device("cuda", 0)

    def plan(free):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
        return plan_gradient_pass(model, linears, cuda, fit_fraction=0.8)

    assert plan((params + 2 * grads) / 0.8 + 1) == (False, cuda)  # sums on the device
    assert plan((params + grads) / 0.8 + 1) == (False, torch.device("cpu"))
    assert plan((params + grads) / 0.8 - 1) == (True, torch.device("cpu"))
    assert plan_gradient_pass(model, linears, torch.device("cpu")) == (False, torch.device("cpu"))


def test_cache_round_trip_and_key(tmp_path):
    model = build_tiny_model("llama-gqa")
    ids = make_calibration_ids(4, 16)
    grads = gradient_norms(model, ids, progress=False)
    key = gradient_cache_key(model, ids)
    path = tmp_path / "sub" / "g.safetensors"
    save_gradients(grads, path, key)
    loaded = load_gradients(path)
    assert cached_gradient_key(path) == key
    for k in grads:
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], grads[k])
    assert cached_gradient_key(tmp_path / "missing.safetensors") is None
    # The key ignores batching but sees the token ids, the weights and the config.
    assert gradient_cache_key(model, [{"input_ids": w} for w in ids.split(1)]) == key
    assert gradient_cache_key(model, make_calibration_ids(4, 16, seed=9)) != key
    other = build_tiny_model("llama-gqa", seed=1)
    assert gradient_cache_key(other, ids) != key
    assert gradient_cache_key(build_tiny_model("llama-gqa", rms_norm_eps=1e-3), ids) != key


def test_attach_uses_given_source_and_cache(tmp_path, monkeypatch):
    model = build_tiny_model("llama-gqa")
    calib = [{"input_ids": make_calibration_ids(3, 16)}]
    source = make_calibration_ids(2, 16, seed=5)
    given = {"x": torch.ones(1)}
    method = PrunerZeroConfig(gradients=given)
    assert attach_gradients(method, model, calib, "cpu", False) is method

    attached = attach_gradients(PrunerZeroConfig(gradient_source=source), model, calib, "cpu", False)
    _assert_same_g(attached.gradients, gradient_norms(model, source, progress=False), 1e-6)
    assert attached.gradient_origin == "computed"

    cache = str(tmp_path / "g.safetensors")
    first = attach_gradients(PrunerZeroConfig(gradient_cache=cache), model, calib, "cpu", False)
    monkeypatch.setattr("d2prune.methods.gradients.gradient_norms", _refuse)
    second = attach_gradients(PrunerZeroConfig(gradient_cache=cache), model, calib, "cpu", False)
    assert second.gradient_origin == "cache"
    for k in first.gradients:
        assert torch.equal(first.gradients[k], second.gradients[k])
    with pytest.raises(AssertionError, match="recomputed"):  # other token ids: the cache is not reused
        attach_gradients(PrunerZeroConfig(gradient_cache=cache, gradient_source=source), model, calib, "cpu", False)


def _refuse(*args, **kwargs):
    raise AssertionError("gradients recomputed")
