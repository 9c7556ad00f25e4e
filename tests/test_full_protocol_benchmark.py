"""benchmarks/full_protocol.py's bookkeeping across sessions: which cells are still to run, and the small
files that let a fresh checkout resume (the sweep folder itself is git-ignored)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import full_protocol  # noqa: E402


def test_missing_cells_run_as_one_sweep_per_sparsity_in_the_grid_order():
    done = {"sparsegpt-0.7", "alps-0.7"}
    assert full_protocol.missing_groups(done, None) == [
        ("0.7", ["d2prune-auto"]),
        ("0.5", ["sparsegpt", "alps", "d2prune-auto"]),
    ]
    assert full_protocol.missing_groups(done, ["alps-0.5", "alps-0.7"]) == [("0.5", ["alps"])]
    everything = {f"{v}-{s}" for v in full_protocol.VARIANTS for s in full_protocol.SPARSITIES}
    assert full_protocol.missing_groups(everything, None) == []


@pytest.fixture
def folders(tmp_path, monkeypatch):
    sweep, kept, results = tmp_path / "runs" / "sweep", tmp_path / "kept", tmp_path / "results.json"
    monkeypatch.setattr(full_protocol, "SWEEP", sweep)
    monkeypatch.setattr(full_protocol, "KEPT", kept)
    monkeypatch.setattr(full_protocol, "RESULTS", results)
    return sweep, kept, results


def test_progress_is_kept_restored_into_an_empty_sweep_folder_and_forgotten_once_the_cell_finishes(folders):
    sweep, kept, _ = folders
    search = sweep / "cells" / "d2prune-auto-0.7" / "heldout-progress" / "progress.json"
    search.parent.mkdir(parents=True)
    search.write_text(json.dumps({"scores": {"none": 1.5}}))
    (sweep / "dense_perplexity.json").write_text(json.dumps({"key": {"wikitext2": {"ppl": 2.0}}}))

    full_protocol.keep_progress(finished={"alps-0.7"})
    assert sorted(p.name for p in kept.iterdir()) == ["d2prune-auto-0.7.progress.json", "dense_perplexity.json"]

    saved = {p: p.read_bytes() for p in [search, sweep / "dense_perplexity.json"]}
    for p in saved:
        p.unlink()  # a fresh checkout: no sweep folder state
    assert full_protocol.restore_progress() == ["d2prune-auto-0.7.progress.json", "dense_perplexity.json"]
    assert all(p.read_bytes() == b for p, b in saved.items())
    assert full_protocol.restore_progress() == []  # what the sweep folder has is never overwritten

    search.unlink()  # the cell finished: the sweep removed its search
    full_protocol.keep_progress(finished={"d2prune-auto-0.7"})
    assert [p.name for p in kept.iterdir()] == ["dense_perplexity.json"]


def test_committed_cells_count_as_finished_when_the_sweep_folder_is_gone(folders):
    _, _, results = folders
    rows = [{"name": "alps-0.7", "ppl": 170.0}, {"name": "dense", "ppl": 21.6, "windows": 148}]
    results.write_text(json.dumps(rows))
    got, dense = full_protocol.all_rows()
    assert got == rows[:1] and dense == {"ppl": 21.6, "windows": 148}
