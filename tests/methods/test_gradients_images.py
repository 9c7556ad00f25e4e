"""Pruner-Zero's gradient statistic on image classifiers: the cross-entropy of each image against
its label, checked against autograd on the whole model, in both modes of the pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from d2prune.engine.architecture import find_decoder_stack, find_linears
from d2prune.errors import UserError
from d2prune.methods.gradients import gradient_cache_key, gradient_norms
from vision_models import build_tiny_classifier, make_images


def _reference(model, pixels, labels, scale=100.0) -> dict[str, torch.Tensor]:
    stack = find_decoder_stack(model)
    linears = {
        f"{stack.path}.{i}.{n}": lin for i, layer in enumerate(stack.layers) for n, lin in find_linears(layer).items()
    }
    sums = {k: torch.zeros_like(lin.weight) for k, lin in linears.items()}
    for k in range(pixels.shape[0]):
        loss = F.cross_entropy(model(pixel_values=pixels[k : k + 1]).logits, labels[k : k + 1])
        grads = torch.autograd.grad(loss, [lin.weight for lin in linears.values()])
        for name, g in zip(linears, grads):
            sums[name] += (scale * g) ** 2
    return {k: v.sqrt() for k, v in sums.items()}


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
def test_image_gradients_match_autograd(kind, layerwise):
    model = build_tiny_classifier(kind)
    pixels, labels = make_images(5)
    expected = _reference(model, pixels, labels)
    batches = [{"pixel_values": pixels[:3], "labels": labels[:3]}, {"pixel_values": pixels[3:], "labels": labels[3:]}]
    got = gradient_norms(model, batches, progress=False, layerwise=layerwise, windows_per_sweep=2)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_image_gradients_need_labels_in_range():
    model = build_tiny_classifier("vit")
    pixels, _ = make_images(2)
    with pytest.raises(UserError, match="labels"):
        gradient_norms(model, [{"pixel_values": pixels}], progress=False)
    with pytest.raises(UserError, match=r"must lie in 0\.\.9"):
        gradient_norms(model, [{"pixel_values": pixels, "labels": torch.tensor([3, 12])}], progress=False)


def test_the_cache_key_covers_pixels_and_labels():
    model = build_tiny_classifier("vit")
    pixels, labels = make_images(3)
    key = gradient_cache_key(model, [{"pixel_values": pixels, "labels": labels}])
    assert key == gradient_cache_key(
        model, [{"pixel_values": pixels[i : i + 1], "labels": labels[i : i + 1]} for i in range(3)]
    )
    assert key != gradient_cache_key(model, [{"pixel_values": pixels, "labels": (labels + 1) % 10}])
    assert key != gradient_cache_key(model, [{"pixel_values": pixels * 2, "labels": labels}])
