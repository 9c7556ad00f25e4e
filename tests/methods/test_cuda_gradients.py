"""The gradient pass on CUDA (marked ``cuda``, skipped without a GPU): G equals the CPU's, whole-model
and layer by layer, and leaves the model where it was."""

from __future__ import annotations

import pytest
import torch

import d2prune
from conftest import assert_pruned_alike, build_tiny_model, decoder_weights, make_calibration_ids
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.methods.gradients import gradient_norms, plan_gradient_pass

pytestmark = pytest.mark.cuda


def _assert_same_g(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].device.type == "cpu" and b[k].dtype == torch.float32
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=rtol * float(a[k].abs().max()))


@pytest.mark.parametrize("key", ["llama-gqa", "opt"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_g_on_cuda_equals_the_cpu(key, layerwise):
    model = build_tiny_model(key)
    ids = make_calibration_ids(5, 16, seed=1)
    cpu = gradient_norms(model, ids, progress=False, layerwise=layerwise)
    gpu = gradient_norms(model, ids, device="cuda", progress=False, layerwise=layerwise, windows_per_sweep=2)
    assert all(p.device.type == "cpu" and p.grad is None for p in model.parameters())
    _assert_same_g(cpu, gpu, 1e-4)


def test_the_plan_keeps_a_small_model_on_the_gpu():
    model = build_tiny_model("llama-gqa")
    stack = find_decoder_stack(model)
    linears = [lin for layer in stack.layers for lin in find_linears(layer).values()]
    layerwise, sums = plan_gradient_pass(model, linears, torch.device("cuda"))
    assert layerwise is False and sums == torch.device("cuda", torch.cuda.current_device())


def test_bf16_model_on_cuda_accumulates_in_float32():
    model = build_tiny_model("llama-gqa").to(torch.bfloat16).to("cuda")
    grads = gradient_norms(model, make_calibration_ids(3, 16), device="cuda", progress=False)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() and (g > 0).any() for g in grads.values())


def test_pruner_zero_on_cuda_prunes_like_the_cpu():
    ids = make_calibration_ids(6, 16)
    models = {}
    for device in ("cpu", "cuda"):
        model = build_tiny_model("llama-gqa")
        report = d2prune.prune(model, ids, d2prune.PruneConfig(method="pruner-zero", device=device, progress=False))
        assert report.config["method"]["gradients"] == "computed" and report.overall_sparsity == 0.5
        models[device] = decoder_weights(model)
    assert_pruned_alike(models["cpu"], models["cuda"], 0.99, 0.05)
