"""Masked LoRA on CUDA (marked ``cuda``, skipped without a GPU): training on the GPU keeps every zero
and follows the CPU's loss curve."""

from __future__ import annotations

import pytest
import torch

import d2prune
from conftest import build_tiny_model, make_calibration_ids

peft = pytest.importorskip("peft")

from d2prune.finetune import FinetuneConfig, finetune, linear_zeros, masked_modules, merge_masked_lora  # noqa: E402
from d2prune.patterns import nm_violations  # noqa: E402

pytestmark = pytest.mark.cuda


def _pruned(pattern: dict) -> torch.nn.Module:
    model = build_tiny_model("llama-gqa")
    d2prune.prune(model, make_calibration_ids(), d2prune.PruneConfig(method="magnitude", progress=False, **pattern))
    return model


def _config(device: str) -> FinetuneConfig:
    # No dropout: the CPU and the GPU draw different random numbers.
    return FinetuneConfig(
        lr=1e-2,
        max_steps=4,
        batch_size=2,
        effective_batch_size=4,
        warmup_steps=0,
        lora_dropout=0.0,
        lora_targets=["q_proj", "v_proj", "down_proj"],
        device=device,
        progress=False,
    )


@pytest.mark.parametrize("pattern", [{"sparsity": 0.6}, {"pattern": "2:4"}], ids=["unstructured", "2:4"])
def test_lora_on_cuda_keeps_the_zeros_and_follows_the_cpu(pattern):
    train = make_calibration_ids(12, 32, seed=1)
    reports, merged = {}, {}
    for device in ("cpu", "cuda"):
        model = _pruned(pattern)
        before = linear_zeros(model)
        report = finetune(model, train, _config(device))
        assert next(report.model.parameters()).device.type == "cpu"  # back where it was
        masks = {n: m.sparsity_mask.clone() for n, m in masked_modules(report.model).items()}
        merged[device] = merge_masked_lora(report.model)
        assert linear_zeros(merged[device]) == before
        for name, keep in masks.items():
            weight = merged[device].get_submodule(name).weight
            assert torch.equal(weight != 0, keep), name
            if "pattern" in pattern:
                assert nm_violations(weight, 2, 4) == 0
        reports[device] = report
    cpu_loss = [p["loss"] for p in reports["cpu"].loss_curve]
    gpu_loss = [p["loss"] for p in reports["cuda"].loss_curve]
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-3)
    ids = make_calibration_ids(2, 24, seed=7)
    with torch.no_grad():
        a, b = (merged[d](input_ids=ids).logits for d in ("cpu", "cuda"))
    assert float((a - b).abs().max()) <= 1e-2 * float(a.abs().max())
