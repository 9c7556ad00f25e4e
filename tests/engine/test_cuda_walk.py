"""The pipeline on CUDA (marked ``cuda``, skipped without a GPU): every method prunes a tiny random
model on the GPU as it does on the CPU.

Tolerance: CPU and GPU float32 round differently. On the CPU, a 1e-6 relative perturbation of the
weights leaves every method's masks identical except ALPS's (its ADMM support moves by ~1.5 %), so
masks must agree on 99 % of the weights (ALPS: 95 %), and the pruned models' logits are compared.
"""

from __future__ import annotations

import pytest
import torch

import d2prune
from conftest import assert_pruned_alike, build_tiny_model, decoder_weights, make_calibration_ids

pytestmark = pytest.mark.cuda

WINDOWS, TOKENS = 8, 32
# name -> PruneConfig keyword arguments; a callable ``method`` makes a fresh method config per run
CASES: dict[str, dict] = {
    "sparsegpt": dict(method="sparsegpt"),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    "wanda": dict(method="wanda"),
    "magnitude": dict(method="magnitude", sparsity=0.6),
    "d2prune": dict(method="d2prune"),
    "d2prune-reference": dict(method=lambda: d2prune.D2PruneConfig(stats_mode="reference", s=20.0)),
    "pruner-zero": dict(method="pruner-zero"),
    "ria": dict(method="ria"),
    "ria-2:4-permute": dict(method=lambda: d2prune.RIAConfig(permute=True), pattern="2:4"),
    "dsnot": dict(method="dsnot"),
    "alps": dict(method="alps"),
    "d2alps": dict(method="d2alps"),
    "owl-wanda": dict(method="wanda", sparsity_profile="owl", owl_lambda=0.1, owl_m=3.0),
    "sparsegpt-refit": dict(method="sparsegpt", refit="cg"),
    "wanda-disk-activations": dict(method="wanda", activation_offload="disk"),
    "sparsegpt-batch3": dict(method="sparsegpt", batch_size=3),
}
ADMM = {"alps", "d2alps"}


def _prune(case: str, device: str, model: torch.nn.Module | None = None):
    model = model if model is not None else build_tiny_model("llama-gqa")
    options = dict(CASES[case])
    if callable(options["method"]):
        options["method"] = options["method"]()
    config = d2prune.PruneConfig(device=device, progress=False, **options)
    report = d2prune.prune(model, make_calibration_ids(WINDOWS, TOKENS), config)
    return model, report


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=make_calibration_ids(2, TOKENS, seed=3).to(model.device)).logits.float().cpu()


def _assert_close_logits(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    assert torch.isfinite(b).all()
    assert float((a - b).abs().max()) <= rel * float(a.abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_prunes_like_the_cpu(case):
    cpu, cpu_report = _prune(case, "cpu")
    gpu, gpu_report = _prune(case, "cuda")  # the model stays on the CPU; each layer visits the GPU
    assert all(p.device.type == "cpu" for p in gpu.parameters())
    assert gpu_report.config["device"] == "cuda"
    assert gpu_report.nsamples == cpu_report.nsamples == WINDOWS
    assert gpu_report.overall_sparsity == pytest.approx(cpu_report.overall_sparsity, abs=0.01)
    assert gpu_report.nm_ok == cpu_report.nm_ok
    assert gpu_report.nm_ok is not False
    admm = case in ADMM
    assert_pruned_alike(decoder_weights(cpu), decoder_weights(gpu), 0.95 if admm else 0.99, 0.3 if admm else 0.05)
    _assert_close_logits(_logits(cpu), _logits(gpu), 0.2 if admm else 1e-2)
    errors = [(a.relative_error, b.relative_error) for a, b in zip(cpu_report.linears, gpu_report.linears)]
    assert all(b is not None and b == pytest.approx(a, rel=0.3 if admm else 0.05, abs=1e-6) for a, b in errors)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_model_that_lives_on_the_gpu_stays_there(device):
    cpu, _ = _prune("sparsegpt", "cpu")
    gpu, report = _prune("sparsegpt", device, build_tiny_model("llama-gqa").to(device))
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert report.overall_sparsity == 0.5
    assert_pruned_alike(decoder_weights(cpu), decoder_weights(gpu), 0.99, 0.05)
    _assert_close_logits(_logits(cpu), _logits(gpu), 1e-2)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "d2prune"])
def test_bf16_on_the_gpu(method):
    """Half-precision weights: statistics in float32, the pruned weights back in bf16, sane results."""
    model = build_tiny_model("llama-gqa").to(torch.bfloat16).to("cuda")
    report = d2prune.prune(
        model, make_calibration_ids(WINDOWS, TOKENS), d2prune.PruneConfig(method=method, device="cuda", progress=False)
    )
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert report.overall_sparsity == 0.5
    assert all(lin.relative_error is not None and 0 <= lin.relative_error < 1 for lin in report.linears)
    reference, _ = _prune(method, "cpu")
    # bf16 weights round the scores too: close, not equal, to the float32 CPU masks.
    assert_pruned_alike(decoder_weights(reference), decoder_weights(model), 0.9, 0.3)
    assert torch.isfinite(_logits(model)).all()
