"""Labelled image folders in ImageNet layout (``ROOT/CLASS/IMAGE``): calibration images drawn with a
seed and evaluation batches, through the model's own image processor. No pruning logic lives here.

Class indices: when every sub-folder is named by a label of the model's ``config.label2id``, that
label's index; otherwise the sub-folders' sorted order (ImageNet's ``n01440764``, ... folders sort into
the class order of ImageNet-1k models). A folder where only some names are labels is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2prune.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".jfif")


@dataclass
class ImageFolder:
    """The images of a labelled folder, sorted by class folder then file name, with class indices."""

    root: Path
    classes: dict[str, int]  # sub-folder name -> class index
    files: list[tuple[Path, int]]

    def __len__(self) -> int:
        return len(self.files)


def image_folder(
    root: str | Path, label2id: dict[str, int] | None = None, num_labels: int | None = None
) -> ImageFolder:
    """The labelled images under ``root`` (class sub-folders holding image files). ``label2id`` and
    ``num_labels``: the model's, to index the classes and check them (see the module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist or is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise UserError(f"{root} has no class sub-folders (expected ImageNet layout: {root}/CLASS/IMAGE.png)")
    classes = _class_indices([d.name for d in subdirs], label2id, num_labels, root)
    files = [
        (path, classes[d.name])
        for d in subdirs
        for path in sorted(d.iterdir())
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    ]
    if not files:
        raise UserError(f"{root} has no images in its class sub-folders (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return ImageFolder(root, classes, files)


def _class_indices(
    names: list[str], label2id: dict[str, int] | None, num_labels: int | None, root: Path
) -> dict[str, int]:
    known = [n for n in names if label2id and n in label2id]
    if known and len(known) == len(names):
        return {n: int(label2id[n]) for n in names}
    if known:
        stray = next(n for n in names if n not in label2id)
        raise UserError(
            f"{root}: sub-folder {known[0]!r} is a label of the model but {stray!r} is not; name every class "
            "folder by a label of the model's config.label2id, or none (classes then go by sorted folder order)"
        )
    if num_labels is not None and len(names) > num_labels:
        raise UserError(f"{root} has {len(names)} class sub-folders but the model has {num_labels} classes")
    return {n: i for i, n in enumerate(names)}


def read_image(path: Path) -> Any:
    """The image at ``path`` as RGB (PIL); an unreadable file is a UserError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read image {path}: {reason}") from None


def preprocess(processor: Any, paths: list[Path]) -> torch.Tensor:
    """``pixel_values`` (images, channels, height, width) of ``paths`` through the model's processor."""
    return processor(images=[read_image(p) for p in paths], return_tensors="pt")["pixel_values"]


def get_image_calibration(
    processor: Any,
    root: str | Path,
    nsamples: int,
    seed: int = 0,
    label2id: dict[str, int] | None = None,
    num_labels: int | None = None,
) -> dict[str, torch.Tensor]:
    """``nsamples`` images of the folder drawn at random with ``seed`` (without replacement), as
    ``{"pixel_values", "labels"}`` (what ``d2prune.prune`` takes): the paper protocol's random
    training images. The same seed and folder give the same images in the same order."""
    folder = image_folder(root, label2id, num_labels)
    if nsamples > len(folder):
        raise UserError(f"{folder.root} has {len(folder)} images; --nsamples {nsamples} asks for more")
    return _images(processor, folder, _draw(len(folder), nsamples, seed))


def get_image_heldout(
    processor: Any,
    root: str | Path,
    nsamples: int,
    calib_nsamples: int,
    calib_seed: int = 0,
    seed: int = 1,
    label2id: dict[str, int] | None = None,
    num_labels: int | None = None,
) -> dict[str, torch.Tensor]:
    """``nsamples`` images of the folder that the calibration draw (``calib_nsamples``, ``calib_seed``)
    did not pick, drawn with ``seed``: held-out images for choosing an option (``d2prune.selection``)."""
    folder = image_folder(root, label2id, num_labels)
    used = set(_draw(len(folder), min(calib_nsamples, len(folder)), calib_seed))
    rest = [i for i in range(len(folder)) if i not in used]
    if nsamples > len(rest):
        raise UserError(
            f"{folder.root} has {len(rest)} images left after the {calib_nsamples} calibration images; "
            f"{nsamples} held-out images asked for"
        )
    return _images(processor, folder, [rest[i] for i in _draw(len(rest), nsamples, seed)])


def _draw(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``range(n)`` without replacement, in the order of ``torch.randperm`` seeded with ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()


def _images(processor: Any, folder: ImageFolder, indices: list[int]) -> dict[str, torch.Tensor]:
    picked = [folder.files[i] for i in indices]
    return {
        "pixel_values": preprocess(processor, [p for p, _ in picked]),
        "labels": torch.tensor([label for _, label in picked], dtype=torch.long),
    }


class ImageBatches(Sequence):
    """Every image of a folder in its order, ``batch_size`` at a time: batch ``i`` is read and
    preprocessed when it is asked for (so a run holds one batch of an ImageNet-sized folder at a time)."""

    def __init__(self, processor: Any, folder: ImageFolder, batch_size: int):
        if batch_size < 1:
            raise UserError(f"the evaluation batch size must be at least 1, got {batch_size}")
        self.processor, self.folder, self.batch_size = processor, folder, batch_size

    def __len__(self) -> int:
        return -(-len(self.folder) // self.batch_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = self.folder.files[index * self.batch_size : (index + 1) * self.batch_size]
        return {
            "pixel_values": preprocess(self.processor, [p for p, _ in part]),
            "labels": torch.tensor([label for _, label in part], dtype=torch.long),
        }


# Folders up to this size are fingerprinted by their bytes; bigger ones (ImageNet) by names and sizes.
FINGERPRINT_BYTES = 256 << 20


def folder_info(root: str | Path) -> dict[str, Any]:
    """Name, path and a SHA-256 of the folder for the run record: over its relative file names and
    bytes, or over names and sizes when it holds more than ``FINGERPRINT_BYTES`` (reading every byte of
    an ImageNet-sized folder would cost more than the run); ``sha256_of`` says which."""
    import hashlib

    root = Path(root).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    sizes = [p.stat().st_size for p in files]
    by_bytes = sum(sizes) <= FINGERPRINT_BYTES
    digest = hashlib.sha256()
    for path, size in zip(files, sizes):
        digest.update(f"{path.relative_to(root)}\0{size}\0".encode())
        if by_bytes:
            digest.update(path.read_bytes())
    of = "names+bytes" if by_bytes else "names+sizes"
    return {"source": str(root), "path": str(root.resolve()), "sha256": digest.hexdigest(), "sha256_of": of}
