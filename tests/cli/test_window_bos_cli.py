"""--window-bos through the commands: the windows each command feeds the model, the run record, and the
user mistakes (a bad value, a tokenizer without BOS). On the tiny trained LLaMA (model_type llama) and a
tiny random Gemma built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import d2prune.api
import d2prune.data
import d2prune.evaluation.attention
import d2prune.selection
from conftest import BOS_ID, DATA, TINY, WORDS, needs_assets, word_tokenizer
from d2prune.cli import main

TINY_BOS = 1  # the tiny LLaMA's tokenizer's BOS id

QUICK = ["--seqlen", "32", "--no-progress", "--data-dir", str(DATA)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D2PRUNE_CACHE", str(tmp_path / "cache"))


def spy(monkeypatch, owner, name: str, seen: list, pick):
    """Wrap ``owner.name`` so that ``pick(args, kwargs, result)`` of every call lands in ``seen``."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(pick(args, kwargs, result))
        return result

    monkeypatch.setattr(owner, name, wrapper)


def tiny_gemma(folder: Path, bos: bool = True) -> Path:
    """A random 1-layer Gemma with the word tokenizer (with or without a BOS token) saved in ``folder``."""
    from transformers import GemmaConfig, GemmaForCausalLM

    tok = word_tokenizer(bos=bos)
    config = GemmaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        bos_token_id=BOS_ID,
        eos_token_id=3,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    GemmaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def words_file(path: Path) -> Path:
    """8 paragraphs of 120 words: documents for calibration and held-out draws, text for evaluation."""
    paragraphs = [" ".join(WORDS[(i * p) % len(WORDS)] for i in range(120)) + " ." for p in range(1, 9)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@needs_assets
def test_prune_with_always_feeds_bos_first_calibration_and_heldout_windows(tmp_path, monkeypatch):
    seen: list = []
    spy(monkeypatch, d2prune.selection, "choose_on_heldout", seen, lambda a, k, r: (a[1], a[2]))
    out = tmp_path / "out"
    args = ["prune", str(TINY), "--method", "d2prune", "--target-layers", "auto", "--nsamples", "2"]
    args += ["--calib", str(words_file(tmp_path / "words.txt"))]
    assert (
        main(
            [
                *args,
                "--heldout-windows",
                "2",
                "--eval",
                "none",
                "--window-bos",
                "always",
                "--output-dir",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    ((calibration, heldout),) = seen
    assert calibration.shape == (2, 32) and heldout.shape == (2, 32)
    assert (calibration[:, 0] == TINY_BOS).all() and (heldout[:, 0] == TINY_BOS).all()
    assert record(out)["window_bos"] == {
        "requested": "always",
        "resolved": "always",
        "reason": "requested",
        "model_type": "llama",
        "token_id": TINY_BOS,
    }


@needs_assets
def test_prune_default_auto_on_llama_keeps_todays_windows(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    seen: list = []
    spy(monkeypatch, d2prune.api, "prune", seen, lambda a, k, r: a[1])
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                str(TINY),
                "--method",
                "magnitude",
                "--nsamples",
                "2",
                "--eval",
                "none",
                "--output-dir",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    today = d2prune.data.get_calibration(
        AutoTokenizer.from_pretrained(str(TINY)), "c4", 2, 32, 0, DATA, cache_dir=False
    )
    assert torch.equal(seen[0], today)
    rec = record(out)["window_bos"]
    assert (rec["requested"], rec["resolved"], rec["token_id"]) == ("auto", "never", None)
    assert "model_type llama" in rec["reason"]


@needs_assets
def test_eval_perplexity_with_and_without_bos(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d2prune.evaluation.perplexity import evaluate_ppl

    text = words_file(tmp_path / "words.txt")
    ppl = {}
    for mode in ("never", "always"):
        out = tmp_path / mode
        args = ["eval", str(TINY), "--eval-data-path", str(text), "--eval-windows", "2", "--window-bos", mode]
        assert main([*args, "--output-dir", str(out), *QUICK]) == 0
        ppl[mode] = record(out)["perplexity"]["model"]["wikitext2"]
        assert record(out)["window_bos"]["resolved"] == mode
    model = AutoModelForCausalLM.from_pretrained(str(TINY))
    tokens = d2prune.data.get_eval_tokens(AutoTokenizer.from_pretrained(str(TINY)), str(text), cache_dir=False)
    for mode in ("never", "always"):
        expected = evaluate_ppl(model, tokens, 32, max_windows=2, progress=False, window_bos=mode)
        assert ppl[mode]["nll_per_window"] == pytest.approx(expected.nll_per_window, rel=1e-6)
    assert ppl["always"]["n_tokens"] == ppl["never"]["n_tokens"] and ppl["always"]["ppl"] != ppl["never"]["ppl"]


def test_auto_puts_bos_first_for_a_gemma_model(tmp_path):
    model = tiny_gemma(tmp_path / "gemma")
    text = words_file(tmp_path / "words.txt")
    out = tmp_path / "out"
    args = ["eval", str(model), "--eval-data-path", str(text), "--seqlen", "16", "--eval-windows", "3", "--no-progress"]
    assert main([*args, "--output-dir", str(out)]) == 0
    rec = record(out)
    assert rec["window_bos"]["requested"] == "auto" and rec["window_bos"]["resolved"] == "always"
    assert rec["window_bos"]["model_type"] == "gemma" and rec["window_bos"]["token_id"] == BOS_ID
    assert "Gemma" in rec["window_bos"]["reason"]
    assert main([*args, "--window-bos", "never", "--output-dir", str(tmp_path / "never")]) == 0
    never = record(tmp_path / "never")
    assert never["window_bos"]["resolved"] == "never"
    assert never["perplexity"]["model"]["wikitext2"]["ppl"] != rec["perplexity"]["model"]["wikitext2"]["ppl"]


@pytest.mark.parametrize("mode", ["always", "auto"])
def test_a_tokenizer_without_bos_is_a_one_line_error(tmp_path, capsys, mode):
    model = tiny_gemma(tmp_path / "gemma", bos=False)
    text = words_file(tmp_path / "words.txt")
    rc = main(["eval", str(model), "--eval-data-path", str(text), "--seqlen", "16", "--window-bos", mode])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("d2prune: error")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert f"--window-bos {mode}" in lines[0] and "has no BOS token" in lines[0]


@pytest.mark.parametrize(
    "command", [["eval", "m"], ["prune", "m"], ["finetune", "m"], ["attention", "a", "b", "--output-dir", "o"]]
)
def test_a_bad_value_is_a_one_line_error(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--window-bos", "sometimes"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("d2prune: error: argument --window-bos: invalid choice: 'sometimes'")
    assert all(c in lines[0] for c in ("auto", "always", "never"))


@needs_assets
def test_attention_windows_and_record(tmp_path, monkeypatch):
    seen: list = []
    spy(monkeypatch, d2prune.evaluation.attention, "attention_diagnostics", seen, lambda a, k, r: a[2])
    out = tmp_path / "att"
    text = words_file(tmp_path / "words.txt")  # quicker to read than c4
    args = ["attention", str(TINY), str(TINY), "--output-dir", str(out), "--windows", "2", "--seqlen", "32"]
    args += ["--data", str(text)]
    assert main([*args, "--window-bos", "always", "--no-progress", "--data-dir", str(DATA)]) == 0
    assert seen[0].shape == (2, 32) and (seen[0][:, 0] == TINY_BOS).all()
    config = json.loads((out / "attention.json").read_text())["config"]
    assert config["window_bos"]["resolved"] == "always" and config["window_bos"]["token_id"] == TINY_BOS


@needs_assets
def test_finetune_blocks_start_with_bos(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    seen: list = []
    spy(monkeypatch, d2prune.data, "get_train_blocks", seen, lambda a, k, r: r)
    out = tmp_path / "ft"
    args = ["finetune", str(TINY), "--max-train-samples", "2", "--block-size", "32", "--max-steps", "1"]
    assert main([*args, "--eval", "none", "--window-bos", "always", "--output-dir", str(out), *QUICK]) == 0
    assert seen[0].shape == (2, 32) and (seen[0][:, 0] == TINY_BOS).all()
    assert record(out)["window_bos"]["resolved"] == "always"
