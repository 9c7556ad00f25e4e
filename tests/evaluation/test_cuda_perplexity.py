"""Evaluation on CUDA (marked ``cuda``, skipped without a GPU): perplexity and the attention
diagnostics give the CPU's numbers."""

from __future__ import annotations

import copy

import pytest
import torch

import d2prune
from conftest import build_tiny_model, make_calibration_ids
from d2prune.evaluation.attention import attention_diagnostics
from d2prune.evaluation.perplexity import evaluate_ppl

pytestmark = pytest.mark.cuda

SEQLEN = 32


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return make_calibration_ids(1, 5 * SEQLEN + 7, seed=11)


@pytest.mark.parametrize("key", ["llama-gqa", "opt"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_on_cuda_matches_the_cpu(tokens, key, batch_size):
    model = build_tiny_model(key)
    cpu = evaluate_ppl(model, tokens, SEQLEN, batch_size=batch_size, progress=False)
    gpu = evaluate_ppl(model.to("cuda"), tokens, SEQLEN, batch_size=batch_size, progress=False)
    assert gpu.n_windows == cpu.n_windows == 5 and gpu.n_tokens == cpu.n_tokens
    # Float32 on both: only the order of the sums differs.
    assert gpu.ppl == pytest.approx(cpu.ppl, rel=1e-4)
    assert gpu.nll_per_window == pytest.approx(cpu.nll_per_window, rel=1e-4)
    # device= names where the batches go; the model is already there.
    named = evaluate_ppl(model, tokens, SEQLEN, batch_size=batch_size, device="cuda:0", progress=False)
    assert named.ppl == gpu.ppl


def test_bf16_perplexity_on_cuda_is_close_to_float32(tokens):
    model = build_tiny_model("llama-gqa")
    reference = evaluate_ppl(model, tokens, SEQLEN, progress=False).ppl
    half = evaluate_ppl(model.to(torch.bfloat16).to("cuda"), tokens, SEQLEN, batch_size=2, progress=False).ppl
    assert half == pytest.approx(reference, rel=0.02)


def test_attention_diagnostics_on_cuda_match_the_cpu():
    dense = build_tiny_model("llama-gqa")
    pruned = copy.deepcopy(dense)
    d2prune.prune(pruned, make_calibration_ids(4, 16), d2prune.PruneConfig(method="wanda", progress=False))
    windows = make_calibration_ids(3, 12, seed=7)
    cpu = attention_diagnostics(dense, pruned, windows, top_k=4, progress=False)
    gpu = attention_diagnostics(dense.to("cuda"), pruned.to("cuda"), windows, top_k=4, batch_size=2, progress=False)
    assert gpu["n_windows"] == cpu["n_windows"] == 3
    for metric, value in cpu["mean"].items():
        assert gpu["mean"][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric
