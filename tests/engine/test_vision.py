"""Pruning image classifiers (ViT, DeiT, DeiT with a distillation head) through ``d2prune.prune``:
the encoder stack is found, every method and pattern reaches its target on every encoder linear,
the classifier head stays dense, layer 0 sees the model's own embeddings (checked against a Wanda
mask computed by hand) and runs are deterministic."""

from __future__ import annotations

import math

import pytest
import torch

import d2prune
from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.engine.capture import batch_rows, calibration_batches, forward_options, input_key
from d2prune.errors import UserError
from vision_models import BLOCK_LINEARS, LAYERS, VISION_KINDS, build_tiny_classifier, classifier_heads, make_images

METHODS = ["magnitude", "wanda", "sparsegpt", "d2prune", "pruner-zero", "alps", "d2alps", "ria", "dsnot"]
STACK_PATHS = {"vit": "vit.layers", "deit": "deit.layers", "deit-teacher": "deit.layers"}


def _batches(n: int = 8, batch: int = 4, seed: int = 0, labels: bool = True) -> list[dict[str, torch.Tensor]]:
    pixels, targets = make_images(n, seed)
    return [
        {"pixel_values": pixels[i : i + batch], **({"labels": targets[i : i + batch]} if labels else {})}
        for i in range(0, n, batch)
    ]


def _config(method: str, **kw) -> d2prune.PruneConfig:
    kw.setdefault("progress", False)
    return d2prune.PruneConfig(method=method, **kw)


def _encoder_weights(model) -> dict[str, torch.Tensor]:
    stack = find_decoder_stack(model)
    return {
        f"{stack.path}.{i}.{n}": lin.weight
        for i, layer in enumerate(stack.layers)
        for n, lin in find_linears(layer).items()
    }


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_the_encoder_stack_is_found_with_every_linear_and_without_the_head(kind):
    model = build_tiny_classifier(kind)
    stack = find_decoder_stack(model)
    assert stack.path == STACK_PATHS[kind]
    assert len(stack.layers) == LAYERS
    assert list(find_linears(stack.layers[0])) == BLOCK_LINEARS
    inside = {id(m) for m in stack.layers.modules()}
    heads = [m for name, m in model.named_modules() if "classifier" in name]
    assert heads and all(id(m) not in inside for m in heads)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_every_method_and_pattern_prunes_every_encoder_linear(kind, method, pattern):
    model = build_tiny_classifier(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = classifier_heads(model)
    report = d2prune.prune(model, _batches(), _config(method, sparsity=0.5, pattern=pattern))

    weights = _encoder_weights(model)
    assert [lin.name for lin in report.linears] == list(weights)
    assert len(report.linears) == LAYERS * len(BLOCK_LINEARS)
    for entry in report.linears:
        w = weights[entry.name].detach()
        zeros = w == 0
        assert entry.sparsity == zeros.float().mean().item()
        if pattern == "2:4":
            rows, cols = w.shape
            assert entry.nm_violations == 0, entry.name
            assert (zeros.reshape(rows, cols // 4, 4).sum(-1) == 2).all(), entry.name
        else:
            assert abs(entry.sparsity - 0.5) <= 0.01, entry.name
    # The head(s), embeddings, norms and biases are untouched.
    after = model.state_dict()
    for name, value in before.items():
        if not name.endswith(".weight") or name[: -len(".weight")] not in weights:
            assert torch.equal(after[name], value), name
    for name, value in classifier_heads(model).items():
        assert torch.equal(value, heads[name]), name
    assert report.nsamples == 8
    assert report.image_size == [3, 16, 16]
    # 16 patches plus the class token (DeiT: and the distillation token).
    assert report.seqlen == (17 if kind == "vit" else 18)
    assert report.to_dict()["image_size"] == [3, 16, 16]


def test_the_teacher_variant_prunes_with_pruner_zero_gradients():
    model = build_tiny_classifier("deit-teacher")
    heads = classifier_heads(model)
    report = d2prune.prune(model, _batches(), _config("pruner-zero", sparsity=0.5))
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    assert all(torch.equal(v, heads[k]) for k, v in classifier_heads(model).items())


def test_layer0_sees_the_models_embeddings_wanda_mask_by_hand():
    """Wanda's layer-0 masks equal those computed from the dense model's own forward (class token,
    position embeddings, layer norm and all), captured with forward hooks."""
    model = build_tiny_classifier("vit")
    pixels, _ = make_images(8)
    stack = find_decoder_stack(model)
    linears = find_linears(stack.layers[0])
    sq = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}

    def hook(name: str):
        def add(module, inputs, output) -> None:  # returns None: the output stays
            sq[name].add_(inputs[0].reshape(-1, inputs[0].shape[-1]).double().pow(2).sum(0))

        return add

    hooks = [lin.register_forward_hook(hook(name)) for name, lin in linears.items()]
    with torch.no_grad():
        model(pixel_values=pixels)
    for h in hooks:
        h.remove()
    expected = {}
    for name, lin in linears.items():
        score = lin.weight.detach().abs() * sq[name].sqrt().float()
        cols = score.shape[1]
        drop = torch.topk(score, math.floor(0.5 * cols), dim=1, largest=False).indices
        expected[name] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, drop, True)
    d2prune.prune(model, [pixels[:3], pixels[3:]], _config("wanda", sparsity=0.5))
    for name, lin in linears.items():
        assert torch.equal(lin.weight == 0, expected[name]), name


@pytest.mark.parametrize("method", ["sparsegpt", "d2prune", "pruner-zero"])
def test_image_runs_are_deterministic(method):
    masks = []
    for _ in range(2):
        model = build_tiny_classifier("vit")
        d2prune.prune(model, _batches(), _config(method, sparsity=0.6, sparsity_profile="owl", refit="cg"))
        masks.append({k: w.detach().clone() for k, w in _encoder_weights(model).items()})
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name]), name


def test_d2prune_defaults_to_the_key_projection_and_names_unknown_targets():
    model = build_tiny_classifier("vit")
    report = d2prune.prune(model, _batches(), _config("d2prune"))
    assert report.config["method"]["target_layers"] == ["attention.k_proj"]
    no_update = {e.name.split(".", 3)[3] for e in report.linears if not e.weight_update}
    assert no_update == {"attention.k_proj"}
    bad = d2prune.D2PruneConfig(target_layers=["attention.attention.query"])
    with pytest.raises(UserError, match=r"not a linear of ViTLayer; its linears are: attention.q_proj"):
        d2prune.prune(build_tiny_classifier("vit"), _batches(), _config(bad))


def test_owl_allocates_per_encoder_block():
    model = build_tiny_classifier("vit")
    report = d2prune.prune(model, _batches(), _config("wanda", sparsity=0.5, sparsity_profile="owl", owl_lambda=0.1))
    assert len(report.outlier_ratios) == LAYERS
    assert len(report.layer_sparsities) == LAYERS
    assert sum(report.layer_sparsities) / LAYERS == pytest.approx(0.5, abs=1e-6)


def test_pruner_zero_without_labels_is_a_user_error():
    model = build_tiny_classifier("vit")
    with pytest.raises(UserError, match="need the calibration images' labels"):
        d2prune.prune(model, _batches(labels=False), _config("pruner-zero"))


def test_image_calibration_forms_are_normalized():
    pixels, labels = make_images(5)
    batches = calibration_batches(pixels, 2)
    assert [batch_rows(b) for b in batches] == [2, 2, 1]
    assert all(input_key(b) == "pixel_values" for b in batches)
    assert torch.equal(calibration_batches([pixels[0]], 1)[0]["pixel_values"], pixels[:1])
    # An image model's forward does not name use_cache: it is not passed; token batches keep it.
    assert forward_options(build_tiny_classifier("vit"), batches[0]) == {}
    assert forward_options(None, {"input_ids": torch.zeros(1, 2, dtype=torch.long)}) == {"use_cache": False}


@pytest.mark.parametrize(
    "calibration, message",
    [
        (torch.randn(3, 16, 16), "must be 4-D"),
        ([{"pixel_values": torch.zeros(2, 3, 16, 16, dtype=torch.long)}], "floating point"),
        ([{"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.zeros(3, dtype=torch.long)}], "one per image"),
        ([{"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.zeros(2)}], "integer class indices"),
        ([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)], "same shape"),
        ([torch.randn(2, 3, 16, 16), torch.zeros(2, 4, dtype=torch.long)], "mix"),
        (
            [
                {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.zeros(2, dtype=torch.long)},
                torch.randn(1, 3, 16, 16),
            ],
            "some calibration batches have labels",
        ),
        ([{"pixels": torch.randn(2, 3, 16, 16)}], "'input_ids' or 'pixel_values'"),
    ],
)
def test_bad_image_calibration_is_a_user_error(calibration, message):
    with pytest.raises(UserError, match=message):
        calibration_batches(calibration, 2)
