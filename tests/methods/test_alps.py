"""ALPS and D²-ALPS against brute force: optimal weights on the support, exact budgets, and lower
reconstruction error than SparseGPT on the same Gram."""

import json

import pytest
import torch
from tests.conftest import QUICK_CLI as QUICK
from tests.conftest import TINY, build_tiny_model, make_calibration_ids, needs_assets

import d2prune
from d2prune.errors import UserError
from d2prune.methods import ALPSConfig, D2ALPSConfig, Gram
from d2prune.methods.alps import alps_solve, magnitude_score, normalized_gram, project
from d2prune.methods.d2prune import D2WandaPruner
from d2prune.methods.least_squares import damp_hessian, reconstruction_error
from d2prune.methods.sparsegpt import sparsegpt_solve
from d2prune.patterns import Pattern, SparsityTarget, nm_violations


def _problem(rows=16, cols=32, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # Correlated inputs with uneven scales, like a transformer's activations.
    x = torch.randn(1, tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    x = x * (torch.rand(cols, generator=g) * 3 + 0.1)
    gram = Gram(cols, "cpu")
    gram.add(x)
    return w, gram


def _brute_force(w, h, keep):
    """Per row: the exact least squares on that row's support under the damped Hessian (float64)."""
    w, h = w.double(), h.double()
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        s = keep[i].nonzero().flatten()
        if len(s):
            out[i, s] = torch.linalg.solve(h[s][:, s], (w[i] @ h)[s])
    return out


def _prune(config, w, gram, target):
    pruner = config.make_pruner("mlp.down_proj", w)
    return pruner.prune(w, target, gram)


@pytest.mark.parametrize(
    "target", [SparsityTarget(0.6), SparsityTarget(0.8), SparsityTarget(0.5, Pattern(2, 4))], ids=["60%", "80%", "2:4"]
)
def test_alps_weights_are_the_least_squares_optimum_of_their_support(target):
    w, gram = _problem(seed=1)
    out = _prune(ALPSConfig(cg_iters=200), w, gram, target)
    keep = out != 0
    expected = _brute_force(w, damp_hessian(gram.hessian().double(), 0.01), keep)
    rel = float((out.double() - expected).norm() / expected.norm())
    assert rel < 1e-5


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.8])
def test_alps_prunes_exactly_the_budget_over_the_whole_matrix(sparsity):
    w, gram = _problem(rows=12, cols=40, seed=2)
    out = _prune(ALPSConfig(), w, gram, SparsityTarget(sparsity))
    assert int((out == 0).sum()) == int(sparsity * w.numel())
    # One budget per linear, not per row: rows generally end with different counts.
    assert len(set((out == 0).sum(1).tolist())) > 1


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (3, 4)])
def test_alps_nm_groups_are_exact(n, m):
    w, gram = _problem(rows=8, cols=32, seed=3)
    out = _prune(ALPSConfig(), w, gram, SparsityTarget(n / m, Pattern(n, m)))
    zeros = (out.reshape(8, 32 // m, m) == 0).sum(-1)
    assert (zeros == n).all()
    assert nm_violations(out, n, m) == 0


@pytest.mark.parametrize(
    "target",
    [SparsityTarget(0.5), SparsityTarget(0.7), SparsityTarget(0.8), SparsityTarget(0.5, Pattern(2, 4))],
    ids=["50%", "70%", "80%", "2:4"],
)
def test_alps_reconstructs_better_than_sparsegpt_on_the_same_gram(target, capsys):
    ratios = []
    for seed in range(5):
        w, gram = _problem(rows=24, cols=48, seed=10 + seed)
        h = gram.hessian()
        alps = _prune(ALPSConfig(), w, gram, target)
        sgpt = sparsegpt_solve(w, gram.hessian(), target)
        ratios.append(reconstruction_error(w, alps, h) / reconstruction_error(w, sgpt, h))
    with capsys.disabled():
        print(
            f"\nALPS / SparseGPT reconstruction error at {target.pattern} {target.sparsity:.0%}: "
            + ", ".join(f"{r:.3f}" for r in ratios)
        )
    assert max(ratios) <= 1.0


def test_alps_is_deterministic():
    w, gram = _problem(seed=4)
    a = _prune(ALPSConfig(), w, gram, SparsityTarget(0.7))
    b = _prune(ALPSConfig(), w, gram, SparsityTarget(0.7))
    assert torch.equal(a, b)


def test_linears_sharing_a_gram_share_one_eigendecomposition(monkeypatch):
    w, gram = _problem(seed=5)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a.shape) or eigh(a))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        ALPSConfig().make_pruner(name, w).prune(w, SparsityTarget(0.5), gram)
    assert len(calls) == 1


def test_projection_keeps_the_highest_scores_with_ties_to_either_side_counted_exactly():
    z = torch.tensor([[3.0, -1.0, 2.0, 0.5], [1.0, 1.0, -4.0, 0.0]])
    keep = project(z, magnitude_score(z, torch.ones(4)), SparsityTarget(0.5))
    assert int(keep.sum()) == 4
    assert keep[0, 0] and keep[0, 2] and keep[1, 2]
    keep = project(z, magnitude_score(z, torch.ones(4)), SparsityTarget(0.5, Pattern(2, 4)))
    assert keep.tolist() == [[True, False, True, False], [True, False, True, False]]


def test_dead_inputs_get_zero_weight():
    w, gram = _problem(seed=6)
    gram.sum[:, 3] = 0
    gram.sum[3, :] = 0
    out = _prune(ALPSConfig(), w, gram, SparsityTarget(0.5))
    assert (out[:, 3] == 0).all()
    assert torch.isfinite(out).all()


def test_alps_options_are_checked():
    with pytest.raises(UserError, match="rho"):
        ALPSConfig(rho=0)
    with pytest.raises(UserError, match="admm_iters"):
        D2ALPSConfig(admm_iters=0)


def test_d2alps_without_d2_terms_or_targets_is_alps():
    w, gram = _problem(seed=7)
    x = torch.randn(2, 8, w.shape[1])
    plain = D2ALPSConfig(d2_sparsegpt=False, target_layers=[]).make_pruner("mlp.up_proj", w)
    plain.observe(x, x @ w.t())
    expected = _prune(ALPSConfig(), w, gram, SparsityTarget(0.7))
    assert torch.equal(plain.prune(w, SparsityTarget(0.7), gram), expected)


def test_d2alps_target_layers_use_the_no_update_branch_and_others_the_d2_projection():
    config = D2ALPSConfig(target_layers=["self_attn.v_proj"], r1=5.0, s=1.0)
    w, gram = _problem(seed=8)
    assert isinstance(config.make_pruner("self_attn.v_proj", w), D2WandaPruner)
    pruner = config.make_pruner("self_attn.q_proj", w)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, w.shape[1], generator=g)
    pruner.observe(x, x @ w.t())
    out = pruner.prune(w, SparsityTarget(0.6), gram)
    assert int((out == 0).sum()) == int(0.6 * w.numel())
    # A large r1 makes the D² term matter: the support differs from plain ALPS.
    assert not torch.equal(out != 0, _prune(ALPSConfig(), w, gram, SparsityTarget(0.6)) != 0)


@pytest.mark.parametrize("method", ["alps", "d2alps"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alps_prunes_a_tiny_model_exactly(method, pattern):
    model = build_tiny_model("llama-gqa")
    config = d2prune.PruneConfig(method=method, sparsity=0.6, pattern=pattern, progress=False)
    report = d2prune.prune(model, make_calibration_ids(), config)
    expected = 0.5 if pattern == "2:4" else 0.6
    linears = dict(model.named_modules())
    for lin in report.linears:
        weight = linears[lin.name].weight
        if lin.weight_update:  # one budget per matrix: the whole linear is exact
            assert int((weight == 0).sum()) == int(expected * weight.numel())
        assert lin.relative_error is not None and lin.relative_error < 1
    assert report.nm_ok in (None, True)
    if method == "d2alps":
        assert {lin.name.split(".", 3)[-1] for lin in report.linears if not lin.weight_update} == {"self_attn.k_proj"}


def test_auto_rho_restart_and_support_trace_are_recorded():
    w, gram = _problem(seed=9)
    trace = []
    alps_solve(w, normalized_gram(gram, 0.01), SparsityTarget(0.7), rho=1e4, trace=trace)
    assert trace[0].iterations >= 3 and trace[0].support_changes


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


@needs_assets
def test_cli_alps_with_its_options(tmp_path, cli_cache):
    from d2prune.cli import main

    out = tmp_path / "alps"
    assert (
        main(
            [
                "prune",
                str(TINY),
                "--method",
                "alps",
                "--sparsity",
                "0.7",
                "--alps-rho",
                "0.2",
                "--alps-iters",
                "60",
                "--alps-cg-iters",
                "5",
                "--percdamp",
                "0.02",
                "--output-dir",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["method"] == {"name": "alps", "rho": 0.2, "admm_iters": 60, "cg_iters": 5, "percdamp": 0.02}
    assert rec["overall_sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert all(lin["weight_update"] for lin in rec["linears"])


@needs_assets
def test_cli_d2alps_chooses_its_unupdated_projection_on_heldout_data(tmp_path, cli_cache):
    from d2prune.cli import main

    out = tmp_path / "d2alps"
    assert (
        main(
            [
                "prune",
                str(TINY),
                "--method",
                "d2alps",
                "--pattern",
                "2:4",
                "--target-layers",
                "auto",
                "--heldout-windows",
                "2",
                "--output-dir",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    rec = json.loads((out / "run.json").read_text())
    search = rec["target_search"]
    assert set(search["heldout_ppl"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "none"}
    chosen = [] if search["chosen"] == "none" else [search["chosen"]]
    assert rec["config"]["method"]["name"] == "d2alps" and rec["config"]["method"]["target_layers"] == chosen
    assert all(lin["nm_violations"] == 0 for lin in rec["linears"])


@needs_assets
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "alps", "--alps-rho", "0"], "rho"),
        (["--method", "d2alps", "--alps-iters", "0"], "admm_iters"),
        (["--method", "alps", "--target-layers", "auto"], "--target-layers auto"),
        (["--method", "alps", "--alps-rho", "fast"], "--alps-rho must be a positive number or 'auto'"),
        (["--method", "sparsegpt", "--alps-rho", "auto"], "--alps-rho auto applies to ALPS methods (alps, d2alps)"),
        (
            ["--method", "alps", "--alps-rho", "auto", "--offload", "disk", "--output-dir", "OUT"],
            "--alps-rho auto prunes",
        ),
    ],
)
def test_cli_alps_mistakes_give_one_line_and_exit_2(args, needle, tmp_path, capsys, cli_cache):
    from d2prune.cli import main

    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert main(["prune", str(TINY), *args, *QUICK, "--eval", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("d2prune: error:") and needle in err and "\n" not in err


def test_rho_auto_lists_its_candidates_and_pairs_them_with_d2alps_targets():
    from d2prune.methods.alps import RHO_CANDIDATES

    alps = ALPSConfig(rho="auto")
    assert alps.chooses_on_heldout() and not ALPSConfig().chooses_on_heldout()
    assert {label: c.rho for label, c in alps.heldout_candidates(["q_proj"]).items()} == {
        f"rho={r:g}": r for r in RHO_CANDIDATES
    }
    assert ALPSConfig().heldout_candidates(["q_proj"]) == {}
    with pytest.raises(UserError, match="--alps-rho auto"):
        alps.validate(["q_proj"], "Layer")
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"]
    both = D2ALPSConfig(rho="auto", target_layers="auto").heldout_candidates(names)
    assert len(both) == 4 * len(RHO_CANDIDATES)
    assert both["none, rho=0.3"].target_layers == [] and both["none, rho=0.3"].rho == 0.3
    assert both["self_attn.k_proj, rho=0.03"].target_layers == ["self_attn.k_proj"]
    assert list(D2ALPSConfig(rho="auto", target_layers=["self_attn.v_proj"]).heldout_candidates(names)) == [
        f"rho={r:g}" for r in RHO_CANDIDATES
    ]
    assert D2ALPSConfig(target_layers="auto").heldout_candidates(names)["none"].rho == 0.1
    with pytest.raises(UserError, match="positive or 'auto'"):
        ALPSConfig(rho=-1.0)


@needs_assets
def test_cli_alps_chooses_rho_on_heldout_data(tmp_path, cli_cache):
    from d2prune.cli import main
    from d2prune.methods.alps import RHO_CANDIDATES

    out = tmp_path / "alps-auto"
    argv = ["prune", str(TINY), "--method", "alps", "--alps-rho", "auto", "--alps-iters", "20", "--sparsity", "0.6"]
    assert main([*argv, "--heldout-windows", "2", "--output-dir", str(out), *QUICK]) == 0
    rec = json.loads((out / "run.json").read_text())
    choice = rec["heldout_choice"]
    assert set(choice["heldout_ppl"]) == {f"rho={r:g}" for r in RHO_CANDIDATES}
    assert choice["chosen"] == min(choice["heldout_ppl"], key=choice["heldout_ppl"].get)
    assert rec["config"]["method"]["rho"] == float(choice["chosen"].removeprefix("rho="))
    assert rec["overall_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_alps_follows_owl_and_explicit_layer_sparsities():
    ids = make_calibration_ids()
    model = build_tiny_model("llama-gqa")
    report = d2prune.prune(model, ids, d2prune.PruneConfig(method="alps", layer_sparsities=[0.4, 0.7], progress=False))
    linears = dict(model.named_modules())
    for lin in report.linears:
        weight = linears[lin.name].weight
        assert int((weight == 0).sum()) == int([0.4, 0.7][lin.layer] * weight.numel())
    model = build_tiny_model("llama-gqa")
    report = d2prune.prune(
        model,
        ids,
        d2prune.PruneConfig(
            method="alps", sparsity=0.6, sparsity_profile="owl", owl_lambda=0.1, owl_m=3.0, progress=False
        ),
    )
    assert len(set(report.layer_sparsities)) == 2 and sum(report.layer_sparsities) / 2 == pytest.approx(0.6)
    for lin in report.linears:
        weight = dict(model.named_modules())[lin.name].weight
        assert int((weight == 0).sum()) == int(report.layer_sparsities[lin.layer] * weight.numel())
