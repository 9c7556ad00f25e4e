"""--refit cg: the exact least squares on each linear's mask (methods/least_squares.py and its use by
the walk): brute-force references on small float64 problems, then end to end on tiny models."""

from __future__ import annotations

import pytest
import torch

import d2prune
from conftest import build_tiny_model, make_calibration_ids
from d2prune.engine import layer as engine_layer
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.errors import UserError
from d2prune.methods import D2PruneConfig
from d2prune.methods.base import LinearPruner
from d2prune.methods.d2prune import D2WandaPruner
from d2prune.methods.least_squares import damp_hessian, masked_pcg, reconstruction_error, refit_on_support, row_errors
from d2prune.patterns import nm_mask
from d2prune.report import LinearReport, PruneReport

# --------------------------------------------------------------------------------------------------
# the solver against brute force
# --------------------------------------------------------------------------------------------------


def _problem(rows=6, cols=24, samples=64, seed=0, dead=(), scale=3.0):
    """Dense weights and a float64 Hessian 2/N XᵀX with unevenly scaled inputs (``dead``: zero inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, cols, generator=g, dtype=torch.float64)
    x = x * (0.1 + scale * torch.rand(cols, generator=g, dtype=torch.float64))
    x[:, list(dead)] = 0
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return w, 2 / samples * x.T @ x


def _brute_force(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row by row: solve H[S,S] x_S = (w H)_S on each row's support S."""
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        s = keep[i].nonzero().squeeze(1)
        if s.numel():
            out[i, s] = torch.linalg.solve(h[s][:, s], (w[i] @ h)[s])
    return out


def _masks(w: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    keep = torch.rand(rows, cols, generator=g) > 0.5
    keep[0] = False  # a fully pruned row
    keep[1] = True  # a dense row
    return {
        "random": keep,
        "2:4": ~nm_mask(w.abs().float(), 2, 4),
        "80%": torch.rand(rows, cols, generator=g) > 0.8,
    }


@pytest.mark.parametrize("mask", ["random", "2:4", "80%"])
def test_refit_matches_brute_force_least_squares(mask):
    w, h = _problem()
    keep = _masks(w, torch.Generator().manual_seed(1))[mask]
    pruned = w * keep
    out = refit_on_support(w, pruned, h, percdamp=0.0, max_iters=500, tol=1e-12)
    ref = _brute_force(w, h, keep)
    assert torch.equal(out != 0, keep)
    assert (out.double() - ref).norm() <= 1e-5 * ref.norm()
    # The batched PCG alone, in float64, to the same reference.
    res = masked_pcg(w, h, keep, start=pruned, max_iters=500, tol=1e-12)
    assert res.residual <= 1e-12 and 0 < res.iterations < 500
    assert (res.weight - ref).norm() <= 1e-9 * ref.norm()


def test_refit_solves_the_damped_problem_with_dead_inputs():
    w, h = _problem(dead=(3, 10))
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.4
    out = refit_on_support(w, w * keep, h, percdamp=0.01, max_iters=500, tol=1e-12)
    ref = _brute_force(w, damp_hessian(h, 0.01), keep)
    assert torch.equal(out != 0, keep)
    assert (out.double() - ref).norm() <= 1e-5 * ref.norm()


@pytest.mark.parametrize("seed", range(4))
def test_refit_keeps_the_mask_and_no_row_gets_worse(seed):
    # Fewer samples than inputs (a singular Hessian), a dead input, float32 like the walk.
    w, h = _problem(rows=16, cols=48, samples=24, seed=seed, dead=(5,))
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(w.shape, generator=g) > 0.6
    # A method's own weights on the mask: the dense ones, or updated ones (noise on the support).
    pruned = ((w + 0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64) * (seed % 2)) * keep).float()
    w, h = w.float(), h.float()
    out = refit_on_support(w, pruned, h, max_iters=100)
    assert out.dtype == torch.float32
    assert torch.equal(out != 0, pruned != 0)
    before, after = row_errors(w, pruned, h.double()), row_errors(w, out, h.double())
    assert torch.all(after <= before * (1 + 1e-5) + 1e-12)
    assert reconstruction_error(w, out, h) < reconstruction_error(w, pruned, h)


def test_an_optimal_row_is_kept_when_damping_would_make_it_worse():
    w, h = _problem()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    best = _brute_force(w, h, keep)  # optimal under the undamped H
    start = (w * keep).float()
    start[2] = best[2].float()  # row 2 is already the undamped optimum
    out = refit_on_support(w, start, h, percdamp=10.0, max_iters=500, tol=1e-12)
    # Heavy damping pulls the solve toward 0: row 2 keeps its weights; the others still improve.
    assert torch.equal(out[2], start[2])
    errs, errs0 = row_errors(w, out, h), row_errors(w, start, h)
    assert torch.all(errs <= errs0)
    assert torch.any(errs < errs0)


def test_a_converged_row_stops_while_the_others_iterate():
    w, h = _problem()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    start = w * keep
    start[3] = _brute_force(w, h, keep)[3]
    first = masked_pcg(w, h, keep, start=start, max_iters=200, tol=1e-8)
    assert first.iterations > 1
    assert torch.equal(first.weight[3], start[3] * keep[3])  # bit for bit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kept_weights_stay_nonzero_in_the_storage_dtype(dtype):
    # With H = I the optimum on the support is the dense weights themselves: tiny or zero ones
    # would round to 0 in half precision, and the mask would change.
    w = torch.tensor([[0.5, 1e-9, 0.0, -1e-6], [2.0, -3.0, 0.25, 1.0]])
    pruned = torch.tensor([[0.0, 0.3, 0.4, -0.2], [2.0, 0.0, 0.25, 0.0]])
    out = refit_on_support(w, pruned, torch.eye(4), percdamp=0.0, dtype=dtype)
    assert torch.equal(out.to(dtype) != 0, pruned != 0)
    assert torch.equal(out.to(dtype).float(), out)  # exactly representable
    assert torch.all(out[pruned != 0].abs() >= torch.finfo(dtype).tiny)  # not subnormal
    assert torch.all(out[0, 1:] * torch.tensor([1.0, 1.0, -1.0]) > 0)  # signs kept
    assert torch.equal(out[1], torch.tensor([2.0, 0.0, 0.25, 0.0]))


def test_consume_hessian_gives_the_same_result():
    w, h = _problem()
    w, h = w.float(), h.float()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) > 0.5
    kept = refit_on_support(w, w * keep, h.clone())
    h2 = h.clone()
    assert torch.equal(refit_on_support(w, w * keep, h2, consume_hessian=True), kept)
    assert not torch.equal(h2, h)  # damped in place


# --------------------------------------------------------------------------------------------------
# config and report
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(refit="lsq"), "unknown refit"),
        (dict(refit="cg", refit_iters=0), "iterations"),
        (dict(refit="cg", refit_tol=-1.0), "tol"),
        (dict(method=D2PruneConfig(refit_target_layers=True)), "--refit cg"),
    ],
)
def test_bad_refit_options_are_user_errors(kw, needle):
    with pytest.raises(UserError, match=needle):
        d2prune.PruneConfig(**kw)


def test_refit_options_are_recorded_only_when_on():
    off = d2prune.PruneConfig(method="d2prune").to_dict()
    assert not any("refit" in k for k in off) and "refit_target_layers" not in off["method"]
    on = d2prune.PruneConfig(method=D2PruneConfig(refit_target_layers=True), refit="cg", refit_iters=7).to_dict()
    assert (on["refit"], on["refit_iters"], on["refit_tol"], on["refit_percdamp"]) == ("cg", 7, 1e-6, 0.01)
    assert on["method"]["refit_target_layers"] is True


def test_the_before_refit_error_is_serialized_only_when_set():
    lin = LinearReport("a", 0, 0.5, 0.5, 0.1, None, False, 1.0)
    assert "relative_error_before_refit" not in lin.to_dict()
    report = PruneReport(config={}, linears=[lin, LinearReport("b", 0, 0.5, 0.5, 0.1, None, True, 1.0, 0.2)])
    linears = report.to_dict()["linears"]
    assert "relative_error_before_refit" not in linears[0] and linears[1]["relative_error_before_refit"] == 0.2
    assert [LinearReport(**d) for d in linears] == report.linears  # round trip (the resume state)


def test_pruners_allow_a_refit_except_d2prunes_no_update_branch():
    w = torch.zeros(4, 8)
    assert LinearPruner("fc", w).refit_allowed
    assert d2prune.methods.method_config("sparsegpt").make_pruner("fc", w).refit_allowed
    assert not D2PruneConfig(target_layers=["fc"]).make_pruner("fc", w).refit_allowed
    assert D2PruneConfig(target_layers=["fc"], refit_target_layers=True).make_pruner("fc", w).refit_allowed
    assert D2PruneConfig(target_layers=["fc"]).make_pruner("up", w).refit_allowed

    class OtherConfig:  # another method reusing the no-update pruner with its own config
        s, stats_mode, d2_wanda = 1500.0, "mean", True
        refit_target_layers = True

    assert D2WandaPruner("fc", w, OtherConfig()).refit_allowed
    del OtherConfig.refit_target_layers
    assert not D2WandaPruner("fc", w, OtherConfig()).refit_allowed


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------

TARGET = "self_attn.k_proj"


def _method(name: str, **kw):
    if name == "d2prune":
        return D2PruneConfig(target_layers=[TARGET], **kw)
    return name


def _run(method, ids, key="llama-gqa", **kw):
    model = build_tiny_model(key)
    report = d2prune.prune(model, ids, d2prune.PruneConfig(method=method, progress=False, batch_size=2, **kw))
    stack = find_decoder_stack(model)
    weights = {
        f"{i}.{n}": lin.weight.detach().clone()
        for i, layer in enumerate(stack.layers)
        for n, lin in find_linears(layer).items()
    }
    return model, report, weights


@pytest.fixture
def refits(monkeypatch):
    """Records (pruned, refitted) of every refit the pipeline runs."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = engine_layer.refit_on_support

    def wrapper(dense, pruned, *args, **kwargs):
        out = original(dense, pruned, *args, **kwargs)
        seen.append((pruned.clone(), out.clone()))
        return out

    monkeypatch.setattr(engine_layer, "refit_on_support", wrapper)
    return seen


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt", "d2prune", "pruner-zero"])
def test_refit_lowers_every_error_and_keeps_every_mask(method, refits):
    ids = make_calibration_ids(windows=6, tokens=16)
    _, plain, plain_w = _run(_method(method), ids)
    _, report, weights = _run(_method(method), ids, refit="cg")

    untouched = TARGET if method == "d2prune" else None  # the no-update branch is left alone
    names = [lin.name.split(".", 2)[2].split(".", 1)[1] for lin in report.linears]
    assert len(refits) == sum(n != untouched for n in names)
    for pruned, out in refits:
        assert torch.equal(pruned != 0, out != 0)
    assert report.overall_sparsity == plain.overall_sparsity
    assert report.config["refit"] == "cg" and "refit" not in plain.config
    for lin, ref, name in zip(report.linears, plain.linears, names):
        assert lin.sparsity == ref.sparsity, lin.name
        if name == untouched:
            assert lin.relative_error_before_refit is None and not lin.weight_update
            continue
        assert lin.weight_update
        assert lin.relative_error_before_refit is not None
        assert lin.relative_error <= lin.relative_error_before_refit * (1 + 1e-5), lin.name
        if lin.layer == 0:  # same inputs as without the refit: the method's own error, to the bit
            assert lin.relative_error_before_refit == ref.relative_error
    # Layer 0 sees the dense inputs in both runs: the same masks, and better or equal errors.
    for key, w in weights.items():
        if key.startswith("0."):
            assert torch.equal(w != 0, plain_w[key] != 0), key
            if key.endswith(TARGET) and method == "d2prune":
                assert torch.equal(w, plain_w[key])
    assert sum(lin.relative_error for lin in report.linears) < sum(lin.relative_error for lin in plain.linears)
    assert all(ref.relative_error_before_refit is None for ref in plain.linears)


def test_d2prune_refits_its_target_layers_when_asked(refits):
    ids = make_calibration_ids(windows=6, tokens=16)
    _, report, _ = _run(D2PruneConfig(target_layers=[TARGET], refit_target_layers=True), ids, refit="cg")
    assert len(refits) == len(report.linears)
    ks = [lin for lin in report.linears if lin.name.endswith(TARGET)]
    assert ks and all(lin.weight_update and lin.relative_error < lin.relative_error_before_refit for lin in ks)
    assert report.config["method"]["refit_target_layers"] is True


def test_refit_with_the_owl_profile_and_2_4():
    ids = make_calibration_ids(windows=6, tokens=16)
    owl = dict(sparsity=0.6, sparsity_profile="owl", owl_lambda=0.1, owl_m=3.0)
    _, plain, _ = _run("wanda", ids, **owl)
    _, report, _ = _run("wanda", ids, refit="cg", **owl)
    assert report.layer_sparsities == plain.layer_sparsities and len(set(report.layer_sparsities)) > 1
    assert [lin.sparsity for lin in report.linears] == [lin.sparsity for lin in plain.linears]
    assert all(lin.relative_error <= lin.relative_error_before_refit * (1 + 1e-5) for lin in report.linears)

    _, nm, _ = _run("sparsegpt", ids, pattern="2:4", refit="cg")
    assert nm.nm_ok and all(lin.relative_error <= lin.relative_error_before_refit * (1 + 1e-5) for lin in nm.linears)


def test_refit_does_not_depend_on_measuring_the_error():
    # Without the error measure the refit reads the Gram last (in place, freed): same weights.
    ids = make_calibration_ids(windows=6, tokens=16)
    _, measured, a = _run("sparsegpt", ids, refit="cg")
    _, report, b = _run("sparsegpt", ids, refit="cg", measure_error=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(lin.relative_error is None and lin.relative_error_before_refit is None for lin in report.linears)


def test_refit_in_half_precision_keeps_the_masks(refits):
    model = build_tiny_model("llama-gqa").to(torch.float16)
    ids = make_calibration_ids(windows=4, tokens=16)
    report = d2prune.prune(model, ids, d2prune.PruneConfig(method="wanda", progress=False, refit="cg"))
    for pruned, out in refits:
        assert torch.equal(pruned != 0, out.to(torch.float16) != 0)
    assert report.overall_sparsity == 0.5
