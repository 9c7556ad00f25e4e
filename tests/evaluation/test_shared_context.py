"""Shared-context zero-shot scoring: the packed sequence and mask against hand-made references, and
its log-likelihoods against one forward per request (a reference LM class, and lm-eval's HFLM)."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import SHARED, build_tiny_model
from d2prune.evaluation.shared_context import allowed, pack, shared_context_lm


def test_pack_lays_out_context_then_each_continuation_without_its_last_token():
    p = pack([5, 6, 7], [[8, 9], [10], [11, 12, 13]])
    assert p["ids"] == [5, 6, 7, 8, 11, 12]
    assert p["positions"] == [0, 1, 2, 3, 3, 4]
    assert p["segments"] == [-1, -1, -1, 0, 2, 2]
    # Token 8 is predicted by the context's last token (index 2), 9 by token 8 (index 3); the one-token
    # continuation only by the context; 11, 12, 13 by index 2, 4, 5.
    assert p["predictors"] == [[2, 3], [2], [2, 4, 5]]


def test_mask_lets_a_continuation_see_the_context_and_its_own_earlier_tokens_only():
    segments = torch.tensor([-1, -1, 0, 0, 1, 1, 1])
    got = allowed(segments)
    for q in range(7):
        for k in range(7):
            expected = k <= q and (segments[k] == -1 or segments[k] == segments[q])
            assert bool(got[q, k]) == bool(expected), (q, k)


class _Reference:
    """The stock path: one forward of context + continuation per request, as lm-eval scores it."""

    backend = "causal"
    rank = 0
    softmax_dtype = torch.float32

    def __init__(self, model, batch_size=2, max_length=64, bias=0.0):
        self.model, self.batch_size, self.max_length, self.bias = model, batch_size, max_length, bias
        self.device = "cpu"
        self.cache_hook = type("Hook", (), {"add_partial": lambda *a: None})()
        self.stock_calls = 0

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        out = []
        for _, context, cont in requests:
            self.stock_calls += 1
            ids = torch.tensor([(context + cont)[-(self.max_length + 1) :][:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(self.model(ids).logits[0, -len(cont) :].float(), dim=-1)
            tokens = torch.tensor(cont)
            ll = float(logp.gather(1, tokens.unsqueeze(1)).sum()) + self.bias
            out.append((ll, bool((logp.argmax(-1) == tokens).all())))
        return out


def _requests(seed=0, contexts=5, vocab=512):
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(contexts):
        context = torch.randint(3, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            cont = torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            out.append(((f"c{c}", "x"), context, cont))
    perm = torch.randperm(len(out), generator=g).tolist()  # lm-eval hands requests over in any order
    return [out[i] for i in perm]


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen3", "mistral", "phi3"])
def test_shared_contexts_give_each_requests_own_log_likelihood(arch):
    model = build_tiny_model(arch, vocab_size=512)
    requests = _requests()
    lm = shared_context_lm(_Reference)(model, batch_size=3)
    got = lm._loglikelihood_tokens(requests)
    expected = _Reference(model)._loglikelihood_tokens(requests)
    assert len(got) == len(expected)
    for (a, ga), (b, gb) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and ga == gb
    s = lm.sharing
    assert s["requests"] == len(requests) and s["contexts"] == len({tuple(r[1]) for r in requests})
    assert s["tokens_run"] < s["tokens_lm_eval"]
    assert s["checked"]["largest_relative_difference"] <= s["checked"]["tolerance"]


def test_requests_too_long_for_the_window_and_groups_that_overflow_it_are_split_or_left_to_lm_eval():
    model = build_tiny_model("llama-gqa", vocab_size=512)
    long_context = list(range(3, 40))
    requests = [
        (("a", "1"), long_context, [50, 51, 52]),  # 37 + 3 - 1 = 39 ≤ 40: packed
        (("a", "2"), long_context, [60, 61]),  # together 37 + 2 + 1 = 40: still one piece
        (("a", "3"), long_context, [70, 71, 72, 73]),  # 40 + 3 > 40: a second piece of the same context
        (("b", "1"), list(range(3, 45)), [80, 81]),  # 42 + 2 > 41: lm-eval truncates it, its own path
    ]
    lm = shared_context_lm(_Reference)(model, batch_size=2, max_length=40)
    got = lm._loglikelihood_tokens(requests)
    expected = _Reference(model, max_length=40)._loglikelihood_tokens(requests)
    for (a, _), (b, _) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert lm.sharing["contexts"] == 2 and lm.sharing["requests"] == 3


def test_a_model_that_scores_otherwise_falls_back_to_lm_eval_for_the_whole_run(caplog):
    model = build_tiny_model("llama-gqa", vocab_size=512)
    requests = _requests(seed=1)
    lm = shared_context_lm(_Reference)(model, bias=0.5)  # "lm-eval" now disagrees with the packed scores
    with caplog.at_level(logging.WARNING):
        got = lm._loglikelihood_tokens(requests)
    assert "lm-eval's own path" in caplog.text
    assert got == _Reference(model, bias=0.5)._loglikelihood_tokens(requests)
    assert lm.share_contexts is False and lm.sharing["checked"]["fell_back"]
    assert lm._loglikelihood_tokens(requests[:2]) == _Reference(model, bias=0.5)._loglikelihood_tokens(requests[:2])


def test_a_model_without_logits_to_keep_scores_the_same():
    inner = build_tiny_model("llama-gqa", vocab_size=512)

    class Plain(torch.nn.Module):  # forward without ``logits_to_keep``: every position's logits
        def __init__(self):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return inner.get_input_embeddings()

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    requests = _requests(seed=2)
    got = shared_context_lm(_Reference)(Plain())._loglikelihood_tokens(requests)
    for (a, _), (b, _) in zip(got, _Reference(inner)._loglikelihood_tokens(requests)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_against_lm_evals_own_scoring():
    pytest.importorskip("lm_eval")
    tokenizer_dir = SHARED / "models" / "aidreams260K"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer at {tokenizer_dir}")
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_tiny_model("llama-gqa", vocab_size=512, max_position_embeddings=1024)
    requests = _requests(seed=3, contexts=8)
    ours = shared_context_lm(HFLM)(pretrained=model, tokenizer=tok, batch_size=4)
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    got, expected = ours._loglikelihood_tokens(requests), stock._loglikelihood_tokens(requests)
    for (a, ga), (b, gb) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and ga == gb
    assert ours.sharing["tokens_run"] < ours.sharing["tokens_lm_eval"]
