"""Masked LoRA fine-tuning: the zeros stay zeros, merge is exact, resume is exact, CLI end to end."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import d2prune
from conftest import build_tiny_model, make_calibration_ids
from d2prune.cli import main
from d2prune.errors import UserError
from d2prune.finetune import (
    FinetuneConfig,
    finetune,
    linear_zeros,
    load_adapter,
    masked_modules,
    merge_masked_lora,
    save_adapter,
)
from d2prune.patterns import nm_violations

peft = pytest.importorskip("peft")

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TINY = SHARED / "models" / "aidreams260K"
DATA = SHARED / "data"
needs_assets = pytest.mark.skipif(not (TINY.exists() and DATA.exists()), reason="shared assets missing")

PATTERNS = {"2:4": dict(pattern="2:4"), "unstructured-0.6": dict(sparsity=0.6)}
TARGETS = ["q_proj", "v_proj", "down_proj"]  # down_proj: a linear whose input width differs from q/v's


def pruned_tiny(setting: str, seed: int = 0) -> torch.nn.Module:
    model = build_tiny_model("llama-gqa", seed=seed)
    d2prune.prune(
        model, make_calibration_ids(), d2prune.PruneConfig(method="magnitude", progress=False, **PATTERNS[setting])
    )
    return model


def quick_config(**overrides) -> FinetuneConfig:
    # A large learning rate, so that a few steps move the adapters far from zero.
    options = dict(
        lr=1e-2,
        max_steps=3,
        batch_size=2,
        effective_batch_size=4,
        warmup_steps=0,
        lora_dropout=0.05,
        lora_targets=TARGETS,
        progress=False,
    )
    options.update(overrides)
    return FinetuneConfig(**options)


def train_ids(n: int = 12) -> torch.Tensor:
    return make_calibration_ids(n, 32, seed=1)


@pytest.mark.parametrize("setting", list(PATTERNS))
def test_merge_keeps_sparsity_exactly_and_logits_match_adapter_model(setting):
    model = pruned_tiny(setting)
    dense_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    before = linear_zeros(model)
    report = finetune(model, train_ids(), quick_config())
    masked = masked_modules(report.model)
    assert len(masked) == 2 * 3 and all(m.sparsity_mask is not None for m in masked.values())
    # A plain LoRA merge would re-densify: the raw update is non-zero at pruned positions.
    some = next(iter(masked.values()))
    raw = some.lora_B["default"].weight @ some.lora_A["default"].weight
    assert (raw[~some.sparsity_mask] != 0).any()

    ids = make_calibration_ids(3, 24, seed=7)
    with torch.no_grad():
        adapter_logits = report.model(input_ids=ids).logits
    masks = {n: m.sparsity_mask.clone() for n, m in masked.items()}
    merged = merge_masked_lora(report.model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-5)

    after = linear_zeros(merged)
    assert after == before  # every linear: the same number of zeros
    assert report.zeros == sum(z for z, _ in after.values()) and report.overall_sparsity == pytest.approx(
        0.5 if setting == "2:4" else 0.6, abs=0.01
    )
    for name, keep in masks.items():
        weight = merged.get_submodule(name).weight
        assert torch.equal(weight != 0, keep)  # the same positions, not only the same count
        changed = weight != dense_weights[name]
        assert changed[keep].float().mean() > 0.5  # training did move the kept weights
        if setting == "2:4":
            assert nm_violations(weight, 2, 4) == 0


def test_pruned_positions_stay_zero_while_training():
    model = pruned_tiny("unstructured-0.6")
    base = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    seen = []

    def check(step: int, loss: float) -> None:
        for name, layer in masked_modules(model).items():
            eff = layer.merged_weight("default").detach()
            keep = layer.sparsity_mask
            assert torch.equal(eff[~keep], torch.zeros_like(eff[~keep]))
            assert torch.equal(layer.get_base_layer().weight, base[name])  # W itself is frozen
            seen.append((step, float((eff[keep] - base[name][keep]).abs().max())))

    finetune(model, train_ids(), quick_config(max_steps=4), on_step=check)
    assert sorted({s for s, _ in seen}) == [1, 2, 3, 4]
    assert max(d for _, d in seen) > 1e-3  # a non-trivial update, yet the zeros held


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_forward_uses_the_masked_weight(dropout):
    """What training sees is W + M⊙sBA: without dropout one matmul, with dropout on the adapter input."""
    model = pruned_tiny("2:4")
    report = finetune(model, train_ids(), quick_config(lora_dropout=dropout, max_steps=2))
    layer = next(iter(masked_modules(report.model).values()))
    layer.train()
    x = torch.randn(2, 5, layer.in_features)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    base = layer.get_base_layer()
    delta = torch.where(layer.sparsity_mask, layer.lora_B["default"].weight @ layer.lora_A["default"].weight, 0.0)
    expected = base(x) + F.linear(layer.lora_dropout["default"](x), delta * layer.scaling["default"])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_resume_from_checkpoint_gives_the_same_final_weights(tmp_path):
    pruned = pruned_tiny("2:4")
    config = quick_config(max_steps=5, save_steps=2)

    def adapter_state(report):
        return {n: p.detach().clone() for n, p in report.model.named_parameters() if p.requires_grad}

    full = finetune(copy.deepcopy(pruned), train_ids(), config, checkpoint_dir=tmp_path / "a")

    class Stop(Exception):
        pass

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        finetune(copy.deepcopy(pruned), train_ids(), config, checkpoint_dir=tmp_path / "b", on_step=interrupt)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["step-000002"]
    resumed = finetune(copy.deepcopy(pruned), train_ids(), config, checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.start_step == 2 and resumed.resumed_from.endswith("step-000002")
    assert resumed.loss_curve == full.loss_curve and resumed.tokens_seen == full.tokens_seen
    a, b = adapter_state(full), adapter_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Other settings cannot continue that checkpoint.
    with pytest.raises(UserError, match="different run.*lr"):
        finetune(
            copy.deepcopy(pruned),
            train_ids(),
            quick_config(max_steps=5, save_steps=2, lr=5e-3),
            checkpoint_dir=tmp_path / "b",
            resume=True,
        )
    with pytest.raises(UserError, match="no checkpoint"):
        finetune(copy.deepcopy(pruned), train_ids(), config, checkpoint_dir=tmp_path / "empty", resume=True)


def test_adapter_saved_separately_reloads_onto_the_pruned_base(tmp_path):
    pruned = pruned_tiny("unstructured-0.6")
    report = finetune(copy.deepcopy(pruned), train_ids(), quick_config())
    save_adapter(report.model, None, tmp_path / "adapter", "some/base")
    ids = make_calibration_ids(2, 16, seed=9)
    with torch.no_grad():
        expected = report.model(input_ids=ids).logits
        loaded = load_adapter(copy.deepcopy(pruned), tmp_path / "adapter")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert json.loads((tmp_path / "adapter" / "d2prune_adapter.json").read_text())["kind"] == "masked-lora"
    with pytest.raises(UserError, match="not a masked LoRA adapter"):
        load_adapter(copy.deepcopy(pruned), tmp_path)


def test_a_kept_weight_never_merges_to_exactly_zero():
    model = pruned_tiny("2:4")
    before = linear_zeros(model)
    report = finetune(model, train_ids(), quick_config(max_steps=1, lora_targets=["q_proj"], lora_r=1, lora_alpha=2))
    name, layer = next(iter(masked_modules(report.model).items()))
    weight = layer.get_base_layer().weight
    i, j = (int(v) for v in layer.sparsity_mask.nonzero()[0])
    with torch.no_grad():  # s·B·A = 2·(-W_ij/2)·1 at (i, j) only: W + Δ is exactly 0 there
        layer.lora_A["default"].weight.zero_()[0, j] = 1.0
        layer.lora_B["default"].weight.zero_()[i, 0] = -weight[i, j] / 2
    merged = merge_masked_lora(report.model)
    value = merged.get_submodule(name).weight[i, j]
    assert value != 0 and abs(float(value)) < 1e-40
    assert linear_zeros(merged) == before


def test_bad_settings_are_user_errors():
    model = pruned_tiny("2:4")
    with pytest.raises(UserError, match="'w_proj' matches no module.*q_proj"):
        finetune(copy.deepcopy(model), train_ids(), quick_config(lora_targets=["w_proj"]))
    with pytest.raises(UserError, match="not a linear"):
        finetune(copy.deepcopy(model), train_ids(), quick_config(lora_targets=["self_attn"]))
    with pytest.raises(UserError, match="not a multiple"):
        quick_config(effective_batch_size=5)
    with pytest.raises(UserError, match="dropout"):
        quick_config(lora_dropout=1.0)


@needs_assets
def test_train_blocks_concatenate_documents_in_order(tmp_path):
    from transformers import AutoTokenizer

    from d2prune.data import get_train_blocks

    tok = AutoTokenizer.from_pretrained(TINY)
    docs = [f"Document number {i} tells a short story about a cat and a dog." for i in range(30)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    blocks = get_train_blocks(tok, str(src), block_size=16, max_samples=5, cache_dir=False)
    flat = [t for d in docs for t in tok(d)["input_ids"]]
    assert blocks.shape == (5, 16) and blocks.reshape(-1).tolist() == flat[:80]
    every = get_train_blocks(tok, str(src), block_size=16, cache_dir=False)
    assert every.shape[0] == len(flat) // 16
    with pytest.raises(UserError, match="fewer than one block"):
        get_train_blocks(tok, str(src), block_size=100000, cache_dir=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D2PRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


QUICK_EVAL = ["--seqlen", "64", "--eval-windows", "2", "--no-progress", "--data-dir", str(DATA)]


@needs_assets
def test_cli_finetune_end_to_end(tmp_path, cache, capsys):
    from transformers import AutoModelForCausalLM

    pruned = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                str(TINY),
                "--method",
                "magnitude",
                "--sparsity",
                "0.7",
                "--nsamples",
                "2",
                "--eval",
                "none",
                "--output-dir",
                str(pruned),
                "--save-model",
                *QUICK_EVAL,
            ]
        )
        == 0
    )
    out = tmp_path / "ft"
    args = [
        "finetune",
        str(pruned / "model"),
        "--data",
        "c4",
        "--max-train-samples",
        "8",
        "--block-size",
        "32",
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lora-dropout",
        "0.05",
        "--lora-targets",
        "q_proj,v_proj",
        "--batch-size",
        "2",
        "--effective-batch-size",
        "4",
        "--save-steps",
        "1",
        "--save",
        "both",
        "--eval-before",
        "--output-dir",
        str(out),
        *QUICK_EVAL,
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ppl after (wikitext2)" in printed and "ppl before (wikitext2)" in printed
    rec = json.loads((out / "run.json").read_text())
    assert rec["finetune"]["steps"] == 2 and rec["data"] == {
        "source": "c4",
        "block_size": 32,
        "blocks": 8,
        "blocks_seen": 8,
        "tokens_seen": 256,
    }
    assert [c["step"] for c in rec["loss_curve"]] == [1, 2]
    assert rec["sparsity"]["zeros_before"] == rec["sparsity"]["zeros_after"]
    assert rec["sparsity"]["before"] == json.loads((pruned / "run.json").read_text())["overall_sparsity"]
    assert rec["versions"]["peft"] == peft.__version__
    assert (out / "loss.png").stat().st_size > 1000
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]

    # The merged model loads with plain transformers, with the zeros of the pruned one.
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(pruned / "model")
    for (name, a), (_, b) in zip(merged.named_parameters(), original.named_parameters()):
        if a.dim() == 2 and ".layers." in name:
            assert torch.equal(a == 0, b == 0), name
    assert json.loads((out / "model" / "sparsity.json").read_text())["finetune"]["tokens_seen"] == 256

    # `d2prune eval` gives the recorded perplexity on the merged folder and on the adapter folder.
    after = rec["perplexity"]["finetuned"]["wikitext2"]["ppl"]
    for folder in ("model", "adapter"):
        assert main(["eval", str(out / folder), "--output-dir", str(tmp_path / f"ev-{folder}"), *QUICK_EVAL]) == 0
        ev = json.loads((tmp_path / f"ev-{folder}" / "run.json").read_text())
        assert ev["perplexity"]["model"]["wikitext2"]["ppl"] == pytest.approx(after, rel=1e-5)

    # Resuming the finished run trains no further step and gives the same model.
    assert main([*args, "--resume", "--eval-before", "--save", "merged"]) == 0
    again = json.loads((out / "run.json").read_text())
    assert again["finetune"]["start_step"] == 2 and again["perplexity"]["finetuned"] == rec["perplexity"]["finetuned"]


@needs_assets
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["/no/such/model"], "does not exist"),
        ([str(TINY), "--lora-targets", "q_proj,qq_proj"], "'qq_proj' matches no module"),
        ([str(TINY), "--block-size", "4096"], "--block-size must be in [2, 128]"),
        ([str(TINY), "--effective-batch-size", "3", "--batch-size", "2"], "not a multiple"),
        ([str(TINY), "--resume"], "no checkpoint to resume"),
        ([str(TINY), "--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
        ([str(TINY), "--lr", "0"], "learning rate"),
    ],
)
def test_cli_user_mistakes_give_one_line_and_exit_2(extra, needle, tmp_path, cache, capsys):
    # Later flags win: each case overrides the quick defaults.
    rc = main(
        [
            "finetune",
            extra[0],
            "--block-size",
            "32",
            "--max-steps",
            "1",
            "--output-dir",
            str(tmp_path / "out"),
            *QUICK_EVAL,
            *extra[1:],
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("d2prune: error")]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "run.json").exists()


def test_cli_finetune_needs_an_output_dir(capsys):
    assert main(["finetune", "whatever"]) == 2
    assert "needs --output-dir" in capsys.readouterr().err
