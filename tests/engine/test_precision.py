"""The compute dtype (d2prune.engine.precision): forwards in bfloat16/float16, weights kept as they are."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import d2prune
from conftest import QUICK_CLI, TINY, build_tiny_model, make_calibration_ids, needs_assets
from d2prune.engine import precision
from d2prune.engine.precision import check_compute_dtype, computing_in, resolve_compute_dtype
from d2prune.errors import UserError
from d2prune.evaluation.perplexity import evaluate_ppl


def _config(method="sparsegpt", **kw) -> d2prune.PruneConfig:
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 2)
    return d2prune.PruneConfig(method=method, **kw)


def _linear_input_dtypes(model: nn.Module) -> tuple[set[torch.dtype], list]:
    """The dtypes every linear of the decoder layers is called with (recorded by pre-hooks)."""
    seen: set[torch.dtype] = set()
    handles = [
        m.register_forward_pre_hook(lambda mod, args: seen.add(args[0].dtype))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in name
    ]
    return seen, handles


# --------------------------------------------------------------------------------------------------
# computing_in, the names, auto
# --------------------------------------------------------------------------------------------------


def test_computing_in_casts_parameters_only_and_gives_back_the_same_tensors():
    model = build_tiny_model("llama-gqa")
    params = {n: (p, p.data_ptr(), p.data.clone()) for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    with computing_in(model, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        # Rotary frequencies stay float32: the model casts their products itself.
        assert all(b.dtype == buffers[n].dtype for n, b in model.named_buffers())
    for name, (param, ptr, copy_) in params.items():
        assert param.data_ptr() == ptr, name  # the very storage: no float32 → bfloat16 → float32 rounding
        assert torch.equal(param.data, copy_), name
    with computing_in(model, None):
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_computing_in_frozen_only_and_restores_after_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight.requires_grad_(False)
    with computing_in(model, torch.float16, frozen_only=True):
        assert model[1].weight.dtype == torch.float16
        assert model[0].weight.dtype == model[1].bias.dtype == torch.float32
    with pytest.raises(RuntimeError), computing_in(model, torch.bfloat16):
        raise RuntimeError("boom")
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize(
    "name,expected", [("bf16", "bfloat16"), ("torch.float16", "float16"), ("FP32", "float32"), ("Auto", "auto")]
)
def test_compute_dtype_names(name, expected):
    assert check_compute_dtype(name) == expected


def test_unknown_compute_dtype_is_a_user_error():
    with pytest.raises(UserError, match="unknown compute dtype 'int8'.*model, auto, float32, bfloat16, float16"):
        _config(compute_dtype="int8")


@pytest.mark.parametrize(
    "flags,expected",
    [({"amx_bf16", "avx2"}, torch.bfloat16), ({"avx512_bf16"}, torch.bfloat16), ({"avx2"}, torch.float32)],
)
def test_auto_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    resolved = resolve_compute_dtype("auto", "cpu")
    assert resolved.dtype == expected
    assert resolved.reason.startswith("auto: CPU")
    assert resolve_compute_dtype("bfloat16", "cpu").dtype == torch.bfloat16
    assert resolve_compute_dtype("model", "cpu").dtype is None


def test_auto_on_cuda_follows_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_compute_dtype("auto", "cuda").dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    resolved = resolve_compute_dtype("auto", "cuda")
    assert resolved.dtype == torch.float32 and "7.5" in resolved.reason


# --------------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "d2prune", "alps", "pruner-zero"])
def test_bfloat16_forwards_prune_float32_weights(method):
    ids = make_calibration_ids(windows=4, tokens=16)
    dense = build_tiny_model("llama-gqa")
    reference = copy.deepcopy(dense)
    ref_report = d2prune.prune(reference, ids, _config(method))

    model = copy.deepcopy(dense)
    seen, handles = _linear_input_dtypes(model)
    report = d2prune.prune(model, ids, _config(method, compute_dtype="bfloat16"))
    for h in handles:
        h.remove()
    assert seen == {torch.bfloat16}  # every layer forward ran in bfloat16 ...
    assert all(p.dtype == torch.float32 for p in model.parameters())  # ... the weights stay float32
    assert report.compute_dtype == {"requested": "bfloat16", "dtype": "bfloat16", "reason": "requested"}
    assert report.config["compute_dtype"] == "bfloat16"
    assert report.activations["dtype"] == "bfloat16"
    assert report.overall_sparsity == ref_report.overall_sparsity == 0.5
    # Same method on rounded activations: close to the float32 run, not equal to it.
    errors = [lin.relative_error for lin in report.linears]
    ref_errors = [lin.relative_error for lin in ref_report.linears]
    assert errors != ref_errors
    assert sum(errors) == pytest.approx(sum(ref_errors), rel=0.1)
    # Weights untouched by pruning are the float32 originals, bit for bit (no round trip).
    kept = [(p, d) for p, d in zip(model.parameters(), dense.parameters()) if p.dim() == 1]
    assert kept and all(torch.equal(p, d) for p, d in kept)

    again = copy.deepcopy(dense)
    d2prune.prune(again, ids, _config(method, compute_dtype="bfloat16"))
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))  # deterministic


def test_float32_compute_of_a_float32_model_is_the_model_dtype_run():
    ids = make_calibration_ids(windows=4, tokens=16)
    a, b = build_tiny_model("qwen3"), build_tiny_model("qwen3")
    d2prune.prune(a, ids, _config("d2prune"))
    report = d2prune.prune(b, ids, _config("d2prune", compute_dtype="float32"))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert report.compute_dtype["dtype"] == "float32"


def test_float32_compute_of_a_bfloat16_model_keeps_bfloat16_weights():
    ids = make_calibration_ids(windows=4, tokens=16)
    model = build_tiny_model("llama-gqa").to(torch.bfloat16)
    seen, handles = _linear_input_dtypes(model)
    report = d2prune.prune(model, ids, _config("sparsegpt", compute_dtype="float32"))
    for h in handles:
        h.remove()
    assert seen == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert report.overall_sparsity == 0.5
    assert report.compute_dtype["dtype"] == "float32"
    model_dtype = d2prune.prune(
        build_tiny_model("llama-gqa").to(torch.bfloat16), ids, _config("sparsegpt")
    ).compute_dtype
    assert model_dtype == {
        "requested": "model",
        "dtype": "bfloat16",
        "reason": "the model's dtype (--compute-dtype model)",
    }


@pytest.mark.parametrize("key", ["opt", "gpt-neox", "phi3", "qwen2"])
def test_other_architectures_prune_in_float16_and_bfloat16(key):
    ids = make_calibration_ids(windows=2, tokens=16)
    for dtype in ("float16", "bfloat16"):
        model = build_tiny_model(key)
        report = d2prune.prune(model, ids, _config("sparsegpt", compute_dtype=dtype))
        assert report.overall_sparsity == 0.5
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_owl_in_bfloat16_allocates_like_float32():
    ids = make_calibration_ids(windows=4, tokens=16)
    config = dict(sparsity_profile="owl", owl_lambda=0.1)
    ref = d2prune.prune(build_tiny_model("llama-gqa"), ids, _config("wanda", **config))
    half = d2prune.prune(build_tiny_model("llama-gqa"), ids, _config("wanda", compute_dtype="bfloat16", **config))
    assert half.outlier_ratios == pytest.approx(ref.outlier_ratios, abs=2.0)
    assert sum(half.layer_sparsities) == pytest.approx(sum(ref.layer_sparsities))


def test_streamed_bfloat16_compute_matches_in_memory(tmp_path):
    from safetensors.torch import load_file

    from d2prune.io.models import save_pruned
    from d2prune.streaming import prune_checkpoint

    model = build_tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "src")
    ids = make_calibration_ids(windows=4, tokens=16)
    config = _config("sparsegpt", compute_dtype="bfloat16")
    report, out = prune_checkpoint(tmp_path / "src", ids, config, tmp_path / "streamed")
    mem = d2prune.prune(model, ids, config)
    save_pruned(model, None, tmp_path / "memory", mem.sparsity_record())
    streamed = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    memory = {k: v for f in sorted((tmp_path / "memory").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert streamed.keys() == memory.keys()
    assert all(torch.equal(streamed[k], memory[k]) and streamed[k].dtype == torch.float32 for k in streamed)
    assert report.compute_dtype == mem.compute_dtype


def test_gradient_pass_runs_in_the_compute_dtype(tmp_path):
    from d2prune.methods.pruner_zero import PrunerZeroConfig

    ids = make_calibration_ids(windows=2, tokens=16)
    cache = tmp_path / "grads.safetensors"
    ref = PrunerZeroConfig(gradient_cache=str(cache)).prepare(
        build_tiny_model("llama-gqa"), [{"input_ids": ids}], torch.device("cpu"), False
    )
    model = build_tiny_model("llama-gqa")
    half = PrunerZeroConfig(gradient_cache=str(cache)).prepare(
        model, [{"input_ids": ids}], torch.device("cpu"), False, torch.bfloat16
    )
    # The float32 cache was not reused for a bfloat16 pass (its key covers the cast weights) ...
    assert half.gradient_origin == "computed"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for path, g in ref.gradients.items():
        assert g.dtype == half.gradients[path].dtype == torch.float32
        # ... and its gradients are those of a bfloat16 forward: close, not equal.
        assert torch.allclose(half.gradients[path], g, rtol=0.1, atol=0.1 * float(g.abs().max()))


# --------------------------------------------------------------------------------------------------
# evaluation, fine-tuning, the CLI
# --------------------------------------------------------------------------------------------------


def test_perplexity_in_bfloat16_is_close_and_leaves_the_weights():
    model = build_tiny_model("llama-gqa")
    before = [p.data_ptr() for p in model.parameters()]
    tokens = make_calibration_ids(windows=4, tokens=32, seed=3).reshape(-1)
    ref = evaluate_ppl(model, tokens, 32, progress=False)
    half = evaluate_ppl(model, tokens, 32, progress=False, compute_dtype="bfloat16")
    assert half.ppl != ref.ppl
    assert half.ppl == pytest.approx(ref.ppl, rel=0.02)
    assert all(p.data_ptr() == b for p, b in zip(model.parameters(), before))


def test_finetune_trains_float32_adapters_on_bfloat16_frozen_weights():
    pytest.importorskip("peft")
    from d2prune.finetune import FinetuneConfig, finetune

    model = build_tiny_model("llama-gqa")
    d2prune.prune(model, make_calibration_ids(), _config("magnitude"))
    options = dict(lr=1e-2, max_steps=2, batch_size=2, effective_batch_size=2, warmup_steps=0, progress=False)
    data = make_calibration_ids(4, 32, seed=1)
    ref = finetune(copy.deepcopy(model), data, FinetuneConfig(**options))
    half_model = copy.deepcopy(model)
    seen, handles = _linear_input_dtypes(half_model)
    half = finetune(half_model, data, FinetuneConfig(compute_dtype="bfloat16", **options))
    for h in handles:
        h.remove()
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    assert half.loss_curve[-1]["loss"] != ref.loss_curve[-1]["loss"]
    assert half.loss_curve[-1]["loss"] == pytest.approx(ref.loss_curve[-1]["loss"], rel=0.05)
    assert half.config["compute_dtype"] == "bfloat16"


@needs_assets
def test_cli_records_the_compute_dtype_and_refuses_a_bad_one(tmp_path, cli_cache, capsys):
    from d2prune.cli import main

    out = tmp_path / "out"
    rc = main(
        ["prune", str(TINY), "--method", "wanda", "--compute-dtype", "bf16", "--output-dir", str(out), *QUICK_CLI]
    )
    assert rc == 0
    record = json.loads((out / "run.json").read_text())
    assert record["compute_dtype"] == {"requested": "bfloat16", "dtype": "bfloat16", "reason": "requested"}
    assert record["config"]["compute_dtype"] == "bfloat16"
    assert record["activations"]["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(["prune", str(TINY), "--compute-dtype", "int4", *QUICK_CLI]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown compute dtype 'int4'" in err


@needs_assets
def test_cli_eval_in_bfloat16_in_memory_and_streamed(tmp_path, cli_cache, capsys):
    from d2prune.cli import main
    from d2prune.io.models import load_model

    folder = tmp_path / "tiny"
    model, tokenizer = load_model(str(TINY))
    model.save_pretrained(folder)  # a safetensors folder, streamable
    tokenizer.save_pretrained(folder)
    ppl = {}
    for offload in ("none", "disk"):
        for dtype in ("model", "bfloat16"):
            out = tmp_path / f"{offload}-{dtype}"
            args = ["eval", str(folder), "--offload", offload, "--compute-dtype", dtype, "--output-dir", str(out)]
            assert main([*args, *QUICK_CLI[2:]]) == 0  # eval has no --nsamples
            record = json.loads((out / "run.json").read_text())
            assert record["compute_dtype"]["dtype"] == ("float32" if dtype == "model" else "bfloat16")
            ppl[offload, dtype] = record["perplexity"]["model"]["wikitext2"]["ppl"]
    capsys.readouterr()
    assert ppl["none", "model"] == pytest.approx(ppl["disk", "model"], rel=1e-6)
    assert ppl["none", "bfloat16"] == pytest.approx(ppl["disk", "bfloat16"], rel=1e-6)
    assert ppl["none", "bfloat16"] != ppl["none", "model"]
    assert ppl["none", "bfloat16"] == pytest.approx(ppl["none", "model"], rel=0.03)
