import json

import pytest
import torch

import d2prune
import d2prune.data
from conftest import SHARED, build_tiny_model, make_calibration_ids
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.errors import UserError
from d2prune.methods import D2PruneConfig
from d2prune.selection import choose_on_heldout, heldout_candidates


def _targets(arch: str) -> dict[str, list[str]]:
    config = d2prune.PruneConfig(method=D2PruneConfig(target_layers="auto"))
    return {label: c.target_layers for label, c in heldout_candidates(build_tiny_model(arch), config).items()}


def test_candidates_are_each_qkv_projection_then_none():
    assert _targets("llama-gqa") == {
        "self_attn.q_proj": ["self_attn.q_proj"],
        "self_attn.k_proj": ["self_attn.k_proj"],
        "self_attn.v_proj": ["self_attn.v_proj"],
        "none": [],
    }
    assert _targets("phi3") == {"self_attn.qkv_proj": ["self_attn.qkv_proj"], "none": []}
    assert _targets("gpt-neox") == {"attention.query_key_value": ["attention.query_key_value"], "none": []}


def test_auto_is_only_for_the_heldout_choice():
    config = D2PruneConfig(target_layers="auto")
    assert config.chooses_on_heldout() and not D2PruneConfig().chooses_on_heldout()
    assert D2PruneConfig().heldout_candidates(["self_attn.q_proj"]) == {}
    with pytest.raises(UserError, match="held-out"):
        d2prune.prune(build_tiny_model("llama-gqa"), make_calibration_ids(), d2prune.PruneConfig(method=config))


def _weights(model):
    stack = find_decoder_stack(model)
    return {
        f"{i}.{n}": lin.weight.detach().clone()
        for i, layer in enumerate(stack.layers)
        for n, lin in find_linears(layer).items()
    }


def test_search_keeps_the_lowest_heldout_ppl_and_leaves_that_model():
    ids = make_calibration_ids(windows=4, tokens=16)
    heldout = make_calibration_ids(windows=3, tokens=16, seed=99)
    config = d2prune.PruneConfig(method=D2PruneConfig(target_layers="auto"), sparsity=0.6, progress=False)
    model = build_tiny_model("llama-gqa")
    report, record = choose_on_heldout(model, ids, heldout, config)
    scores = record["heldout_ppl"]
    assert set(scores) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "none"}
    assert record["chosen"] == min(scores, key=scores.get)
    # The model left behind is exactly a direct prune with the chosen target.
    chosen = [] if record["chosen"] == "none" else [record["chosen"]]
    direct = build_tiny_model("llama-gqa")
    d2prune.prune(
        direct,
        ids,
        d2prune.PruneConfig(method=d2prune.D2PruneConfig(target_layers=chosen), sparsity=0.6, progress=False),
    )
    got, want = _weights(model), _weights(direct)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert report.config["method"]["target_layers"] == chosen
    from d2prune.evaluation.perplexity import evaluate_ppl

    assert evaluate_ppl(model, heldout, 16, progress=False).ppl == pytest.approx(scores[record["chosen"]])


def test_search_needs_candidates():
    with pytest.raises(UserError):
        choose_on_heldout(
            build_tiny_model("llama-gqa"),
            make_calibration_ids(),
            make_calibration_ids(),
            d2prune.PruneConfig(method="wanda"),
        )


TINY = SHARED / "models" / "aidreams260K"
DATA = SHARED / "data"


@pytest.mark.skipif(not (TINY.exists() and DATA.exists()), reason="shared assets missing")
def test_cli_auto_never_reads_the_evaluation_text(tmp_path, monkeypatch):
    """Every read of evaluation text happens after the search has finished, and the held-out
    windows come from C4 documents the calibration draw did not use."""
    import d2prune.selection as ts
    from d2prune.cli import main

    events = []
    real_eval_tokens, real_choose, real_heldout = (
        d2prune.data.get_eval_tokens,
        ts.choose_on_heldout,
        d2prune.data.get_heldout,
    )

    def eval_tokens(*a, **k):
        events.append("eval-text")
        return real_eval_tokens(*a, **k)

    def choose(*a, **k):
        events.append("search-start")
        out = real_choose(*a, **k)
        events.append("search-end")
        return out

    def heldout(*a, **k):
        out = real_heldout(*a, **k)
        events.append(("heldout", out))
        return out

    monkeypatch.setattr(d2prune.data, "get_eval_tokens", eval_tokens)
    monkeypatch.setattr(ts, "choose_on_heldout", choose)
    monkeypatch.setattr(d2prune.data, "get_heldout", heldout)
    monkeypatch.setenv("D2PRUNE_CACHE", str(tmp_path / "cache"))
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
            "auto",
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--heldout-windows",
            "2",
            "--eval-windows",
            "2",
            "--no-progress",
            "--data-dir",
            str(DATA),
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0
    names = [e if isinstance(e, str) else e[0] for e in events]
    assert names.index("search-end") < names.index("eval-text") and names.count("eval-text") == 1
    assert names.index("heldout") < names.index("search-start")
    rec = json.loads((out / "run.json").read_text())
    search = rec["target_search"]
    assert set(search["heldout_ppl"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "none"}
    assert rec["config"]["method"]["target_layers"] == ([] if search["chosen"] == "none" else [search["chosen"]])
    # Held-out windows share no window with the calibration draw.
    calib = d2prune.data.get_calibration(
        __import__("transformers").AutoTokenizer.from_pretrained(TINY), "c4", 4, 64, 0, data_dir=DATA, cache_dir=False
    )
    held = next(e[1] for e in events if not isinstance(e, str))
    assert not any(torch.equal(h, c) for h in held for c in calib)


@pytest.mark.parametrize("scored", [2, 3])  # the winner (v_proj, third) pruned after the resume, or read back
def test_an_interrupted_search_resumes_from_its_progress_folder(tmp_path, monkeypatch, scored):
    """Candidates scored before an interruption are not pruned again, and the result (choice, scores,
    weights, report) is bit-identical to an uninterrupted search; another identity starts afresh."""
    import d2prune.selection as selection

    ids = make_calibration_ids(windows=4, tokens=16)
    heldout = make_calibration_ids(windows=3, tokens=16, seed=99)
    config = d2prune.PruneConfig(method=D2PruneConfig(target_layers="auto"), sparsity=0.6, progress=False)
    whole = build_tiny_model("llama-gqa")
    want_report, want = choose_on_heldout(whole, ids, heldout, config)

    real_prune, calls = selection.prune, []

    def prune_until(limit):
        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) > limit:
                raise KeyboardInterrupt
            return real_prune(*args, **kwargs)

        return counted

    progress = tmp_path / "progress"
    monkeypatch.setattr(selection, "prune", prune_until(scored))
    with pytest.raises(KeyboardInterrupt):
        choose_on_heldout(build_tiny_model("llama-gqa"), ids, heldout, config, progress_dir=progress, identity="a")
    assert len(list(progress.glob("best-*.safetensors"))) == 1

    calls.clear()
    monkeypatch.setattr(selection, "prune", prune_until(99))
    model = build_tiny_model("llama-gqa")
    report, got = choose_on_heldout(model, ids, heldout, config, progress_dir=progress, identity="a")
    assert want["chosen"] == "self_attn.v_proj"
    assert len(calls) == 4 - scored  # only the candidates the interrupted run had not scored
    assert got.pop("scored_by_an_interrupted_run") == list(want["heldout_ppl"])[:scored]
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(_weights(model).values(), _weights(whole).values()))

    def untimed(r):
        d = r.to_dict()
        return {**d, "timings": None, "linears": [{**lin, "seconds": None} for lin in d["linears"]]}

    assert untimed(report) == untimed(want_report)
    assert report.overall_sparsity == want_report.overall_sparsity

    calls.clear()  # the same folder under another identity (another command) is not reused
    choose_on_heldout(build_tiny_model("llama-gqa"), ids, heldout, config, progress_dir=progress, identity="b")
    assert len(calls) == 4


@pytest.mark.parametrize("scored", [2, 3])  # the winner (v_proj, third) scored after the resume, or before it
def test_a_search_resumes_from_its_scores_alone_pruning_a_lost_winner_again(tmp_path, monkeypatch, scored):
    """With the best weights file gone (only progress.json moved to another machine), the resumed search
    prunes the unscored candidates, then the winner again if the interrupted run had scored it, and
    returns the same choice, scores and weights as an uninterrupted search."""
    import d2prune.selection as selection

    ids = make_calibration_ids(windows=4, tokens=16)
    heldout = make_calibration_ids(windows=3, tokens=16, seed=99)
    config = d2prune.PruneConfig(method=D2PruneConfig(target_layers="auto"), sparsity=0.6, progress=False)
    whole = build_tiny_model("llama-gqa")
    _, want = choose_on_heldout(whole, ids, heldout, config)
    assert want["chosen"] == "self_attn.v_proj"

    real_prune, calls = selection.prune, []

    def counted(limit):
        def run(model, calibration, cfg):
            calls.append(cfg.method.target_layers)
            if len(calls) > limit:
                raise KeyboardInterrupt
            return real_prune(model, calibration, cfg)

        return run

    progress = tmp_path / "progress"
    monkeypatch.setattr(selection, "prune", counted(scored))
    with pytest.raises(KeyboardInterrupt):
        choose_on_heldout(build_tiny_model("llama-gqa"), ids, heldout, config, progress_dir=progress, identity="a")
    saved = json.loads((progress / "progress.json").read_text())
    for f in progress.glob("best-*.safetensors"):
        f.unlink()

    calls.clear()
    monkeypatch.setattr(selection, "prune", counted(99))
    model = build_tiny_model("llama-gqa")
    _, got = choose_on_heldout(model, ids, heldout, config, progress_dir=progress, identity="a")
    # Candidates run in the order q, k, v, none; v wins.
    assert calls == {2: [["self_attn.v_proj"], []], 3: [[], ["self_attn.v_proj"]]}[scored]
    assert got.pop("scored_by_an_interrupted_run") == list(want["heldout_ppl"])[:scored]
    again = got.pop("pruned_again_after_resume", None)
    assert again == ({"label": "self_attn.v_proj", "identical_weights": True} if scored == 3 else None)
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(_weights(model).values(), _weights(whole).values()))
    assert len(list(progress.glob("best-*.safetensors"))) == 1  # the winner's weights are kept again
    if scored == 3:
        _resume_with_another_digest(tmp_path, saved, want, ids, heldout, config)


def _resume_with_another_digest(tmp_path, saved, want, ids, heldout, config):
    """Re-pruned weights that differ from the recorded digest (another machine's rounding) are scored
    again: the choice stands while they beat the other candidates, and is an error once they do not."""
    v = "self_attn.v_proj"
    for n, scores in enumerate([saved["scores"], {**saved["scores"], "self_attn.q_proj": want["heldout_ppl"][v]}]):
        progress = tmp_path / f"moved{n}"
        progress.mkdir()
        (progress / "progress.json").write_text(json.dumps({**saved, "weights_sha256": "0" * 64, "scores": scores}))
        model = build_tiny_model("llama-gqa")
        if n == 0:
            _, got = choose_on_heldout(model, ids, heldout, config, progress_dir=progress, identity="a")
            before = got.pop("pruned_again_after_resume")
            assert before == {"label": v, "identical_weights": False, "heldout_score_before": saved["scores"][v]}
            got.pop("scored_by_an_interrupted_run")
            assert got == want  # scored again: the same perplexity on this machine
        else:
            with pytest.raises(UserError, match=r"pruned again scores .* no longer below \{'self_attn.q_proj'"):
                choose_on_heldout(model, ids, heldout, config, progress_dir=progress, identity="a")


def test_prune_report_round_trips_through_its_dict():
    from d2prune.report import PruneReport

    report = d2prune.prune(
        build_tiny_model("llama-gqa"), make_calibration_ids(), d2prune.PruneConfig(method="sparsegpt", sparsity=0.5)
    )
    back = PruneReport.from_dict({**report.to_dict(), "zeros": report.zeros, "weights": report.weights})
    assert back == report
