"""Attention diagnostics (d2prune.evaluation.attention): per-layer RMSE / KL / entropy / top-k mass."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import d2prune
from conftest import ARCH_KEYS, SHARED, build_tiny_model, make_calibration_ids
from d2prune.engine.architecture import find_decoder_stack
from d2prune.errors import UserError
from d2prune.evaluation.attention import (
    METRICS,
    attention_diagnostics,
    eager_attention,
    find_attention_module,
    format_attention_table,
    plot_attention_diagnostics,
    run_attention,
)

AIDREAMS = SHARED / "models" / "aidreams260K"
needs_aidreams = pytest.mark.skipif(not (AIDREAMS / "config.json").is_file(), reason=f"{AIDREAMS} missing")

T = 12
ATTN_NAME = {"opt": "self_attn", "gpt-neox": "attention"}


def _windows(n: int = 3, t: int = T, seed: int = 7) -> torch.Tensor:
    return make_calibration_ids(n, t, seed=seed)


def _attn_impls(model) -> list:
    return [
        m.config._attn_implementation
        for m in model.modules()
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
    ]


def _magnitude_pruned(model):
    pruned = copy.deepcopy(model)
    d2prune.prune(
        pruned, make_calibration_ids(2, 8), d2prune.PruneConfig(method="magnitude", sparsity=0.5, progress=False)
    )
    return pruned


# ---------------------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("key", ARCH_KEYS)
def test_find_attention_module(key):
    model = build_tiny_model(key)
    layer = find_decoder_stack(model).layers[0]
    name, module = find_attention_module(layer)
    assert name == ATTN_NAME.get(key, "self_attn")
    assert "Attention" in type(module).__name__


def test_find_attention_module_fallback_and_error():
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj = nn.Linear(4, 12)
            self.o_proj = nn.Linear(4, 4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = Owner()
            self.mlp = nn.Linear(4, 4)

    name, module = find_attention_module(Block())
    assert name == "mixer" and isinstance(module, Owner)

    class MlpOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(UserError, match="MlpOnly"):
        find_attention_module(MlpOnly())


# ---------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("key", ["llama-gqa", "opt", "gpt-neox", "phi3"])
def test_identical_models_give_zero(key):
    dense = build_tiny_model(key)
    res = attention_diagnostics(dense, copy.deepcopy(dense), _windows(), top_k=4, batch_size=2, progress=False)
    assert res["n_windows"] == 3 and res["seqlen"] == T and res["top_k"] == 4
    assert [row["layer"] for row in res["layers"]] == [0, 1]
    for row in [*res["layers"], res["mean"]]:
        assert set(METRICS) <= set(row)
        assert row["rmse"] == 0.0 and row["relative_rmse"] == 0.0
        assert abs(row["kl"]) < 1e-6
        assert row["entropy_change"] == 0.0
        assert row["entropy_dense"] == row["entropy_pruned"] > 0
        assert row["topk_mass_dense"] == row["topk_mass_pruned"]
        assert 0 < row["topk_mass_dense"] <= 1 + 1e-6
    json.dumps(res)  # JSON-able


def test_same_object_twice_is_zero_and_restored():
    model = build_tiny_model("llama-gqa")
    res = attention_diagnostics(model, model, _windows(2), progress=False)
    assert res["mean"]["rmse"] == 0.0 and res["mean"]["kl"] == 0.0
    assert set(_attn_impls(model)) == {"sdpa"}


# ---------------------------------------------------------------------------------------------- pruned


def test_zeroed_v_proj_changes_only_that_layer_output():
    dense = build_tiny_model("llama-gqa")
    pruned = copy.deepcopy(dense)
    v = pruned.model.layers[1].self_attn.v_proj.weight
    with torch.no_grad():
        v[: v.shape[0] // 2] = 0
    res = attention_diagnostics(dense, pruned, _windows(), progress=False)
    l0, l1 = res["layers"]
    assert l0["rmse"] == 0.0 and l0["kl"] == 0.0
    assert l1["rmse"] > 0 and 0 < l1["relative_rmse"]
    # v only changes values, not where the layer attends
    assert abs(l1["kl"]) < 1e-9 and l1["entropy_change"] == 0.0


@pytest.mark.parametrize("key", ["llama-gqa", "gpt-neox"])
def test_magnitude_pruned_model(key):
    dense = build_tiny_model(key)
    pruned = _magnitude_pruned(dense)
    res = attention_diagnostics(dense, pruned, _windows(), top_k=3, progress=False)
    for row in res["layers"]:
        assert row["rmse"] > 0 and row["relative_rmse"] > 0
        assert row["kl"] > 0
        assert math.isclose(row["entropy_change"], row["entropy_pruned"] - row["entropy_dense"], abs_tol=1e-12)
    means = res["mean"]
    for key_ in METRICS:
        assert math.isclose(means[key_], sum(r[key_] for r in res["layers"]) / 2, rel_tol=1e-12)
    table = format_attention_table(res)
    assert "mean" in table and "relative_rmse" in table


# ---------------------------------------------------------------------------------------------- brute force


def test_rmse_matches_forward_hooks():
    dense = build_tiny_model("qwen2")
    pruned = _magnitude_pruned(dense)
    ids = _windows(3)
    res = attention_diagnostics(dense, pruned, ids, batch_size=2, progress=False)

    def attn_out(model, layer):
        got = []
        h = model.model.layers[layer].self_attn.register_forward_hook(lambda m, a, o: got.append(o[0]))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)  # default (sdpa) attention, whole batch
        h.remove()
        return got[0].double()

    for layer in (0, 1):
        d, p = attn_out(dense, layer), attn_out(pruned, layer)
        rmse = ((d - p) ** 2).mean().sqrt().item()
        rel = rmse / (d**2).mean().sqrt().item()
        assert math.isclose(res["layers"][layer]["rmse"], rmse, rel_tol=1e-4)
        assert math.isclose(res["layers"][layer]["relative_rmse"], rel, rel_tol=1e-4)


def test_kl_entropy_topk_match_output_attentions():
    dense = build_tiny_model("mistral")
    pruned = _magnitude_pruned(dense)
    ids = _windows(2)
    res = attention_diagnostics(dense, pruned, ids, top_k=3, progress=False)

    def attentions(model):
        m = copy.deepcopy(model)
        m.set_attn_implementation("eager")
        with torch.no_grad():
            return [a.double() for a in m(input_ids=ids, use_cache=False, output_attentions=True).attentions]

    layer = 1
    p, q = attentions(dense)[layer], attentions(pruned)[layer]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    assert (p[..., ~causal] == 0).all()  # future keys have probability 0
    kl = entropy_p = entropy_q = 0.0
    rows = 0
    for b in range(p.shape[0]):
        for h in range(p.shape[1]):
            for i in range(T):
                pi, qi = p[b, h, i, : i + 1], q[b, h, i, : i + 1]
                kl += float((pi * (pi / qi).log()).sum())
                entropy_p -= float((pi * pi.log()).sum())
                entropy_q -= float((qi * qi.log()).sum())
                rows += 1
    row = res["layers"][layer]
    assert math.isclose(row["kl"], kl / rows, rel_tol=1e-5)
    assert math.isclose(row["entropy_dense"], entropy_p / rows, rel_tol=1e-6)
    assert math.isclose(row["entropy_pruned"], entropy_q / rows, rel_tol=1e-6)
    top_p = p.topk(3, dim=-1).values.sum(-1).mean().item()
    assert math.isclose(row["topk_mass_dense"], top_p, rel_tol=1e-6)


def test_topk_equal_seqlen_gives_mass_one():
    dense = build_tiny_model("phi3")
    pruned = _magnitude_pruned(dense)
    res = attention_diagnostics(dense, pruned, _windows(2), top_k=T, progress=False)
    for row in res["layers"]:
        assert abs(row["topk_mass_dense"] - 1) < 1e-5 and abs(row["topk_mass_pruned"] - 1) < 1e-5
    # a k larger than T is capped at T
    res2 = attention_diagnostics(dense, pruned, _windows(2), top_k=10 * T, progress=False)
    assert res2["top_k"] == 10 * T
    assert abs(res2["mean"]["topk_mass_pruned"] - 1) < 1e-5


# ---------------------------------------------------------------------------------------------- eager switch


def test_attention_implementation_restored():
    dense = build_tiny_model("opt")
    pruned = build_tiny_model("opt", seed=1)
    pruned.set_attn_implementation("eager")
    assert set(_attn_impls(dense)) == {"sdpa"}
    attention_diagnostics(dense, pruned, _windows(1), progress=False)
    assert set(_attn_impls(dense)) == {"sdpa"}
    assert set(_attn_impls(pruned)) == {"eager"}
    assert not dense.training

    # also after a failure inside the run (token id out of the vocabulary)
    bad = torch.full((1, 4), 10_000, dtype=torch.long)
    with pytest.raises(IndexError):
        attention_diagnostics(dense, pruned, bad, progress=False)
    assert set(_attn_impls(dense)) == {"sdpa"}
    assert set(_attn_impls(pruned)) == {"eager"}

    with eager_attention(dense):
        assert set(_attn_impls(dense)) == {"eager"}
    assert set(_attn_impls(dense)) == {"sdpa"}


def test_training_flag_restored():
    dense = build_tiny_model("llama-gqa").train()
    pruned = copy.deepcopy(dense).eval()
    res = attention_diagnostics(dense, pruned, _windows(1), progress=False)
    assert res["mean"]["rmse"] == 0.0  # dropout was off during the run
    assert dense.training and not pruned.training


def test_bad_inputs():
    dense = build_tiny_model("llama-gqa")
    with pytest.raises(UserError, match="windows"):
        attention_diagnostics(dense, dense, torch.zeros(4, dtype=torch.long), progress=False)
    with pytest.raises(UserError, match="top_k"):
        attention_diagnostics(dense, dense, _windows(1), top_k=0, progress=False)
    with pytest.raises(UserError, match="batch_size"):
        attention_diagnostics(dense, dense, _windows(1), batch_size=0, progress=False)
    with pytest.raises(UserError, match="decoder layers"):
        attention_diagnostics(dense, build_tiny_model("llama-gqa", num_hidden_layers=3), _windows(1), progress=False)


# ---------------------------------------------------------------------------------------------- plot


def test_plot_single_and_overlay(tmp_path):
    dense = build_tiny_model("llama-gqa")
    r1 = attention_diagnostics(dense, _magnitude_pruned(dense), _windows(1), progress=False)
    r2 = attention_diagnostics(dense, copy.deepcopy(dense), _windows(1), progress=False)
    other = build_tiny_model("llama-gqa", seed=3)
    r3 = attention_diagnostics(other, _magnitude_pruned(other), _windows(1), progress=False)  # another dense model
    one = plot_attention_diagnostics(r1, tmp_path / "one.png")
    both = plot_attention_diagnostics({"magnitude": r1, "dense copy": r2}, tmp_path / "sub" / "both.png")
    mixed = plot_attention_diagnostics({"a": r1, "b": r3}, tmp_path / "mixed.png")
    for path in (one, both, mixed):
        assert path.is_file() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError):
        plot_attention_diagnostics({"x": {"nope": 1}}, tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------- end to end

TEXT = (
    "The little robot walked through the quiet garden and looked at every flower. It counted the petals, "
    "wrote the numbers in a small book and smiled when the sun came out from behind the clouds. Then it "
    "sat on a bench and listened to the birds singing in the old oak tree near the river.\n\n"
)


def _text_file(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text("".join(TEXT.replace("robot", name) for name in ("robot", "cat", "girl", "boy", "dog", "fox")))
    return path


def _save_pruned(tmp_path, name="pruned", extra_tokens=()):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(AIDREAMS)).eval()
    tok = AutoTokenizer.from_pretrained(str(AIDREAMS))
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.v_proj.weight
            w[w.abs() < w.abs().median()] = 0
            w = layer.self_attn.q_proj.weight
            w[w.abs() < w.abs().median()] = 0
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    out = tmp_path / name
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@needs_aidreams
def test_run_attention_writes_json_and_png(tmp_path):
    pruned = _save_pruned(tmp_path)
    data = _text_file(tmp_path)
    out = tmp_path / "out"
    res = run_attention(
        str(AIDREAMS),
        str(pruned),
        out,
        data_source=str(data),
        nwindows=4,
        seqlen=32,
        top_k=4,
        progress=False,
        cache_dir=False,
    )
    assert res["n_windows"] == 4 and res["seqlen"] == 32 and len(res["layers"]) == 4
    assert all(row["rmse"] > 0 and row["kl"] > 0 for row in res["layers"])
    record = json.loads((out / "attention.json").read_text())
    assert record["result"] == json.loads(json.dumps(res))
    assert record["config"]["seed"] == 1234 and record["config"]["seqlen"] == 32
    assert record["inputs"]["data"]["sha256"]
    png = out / "attention.png"
    assert png.is_file() and png.stat().st_size > 1000


@needs_aidreams
def test_run_attention_rejects_other_tokenizer(tmp_path):
    pruned = _save_pruned(tmp_path, extra_tokens=("zzzqqq",))
    with pytest.raises(UserError, match="tokenizer"):
        run_attention(
            str(AIDREAMS),
            str(pruned),
            tmp_path / "out",
            data_source=str(_text_file(tmp_path)),
            nwindows=2,
            seqlen=16,
            progress=False,
            cache_dir=False,
        )
    assert not (tmp_path / "out" / "attention.json").exists()
