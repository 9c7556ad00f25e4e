"""Tests for d2prune.evaluation.perplexity: the perplexity protocol against a brute-force computation. CPU."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from d2prune.errors import UserError
from d2prune.evaluation.perplexity import PerplexityResult, evaluate_ppl

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT.parent / "shared" / "models" / "aidreams260K"

SEQLEN = 32


@pytest.fixture(scope="module")
def model():
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"tiny test model missing: {MODEL_DIR}")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokens(model):
    g = torch.Generator().manual_seed(0)
    # 4 full windows and a tail of 7 tokens.
    return torch.randint(0, model.config.vocab_size, (1, 4 * SEQLEN + 7), generator=g)


@pytest.fixture(scope="module")
def full(model, tokens):
    return evaluate_ppl(model, tokens, SEQLEN, progress=False)


@pytest.fixture(scope="module")
def brute(model, tokens):
    return brute_force(model, tokens, SEQLEN)


def brute_force(model, tokens, seqlen, n_windows=None):
    n = tokens.numel() // seqlen if n_windows is None else n_windows
    nlls = []
    with torch.no_grad():
        for i in range(n):
            w = tokens[:, i * seqlen : (i + 1) * seqlen]
            logits = model(w).logits.float()
            nlls.append(F.cross_entropy(logits[0, :-1], w[0, 1:]).item() * seqlen)
    return math.exp(sum(nlls) / (n * seqlen)), nlls


def test_matches_brute_force(full, brute):
    res = full
    ppl, nlls = brute
    assert isinstance(res, PerplexityResult)
    assert res.n_windows == 4 and res.n_tokens == 4 * SEQLEN and res.seqlen == SEQLEN
    assert res.ppl == pytest.approx(ppl, rel=1e-5)
    assert res.nll_per_window == pytest.approx(nlls, rel=1e-5)
    d = res.to_dict()
    assert set(d) == {"ppl", "n_windows", "n_tokens", "seqlen", "nll_per_window"}


def test_batch_size_does_not_change_result(model, tokens, full):
    one = full  # batch_size 1
    three = evaluate_ppl(model, tokens, SEQLEN, batch_size=3, device="cpu", progress=False)
    assert three.n_windows == one.n_windows
    assert three.ppl == pytest.approx(one.ppl, rel=1e-5)
    assert three.nll_per_window == pytest.approx(one.nll_per_window, rel=1e-5)


def test_max_windows_and_tail(model, tokens, full, brute):
    res = evaluate_ppl(model, tokens, SEQLEN, max_windows=2, progress=False)
    _, nlls = brute
    assert res.n_windows == 2 and res.n_tokens == 2 * SEQLEN
    assert res.ppl == pytest.approx(math.exp(sum(nlls[:2]) / (2 * SEQLEN)), rel=1e-5)
    assert full.ppl != pytest.approx(res.ppl, rel=1e-6)

    # The 7-token tail is dropped: the same as evaluating exactly the 4 full windows.
    exact = evaluate_ppl(model, tokens[:, : 4 * SEQLEN], SEQLEN, max_windows=99, progress=False)
    assert exact.n_windows == 4
    assert full.ppl == exact.ppl and full.n_tokens == exact.n_tokens


class UniformLM(torch.nn.Module):
    """Returns all-zero logits: every token has probability 1/vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False, **kwargs):
        b, t = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(b, t, self.vocab, dtype=torch.float16) + self.dummy.half())


def test_uniform_logits_give_vocab_size():
    vocab = 500
    toks = torch.randint(0, vocab, (1, 4 * 16 + 3), generator=torch.Generator().manual_seed(1))
    res = evaluate_ppl(UniformLM(vocab), toks, 16, batch_size=2, progress=False)
    assert res.ppl == pytest.approx(vocab, rel=1e-6)
    assert res.nll_per_window == pytest.approx([16 * math.log(vocab)] * 4, rel=1e-6)


def test_errors_and_mode_restored(model, tokens):
    with pytest.raises(UserError, match="fewer than one window"):
        evaluate_ppl(model, tokens[:, : SEQLEN - 1], SEQLEN, progress=False)
    with pytest.raises(UserError, match="batch_size"):
        evaluate_ppl(model, tokens, SEQLEN, batch_size=0, progress=False)
    model.train()
    try:
        evaluate_ppl(model, tokens, SEQLEN, max_windows=1, progress=False)
        assert model.training
    finally:
        model.eval()


def test_window_bos_always_scores_the_same_targets_after_a_bos(model, tokens, full):
    bos = model.config.bos_token_id
    res = evaluate_ppl(model, tokens, SEQLEN, progress=False, window_bos="always")
    # The reference: the same windows with their first token replaced by BOS, scored one by one.
    windows = tokens[:, : 4 * SEQLEN].reshape(4, SEQLEN).clone()
    assert (windows[:, 0] != bos).all()
    windows[:, 0] = bos
    ppl, nlls = brute_force(model, windows.reshape(1, -1), SEQLEN)
    assert res.ppl == pytest.approx(ppl, rel=1e-5) and res.nll_per_window == pytest.approx(nlls, rel=1e-5)
    assert (res.n_windows, res.n_tokens) == (full.n_windows, full.n_tokens)  # the same count of tokens
    assert res.ppl != pytest.approx(full.ppl, rel=1e-3)
    # auto on this LLaMA keeps the canonical windows: the very numbers of the default.
    assert evaluate_ppl(model, tokens, SEQLEN, progress=False, window_bos="auto").nll_per_window == full.nll_per_window
    assert evaluate_ppl(model, tokens, SEQLEN, progress=False, window_bos="never").nll_per_window == full.nll_per_window
