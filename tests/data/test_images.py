"""Labelled image folders: class indices, the seeded draw of calibration images, lazy batches and
one-line errors for bad folders and unreadable images."""

from __future__ import annotations

import pytest
import torch

from d2prune.data.images import (
    ImageBatches,
    folder_info,
    get_image_calibration,
    get_image_heldout,
    image_folder,
    preprocess,
)
from d2prune.errors import UserError
from vision_models import tiny_processor, write_image_folder


def test_classes_go_by_sorted_folder_order(tmp_path):
    write_image_folder(tmp_path, classes=("emu", "cat", "dog"), per_class=2)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    folder = image_folder(tmp_path)
    assert folder.classes == {"cat": 0, "dog": 1, "emu": 2}
    assert [(p.parent.name, p.name, c) for p, c in folder.files] == [
        ("cat", "0.png", 0),
        ("cat", "1.png", 0),
        ("dog", "0.png", 1),
        ("dog", "1.png", 1),
        ("emu", "0.png", 2),
        ("emu", "1.png", 2),
    ]


def test_classes_named_by_the_models_labels_take_their_indices(tmp_path):
    write_image_folder(tmp_path, classes=("cat", "dog"), per_class=1)
    folder = image_folder(tmp_path, label2id={"dog": 3, "cat": 7, "emu": 0})
    assert folder.classes == {"cat": 7, "dog": 3}
    with pytest.raises(UserError, match="'cat' is a label of the model but 'dog' is not"):
        image_folder(tmp_path, label2id={"cat": 1})
    with pytest.raises(UserError, match="2 class sub-folders but the model has 1 classes"):
        image_folder(tmp_path, label2id={"LABEL_0": 0}, num_labels=1)


def test_calibration_draw_is_seeded_and_matches_the_processor(tmp_path):
    write_image_folder(tmp_path, per_class=3)
    processor = tiny_processor()
    a = get_image_calibration(processor, tmp_path, nsamples=4, seed=5)
    b = get_image_calibration(processor, tmp_path, nsamples=4, seed=5)
    c = get_image_calibration(processor, tmp_path, nsamples=4, seed=6)
    assert a["pixel_values"].shape == (4, 3, 16, 16) and a["labels"].dtype == torch.long
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    # The draw is torch.randperm(9, seed)[:4] over the sorted files, each through the processor.
    folder = image_folder(tmp_path)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(5))[:4].tolist()
    picked = [folder.files[i] for i in order]
    assert torch.equal(a["pixel_values"], preprocess(processor, [p for p, _ in picked]))
    assert a["labels"].tolist() == [label for _, label in picked]
    with pytest.raises(UserError, match="has 9 images; --nsamples 10 asks for more"):
        get_image_calibration(processor, tmp_path, nsamples=10)


def test_heldout_images_are_not_calibration_images(tmp_path):
    write_image_folder(tmp_path, per_class=4)
    processor = tiny_processor()
    calib = get_image_calibration(processor, tmp_path, nsamples=8, seed=3)
    held = get_image_heldout(processor, tmp_path, nsamples=4, calib_nsamples=8, calib_seed=3, seed=1)
    again = get_image_heldout(processor, tmp_path, nsamples=4, calib_nsamples=8, calib_seed=3, seed=1)
    assert torch.equal(held["pixel_values"], again["pixel_values"])
    flat = lambda t: {tuple(x.flatten().tolist()) for x in t}  # noqa: E731
    assert len(flat(held["pixel_values"])) == 4
    assert not flat(held["pixel_values"]) & flat(calib["pixel_values"])
    with pytest.raises(UserError, match="4 images left after the 8 calibration images; 5 held-out"):
        get_image_heldout(processor, tmp_path, nsamples=5, calib_nsamples=8, calib_seed=3)


def test_batches_cover_the_folder_in_order(tmp_path):
    write_image_folder(tmp_path, per_class=3)
    folder = image_folder(tmp_path)
    batches = ImageBatches(tiny_processor(), folder, 4)
    assert len(batches) == 3
    assert [b["labels"].tolist() for b in batches] == [[0, 0, 0, 1], [1, 1, 2, 2], [2]]
    with pytest.raises(IndexError):
        batches[3]


def test_folder_info_changes_with_the_files(tmp_path):
    write_image_folder(tmp_path, per_class=1)
    before = folder_info(tmp_path)
    (tmp_path / "cat" / "extra.png").write_bytes((tmp_path / "cat" / "0.png").read_bytes())
    assert folder_info(tmp_path)["sha256"] != before["sha256"]


def test_bad_folders_and_unreadable_images_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist or is not a folder"):
        image_folder(tmp_path / "missing")
    with pytest.raises(UserError, match="has no class sub-folders"):
        image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="has no images in its class sub-folders"):
        image_folder(tmp_path)
    bad = tmp_path / "cat" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match=f"cannot read image {bad}") as info:
        get_image_calibration(tiny_processor(), tmp_path, nsamples=1)
    assert "\n" not in str(info.value)
