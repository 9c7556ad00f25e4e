"""Top-1/top-5 accuracy against a brute-force count over the same images."""

from __future__ import annotations

import pytest
import torch

from d2prune.errors import UserError
from d2prune.evaluation.accuracy import evaluate_accuracy
from vision_models import build_tiny_classifier, make_images


def _brute_force(model, pixels, labels):
    top1 = top5 = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in zip(pixels, labels):
            logits = model(pixel_values=x[None]).logits[0]
            loss += float(torch.logsumexp(logits.double(), 0) - logits[int(y)].double())
            ranked = sorted(range(logits.shape[0]), key=lambda c: (-float(logits[c]), c))
            top1 += ranked[0] == int(y)
            top5 += int(y) in ranked[:5]
    return top1 / len(labels), top5 / len(labels), loss / len(labels)


@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
def test_accuracy_matches_a_brute_force_count(kind):
    model = build_tiny_classifier(kind)
    pixels, labels = make_images(23, seed=3)
    batches = [{"pixel_values": pixels[i : i + 5], "labels": labels[i : i + 5]} for i in range(0, 23, 5)]
    result = evaluate_accuracy(model, batches, progress=False)
    top1, top5, loss = _brute_force(model, pixels, labels)
    assert result.n_images == 23
    assert result.top1 == pytest.approx(top1, abs=1e-12)
    assert result.top5 == pytest.approx(top5, abs=1e-12)
    assert 0 < result.top5 and result.top1 <= result.top5
    assert result.loss == pytest.approx(loss, rel=1e-5)
    assert result.to_dict() == {"top1": result.top1, "top5": result.top5, "n_images": 23, "loss": result.loss}


def test_labels_the_model_does_not_have_are_a_user_error():
    model = build_tiny_classifier("vit")
    pixels, _ = make_images(2)
    with pytest.raises(UserError, match=r"0\.\.9"):
        evaluate_accuracy(model, [{"pixel_values": pixels, "labels": torch.tensor([0, 10])}], progress=False)
