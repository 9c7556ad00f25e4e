"""Hugging Face model folders: read one in a given dtype, save one (model, tokenizer or image processor,
JSON files) atomically; tell a causal LM from an image classifier by its config.

No pruning logic lives here; :mod:`d2prune.io.models` decides what to load and save, this module
does the reading and the writing.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from d2prune.errors import UserError
from d2prune.io.atomic import atomic_folder, prepare_folder_target

_DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(dtype: str):
    """The torch dtype named ``dtype`` (one of float32, bfloat16, float16); anything else is a UserError."""
    import torch

    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


# What transformers and safetensors raise on files they cannot use (a damaged shard reads as an
# OverflowError or a SafetensorError, an unknown architecture as a ValueError or KeyError).
_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    OverflowError,
    EOFError,
    struct.error,
)


def load_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "these model files cannot be loaded" rather than a d2prune bug."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - older safetensors
        return _LOAD_ERRORS
    return (*_LOAD_ERRORS, SafetensorError)


def error_reason(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty), for a one-line error."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def load_tokenizer(path: str | Path):
    """The tokenizer of a local HF folder or Hub id; one that cannot be loaded is a UserError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except UserError:
        raise
    except load_errors() as exc:
        raise UserError(
            f"could not load the tokenizer of {path}: {error_reason(exc)} (the folder needs the tokenizer files, "
            "e.g. tokenizer.json and tokenizer_config.json, of the model it was made from)"
        ) from None


CAUSAL_LM = "causal-lm"
IMAGE_CLASSIFICATION = "image-classification"


def config_task(config) -> str:
    """``IMAGE_CLASSIFICATION`` or ``CAUSAL_LM``, from a model config: the architectures it names
    (``ViTForImageClassification``, ``DeiTForImageClassificationWithTeacher``, ...), else whether its
    model type has an image-classification class and no causal-LM one."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return IMAGE_CLASSIFICATION if any("ForImageClassification" in a for a in architectures) else CAUSAL_LM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if (
        model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return IMAGE_CLASSIFICATION
    return CAUSAL_LM


def is_image_classifier(model_or_config) -> bool:
    """Whether a model (or its config) is an image classifier (ViT, DeiT, ...), not a causal LM."""
    return config_task(getattr(model_or_config, "config", model_or_config)) == IMAGE_CLASSIFICATION


def model_class(config):
    """The class that builds ``config``'s model: the image-classification class it names (so DeiT
    keeps its distillation head, which ``AutoModelForImageClassification`` would drop), else the
    Auto class of its task."""
    import transformers

    if config_task(config) == CAUSAL_LM:
        return transformers.AutoModelForCausalLM
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if "ForImageClassification" in name and isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModelForImageClassification


def load_hf_folder(path: str | Path, dtype: str):
    """``(model, tokenizer)`` from a local HF folder or a Hub id, the model in ``dtype``; for an image
    classifier ``(model, image processor)`` (the PIL one when torchvision is not installed). Files that
    cannot be loaded (damaged, an architecture transformers does not know) are a UserError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path))
        if config_task(config) == IMAGE_CLASSIFICATION:
            return _load_image_classifier(path, config, dtype)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))
    except UserError:
        raise
    except load_errors() as exc:
        raise UserError(f"could not load the model in {path}: {error_reason(exc)}") from None
    return model, load_tokenizer(path)


def load_processor(path: str | Path):
    """The tokenizer of a causal LM's folder, or the image processor of an image classifier's; files that
    cannot be loaded are a UserError."""
    from transformers import AutoConfig, AutoImageProcessor

    try:
        if config_task(AutoConfig.from_pretrained(str(path))) == IMAGE_CLASSIFICATION:
            return AutoImageProcessor.from_pretrained(str(path))
    except UserError:
        raise
    except load_errors() as exc:
        raise UserError(f"could not load the configuration or image processor of {path}: {error_reason(exc)}") from None
    return load_tokenizer(path)


def _load_image_classifier(path: str | Path, config, dtype: str):
    from transformers import AutoImageProcessor

    model = model_class(config).from_pretrained(str(path), dtype=torch_dtype(dtype))
    try:
        processor = AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{path} holds an image classifier but no usable image processor (preprocessor_config.json): "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        ) from None
    return model, processor


def _json_default(obj: Any):
    """Make numpy / torch scalars and arrays, paths and sets serialisable in sparsity.json."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"sparsity record value of type {type(obj).__name__} is not JSON serialisable")


def record_text(data: dict) -> str:
    """A JSON record (``sparsity.json`` and the like) as text; numpy/torch values become plain ones."""
    return json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"


def make_savable(model):
    """Return a GGUF-loaded model in a form ``save_pretrained`` accepts (the model itself if it already is).

    transformers 5.24 loads every GGUF through ``GgufHfQuantizer``. With the default
    ``GgufConfig(dequantize=False)`` it leaves, even when the weights were dequantized to plain float
    tensors (the legacy path every architecture but lfm2/qwen35 takes), ``model.hf_quantizer`` (whose
    ``is_serializable()`` is False), ``model.is_quantized = True``, ``model.quantization_method`` and
    ``config.quantization_config = {quant_method: gguf, dequantize: false}``; ``save_pretrained`` then
    raises "The model is quantized with gguf and is not serializable". ``load_gguf`` avoids that by
    asking for ``GgufConfig(dequantize=True)`` (``postprocess_model`` then strips all of it). For a
    model loaded some other way, this rebuilds the same class from a config without
    ``quantization_config`` on the meta device (no random init, no memory) and moves the loaded
    parameters in with ``load_state_dict(assign=True)`` (no copy); non-persistent buffers (rotary
    ``inv_freq``) are carried over and tied weights stay tied. Non-GGUF quantized models are returned
    unchanged.
    """
    import torch

    config = model.config
    qc = getattr(config, "quantization_config", None)
    if getattr(model, "hf_quantizer", None) is None and qc is None and not getattr(model, "is_quantized", False):
        return model
    if qc is None and getattr(model, "hf_quantizer", None) is not None:
        qc = getattr(model.hf_quantizer, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return model  # bitsandbytes, GPTQ, ...: not ours to unwrap
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._attn_implementation = model.config._attn_implementation
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        new = type(model)._from_config(config, dtype=dtype)
    state = model.state_dict(keep_vars=True)
    new.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in the state dict: take them from the loaded model.
    old_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = new.get_submodule(owner_name) if owner_name else new
            owner._buffers[attr] = old_buffers[name]
    for name, t in list(new.named_parameters()) + list(new.named_buffers()):
        if t.is_meta:  # pragma: no cover - would mean a transformers change
            raise RuntimeError(f"could not rebuild the GGUF-loaded model: {name} stayed on the meta device")
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    if getattr(model, "generation_config", None) is not None and new.can_generate():
        new.generation_config = model.generation_config
    new.eval()
    return new


def save_model_folder(
    model,
    tokenizer,
    out_dir: str | Path,
    extra_json: dict[str, dict],
    replace: bool = True,
    save_weights: Callable[[Any, Path], Any] | None = None,
) -> Path:
    """``save_pretrained`` model + tokenizer (or image processor) + JSON files (``{file name: record}``) into ``out_dir``
    atomically (:func:`d2prune.io.atomic.atomic_folder`). Returns the absolute ``out_dir``.

    With ``replace=False`` (the model cache) a non-empty ``out_dir`` that appeared meanwhile (another
    process filled the same cache entry) is kept and our copy discarded.
    """
    out_dir = prepare_folder_target(out_dir)
    # Serialise before writing anything: a bad record must fail first.
    payloads = {fname: record_text(data) for fname, data in extra_json.items()}
    with atomic_folder(out_dir, replace=replace) as tmp:
        model = make_savable(model)
        config = model.config
        use_cache = getattr(config, "use_cache", None)
        if use_cache is False:
            config.use_cache = True  # the saved model is for inference; we disable it only while pruning
        try:
            if save_weights is None:
                model.save_pretrained(tmp)
            else:
                save_weights(model, tmp)
        finally:
            if use_cache is False:
                config.use_cache = False
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for fname, text in payloads.items():
            (tmp / fname).write_text(text, encoding="utf-8")  # atomic_folder fsyncs it before the rename
    return out_dir
