"""End-to-end tests of d2prune.prune on tiny random models of 7 architectures and one tiny trained LLaMA."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import pytest
import torch

import d2prune
from conftest import ARCH_KEYS, ARCHS, LAYERS, SHARED, build_tiny_model, make_calibration_ids
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.methods.base import LinearPruner, MethodConfig
from d2prune.patterns import SparsityTarget, row_mask

METHODS = ["magnitude", "wanda", "sparsegpt", "d2prune"]
PATTERNS = ["unstructured", "2:4"]
PER_ROW = {"magnitude", "wanda"}  # plus d2prune's no-update branch


def _method(method: str, key: str = "llama-gqa"):
    """A method config usable on architecture ``key`` (D²Prune needs a target linear that exists there)."""
    if method == "d2prune":
        return d2prune.D2PruneConfig(target_layers=[ARCHS[key].d2_target])
    return method


def _config(method, key="llama-gqa", **kw) -> d2prune.PruneConfig:
    kw.setdefault("progress", False)
    return d2prune.PruneConfig(method=_method(method, key) if isinstance(method, str) else method, **kw)


def _decoder_linear_weights(model) -> dict[str, torch.Tensor]:
    stack = find_decoder_stack(model)
    return {
        f"{stack.path}.{i}.{name}.weight": lin.weight
        for i, layer in enumerate(stack.layers)
        for name, lin in find_linears(layer).items()
    }


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# the architecture × method × pattern matrix
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", ARCH_KEYS)
def test_every_decoder_linear_reaches_target(key, method, pattern):
    model = build_tiny_model(key)
    ids = make_calibration_ids(windows=6, tokens=16)
    before = _snapshot(model)
    report = d2prune.prune(model, ids, _config(method, key, sparsity=0.5, pattern=pattern, batch_size=2))

    arch = ARCHS[key]
    weights = _decoder_linear_weights(model)
    # One report entry per decoder linear, named by its full module path, in layer order.
    expected_names = [f"{arch.stack_path}.{i}.{n}" for i in range(LAYERS) for n in arch.linears]
    assert [lin.name for lin in report.linears] == expected_names
    assert len(report.linears) == LAYERS * len(arch.linears)
    assert [lin.layer for lin in report.linears] == [i for i in range(LAYERS) for _ in arch.linears]

    for entry in report.linears:
        w = weights[entry.name + ".weight"].detach()
        old = before[entry.name + ".weight"]
        rows, cols = w.shape
        zeros = w == 0
        assert entry.target_sparsity == 0.5
        assert entry.sparsity == pytest.approx(zeros.float().mean().item(), abs=0)
        per_row = method in PER_ROW or (method == "d2prune" and not entry.weight_update)
        assert entry.weight_update == (not per_row), entry.name
        if method == "d2prune":
            relative = entry.name[len(arch.stack_path) + 1 :].split(".", 1)[1]
            assert entry.weight_update == (relative != arch.d2_target), entry.name
        if pattern == "2:4":
            assert entry.nm_violations == 0, entry.name
            assert (zeros.reshape(rows, cols // 4, 4).sum(-1) >= 2).all(), entry.name
            assert entry.sparsity == 0.5, entry.name
        else:
            assert entry.nm_violations is None
            if per_row:
                assert (zeros.sum(1) == math.floor(0.5 * cols)).all(), entry.name
            else:
                assert abs(entry.sparsity - 0.5) <= 0.01, entry.name
        if per_row:
            # No-update methods only zero weights: the survivors are bit-identical to the dense ones.
            assert torch.equal(w[~zeros], old[~zeros]), entry.name
        else:
            # The OBS update moves the surviving weights.
            assert not torch.allclose(w[~zeros], old[~zeros]), entry.name
        assert entry.relative_error is not None and 0 <= entry.relative_error < 1.5, entry.name

    # Nothing but decoder-linear weights changed: embeddings, lm_head, norms, biases are untouched.
    after = model.state_dict()
    for name, value in before.items():
        if name not in weights:
            assert torch.equal(after[name], value), name
    assert torch.equal(model.get_input_embeddings().weight, before[_param_name(model, model.get_input_embeddings())])
    assert torch.equal(model.get_output_embeddings().weight, before[_param_name(model, model.get_output_embeddings())])

    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    assert report.nm_ok is (True if pattern == "2:4" else None)
    assert report.nsamples == 6 and report.seqlen == 16
    json.dumps(report.to_dict())

    with torch.no_grad():
        logits = model(make_calibration_ids(windows=2, tokens=16, seed=1)).logits
    assert torch.isfinite(logits).all()


def _param_name(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}.weight"
    raise AssertionError("module not in model")


# --------------------------------------------------------------------------------------------------
# layer k's statistics see the pruned output of layer k-1
# --------------------------------------------------------------------------------------------------


class _RecordingPruner(LinearPruner):
    """Records the inputs it observes; prunes by magnitude so that pruning changes later inputs."""

    def __init__(self, name, weight, records):
        super().__init__(name, weight)
        self.inputs: list[torch.Tensor] = []
        records.append(self)

    def observe(self, x, y):
        self.inputs.append(x.detach().clone())

    def prune(self, weight, target: SparsityTarget, gram):
        w = weight.float().clone()
        w[row_mask(w.abs(), target)] = 0
        return w


@pytest.mark.parametrize("key", ["llama-gqa", "opt", "gpt-neox", "phi3"])
def test_layer_statistics_see_pruned_output_of_previous_layer(key):
    arch = ARCHS[key]
    records: list[_RecordingPruner] = []

    @dataclass
    class RecordingConfig(MethodConfig):
        name = "test-recording"

        def make_pruner(self, name, weight, path=""):
            return _RecordingPruner(name, weight, records)

    d2prune.methods.register(RecordingConfig)
    try:
        model = build_tiny_model(key)
        dense = copy.deepcopy(model)
        ids = make_calibration_ids(windows=6, tokens=16)
        d2prune.prune(
            model, ids, d2prune.PruneConfig(method="test-recording", sparsity=0.5, batch_size=4, progress=False)
        )
    finally:
        d2prune.METHODS.pop("test-recording", None)
    assert "test-recording" not in d2prune.METHODS

    watched = [p for p in records if p.name == arch.first_linear]
    assert len(watched) == LAYERS
    seen = [torch.cat(p.inputs) for p in watched]
    assert seen[1].shape == (6, 16, 64)

    with torch.no_grad():
        pruned_hidden = model(ids, output_hidden_states=True).hidden_states
        dense_hidden = dense(ids, output_hidden_states=True).hidden_states
        norm1 = find_decoder_stack(model).layers[1].get_submodule(arch.input_norm)
        norm0 = find_decoder_stack(model).layers[0].get_submodule(arch.input_norm)
        expected_1 = norm1(pruned_hidden[1])
        dense_1 = norm1(dense_hidden[1])
        expected_0 = norm0(dense_hidden[0])

    # Layer 0 reads the (unpruned) embeddings; layer 1 reads the output of the *pruned* layer 0.
    torch.testing.assert_close(seen[0], expected_0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[1], expected_1, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen[1], dense_1, rtol=1e-3, atol=1e-3)
    assert (seen[1] - dense_1).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# determinism, batch size, reported error
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", ["d2prune", "sparsegpt"])
def test_two_runs_are_bit_identical(method, pattern):
    dense = build_tiny_model("llama-gqa")
    ids = make_calibration_ids(windows=6, tokens=16)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(dense)
        report = d2prune.prune(model, ids, _config(method, pattern=pattern, batch_size=2))
        runs.append((model.state_dict(), [(e.sparsity, e.relative_error) for e in report.linears]))
    (a, ra), (b, rb) = runs
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ra == rb


def test_batch_size_does_not_change_wanda_result():
    dense = build_tiny_model("llama-gqa")
    ids = make_calibration_ids(windows=8, tokens=16)
    models, reports = [], []
    for batch_size in (1, 3):
        model = copy.deepcopy(dense)
        reports.append(d2prune.prune(model, ids, _config("wanda", batch_size=batch_size)))
        models.append(model)
    w1, w3 = _decoder_linear_weights(models[0]), _decoder_linear_weights(models[1])
    for name in w1:
        torch.testing.assert_close(w1[name], w3[name], rtol=1e-6, atol=1e-6)
        assert torch.equal(w1[name] == 0, w3[name] == 0), name
    assert [e.sparsity for e in reports[0].linears] == [e.sparsity for e in reports[1].linears]
    assert reports[0].nsamples == reports[1].nsamples == 8


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "d2prune"])
@pytest.mark.parametrize("layer", [0, 1])
def test_reported_relative_error_matches_direct_computation(method, layer):
    dense = build_tiny_model("llama-gqa")
    model = copy.deepcopy(dense)
    ids = make_calibration_ids(windows=6, tokens=16)
    report = d2prune.prune(model, ids, _config(method, batch_size=2))

    # Layer 0's inputs are the same in the dense and pruned model; layer 1's are the pruned model's
    # (the pipeline computes them with the pruned layer 0), and q_proj reads them before any pruned
    # linear of layer 1 acts.
    source = dense if layer == 0 else model
    captured = []
    q = find_decoder_stack(source).layers[layer].self_attn.q_proj
    handle = q.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach().clone()))
    with torch.no_grad():
        source(ids)
    handle.remove()
    x = torch.cat(captured).reshape(-1, 64).double()

    w = find_decoder_stack(dense).layers[layer].self_attn.q_proj.weight.detach().double()
    w_hat = find_decoder_stack(model).layers[layer].self_attn.q_proj.weight.detach().double()
    direct = ((x @ (w - w_hat).T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()

    (entry,) = [e for e in report.linears if e.name == f"model.layers.{layer}.self_attn.q_proj"]
    assert direct > 0
    assert entry.relative_error == pytest.approx(direct, rel=1e-4)


def test_measure_error_off_reports_none():
    model = build_tiny_model("llama-gqa")
    report = d2prune.prune(model, make_calibration_ids(), _config("wanda", measure_error=False))
    assert all(e.relative_error is None for e in report.linears)
    assert report.overall_sparsity == 0.5


def test_training_mode_is_restored():
    model = build_tiny_model("llama-gqa").train()
    d2prune.prune(model, make_calibration_ids(), _config("magnitude"))
    assert model.training


# --------------------------------------------------------------------------------------------------
# user errors
# --------------------------------------------------------------------------------------------------


def test_unknown_d2prune_target_layer_is_a_user_error():
    model = build_tiny_model("llama-gqa")
    before = _snapshot(model)
    cfg = _config(d2prune.D2PruneConfig(target_layers=["self_attn.kk_proj"]))
    with pytest.raises(d2prune.UserError, match=r"self_attn\.kk_proj.*LlamaDecoderLayer"):
        d2prune.prune(model, make_calibration_ids(), cfg)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_default_d2prune_target_on_gpt_neox_is_a_user_error():
    model = build_tiny_model("gpt-neox")
    with pytest.raises(d2prune.UserError, match=r"self_attn\.k_proj"):
        d2prune.prune(model, make_calibration_ids(), _config(d2prune.D2PruneConfig()))


def test_m_not_dividing_width_is_a_user_error():
    model = build_tiny_model("llama-gqa")
    before = _snapshot(model)
    with pytest.raises(d2prune.UserError, match=r"M=5 does not divide.*64"):
        d2prune.prune(model, make_calibration_ids(), _config("wanda", pattern="3:5"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1])
def test_sparsity_out_of_range_is_a_user_error(sparsity):
    with pytest.raises(d2prune.UserError, match="sparsity"):
        d2prune.PruneConfig(method="wanda", sparsity=sparsity)


@pytest.mark.parametrize("pattern", ["5:4", "4:4", "0:4", "2-4", "2:4:8"])
def test_bad_pattern_is_a_user_error(pattern):
    with pytest.raises(d2prune.UserError):
        d2prune.PruneConfig(method="wanda", pattern=pattern)


def test_calibration_as_list_of_batches_or_dicts_equals_tensor():
    dense = build_tiny_model("llama-gqa")
    ids = make_calibration_ids(windows=6, tokens=16)
    forms = {
        "tensor": ids,
        "list": [ids[:3], ids[3:]],
        "dicts": [
            {"input_ids": ids[:3], "attention_mask": torch.ones(3, 16, dtype=torch.long)},
            {"input_ids": ids[3:]},
        ],
    }
    results = {}
    for form, calibration in forms.items():
        model = copy.deepcopy(dense)
        report = d2prune.prune(model, calibration, _config("wanda", batch_size=3))
        assert (report.nsamples, report.seqlen) == (6, 16)
        results[form] = _decoder_linear_weights(model)
    for name, w in results["tensor"].items():
        assert torch.equal(w, results["list"][name]), name
        torch.testing.assert_close(w, results["dicts"][name], rtol=1e-5, atol=1e-6)


def test_single_window_tensors_in_a_list_are_windows():
    dense = build_tiny_model("llama-gqa")
    ids = make_calibration_ids(windows=3, tokens=16)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    report = d2prune.prune(a, [ids[0], ids[1], ids[2]], _config("wanda"))
    d2prune.prune(b, ids, _config("wanda", batch_size=1))
    assert report.nsamples == 3
    for (name, wa), wb in zip(_decoder_linear_weights(a).items(), _decoder_linear_weights(b).values()):
        assert torch.equal(wa, wb), name


@pytest.mark.parametrize(
    "calibration, match",
    [
        (torch.arange(16), "2-D"),
        (torch.zeros(0, 16, dtype=torch.long), "no calibration data"),
        ([], "no calibration data"),
        ([make_calibration_ids(2, 16), make_calibration_ids(2, 8)], r"same number of tokens.*\[8, 16\]"),
        ([{"input_ids": make_calibration_ids(1, 16)[0]}], "2-D"),
        ([{"input_ids": [1, 2, 3]}], "2-D"),
        ([{"tokens": make_calibration_ids(1, 16)}], "input_ids"),
        (["some text"], "input_ids"),
    ],
)
def test_bad_calibration_is_a_user_error(calibration, match):
    model = build_tiny_model("llama-gqa")
    with pytest.raises(d2prune.UserError, match=match):
        d2prune.prune(model, calibration, _config("wanda"))


def test_unknown_method_and_bad_calibration_are_user_errors():
    with pytest.raises(d2prune.UserError, match="nosuchmethod"):
        d2prune.PruneConfig(method="nosuchmethod")
    with pytest.raises(d2prune.UserError, match="2-D"):
        d2prune.prune(build_tiny_model("llama-gqa"), torch.arange(16), _config("wanda"))


# --------------------------------------------------------------------------------------------------
# real weights: the tiny trained LLaMA in shared/models
# --------------------------------------------------------------------------------------------------

REAL_MODEL = SHARED / "models" / "aidreams260K"
WIKITEXT = SHARED / "data" / "wikitext2" / "wiki.test.raw"


@pytest.fixture(scope="module")
def real_model_runs():
    if not (REAL_MODEL / "config.json").exists() or not WIKITEXT.exists():
        pytest.skip("shared tiny model or wikitext2 not available")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REAL_MODEL)
    text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    tokens = 64
    assert ids.numel() >= 10 * tokens
    calibration = ids[: 8 * tokens].reshape(8, tokens)
    held_out = ids[-tokens:].reshape(1, tokens)

    dense = AutoModelForCausalLM.from_pretrained(REAL_MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        dense_loss = dense(held_out, labels=held_out).loss.item()
    runs = {}
    for method in METHODS:
        model = copy.deepcopy(dense)
        report = d2prune.prune(
            model, calibration, d2prune.PruneConfig(method=method, sparsity=0.5, batch_size=4, progress=False)
        )
        with torch.no_grad():
            loss = model(held_out, labels=held_out).loss.item()
        runs[method] = (model, report, loss)
    return dense, dense_loss, runs


@pytest.mark.parametrize("method", METHODS)
def test_real_model_prunes_to_target(real_model_runs, method):
    dense, dense_loss, runs = real_model_runs
    model, report, loss = runs[method]
    num_layers = dense.config.num_hidden_layers
    assert len(report.linears) == num_layers * 7
    weights = _decoder_linear_weights(model)
    for entry in report.linears:
        w = weights[entry.name + ".weight"]
        cols = w.shape[1]
        if entry.weight_update:
            assert abs(entry.sparsity - 0.5) <= 0.01, entry.name
        else:
            assert (((w == 0).sum(1)) == math.floor(0.5 * cols)).all(), entry.name
    assert math.isfinite(dense_loss)
    assert math.isfinite(loss)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)


def test_real_model_sparsegpt_error_below_magnitude(real_model_runs):
    _, _, runs = real_model_runs

    def mean_error(method):
        errors = [e.relative_error for e in runs[method][1].linears]
        return sum(errors) / len(errors)

    assert mean_error("sparsegpt") < mean_error("magnitude")
    assert mean_error("wanda") < mean_error("magnitude")


def test_mixed_attention_types_get_their_own_masks():
    """Qwen2 with sliding-window layers after the first: each layer must run with its own mask.

    With nothing pruned, the input recorded at the last layer equals the dense model's own."""
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )
    assert len(set(config.layer_types)) == 2
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    ids = make_calibration_ids(windows=3, tokens=16)
    seen = {}

    class Recorder(d2prune.methods.base.LinearPruner):
        def observe(self, x, y):
            seen.setdefault(self.path, []).append(x.clone())

        def prune(self, weight, target, gram):
            return weight.float().clone()

    @dataclass
    class RecordingConfig(MethodConfig):
        name = "test-recording-mixed"

        def make_pruner(self, name, weight, path=""):
            p = Recorder(name, weight)
            p.path = path
            return p

    d2prune.methods.register(RecordingConfig)
    try:
        d2prune.prune(
            model, ids, d2prune.PruneConfig(method="test-recording-mixed", sparsity=0.0, batch_size=2, progress=False)
        )
    finally:
        d2prune.METHODS.pop("test-recording-mixed")
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for k in range(3):
        layer = model.model.layers[k]
        expected = layer.input_layernorm(hidden[k])
        got = torch.cat(seen[f"model.layers.{k}.self_attn.q_proj"])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["sparsegpt", "d2prune"])
def test_last_use_gram_in_place_hessian_changes_nothing(method):
    # Without measure_error the last reader of each Gram gets its Hessian made in place (less memory).
    ids = make_calibration_ids(windows=4, tokens=16)
    a, b = build_tiny_model("llama-gqa"), build_tiny_model("llama-gqa")
    d2prune.prune(a, ids, _config(method, measure_error=True))
    d2prune.prune(b, ids, _config(method, measure_error=False))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
