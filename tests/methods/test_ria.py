"""RIA: score against a direct computation, comparison groups, N:M, channel permutation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import d2prune
from conftest import DATA, TINY, build_tiny_model, make_calibration_ids, needs_assets
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.engine.channels import find_producers, permute_channels
from d2prune.errors import UserError
from d2prune.methods.ria import (
    RIAConfig,
    RIAPruner,
    lsa_refine,
    retained_nm_score,
    ria_score,
    zigzag_permutation,
)
from d2prune.patterns import Pattern, SparsityTarget, nm_violations


def _pruner(weight: torch.Tensor, x: torch.Tensor, **options) -> RIAPruner:
    pruner = RIAConfig(**options).make_pruner("lin", weight)
    pruner.observe(x, x @ weight.t())
    return pruner


def _data(rows=12, cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g), torch.randn(3, 5, cols, generator=g)


def _score_numpy(w: np.ndarray, x: np.ndarray, a: float) -> np.ndarray:
    """S_ij by explicit loops, float64; ‖X_j‖² averaged over samples as Wanda does."""
    rows, cols = w.shape
    norm2 = np.array([np.mean([np.sum(x[k, :, j] ** 2) for k in range(x.shape[0])]) for j in range(cols)])
    out = np.zeros_like(w)
    for i in range(rows):
        for j in range(cols):
            col = sum(abs(w[r, j]) for r in range(rows))
            row = sum(abs(w[i, c]) for c in range(cols))
            out[i, j] = (abs(w[i, j]) / col + abs(w[i, j]) / row) * np.sqrt(norm2[j]) ** a
    return out


@pytest.mark.parametrize("a", [0.5, 1.0, 0.0])
def test_score_matches_direct_computation(a):
    w, x = _data()
    pruner = _pruner(w, x, a=a)
    got = pruner.score(w).double().numpy()
    np.testing.assert_allclose(got, _score_numpy(w.double().numpy(), x.double().numpy(), a), rtol=1e-5, atol=1e-7)


def test_dead_row_and_column_give_zero_scores_not_nan():
    w, x = _data()
    w[3] = 0
    w[:, 5] = 0
    x[..., 7] = 0  # a dead input channel as well
    score = ria_score(w, x.pow(2).sum(1).mean(0), 0.5)
    assert torch.isfinite(score).all()
    assert (score[3] == 0).all() and (score[:, 5] == 0).all() and (score[:, 7] == 0).all()
    alive = (w != 0) & (torch.arange(16) != 7)
    assert (score[alive] > 0).all()
    # Pruning such a matrix still gives exact counts (the dead entries score 0 and go first).
    pruner = _pruner(w, x)
    out = pruner.prune(w, SparsityTarget(0.5), None)
    assert int((out == 0).sum()) == 12 * 16 // 2 and (out[~alive] == 0).all()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_group_linear_drops_exactly_the_lowest_scores_of_the_whole_matrix(sparsity):
    w, x = _data(10, 24)
    pruner = _pruner(w, x)
    out = pruner.prune(w, SparsityTarget(sparsity), None)
    score = pruner.score(w).flatten()
    k = int(np.floor(sparsity * w.numel()))
    pruned = (out == 0).flatten()
    assert int(pruned.sum()) == k
    expected = np.argsort(score.numpy(), kind="stable")[:k]
    assert set(np.flatnonzero(pruned.numpy())) == set(expected)
    assert torch.equal(out[out != 0], w[out != 0])  # no update
    # Rows are not balanced: one threshold over the matrix, not per row
    assert len(set((out == 0).sum(1).tolist())) > 1


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_group_row_drops_exactly_the_lowest_per_row(sparsity):
    w, x = _data(10, 24)
    pruner = _pruner(w, x, group="row")
    out = pruner.prune(w, SparsityTarget(sparsity), None)
    score = pruner.score(w).numpy()
    k = int(np.floor(sparsity * 24))
    for i in range(10):
        assert set(np.flatnonzero(out[i].numpy() == 0)) == set(np.argsort(score[i], kind="stable")[:k])


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("group", ["linear", "row"])
def test_nm_drops_the_n_lowest_of_every_group(n, m, group):
    w, x = _data(6, 16)
    pruner = _pruner(w, x, group=group, permute=True)  # not permutable here: permute has no effect
    out = pruner.prune(w, SparsityTarget(n / m, Pattern(n, m)), None)
    assert pruner.input_permutation is None
    score = pruner.score(w).numpy()
    assert nm_violations(out, n, m) == 0 and int((out == 0).sum()) == 6 * 16 * n // m
    for i in range(6):
        for g in range(0, 16, m):
            zeros = set(np.flatnonzero(out[i, g : g + m].numpy() == 0))
            assert zeros == set(np.argsort(score[i, g : g + m], kind="stable")[:n])


def test_config_validation():
    assert RIAConfig().a == 0.5 and RIAConfig().group == "linear" and RIAConfig().permute is False
    assert RIAConfig(group=" ROW ").group == "row"
    for bad in (dict(group="column"), dict(a=-1.0), dict(a=float("nan")), dict(a="x")):
        with pytest.raises(UserError):
            RIAConfig(**bad)
    assert d2prune.METHODS["ria"] is RIAConfig
    assert not RIAPruner.updates_weights and not RIAPruner.needs_gram


# --------------------------------------------------------------------------------------------------
# channel permutation


def test_zigzag_deals_sorted_columns_over_the_slots():
    score = torch.arange(8, dtype=torch.float32).repeat(2, 1)  # column sums ascending 0..7
    perm = zigzag_permutation(score, 4)
    # slot 0: columns 0,1; slot 1: 2,3 reversed; slot 2: 4,5; slot 3: 6,7 reversed
    assert perm.tolist() == [0, 3, 4, 7, 1, 2, 5, 6]


def _constructed():
    """Each row's big scores sit in the same M-group, so stored-order 2:4 loses them: permuting helps."""
    score = torch.full((4, 8), 0.1)
    score[:, :4] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    return score


@pytest.mark.parametrize("lsa", [False, True])
def test_permutation_keeps_more_score_on_a_constructed_example(lsa):
    score = _constructed()
    pruner = RIAConfig(permute=True, lsa=lsa).make_pruner("lin", score)
    pruner.score = lambda w: score  # the constructed scores, not RIA's of this weight
    pruner.inputs_permutable = True
    out = pruner.prune(torch.ones(4, 8), SparsityTarget(0.5, Pattern(2, 4)), None)
    perm = pruner.input_permutation
    assert perm is not None and sorted(perm.tolist()) == list(range(8))
    plain = retained_nm_score(score, 2, 4).sum()
    permuted = retained_nm_score(score[:, perm], 2, 4).sum()
    assert permuted > plain
    kept = float(score[out != 0].sum())
    assert kept == pytest.approx(float(permuted))
    assert nm_violations(out[:, perm], 2, 4) == 0  # N:M holds in the permuted order


def test_without_scipy_the_zigzag_permutation_is_used_with_a_warning(monkeypatch):
    import d2prune.methods.ria as ria

    monkeypatch.setattr(ria, "have_scipy", lambda: False)
    score = _constructed()
    pruner = RIAConfig(permute=True).make_pruner("lin", score)
    pruner.score = lambda w: score
    pruner.inputs_permutable = True
    with pytest.warns(UserWarning, match="scipy"):
        pruner.prune(torch.ones(4, 8), SparsityTarget(0.5, Pattern(2, 4)), None)
    assert torch.equal(pruner.input_permutation, zigzag_permutation(score, 4))


def test_lsa_raises_the_retained_score():
    g = torch.Generator().manual_seed(3)
    for _trial in range(5):
        score = torch.rand(6, 32, generator=g) ** 3
        perm = zigzag_permutation(score, 4)
        refined = lsa_refine(score, perm, 2, 4, block=4)
        assert sorted(refined.tolist()) == list(range(32))
        # On these random scores each pass strictly gains (and the zig-zag alone sometimes loses to
        # the stored order, which is why the pruner keeps the better of the two).
        assert retained_nm_score(score[:, refined], 2, 4).sum() > retained_nm_score(score[:, perm], 2, 4).sum()


def test_no_permutation_when_it_would_keep_less():
    score = torch.tensor([[5.0, 0.1, 0.1, 0.1, 4.0, 0.1, 0.1, 0.1]]).repeat(3, 1)  # already ideal
    pruner = RIAConfig(permute=True, lsa=False).make_pruner("lin", score)
    pruner.score = lambda w: score
    pruner.inputs_permutable = True
    pruner.prune(torch.ones(3, 8), SparsityTarget(0.5, Pattern(2, 4)), None)
    assert pruner.input_permutation is None


EXPECTED_PRODUCERS = {
    "llama-gqa": {"mlp.down_proj": ["mlp.gate_proj", "mlp.up_proj"]},
    "opt": {"fc2": ["fc1"]},
    "gpt-neox": {"mlp.dense_4h_to_h": ["mlp.dense_h_to_4h"]},
    "phi3": {},  # fused gate_up_proj is twice as wide as down_proj's input: not permuted
}


def _layer_run(model, layer_index=0, windows=2):
    """(layer, linears, call order, layer input, args) of one decoder layer on calibration windows."""
    from d2prune.engine.capture import calibration_batches, capture_inputs_and_arguments

    stack = find_decoder_stack(model)
    batches = calibration_batches(make_calibration_ids(windows, 8), windows)
    inps, extras = capture_inputs_and_arguments(model, stack, batches, torch.device("cpu"))
    layer = stack.layers[layer_index]
    linears = find_linears(layer)
    order: list[str] = []
    handles = [
        lin.register_forward_hook(lambda m, i, o, n=n: order.append(n) if n not in order else None)
        for n, lin in linears.items()
    ]
    rest, kwargs = extras[layer_index][0]
    with torch.no_grad():
        out = layer(inps, *rest, **kwargs)
    for h in handles:
        h.remove()
    out = out[0] if isinstance(out, (tuple, list)) else out
    return layer, linears, order, inps, rest, kwargs, out


@pytest.mark.parametrize("key", list(EXPECTED_PRODUCERS))
def test_producers_and_permuted_dense_layer_computes_the_same(key):
    model = build_tiny_model(key)
    # Non-zero biases, so a bias left unpermuted would show.
    with torch.no_grad():
        for lin in find_linears(find_decoder_stack(model).layers[0]).values():
            if lin.bias is not None:
                lin.bias.normal_()
    layer, linears, order, inps, rest, kwargs, before = _layer_run(model)
    producers = find_producers(layer, linears, order)
    assert producers == EXPECTED_PRODUCERS[key]
    g = torch.Generator().manual_seed(1)
    for consumer, prods in producers.items():
        perm = torch.randperm(linears[consumer].in_features, generator=g)
        old = linears[consumer].weight.detach().clone()
        permute_channels(linears[consumer], [linears[p] for p in prods], perm)
        assert torch.equal(linears[consumer].weight, old[:, perm])
    with torch.no_grad():
        after = layer(inps, *rest, **kwargs)
    after = after[0] if isinstance(after, (tuple, list)) else after
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_attention_output_projection_is_never_a_consumer():
    # o_proj's input width equals q/v's output width, but attention is not elementwise.
    model = build_tiny_model("llama-gqa", num_key_value_heads=4)
    layer, linears, order, *_ = _layer_run(model)
    assert "self_attn.o_proj" not in find_producers(layer, linears, order)
    # Call order matters: a linear that ran after down_proj cannot produce its input.
    assert "mlp.down_proj" not in find_producers(layer, linears, order[::-1])


def _prune(key, **options):
    model = build_tiny_model(key)
    report = d2prune.prune(model, make_calibration_ids(6, 16), d2prune.PruneConfig(progress=False, **options))
    return model, report


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("key", ["llama-gqa", "opt"])
def test_pipeline_permutation_is_stored_and_keeps_nm(key, monkeypatch):
    perms: dict[str, torch.Tensor] = {}
    original = RIAPruner.choose_permutation

    def spy(self, score, n, m):
        perm = original(self, score, n, m)
        perms.setdefault(self.name, perm)  # layer 0 first (names are module-relative)
        return perm

    monkeypatch.setattr(RIAPruner, "choose_permutation", spy)
    permuted, rep = _prune(key, method=RIAConfig(permute=True), pattern="2:4")
    plain, _ = _prune(key, method=RIAConfig(permute=False), pattern="2:4")
    assert all(lin.nm_violations == 0 for lin in rep.linears) and rep.overall_sparsity == 0.5
    consumer, producers = next(iter(EXPECTED_PRODUCERS[key].items()))
    assert set(perms) == {consumer}  # only the MLP consumer is ever offered a permutation
    perm = perms[consumer]
    assert perm is not None and not torch.equal(perm, torch.arange(len(perm)))
    # Layer 0 sees the same dense inputs in both runs: its producers are the plain run's, rows permuted.
    stack = find_decoder_stack(permuted).path
    wp, wn = _weights(permuted), _weights(plain)
    for p in producers:
        for kind in ("weight", "bias"):
            key_ = f"{stack}.0.{p}.{kind}"
            if key_ in wp:
                assert torch.equal(wp[key_], wn[key_][perm]), key_
    # The consumer's stored columns are the permuted ones: un-permuting gives back a weight whose
    # kept entries are the dense weight's (no update) and whose pruning differs from stored-order N:M.
    dense = _weights(build_tiny_model(key))[f"{stack}.0.{consumer}.weight"]
    w_cons = wp[f"{stack}.0.{consumer}.weight"]
    assert nm_violations(w_cons, 2, 4) == 0
    unpermuted = torch.empty_like(w_cons)
    unpermuted[:, perm] = w_cons
    assert torch.equal(unpermuted[unpermuted != 0], dense[unpermuted != 0])
    assert not torch.equal(unpermuted == 0, wn[f"{stack}.0.{consumer}.weight"] == 0)


def test_deterministic_masks():
    a, _ = _prune("llama-gqa", method="ria", sparsity=0.6)
    b, _ = _prune("llama-gqa", method="ria", sparsity=0.6)
    c, _ = _prune("llama-gqa", method=RIAConfig(permute=True), pattern="2:4")
    d, _ = _prune("llama-gqa", method=RIAConfig(permute=True), pattern="2:4")
    for x, y in ((a, b), (c, d)):
        wx, wy = _weights(x), _weights(y)
        assert all(torch.equal(wx[k], wy[k]) for k in wx)


def test_pipeline_exact_sparsity_per_linear_and_per_row():
    # The tiny random weights have no exact zeros: every zero is a pruned weight.
    model, _ = _prune("llama-gqa", method=RIAConfig(group="row"), sparsity=0.55)
    for layer in find_decoder_stack(model).layers:
        for lin in find_linears(layer).values():
            per_row = (lin.weight == 0).sum(1)
            assert (per_row == int(0.55 * lin.in_features)).all()
    m, _ = _prune("llama-gqa", method="ria", sparsity=0.55)
    for layer in find_decoder_stack(m).layers:
        for lin in find_linears(layer).values():
            assert int((lin.weight == 0).sum()) == int(np.floor(0.55 * lin.weight.numel()))


# --------------------------------------------------------------------------------------------------
# CLI


@needs_assets
def test_cli_run_on_tiny_model(tmp_path, monkeypatch):
    from d2prune.cli import main

    monkeypatch.setenv("D2PRUNE_CACHE", str(tmp_path / "cache"))
    quick = ["--nsamples", "4", "--seqlen", "64", "--eval-windows", "4", "--no-progress", "--data-dir", str(DATA)]
    out = tmp_path / "out"
    assert (
        main(
            [
                "prune",
                str(TINY),
                "--method",
                "ria",
                "--pattern",
                "2:4",
                "--ria-a",
                "0.7",
                "--ria-group",
                "row",
                "--ria-permute",
                "--output-dir",
                str(out),
                *quick,
            ]
        )
        == 0
    )
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["method"] == {"name": "ria", "a": 0.7, "group": "row", "permute": True, "lsa": True}
    assert rec["nm_structure_ok"] is True
    assert main(["prune", str(TINY), "--method", "ria", "--ria-group", "column", *quick]) == 2
    assert main(["prune", str(TINY), "--method", "ria", "--ria-a", "-1", *quick]) == 2


def test_streamed_permuted_prune_is_identical_to_in_memory(tmp_path):
    """--offload disk: the permuted producer rows, biases and consumer columns are what gets written."""
    from safetensors.torch import load_file

    from d2prune.io.models import save_pruned
    from d2prune.streaming import prune_checkpoint

    model = build_tiny_model("opt")
    with torch.no_grad():  # non-zero biases, so an unpermuted or unsaved bias would show
        for name, p in model.named_parameters():
            if name.endswith("fc1.bias"):
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    dense_bias = model.model.decoder.layers[0].fc1.bias.detach().clone()
    model.save_pretrained(tmp_path / "src")
    ids = make_calibration_ids(6, 16)

    def config():
        return d2prune.PruneConfig(method=RIAConfig(permute=True), pattern="2:4", progress=False, batch_size=2)

    report, out = prune_checkpoint(tmp_path / "src", ids, config(), tmp_path / "streamed")
    mem_report = d2prune.prune(model, ids, config())
    save_pruned(model, None, tmp_path / "memory", mem_report.sparsity_record())

    def tensors(folder):
        return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    a, b = tensors(out), tensors(tmp_path / "memory")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(lin.nm_violations == 0 for lin in report.linears)
    # The permutation really happened: fc1's bias is not in its dense order any more.
    stored = a["model.decoder.layers.0.fc1.bias"]
    assert not torch.equal(stored, dense_bias) and torch.equal(stored.sort().values, dense_bias.sort().values)
