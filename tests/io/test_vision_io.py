"""Image classifiers through d2prune.io: the task told from the config, (model, image processor)
loaded, and a pruned model saved and reloaded with plain ``from_pretrained`` giving the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DeiTForImageClassificationWithTeacher, LlamaConfig, ViTConfig

import d2prune
from d2prune.errors import UserError
from d2prune.io.folders import CAUSAL_LM, IMAGE_CLASSIFICATION, config_task, is_image_classifier, model_class
from d2prune.io.models import load_model, load_sparsity_record, save_pruned
from vision_models import build_tiny_classifier, make_images, tiny_processor


def _save_dense(kind, folder, processor=True):
    model = build_tiny_classifier(kind)
    model.save_pretrained(folder)
    if processor:
        tiny_processor().save_pretrained(folder)
    return model


def test_the_task_comes_from_the_config():
    assert config_task(ViTConfig(architectures=["ViTForImageClassification"])) == IMAGE_CLASSIFICATION
    assert config_task(ViTConfig()) == IMAGE_CLASSIFICATION  # no architectures: by model type
    assert config_task(LlamaConfig()) == CAUSAL_LM
    assert config_task(LlamaConfig(architectures=["LlamaForCausalLM"])) == CAUSAL_LM
    teacher = build_tiny_classifier("deit-teacher").config
    teacher.architectures = ["DeiTForImageClassificationWithTeacher"]
    assert model_class(teacher) is DeiTForImageClassificationWithTeacher
    assert is_image_classifier(build_tiny_classifier("vit"))


@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
def test_load_prune_save_reload_gives_the_same_logits(tmp_path, kind):
    dense = _save_dense(kind, tmp_path / "dense")
    model, processor = load_model(str(tmp_path / "dense"))
    assert type(model) is type(dense)
    assert type(processor).__name__.startswith("ViTImageProcessor")
    pixels, labels = make_images(6)
    report = d2prune.prune(
        model, {"pixel_values": pixels, "labels": labels}, d2prune.PruneConfig(method="sparsegpt", progress=False)
    )
    out = save_pruned(model, processor, tmp_path / "pruned", report.sparsity_record())
    config = json.loads((out / "config.json").read_text())
    assert "use_cache" not in config  # an image classifier has no KV cache option
    assert (out / "preprocessor_config.json").is_file()
    reloaded = type(dense).from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    assert load_sparsity_record(out)["overall_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_an_image_classifier_without_a_processor_is_a_user_error(tmp_path):
    _save_dense("vit", tmp_path, processor=False)
    with pytest.raises(UserError, match="no usable image processor"):
        load_model(str(tmp_path))
