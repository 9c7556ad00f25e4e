"""Hugging Face model folders: read one in a given dtype, save one (model, tokenizer, JSON files) atomically.

No pruning logic lives here; :mod:`d2prune.io.models` decides what to load and save, this module
does the reading and the writing.
"""

from __future__ import annotations

import json
import os
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


def load_hf_folder(path: str | Path, dtype: str):
    """``(model, tokenizer)`` from a local HF folder or a Hub id, the model in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


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
    """``save_pretrained`` model + tokenizer + JSON files (``{file name: record}``) into ``out_dir``
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
