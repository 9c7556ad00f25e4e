"""``d2prune sweep`` on a tiny random LLaMA folder: every cell equals its own ``d2prune prune`` run
(no state leaks from one cell into the next), resume, interruption, the report and grid mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import QUICK_CLI, TINY, needs_assets
from d2prune.cli import main, sweep_report
from d2prune.cli import prune as prune_command
from d2prune.cli import sweep as sweep_command

GRID = [
    "--methods",
    "wanda",
    "d2v",
    "--sparsities",
    "0.5",
    "0.7",
    "--variant",
    "d2v=--method d2prune --target-layers self_attn.v_proj",
]
CELLS = ["wanda-0.5", "d2v-0.5", "wanda-0.7", "d2v-0.7"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A seeded random 2-layer LLaMA (tied embeddings) with the tiny trained model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("model")
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(folder)
    return folder


def sweep(folder: Path, out: Path, *extra: str) -> int:
    return main(["sweep", str(folder), *GRID, *QUICK_CLI, "--output-dir", str(out), *extra])


def ppl(record: dict, label: str = "pruned") -> float:
    return record["perplexity"][label]["wikitext2"]["ppl"]


@pytest.fixture
def count_prunes(monkeypatch):
    """The number of prunes run since the fixture was made (``calls[0]``); ``fail_at`` interrupts one."""
    calls, real = [0], prune_command.prune_model
    fail_at: list[int] = []

    def counting(*args, **kwargs):
        calls[0] += 1
        if calls[0] in fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_command, "prune_model", counting)
    return calls, fail_at


@needs_assets
def test_every_cell_equals_its_own_prune_run_and_the_report_is_written(tiny_folder, tmp_path, cli_cache, capsys):
    out = tmp_path / "sweep"
    assert sweep(tiny_folder, out) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in summary["cells"]] == CELLS
    records = {name: json.loads((out / "cells" / name / "run.json").read_text()) for name in CELLS}
    dense = {ppl(r, "dense") for r in records.values()}
    assert len(dense) == 1  # measured once
    for name, record in records.items():
        # Every cell but the first ran after another one pruned the shared model: each equals a
        # solo `d2prune prune` of its recorded command, to the last bit.
        assert record["command"].startswith("d2prune prune ")
        solo = tmp_path / f"solo-{name}"
        argv = record["sweep_cell"]["argv"]
        assert main(["prune", *argv, "--eval-dense", "--no-progress", "--output-dir", str(solo)]) == 0
        alone = json.loads((solo / "run.json").read_text())
        assert ppl(record) == ppl(alone), name
        assert ppl(alone, "dense") in dense
        assert record["config"] == alone["config"]
        assert record["overall_sparsity"] == alone["overall_sparsity"]
    assert records["d2v-0.7"]["config"]["method"]["target_layers"] == ["self_attn.v_proj"]
    assert records["wanda-0.7"]["config"]["sparsity"] == 0.7
    # The report: the table with one row per cell, the plot (a PNG) and the summary's result rows.
    report = (out / "report.md").read_text()
    for name in CELLS:
        assert f"| {name} |" in report
    assert (out / "ppl_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["cell"]: r for r in summary["results"]}
    assert rows["wanda-0.5"]["pruned"] == ppl(records["wanda-0.5"])
    assert rows["d2v-0.7"]["variant"] == "d2v" and rows["d2v-0.7"]["method"] == "d2prune"


@needs_assets
def test_model_level_passes_leave_nothing_for_the_next_cell(tiny_folder, tmp_path, cli_cache, capsys):
    # Pruner-Zero's gradient pass over the whole model, then D²Prune's held-out choice (pruning
    # copies of the model) and OWL's statistics pass: each cell still equals its solo run.
    out = tmp_path / "sweep"
    grid = ["--methods", "pruner-zero", "d2auto", "--variant", "d2auto=--method d2prune --target-layers auto"]
    assert main(["sweep", str(tiny_folder), *grid, "--owl", "on", *QUICK_CLI, "--output-dir", str(out)]) == 0
    for name in ("pruner-zero-owl-0.5", "d2auto-owl-0.5"):
        record = json.loads((out / "cells" / name / "run.json").read_text())
        solo = tmp_path / f"solo-{name}"
        assert main(["prune", *record["sweep_cell"]["argv"], "--no-progress", "--output-dir", str(solo)]) == 0
        alone = json.loads((solo / "run.json").read_text())
        assert ppl(record) == ppl(alone), name
        assert record["layer_sparsities"] == alone["layer_sparsities"]
    assert "target_search" in record


@needs_assets
def test_resume_skips_finished_cells_and_refuses_changed_ones(tiny_folder, tmp_path, cli_cache, count_prunes, capsys):
    calls, _ = count_prunes
    out = tmp_path / "sweep"
    assert sweep(tiny_folder, out) == 0 and calls[0] == 4
    first = (out / "cells" / "wanda-0.7" / "run.json").read_text()
    assert sweep(tiny_folder, out) == 0 and calls[0] == 4  # all done: nothing pruned, report rewritten
    (out / "cells" / "d2v-0.5" / "run.json").unlink()
    assert sweep(tiny_folder, out, "--patterns", "unstructured", "2:4") == 0
    assert calls[0] == 4 + 1 + 2  # the removed cell and the two 2:4 cells
    assert (out / "cells" / "wanda-0.7" / "run.json").read_text() == first
    assert "wanda-2:4" in [c["name"] for c in json.loads((out / "sweep.json").read_text())["cells"]]
    capsys.readouterr()
    # The same cells with other options: an error naming the folder, nothing pruned.
    assert sweep(tiny_folder, out, "--no-measure-error") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a run of other options" in err and "wanda-0.5" in err
    assert calls[0] == 7


@needs_assets
def test_a_rerun_reuses_the_dense_perplexity_an_earlier_run_measured(tiny_folder, tmp_path, cli_cache, monkeypatch):
    from d2prune.cli import common

    labels, real = [], common.evaluate
    monkeypatch.setattr(
        common, "evaluate", lambda m, t, ns, label, res: labels.append(label) or real(m, t, ns, label, res)
    )
    out = tmp_path / "sweep"
    assert sweep(tiny_folder, out, "--methods", "wanda") == 0
    assert labels.count("dense") == 1
    first = json.loads((out / "cells" / "wanda-0.5" / "run.json").read_text())
    assert "sweep_dense_perplexity" not in first
    assert sweep(tiny_folder, out, "--methods", "wanda", "d2v") == 0  # two new cells, in a new process's session
    assert labels.count("dense") == 1 and labels.count("pruned") == 4
    again = json.loads((out / "cells" / "d2v-0.5" / "run.json").read_text())
    assert again["perplexity"]["dense"] == first["perplexity"]["dense"]
    assert "earlier run" in again["sweep_dense_perplexity"]
    # Other evaluation options: measured afresh, both kept.
    assert sweep(tiny_folder, tmp_path / "other", "--methods", "wanda", "--eval-windows", "2") == 0
    assert labels.count("dense") == 2
    assert sweep(tiny_folder, out, "--methods", "wanda", "--eval-windows", "2", "--sparsities", "0.6") == 0
    assert labels.count("dense") == 3 and len(json.loads((out / sweep_command.DENSE_CACHE).read_text())) == 2


@needs_assets
def test_interrupted_sweep_keeps_finished_cells_only_and_continues(
    tiny_folder, tmp_path, cli_cache, count_prunes, capsys
):
    calls, fail_at = count_prunes
    out = tmp_path / "sweep"
    fail_at.append(2)
    assert sweep(tiny_folder, out) == 130
    assert "rerun the same command" in capsys.readouterr().err
    assert (out / "cells" / "wanda-0.5" / "run.json").exists()
    # No half-written cell, and no report that would look like the grid's.
    assert not (out / "cells" / "d2v-0.5" / "run.json").exists()
    assert not [p for p in out.rglob("*") if p.is_file() and p.name not in ("run.json", sweep_command.DENSE_CACHE)]
    assert not any((out / name).exists() for name in sweep_report.OUTPUTS)
    fail_at.clear()
    assert sweep(tiny_folder, out) == 0
    assert calls[0] == 2 + 3  # the interrupted cell again and the two after it
    assert (out / "report.md").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--methods", "wandaa"], "unknown method or variant 'wandaa'"),
        (["--patterns", "2-4"], "unknown pattern '2-4'"),
        (["--variant", "no-equals-sign"], '--variant takes NAME="OPTIONS"'),
        (["--variant", "d2v=--method sparsegpt"], "--variant d2v is given twice"),
        (["--variant", "x=--bogus 1", "--methods", "x"], "cell x-0.5: unrecognized arguments: --bogus"),
        (["--variant", "x=--method wanda stray", "--methods", "x"], "--variant x: 'stray' is not an option"),
        (["--refit-target-layers"], "cell wanda-0.5: --refit-target-layers applies to"),
        (["--sparsities", "1.5"], "cell wanda-1.5: sparsity must be in [0, 1)"),
        (["--save-model", "somewhere"], "cell wanda-0.5: --save-model saves each cell's model in its folder"),
    ],
)
def test_grid_mistakes_are_one_line_errors_before_loading(tmp_path, capsys, extra, needle, monkeypatch):
    from d2prune.cli import common

    monkeypatch.setattr(common, "load", lambda *a, **k: pytest.fail("loaded a model for a bad grid"))
    assert main(["sweep", "some-model", *GRID, "--output-dir", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("d2prune: error: ") and needle in err, err
    assert not (tmp_path / "o").exists()


def test_sweep_needs_an_output_dir(capsys):
    assert main(["sweep", "some-model", "--methods", "wanda"]) == 2
    assert "needs --output-dir" in capsys.readouterr().err


def test_owl_cells_of_nm_patterns_are_skipped_and_named(tmp_path):
    from d2prune.cli.main import build_parser
    from d2prune.cli.sweep import build_grid

    args = build_parser().parse_args(
        [
            "sweep",
            "m",
            "--methods",
            "wanda",
            "--patterns",
            "unstructured",
            "2:4",
            "--owl",
            "off",
            "on",
            "--refit",
            "none",
            "cg",
        ]
    )
    args.model = "m"
    cells = {c.name: c for c in build_grid(args)}
    assert list(cells) == [
        "wanda-0.5",
        "wanda-refit-cg-0.5",
        "wanda-owl-0.5",
        "wanda-owl-refit-cg-0.5",
        "wanda-2:4",
        "wanda-refit-cg-2:4",
        "wanda-owl-2:4",
        "wanda-owl-refit-cg-2:4",
    ]
    assert cells["wanda-owl-2:4"].skipped and cells["wanda-owl-refit-cg-2:4"].skipped
    assert not cells["wanda-refit-cg-2:4"].skipped and cells["wanda-2:4"].folder == "wanda-2_4"
    assert cells["wanda-owl-refit-cg-0.5"].argv == [
        "m",
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--sparsity-profile",
        "owl",
        "--refit",
        "cg",
    ]


def test_report_metric_is_perplexity_or_accuracy_whichever_the_record_has(tmp_path):
    lm = {"perplexity": {"dense": {"wikitext2": {"ppl": 30.0}}, "pruned": {"wikitext2": {"ppl": 60.0}}}}
    vision = {"accuracy": {"dense": {"imagenet": {"top1": 0.8}}, "pruned": {"imagenet": {"top1": 0.7}}}}
    assert sweep_report.metric(lm, "pruned") == ("ppl (wikitext2)", 60.0)
    assert sweep_report.metric(vision, "dense") == ("top1 (imagenet)", 0.8)
    assert sweep_report.metric({"perplexity": {}}, "pruned") is None
    config = {"config": {"method": {"name": "wanda"}, "pattern": "unstructured", "sparsity": 0.5}}
    rows = [
        sweep_report.result_row("a-0.5", "a", {**vision, **config, "overall_sparsity": 0.5}),
        sweep_report.result_row(
            "a-2:4",
            "a",
            {**vision, **config, "overall_sparsity": 0.5} | {"config": {**config["config"], "pattern": "2:4"}},
        ),
    ]
    assert rows[0]["pruned"] == 0.7 and rows[0]["dense"] == 0.8 and rows[0]["metric"] == "top1 (imagenet)"
    assert sweep_report.plot(rows, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 0
    assert not sweep_report.plot([{**rows[0], "pruned": None}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert "| a-2:4 | wanda | 2:4 |" in sweep_report.markdown_table(rows)


@needs_assets
def test_an_interrupted_held_out_search_resumes_within_its_cell(tiny_folder, tmp_path, cli_cache, monkeypatch, capsys):
    # At the full protocol one candidate of --target-layers auto is a whole prune: a rerun keeps the
    # candidates scored before the interruption and removes the progress once the cell is recorded.
    import d2prune.selection as selection

    real, calls = selection.prune, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(selection, "prune", counted)
    out = tmp_path / "sweep"
    grid = ["--methods", "d2auto", "--variant", "d2auto=--method d2prune --target-layers auto", "--sparsities", "0.5"]
    argv = ["sweep", str(tiny_folder), *grid, *QUICK_CLI, "--output-dir", str(out)]
    assert main(argv) == 130
    cell = out / "cells" / "d2auto-0.5"
    assert not (cell / "run.json").exists() and (cell / "heldout-progress" / "progress.json").is_file()
    assert main(argv) == 0
    assert len(calls) == 3 + 2  # the two unscored candidates only
    record = json.loads((cell / "run.json").read_text())
    assert record["target_search"]["scored_by_an_interrupted_run"] == ["self_attn.q_proj", "self_attn.k_proj"]
    assert not (cell / "heldout-progress").exists()
    solo = tmp_path / "solo"
    monkeypatch.setattr(selection, "prune", real)
    assert main(["prune", *record["sweep_cell"]["argv"], "--no-progress", "--output-dir", str(solo)]) == 0
    alone = json.loads((solo / "run.json").read_text())
    assert ppl(record) == ppl(alone)
    assert record["target_search"]["heldout_ppl"] == alone["target_search"]["heldout_ppl"]
