"""--window-bos in the data layer: resolution by model_type, BOS first in every window with ``always``,
today's windows bit for bit with ``never``, and a cache that keeps the two apart. CPU, offline."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import BOS_ID, WORDS, word_tokenizer
from d2prune import data
from d2prune.data import WindowBos, resolve_window_bos, tokens
from d2prune.errors import UserError
from d2prune.evaluation.perplexity import eval_windows

SEQLEN = 16


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def make_docs(n: int = 14, seed: int = 0) -> list[str]:
    """Documents of 3 to 120 words, several far longer than SEQLEN tokens."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 10, 60, 120]))) + " ." for _ in range(n)]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs()), encoding="utf-8")
    return str(path)


def reference_draw(tok, docs: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The SparseGPT/Wanda c4 loader (global random), as tests/data/test_data.py has it."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            ids = tok(docs[random.randint(0, len(docs) - 1)], return_tensors="pt").input_ids
            if ids.shape[1] > seqlen:
                break
        start = random.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[:, start : start + seqlen])
    return torch.cat(out, 0)


def assert_bos_first(always: torch.Tensor, never: torch.Tensor) -> None:
    """``always`` is ``never`` with BOS as every window's first token, and nothing else changed."""
    assert always.shape == never.shape and always.dtype == never.dtype == torch.long
    assert (always[:, 0] == BOS_ID).all()
    assert (never[:, 0] != BOS_ID).all()  # the tokenizer adds no BOS: a BOS can only come from window_bos
    assert torch.equal(always[:, 1:], never[:, 1:])


# ----------------------------------------------------------------------------------------------
# Resolution


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3", "gemma3_text", "recurrent_gemma", "vaultgemma"])
def test_auto_is_always_for_gemma_families(tok, model_type):
    bos = resolve_window_bos("auto", model_type, tok)
    assert (bos.requested, bos.resolved, bos.model_type, bos.token_id) == ("auto", "always", model_type, BOS_ID)
    assert "Gemma" in bos.reason


@pytest.mark.parametrize("model_type", ["llama", "opt", "qwen2", "qwen3", "mistral", "phi3", "gpt2"])
def test_auto_is_never_elsewhere(tok, model_type):
    bos = resolve_window_bos("auto", model_type, tok)
    assert (bos.resolved, bos.token_id) == ("never", None)
    assert model_type in bos.reason


def test_auto_reads_configs_and_models_and_the_text_config(tok):
    from transformers import GemmaConfig, LlamaConfig

    assert resolve_window_bos("auto", GemmaConfig(bos_token_id=2)).resolved == "always"
    assert resolve_window_bos("auto", SimpleNamespace(config=LlamaConfig())).resolved == "never"  # a model
    # A wrapper decides by its text model too; without a tokenizer the config's BOS id is used (here the
    # text config's, as multimodal configs keep it).
    wrapper = SimpleNamespace(model_type="llava", text_config=SimpleNamespace(model_type="gemma2", bos_token_id=5))
    bos = resolve_window_bos("auto", wrapper)
    assert (bos.resolved, bos.model_type, bos.token_id) == ("always", "llava", 5)
    assert resolve_window_bos("auto", wrapper, tok).token_id == BOS_ID  # the tokenizer's id comes first
    # Every Gemma model_type transformers knows resolves to always.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    gemmas = [t for t in CONFIG_MAPPING_NAMES if "gemma" in t]
    assert {"gemma", "gemma2", "gemma3_text"} <= set(gemmas)
    assert all(resolve_window_bos("auto", t, tok).resolved == "always" for t in gemmas)


def test_never_and_always_whatever_the_model(tok):
    assert resolve_window_bos("never", "gemma", tok).resolved == "never"
    assert resolve_window_bos("always", "llama", tok).resolved == "always"
    assert resolve_window_bos("always", None, tok).token_id == BOS_ID
    done = resolve_window_bos("always", None, tok)
    assert resolve_window_bos(done, "llama") is done  # an already resolved choice passes through


def test_mistakes_are_one_line_user_errors():
    no_bos = word_tokenizer(bos=False)
    with pytest.raises(UserError, match=r"--window-bos always .* has no BOS token"):
        resolve_window_bos("always", "llama", no_bos)
    with pytest.raises(UserError, match=r"--window-bos auto \(model_type gemma\) .* has no BOS token"):
        resolve_window_bos("auto", "gemma", no_bos)
    assert resolve_window_bos("auto", "llama", no_bos).resolved == "never"  # never needs no BOS
    with pytest.raises(UserError, match="window_bos must be one of auto, always, never, got 'sometimes'"):
        resolve_window_bos("sometimes", "llama", no_bos)
    with pytest.raises(UserError, match="'auto' decides by the model's model_type"):
        resolve_window_bos("auto", None, word_tokenizer())


# ----------------------------------------------------------------------------------------------
# Windows


def test_calibration_windows(tok, source):
    docs = make_docs()
    today = reference_draw(tok, docs, 6, SEQLEN, 3)
    default = data.get_calibration(tok, source, nsamples=6, seqlen=SEQLEN, seed=3, cache_dir=False)
    never = data.get_calibration(tok, source, nsamples=6, seqlen=SEQLEN, seed=3, cache_dir=False, window_bos="never")
    always = data.get_calibration(tok, source, 6, SEQLEN, 3, cache_dir=False, window_bos="always")
    assert torch.equal(default, today) and torch.equal(never, today)
    assert_bos_first(always, never)
    # A resolved choice (what the CLI passes) gives the same windows.
    resolved = resolve_window_bos("auto", "gemma3_text", tok)
    assert torch.equal(data.get_calibration(tok, source, 6, SEQLEN, 3, cache_dir=False, window_bos=resolved), always)


def test_heldout_windows(tok, source):
    docs = make_docs()
    # Today's path: the calibration draw's documents, then a draw that avoids them.
    _, used = tokens._draw(tok, docs, 2, SEQLEN, 0, "x")
    today, _ = tokens._draw(tok, docs, 4, SEQLEN, 1, "x", exclude=frozenset(used))
    kw = dict(nsamples=4, seqlen=SEQLEN, calib_nsamples=2, calib_seed=0, seed=1)
    assert torch.equal(data.get_heldout(tok, source, **kw), today)
    never = data.get_heldout(tok, source, **kw, window_bos="never")
    assert torch.equal(never, today)
    assert_bos_first(data.get_heldout(tok, source, **kw, window_bos="always"), never)


def test_eval_windows(tok, source):
    flat = data.get_eval_tokens(tok, source, cache_dir=False)
    n = flat.numel() // SEQLEN
    today = flat.reshape(-1)[: n * SEQLEN].view(n, SEQLEN)
    assert torch.equal(eval_windows(flat, SEQLEN), today)
    never = eval_windows(flat, SEQLEN, window_bos=resolve_window_bos("never"))
    assert torch.equal(never, today)
    always = eval_windows(flat, SEQLEN, max_windows=3, window_bos=resolve_window_bos("always", None, tok))
    assert_bos_first(always, today[:3])
    assert (flat[0, 0] != BOS_ID).all()  # the tokens themselves are unchanged: BOS is set per window


def test_train_blocks(tok, source):
    docs = make_docs()
    ids = [i for d in docs for i in tok(d)["input_ids"]]
    n = len(ids) // SEQLEN
    today = torch.tensor(ids[: n * SEQLEN]).view(n, SEQLEN)
    assert torch.equal(data.get_train_blocks(tok, source, block_size=SEQLEN, cache_dir=False), today)
    never = data.get_train_blocks(tok, source, block_size=SEQLEN, cache_dir=False, window_bos="never")
    assert torch.equal(never, today)
    always = data.get_train_blocks(tok, source, block_size=SEQLEN, cache_dir=False, window_bos="always")
    assert_bos_first(always, never)


def test_cache_keeps_the_modes_apart(tok, source, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(nsamples=5, seqlen=SEQLEN, seed=2, cache_dir=cache)
    always = data.get_calibration(tok, source, **kw, window_bos="always")
    never = data.get_calibration(tok, source, **kw, window_bos="never")
    assert_bos_first(always, never)
    assert torch.equal(never, reference_draw(tok, make_docs(), 5, SEQLEN, 2))
    files = sorted(cache.glob("calib-*.safetensors"))
    assert len(files) == 2
    # Read back from the cache: each mode gets its own windows.
    assert torch.equal(data.get_calibration(tok, source, **kw, window_bos="always"), always)
    assert torch.equal(data.get_calibration(tok, source, **kw), never)
    assert len(list(cache.glob("calib-*.safetensors"))) == 2
    # never's key is today's (no window_bos entry), so caches written before the option stay valid.
    from safetensors import safe_open

    keys = []
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys.append(json.loads(fh.metadata()["key"]))
    assert sorted("window_bos" in k for k in keys) == [False, True]
    assert [k["window_bos"] for k in keys if "window_bos" in k] == [{"first_token": BOS_ID}]


def test_apply_copies_and_never_is_the_same_tensor():
    w = torch.arange(12).view(3, 4)
    assert resolve_window_bos("never").apply(w) is w
    out = WindowBos("always", "always", "requested", None, 99).apply(w)
    assert out[:, 0].tolist() == [99, 99, 99] and w[0, 0] == 0
