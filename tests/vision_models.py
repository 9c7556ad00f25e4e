"""Tiny seeded random image classifiers (ViT, DeiT, DeiT with a distillation head) and images.

16×16 RGB images in 4×4 patches (16 patches + class token(s)), hidden size 32, 2 encoder blocks,
10 classes: a whole prune runs in well under a second on CPU.
"""

from __future__ import annotations

import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

VISION_KINDS = ("vit", "deit", "deit-teacher")
IMAGE_SIZE = 16
NUM_LABELS = 10
LAYERS = 2
# Every linear of an encoder block (transformers 5.24 names).
BLOCK_LINEARS = ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"]


def vision_config(kind: str = "vit", **overrides):
    kw = dict(
        image_size=IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=NUM_LABELS,
    )
    kw.update(overrides)
    return ViTConfig(**kw) if kind == "vit" else DeiTConfig(**kw)


def build_tiny_classifier(kind: str = "vit", seed: int = 0, **overrides):
    """A seeded random classifier of ``kind`` (one of ``VISION_KINDS``) in eval mode, float32."""
    classes = {
        "vit": ViTForImageClassification,
        "deit": DeiTForImageClassification,
        "deit-teacher": DeiTForImageClassificationWithTeacher,
    }
    torch.manual_seed(seed)
    model = classes[kind](vision_config(kind, **overrides))
    return model.eval()


def make_images(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random pixel values (n, 3, 16, 16) and labels (n,) in 0..9."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
    return pixels, labels


def classifier_heads(model) -> dict[str, torch.Tensor]:
    """The weights and biases of the classification head(s), cloned."""
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if name.split(".")[0] in ("classifier", "cls_classifier", "distillation_classifier")
    }


def tiny_processor():
    """The image processor of the tiny classifiers: 16×16, ImageNet mean/std (PIL backend)."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class: int = 3, seed: int = 0, size: int = 20):
    """A labelled image folder in ImageNet layout: ``root/CLASS/i.png``, random RGB PNGs (``size``² pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root
