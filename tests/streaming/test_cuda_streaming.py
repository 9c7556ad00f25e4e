"""Streaming from disk on CUDA (marked ``cuda``, skipped without a GPU): a checkpoint pruned layer by
layer on the GPU matches in-memory pruning on the CPU, and so does its layer-by-layer perplexity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import d2prune
from conftest import assert_pruned_alike, build_tiny_model, decoder_weights, make_calibration_ids
from d2prune.evaluation.perplexity import evaluate_ppl
from d2prune.streaming import evaluate_streamed, prune_checkpoint

pytestmark = pytest.mark.cuda

TOKENS = 16


def _config(method: str, device: str, **kw) -> d2prune.PruneConfig:
    return d2prune.PruneConfig(method=method, device=device, batch_size=2, progress=False, **kw)


def _saved_weights(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return {n: tensors[f"{n}.weight"].float() for n in names}


@pytest.mark.parametrize(
    "method,activations", [("sparsegpt", "ram"), ("wanda", "disk"), ("d2prune", "auto"), ("alps", "ram")]
)
def test_streamed_on_cuda_matches_in_memory_on_the_cpu(tmp_path, method, activations):
    model = build_tiny_model("llama-gqa", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "src")
    ids = make_calibration_ids(6, TOKENS)
    report, out = prune_checkpoint(
        tmp_path / "src", ids, _config(method, "cuda", activation_offload=activations), tmp_path / "streamed"
    )
    cpu_report = d2prune.prune(model, ids, _config(method, "cpu"))
    cpu = decoder_weights(model)
    admm = method == "alps"
    assert_pruned_alike(cpu, _saved_weights(out, list(cpu)), 0.95 if admm else 0.99, 0.3 if admm else 0.05)
    assert report.overall_sparsity == pytest.approx(cpu_report.overall_sparsity, abs=0.01)

    tokens = make_calibration_ids(4, TOKENS, seed=5).reshape(-1)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    on_cpu = evaluate_ppl(loaded, tokens, TOKENS, progress=False)
    streamed = evaluate_streamed(out, tokens, TOKENS, device="cuda", activation_offload=activations, progress=False)
    assert streamed.n_windows == on_cpu.n_windows == 4
    assert streamed.nll_per_window == pytest.approx(on_cpu.nll_per_window, rel=1e-4)
    expected = evaluate_ppl(model, tokens, TOKENS, progress=False).ppl
    assert streamed.ppl == pytest.approx(expected, rel=0.05 if admm else 1e-2)


def test_streamed_bf16_on_cuda(tmp_path):
    model = build_tiny_model("qwen3")
    model.save_pretrained(tmp_path / "src")
    ids = make_calibration_ids(4, TOKENS)
    report, out = prune_checkpoint(
        tmp_path / "src", ids, _config("sparsegpt", "cuda"), tmp_path / "out", dtype="bfloat16"
    )
    assert report.overall_sparsity == 0.5
    weights = {}
    for file in sorted(out.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    ppl = evaluate_streamed(
        out,
        make_calibration_ids(2, TOKENS, seed=5).reshape(-1),
        TOKENS,
        dtype="bfloat16",
        device="cuda",
        progress=False,
    )
    assert torch.isfinite(torch.tensor(ppl.ppl))
