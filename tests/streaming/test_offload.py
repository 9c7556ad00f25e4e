"""Streaming models from disk (d2prune.streaming), activation offload (activations.py) and resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import d2prune
import d2prune.streaming as offload
from conftest import build_tiny_model, make_calibration_ids
from d2prune.errors import UserError
from d2prune.evaluation.perplexity import evaluate_ppl
from d2prune.io.models import save_pruned
from d2prune.streaming import (
    INDEX_FILE,
    PROGRESS_FILE,
    StreamedModel,
    evaluate_streamed,
    prune_checkpoint,
    read_progress,
    resolve_offload,
    work_dir,
)

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
TINY = SHARED / "models" / "aidreams260K"
DATA = SHARED / "data"
needs_assets = pytest.mark.skipif(not (TINY.exists() and DATA.exists()), reason="shared assets missing")


def _config(method="sparsegpt", **kw) -> d2prune.PruneConfig:
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 2)
    return d2prune.PruneConfig(method=method, **kw)


def _checkpoint(tmp_path: Path, key: str, name: str = "src", **overrides) -> tuple[torch.nn.Module, Path]:
    model = build_tiny_model(key, **overrides)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model, folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    return out


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert torch.equal(ta[key], tb[key]), key


# --------------------------------------------------------------------------------------------------
# streamed pruning = in-memory pruning
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,method,tied",
    [
        ("llama-gqa", "sparsegpt", False),
        ("llama-gqa", "wanda", True),
        ("opt", "sparsegpt", True),
        ("gpt-neox", "magnitude", False),
        ("opt", "alps", False),
        ("llama-gqa", "dsnot", False),
        ("opt", "ria", False),
    ],
)
def test_streamed_output_is_identical_to_in_memory_pruning(tmp_path, key, method, tied):
    model, src = _checkpoint(tmp_path, key, tie_word_embeddings=tied)
    ids = make_calibration_ids(windows=6, tokens=16)
    report, out = prune_checkpoint(src, ids, _config(method), tmp_path / "streamed")

    mem_report = d2prune.prune(model, ids, _config(method))
    save_pruned(model, None, tmp_path / "memory", mem_report.sparsity_record())
    _assert_identical(out, tmp_path / "memory")
    assert [lin.name for lin in report.linears] == [lin.name for lin in mem_report.linears]
    assert report.overall_sparsity == mem_report.overall_sparsity == 0.5

    # A normal sharded checkpoint: index over every shard, loadable by from_pretrained.
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    assert len(set(index["weight_map"].values())) >= model.config.num_hidden_layers + 1
    assert set(index["weight_map"]) == set(_tensors(out))
    assert not (tied and "lm_head.weight" in index["weight_map"])  # a tied head is not stored twice
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "sparsity.json").read_text())["overall_sparsity"] == 0.5
    assert not work_dir(out).exists() and not (out / PROGRESS_FILE).exists()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.tie_word_embeddings == tied
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    tokens = make_calibration_ids(windows=3, tokens=16, seed=5).reshape(-1)
    expected = evaluate_ppl(model, tokens, 16, progress=False)
    assert evaluate_ppl(loaded, tokens, 16, progress=False).ppl == expected.ppl
    # Layer-by-layer evaluation from disk gives the same numbers.
    streamed = evaluate_streamed(out, tokens, 16, progress=False)
    assert streamed.nll_per_window == expected.nll_per_window
    # With BOS first in every window (--window-bos always; the config's BOS id) they agree as well.
    with_bos = evaluate_ppl(loaded, tokens, 16, progress=False, window_bos="always")
    assert (
        evaluate_streamed(out, tokens, 16, progress=False, window_bos="always").nll_per_window
        == with_bos.nll_per_window
    )
    assert with_bos.nll_per_window != expected.nll_per_window


def test_streamed_owl_and_half_precision_match_in_memory(tmp_path):
    model, src = _checkpoint(tmp_path, "qwen3")
    ids = make_calibration_ids(windows=4, tokens=16)
    config = _config("sparsegpt", sparsity_profile="owl", owl_lambda=0.1)
    report, out = prune_checkpoint(src, ids, config, tmp_path / "streamed", dtype="bfloat16")
    # As ``load_model`` loads it (``model.to`` would also cast the rotary buffers, unlike loading).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    mem_report = d2prune.prune(model, ids, config)
    save_pruned(model, None, tmp_path / "memory", mem_report.sparsity_record())
    _assert_identical(out, tmp_path / "memory")
    assert report.layer_sparsities == mem_report.layer_sparsities != [0.5, 0.5]
    assert all(t.dtype == torch.bfloat16 for t in _tensors(out).values())


def test_at_most_one_decoder_layer_is_in_memory(tmp_path):
    _, src = _checkpoint(tmp_path, "llama-gqa", num_hidden_layers=4)
    streamed = StreamedModel(src)
    stack = streamed.stack
    layer_names = {i: set(streamed.names_under(streamed.layer_prefix(i))) for i in range(4)}
    seen: list[tuple[str, list[int]]] = []

    def loaded_layers() -> list[int]:
        present = set(streamed.materialized())
        return [i for i, names in layer_names.items() if names & present]

    def on_layer(index):
        def hook(module, args):
            seen.append((f"layer{index}", loaded_layers()))
            assert "lm_head.weight" not in streamed.materialized()

        return hook

    handles = [layer.register_forward_pre_hook(on_layer(i)) for i, layer in enumerate(stack.layers)]
    embed = streamed.model.get_input_embeddings()
    handles.append(embed.register_forward_pre_hook(lambda m, a: seen.append(("embed", loaded_layers()))))
    prune_checkpoint(src, make_calibration_ids(windows=4, tokens=16), _config(), tmp_path / "out", streamed=streamed)
    for h in handles:
        h.remove()

    # Every forward of decoder layer i ran with layer i, and only it, materialized; the layer-0
    # capture ran with none; nothing stays loaded at the end.
    layer_calls = [(who, layers) for who, layers in seen if who != "embed"]
    assert len(layer_calls) == 4 * 2 * 2  # 4 layers × (statistics + pruned forward) × 2 batches
    assert all(layers == [int(who.removeprefix("layer"))] for who, layers in layer_calls), layer_calls
    assert [layers for who, layers in seen if who == "embed"] == [[], []]
    assert streamed.materialized() == []


# --------------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------------


class _Stop(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("activations", ["ram", "disk"])
def test_interrupted_run_resumes_to_an_identical_result(tmp_path, monkeypatch, activations):
    _, src = _checkpoint(tmp_path, "llama-gqa", num_hidden_layers=4)
    ids = make_calibration_ids(windows=6, tokens=16)
    config = _config("sparsegpt", activation_offload=activations)
    full, _ = prune_checkpoint(src, ids, config, tmp_path / "full")

    target = tmp_path / "resumed"
    original = offload.StreamedStore.layer_done

    def stop_after_layer_1(self, index, report, acts):
        original(self, index, report, acts)
        if index == 1:
            raise _Stop  # like Ctrl-C between layers

    monkeypatch.setattr(offload.StreamedStore, "layer_done", stop_after_layer_1)
    with pytest.raises(_Stop):
        prune_checkpoint(src, ids, config, target)
    monkeypatch.setattr(offload.StreamedStore, "layer_done", original)

    assert not target.exists()  # nothing that looks complete
    progress = read_progress(target)
    assert progress["next_layer"] == 2 and progress["activations"]["storage"] == activations
    assert len({f for f in progress["weight_map"].values()}) == 2
    with pytest.raises(UserError, match="--resume"):
        prune_checkpoint(src, ids, config, target)  # a fresh run must not wipe it silently
    with pytest.raises(UserError, match="config"):
        prune_checkpoint(src, ids, _config("sparsegpt", sparsity=0.6), target, resume=True)
    with pytest.raises(UserError, match="calibration"):
        prune_checkpoint(src, make_calibration_ids(windows=6, tokens=16, seed=1), config, target, resume=True)

    resumed, _ = prune_checkpoint(src, ids, config, target, resume=True)
    _assert_identical(target, tmp_path / "full")
    assert resumed.resumed_at_layer == 2 and full.resumed_at_layer is None
    summary = lambda report: [(lin.name, lin.sparsity, lin.relative_error) for lin in report.linears]
    assert summary(resumed) == summary(full)
    assert ("resume_forward" in resumed.timings) == (activations == "ram")
    assert not work_dir(target).exists()
    with pytest.raises(UserError, match="already complete"):
        prune_checkpoint(src, ids, config, target, resume=True)


@pytest.mark.parametrize("method", ["wanda", "d2prune"])
def test_streamed_refit_matches_in_memory_and_survives_a_resume(tmp_path, monkeypatch, method):
    model, src = _checkpoint(tmp_path, "llama-gqa", num_hidden_layers=3)
    ids = make_calibration_ids(windows=6, tokens=16)
    config = _config(
        d2prune.D2PruneConfig(target_layers=["self_attn.v_proj"]) if method == "d2prune" else method,
        refit="cg",
        activation_offload="disk",
    )
    full, out = prune_checkpoint(src, ids, config, tmp_path / "full")
    mem_report = d2prune.prune(model, ids, config)
    save_pruned(model, None, tmp_path / "memory", mem_report.sparsity_record())
    _assert_identical(out, tmp_path / "memory")
    summary = lambda report: [
        (lin.name, lin.sparsity, lin.relative_error, lin.relative_error_before_refit) for lin in report.linears
    ]
    assert summary(full) == summary(mem_report)
    assert sum(lin.relative_error_before_refit is not None for lin in full.linears) == 3 * (7 - (method == "d2prune"))

    # Interrupted after layer 1 and resumed: the reports of layers 0 and 1 come from the resume state.
    original = offload.StreamedStore.layer_done

    def stop_after_layer_1(self, index, report, acts):
        original(self, index, report, acts)
        if index == 1:
            raise _Stop

    monkeypatch.setattr(offload.StreamedStore, "layer_done", stop_after_layer_1)
    with pytest.raises(_Stop):
        prune_checkpoint(src, ids, config, tmp_path / "resumed")
    monkeypatch.setattr(offload.StreamedStore, "layer_done", original)
    saved = read_progress(tmp_path / "resumed")["report"]["linears"]
    assert len(saved) == 14 and all(
        "relative_error_before_refit" in d for d in saved if not d["name"].endswith("v_proj") or method != "d2prune"
    )
    resumed, _ = prune_checkpoint(src, ids, config, tmp_path / "resumed", resume=True)
    assert resumed.resumed_at_layer == 2
    assert summary(resumed) == summary(full)
    _assert_identical(tmp_path / "resumed", out)


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "d2prune", *args], capture_output=True, text=True, env=env, timeout=600
    )


@needs_assets
def test_killed_cli_run_resumes_bit_identical(tmp_path):
    common = [
        "prune",
        str(TINY),
        "--method",
        "sparsegpt",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval",
        "none",
        "--no-progress",
        "--data-dir",
        str(DATA),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--offload",
        "disk",
        "--activation-offload",
        "disk",
    ]
    full = _cli([*common, "--output-dir", str(tmp_path / "full")])  # same thread count as the runs below
    assert full.returncode == 0, full.stderr

    out = tmp_path / "out"
    killed = _cli([*common, "--output-dir", str(out)], env={offload.KILL_ENV: "1"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "model").exists() and not (out / "run.json").exists()
    assert read_progress(out / "model")["next_layer"] == 2

    resumed = _cli([*common, "--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    _assert_identical(out / "model", tmp_path / "full" / "model")
    record = json.loads((out / "run.json").read_text())
    assert record["resumed_at_layer"] == 2 and record["offload"]["weights"] == "disk"
    assert record["activations"]["storage"] == "disk" and record["activations"]["bytes"] == 2 * 4 * 32 * 64 * 4
    full_record = json.loads((tmp_path / "full" / "run.json").read_text())
    assert record["overall_sparsity"] == full_record["overall_sparsity"]


@needs_assets
def test_cli_streamed_run_evaluates_layer_by_layer_like_in_memory(tmp_path):
    common = [
        "prune",
        str(TINY),
        "--method",
        "wanda",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval-windows",
        "3",
        "--no-progress",
        "--data-dir",
        str(DATA),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--save-model",
    ]
    from d2prune.cli import main

    assert main([*common, "--offload", "disk", "--output-dir", str(tmp_path / "disk")]) == 0
    assert main([*common, "--offload", "none", "--output-dir", str(tmp_path / "memory")]) == 0
    a = json.loads((tmp_path / "disk" / "run.json").read_text())
    b = json.loads((tmp_path / "memory" / "run.json").read_text())
    assert a["offload"]["weights"] == "disk" and b["offload"]["weights"] == "none"
    assert a["perplexity"]["pruned"]["wikitext2"] == b["perplexity"]["pruned"]["wikitext2"]
    _assert_identical(tmp_path / "disk" / "model", tmp_path / "memory" / "model")
    # The tokenizer travels with the streamed output, and `d2prune eval` streams it as well.
    assert (tmp_path / "disk" / "model" / "tokenizer.json").is_file()
    assert (
        main(
            [
                "eval",
                str(tmp_path / "disk" / "model"),
                "--offload",
                "disk",
                "--seqlen",
                "32",
                "--eval-windows",
                "3",
                "--no-progress",
                "--data-dir",
                str(DATA),
                "--output-dir",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    c = json.loads((tmp_path / "eval" / "run.json").read_text())
    assert c["perplexity"]["model"]["wikitext2"] == a["perplexity"]["pruned"]["wikitext2"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--offload", "disk"], "needs --output-dir"),
        (["--offload", "bogus", "--output-dir", "X"], "unknown offload mode"),
        (["--activation-offload", "tape"], "unknown activation offload mode"),
        (["--offload", "none", "--resume", "X"], "cannot use --offload none"),
        (["--offload", "disk", "--output-dir", "X", "--method", "pruner-zero"], "gradient pass"),
    ],
)
def test_cli_offload_mistakes_are_one_line_errors(tmp_path, capsys, args, message):
    from d2prune.cli import main

    _, src = _checkpoint(tmp_path, "llama-gqa")
    capsys.readouterr()  # the checkpoint writer's progress bar
    args = [a.replace("X", str(tmp_path / "o")) for a in args]
    assert main(["prune", str(src), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_offload_disk_needs_a_safetensors_folder(tmp_path):
    with pytest.raises(UserError, match="local model folder"):
        resolve_offload("disk", str(tmp_path / "nothing.gguf"), "float32", 0.5)


def test_auto_offload_streams_when_the_weights_exceed_the_threshold(tmp_path, monkeypatch):
    _, src = _checkpoint(tmp_path, "llama-gqa")
    monkeypatch.setattr(offload.checkpoint, "available_memory", lambda: 10**12)
    small = resolve_offload("auto", str(src), "float32", 0.5)
    assert small["weights"] == "none"
    assert small["weights_bytes"] == sum(p.numel() * 4 for p in build_tiny_model("llama-gqa").parameters())
    assert resolve_offload("auto", str(src), "float32", 1e-12)["weights"] == "disk"
    assert resolve_offload("auto", str(src), "float16", 0.5)["weights_bytes"] == small["weights_bytes"] // 2
    assert resolve_offload("auto", "smollm2-135m", "float32", 1e-12)["weights"] == "none"
