"""DSnoT: mask refinement on top of a base method (docs/methods.md), checked against a plain per-row loop."""

import json

import pytest
import torch
from tests.conftest import QUICK_CLI as QUICK
from tests.conftest import TINY, needs_assets

import d2prune
from d2prune.errors import UserError
from d2prune.methods import DSnoTConfig, Gram, MagnitudeConfig, SparseGPTConfig, WandaConfig
from d2prune.methods.dsnot import DSnoTPruner, MeanVarStats, dsnot_refine, expected_row_error
from d2prune.patterns import Pattern, SparsityTarget, row_mask

HALF = SparsityTarget(0.5)
TWO_FOUR = SparsityTarget(0.5, Pattern(2, 4))


def _inputs(seed: int, cols: int, batches=(2, 3, 1), tokens: int = 9) -> list[torch.Tensor]:
    """Inputs with a per-column offset, so E[x_j] ≠ 0 and the expected errors are not tiny."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(cols, generator=g) * 0.5
    return [torch.randn(b, tokens, cols, generator=g) * torch.rand(cols, generator=g) * 2 + offset for b in batches]


def _observe(pruner, xs):
    for x in xs:
        pruner.observe(x, torch.zeros(x.shape[0], x.shape[1], pruner.rows))


def _gram(xs, cols):
    gram = Gram(cols, "cpu")
    for x in xs:
        gram.add(x)
    return gram


def _pruned_pair(config: DSnoTConfig, w, xs, target):
    """(base output, DSnoT output, DSnoT pruner) for one linear named ``fc``."""
    base, dsnot = config.base.make_pruner("fc", w), config.make_pruner("fc", w)
    _observe(base, xs)
    _observe(dsnot, xs)
    gram = _gram(xs, w.shape[1]) if dsnot.needs_gram else None
    gram2 = _gram(xs, w.shape[1]) if dsnot.needs_gram else None
    return base.prune(w, target, gram), dsnot.prune(w, target, gram2), dsnot


def _stats(xs):
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
    n = sum(x.shape[0] for x in xs)
    return flat.sum(0) / n, flat.var(0, unbiased=False), (torch.cat(xs).float().norm(dim=1) ** 2).mean(0)


# --------------------------------------------------------------------------------------------------
# a plain, row-by-row transcription of the loop, to compare against
# --------------------------------------------------------------------------------------------------


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def brute_force(dense, pruned, s, var, sq_norm, m, cycles, threshold, gamma):
    """One row at a time, in float64 and Python lists: regrow the best pruned weight of the right
    sign (by contribution / Var^γ), prune the lowest-Wanda kept weight of the opposite sign (N:M: in
    the same group), accept while |e| > threshold and the sign of e holds."""
    out = pruned.clone().double()
    d, s, var, sq = dense.double(), s.double(), var.double().clamp_min(1e-12), sq_norm.double()
    for i in range(d.shape[0]):
        row, base = d[i], out[i].clone()
        e = float(((row - base) * s).sum())
        sgn = _sign(e)
        if sgn == 0:
            continue
        pruned_set = {j for j in range(len(row)) if base[j] == 0}
        regrow = [j for j in sorted(pruned_set) if sgn * float(row[j] * s[j]) > 0]
        regrow.sort(key=lambda j: -sgn * float(row[j] * s[j]) / float(var[j]) ** gamma)  # stable
        kept_ok = {j for j in range(len(row)) if j not in pruned_set and sgn * float(base[j] * s[j]) < 0}
        wanda = {j: abs(float(base[j])) * float(sq[j]) ** 0.5 for j in range(len(row))}
        for t in range(cycles):
            if t >= len(regrow) or not abs(e) > threshold:
                break
            r = regrow[t]
            pool = sorted(kept_ok) if m is None else [j for j in sorted(kept_ok) if j // m == r // m]
            if m is None and t >= len(pool):
                break
            if not pool:
                continue  # N:M: no partner in the group, the candidate is passed over
            p = min(pool, key=lambda j: wanda[j])
            after = e + float(base[p] * s[p]) - float(row[r] * s[r])
            if _sign(after) != sgn:
                break
            e = after
            kept_ok.discard(p)
            out[i, r], out[i, p] = row[r], 0.0
    return out.float()


@pytest.mark.parametrize(
    "target,m", [(HALF, None), (SparsityTarget(0.7), None), (TWO_FOUR, 4), (SparsityTarget(0.5, Pattern(4, 8)), 8)]
)
@pytest.mark.parametrize("threshold", [0.1, 2.0])
def test_refined_mask_equals_row_by_row_transcription(target, m, threshold):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 48, generator=g)
    xs = _inputs(6, 48)
    s, var, sq = _stats(xs)
    base = w.clone()
    base[row_mask(w.abs() * sq.sqrt(), target)] = 0
    out = dsnot_refine(w, base, s, var, sq, target, 12, threshold, 1.0)
    expected = brute_force(w, base, s, var, sq, m, 12, threshold, 1.0)
    assert torch.equal(out == 0, expected == 0)
    assert torch.equal(out, expected)
    assert (out != base).any()  # some swaps happened: the comparison is not vacuous


def test_one_swap_on_a_tiny_matrix_by_hand():
    # One row, s = 1 per input, Var = 1: e = Σ_pruned W = 3 + 1 − 0.5 = 3.5 > 0.
    w = torch.tensor([[3.0, 1.0, -0.5, -2.0, 4.0, -1.0]])
    base = torch.tensor([[0.0, 0.0, 0.0, -2.0, 4.0, -1.0]])
    ones = torch.ones(6)
    sq = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 9.0])  # Wanda: |−2|·1 = 2 < |−1|·3 = 3
    out = dsnot_refine(w, base, ones, ones, sq, HALF, max_cycles=1, update_threshold=0.1)
    # Regrow the largest positive contribution (3.0, col 0), prune the lowest-Wanda negative kept (col 3):
    # e = 3.5 − 3 + (−2) = −1.5 flips the sign, so the swap is rejected ...
    assert torch.equal(out, base)
    # ... with Var[x_0] = 10 the ranking 3/10 < 1/1 regrows col 1 instead: e = 3.5 − 1 − 2 = 0.5 > 0, accepted.
    var = torch.tensor([10.0, 1, 1, 1, 1, 1])
    out = dsnot_refine(w, base, ones, var, sq, HALF, max_cycles=1, update_threshold=0.1)
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0, 0.0, 4.0, -1.0]]))
    assert expected_row_error(w, out, ones).item() == pytest.approx(0.5)
    # A second cycle would regrow col 2? No: −0.5 has the wrong sign; the next candidate does not exist.
    out2 = dsnot_refine(w, base, ones, var, sq, HALF, max_cycles=5, update_threshold=0.1)
    assert torch.equal(out2, out)
    # At or below the threshold nothing moves.
    assert torch.equal(dsnot_refine(w, base, ones, var, sq, HALF, 5, update_threshold=3.5), base)


# --------------------------------------------------------------------------------------------------
# invariants with each base method
# --------------------------------------------------------------------------------------------------

BASES = {"wanda": WandaConfig, "magnitude": MagnitudeConfig, "sparsegpt": SparseGPTConfig}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("target", [HALF, SparsityTarget(0.6), TWO_FOUR], ids=["50%", "60%", "2:4"])
def test_sparsity_groups_and_expected_error_with_each_base(base, target):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(32, 64, generator=g)
    xs = _inputs(12, 64)
    config = DSnoTConfig(base=base, skip=[])
    before, after, pruner = _pruned_pair(config, w, xs, target)
    assert isinstance(pruner, DSnoTPruner)
    assert pruner.needs_gram == (base == "sparsegpt") and pruner.updates_weights == (base == "sparsegpt")
    # Exactly the base's zeros per row (and per M-group for N:M).
    assert torch.equal((after == 0).sum(1), (before == 0).sum(1))
    if target.pattern.is_nm:
        assert ((after.reshape(32, 16, 4) == 0).sum(-1) == 2).all()
    changed = (after == 0) != (before == 0)
    assert changed.any()
    # |e_i| never grows; it shrinks in every row that changed.
    s = pruner.moments.token_sum()
    e0, e1 = expected_row_error(w, before, s).abs(), expected_row_error(w, after, s).abs()
    assert (e1 <= e0 + 1e-9 * e0.clamp_min(1)).all()
    rows = changed.any(1)
    assert (e1[rows] < e0[rows]).all()
    # Kept weights keep the base's values, regrown ones their dense values (no weight update).
    kept = (before != 0) & (after != 0)
    assert torch.equal(after[kept], before[kept])
    regrown = (before == 0) & (after != 0)
    assert regrown.any() and torch.equal(after[regrown], w[regrown])


def test_same_inputs_give_bit_identical_masks():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 32, generator=g)
    xs = _inputs(4, 32)
    outs = [_pruned_pair(DSnoTConfig(base="sparsegpt", skip=[]), w, xs, TWO_FOUR)[1] for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def test_zero_cycles_or_skipped_linears_keep_the_base_result():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(8, 32, generator=g)
    xs = _inputs(9, 32)
    before, after, _ = _pruned_pair(DSnoTConfig(max_cycles=0, skip=[]), w, xs, HALF)
    assert torch.equal(before, after)
    config = DSnoTConfig()  # skips MLP linears by default, refines attention ones
    assert type(config.make_pruner("mlp.up_proj", w)).__name__ == "WandaPruner"
    assert type(config.make_pruner("fc1", w)).__name__ == "WandaPruner"
    assert isinstance(config.make_pruner("self_attn.q_proj", w), DSnoTPruner)
    only_q = DSnoTConfig(skip=["q_proj"])
    assert not isinstance(only_q.make_pruner("self_attn.q_proj", w), DSnoTPruner)
    assert isinstance(only_q.make_pruner("mlp.up_proj", w), DSnoTPruner)


def test_statistics_are_exact_and_sum_over_shards():
    xs = _inputs(1, 10, batches=(1, 2, 3, 1))
    stats = MeanVarStats(10, "cpu")
    for x in xs:
        stats.add(x)
    s, var, _ = _stats(xs)
    torch.testing.assert_close(stats.token_sum(), s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.variance(), var, rtol=1e-9, atol=1e-12)
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    config = DSnoTConfig(base="magnitude", skip=[])
    whole = config.make_pruner("fc", w)
    _observe(whole, xs)
    shards = []
    for part in (xs[:1], xs[1:3], xs[3:]):
        p = config.make_pruner("fc", w)
        p.begin(0)
        _observe(p, part)
        shards.append(p.statistics())
    merged = config.make_pruner("fc", w)
    merged.load_statistics({k: sum(sh[k] for sh in shards) for k in shards[0]})
    assert set(whole.statistics()) == {
        "moments.sum",
        "moments.sq_sum",
        "moments.ntokens",
        "moments.nsamples",
        "norms.sum",
        "norms.nsamples",
    }
    for key, t in whole.statistics().items():
        torch.testing.assert_close(merged.statistics()[key], t, rtol=1e-12, atol=1e-12)
    assert torch.equal(merged.prune(w, HALF, None), whole.prune(w, HALF, None))
    # The base's statistics travel with ours, under "base.".
    wrapped = DSnoTConfig(skip=[]).make_pruner("fc", w)
    _observe(wrapped, xs)
    assert "base.stats.sum" in wrapped.statistics()


def test_config_errors_and_record():
    with pytest.raises(UserError, match="own mask"):
        DSnoTConfig(base="dsnot")
    with pytest.raises(UserError, match="own mask"):
        DSnoTConfig(base=DSnoTConfig())
    with pytest.raises(UserError, match="unknown method"):
        DSnoTConfig(base="obs")
    with pytest.raises(UserError, match="gradient pass"):
        DSnoTConfig(base="pruner-zero")
    for bad in (dict(max_cycles=-1), dict(max_cycles=1.5), dict(update_threshold=-0.1), dict(gamma=float("nan"))):
        with pytest.raises(UserError):
            DSnoTConfig(**bad)
    with pytest.raises(UserError, match="matches no linear"):
        DSnoTConfig(skip=["z_proj"]).validate(["self_attn.q_proj", "mlp.up_proj"], "LlamaDecoderLayer")
    DSnoTConfig().validate(["self_attn.q_proj", "fc1"], "OPTDecoderLayer")  # the defaults need not all match
    with pytest.raises(UserError, match="z_proj"):  # the base's own checks run too
        DSnoTConfig(base=d2prune.D2PruneConfig(target_layers=["z_proj"])).validate(["q_proj"], "L")
    record = DSnoTConfig(base="sparsegpt").to_dict()
    assert (
        record["name"] == "dsnot" and record["base"]["name"] == "sparsegpt" and record["skip"] == ["mlp", "fc1", "fc2"]
    )
    json.dumps(record)
    resolved = DSnoTConfig(base=d2prune.D2PruneConfig(auto_s=True)).resolve({"max_position_embeddings": 64})
    assert resolved.base.s == 64.0 and not resolved.base.auto_s


def test_pipeline_refines_attention_linears_and_leaves_mlp_ones_to_the_base():
    from conftest import build_tiny_model, make_calibration_ids
    from d2prune.engine.architecture import find_decoder_stack, find_linears

    ids = make_calibration_ids(windows=6, tokens=16)
    weights = {}
    for method in ("wanda", "dsnot"):
        model = build_tiny_model("llama-gqa")
        report = d2prune.prune(model, ids, d2prune.PruneConfig(method=method, sparsity=0.5, progress=False))
        assert report.overall_sparsity == 0.5
        layer0 = find_decoder_stack(model).layers[0]
        weights[method] = {n: lin.weight.detach().clone() for n, lin in find_linears(layer0).items()}
    for name, w in weights["dsnot"].items():
        ref = weights["wanda"][name]
        assert torch.equal((w == 0).sum(1), (ref == 0).sum(1)), name
        if name.startswith("mlp."):  # skipped by default: exactly Wanda's (layer 0 sees the same inputs)
            assert torch.equal(w, ref), name
    assert any(
        not torch.equal(w, weights["wanda"][n]) for n, w in weights["dsnot"].items() if n.startswith("self_attn")
    )


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


@needs_assets
def test_cli_dsnot_over_sparsegpt_2_4(tmp_path, cli_cache):
    from d2prune.cli import main

    out = tmp_path / "dsnot"
    assert (
        main(
            [
                "prune",
                str(TINY),
                "--method",
                "dsnot",
                "--dsnot-base",
                "sparsegpt",
                "--pattern",
                "2:4",
                "--blocksize",
                "32",
                "--dsnot-cycles",
                "20",
                "--dsnot-threshold",
                "0.05",
                "--dsnot-gamma",
                "0.5",
                "--dsnot-skip",
                "k_proj",
                "--output-dir",
                str(out),
                *QUICK,
            ]
        )
        == 0
    )
    rec = json.loads((out / "run.json").read_text())
    method = rec["config"]["method"]
    assert method["name"] == "dsnot" and method["max_cycles"] == 20 and method["update_threshold"] == 0.05
    assert method["gamma"] == 0.5 and method["skip"] == ["k_proj"]
    assert method["base"]["name"] == "sparsegpt" and method["base"]["blocksize"] == 32
    assert all(lin["nm_violations"] == 0 and lin["weight_update"] for lin in rec["linears"])
    ppl = rec["perplexity"]["pruned"]["wikitext2"]["ppl"]
    assert ppl == ppl and ppl < 1e4


@needs_assets
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--dsnot-base", "obs"], "unknown --dsnot-base 'obs'"),
        (["--dsnot-base", "dsnot"], "own mask"),
        (["--dsnot-cycles", "-2"], "max_cycles"),
        (["--dsnot-skip", "z_proj"], "z_proj"),
    ],
)
def test_cli_dsnot_mistakes_give_one_line_and_exit_2(args, needle, tmp_path, capsys, cli_cache):
    from d2prune.cli import main

    assert main(["prune", str(TINY), "--method", "dsnot", *args, *QUICK, "--eval", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("d2prune: error:") and needle in err and "\n" not in err
